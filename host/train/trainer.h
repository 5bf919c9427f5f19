/* Internal: the Sysformer trainer (DESIGN.md §6, docs/SYSFORMER.md "Training").
 *
 * Two layers:
 *   - the token level: a training set is a list of examples, each a chat prompt as token ids
 *     with its five spans plus the reply token ids that follow it. The trainer packs examples
 *     into batches, computes the four losses, backpropagates through the frozen LLM into the
 *     Sysformer, clips, steps AdamW on a warm-up + cosine (or constant) schedule, validates,
 *     and writes and resumes checkpoints. Nothing here needs a tokenizer, so the tests run it
 *     on tiny random models.
 *   - the text level on top: reading the prompt datasets (JSON lists of {"instruction": ...}),
 *     jailbreak templates, generating and caching the harmless replies with the frozen LLM,
 *     and encoding everything with a tokenizer and chat template into training sets.
 *
 * Nothing here prints: progress goes through sf_train_event_fn. */
#ifndef SF_TRAIN_TRAINER_H
#define SF_TRAIN_TRAINER_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------- */
/* Token-level training sets                                                                */
/* ---------------------------------------------------------------------------------------- */

/* One example: ids[offset .. offset + n_prompt) is the chat prompt (split by spans, which add
 * up to n_prompt), ids[offset + n_prompt .. + n_target) the reply it should be followed by
 * (teacher forcing; n_target may be 0: no cross-entropy term for it). Harmful examples carry
 * the refusal as their reply (L_ref) and label 1 for the classifier; harmless ones the desired
 * answer (L_compl) and label 0. */
typedef struct sf_train_example {
    int64_t offset;
    int32_t n_prompt;
    int32_t n_target;
    sf_prompt_spans spans;
    bool harmful;
} sf_train_example;

typedef struct sf_train_set {
    int32_t n;
    sf_train_example *ex; /* [n]                          */
    int32_t *ids;         /* [n_ids] all examples' tokens */
    int64_t n_ids;
    int32_t cap_ex;       /* allocated entries            */
    int64_t cap_ids;
} sf_train_set;

/* Appends one example (copies the ids). The spans must add up to n_prompt, the system and
 * user spans must not be empty, and n_prompt must be at least 1. */
sf_status sf_train_set_add(sf_train_set *set, const int32_t *prompt, int32_t n_prompt,
                           const sf_prompt_spans *spans, const int32_t *target, int32_t n_target,
                           bool harmful);

/* Frees the arrays and zeroes the set (a zeroed set is a valid empty one). */
void sf_train_set_free(sf_train_set *set);

/* FNV-1a 64 over every example (kind, spans, ids): checkpoints record it so that a resume with
 * different data is refused rather than silently diverging. */
uint64_t sf_train_set_hash(const sf_train_set *set);

/* ---------------------------------------------------------------------------------------- */
/* Options, schedule, optimizer                                                             */
/* ---------------------------------------------------------------------------------------- */

typedef enum sf_lr_schedule {
    SF_LR_COSINE = 0,   /* linear warm-up, then cosine from lr to lr * min_lr_ratio */
    SF_LR_CONSTANT = 1, /* linear warm-up, then lr                                  */
} sf_lr_schedule;

typedef struct sf_adamw {
    double beta1, beta2, eps, weight_decay;
} sf_adamw;

typedef enum sf_train_event_kind {
    SF_TRAIN_EVENT_STEP = 0,        /* after every optimizer step                        */
    SF_TRAIN_EVENT_VALIDATION = 1,  /* after each validation (epoch 0: before training)  */
    SF_TRAIN_EVENT_CHECKPOINT = 2,  /* after a checkpoint was written                    */
    SF_TRAIN_EVENT_COMPLETIONS = 3, /* sf_train_fill_completions: replies generated      */
} sf_train_event_kind;

/* What a callback is told. Loss terms are the normalised means documented in
 * docs/SYSFORMER.md "Training"; a term that does not apply is 0. */
