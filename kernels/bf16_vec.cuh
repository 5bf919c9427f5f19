// Internal: moving bf16 values between memory and fp32 registers, 8 at a time (one 128-bit
// access) or 1 at a time, for the elementwise kernels.
#pragma once

#include <cuda_bf16.h>
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

}  // namespace sf_vec
