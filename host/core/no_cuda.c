/* The CUDA entry points of a build without CUDA: they say so instead of failing to link. */
#include <string.h>

#include "core/error.h"
#include "cuda/train.h"
#include "sysformer.h"

bool sf_cuda_built(void) { return false; }

sf_status sf_cuda_device_count(int *count) {
    if (count) *count = 0;
    return SF_OK;
}

static sf_status no_cuda(const char *fn) {
    return sf_fail(SF_ERR_NO_DEVICE, "%s: libsysformer was built without CUDA", fn);
}

sf_cuda_engine_options sf_cuda_engine_default_options(void) {
    sf_cuda_engine_options o;
    memset(&o, 0, sizeof o);
    o.max_slots = 8;
    o.cuda_graphs = true;
    o.attention = SF_ATTENTION_AUTO;
    o.embedding_dtype = SF_EMBEDDING_BF16;
    return o;
}

sf_status sf_cuda_engine_create(const sf_llm *llm, const sf_sysformer *sysformer,
                                const sf_cuda_engine_options *options, sf_cuda_engine **out) {
    (void)llm, (void)sysformer, (void)options;
    if (out) *out = NULL;
    return no_cuda("sf_cuda_engine_create");
}

sf_status sf_cuda_engine_create_random(const sf_llm_config *llm_cfg,
                                       const sf_sysformer_config *sysformer_cfg, uint64_t seed,
                                       const sf_cuda_engine_options *options,
                                       sf_cuda_engine **out) {
    (void)llm_cfg, (void)sysformer_cfg, (void)seed, (void)options;
    if (out) *out = NULL;
    return no_cuda("sf_cuda_engine_create_random");
}

sf_status sf_cuda_engine_create_sharing(const sf_cuda_engine *base, const sf_sysformer *sysformer,
                                        const sf_cuda_engine_options *options,
                                        sf_cuda_engine **out) {
    (void)base, (void)sysformer, (void)options;
    if (out) *out = NULL;
    return no_cuda("sf_cuda_engine_create_sharing");
}

void sf_cuda_engine_free(sf_cuda_engine *engine) { (void)engine; }

sf_status sf_cuda_engine_set_sysformer(sf_cuda_engine *engine, const sf_sysformer *sysformer) {
    (void)engine, (void)sysformer;
    return no_cuda("sf_cuda_engine_set_sysformer");
}

sf_status sf_cuda_engine_memory(const sf_cuda_engine *engine, sf_cuda_memory *out) {
    (void)engine, (void)out;
    return no_cuda("sf_cuda_engine_memory");
}

sf_status sf_cuda_engine_plan(const sf_llm_config *llm_cfg,
                              const sf_sysformer_config *sysformer_cfg,
                              const sf_cuda_engine_options *options, sf_cuda_memory *out) {
    (void)llm_cfg, (void)sysformer_cfg, (void)options;
    if (out) memset(out, 0, sizeof *out);
    return no_cuda("sf_cuda_engine_plan");
}

void *sf_cuda_engine_stream(const sf_cuda_engine *engine) {
    (void)engine;
    return NULL;
}

int32_t sf_cuda_engine_slot_length(const sf_cuda_engine *engine, int32_t slot) {
    (void)engine, (void)slot;
    return -1;
}

sf_status sf_cuda_engine_reset_slot(sf_cuda_engine *engine, int32_t slot) {
    (void)engine, (void)slot;
    return no_cuda("sf_cuda_engine_reset_slot");
}

sf_status sf_cuda_engine_step(sf_cuda_engine *engine, const sf_cuda_step *step) {
    (void)engine, (void)step;
    return no_cuda("sf_cuda_engine_step");
}

sf_status sf_cuda_engine_read_tokens(sf_cuda_engine *engine, int32_t *tokens, int32_t n) {
    (void)engine, (void)tokens, (void)n;
    return no_cuda("sf_cuda_engine_read_tokens");
}