typedef struct sf_train_event {
    sf_train_event_kind kind;
    int32_t epoch;        /* STEP: the epoch the step belongs to (0-based); VALIDATION and
                             CHECKPOINT: epochs completed                                 */
    int64_t step;         /* optimizer steps taken so far                                 */
    int64_t total_steps;  /* over all epochs                                              */
    /* STEP */
    double loss;          /* the weighted total minimised                                 */
    double loss_ce;       /* w_ref L_ref + w_compl L_compl of the batch                  */
    double loss_class;    /* w_class L_class                                              */
    double loss_recon;    /* w_recon L_recon                                              */
    double lr;            /* the learning rate this step used                            */
    double grad_norm;     /* the global gradient norm before clipping                    */
    int32_t batch_examples;
    int32_t batch_tokens; /* packed rows                                                  */
    double tokens_per_s;  /* batch_tokens / the step's wall time                          */
    double seconds;       /* wall time since sf_trainer_run began                         */
    /* VALIDATION: unweighted terms over the whole validation set, and refusal rates */
    double val_ref, val_compl, val_class, val_recon, val_total; /* val_total: weighted  */
    double refusal_harmful;  /* fraction of the judged harmful prompts refused; -1: none  */
    double refusal_harmless; /* the same for harmless prompts (over-refusal)              */
    int32_t n_judged_harmful, n_judged_harmless;
    const char *sample_harmful;  /* the first judged reply of each kind (NULL without a   */
    const char *sample_harmless; /* tokenizer); valid during the callback only            */
    /* CHECKPOINT: the directory written; COMPLETIONS: done of total prompts */
    const char *path;
    int32_t done, total;
} sf_train_event;

/* Return false to ask the trainer to stop at the next safe point (after the current step, or
 * after an epoch's validation and checkpoint); sf_trainer_run then writes a checkpoint (with
 * an output directory) and returns SF_OK with *finished false. */
typedef bool (*sf_train_event_fn)(void *user, const sf_train_event *event);

/* Decides whether a generated reply is a refusal; text is NULL without a tokenizer. */
typedef bool (*sf_train_judge_fn)(void *user, const int32_t *ids, int32_t n_ids,
                                  const char *text);

/* Where each step's loss and gradient are computed. */
typedef enum sf_train_device {
    SF_TRAIN_CPU = 0,  /* fp32 reference (host/sysformer, host/model backward_cpu.c)          */
    SF_TRAIN_CUDA = 1, /* the GPU, bf16 storage and fp32 gradients (host/cuda/train.h);
                          clipping and AdamW run there too, on fp32 master weights and moments
                          kept on the device between steps, and so does validation: the losses
                          at the device's weights, and the greedy generation for the refusal
                          rates in the device trainer's engine (sized at creation for val_batch
                          prompts of the longest judged prompt plus val_max_new_tokens), in
                          bf16 like the steps (near-tie replies may differ from a CPU run's).
                          The Sysformer's weights (and the moments) are copied back to the host
                          before each checkpoint, at the end of sf_trainer_run
                          and by sf_trainer_last_gradient, so in between (e.g. in a STEP
                          callback) sf holds older weights; and changes the caller makes to sf
                          are not seen by the device (load weights through a checkpoint and
                          sf_trainer_resume instead)                                          */
} sf_train_device;

typedef struct sf_train_options {
    /* losses */
    double w_ref, w_compl, w_class, w_recon;
    /* optimisation */
    int32_t epochs;
    int32_t batch_tokens;   /* packed rows per step: examples are added while they fit; an
                               example longer than this gets a batch of its own             */
    double lr;
    sf_lr_schedule schedule;
    int64_t warmup_steps;   /* < 0: 5% of the total steps, rounded up                      */
    double min_lr_ratio;    /* cosine ends at lr * min_lr_ratio                            */
    sf_adamw adamw;
    double clip_norm;       /* global gradient-norm clipping; <= 0: off                    */
    uint64_t seed;          /* the per-epoch shuffles                                       */
    bool recompute;         /* the LLM backward recomputes each layer's forward instead of
                               storing its activations (CPU and GPU; see sf_trainer_memory) */
    bool deterministic;     /* GPU: the attention backward sums dq without atomics, so that
                               runs (and resumed runs) repeat bit for bit at any length
                               (sf_cuda_train_options.deterministic); the CPU always does   */
    sf_train_device device; /* SF_TRAIN_CPU (the default, 0) or SF_TRAIN_CUDA               */
    int32_t cuda_device;    /* with SF_TRAIN_CUDA: the CUDA device ordinal                  */
    /* validation (with a validation set) */
    bool validate_first;    /* also validate before the first step of a fresh run          */
    int32_t val_harmful_n;  /* harmful validation prompts generated for and judged          */
    int32_t val_harmless_n; /* harmless ones                                                */
    int32_t val_max_new_tokens;
    int32_t val_batch;      /* prompts generated together                                   */
    /* checkpoints: NULL: none */
    const char *out_dir;
    /* callbacks (may be NULL) */
    sf_train_event_fn on_event;
    void *user;
    sf_train_judge_fn judge; /* NULL: sf_judge_refusal on the decoded text (needs a
                                tokenizer; without one no generation is judged)             */
    void *judge_user;
} sf_train_options;

