// Elementwise activations on bf16 storage with fp32 arithmetic. CPU twin:
// host/cpu/activations.c (which forms each value in double: the reference, not a copy).
//
// Every kernel has a 128-bit path (8 bf16 per thread, VEC = 8), taken when the row length is a
// multiple of 8 and every pointer is 16-byte aligned, and a scalar path (VEC = 1) for the rest.
// These ops are pure bandwidth: one fp32 expf / erfcf per value is far below the memory time.
#include <cuda_bf16.h>

#include "activations.h"
#include "bf16_vec.cuh"
#include "cuda_check.cuh"

namespace {

constexpr int kBlock = 256;
constexpr int kVec = 8;
constexpr int kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
using sf_vec::aligned16;
using sf_vec::load_f32;
using sf_vec::store_bf16;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// g * sigmoid(g) with e = e^-|g|, so that the exponential never overflows: g / (1 + e^-g)
// would turn every g below -88.7 into -0 although g e^g is still a normal fp32 (and bf16) value
// down to g = -100 or so. IEEE division (nvcc's default -prec-div=true) and expf (2 ulp), not
// __expf.
__device__ __forceinline__ float silu(float g) {
    const float e = expf(-fabsf(g));
    return g * ((g >= 0.0f ? 1.0f : e) / (1.0f + e));
}

// x/2 (1 + erf(x / sqrt 2)) written with erfc, as the CPU twin, so the left tail keeps its
// relative accuracy instead of cancelling to 0.
__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * erfcf(-x * 0.70710678118654752440f);
}

// Pointers are not __restrict__: out may be one of the inputs, read before written by the same
// thread.
template <int VEC>
__global__ void swiglu_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *gate,
                              const __nv_bfloat16 *up, int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    float g[VEC], u[VEC];
    load_f32<VEC>(gate + v * VEC, g);
    load_f32<VEC>(up + v * VEC, u);
#pragma unroll
    for (int i = 0; i < VEC; i++) g[i] = silu(g[i]) * u[i];
    store_bf16<VEC>(out + v * VEC, g);
}

// 2-D grid: x over a row's VEC-wide column groups, y (striding) over rows, so no 64-bit
// division by the row length is needed.
template <int VEC>
__global__ void swiglu_fused_kernel(__nv_bfloat16 *__restrict__ out,
                                    const __nv_bfloat16 *__restrict__ gate_up, int64_t rows,
                                    int64_t ff) {
    const int64_t j = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (j >= ff) return;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const __nv_bfloat16 *row = gate_up + r * 2 * ff;
        float g[VEC], u[VEC];
        load_f32<VEC>(row + j, g);
        load_f32<VEC>(row + ff + j, u);
#pragma unroll
        for (int i = 0; i < VEC; i++) g[i] = silu(g[i]) * u[i];
        store_bf16<VEC>(out + r * ff + j, g);
    }
}

// The residual add that no norm follows (the Sysformer's last sub-block without a final norm).
template <int VEC>
__global__ void add_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *a, const __nv_bfloat16 *b,
                           int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    float x[VEC], y[VEC];
    load_f32<VEC>(a + v * VEC, x);
    load_f32<VEC>(b + v * VEC, y);
#pragma unroll
    for (int i = 0; i < VEC; i++) x[i] += y[i];
    store_bf16<VEC>(out + v * VEC, x);
}

template <int VEC>
__global__ void gelu_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *x, int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    float a[VEC];
    load_f32<VEC>(x + v * VEC, a);
#pragma unroll
    for (int i = 0; i < VEC; i++) a[i] = gelu(a[i]);
    store_bf16<VEC>(out + v * VEC, a);
}

// ReLU selects between a value and zero, so it moves bits: no rounding, NaN payloads kept.
// Elements are uint16_t bf16 bits (VEC = 1) or uint4 groups of 8 (VEC = 8).
// x < 0 holds exactly for the bit patterns 0x8001 (the smallest negative subnormal) through
// 0xff80 (-inf); -0 (0x8000) stays -0 and negative NaNs (above 0xff80) stay NaN, as in the CPU
// twin's `x < 0 ? 0 : x`.
__device__ __forceinline__ uint16_t relu_bits(uint16_t h) {
    return (h > 0x8000u && h <= 0xff80u) ? (uint16_t)0 : h;
}

template <int VEC>
__global__ void relu_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *x, int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    if constexpr (VEC == 1) {
        const uint16_t h = reinterpret_cast<const uint16_t *>(x)[v];
        reinterpret_cast<uint16_t *>(out)[v] = relu_bits(h);
    } else {
        uint4 raw = reinterpret_cast<const uint4 *>(x)[v];
        uint16_t *h = reinterpret_cast<uint16_t *>(&raw);
#pragma unroll
        for (int i = 0; i < 8; i++) h[i] = relu_bits(h[i]);
        reinterpret_cast<uint4 *>(out)[v] = raw;
    }
}

template <int VEC>
__global__ void bias_add_kernel(__nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ b,
                                int64_t rows, int64_t dim) {
    const int64_t j = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (j >= dim) return;
    float bias[VEC];
    load_f32<VEC>(b + j, bias);
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        float a[VEC];
        load_f32<VEC>(x + r * dim + j, a);
#pragma unroll
        for (int i = 0; i < VEC; i++) a[i] += bias[i];
        store_bf16<VEC>(x + r * dim + j, a);
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (before any CUDA call)
// ---------------------------------------------------------------------------------------------

// 1-D grids: ceil(n / 256) blocks must fit in gridDim.x.
sf_status check_1d(const char *who, int64_t n, bool pointers_ok) {
    if (n < 0 || ceil_div(n, kBlock) > 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld", who, (long long)n);
    }
    if (n > 0 && !pointers_ok) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", who);
    return SF_OK;
}

sf_status check_2d(const char *who, int64_t rows, int64_t cols, bool pointers_ok) {
    if (rows < 0 || cols < 0 || ceil_div(cols, kBlock) > 0x7fffffff ||
        (cols > 0 && rows > INT64_MAX / 2 / cols)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: rows = %lld, cols = %lld", who,
                       (long long)rows, (long long)cols);
    }
    if (rows > 0 && cols > 0 && !pointers_ok) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", who);
    }
    return SF_OK;
}