sf_status sf_cuda_engine_read_logprobs(sf_cuda_engine *engine, float *logprobs, int32_t n) {
    (void)engine, (void)logprobs, (void)n;
    return no_cuda("sf_cuda_engine_read_logprobs");
}

sf_status sf_cuda_engine_read_top_logprobs(sf_cuda_engine *engine, int32_t *ids, float *logprobs,
                                           int32_t n, int32_t k) {
    (void)engine, (void)ids, (void)logprobs, (void)n, (void)k;
    return no_cuda("sf_cuda_engine_read_top_logprobs");
}

sf_status sf_cuda_engine_read_logits(sf_cuda_engine *engine, float *logits, int32_t n) {
    (void)engine, (void)logits, (void)n;
    return no_cuda("sf_cuda_engine_read_logits");
}

sf_status sf_cuda_engine_set_timing(sf_cuda_engine *engine, bool on) {
    (void)engine, (void)on;
    return no_cuda("sf_cuda_engine_set_timing");
}

sf_status sf_cuda_engine_stage_times(sf_cuda_engine *engine, sf_cuda_stage_times *out) {
    (void)engine, (void)out;
    return no_cuda("sf_cuda_engine_stage_times");
}

sf_status sf_cuda_session_create(sf_cuda_engine *engine, const sf_tokenizer *tok,
                                 const int32_t *stop_ids, int32_t n_stop_ids,
                                 const char *const *stop_strings, int32_t n_stop_strings,
                                 sf_cuda_session **out) {
    (void)engine, (void)tok, (void)stop_ids, (void)n_stop_ids, (void)stop_strings;
    (void)n_stop_strings;
    if (out) *out = NULL;
    return no_cuda("sf_cuda_session_create");
}

sf_status sf_cuda_session_submit(sf_cuda_session *session, const int32_t *token_ids,
                                 int32_t n_tokens, const sf_prompt_spans *spans,
                                 const sf_sampling *sampling, int32_t max_new_tokens,
                                 int32_t *id) {
    (void)session, (void)token_ids, (void)n_tokens, (void)spans, (void)sampling;
    (void)max_new_tokens, (void)id;
    return no_cuda("sf_cuda_session_submit");
}

sf_status sf_cuda_session_step(sf_cuda_session *session, sf_stream_fn stream, void *user,
                               int32_t *running, int32_t *waiting) {
    (void)session, (void)stream, (void)user, (void)running, (void)waiting;
    return no_cuda("sf_cuda_session_step");
}

sf_status sf_cuda_session_cancel(sf_cuda_session *session, int32_t id) {
    (void)session, (void)id;
    return no_cuda("sf_cuda_session_cancel");
}

sf_status sf_cuda_session_take(sf_cuda_session *session, int32_t id, sf_generation_result *out,
                               bool *done) {
    (void)session, (void)id, (void)out, (void)done;
    return no_cuda("sf_cuda_session_take");
}

sf_status sf_cuda_session_peek(const sf_cuda_session *session, int32_t id,
                               sf_generation_result *view, bool *done) {
    (void)session, (void)id, (void)view, (void)done;
    return no_cuda("sf_cuda_session_peek");
}

void sf_cuda_session_free(sf_cuda_session *session) { (void)session; }

sf_status sf_generate_cuda(sf_cuda_engine *engine, const sf_tokenizer *tok,
                           const sf_generation *gen, sf_stream_fn stream, void *user,
                           sf_generation_result *results) {
    (void)engine, (void)tok, (void)gen, (void)stream, (void)user, (void)results;
    return no_cuda("sf_generate_cuda");
}

sf_status sf_cuda_guarded_embed(sf_cuda_engine *engine, int32_t n_requests, int32_t n_tokens,
                                const int32_t *d_cu_seqlens, const int32_t *d_token_ids,
                                const sf_prompt_spans *d_spans, int32_t max_system,
                                int32_t max_user, void *d_embeds, int *d_errors,
                                void *cuda_stream) {
    (void)engine, (void)n_requests, (void)n_tokens, (void)d_cu_seqlens, (void)d_token_ids;
    (void)d_spans, (void)max_system, (void)max_user, (void)d_embeds, (void)d_errors;
    (void)cuda_stream;
    return no_cuda("sf_cuda_guarded_embed");
}