/* The defaults (docs/SYSFORMER.md "Training"): w_ref 1, w_compl 1, w_class 1, w_recon 0;
 * 10 epochs, 1024 batch tokens, lr 1e-4, cosine to 0 after a 5% warm-up, AdamW betas
 * (0.9, 0.999), eps 1e-8, weight decay 0.01, clipping at 1.0, seed 0; validation judges 16 +
 * 16 prompts with 32 new tokens, 8 at a time, and runs before training too. */
sf_train_options sf_train_default_options(void);

/* The learning rate of 0-based step `step` of total_steps (warm-up: lr * (step + 1) / W for
 * step < W; then constant, or cosine lr_min + (lr - lr_min)(1 + cos(pi (step - W) /
 * (total - W))) / 2). warmup is the resolved number of warm-up steps. */
double sf_train_lr_at(const sf_train_options *o, int64_t step, int64_t total_steps,
                      int64_t warmup);

/* Scales g in place so that its global L2 norm is at most max_norm (PyTorch's
 * clip_grad_norm_: factor max_norm / (norm + 1e-6) when that is below 1); max_norm <= 0 leaves
 * g alone. Returns the norm before clipping. */
double sf_clip_grad_norm(float *g, int64_t n, double max_norm);

/* One AdamW step (PyTorch's torch.optim.AdamW): w -= lr wd w; m = b1 m + (1 - b1) g;
 * v = b2 v + (1 - b2) g^2; w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
 * t is the 1-based step count. */
void sf_adamw_step(float *w, const float *g, float *m, float *v, int64_t n, double lr,
                   const sf_adamw *hp, int64_t t);

/* ---------------------------------------------------------------------------------------- */
/* The trainer                                                                              */
/* ---------------------------------------------------------------------------------------- */

typedef struct sf_trainer sf_trainer;

/* Sets up training of sf (updated in place; it must have a classifier head when w_class > 0)
 * against the frozen llm on train (and, when val is not NULL, validation on val). llm, sf,
 * tok, the sets and the options' strings must outlive the trainer. tok (may be NULL) decodes
 * the validation generations for the judge; stop_ids end them. Fails with
 * SF_ERR_INVALID_ARGUMENT for an empty training set, ids outside the vocabulary, examples
 * longer than the context window, or absurd options. With device SF_TRAIN_CUDA it also sets up
 * the GPU step (sized for the longest batch) and fails as sf_cuda_train_create does
 * (SF_ERR_NO_DEVICE without a GPU or a CUDA build, SF_ERR_UNSUPPORTED for shapes the GPU path
 * lacks, e.g. the SystemEmbedder baseline). */
sf_status sf_trainer_create(const sf_llm *llm, sf_sysformer *sf, const sf_tokenizer *tok,
                            const int32_t *stop_ids, int32_t n_stop_ids,
                            const sf_train_set *train, const sf_train_set *val,
                            const sf_train_options *options, sf_trainer **out);

void sf_trainer_free(sf_trainer *t);

/* Restores the state a checkpoint in dir recorded (weights, AdamW moments, step, epoch,
 * position in the epoch, shuffle state), so that continuing gives exactly what never stopping
 * would have. SF_ERR_CONFIG when the checkpoint was made for other data, seed or Sysformer
 * shape. */
sf_status sf_trainer_resume(sf_trainer *t, const char *dir);

/* Trains until every epoch is done, or max_steps (> 0) more steps were taken, or a callback
 * asked to stop. Validates and (with out_dir) checkpoints after every epoch, and checkpoints
 * when stopping early. *finished (may be NULL) says whether training is complete. */
sf_status sf_trainer_run(sf_trainer *t, int64_t max_steps, bool *finished);

/* Validation now: the losses over the whole validation set and the refusal rates; the result
 * goes to *out (kind VALIDATION) and not to the callback. */
sf_status sf_trainer_validate(sf_trainer *t, sf_train_event *out);

/* Writes the checkpoint now: dir/sysformer.json + dir/sysformer.safetensors (sf_sysformer_save)
 * and dir/train_state.safetensors (written to a temporary name, then renamed). */
sf_status sf_trainer_checkpoint(sf_trainer *t, const char *dir);

/* The memory a trainer's steps hold, planned at creation for its largest batch. */
typedef struct sf_train_memory {
    int32_t max_rows;     /* packed rows of the largest batch (batch_tokens, or the longest
                             example when that is longer)                                  */
    bool recompute;       /* the option the plan was made with                             */
    size_t activations;   /* CPU: the LLM backward's saved activations for max_rows
                             (sf_llm_backward_bytes); GPU: the whole device activation arena
                             (LLM and Sysformer activations, gradients in flight, scratch)  */
    size_t optimizer;     /* host: the gradients and AdamW's m and v, fp32 (the GPU path
                             keeps them too, as the copies it synchronises into)           */
    size_t optimizer_device; /* GPU: the device's gradients, m and v (fp32) and the gradient
                             norm's scratch, part of device_total; CPU: 0                  */
    size_t device_total;  /* GPU: every device byte (frozen LLM, Sysformer with its master
                             weights and optimizer state, activations); CPU: 0             */
} sf_train_memory;

