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
#include "f32_vec.cuh"

namespace {

constexpr int kBlock = 256;
constexpr int kVec = 8;
constexpr int kMaxGridY = 65535;

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
// Backward kernels (training): fp32 gradient in, fp32 or bf16 (TOut) gradient out, the saved
// bf16 activations read as the forward read them. Derivatives in fp32, each output rounded once.
// ---------------------------------------------------------------------------------------------

// sigmoid(g) and 1 - sigmoid(g), both from e = e^-|g| without cancellation: for g >= 0,
// 1 - sigmoid(g) = e / (1 + e) instead of 1 - 1 / (1 + e).
__device__ __forceinline__ void sigmoid_pair(float g, float *sig, float *one_minus) {
    const float e = expf(-fabsf(g));
    const float inv = 1.0f / (1.0f + e);
    *sig = g >= 0.0f ? inv : e * inv;
    *one_minus = g >= 0.0f ? e * inv : inv;
}

// d/dg silu(g) = sig (1 + g (1 - sig)), d/du = silu(g): dgate = dout up silu'(g),
// dup = dout silu(g). Outputs may be dout (each element is read before it is written by the
// same thread); they are not __restrict__.
template <int VEC, typename TOut>
__global__ void swiglu_backward_kernel(TOut *dgate, TOut *dup, const float *dout,
                                       const __nv_bfloat16 *__restrict__ gate,
                                       const __nv_bfloat16 *__restrict__ up, int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    float d[VEC], g[VEC], u[VEC];
    sf_vec::load_f32<VEC>(dout + v * VEC, d);
    load_f32<VEC>(gate + v * VEC, g);
    load_f32<VEC>(up + v * VEC, u);
#pragma unroll
    for (int i = 0; i < VEC; i++) {
        float sig, one_minus;
        sigmoid_pair(g[i], &sig, &one_minus);
        const float dsilu = sig * (1.0f + g[i] * one_minus);
        const float du = d[i] * (g[i] * sig);
        d[i] = d[i] * u[i] * dsilu;
        u[i] = du;
    }
    sf_vec::store<VEC>(dgate + v * VEC, d);
    sf_vec::store<VEC>(dup + v * VEC, u);
}

// The fused layout's backward (Phi-3's gate_up_proj): dgate_up [rows, 2 ff] from dout
// [rows, ff] and gate_up [rows, 2 ff]; the 2-D grid of swiglu_fused_kernel.
template <int VEC, typename TOut>
__global__ void swiglu_fused_backward_kernel(TOut *__restrict__ dgate_up,
                                             const float *__restrict__ dout,
                                             const __nv_bfloat16 *__restrict__ gate_up,
                                             int64_t rows, int64_t ff) {
    const int64_t j = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (j >= ff) return;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const __nv_bfloat16 *row = gate_up + r * 2 * ff;
        float d[VEC], g[VEC], u[VEC];
        sf_vec::load_f32<VEC>(dout + r * ff + j, d);
        load_f32<VEC>(row + j, g);
        load_f32<VEC>(row + ff + j, u);
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            float sig, one_minus;
            sigmoid_pair(g[i], &sig, &one_minus);
            const float dsilu = sig * (1.0f + g[i] * one_minus);
            const float du = d[i] * (g[i] * sig);
            d[i] = d[i] * u[i] * dsilu;
            u[i] = du;
        }
        sf_vec::store<VEC>(dgate_up + r * 2 * ff + j, d);
        sf_vec::store<VEC>(dgate_up + r * 2 * ff + ff + j, u);
    }
}

