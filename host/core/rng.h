/* Internal: a small seeded random number generator (splitmix64), the same stream on every
 * platform, for random models, initialisation and sampling. */
#ifndef SF_CORE_RNG_H
#define SF_CORE_RNG_H

#include <math.h>
#include <stdint.h>

typedef struct sf_rng {
    uint64_t state;
} sf_rng;

static inline sf_rng sf_rng_seed(uint64_t seed) {
    sf_rng r = {seed};
    return r;
}

static inline uint64_t sf_rng_next(sf_rng *r) {
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1), 53 random bits. */
static inline double sf_rng_uniform(sf_rng *r) {
    return (double)(sf_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Standard normal by Box-Muller (one value per call; simplicity over speed). */
static inline double sf_rng_normal(sf_rng *r) {
    double u1 = sf_rng_uniform(r), u2 = sf_rng_uniform(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

#endif
