// The optimizer step on the device: the global gradient norm with its clip coefficient, and
// AdamW. CPU twins: sf_clip_grad_norm and sf_adamw_step (host/train/trainer.c). Contract and
// precision: optim.h.
#include <math.h>
#include <stdint.h>

#include "bf16_vec.cuh"
#include "cuda_check.cuh"
#include "optim.h"

namespace {

// The norm: the first pass gives each block at least kNormMinPerBlock elements (a block of
// 256 threads reading 4 at a time, 4 times) and at most kNormMaxBlocks blocks, which fill an
// H200 (132 SMs x 8 resident blocks of 256) while the partials stay one block's work for the
// second pass. The block count depends on n only, so the summation tree (and the bits) does
// too, on any device.
constexpr int kNormBlock = 256;
constexpr int kNormWarps = kNormBlock / 32;
constexpr int kNormMaxBlocks = 1024;
constexpr int64_t kNormMinPerBlock = 4 * 4 * kNormBlock;

// AdamW: grid-stride, at most kAdamMaxBlocks blocks (each thread then takes a few strides of
// the 10.6 M weights of SmolLM2's Sysformer rather than one launch per 1024 elements).
constexpr int kAdamBlock = 256;
constexpr int64_t kAdamMaxBlocks = 4096;


using sf_vec::aligned16;

int norm_blocks(int64_t n) {
    const int64_t b = sf_ceil_div(n, kNormMinPerBlock);
    return (int)(b < 1 ? 1 : b > kNormMaxBlocks ? kNormMaxBlocks : b);
}

// sf_adamw_step's per-step constants, computed on the host by the CPU's expressions.
struct AdamwConsts {
    double b1, b2;          // beta1, beta2
    double omb1, omb2;      // 1 - beta1, 1 - beta2
    double decay;           // 1 - lr weight_decay
    double step_size;       // lr / (1 - beta1^t)
    double inv_sqrt_bc2;    // 1 / sqrt(1 - beta2^t)
    double eps;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

// The sum of every thread's s in a fixed order (xor butterfly in each warp, then warp 0 over
// the warps' sums), valid in thread 0. Addition commutes exactly, so both sides of a butterfly
// hold the same bits. warp_sums: kNormWarps doubles of shared memory.
__device__ __forceinline__ double block_sum(double s, double *warp_sums) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < kNormWarps ? warp_sums[lane] : 0.0;
#pragma unroll
        for (int o = kNormWarps / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    return s;
}

// The gradient element AdamW sees: sf_clip_grad_norm's (float)((double)g * coef) when the
// coefficient is below 1, else g untouched (the CPU leaves g alone then).
__device__ __forceinline__ float clipped(float g, double coef) {
    return coef < 1.0 ? __double2float_rn(__dmul_rn((double)g, coef)) : g;
}

// One element of sf_adamw_step: its double operations in its order, each rounded on its own
// (the intrinsics keep nvcc from fusing a product into the following add, which the CPU's
// compiler does not do either), then m, v and w rounded to fp32.
__device__ __forceinline__ void adamw_one(float &w, float g, float &m, float &v,
                                          const AdamwConsts &k) {
    const double gi = g;
    const double mi = __dadd_rn(__dmul_rn(k.b1, (double)m), __dmul_rn(k.omb1, gi));
    const double vi = __dadd_rn(__dmul_rn(k.b2, (double)v), __dmul_rn(__dmul_rn(k.omb2, gi), gi));
    m = __double2float_rn(mi);
    v = __double2float_rn(vi);
    const double denom = __dadd_rn(__dmul_rn(__dsqrt_rn(vi), k.inv_sqrt_bc2), k.eps);
    w = __double2float_rn(
        __dsub_rn(__dmul_rn((double)w, k.decay), __ddiv_rn(__dmul_rn(k.step_size, mi), denom)));
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Pass 1: partial[b] = the sum of squares of block b's elements. Thread t of block b reads the
// 4-element chunks t + 256 b, then every 256 gridDim.x further; a chunk's squares are added in
// index order whether it was read as one float4 (VEC: g 16-byte aligned, a whole chunk) or as
// 4 floats (the tail, or any alignment), so the tree is the same for every pointer. A square is
// exact in double, and the zeros past n add nothing.
template <bool VEC>
__global__ void __launch_bounds__(kNormBlock)
    sum_squares_kernel(double *__restrict__ partial, const float *__restrict__ g, int64_t n) {
    __shared__ double warp_sums[kNormWarps];
    const int64_t n_chunks = (n + 3) / 4;
    const int64_t stride = (int64_t)gridDim.x * kNormBlock;
    double s = 0.0;
    for (int64_t c = (int64_t)blockIdx.x * kNormBlock + threadIdx.x; c < n_chunks; c += stride) {
        const int64_t i = 4 * c;
        float x[4];
        if (VEC && i + 4 <= n) {
            const float4 q = reinterpret_cast<const float4 *>(g)[c];
            x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
        } else {
#pragma unroll
            for (int k = 0; k < 4; k++) x[k] = i + k < n ? g[i + k] : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < 4; k++) s += (double)x[k] * (double)x[k];
    }
    s = block_sum(s, warp_sums);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Pass 2, one block: the partials in a fixed order (thread t adds partials t, t + 256, ... in
// sequence, then the block tree), the norm, and the clip coefficient by the CPU's expression.
__global__ void __launch_bounds__(kNormBlock)
    norm_finish_kernel(double *__restrict__ out, const double *__restrict__ partial, int n_partial,
                       double max_norm) {
    __shared__ double warp_sums[kNormWarps];
    double s = 0.0;
    for (int i = (int)threadIdx.x; i < n_partial; i += kNormBlock) s += partial[i];
    s = block_sum(s, warp_sums);
    if (threadIdx.x == 0) {
        const double norm = __dsqrt_rn(s);
        const double coef = __ddiv_rn(max_norm, __dadd_rn(norm, 1e-6));
        out[0] = norm;
        out[1] = max_norm > 0.0 && coef < 1.0 ? coef : 1.0;  // NaN: not below 1
    }
}

// AdamW, grid-stride. VEC: all four arrays 16-byte aligned; the first 4 (n / 4) elements go as
// float4 and the n % 4 after them one by one. Each element's update is independent, so the
// split changes no bit.
template <bool VEC>
__global__ void __launch_bounds__(kAdamBlock)
    adamw_kernel(float *__restrict__ w, const float *__restrict__ g, float *__restrict__ m,
                 float *__restrict__ v, int64_t n, AdamwConsts k,
                 const double *__restrict__ clip) {
    const double coef = clip ? *clip : 1.0;
    const int64_t stride = (int64_t)gridDim.x * kAdamBlock;
    const int64_t tid = (int64_t)blockIdx.x * kAdamBlock + threadIdx.x;
    int64_t start = 0;
    if constexpr (VEC) {
        const int64_t n4 = n / 4;
        for (int64_t q = tid; q < n4; q += stride) {
            float4 wq = reinterpret_cast<const float4 *>(w)[q];
            const float4 gq = reinterpret_cast<const float4 *>(g)[q];
            float4 mq = reinterpret_cast<const float4 *>(m)[q];
            float4 vq = reinterpret_cast<const float4 *>(v)[q];
            adamw_one(wq.x, clipped(gq.x, coef), mq.x, vq.x, k);
            adamw_one(wq.y, clipped(gq.y, coef), mq.y, vq.y, k);
            adamw_one(wq.z, clipped(gq.z, coef), mq.z, vq.z, k);
            adamw_one(wq.w, clipped(gq.w, coef), mq.w, vq.w, k);
            reinterpret_cast<float4 *>(w)[q] = wq;
            reinterpret_cast<float4 *>(m)[q] = mq;
            reinterpret_cast<float4 *>(v)[q] = vq;
        }
        start = 4 * n4;
    }
    for (int64_t i = start + tid; i < n; i += stride) {
        float wi = w[i], mi = m[i], vi = v[i];
        adamw_one(wi, clipped(g[i], coef), mi, vi, k);
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
    }
}

// The host's product rounded before 1 - it: a host compiler may fuse a * b + c into one fma
// where the ISA has it (g++ does by default on aarch64 hosts such as Grace), and the C twin,
// built as ISO C11, never does; the volatile store forces the rounding.
double rounded_product(double a, double b) {
    volatile double p = a * b;
    return p;
}

bool overlap(const void *a, const void *b, int64_t n) {
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b, len = (uintptr_t)n * sizeof(float);
    return x < y + len && y < x + len;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

extern "C" size_t sf_cuda_grad_norm_workspace_bytes(int64_t n) {
    return (size_t)norm_blocks(n < 0 ? 0 : n) * sizeof(double);
}

extern "C" sf_status sf_cuda_grad_norm(double *out, const float *g, int64_t n, double max_norm,
                                       void *workspace, size_t workspace_bytes,
                                       cudaStream_t stream) {
    static const char fn[] = "sf_cuda_grad_norm";
    if (n < 0) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld", fn, (long long)n);
    if (!out || !workspace || (n > 0 && !g)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                       !out ? "out" : !workspace ? "workspace" : "g");
    }
    if (((uintptr_t)out & 7u) || ((uintptr_t)workspace & 7u) || ((uintptr_t)g & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    const size_t need = sf_cuda_grad_norm_workspace_bytes(n);
    if (workspace_bytes < need) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: workspace of %zu bytes; %lld elements need "
                       "%zu", fn, workspace_bytes, (long long)n, need);
    }
    if (max_norm != max_norm) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: max_norm is NaN", fn);
    }

    sf_nvtx_range range(fn);
    double *partial = static_cast<double *>(workspace);
    const int blocks = norm_blocks(n);
    if (aligned16(g)) {
        sum_squares_kernel<true><<<blocks, kNormBlock, 0, stream>>>(partial, g, n);
    } else {
        sum_squares_kernel<false><<<blocks, kNormBlock, 0, stream>>>(partial, g, n);
    }
    SF_CUDA_TRY(cudaGetLastError());
    norm_finish_kernel<<<1, kNormBlock, 0, stream>>>(out, partial, blocks, max_norm);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_adamw(float *w, const float *g, float *m, float *v, int64_t n,
                                   double lr, const sf_adamw *hp, int64_t t, const double *clip,
                                   cudaStream_t stream) {
    static const char fn[] = "sf_cuda_adamw";
    if (n < 0 || !hp) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld, hyper-parameters %s", fn,
                       (long long)n, hp ? "given" : "NULL");
    }
    if (t < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: step count %lld (1-based)", fn,
                       (long long)t);
    }
    if (!(lr >= 0.0) || !isfinite(lr) || !(hp->beta1 >= 0.0 && hp->beta1 < 1.0) ||
        !(hp->beta2 >= 0.0 && hp->beta2 < 1.0) || !(hp->eps > 0.0) || !isfinite(hp->eps) ||
        !(hp->weight_decay >= 0.0) || !isfinite(hp->weight_decay)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: lr %g, betas (%g, %g), eps %g, weight "
                       "decay %g", fn, lr, hp->beta1, hp->beta2, hp->eps, hp->weight_decay);
    }
    if (n == 0) return SF_OK;
    if (!w || !g || !m || !v) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL %s", fn,
                       !w ? "w" : !g ? "g" : !m ? "m" : "v");
    }
    if (((uintptr_t)w & 3u) || ((uintptr_t)g & 3u) || ((uintptr_t)m & 3u) ||
        ((uintptr_t)v & 3u) || ((uintptr_t)clip & 7u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    if (overlap(w, g, n) || overlap(w, m, n) || overlap(w, v, n) || overlap(g, m, n) ||
        overlap(g, v, n) || overlap(m, v, n)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: w, g, m and v overlap", fn);
    }

    sf_nvtx_range range(fn);
    // sf_adamw_step's constants, by its expressions (pow and sqrt are the host's, as there).
    AdamwConsts k;
    k.b1 = hp->beta1;
    k.b2 = hp->beta2;
    k.omb1 = 1.0 - k.b1;
    k.omb2 = 1.0 - k.b2;
    const double bc1 = 1.0 - pow(k.b1, (double)t), bc2 = 1.0 - pow(k.b2, (double)t);
    k.decay = 1.0 - rounded_product(lr, hp->weight_decay);
    k.step_size = lr / bc1;
    k.inv_sqrt_bc2 = 1.0 / sqrt(bc2);
    k.eps = hp->eps;
    const bool vec = aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v);
    const int64_t items = vec ? (n / 4 > 0 ? n / 4 : 1) : n;
    const int64_t b = sf_ceil_div(items, kAdamBlock);
    const unsigned blocks = (unsigned)(b < kAdamMaxBlocks ? b : kAdamMaxBlocks);
    if (vec) {
        adamw_kernel<true><<<blocks, kAdamBlock, 0, stream>>>(w, g, m, v, n, k, clip);
    } else {
        adamw_kernel<false><<<blocks, kAdamBlock, 0, stream>>>(w, g, m, v, n, k, clip);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}
