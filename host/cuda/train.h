/* Internal: one Sysformer training step on the GPU (host/cuda/train_step.c), the device twin
 * of what host/train/trainer.c's step computes on the CPU with sf_sysformer_forward_train +
 * sf_llm_loss_backward_cpu + sf_sysformer_backward (train.h) and then sf_clip_grad_norm +
 * sf_adamw_step (trainer.h): the same losses, the same normalisation (carried by the caller's
 * weights, as on the CPU), the gradient of every Sysformer weight and of the classifier head
 * in sf_sysformer_flat's order, and the update.
 *
 * The trainer holds the Sysformer's fp32 master weights and AdamW's m and v on the device.
 * sf_cuda_train_step runs a whole step there (loss, gradient, clipping, AdamW, the bf16 copies
 * the next forward reads) and returns only scalars; the state crosses to and from the host in
 * sf_cuda_train_upload_state and sf_cuda_train_download_state, which the caller uses where it
 * needs the host copies (checkpoints, resume, a CPU validation). sf_cuda_train_loss_grad is the
 * other way to step: the gradient back to the host for an optimizer there.
 *
 * This header names no CUDA type, so the trainer (built with or without CUDA) can include it;
 * a build without CUDA gets stubs that fail with SF_ERR_NO_DEVICE (host/core/no_cuda.c). */
#ifndef SF_CUDA_TRAIN_H
#define SF_CUDA_TRAIN_H

#include "sysformer.h"
#include "train/train.h"
#include "train/trainer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sf_cuda_trainer sf_cuda_trainer;

typedef struct sf_cuda_train_options {
    int32_t device;     /* CUDA device ordinal                                                */
    int32_t max_tokens; /* packed rows of the largest batch: every buffer is sized for it at
                           creation (> 0; 0 picks 1024, the trainer's default batch_tokens)   */
    int32_t head_chunk; /* rows per LM-head chunk (logits [chunk, vocab] in fp32 and bf16);
                           0 picks 256                                                         */
    bool recompute;     /* keep only each LLM layer's input and run the layer's forward again
                           in the backward: the LLM's saved activations shrink from layers x
                           T x (2 d + 2 q + 2 kv + 2 ff) bf16 + lse to one such set (about one
                           more LLM forward of time); the losses are the same bit for bit,
                           the gradients too with deterministic, else up to the attention
                           backward's atomic dq sums                                          */
    bool deterministic; /* every attention backward computes dq in a pass of its own instead
                           of summing it with atomics (kernels/attention.h), so that steps,
                           and so whole runs, repeat bit for bit whatever the lengths; 7
                           matrix products in each attention backward instead of 5. Default
                           false: dq's last bits may vary from run to run once an attention
                           sees more than 128 keys                                            */
    int32_t gen_slots;  /* > 0: room for greedy generation with the Sysformer being trained
                           (sf_cuda_train_generate): requests at once. The LLM's engine then
                           holds gen_slots KV slots of gen_context positions and the
                           Sysformer's bf16 copy; 0 (default): none                          */
    int32_t gen_context; /* positions per slot (prompt + new tokens), 1..max_position_embeddings,
                           when gen_slots > 0                                                 */
} sf_cuda_train_options;

sf_cuda_train_options sf_cuda_train_default_options(void);

/* One packed batch, all host arrays (what the CPU trainer builds):
 *   request r owns rows [cu_seqlens[r], cu_seqlens[r + 1]) of ids, split by spans[r] into
 *   prefix | system | middle | user | suffix; the Sysformer rewrites the system rows from the
 *   system and user rows' embeddings, and the frozen LLM runs over the result (positions from
 *   0, no KV cache). A module with a learned system offset takes system spans that are empty
 *   or exactly its offset's rows.
 *   token cross-entropy: entry i < n_ce, weight ce_weights[i] (NULL: 1), row ce_rows[i] predicts
 *   ce_targets[i];
 *   classifier: entry i < n_class, weight class_weights[i] (NULL: 1), BCE of sigmoid(w . h + b)
 *   against class_labels[i] in [0, 1], h the final-normed last hidden state of row
 *   class_rows[i], (w, b) the Sysformer's classifier head;
 *   reconstruction: w_recon / (N_s d) sum (S' - S)^2 over all system rows (0: off).
 * These are exactly the terms of sf_llm_loss_backward_cpu plus the trainer's L_recon. */
