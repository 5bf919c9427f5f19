/* Internal: RMSNorm and LayerNorm over bf16 rows, each fused with the residual add that precedes
 * it in a pre-norm transformer block (kernels/rmsnorm.cu, kernels/layernorm.cu; CPU twins
 * host/cpu/rmsnorm.c, host/cpu/layernorm.c).
 *
 * For every row r of [rows, dim]:
 *   h = x[r] + residual[r]   rounded to bf16 (just x[r] when residual is NULL)
 *   residual_out[r] = h      when residual_out is not NULL: the updated residual stream
 *   out[r] = norm(h)         computed from the bf16 h in fp32, rounded once to bf16
 * The normalisation reads the bf16-rounded h, as a bf16 PyTorch model does
 * (`hidden = residual + hidden` in bf16, then the norm), so out is exactly norm(residual_out).
 * Statistics and arithmetic are fp32; the only bf16 rounding of out is the final one (transformers'
 * LlamaRMSNorm rounds the normalised value to bf16 before multiplying by the weight; this differs
 * from it by at most one bf16 rounding).
 *
 * Aliasing: out may be x or residual, and residual_out may be x or residual (the usual in-place
 * residual stream update), because each element is read by the thread that later writes it and
 * before any write; buffers must otherwise be identical or disjoint, and out != residual_out.
 * w and b must not overlap any output.
 *
 * Paths: when dim % 8 == 0 and every pointer is 16-byte aligned, rows move in 128-bit accesses
 * (8 bf16 each); otherwise a scalar path handles any dim. Either way the row lives in registers
 * between the statistics and the output, so x and residual are read from memory once. The
 * launchers pick the fewest threads per row that hold the row: one warp (4 rows per block) up to
 * dim 1024 on the 128-bit path (512 scalar), else one block per row of 64 to 1024 threads.
 *
 * Device pointers throughout; the launch goes on `stream`, nothing synchronises. Arguments are
 * checked before any CUDA call: SF_ERR_INVALID_ARGUMENT for a NULL out, x or w, rows < 0 or
 * rows > INT32_MAX, dim < 0 or dim > SF_CUDA_NORM_MAX_DIM, eps negative, infinite or NaN, or
 * out == residual_out. rows == 0 or dim == 0 launches nothing and returns SF_OK. SF_ERR_CUDA when
 * the launch itself fails. */
#ifndef SF_KERNELS_NORMS_H
#define SF_KERNELS_NORMS_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The longest row the kernels hold in registers (Llama-3.1-405B's hidden size). */
#define SF_CUDA_NORM_MAX_DIM 16384

/* rmsnorm.cu: out = h * rsqrt(mean(h^2) + eps) * w, w [dim]. */
sf_status sf_cuda_rmsnorm_bf16(sf_bf16 *out, sf_bf16 *residual_out, const sf_bf16 *x,
                               const sf_bf16 *residual, const sf_bf16 *w, int64_t rows,
                               int64_t dim, float eps, cudaStream_t stream);

/* layernorm.cu: out = (h - mean(h)) * rsqrt(var(h) + eps) * w + b with the biased variance
 * (torch.nn.LayerNorm), both statistics from two passes over the row held in registers.
 * w [dim]; b [dim] or NULL for no bias. */
sf_status sf_cuda_layernorm_bf16(sf_bf16 *out, sf_bf16 *residual_out, const sf_bf16 *x,
                                 const sf_bf16 *residual, const sf_bf16 *w, const sf_bf16 *b,
                                 int64_t rows, int64_t dim, float eps, cudaStream_t stream);

/* The same launchers with the kernel variant forced, for the tests (which cover every variant)
 * and bench/bench_norms.cu (which times them): threads_per_row is 0 (the automatic choice the
 * launchers above make), 32 (one warp per row) or 64, 128, 256, 512, 1024 (one block per row).
 * SF_ERR_INVALID_ARGUMENT also when that many threads cannot hold dim in registers (at most
 * 32 * threads_per_row values on the 128-bit path, 16 * threads_per_row on the scalar path). */
sf_status sf_cuda_rmsnorm_bf16_variant(sf_bf16 *out, sf_bf16 *residual_out, const sf_bf16 *x,
                                       const sf_bf16 *residual, const sf_bf16 *w, int64_t rows,
                                       int64_t dim, float eps, int threads_per_row,
                                       cudaStream_t stream);
sf_status sf_cuda_layernorm_bf16_variant(sf_bf16 *out, sf_bf16 *residual_out, const sf_bf16 *x,
                                         const sf_bf16 *residual, const sf_bf16 *w,
                                         const sf_bf16 *b, int64_t rows, int64_t dim, float eps,
                                         int threads_per_row, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
