/* Internal: the optimizer on the device (kernels/optim.cu): the global L2 norm of a gradient
 * with PyTorch's clip coefficient, and AdamW over fp32 weights, gradients and moments. CPU
 * twins: sf_clip_grad_norm and sf_adamw_step (host/train/trainer.c). Device pointers; the
 * launchers enqueue on the given stream, never synchronise, validate their arguments before
 * touching CUDA (SF_ERR_INVALID_ARGUMENT) and return SF_ERR_CUDA when a launch fails.
 *
 * Together they are the CPU trainer's sf_clip_grad_norm followed by sf_adamw_step without a
 * host round trip: the norm and the clip coefficient stay in device memory, AdamW reads the
 * coefficient from there, and everything else it needs (lr, step count, hyper-parameters) is
 * known on the host before the step is enqueued.
 *
 * Precision, against the CPU's double version:
 *   - the squares are exact in double (a float has 24 significant bits, its square 48 <= 53)
 *     and are summed in double in a fixed tree (below), so the norm is the same bits from run
 *     to run and, like the CPU's (which sums blocks of 16384 in sequence, then the blocks),
 *     within gamma_{n-1} (n 2^-53 relative) of the exact sum of squares: the two norms differ
 *     by at most gamma_{n-1} + 2^-52 relative (2^-53 for each side's square root). The clip
 *     coefficient is computed from the device's norm with the CPU's two operations.
 *   - AdamW runs in double per element, with the CPU's operations in the CPU's order, each
 *     rounded once (the __d*_rn intrinsics: nvcc may not fuse them into FMAs, which would
 *     change the last bits) and the results rounded to fp32 once: given the same clip
 *     coefficient, w, m and v are the CPU's bit for bit. fp32 arithmetic would not do: the
 *     decay 1 - lr wd (1 - 1e-6 at the defaults) keeps only a few significant bits of lr wd
 *     in fp32, v's (1 - beta2) g^2 underflows for |g| < 1e-19, and the bias corrections
 *     1 - beta^t lose half their bits early in training. The kernel is memory bound (28 bytes
 *     per element) on sm_90's fp64 units, so the double arithmetic costs little.
 *   - When clipping is active, the two coefficients differ by at most the norm's bound (plus
 *     2^-52 for the add and the division), so a clipped gradient element rounds to the CPU's
 *     value or to the fp32 value next to it; only such elements can differ, by what one ulp
 *     of the gradient moves m, v and w (tests/test_cuda_optim.cpp derives it per element). */
#ifndef SF_KERNELS_OPTIM_H
#define SF_KERNELS_OPTIM_H

#include "kernels.h"
#include "train/trainer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Device memory sf_cuda_grad_norm needs for n elements: one double per block of the first
 * pass (at most 8 KiB). */
size_t sf_cuda_grad_norm_workspace_bytes(int64_t n);

/* out[0] = ||g||_2 over g[0 .. n) (double; 0 for n == 0) and out[1] = the clip coefficient
 * applied to g before AdamW: max_norm / (out[0] + 1e-6) when max_norm > 0 and that is below 1,
 * else exactly 1 (a NaN norm gives 1, as the CPU's comparison does). out is a device double[2].
 * Deterministic: per-block partial sums in a fixed order, then one block adding the partials
 * in a fixed order; no floating-point atomics.
 * SF_ERR_INVALID_ARGUMENT for n < 0, NULL out or workspace (or NULL g when n > 0), out not
 * aligned to a double, g not aligned to a float, a workspace smaller than
 * sf_cuda_grad_norm_workspace_bytes(n) or not aligned to a double, or a NaN max_norm. */
sf_status sf_cuda_grad_norm(double *out, const float *g, int64_t n, double max_norm,
                            void *workspace, size_t workspace_bytes, cudaStream_t stream);

/* One AdamW step over n elements, after scaling the gradient by *clip (a device double, e.g.
 * sf_cuda_grad_norm's out + 1; NULL: no clipping): per element, with g' = (float)(g clip) when
 * clip < 1, else g,
 *   m = beta1 m + (1 - beta1) g';  v = beta2 v + (1 - beta2) g'^2;
 *   w = w (1 - lr wd) - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * exactly as sf_adamw_step (t the 1-based step count). g is only read. w, g, m and v must not
 * overlap. Vector loads and stores (float4) when all four are 16-byte aligned, the n % 4 tail
 * and every other alignment element by element; grid-stride over any n.
 * SF_ERR_INVALID_ARGUMENT for n < 0, NULL hp or (when n > 0) NULL or overlapping arrays, an
 * array or clip not aligned to its element, t < 1, or hyper-parameters outside what the
 * trainer accepts (lr < 0, betas outside [0, 1), eps <= 0, weight decay < 0; lr, eps and the
 * weight decay must also be finite). n == 0 enqueues nothing. */
sf_status sf_cuda_adamw(float *w, const float *g, float *m, float *v, int64_t n, double lr,
                        const sf_adamw *hp, int64_t t, const double *clip, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