typedef struct sf_cuda_train_batch {
    int32_t n_requests;
    const int32_t *ids;             /* [T]            */
    const int32_t *cu_seqlens;      /* [n_requests+1] */
    const sf_prompt_spans *spans;   /* [n_requests]   */
    int32_t n_ce;
    const int32_t *ce_rows;
    const int32_t *ce_targets;
    const float *ce_weights;
    int32_t n_class;
    const int32_t *class_rows;
    const float *class_labels;
    const float *class_weights;
    double w_recon;
} sf_cuda_train_batch;

/* Device memory a trainer holds, in bytes. */
typedef struct sf_cuda_train_memory {
    size_t llm_weights;  /* the frozen LLM, bf16, with the engine it is held in (small, or
                            sized for gen_slots x gen_context)                             */
    size_t sysformer;    /* the Sysformer: its bf16 weights, fp32 master weights, and the
                            optimizer part below                                          */
    size_t optimizer;    /* of sysformer: the fp32 gradients, AdamW's fp32 m and v, the
                            gradient norm and its scratch (3 x 4 bytes per weight and a few
                            KiB)                                                          */
    size_t activations;  /* everything a batch of max_tokens rows saves and works in       */
    size_t pinned_host;  /* page-locked host staging                                       */
    size_t total;        /* device total: llm_weights + sysformer + activations            */
} sf_cuda_train_memory;

/* Uploads the frozen LLM (bf16) and plans every buffer for batches of up to max_tokens rows.
 * sf is the Sysformer being trained: it must outlive the trainer. Its current weights become the
 * device's master weights, with zero AdamW moments (ready for sf_cuda_train_step); the layout
 * (which tensors exist, their offsets) is read from sf for the trainer's life. Fails with
 * SF_ERR_NO_DEVICE without a GPU or CUDA build, SF_ERR_UNSUPPORTED for head dimensions the fused
 * attention lacks (LLM or Sysformer: 64, 80, 96, 128), SF_ERR_CONFIG when sf does not fit the
 * LLM, SF_ERR_OUT_OF_MEMORY when the plan does not fit the device. */
sf_status sf_cuda_train_create(const sf_llm *llm, const sf_sysformer *sf,
                               const sf_cuda_train_options *options, sf_cuda_trainer **out);

void sf_cuda_train_free(sf_cuda_trainer *t);

sf_status sf_cuda_train_memory_report(const sf_cuda_trainer *t, sf_cuda_train_memory *out);

/* What sf_cuda_train_create would allocate for these arguments, computed without a device or
 * any CUDA call (equal to sf_cuda_train_memory_report on the trainer so made): for choosing
 * max_tokens and recompute before creating. Same argument checks as creation; a build without
 * CUDA answers SF_ERR_NO_DEVICE. */
sf_status sf_cuda_train_plan(const sf_llm *llm, const sf_sysformer *sf,
                             const sf_cuda_train_options *options, sf_cuda_train_memory *out);

/* The forward, the losses and, when grads is not NULL, the backward of one batch, at sf's
 * current weights: they are uploaded at every call and become the device's master weights
 * (the caller may update them in place between calls, e.g. AdamW on the host; AdamW's device
 * moments are left alone):
 *   *result: ce and cls the weighted sums (as sf_llm_loss_backward_cpu), total = ce + cls,
 *            ce_correct the argmax hits;
 *   *recon (may be NULL): the weighted reconstruction term w_recon / (N_s d) sum (S' - S)^2;
 *   grads [n_weights of sf, sf_sysformer_flat's order]: dL/dW of L = ce + cls + recon for every
 *            Sysformer weight and the classifier head (overwritten; zeros where no term
 *            reaches).
 * The LLM's weights are only read. The batch is validated completely first:
 * SF_ERR_INVALID_ARGUMENT for malformed offsets, spans, ids, rows, targets, labels or weights;
 * SF_ERR_OUT_OF_RANGE for more rows (or loss entries) than max_tokens, or a request longer than
 * the LLM's context. Synchronises with the device before returning. */
