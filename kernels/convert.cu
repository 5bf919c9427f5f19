// fp32 <-> bf16 conversion, and fp32 -> fp16 (a serving stack's fp16 embedding table). CPU
// twins: to_bf16 / from_bf16 and to_f16 in tests/cuda_test_util.h (the same
// round-to-nearest-even), so the tests compare bits.
#include <cuda_bf16.h>

#include "bf16_vec.cuh"
#include "convert.h"
#include "cuda_check.cuh"

namespace {

constexpr int kBlock = 256;
// 8 values per thread on the vector path: 16 bytes of bf16, two float4 of fp32.
constexpr int kVec = 8;


inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// VEC = 8: both pointers 16-byte aligned and n a multiple of 8, so every access is one 128-bit
// (16-bit formats) or two 128-bit (fp32) transactions. VEC = 1 handles every other case. Fmt
// is sf_vec::Bf16 or sf_vec::F16.
template <int VEC, class Fmt>
__global__ void f32_to_16_kernel(uint16_t *__restrict__ out, const float *__restrict__ in,
                                 int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    if constexpr (VEC == 1) {
        out[v] = Fmt::from_f32(in[v]);
    } else {
        const float4 *src = reinterpret_cast<const float4 *>(in) + 2 * v;
        const float4 a = src[0], b = src[1];
        reinterpret_cast<uint4 *>(out)[v] = make_uint4(Fmt::pack2(a.x, a.y), Fmt::pack2(a.z, a.w),
                                                       Fmt::pack2(b.x, b.y), Fmt::pack2(b.z, b.w));
    }
}

template <int VEC>
__global__ void bf16_to_f32_kernel(float *__restrict__ out, const __nv_bfloat16 *__restrict__ in,
                                   int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    if constexpr (VEC == 1) {
        out[v] = __bfloat162float(in[v]);
    } else {
        const uint4 raw = reinterpret_cast<const uint4 *>(in)[v];
        const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
        const float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]);
        const float2 f2 = __bfloat1622float2(h[2]), f3 = __bfloat1622float2(h[3]);
        float4 *dst = reinterpret_cast<float4 *>(out) + 2 * v;
        dst[0] = make_float4(f0.x, f0.y, f1.x, f1.y);
        dst[1] = make_float4(f2.x, f2.y, f3.x, f3.y);
    }
}

// Grids are 1-D with 64-bit indices: n up to 2^31 blocks * 256 threads * 8 values.
sf_status check_n(const char *who, const void *out, const void *in, int64_t n) {
    if (n < 0 || sf_ceil_div(n, kBlock) > 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld", who, (long long)n);
    }
    if (n > 0 && (!out || !in)) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", who);
    return SF_OK;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <class Fmt>
static sf_status f32_to_16(const char *who, uint16_t *out, const float *in, int64_t n,
                           cudaStream_t stream) {
    sf_status st = check_n(who, out, in, n);
    if (st != SF_OK || n == 0) return st;
    sf_nvtx_range range(who);
    if (n % kVec == 0 && aligned16(out) && aligned16(in)) {
        const int64_t n_vec = n / kVec;
        f32_to_16_kernel<kVec, Fmt>
            <<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(out, in, n_vec);
    } else {
        f32_to_16_kernel<1, Fmt>
            <<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(out, in, n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_f32_to_bf16(sf_bf16 *out, const float *in, int64_t n,
                                         cudaStream_t stream) {
    return f32_to_16<sf_vec::Bf16>("sf_cuda_f32_to_bf16", out, in, n, stream);
}

extern "C" sf_status sf_cuda_f32_to_f16(sf_f16 *out, const float *in, int64_t n,
                                        cudaStream_t stream) {
    return f32_to_16<sf_vec::F16>("sf_cuda_f32_to_f16", out, in, n, stream);
}

extern "C" sf_status sf_cuda_bf16_to_f32(float *out, const sf_bf16 *in, int64_t n,
                                         cudaStream_t stream) {
    sf_status st = check_n("sf_cuda_bf16_to_f32", out, in, n);
    if (st != SF_OK || n == 0) return st;
    sf_nvtx_range range("sf_cuda_bf16_to_f32");
    const __nv_bfloat16 *i = reinterpret_cast<const __nv_bfloat16 *>(in);
    if (n % kVec == 0 && aligned16(out) && aligned16(in)) {
        const int64_t n_vec = n / kVec;
        bf16_to_f32_kernel<kVec>
            <<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(out, i, n_vec);
    } else {
        bf16_to_f32_kernel<1><<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(out, i, n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}