// d/dx x Phi(x) = Phi(x) + x phi(x), Phi written with erfc as in the forward (no cancellation
// in the left tail), phi(x) = e^(-x^2/2) / sqrt(2 pi).
template <int VEC, typename TOut>
__global__ void gelu_backward_kernel(TOut *dx, const float *dy,
                                     const __nv_bfloat16 *__restrict__ x, int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    float d[VEC], a[VEC];
    sf_vec::load_f32<VEC>(dy + v * VEC, d);
    load_f32<VEC>(x + v * VEC, a);
#pragma unroll
    for (int i = 0; i < VEC; i++) {
        const float phi = 0.39894228040143267794f * expf(-0.5f * a[i] * a[i]);
        const float grad = 0.5f * erfcf(-a[i] * 0.70710678118654752440f) + a[i] * phi;
        d[i] *= grad;
    }
    sf_vec::store<VEC>(dx + v * VEC, d);
}

// torch's threshold_backward: 0 where x <= 0 (the kink included), dy elsewhere (also for a NaN
// x). x may be the ReLU's input or its output: relu(x) <= 0 exactly where x <= 0.
template <int VEC, typename TOut>
__global__ void relu_backward_kernel(TOut *dx, const float *dy,
                                     const __nv_bfloat16 *__restrict__ x, int64_t n_vec) {
    const int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n_vec) return;
    float d[VEC], a[VEC];
    sf_vec::load_f32<VEC>(dy + v * VEC, d);
    load_f32<VEC>(x + v * VEC, a);
#pragma unroll
    for (int i = 0; i < VEC; i++) d[i] = a[i] <= 0.0f ? 0.0f : d[i];
    sf_vec::store<VEC>(dx + v * VEC, d);
}

// The bias gradient, db[j] (+)= sum over rows of dy[r, j]: column sums in a fixed order, so
// bit-identical from run to run (no atomics). Block (32, kBiasLanes): threadIdx.x one of 32
// adjacent columns (128 contiguous bytes of an fp32 dy row per warp), threadIdx.y one of
// kBiasLanes interleaved row lanes, each summing its rows in order; lane 0 then adds the
// partials in lane order.
constexpr int kBiasLanes = 16;

template <typename TIn>
__global__ void __launch_bounds__(32 * kBiasLanes)
    bias_backward_kernel(float *__restrict__ db, bool accumulate, const TIn *__restrict__ dy,
                         int64_t ldy, int64_t rows, int64_t dim) {
    __shared__ float part[kBiasLanes][33];
    const int64_t j = (int64_t)blockIdx.x * 32 + threadIdx.x;
    float acc = 0.0f;
    if (j < dim) {
#pragma unroll 4
        for (int64_t r = threadIdx.y; r < rows; r += kBiasLanes) {
            acc += sf_vec::to_f32(dy[r * ldy + j]);
        }
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < dim) {
        float total = part[0][threadIdx.x];
#pragma unroll
        for (int l = 1; l < kBiasLanes; l++) total += part[l][threadIdx.x];
        db[j] = accumulate ? db[j] + total : total;
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (before any CUDA call)
// ---------------------------------------------------------------------------------------------

// 1-D grids: ceil(n / 256) blocks must fit in gridDim.x.
sf_status check_1d(const char *who, int64_t n, bool pointers_ok) {
    if (n < 0 || sf_ceil_div(n, kBlock) > 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld", who, (long long)n);
    }
    if (n > 0 && !pointers_ok) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", who);
    return SF_OK;
}

sf_status check_2d(const char *who, int64_t rows, int64_t cols, bool pointers_ok) {
    if (rows < 0 || cols < 0 || sf_ceil_div(cols, kBlock) > 0x7fffffff ||
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
    return dim3((unsigned)sf_ceil_div(cols_vec, kBlock),
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
        swiglu_kernel<kVec><<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(
            bf(out), bf(gate), bf(up), n_vec);
    } else {
        swiglu_kernel<1>
            <<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(gate), bf(up), n);
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
        add_kernel<kVec><<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(
            bf(out), bf(a), bf(b), n_vec);
    } else {
        add_kernel<1><<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(a),
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
            <<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n_vec);
    } else {
        gelu_kernel<1><<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n);
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
            <<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n_vec);
    } else {
        relu_kernel<1><<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(bf(out), bf(x), n);
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

// ---------------------------------------------------------------------------------------------
// Backward launchers
// ---------------------------------------------------------------------------------------------

namespace {

// Calls go(TOut *) with the output pointer in its storage type.
template <typename Go>
void with_out(void *p, bool bf16, Go &&go) {
    if (bf16) {
        go(static_cast<__nv_bfloat16 *>(p));
    } else {
        go(static_cast<float *>(p));
    }
}

// Element alignment of a gradient output (4 bytes fp32, 2 bf16), an fp32 input, a bf16 input.
bool out_aligned(const void *p, bool bf16) { return ((uintptr_t)p & (bf16 ? 1u : 3u)) == 0; }
bool f32_aligned(const void *p) { return ((uintptr_t)p & 3u) == 0; }
bool bf16_aligned(const void *p) { return ((uintptr_t)p & 1u) == 0; }

// An output may be its fp32 gradient input exactly, never a bf16 output over an fp32 input.
sf_status check_out_alias(const char *who, const void *out, bool out_bf16, const float *in) {
    if (out_bf16 && out == (const void *)in) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: a bf16 output cannot be written over dy",
                       who);
    }
    return SF_OK;
}

}  // namespace

