/* What the host-side benchmarks (bench_*.c) share: a monotonic clock and the median of a
 * sample of timings. Header-only: each benchmark is one source file. */
#ifndef SF_BENCH_UTIL_H
#define SF_BENCH_UTIL_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Seconds on the monotonic clock (differences only). */
static inline double bench_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline int bench_cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of v[0..n) (the mean of the middle two when n is even); v is left as it is.
 * NaN for n <= 0 or when no memory is left for the sorted copy. */
static inline double bench_median(const double *v, int n) {
    if (n <= 0) return NAN;
    double *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp) return NAN;
    memcpy(tmp, v, (size_t)n * sizeof *v);
    qsort(tmp, (size_t)n, sizeof *tmp, bench_cmp_double);
    const double m = (n % 2) ? tmp[n / 2] : 0.5 * (tmp[n / 2 - 1] + tmp[n / 2]);
    free(tmp);
    return m;
}

/* The q-quantile (0 <= q <= 1) of v[0 .. n), nearest rank: the smallest value with at least
 * q n values at or below it. NAN when n <= 0 or out of memory. */
static inline double bench_quantile(const double *v, int n, double q) {
    if (n <= 0) return NAN;
    double *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp) return NAN;
    memcpy(tmp, v, (size_t)n * sizeof *v);
    qsort(tmp, (size_t)n, sizeof *tmp, bench_cmp_double);
    int k = (int)ceil(q * n) - 1;
    if (k < 0) k = 0;
    if (k > n - 1) k = n - 1;
    const double x = tmp[k];
    free(tmp);
    return x;
}

#endif
