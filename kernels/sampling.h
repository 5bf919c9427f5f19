/* Internal: next-token selection on the device (kernels/sampling.cu; CPU twin sf_sample in
 * host/model/generate.c). Device pointers; each launcher enqueues on the given stream, never
 * synchronises, validates its arguments before touching CUDA (SF_ERR_INVALID_ARGUMENT) and
 * returns SF_ERR_CUDA when the launch fails. Logits are fp32 [n_rows, vocab], row-major. */
#ifndef SF_KERNELS_SAMPLING_H
#define SF_KERNELS_SAMPLING_H

#include <stddef.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of device workspace sf_cuda_argmax_f32 uses to split each row of vocab logits over
 * several blocks (8 bytes per row per 8192 logits); 0 when a row is one block anyway, or for a
 * negative or overflowing size. */
size_t sf_cuda_argmax_workspace_bytes(int64_t n_rows, int32_t vocab);

/* out[r] = the index of the largest logit of row r; the lowest index wins a tie (-0 equals +0)
 * and NaN never wins, except that a NaN at index 0 gives 0: exactly sf_sample's greedy loop.
 * With a workspace (8-byte aligned, at least sf_cuda_argmax_workspace_bytes) each row is split
 * over blocks of 8192 logits whose maxima a second kernel combines, so that a few rows still
 * fill the GPU; with workspace NULL one block takes each row. */
sf_status sf_cuda_argmax_f32(int32_t *out, const float *logits, int64_t n_rows, int32_t vocab,
                             void *workspace, size_t workspace_bytes, cudaStream_t stream);

/* Bytes of device workspace sf_cuda_sample_f32 needs for n_rows rows of vocab logits
 * (16 * n_rows * vocab: two key/index buffer pairs per row; for vocab > 8192 also about 3 KB
 * per row per 8192 logits for the split top-p's state); 0 for a negative or overflowing
 * size. */
size_t sf_cuda_sample_workspace_bytes(int64_t n_rows, int32_t vocab);

/* Picks one token per row with sf_sample's definition: with t = sampling->temperature > 0,
 * sort the logits / t by value (descending; ties by ascending index), keep the first
 * min(top_k, vocab) when top_k > 0, weight them exp(z - z_max) in double, then when
 * 0 < top_p < 1 keep the shortest prefix whose mass (weight / total) reaches top_p, and return
 * the first token whose running weight exceeds u[r] * (the kept total); the last kept token if
 * rounding leaves none. u [n_rows] is a device array of uniforms in [0, 1) that the caller
 * draws (sf_sample draws the same one from the request's stream), so the kernel holds no RNG
 * state; sampling->seed is not used. t <= 0 (or NaN) is greedy: sf_cuda_argmax_f32 (split over
 * blocks when the workspace given is 8-byte aligned and large enough for it), and u and
 * workspace may then be NULL. With 0 < top_k <= 2048 and vocab > 8192, each chunk of 8192
 * logits first gives its own top_k (one block each), and the row's selection runs over those
 * candidates only (the same tokens: every kept logit is in its chunk's top_k). With top_k off
 * (top_p alone, or plain sampling), vocab > 8192 and an 8-byte aligned workspace, the prefix
 * of the sorted order that holds the nucleus (or, in plain sampling, the drawn token) is found
 * over all chunks at once and only its candidates reach the per-row sort (the same tokens).
 * workspace (4-byte aligned, at least sf_cuda_sample_workspace_bytes) is scratch for the
 * call. Logits must not be NaN or +inf (as for sf_sample, the token is then unspecified, but
 * always in [0, vocab)). */
sf_status sf_cuda_sample_f32(int32_t *out, const float *logits, const double *u, int64_t n_rows,
                             int32_t vocab, const sf_sampling *sampling, void *workspace,
                             size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
