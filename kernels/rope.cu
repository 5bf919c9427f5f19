// Rotary position embeddings, rotate-half pairing. CPU twin: sf_cpu_rope_apply in
// host/cpu/rope.c (angles and cos/sin in double there; fp32 sincosf here, see the test for the
// resulting bound).
#include <cuda_bf16.h>

#include "bf16_vec.cuh"
#include "cuda_check.cuh"
#include "f32_vec.cuh"
#include "rope.h"

namespace {

// One block per token: its cos/sin table is computed once into shared memory and serves every
// head of that token (32 q heads for Llama-3.1-8B), so sincosf costs half a call per head_dim
// values instead of one call per pair. Threads then stride over (head, group of VEC pairs).
constexpr int kBlock = 128;
constexpr int kMaxHalf = 256;  // head_dim <= 512
constexpr int kVec = 8;

using sf_vec::aligned16;
using sf_vec::load_f32;
using sf_vec::store_bf16;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// VEC = 8 needs half % 8 == 0, row_stride % 8 == 0 and x 16-byte aligned, so that every group
// of 8 pairs is two aligned 128-bit words (one in each half of the head).
template <int VEC>
__global__ void __launch_bounds__(kBlock)
    rope_kernel(__nv_bfloat16 *__restrict__ x, const int32_t *__restrict__ positions,
                int32_t n_heads, int32_t head_dim, int64_t row_stride,
                const float *__restrict__ inv_freq, float attention_scale,
                const int32_t *__restrict__ table, float attention_scale_1) {
    __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[t];
    if (table && table[t] == 1) {  // longrope: this token's request uses the second table
        inv_freq += half;
        attention_scale = attention_scale_1;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        // Full-range sincosf (not __sinf/__cosf): the angle reaches positions * 1 rad.
        sincosf(pos * inv_freq[i], &s, &c);
        cos_s[i] = c * attention_scale;
        sin_s[i] = s * attention_scale;
    }
    __syncthreads();

    __nv_bfloat16 *row = x + t * row_stride;
    const int groups = half / VEC;
    for (int w = threadIdx.x; w < n_heads * groups; w += blockDim.x) {
        const int h = w / groups;
        const int i0 = (w - h * groups) * VEC;
        __nv_bfloat16 *lo = row + (int64_t)h * head_dim + i0;
        __nv_bfloat16 *hi = lo + half;
        float x0[VEC], x1[VEC], y0[VEC], y1[VEC];
        load_f32<VEC>(lo, x0);
        load_f32<VEC>(hi, x1);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            const float c = cos_s[i0 + k], s = sin_s[i0 + k];
            y0[k] = x0[k] * c - x1[k] * s;
            y1[k] = x1[k] * c + x0[k] * s;
        }
        store_bf16<VEC>(lo, y0);
        store_bf16<VEC>(hi, y1);
    }
}