sf_status sf_cuda_guard_check(sf_cuda_engine *engine, int32_t n_requests, int32_t n_tokens,
                              const int32_t *d_cu_seqlens, const int32_t *d_token_ids,
                              const sf_prompt_spans *d_spans, int32_t max_system,
                              int32_t max_user, int32_t *d_flags, void *cuda_stream) {
    (void)engine, (void)n_requests, (void)n_tokens, (void)d_cu_seqlens, (void)d_token_ids;
    (void)d_spans, (void)max_system, (void)max_user, (void)d_flags, (void)cuda_stream;
    return no_cuda("sf_cuda_guard_check");
}

/* host/cuda/train.h: the GPU training step. */
sf_cuda_train_options sf_cuda_train_default_options(void) {
    sf_cuda_train_options o;
    memset(&o, 0, sizeof o);
    o.max_tokens = 1024;
    o.head_chunk = 256;
    return o;
}

sf_status sf_cuda_train_create(const sf_llm *llm, const sf_sysformer *sf,
                               const sf_cuda_train_options *options, sf_cuda_trainer **out) {
    (void)llm, (void)sf, (void)options;
    if (out) *out = NULL;
    return no_cuda("sf_cuda_train_create");
}

void sf_cuda_train_free(sf_cuda_trainer *t) { (void)t; }

sf_status sf_cuda_train_memory_report(const sf_cuda_trainer *t, sf_cuda_train_memory *out) {
    (void)t, (void)out;
    return no_cuda("sf_cuda_train_memory_report");
}

sf_status sf_cuda_train_plan(const sf_llm *llm, const sf_sysformer *sf,
                             const sf_cuda_train_options *options, sf_cuda_train_memory *out) {
    (void)llm, (void)sf, (void)options;
    if (out) memset(out, 0, sizeof *out);
    return no_cuda("sf_cuda_train_plan");
}

sf_status sf_cuda_train_loss_grad(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                                  sf_llm_loss_result *result, double *recon, float *grads) {
    (void)t, (void)batch, (void)grads;
    if (result) memset(result, 0, sizeof *result);
    if (recon) *recon = 0.0;
    return no_cuda("sf_cuda_train_loss_grad");
}

sf_status sf_cuda_train_loss(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                             sf_llm_loss_result *result, double *recon) {
    (void)t, (void)batch;
    if (result) memset(result, 0, sizeof *result);
    if (recon) *recon = 0.0;
    return no_cuda("sf_cuda_train_loss");
}

sf_status sf_cuda_train_generate(sf_cuda_trainer *t, const sf_tokenizer *tok,
                                 const sf_generation *gen, sf_generation_result *results) {
    (void)t, (void)tok, (void)gen, (void)results;
    return no_cuda("sf_cuda_train_generate");
}

sf_status sf_cuda_train_step(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                             const sf_cuda_train_update *update, sf_llm_loss_result *result,
                             double *recon, double *grad_norm) {
    (void)t, (void)batch, (void)update;
    if (result) memset(result, 0, sizeof *result);
    if (recon) *recon = 0.0;
    if (grad_norm) *grad_norm = 0.0;
    return no_cuda("sf_cuda_train_step");
}

sf_status sf_cuda_train_upload_state(sf_cuda_trainer *t, const float *weights, const float *m,
                                     const float *v) {
    (void)t, (void)weights, (void)m, (void)v;
    return no_cuda("sf_cuda_train_upload_state");
}

sf_status sf_cuda_train_download_state(sf_cuda_trainer *t, float *weights, float *m, float *v,
                                       float *grads) {
    (void)t, (void)weights, (void)m, (void)v, (void)grads;
    return no_cuda("sf_cuda_train_download_state");
}
