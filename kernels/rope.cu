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

// Token t's cos(a) s and sin(a) s, a = positions[t] * inv_freq[i], for i < half, into shared
// memory (the block's threads share the work; a barrier ends it). With longrope's two tables
// (table[t] == 1) the second half of inv_freq and scale1 apply.
__device__ __forceinline__ void token_angles(float *cos_s, float *sin_s, int64_t t,
                                             const int32_t *__restrict__ positions,
                                             const int32_t *__restrict__ table,
                                             const float *__restrict__ inv_freq, float scale0,
                                             float scale1, int half) {
    const float pos = (float)positions[t];
    float scale = scale0;
    if (table && table[t] == 1) {
        inv_freq += half;
        scale = scale1;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float s, c;
        // Full-range sincosf (not __sinf/__cosf): the angle reaches positions * 1 rad.
        sincosf(pos * inv_freq[i], &s, &c);
        cos_s[i] = c * scale;
        sin_s[i] = s * scale;
    }
    __syncthreads();
}

// Pairs i0 .. i0 + VEC - 1 of one head rotated from src to dst (the same head, or another
// buffer's): src[i] and src[i + half] become dst[i] and dst[i + half], in fp32, rounded once.
template <int VEC>
__device__ __forceinline__ void rotate_pairs(const __nv_bfloat16 *src, __nv_bfloat16 *dst,
                                             int half, int i0, const float *cos_s,
                                             const float *sin_s) {
    float x0[VEC], x1[VEC], y0[VEC], y1[VEC];
    load_f32<VEC>(src + i0, x0);
    load_f32<VEC>(src + i0 + half, x1);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        const float c = cos_s[i0 + k], s = sin_s[i0 + k];
        y0[k] = x0[k] * c - x1[k] * s;
        y1[k] = x1[k] * c + x0[k] * s;
    }
    store_bf16<VEC>(dst + i0, y0);
    store_bf16<VEC>(dst + i0 + half, y1);
}

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
    token_angles(cos_s, sin_s, t, positions, table, inv_freq, attention_scale, attention_scale_1,
                 half);
    __nv_bfloat16 *row = x + t * row_stride;
    const int groups = half / VEC;
    for (int w = threadIdx.x; w < n_heads * groups; w += blockDim.x) {
        const int h = w / groups;
        __nv_bfloat16 *head = row + (int64_t)h * head_dim;
        rotate_pairs<VEC>(head, head, half, (w - h * groups) * VEC, cos_s, sin_s);
    }
}