// Backward: the forward's transpose, the rotation by the negative angle with the same scale,
//   dx0 = dy0 cos(a) s + dy1 sin(a) s,   dx1 = dy1 cos(a) s - dy0 sin(a) s,
// from the fp32 gradient dy into dx (fp32, possibly dy itself, or bf16), both with the forward's
// row_stride. The same table, the same per-token choice of frequencies and scale, and the same
// fp32 sincosf as rope_kernel, so the angle the backward undoes is the one the forward applied.
// VEC = 8 needs half % 8 == 0, row_stride % 8 == 0 and dy, dx 16-byte aligned.
template <int VEC, typename TOut>
__global__ void __launch_bounds__(kBlock)
    rope_backward_kernel(TOut *dx, const float *dy, const int32_t *__restrict__ positions,
                         int32_t n_heads, int32_t head_dim, int64_t row_stride,
                         const float *__restrict__ inv_freq, float attention_scale,
                         const int32_t *__restrict__ table, float attention_scale_1) {
    __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[t];
    if (table && table[t] == 1) {
        inv_freq += half;
        attention_scale = attention_scale_1;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        cos_s[i] = c * attention_scale;
        sin_s[i] = s * attention_scale;
    }
    __syncthreads();

    const float *in = dy + t * row_stride;
    TOut *out = dx + t * row_stride;
    const int groups = half / VEC;
    for (int w = threadIdx.x; w < n_heads * groups; w += blockDim.x) {
        const int h = w / groups;
        const int64_t lo = (int64_t)h * head_dim + (w - h * groups) * VEC;
        const int i0 = (w - h * groups) * VEC;
        float d0[VEC], d1[VEC], y0[VEC], y1[VEC];
        sf_vec::load_f32<VEC>(in + lo, d0);
        sf_vec::load_f32<VEC>(in + lo + half, d1);
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            const float c = cos_s[i0 + k], s = sin_s[i0 + k];
            y0[k] = d0[k] * c + d1[k] * s;
            y1[k] = d1[k] * c - d0[k] * s;
        }
        sf_vec::store<VEC>(out + lo, y0);
        sf_vec::store<VEC>(out + lo + half, y1);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

static sf_status rope_launch(const char *fn, sf_bf16 *x, const int32_t *positions,
                             const int32_t *table, int64_t n, int32_t n_heads, int32_t head_dim,
                             int64_t row_stride, const float *inv_freq, float scale0,
                             float scale1, cudaStream_t stream) {
    if (n < 0 || n > 0x7fffffff || n_heads < 0 || head_dim < 2 || head_dim % 2 != 0 ||
        head_dim / 2 > kMaxHalf || (int64_t)n_heads * head_dim > 0x7fffffff ||
        row_stride < (int64_t)n_heads * head_dim || (n > 0 && row_stride > INT64_MAX / n)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: n = %lld, n_heads = %d, head_dim = %d (even, 2..%d), "
                       "row_stride = %lld",
                       fn, (long long)n, n_heads, head_dim, 2 * kMaxHalf, (long long)row_stride);
    }
    if (n == 0 || n_heads == 0) return SF_OK;
    if (!x || !positions || !inv_freq) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", fn);
    }
    sf_nvtx_range range(fn);
    __nv_bfloat16 *xb = reinterpret_cast<__nv_bfloat16 *>(x);
    if ((head_dim / 2) % kVec == 0 && row_stride % kVec == 0 && aligned16(x)) {
        rope_kernel<kVec><<<(unsigned)n, kBlock, 0, stream>>>(
            xb, positions, n_heads, head_dim, row_stride, inv_freq, scale0, table, scale1);
    } else {
        rope_kernel<1><<<(unsigned)n, kBlock, 0, stream>>>(
            xb, positions, n_heads, head_dim, row_stride, inv_freq, scale0, table, scale1);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_rope_bf16(sf_bf16 *x, const int32_t *positions, int64_t n,
                                       int32_t n_heads, int32_t head_dim, int64_t row_stride,
                                       const float *inv_freq, float attention_scale,
                                       cudaStream_t stream) {
    return rope_launch("sf_cuda_rope_bf16", x, positions, NULL, n, n_heads, head_dim, row_stride,
                       inv_freq, attention_scale, attention_scale, stream);
}

extern "C" sf_status sf_cuda_rope2_bf16(sf_bf16 *x, const int32_t *positions,
                                        const int32_t *table, int64_t n, int32_t n_heads,
                                        int32_t head_dim, int64_t row_stride,
                                        const float *inv_freq2, float attention_scale0,
                                        float attention_scale1, cudaStream_t stream) {
    return rope_launch("sf_cuda_rope2_bf16", x, positions, table, n, n_heads, head_dim,
                       row_stride, inv_freq2, attention_scale0, attention_scale1, stream);
}

static sf_status rope_backward_launch(const char *fn, void *dx, bool dx_bf16, const float *dy,
                                      const int32_t *positions, const int32_t *table, int64_t n,
                                      int32_t n_heads, int32_t head_dim, int64_t row_stride,
                                      const float *inv_freq, float scale0, float scale1,
                                      cudaStream_t stream) {
    if (n < 0 || n > 0x7fffffff || n_heads < 0 || head_dim < 2 || head_dim % 2 != 0 ||
        head_dim / 2 > kMaxHalf || (int64_t)n_heads * head_dim > 0x7fffffff ||
        row_stride < (int64_t)n_heads * head_dim || (n > 0 && row_stride > INT64_MAX / 4 / n)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: n = %lld, n_heads = %d, head_dim = %d (even, 2..%d), "
                       "row_stride = %lld",
                       fn, (long long)n, n_heads, head_dim, 2 * kMaxHalf, (long long)row_stride);
    }
    if (n == 0 || n_heads == 0) return SF_OK;
    if (!dx || !dy || !positions || !inv_freq) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", fn);
    }
    // Element alignment, and in place only between two fp32 buffers.
    if (((uintptr_t)dy & 3u) || ((uintptr_t)dx & (dx_bf16 ? 1u : 3u)) ||
        ((uintptr_t)positions & 3u) || ((uintptr_t)inv_freq & 3u) ||
        ((uintptr_t)table & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    if (dx_bf16 && dx == (const void *)dy) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: a bf16 dx cannot be written over dy", fn);
    }
    sf_nvtx_range range(fn);
    const bool vec = (head_dim / 2) % kVec == 0 && row_stride % kVec == 0 && aligned16(dx) &&
                     aligned16(dy);
    auto go = [&](auto *out) {
        if (vec) {
            rope_backward_kernel<kVec><<<(unsigned)n, kBlock, 0, stream>>>(
                out, dy, positions, n_heads, head_dim, row_stride, inv_freq, scale0, table,
                scale1);
        } else {
            rope_backward_kernel<1><<<(unsigned)n, kBlock, 0, stream>>>(
                out, dy, positions, n_heads, head_dim, row_stride, inv_freq, scale0, table,
                scale1);
        }
    };
    if (dx_bf16) {
        go(static_cast<__nv_bfloat16 *>(dx));
    } else {
        go(static_cast<float *>(dx));
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_rope_backward(void *dx, bool dx_bf16, const float *dy,
                                           const int32_t *positions, int64_t n, int32_t n_heads,
                                           int32_t head_dim, int64_t row_stride,
                                           const float *inv_freq, float attention_scale,
                                           cudaStream_t stream) {
    return rope_backward_launch("sf_cuda_rope_backward", dx, dx_bf16, dy, positions, NULL, n,
                                n_heads, head_dim, row_stride, inv_freq, attention_scale,
                                attention_scale, stream);
}

extern "C" sf_status sf_cuda_rope2_backward(void *dx, bool dx_bf16, const float *dy,
                                            const int32_t *positions, const int32_t *table,
                                            int64_t n, int32_t n_heads, int32_t head_dim,
                                            int64_t row_stride, const float *inv_freq2,
                                            float attention_scale0, float attention_scale1,
                                            cudaStream_t stream) {
    return rope_backward_launch("sf_cuda_rope2_backward", dx, dx_bf16, dy, positions, table, n,
                                n_heads, head_dim, row_stride, inv_freq2, attention_scale0,
                                attention_scale1, stream);
}