extern "C" sf_status sf_cuda_swiglu_backward(void *dgate, void *dup, bool out_bf16,
                                             const float *dout, const sf_bf16 *gate,
                                             const sf_bf16 *up, int64_t n, cudaStream_t stream) {
    static const char who[] = "sf_cuda_swiglu_backward";
    sf_status st = check_1d(who, n, dgate && dup && dout && gate && up);
    if (st != SF_OK || n == 0) return st;
    if (!out_aligned(dgate, out_bf16) || !out_aligned(dup, out_bf16) || !f32_aligned(dout) ||
        !bf16_aligned(gate) || !bf16_aligned(up)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", who);
    }
    if (dgate == dup) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: dgate == dup", who);
    if ((st = check_out_alias(who, dgate, out_bf16, dout)) != SF_OK) return st;
    if ((st = check_out_alias(who, dup, out_bf16, dout)) != SF_OK) return st;
    sf_nvtx_range range(who);
    const bool vec = n % kVec == 0 && aligned16(dgate) && aligned16(dup) && aligned16(dout) &&
                     aligned16(gate) && aligned16(up);
    with_out(dgate, out_bf16, [&](auto *dg) {
        auto *du = reinterpret_cast<decltype(dg)>(dup);
        if (vec) {
            const int64_t n_vec = n / kVec;
            swiglu_backward_kernel<kVec>
                <<<(unsigned)sf_ceil_div(n_vec, kBlock), kBlock, 0, stream>>>(
                    dg, du, dout, bf(gate), bf(up), n_vec);
        } else {
            swiglu_backward_kernel<1><<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(
                dg, du, dout, bf(gate), bf(up), n);
        }
    });
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_swiglu_fused_backward(void *dgate_up, bool out_bf16,
                                                   const float *dout, const sf_bf16 *gate_up,
                                                   int64_t rows, int64_t ff,
                                                   cudaStream_t stream) {
    static const char who[] = "sf_cuda_swiglu_fused_backward";
    sf_status st = check_2d(who, rows, ff, dgate_up && dout && gate_up);
    if (st != SF_OK || rows == 0 || ff == 0) return st;
    if (!out_aligned(dgate_up, out_bf16) || !f32_aligned(dout) || !bf16_aligned(gate_up)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", who);
    }
    sf_nvtx_range range(who);
    const bool vec = ff % kVec == 0 && aligned16(dgate_up) && aligned16(dout) &&
                     aligned16(gate_up);
    with_out(dgate_up, out_bf16, [&](auto *out) {
        if (vec) {
            swiglu_fused_backward_kernel<kVec>
                <<<grid_2d(rows, ff / kVec), kBlock, 0, stream>>>(out, dout, bf(gate_up), rows, ff);
        } else {
            swiglu_fused_backward_kernel<1>
                <<<grid_2d(rows, ff), kBlock, 0, stream>>>(out, dout, bf(gate_up), rows, ff);
        }
    });
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

// GELU and ReLU backward share their shape: dx from dy and x, elementwise.
namespace {

template <typename Launch>
sf_status unary_backward(const char *who, void *dx, bool dx_bf16, const float *dy,
                         const sf_bf16 *x, int64_t n, Launch &&launch) {
    sf_status st = check_1d(who, n, dx && dy && x);
    if (st != SF_OK || n == 0) return st;
    if (!out_aligned(dx, dx_bf16) || !f32_aligned(dy) || !bf16_aligned(x)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", who);
    }
    if ((st = check_out_alias(who, dx, dx_bf16, dy)) != SF_OK) return st;
    sf_nvtx_range range(who);
    const bool vec = n % kVec == 0 && aligned16(dx) && aligned16(dy) && aligned16(x);
    with_out(dx, dx_bf16, [&](auto *out) { launch(out, vec); });
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

}  // namespace

extern "C" sf_status sf_cuda_gelu_backward(void *dx, bool dx_bf16, const float *dy,
                                           const sf_bf16 *x, int64_t n, cudaStream_t stream) {
    return unary_backward("sf_cuda_gelu_backward", dx, dx_bf16, dy, x, n, [&](auto *out, bool vec) {
        if (vec) {
            gelu_backward_kernel<kVec>
                <<<(unsigned)sf_ceil_div(n / kVec, kBlock), kBlock, 0, stream>>>(out, dy, bf(x),
                                                                                 n / kVec);
        } else {
            gelu_backward_kernel<1>
                <<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(out, dy, bf(x), n);
        }
    });
}

extern "C" sf_status sf_cuda_relu_backward(void *dx, bool dx_bf16, const float *dy,
                                           const sf_bf16 *x, int64_t n, cudaStream_t stream) {
    return unary_backward("sf_cuda_relu_backward", dx, dx_bf16, dy, x, n, [&](auto *out, bool vec) {
        if (vec) {
            relu_backward_kernel<kVec>
                <<<(unsigned)sf_ceil_div(n / kVec, kBlock), kBlock, 0, stream>>>(out, dy, bf(x),
                                                                                 n / kVec);
        } else {
            relu_backward_kernel<1>
                <<<(unsigned)sf_ceil_div(n, kBlock), kBlock, 0, stream>>>(out, dy, bf(x), n);
        }
    });
}

extern "C" sf_status sf_cuda_bias_backward(float *db, bool accumulate, const void *dy,
                                           bool dy_bf16, int64_t ldy, int64_t rows, int64_t dim,
                                           cudaStream_t stream) {
    static const char who[] = "sf_cuda_bias_backward";
    if (rows < 0 || dim < 0 || ldy < dim || sf_ceil_div(dim, 32) > 0x7fffffff ||
        (rows > 0 && ldy > INT64_MAX / 4 / rows)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: rows = %lld, dim = %lld, ldy = %lld", who,
                       (long long)rows, (long long)dim, (long long)ldy);
    }
    if (dim == 0) return SF_OK;
    if (!db || (rows > 0 && !dy)) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", who);
    if (!f32_aligned(db) || !(dy_bf16 ? bf16_aligned(dy) : f32_aligned(dy))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", who);
    }
    // No rows: the sum is 0, which only matters when db is overwritten.
    if (rows == 0 && accumulate) return SF_OK;
    sf_nvtx_range range(who);
    const dim3 block(32, kBiasLanes);
    const unsigned grid = (unsigned)sf_ceil_div(dim, 32);
    if (dy_bf16) {
        bias_backward_kernel<<<grid, block, 0, stream>>>(
            db, accumulate, static_cast<const __nv_bfloat16 *>(dy), ldy, rows, dim);
    } else {
        bias_backward_kernel<<<grid, block, 0, stream>>>(db, accumulate,
                                                         static_cast<const float *>(dy), ldy,
                                                         rows, dim);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}