sf_status sf_cuda_train_loss_grad(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                                  sf_llm_loss_result *result, double *recon, float *grads);

/* The forward and the losses of one batch (*result, *recon as sf_cuda_train_loss_grad's) at
 * the device's master weights as they stand (no upload, no backward: the weights, the moments
 * and the last gradient are left as they were), e.g. a validation between device steps. The
 * same batch checks. Synchronises. */
sf_status sf_cuda_train_loss(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                             sf_llm_loss_result *result, double *recon);

/* sf_generate_cuda (sysformer.h) with the Sysformer at the device's master weights as they
 * stand, rounded to bf16 as an upload of them would be (so it generates what an engine created
 * from the downloaded weights would, token for token); no stream callback. Needs a trainer
 * made with gen_slots > 0 (SF_ERR_INVALID_ARGUMENT otherwise); the generation's own limits
 * apply (at most gen_slots requests; a request ends when it fills gen_context positions).
 * Leaves the weights, the moments and the last gradient as they were. Synchronises. */
sf_status sf_cuda_train_generate(sf_cuda_trainer *t, const sf_tokenizer *tok,
                                 const sf_generation *gen, sf_generation_result *results);

/* The optimizer half of a device step: values the host knows before the step. */
typedef struct sf_cuda_train_update {
    double lr;         /* this step's learning rate (sf_train_lr_at), finite, >= 0          */
    int64_t step;      /* AdamW's 1-based step count t (the bias corrections 1 - beta^t)   */
    sf_adamw adamw;    /* betas in [0, 1), eps > 0, weight decay >= 0 (finite)              */
    double clip_norm;  /* the global gradient norm is clipped to it first; <= 0: off        */
} sf_cuda_train_update;

/* One training step on the device, on its master weights (no upload): the loss and gradient
 * of the batch (as sf_cuda_train_loss_grad computes them), then sf_clip_grad_norm's clipping
 * and sf_adamw_step's update of the master weights and moments (kernels/optim.h: bit for bit
 * the CPU's arithmetic given the same clip coefficient), then the bf16 copies the next
 * forward reads. Only scalars come back: *result and *recon (may be NULL) as
 * sf_cuda_train_loss_grad's, *grad_norm (may be NULL) the global gradient norm before
 * clipping. An empty batch (no rows) steps with a zero gradient. The batch and the update
 * are validated before anything is enqueued (SF_ERR_INVALID_ARGUMENT, SF_ERR_OUT_OF_RANGE as
 * sf_cuda_train_loss_grad; SF_ERR_INVALID_ARGUMENT for an update outside its ranges or a NaN
 * clip_norm), so a refused call changes nothing; after a CUDA failure the device state is
 * unspecified. Synchronises with the device before returning. */
sf_status sf_cuda_train_step(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                             const sf_cuda_train_update *update, sf_llm_loss_result *result,
                             double *recon, double *grad_norm);

/* Replaces the device's state: weights [n_weights of sf] become the master weights (and their
 * bf16 copies), m and v AdamW's moments (NULL: zeros). For a resume; fp32 values arrive
 * exactly. The gradient sf_cuda_train_download_state reports is left as it was. Synchronises
 * before returning, so the arrays may be reused at once. */
sf_status sf_cuda_train_upload_state(sf_cuda_trainer *t, const float *weights, const float *m,
                                     const float *v);

/* Copies the device's state to the host, each array [n_weights of sf] (NULL: not wanted):
 * the master weights, AdamW's m and v, and grads the last step's gradient as AdamW used it:
 * after clipping for sf_cuda_train_step (what sf_clip_grad_norm leaves in place; the norm's
 * coefficient is applied here, on the host, by the same expression), as computed for
 * sf_cuda_train_loss_grad (which, without grads, computes none and leaves the last), zeros
 * before either. Exact fp32 values. Synchronises. */
sf_status sf_cuda_train_download_state(sf_cuda_trainer *t, float *weights, float *m, float *v,
                                       float *grads);

#ifdef __cplusplus
}
#endif

#endif