dim3 grid_2d(int64_t rows, int64_t cols_vec) {
    return dim3((unsigned)ceil_div(cols_vec, kBlock),
                (unsigned)(rows < kMaxGridY ? rows : kMaxGridY));
}

inline __nv_bfloat16 *bf(sf_bf16 *p) { return reinterpret_cast<__nv_bfloat16 *>(p); }
inline const __nv_bfloat16 *bf(const sf_bf16 *p) {
    return reinterpret_cast<const __nv_bfloat16 *>(p);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

extern "C" sf_status sf_cuda_swiglu_bf16(sf_bf16 *out, const sf_bf16 *gate, const sf_bf16 *up,
                                         int64_t n, cudaStream_t stream) {
    sf_status st = check_1d("sf_cuda_swiglu_bf16", n, out && gate && up);
    if (st != SF_OK || n == 0) return st;
    sf_nvtx_range range("sf_cuda_swiglu_bf16");
    if (n % kVec == 0 && aligned16(out) && aligned16(gate) && aligned16(up)) {
        const int64_t n_vec = n / kVec;
        swiglu_kernel<kVec><<<(unsigned)ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(
            bf(out), bf(gate), bf(up), n_vec);
    } else {
        swiglu_kernel<1>
            <<<(unsigned)ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(gate), bf(up), n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_swiglu_fused_bf16(sf_bf16 *out, const sf_bf16 *gate_up, int64_t rows,
                                               int64_t ff, cudaStream_t stream) {
    sf_status st = check_2d("sf_cuda_swiglu_fused_bf16", rows, ff, out && gate_up);
    if (st != SF_OK || rows == 0 || ff == 0) return st;
    sf_nvtx_range range("sf_cuda_swiglu_fused_bf16");
    if (ff % kVec == 0 && aligned16(out) && aligned16(gate_up)) {
        swiglu_fused_kernel<kVec>
            <<<grid_2d(rows, ff / kVec), kBlock, 0, stream>>>(bf(out), bf(gate_up), rows, ff);
    } else {
        swiglu_fused_kernel<1>
            <<<grid_2d(rows, ff), kBlock, 0, stream>>>(bf(out), bf(gate_up), rows, ff);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_add_bf16(sf_bf16 *out, const sf_bf16 *a, const sf_bf16 *b,
                                      int64_t n, cudaStream_t stream) {
    if (n < 0 || (n > 0 && (!out || !a || !b))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_add_bf16: n = %lld or NULL pointer",
                       (long long)n);
    }
    if (n == 0) return SF_OK;
    sf_nvtx_range range("sf_cuda_add_bf16");
    if (n % kVec == 0 && aligned16(out) && aligned16(a) && aligned16(b)) {
        const int64_t n_vec = n / kVec;
        add_kernel<kVec><<<(unsigned)ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(
            bf(out), bf(a), bf(b), n_vec);
    } else {
        add_kernel<1><<<(unsigned)ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(a),
                                                                              bf(b), n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_gelu_bf16(sf_bf16 *out, const sf_bf16 *x, int64_t n,
                                       cudaStream_t stream) {
    sf_status st = check_1d("sf_cuda_gelu_bf16", n, out && x);
    if (st != SF_OK || n == 0) return st;
    sf_nvtx_range range("sf_cuda_gelu_bf16");
    if (n % kVec == 0 && aligned16(out) && aligned16(x)) {
        const int64_t n_vec = n / kVec;
        gelu_kernel<kVec>
            <<<(unsigned)ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n_vec);
    } else {
        gelu_kernel<1><<<(unsigned)ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_relu_bf16(sf_bf16 *out, const sf_bf16 *x, int64_t n,
                                       cudaStream_t stream) {
    sf_status st = check_1d("sf_cuda_relu_bf16", n, out && x);
    if (st != SF_OK || n == 0) return st;
    sf_nvtx_range range("sf_cuda_relu_bf16");
    if (n % kVec == 0 && aligned16(out) && aligned16(x)) {
        const int64_t n_vec = n / kVec;
        relu_kernel<kVec>
            <<<(unsigned)ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n_vec);
    } else {
        relu_kernel<1><<<(unsigned)ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_bias_add_bf16(sf_bf16 *x, const sf_bf16 *b, int64_t rows, int64_t dim,
                                           cudaStream_t stream) {
    sf_status st = check_2d("sf_cuda_bias_add_bf16", rows, dim, x && b);
    if (st != SF_OK || rows == 0 || dim == 0) return st;
    sf_nvtx_range range("sf_cuda_bias_add_bf16");
    if (dim % kVec == 0 && aligned16(x) && aligned16(b)) {
        bias_add_kernel<kVec>
            <<<grid_2d(rows, dim / kVec), kBlock, 0, stream>>>(bf(x), bf(b), rows, dim);
    } else {
        bias_add_kernel<1><<<grid_2d(rows, dim), kBlock, 0, stream>>>(bf(x), bf(b), rows, dim);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}