// A layer's attention inputs in one pass (sf_cuda_rope_kv_cache_bf16), token t a block: in its
// qkv row (q heads, then k heads, then v heads), q rotated in place; k rotated into its cache
// row kv_rows[t] and v copied there (neither when kv_rows[t] < 0). The same angles and
// arithmetic as rope_kernel. VEC = 8 needs half % 8 == 0, both strides % 8 == 0 and the three
// buffers 16-byte aligned.
template <int VEC>
__global__ void __launch_bounds__(kBlock)
    rope_kv_cache_kernel(__nv_bfloat16 *__restrict__ qkv, int64_t qkv_stride, int32_t n_heads,
                         int32_t n_kv_heads, int32_t head_dim,
                         const int32_t *__restrict__ positions, const int32_t *__restrict__ table,
                         const float *__restrict__ inv_freq2, float scale0, float scale1,
                         const int32_t *__restrict__ kv_rows, __nv_bfloat16 *__restrict__ k_cache,
                         __nv_bfloat16 *__restrict__ v_cache, int64_t cache_stride) {
    __shared__ float cos_s[kMaxHalf], sin_s[kMaxHalf];
    const int64_t t = blockIdx.x;
    const int half = head_dim / 2;
    token_angles(cos_s, sin_s, t, positions, table, inv_freq2, scale0, scale1, half);
    __nv_bfloat16 *row = qkv + t * qkv_stride;
    const int32_t kv_row = kv_rows[t];
    const int rotated = n_heads + (kv_row >= 0 ? n_kv_heads : 0);  // q heads, then k heads
    const int groups = half / VEC;
    for (int w = threadIdx.x; w < rotated * groups; w += blockDim.x) {
        const int h = w / groups;
        const __nv_bfloat16 *src = row + (int64_t)h * head_dim;
        __nv_bfloat16 *dst = h < n_heads ? row + (int64_t)h * head_dim
                                         : k_cache + kv_row * cache_stride +
                                               (int64_t)(h - n_heads) * head_dim;
        rotate_pairs<VEC>(src, dst, half, (w - h * groups) * VEC, cos_s, sin_s);
    }
    if (kv_row < 0) return;
    const __nv_bfloat16 *v = row + (int64_t)(n_heads + n_kv_heads) * head_dim;
    __nv_bfloat16 *v_dst = v_cache + kv_row * cache_stride;
    for (int c = threadIdx.x * VEC; c < n_kv_heads * head_dim; c += blockDim.x * VEC) {
        if constexpr (VEC == 8) {
            *reinterpret_cast<uint4 *>(v_dst + c) = *reinterpret_cast<const uint4 *>(v + c);
        } else {
            v_dst[c] = v[c];
        }
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
    token_angles(cos_s, sin_s, t, positions, table, inv_freq, attention_scale, attention_scale_1,
                 half);
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
    const uintptr_t words = (uintptr_t)positions | (uintptr_t)table | (uintptr_t)inv_freq;
    if (((uintptr_t)x & 1u) || (words & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
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

extern "C" sf_status sf_cuda_rope_kv_cache_bf16(sf_bf16 *qkv, int64_t qkv_stride, int64_t n,
                                               int32_t n_heads, int32_t n_kv_heads,
                                               int32_t head_dim, const int32_t *positions,
                                               const int32_t *table, const float *inv_freq2,
                                               float attention_scale0, float attention_scale1,
                                               const int32_t *kv_rows, sf_bf16 *k_cache,
                                               sf_bf16 *v_cache, int64_t cache_stride,
                                               cudaStream_t stream) {
    static const char fn[] = "sf_cuda_rope_kv_cache_bf16";
    const int64_t heads = (int64_t)n_heads + 2 * (int64_t)n_kv_heads;
    if (n < 0 || n > 0x7fffffff || n_heads < 0 || n_kv_heads < 0 || head_dim < 2 ||
        head_dim % 2 != 0 || head_dim / 2 > kMaxHalf || heads * head_dim > 0x7fffffff ||
        qkv_stride < heads * head_dim || cache_stride < (int64_t)n_kv_heads * head_dim ||
        (n > 0 && qkv_stride > INT64_MAX / n) || cache_stride > INT64_MAX / 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: n = %lld, heads = %d/%d, head_dim = %d (even, 2..%d), qkv_stride = "
                       "%lld, cache_stride = %lld",
                       fn, (long long)n, n_heads, n_kv_heads, head_dim, 2 * kMaxHalf,
                       (long long)qkv_stride, (long long)cache_stride);
    }
    if (n == 0 || heads == 0) return SF_OK;
    if (!qkv || !positions || !inv_freq2 || !kv_rows || !k_cache || !v_cache) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", fn);
    }
    if (((uintptr_t)qkv | (uintptr_t)k_cache | (uintptr_t)v_cache) & 1u ||
        ((uintptr_t)positions | (uintptr_t)table | (uintptr_t)inv_freq2 | (uintptr_t)kv_rows) &
            3u) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    sf_nvtx_range range(fn);
    auto *q = reinterpret_cast<__nv_bfloat16 *>(qkv);
    auto *kc = reinterpret_cast<__nv_bfloat16 *>(k_cache);
    auto *vc = reinterpret_cast<__nv_bfloat16 *>(v_cache);
    if ((head_dim / 2) % kVec == 0 && qkv_stride % kVec == 0 && cache_stride % kVec == 0 &&
        aligned16(qkv) && aligned16(k_cache) && aligned16(v_cache)) {
        rope_kv_cache_kernel<kVec><<<(unsigned)n, kBlock, 0, stream>>>(
            q, qkv_stride, n_heads, n_kv_heads, head_dim, positions, table, inv_freq2,
            attention_scale0, attention_scale1, kv_rows, kc, vc, cache_stride);
    } else {
        rope_kv_cache_kernel<1><<<(unsigned)n, kBlock, 0, stream>>>(
            q, qkv_stride, n_heads, n_kv_heads, head_dim, positions, table, inv_freq2,
            attention_scale0, attention_scale1, kv_rows, kc, vc, cache_stride);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
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
