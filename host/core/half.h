/* Internal: 16-bit float formats to fp32, shared by the safetensors and GGUF readers. */
#ifndef SF_CORE_HALF_H
#define SF_CORE_HALF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float sf_f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE binary16 -> binary32, exact for every input (binary32 holds every binary16 value). NaN
 * payloads move to the top of the wider mantissa, so quiet NaNs stay quiet. */
static inline float sf_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t frac = h & 0x3ffu;
    if (e == 0x1f) return sf_f32_from_bits(sign | 0x7f800000u | (frac << 13)); /* inf, NaN */
    if (e != 0) return sf_f32_from_bits(sign | ((e + 127u - 15u) << 23) | (frac << 13));
    /* zero or subnormal: frac * 2^-24, exact in binary32 */
    const float mag = ldexpf((float)frac, -24);
    return sign ? -mag : mag;
}

/* bfloat16 is the top half of a binary32. */
static inline float sf_bf16_to_f32(uint16_t h) { return sf_f32_from_bits((uint32_t)h << 16); }

#endif
