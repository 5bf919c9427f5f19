/* Internal: the bf16 (and fp16) embedding gather and the splice of the Sysformer's output rows
 * into the LLM's packed input buffer (kernels/embedding.cu; the fp32 gather stays in kernels.h).
 * Device pointers; each launcher enqueues on the given stream, never synchronises, validates
 * its arguments before touching CUDA (SF_ERR_INVALID_ARGUMENT) and returns SF_ERR_CUDA when the
 * launch fails. */
#ifndef SF_KERNELS_EMBEDDING_H
#define SF_KERNELS_EMBEDDING_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[i, :] = table[ids[i], :] for n bf16 rows of dim values (table is [vocab, dim]). An id
 * outside [0, vocab) writes a zero row and, when bad_ids is not NULL, increments *bad_ids
 * (device int), as sf_cuda_embedding_f32 does. n <= INT32_MAX. out must not overlap table. */
sf_status sf_cuda_embedding_bf16(sf_bf16 *out, const sf_bf16 *table, const int32_t *ids, int64_t n,
                                 int64_t dim, int32_t vocab, int *bad_ids, cudaStream_t stream);

/* The same for an fp16 table (a serving stack's, SF_EMBEDDING_F16): the gather copies bits, so
 * the rows are the table's exactly. */
sf_status sf_cuda_embedding_f16(sf_f16 *out, const sf_f16 *table, const int32_t *ids, int64_t n,
                                int64_t dim, int32_t vocab, int *bad_ids, cudaStream_t stream);

/* dst[dst_rows[i], :] = src[i, :] for i < n_rows, rows of dim bf16 values: writes the
 * Sysformer's S' rows into the packed LLM input buffer at the system-prompt positions. The
 * caller guarantees that every dst_rows[i] is a row of dst and that they are distinct; a
 * negative row is skipped (nothing written). n_rows <= INT32_MAX. src must not overlap dst. */
sf_status sf_cuda_splice_rows_bf16(sf_bf16 *dst, const sf_bf16 *src, const int32_t *dst_rows,
                                   int64_t n_rows, int64_t dim, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
