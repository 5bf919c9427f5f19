/* Internal: the token cross-entropy of the LM head's logits, with its gradient, on the device,
 * and the log-probabilities generation reports
 * (kernels/loss.cu; CPU twin sf_cpu_cross_entropy in host/cpu/softmax.c, with the argmax count
 * of ce_loss in host/model/backward_cpu.c). Device pointers; the launcher enqueues on the given
 * stream, never synchronises, validates its arguments before touching CUDA
 * (SF_ERR_INVALID_ARGUMENT) and returns SF_ERR_CUDA when the launch fails. */
#ifndef SF_KERNELS_LOSS_H
#define SF_KERNELS_LOSS_H

#include <stdbool.h>

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* For each row r < rows of logits [rows, vocab] (fp32, or bf16 when logits_bf16), with
 * w = weights[r] (weights NULL: 1), t = targets[r], M the row's maximum and
 * S = sum_i exp(logits[r, i] - M):
 *   loss[r]        = w * (M - logits[r, t] + log S)     (fp32; 0 when w == 0)
 *   correct[r]     = argmax_i logits[r, i] == t         (int32 0 or 1; the first maximum, NaN
 *                                                        never wins except at index 0, as the
 *                                                        CPU's loop and sf_cuda_argmax_f32)
 *   dlogits[r, i]  = w * (exp(logits[r, i] - M) / S - [i == t])   (fp32, or bf16 when
 *                                                        dlogits_bf16; 0 when w == 0)
 * so sum_r loss[r] is what sf_cpu_cross_entropy returns (the caller sums, or normalises by the
 * number of tokens, through the weights), and dlogits is the gradient of that sum: the input of
 * the LM head's GEMM backward, which wants it in bf16. A weight of 0 masks the row (padding,
 * prompt tokens): its loss and gradient are exactly 0 whatever its logits and target (so a
 * torch-style ignore index such as -100 is a target with weight 0); correct[r] is still
 * computed, as the CPU counts every row. A target outside [0, vocab) on a row with w != 0
 * gives a NaN loss, correct 0 and dlogits = w * softmax (no one-hot term); the host validates
 * targets, the kernel does not fail. A NaN logit on a row with w != 0 makes its loss and every
 * dlogits entry NaN (its sum S is NaN), as on the CPU.
 *
 * Method: one block per row; a single pass over the logits keeps a running maximum and the sum
 * of exponentials rescaled to it (online softmax) plus the first argmax, all fp32; the block
 * combines them in a fixed order (bit-identical from run to run); a second pass writes dlogits.
 * logits are read with 128-bit loads when vocab % 8 == 0 and the arrays are 16-byte aligned.
 *
 * Any of loss, correct, dlogits may be NULL (not wanted). dlogits may be logits itself (same
 * type, exactly: the gradient overwrites the logits in place, the CPU twin's habit); otherwise
 * it must not overlap any input. SF_ERR_INVALID_ARGUMENT for rows < 0 or > INT32_MAX, vocab < 1
 * (when rows > 0), NULL logits or targets, a pointer not aligned to its element, or dlogits equal
 * to logits in a different type. rows == 0 enqueues nothing. */
sf_status sf_cuda_cross_entropy(float *loss, int32_t *correct, void *dlogits, bool dlogits_bf16,
                                const void *logits, bool logits_bf16, const int32_t *targets,
                                const float *weights, int64_t rows, int32_t vocab,
                                cudaStream_t stream);

/* The log-probabilities generation reports, over fp32 logits [rows, vocab], with M, S as
 * above and log p(i) = -((M - logits[r, i]) + log S) formed as the loss is (the same kernel
 * structure and rounding as sf_cuda_cross_entropy's loss with weight 1):
 *   nll[r]                       -log p(targets[r])  (NaN for a target outside [0, vocab));
 *   top_ids[r n_top + j],        the j-th most likely token of row r (larger logit first, the
 *   top_lp[r n_top + j]          lower id on a tie; NaN logits never rank) and its log p; past
 *                                the row's non-NaN values, id -1 and NaN.
 * nll may be NULL (then targets is not read); with n_top = 0 the top arrays are not written.
 * The top n are exact (comparisons of the fp32 logits); CPU twins sf_token_logprob and
 * sf_top_logprobs (host/cpu/softmax.c). One read of each row, one block a row.
 * SF_ERR_INVALID_ARGUMENT for rows < 0 or > INT32_MAX, vocab < 1 (rows > 0), n_top outside
 * [0, SF_MAX_TOP_LOGPROBS], a NULL array that is needed, or a misaligned pointer. */
sf_status sf_cuda_logprobs(float *nll, int32_t *top_ids, float *top_lp, const float *logits,
                           const int32_t *targets, int64_t rows, int32_t vocab, int32_t n_top,
                           cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
