/* Internal: training the Sysformer against the frozen LLM on the CPU (fp32), DESIGN.md §6.
 *
 *   host/cpu/<op>.c            each op's backward beside its forward (ops.h)
 *   host/sysformer/backward_cpu.c  the Sysformer's forward with saved activations, and its
 *                              backward: gradients for every weight
 *   host/model/backward_cpu.c  the frozen LLM's forward over packed input embeddings with the
 *                              token and classifier losses, and its backward down to the input
 *                              embeddings (activation gradients only: no LLM weight gradient is
 *                              ever computed or stored)
 *   host/train/trainer.c       data, batches, AdamW, schedule, clipping, checkpoints, validation
 *   host/eval/judge.c          the string-match refusal judges (sf_judge_refusal below)
 *
 * Nothing here prints: progress goes through a callback. */
#ifndef SF_TRAIN_TRAIN_H
#define SF_TRAIN_TRAIN_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------- */
/* The Sysformer: forward with a tape, backward                                             */
/* ---------------------------------------------------------------------------------------- */

/* What the forward saved for the backward (opaque). */
typedef struct sf_sysformer_tape sf_sysformer_tape;

/* sf_sysformer_forward_cpu, also recording every activation the backward needs: system_out
 * [cu_system[n], d_model] receives S'. The batch's arrays must stay alive and unchanged until
 * the tape is freed (the tape points at them rather than copying the inputs). */
sf_status sf_sysformer_forward_train(const sf_sysformer *sf, const sf_rewrite_batch *batch,
                                     float *system_out, sf_sysformer_tape **tape);

/* Given dL/dS' (d_system_out, [cu_system[n], d_model]), ADDS dL/dW for every weight of the
 * Sysformer into grads, a Sysformer of the same configuration used as gradient storage (its
 * classifier tensors are not touched here). The inputs (the LLM's embeddings) are frozen, so
 * no input gradient is produced. */
sf_status sf_sysformer_backward(const sf_sysformer *sf, const sf_sysformer_tape *tape,
                                const float *d_system_out, sf_sysformer *grads);

void sf_sysformer_tape_free(sf_sysformer_tape *tape);

/* Every weight of a Sysformer as one flat fp32 array (sf->weights, sf->n_weights floats), and
 * a zeroed Sysformer of the same configuration to hold gradients or optimizer moments. */
sf_status sf_sysformer_clone_zero(const sf_sysformer *sf, sf_sysformer **out);
float *sf_sysformer_flat(sf_sysformer *sf, int64_t *n);

/* ---------------------------------------------------------------------------------------- */
/* The frozen LLM: losses and the backward to its input embeddings                          */
/* ---------------------------------------------------------------------------------------- */

/* The losses over one packed batch of requests (positions from 0, no KV cache), each term
 * weighted, their weighted sum returned:
 *   token cross-entropy: for i < n_ce, weight ce_weights[i] * -log softmax(logits[ce_rows[i]])
 *     [ce_targets[i]] (teacher forcing: row r predicts the token at row r + 1);
 *   classifier: for i < n_class, weight class_weights[i] * BCE(sigmoid(h[class_rows[i]] .
 *     class_w + class_b), class_labels[i]), h = the last-layer hidden state after the final
 *     norm (transformers' hidden_states[-1]). */
typedef struct sf_llm_loss_spec {
    int32_t n_ce;
    const int32_t *ce_rows;    /* packed rows                          */
    const int32_t *ce_targets; /* token ids                            */
    const float *ce_weights;
    int32_t n_class;
    const int32_t *class_rows;
    const float *class_labels; /* 1 = harmful, 0 = harmless            */
    const float *class_weights;
    const float *class_w;      /* [hidden_size] (the Sysformer's classifier.weight) */
    float class_b;
} sf_llm_loss_spec;

typedef struct sf_llm_loss_result {
    double total;    /* sum of both weighted terms */
    double ce;       /* the weighted cross-entropy sum */
    double cls;      /* the weighted classifier sum */
    int32_t ce_correct; /* rows whose argmax equals the target (a cheap accuracy) */
} sf_llm_loss_result;

typedef struct sf_llm_backward_options {
    bool recompute; /* keep only each layer's input and recompute the layer in the backward:
                       activation memory ~ layers x T x d instead of ~ layers x T x
                       (2 d + q + 2 kv + 2 ff) (sf_llm_backward_bytes gives the exact count) */
} sf_llm_backward_options;

/* Bytes of activation memory sf_llm_loss_backward_cpu holds for T packed rows. */
size_t sf_llm_backward_bytes(const sf_llm *llm, int64_t T, const sf_llm_backward_options *o);

/* Forward over input_embeds [T, d] (request r = rows [cu_seqlens[r], cu_seqlens[r+1])), the
 * losses of spec, and when d_input_embeds is not NULL the backward: d_input_embeds [T, d] =
 * dLoss/d(input_embeds); when d_class_w / d_class_b are not NULL, the classifier gradients are
 * ADDED to them. The LLM is only read. */
sf_status sf_llm_loss_backward_cpu(const sf_llm *llm, int32_t n_requests,
                                   const int32_t *cu_seqlens, const float *input_embeds,
                                   const sf_llm_loss_spec *spec,
                                   const sf_llm_backward_options *options,
                                   sf_llm_loss_result *result, float *d_input_embeds,
                                   float *d_class_w, float *d_class_b);

/* ---------------------------------------------------------------------------------------- */
/* The refusal judge                                                                        */
/* ---------------------------------------------------------------------------------------- */

/* True when a reply reads as a refusal by string matching (a documented list of refusal
 * phrases, the union of the XSTest prefix list and GCG's test_prefixes, see judge.c). */
bool sf_judge_refusal(const char *reply);

#ifdef __cplusplus
}
#endif

#endif
