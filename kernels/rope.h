/* Internal: rotary position embeddings on bf16 q or k (kernels/rope.cu; CPU twin
 * sf_cpu_rope_apply in host/cpu/rope.c). Device pointers; the launcher enqueues on the given
 * stream, never synchronises, validates its arguments before touching CUDA
 * (SF_ERR_INVALID_ARGUMENT) and returns SF_ERR_CUDA when the launch fails. */
#ifndef SF_KERNELS_ROPE_H
#define SF_KERNELS_ROPE_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Rotates x in place, transformers' "rotate half" convention: for token t, head h and
 * i < head_dim / 2, with a = positions[t] * inv_freq[i] (fp32),
 *   x[t, h, i]            <- x[t, h, i] cos(a) s - x[t, h, i + head_dim/2] sin(a) s
 *   x[t, h, i + head_dim/2] <- x[t, h, i + head_dim/2] cos(a) s + x[t, h, i] sin(a) s
 * with s = attention_scale (longrope's factor; 1 otherwise), in fp32, rounded to bf16 once.
 * Token t's heads start at x + t * row_stride (values), so q or k can be rotated inside a fused
 * qkv buffer; row_stride = n_heads * head_dim for a packed [n, n_heads, head_dim] tensor.
 * inv_freq [head_dim / 2] is device fp32 (sf_cpu_rope_freqs' table, rounded); positions [n] is
 * device int32 (|position| < 2^24 is exact). head_dim is even and at most 512. */
sf_status sf_cuda_rope_bf16(sf_bf16 *x, const int32_t *positions, int64_t n, int32_t n_heads,
                            int32_t head_dim, int64_t row_stride, const float *inv_freq,
                            float attention_scale, cudaStream_t stream);

/* The same with two frequency tables, for longrope (whose short and long factors apply per
 * request): inv_freq2 is [2, head_dim / 2]; token t uses table table[t] (0 or 1; table NULL: 0)
 * and attention_scale0 or attention_scale1 with it. */
sf_status sf_cuda_rope2_bf16(sf_bf16 *x, const int32_t *positions, const int32_t *table,
                             int64_t n, int32_t n_heads, int32_t head_dim, int64_t row_stride,
                             const float *inv_freq2, float attention_scale0,
                             float attention_scale1, cudaStream_t stream);

/* One layer's attention inputs in one launch, where the KV cache is what attention reads
 * (inference): qkv holds n packed token rows (row stride qkv_stride values) of n_heads q heads,
 * then n_kv_heads k heads, then n_kv_heads v heads. For token t:
 *   its q heads are rotated in place, as sf_cuda_rope2_bf16 would;
 *   its k heads, rotated the same way, go to row kv_rows[t] of k_cache, and its v heads,
 *   unchanged, to row kv_rows[t] of v_cache (cache rows cache_stride values apart);
 *   with kv_rows[t] < 0, neither (its q is still rotated).
 * The k and v heads in qkv are left as they were. Rows kv_rows[t] >= 0 must be distinct and
 * inside both caches. The same angles, tables and rounding as sf_cuda_rope2_bf16 (CPU twin:
 * sf_cpu_rope_apply, and row copies). Fuses what was a rotation launch and two row scatters. */
sf_status sf_cuda_rope_kv_cache_bf16(sf_bf16 *qkv, int64_t qkv_stride, int64_t n, int32_t n_heads,
                                     int32_t n_kv_heads, int32_t head_dim,
                                     const int32_t *positions, const int32_t *table,
                                     const float *inv_freq2, float attention_scale0,
                                     float attention_scale1, const int32_t *kv_rows,
                                     sf_bf16 *k_cache, sf_bf16 *v_cache, int64_t cache_stride,
                                     cudaStream_t stream);

/* Backward (training; CPU twin sf_cpu_rope_backward): the transpose of the rotation above,
 * which is the rotation by the negative angle with the same scale s,
 *   dx[t, h, i]            = dy[t, h, i] cos(a) s + dy[t, h, i + head_dim/2] sin(a) s
 *   dx[t, h, i + head_dim/2] = dy[t, h, i + head_dim/2] cos(a) s - dy[t, h, i] sin(a) s,
 * with the forward's arguments (positions, inv_freq, attention_scale, row_stride, n_heads,
 * head_dim) and its fp32 angles. dy is the fp32 gradient; dx is written in fp32 (dx_bf16
 * false; dx may be dy, for the rotation in place) or rounded once to bf16 (dx_bf16 true: ready
 * for the q/k/v projection's GEMM backward; dx must not overlap dy). Both use row_stride, so q
 * or k can be taken out of, and written into, fused qkv-shaped buffers; the values of a row
 * outside its n_heads * head_dim rotated ones are neither read nor written.
 * SF_ERR_INVALID_ARGUMENT as the forward, also for a NULL dy or dx, a pointer not aligned to
 * its element, or a bf16 dx equal to dy. */
sf_status sf_cuda_rope_backward(void *dx, bool dx_bf16, const float *dy,
                                const int32_t *positions, int64_t n, int32_t n_heads,
                                int32_t head_dim, int64_t row_stride, const float *inv_freq,
                                float attention_scale, cudaStream_t stream);

/* The backward of sf_cuda_rope2_bf16 (two frequency tables, token t using table[t]). */
sf_status sf_cuda_rope2_backward(void *dx, bool dx_bf16, const float *dy,
                                 const int32_t *positions, const int32_t *table, int64_t n,
                                 int32_t n_heads, int32_t head_dim, int64_t row_stride,
                                 const float *inv_freq2, float attention_scale0,
                                 float attention_scale1, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
