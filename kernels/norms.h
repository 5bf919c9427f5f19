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

#include <stdbool.h>
#include <stddef.h>

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

/* ---------------------------------------------------------------------------------------------
 * Backward (training). CPU twins: sf_cpu_rmsnorm_backward, sf_cpu_layernorm_backward
 * (host/cpu/ops.h), same semantics.
 *
 * Types. x is the bf16 row the forward normalised (its residual_out, or its x when there was no
 * residual) and w the bf16 weight, as the forward stored them. Gradients are fp32: dy [rows, dim]
 * in, dx [rows, dim] out. The residual stream's gradient passes through every layer's norms (60
 * of them in a 30-layer model) and is summed across them; rounding it to bf16 at each step would
 * compound 2^-9 relative errors that the fp32 stream does not have, so dx stays fp32 and a GEMM
 * that consumes it converts once (sf_cuda_f32_to_bf16). dw and db are fp32 and accumulate
 * (dw += sum over rows of dy * x_hat, db += sum over rows of dy), as in the CPU twins.
 *
 * dx is overwritten, or added to when accumulate_dx (dx += the gradient: the residual stream's
 * gradient takes the norm's contribution without a separate add). dx may be dy (exactly; then
 * accumulate_dx adds to dy's old value); otherwise no output overlaps an input. Any of dx, dw,
 * db may be NULL (not wanted: the frozen LLM's weights); all NULL enqueues nothing.
 *
 * Method. One row per warp or block, as the forward (its variant choice, with 16 values per
 * thread: one warp up to dim 512 on the 128-bit path, else one block of up to 1024 threads),
 * recomputes the statistics in fp32 from x held in registers, forms g = dy * w and the row's two
 * sums, and writes dx. dw and db are column sums over all rows: when wanted, the row kernel also
 * writes each row's (mean, inverse deviation) to `workspace`, and a second kernel sums
 * dy * x_hat and dy down the columns in a fixed order (no atomics: bit-identical from run to
 * run). When dx is dy and dw or db is wanted, the statistics pass runs before the column sums
 * and dx is written by a third launch, so the column sums read the original dy.
 *
 * workspace: at least sf_cuda_norm_backward_workspace_bytes(rows) bytes of device memory,
 * 8-byte aligned; needed only when dw or db is not NULL (may be NULL otherwise). Scratch for
 * the call: free again once the stream passes it.
 *
 * SF_ERR_INVALID_ARGUMENT (before any CUDA call) for a NULL dy, x or w, rows or dim out of the
 * forward's range, eps negative, infinite or NaN, a pointer not aligned to its element (4 bytes
 * for fp32, 2 for bf16), or a missing / short / misaligned workspace when dw or db is wanted.
 * rows == 0 or dim == 0 enqueues nothing and returns SF_OK. SF_ERR_CUDA when a launch fails. */

/* 8 bytes per row: the (mean, inverse deviation) pair the column sums read. */
size_t sf_cuda_norm_backward_workspace_bytes(int64_t rows);

/* rmsnorm.cu: with r = rsqrt(mean(x^2) + eps) and g = dy * w,
 *   dx = r g - x r^3 / dim * sum(g x),   dw += sum_rows dy * x * r. */
sf_status sf_cuda_rmsnorm_backward(float *dx, bool accumulate_dx, float *dw, const float *dy,
                                   const sf_bf16 *x, const sf_bf16 *w, int64_t rows,
                                   int64_t dim, float eps, void *workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

/* layernorm.cu: with x_hat = (x - mean) rstd (biased variance) and g = dy * w,
 *   dx = rstd (g - mean(g) - x_hat mean(g x_hat)),  dw += sum_rows dy x_hat,  db += sum_rows dy.
 * The bias does not enter the backward. */
sf_status sf_cuda_layernorm_backward(float *dx, bool accumulate_dx, float *dw, float *db,
                                     const float *dy, const sf_bf16 *x, const sf_bf16 *w,
                                     int64_t rows, int64_t dim, float eps, void *workspace,
                                     size_t workspace_bytes, cudaStream_t stream);

/* The backward launchers with the row kernel's variant forced (threads_per_row as for the
 * forward's _variant launchers; at most 16 * threads_per_row values on either path), for the
 * tests. */
sf_status sf_cuda_rmsnorm_backward_variant(float *dx, bool accumulate_dx, float *dw,
                                           const float *dy, const sf_bf16 *x, const sf_bf16 *w,
                                           int64_t rows, int64_t dim, float eps, void *workspace,
                                           size_t workspace_bytes, int threads_per_row,
                                           cudaStream_t stream);
sf_status sf_cuda_layernorm_backward_variant(float *dx, bool accumulate_dx, float *dw, float *db,
                                             const float *dy, const sf_bf16 *x,
                                             const sf_bf16 *w, int64_t rows, int64_t dim,
                                             float eps, void *workspace, size_t workspace_bytes,
                                             int threads_per_row, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
