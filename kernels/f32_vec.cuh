// Internal: moving fp32 values (the training gradients) between memory and registers, 8 at a
// time (two 128-bit accesses) or 1 at a time, and storing an fp32 result as fp32 or bf16: the
// fp32 counterpart of bf16_vec.cuh for the backward kernels.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "bf16_vec.cuh"

namespace sf_vec {

// VEC fp32 values at p (16-byte aligned when VEC = 8). Plain loads and stores: the backward
// kernels allow a gradient output to be its input.
template <int VEC>
__device__ __forceinline__ void load_f32(const float *p, float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        v[0] = *p;
    } else {
        static_assert(VEC == 8, "VEC is 1 or 8");
        const float4 a = reinterpret_cast<const float4 *>(p)[0];
        const float4 b = reinterpret_cast<const float4 *>(p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    }
}

template <int VEC>
__device__ __forceinline__ void store_f32(float *p, const float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        *p = v[0];
    } else {
        static_assert(VEC == 8, "VEC is 1 or 8");
        reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// An fp32 result stored as T: float as is, __nv_bfloat16 rounded to nearest even.
template <int VEC>
__device__ __forceinline__ void store(float *p, const float (&v)[VEC]) {
    store_f32<VEC>(p, v);
}
template <int VEC>
__device__ __forceinline__ void store(__nv_bfloat16 *p, const float (&v)[VEC]) {
    store_bf16<VEC>(p, v);
}

// A value of either storage type as fp32 (exact).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace sf_vec
