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

#ifdef __cplusplus
}
#endif

#endif