sf_status sf_trainer_memory(const sf_trainer *t, sf_train_memory *out);

/* The gradient the last step applied (after clipping), in sf_sysformer_flat's order: for
 * checking the losses' wiring against finite differences. NULL before the first step, and
 * (with SF_TRAIN_CUDA, which copies it from the device here) when that copy fails. */
const float *sf_trainer_last_gradient(sf_trainer *t, int64_t *n);

int64_t sf_trainer_step(const sf_trainer *t);
int64_t sf_trainer_total_steps(const sf_trainer *t);
int32_t sf_trainer_epoch(const sf_trainer *t);

/* ---------------------------------------------------------------------------------------- */
/* The text level                                                                           */
/* ---------------------------------------------------------------------------------------- */

/* Prompts read from a dataset, with their desired replies when known. */
typedef struct sf_prompt_set {
    int32_t n;
    char **prompt;      /* [n] the user text                                          */
    char **response;    /* [n] the desired reply text, or NULL entries                 */
    int32_t **reply_ids;/* [n] the reply as token ids (generated), or NULL entries     */
    int32_t *n_reply;   /* [n]                                                         */
    bool *reply_ended;  /* [n] the reply ended by itself (not cut at a length limit)  */
} sf_prompt_set;

/* Reads a JSON list of objects with a string "instruction" (or "prompt"), an optional
 * non-empty "input" (appended after a blank line, as Alpaca does) and an optional desired
 * reply in "response" or "output". With 0 < max_n < the list's length, max_n rows are taken,
 * chosen by a seeded shuffle. SF_ERR_IO: unreadable; SF_ERR_FORMAT: not JSON, not a list, a
 * row not an object or a field of the wrong type; SF_ERR_NOT_FOUND: a row without an
 * instruction; SF_ERR_INVALID_ARGUMENT: no rows. Messages name the file and the row. */
sf_status sf_prompt_set_read(const char *path, int32_t max_n, uint64_t seed, sf_prompt_set *out);

/* out = every prompt wrapped in one jailbreak wrapper of wrappers (eval/eval.h), chosen
 * uniformly by a generator seeded with seed among the wrappers NOT held out (those are kept
 * for evaluation only). SF_ERR_INVALID_ARGUMENT when every wrapper is held out. */
struct sf_jailbreak_set;
sf_status sf_prompt_set_wrap(const sf_prompt_set *prompts,
                             const struct sf_jailbreak_set *wrappers, uint64_t seed,
                             sf_prompt_set *out);

void sf_prompt_set_free(sf_prompt_set *set);

/* How prompts become token ids. */
typedef struct sf_train_text {
    const sf_tokenizer *tok;
    sf_template_id tmpl;
    const char *system;    /* the default system prompt (the Sysformer rewrites it)   */
    const char *refusal;   /* the reply harmful prompts are trained towards           */
    int32_t max_tokens;    /* longest example kept (prompt + reply; replies are cut to
                              fit, prompts that alone pass it are skipped)            */
} sf_train_text;

/* The template's end-of-turn id in this tokenizer, or -1. */
int32_t sf_train_end_of_turn(const sf_train_text *tx);

/* Gives every prompt without a reply the frozen LLM's own greedy reply with the default system
 * prompt (sf_generate_cpu, no Sysformer, at most max_new_tokens), reusing replies cached in
 * cache_path (a JSONL file: one {"prompt", "system", "template", "llm", "max_new_tokens",
 * "ids", "ended", "response"} object per line, "llm" the embedding hash) and appending the new
 * ones. *n_generated (may be NULL) receives how many were generated now. */
sf_status sf_train_fill_completions(const sf_llm *llm, const sf_train_text *tx,
                                    sf_prompt_set *prompts, int32_t max_new_tokens,
                                    int32_t batch, const char *cache_path,
                                    sf_train_event_fn on_event, void *user,
                                    int32_t *n_generated);

/* Encodes every prompt into set: harmful ones with tx->refusal as the reply, harmless ones
 * with their reply (ids, else the response text, else none), each reply followed by the
 * template's end-of-turn id (generated replies only when they ended by themselves).
 * *n_skipped (may be NULL) counts prompts too long for tx->max_tokens. */
sf_status sf_train_set_add_prompts(sf_train_set *set, const sf_train_text *tx,
                                   const sf_prompt_set *prompts, bool harmful,
                                   int32_t *n_skipped);

#ifdef __cplusplus
}
#endif

#endif
