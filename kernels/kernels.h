/* Internal: the CUDA launchers, callable from C and C++. Device pointers throughout; every
 * launcher enqueues on the given stream, never synchronises, and returns SF_ERR_CUDA when the
 * launch itself fails. One header per op family (kernels/<op>.h beside kernels/<op>.cu); this
 * one holds the shared types and the embedding gather. */
#ifndef SF_KERNELS_H
#define SF_KERNELS_H

#include <cuda_runtime.h>

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* bfloat16 values as their 16 bits, in device memory (the .cu files see __nv_bfloat16). */
typedef uint16_t sf_bf16;
/* IEEE binary16 values as their 16 bits (a serving stack's fp16 embeddings; __half in .cu). */
typedef uint16_t sf_f16;

/* embedding.cu: out[i, :] = table[ids[i], :] for fp32 rows of dim floats. An id outside
 * [0, vocab) writes a zero row and, when bad_ids is not NULL, increments *bad_ids (device int),
 * so a serving stack can check validity without a host round trip. */
sf_status sf_cuda_embedding_f32(float *out, const float *table, const int32_t *ids, int64_t n,
                                int64_t dim, int32_t vocab, int *bad_ids, cudaStream_t stream);

/* device.cu: NVTX ranges for the C host code (the launchers use sf_nvtx_range), so Nsight
 * Systems shows every stage and layer of a step by name. Ranges nest; pop closes the last. */
void sf_nvtx_push(const char *name);
void sf_nvtx_pop(void);

#ifdef __cplusplus
}
#endif

#endif
