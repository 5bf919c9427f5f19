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

/* ---------------------------------------------------------------------------------------------
 * Backward (training; CPU twins sf_cpu_swiglu_backward, sf_cpu_gelu_backward,
 * sf_cpu_relu_backward in host/cpu/activations.c, same formulas).
 *
 * Types: the incoming gradient (dout, dy) is fp32, the gradient stream a training step carries;
 * the activations are the bf16 values the forward read; the derivative is formed in fp32 and
 * each output rounded once, to fp32 (out_bf16 / dx_bf16 false) or to bf16 (true: what the
 * GEMM backward of the projection below consumes, cuBLASLt taking both operands in one type).
 * An fp32 output may be its fp32 input gradient exactly (in place); a bf16 one must not overlap
 * it; outputs never overlap the activations or each other.
 *
 * SF_ERR_INVALID_ARGUMENT (before any CUDA call) for sizes as the forwards, a NULL pointer when
 * there is work, a pointer not aligned to its element (4 bytes fp32, 2 bf16), a bf16 output
 * equal to the fp32 input, or dgate == dup. n == 0 (rows or ff == 0) enqueues nothing. */

/* dgate[i] = dout[i] up[i] silu'(gate[i]), dup[i] = dout[i] silu(gate[i]), with
 * silu'(g) = s (1 + g (1 - s)), s = sigmoid(g). */
sf_status sf_cuda_swiglu_backward(void *dgate, void *dup, bool out_bf16, const float *dout,
                                  const sf_bf16 *gate, const sf_bf16 *up, int64_t n,
                                  cudaStream_t stream);

/* The backward of sf_cuda_swiglu_fused_bf16: dgate_up [rows, 2 ff] (the gate's gradient in
 * columns [0, ff), the up projection's in [ff, 2 ff)) from dout [rows, ff] and gate_up
 * [rows, 2 ff]. dgate_up must not overlap dout. */
sf_status sf_cuda_swiglu_fused_backward(void *dgate_up, bool out_bf16, const float *dout,
                                        const sf_bf16 *gate_up, int64_t rows, int64_t ff,
                                        cudaStream_t stream);

/* dx[i] = dy[i] (Phi(x[i]) + x[i] phi(x[i])), the exact GELU's derivative (Phi the normal
 * CDF written with erfc, phi its density). */
sf_status sf_cuda_gelu_backward(void *dx, bool dx_bf16, const float *dy, const sf_bf16 *x,
                                int64_t n, cudaStream_t stream);

/* dx[i] = x[i] <= 0 ? 0 : dy[i] (torch's threshold_backward: the kink gets 0, a NaN x passes
 * dy). x may be the ReLU's input or its output (relu(x) <= 0 exactly where x <= 0), so the
 * output of a GEMM's RELU_BIAS epilogue serves. */
sf_status sf_cuda_relu_backward(void *dx, bool dx_bf16, const float *dy, const sf_bf16 *x,
                                int64_t n, cudaStream_t stream);

/* The backward of sf_cuda_bias_add_bf16 (and of a GEMM's bias epilogue): db[j] = (or +=, when
 * accumulate) sum over r < rows of dy[r * ldy + j], j < dim; dy fp32, or bf16 when dy_bf16.
 * fp32 sums in a fixed order: bit-identical from run to run. rows == 0 writes zeros (nothing
 * when accumulating). db must not overlap dy. SF_ERR_INVALID_ARGUMENT for negative sizes,
 * ldy < dim, NULL or misaligned pointers. */
sf_status sf_cuda_bias_backward(float *db, bool accumulate, const void *dy, bool dy_bf16,
                                int64_t ldy, int64_t rows, int64_t dim, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
