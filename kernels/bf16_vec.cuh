// Internal: moving bf16 values between memory and fp32 registers, 8 at a time (one 128-bit
// access) or 1 at a time, for the elementwise kernels; and the two 16-bit float formats'
// conversions on bits, for kernels written once for both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace sf_vec {

inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// VEC bf16 values at p (p[0] 16-byte aligned when VEC = 8) to fp32, and back with RNE.
template <int VEC>
__device__ __forceinline__ void load_f32(const __nv_bfloat16 *p, float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        v[0] = __bfloat162float(*p);
    } else {
        static_assert(VEC == 8, "VEC is 1 or 8");
        const uint4 raw = *reinterpret_cast<const uint4 *>(p);
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float2 f = __bfloat1622float2(h[i]);
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    }
}

template <int VEC>
__device__ __forceinline__ void store_bf16(__nv_bfloat16 *p, const float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        *p = __float2bfloat16_rn(v[0]);
    } else {
        __align__(16) __nv_bfloat162 h[4];
#pragma unroll
        for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        *reinterpret_cast<uint4 *>(p) = *reinterpret_cast<const uint4 *>(h);
    }
}

// A 16-bit float format as bits: to fp32 (exact) and from fp32 (round to nearest, ties to
// even; overflow to +-inf; NaN stays NaN), one value or a pair packed low value first. Bf16 is
// the engine's storage; F16 (IEEE binary16) the embeddings of a serving stack that runs its
// LLM in fp16 (SF_EMBEDDING_F16).
struct Bf16 {
    __device__ static float to_f32(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
    __device__ static uint16_t from_f32(float f) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(f));
    }
    __device__ static uint32_t pack2(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return (uint32_t)__bfloat16_as_ushort(h.x) | (uint32_t)__bfloat16_as_ushort(h.y) << 16;
    }
};

struct F16 {
    __device__ static float to_f32(uint16_t b) { return __half2float(__ushort_as_half(b)); }
    __device__ static uint16_t from_f32(float f) { return __half_as_ushort(__float2half_rn(f)); }
    __device__ static uint32_t pack2(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return (uint32_t)__half_as_ushort(h.x) | (uint32_t)__half_as_ushort(h.y) << 16;
    }
};

}  // namespace sf_vec
