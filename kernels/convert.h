/* Internal: fp32 <-> bf16 and fp32 -> fp16 conversion on the device (kernels/convert.cu).
 * Device pointers; each launcher enqueues on the given stream, never synchronises, validates its
 * arguments before touching CUDA (SF_ERR_INVALID_ARGUMENT) and returns SF_ERR_CUDA when the
 * launch fails. */
#ifndef SF_KERNELS_CONVERT_H
#define SF_KERNELS_CONVERT_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[i] = bf16(in[i]) for i < n, rounded to nearest, ties to even (the rounding of
 * torch.Tensor.to(torch.bfloat16)); overflow goes to +-inf, NaN stays NaN (a quiet NaN whose
 * payload is not kept). out must not overlap in. */
sf_status sf_cuda_f32_to_bf16(sf_bf16 *out, const float *in, int64_t n, cudaStream_t stream);

/* out[i] = fp16(in[i]) (IEEE binary16), rounded as sf_cuda_f32_to_bf16 rounds: the rounding of
 * torch.Tensor.to(torch.float16), so |x| >= 65520 goes to +-inf and small values round
 * through fp16's subnormals (spacing 2^-24) to zero. out must not overlap in. */
sf_status sf_cuda_f32_to_f16(sf_f16 *out, const float *in, int64_t n, cudaStream_t stream);

/* out[i] = (float)in[i] for i < n: exact. out must not overlap in. */
sf_status sf_cuda_bf16_to_f32(float *out, const sf_bf16 *in, int64_t n, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
