/* Internal: elementwise activations on bf16 activations, fp32 arithmetic
 * (kernels/activations.cu; CPU twins in host/cpu/activations.c). Device pointers; each launcher
 * enqueues on the given stream, never synchronises, validates its arguments before touching
 * CUDA (SF_ERR_INVALID_ARGUMENT) and returns SF_ERR_CUDA when the launch fails. Each result is
 * computed in fp32 from the bf16 inputs and rounded to bf16 once (nearest, ties to even). */
#ifndef SF_KERNELS_ACTIVATIONS_H
#define SF_KERNELS_ACTIVATIONS_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g / (1 + e^-g). out may be gate or up
 * (exactly, not a shifted overlap). */
sf_status sf_cuda_swiglu_bf16(sf_bf16 *out, const sf_bf16 *gate, const sf_bf16 *up, int64_t n,
                              cudaStream_t stream);

/* The same from a fused projection (Phi-3's gate_up_proj): gate_up is [rows, 2 * ff] with the
 * gate in columns [0, ff) and up in [ff, 2 ff); out[r, j] = silu(gate_up[r, j]) *
 * gate_up[r, ff + j], out [rows, ff]. out must not overlap gate_up. */
sf_status sf_cuda_swiglu_fused_bf16(sf_bf16 *out, const sf_bf16 *gate_up, int64_t rows, int64_t ff,
                                    cudaStream_t stream);

/* out[i] = a[i] + b[i] (fp32 sum, rounded once). out may be a or b (exactly). */
sf_status sf_cuda_add_bf16(sf_bf16 *out, const sf_bf16 *a, const sf_bf16 *b, int64_t n,
                           cudaStream_t stream);

/* out[i] = x[i] / 2 * (1 + erf(x[i] / sqrt 2)) (exact GELU, torch's approximate="none").
 * out may be x. */
sf_status sf_cuda_gelu_bf16(sf_bf16 *out, const sf_bf16 *x, int64_t n, cudaStream_t stream);

/* out[i] = x[i] < 0 ? 0 : x[i]; NaN propagates, as torch.relu. Exact. out may be x. */
sf_status sf_cuda_relu_bf16(sf_bf16 *out, const sf_bf16 *x, int64_t n, cudaStream_t stream);

/* x[r, :] += b for each of rows rows of dim values: the fp32 sum of the two bf16 values,
 * rounded to bf16. b must not overlap x. */
sf_status sf_cuda_bias_add_bf16(sf_bf16 *x, const sf_bf16 *b, int64_t rows, int64_t dim,
                                cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
