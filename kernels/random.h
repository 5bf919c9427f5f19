/* Internal: device-side random fills for benchmark weights (kernels/random.cu). */
#ifndef SF_KERNELS_RANDOM_H
#define SF_KERNELS_RANDOM_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* x[i] = bf16(lo + (hi - lo) * u_i), u_i uniform in [0, 1) from a hash of (seed, i): the same
 * values on every GPU and for every launch configuration. */
sf_status sf_cuda_fill_uniform_bf16(sf_bf16 *x, int64_t n, uint64_t seed, float lo, float hi,
                                    cudaStream_t stream);

/* The same values rounded to fp16 (a random engine with SF_EMBEDDING_F16 embeddings). */
sf_status sf_cuda_fill_uniform_f16(sf_f16 *x, int64_t n, uint64_t seed, float lo, float hi,
                                   cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
