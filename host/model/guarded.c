/* Guarded prompts: a chat prompt's five spans, the Sysformer rewrite of each request's system
 * span, and the LLM prefill from the resulting input embeddings. */
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "cpu/ops.h"
#include "model/llm.h"
#include "sysformer/module.h"

sf_status sf_assemble_prompt(const sf_chat_template *t, const int32_t *system_ids,
                             int32_t n_system, const int32_t *user_ids, int32_t n_user,
                             int32_t *out_ids, int32_t capacity, sf_prompt_spans *spans) {
    if (!t || !spans || n_system < 0 || n_user < 0 || capacity < 0 || t->n_prefix < 0 ||
        t->n_middle < 0 || t->n_suffix < 0 || (n_system && !system_ids) || (n_user && !user_ids)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_assemble_prompt: bad argument");
    }
    const int64_t total =
        (int64_t)t->n_prefix + n_system + t->n_middle + n_user + (int64_t)t->n_suffix;
    if (total > capacity) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "sf_assemble_prompt: the prompt has %lld tokens; the buffer holds %d",
                       (long long)total, capacity);
    }
    const int32_t *pieces[5] = {t->prefix, system_ids, t->middle, user_ids, t->suffix};
    const int32_t lens[5] = {t->n_prefix, n_system, t->n_middle, n_user, t->n_suffix};
    int32_t at = 0;
    for (int i = 0; i < 5; i++) {
        if (lens[i] && !pieces[i]) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_assemble_prompt: a template piece is NULL");
        }
        if (lens[i]) memcpy(out_ids + at, pieces[i], (size_t)lens[i] * sizeof(int32_t));
        at += lens[i];
    }
    spans->prefix = t->n_prefix;
    spans->system = n_system;
    spans->middle = t->n_middle;
    spans->user = n_user;
    spans->suffix = t->n_suffix;
    return SF_OK;
}

static sf_status validate(const sf_llm *llm, const sf_sysformer *sf, const sf_guarded_batch *b) {
    if (!llm || !b || b->n_requests < 0 || !b->cu_seqlens || (b->n_requests > 0 && !b->spans)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_guarded: NULL model or batch arrays");
    }
    if (sf && sf->cfg.d_model != llm->cfg.hidden_size) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_guarded: the Sysformer's d_model %d is not the "
                       "LLM's hidden size %d", sf->cfg.d_model, llm->cfg.hidden_size);
    }
    for (int32_t r = 0; r < b->n_requests; r++) {
        const sf_prompt_spans *s = &b->spans[r];
        const int64_t n = (int64_t)b->cu_seqlens[r + 1] - b->cu_seqlens[r];
        if (s->prefix < 0 || s->system < 0 || s->middle < 0 || s->user < 0 || s->suffix < 0 ||
            (int64_t)s->prefix + s->system + s->middle + s->user + s->suffix != n) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_guarded: request %d's spans (%d | %d | %d | %d | %d) do not add up "
                           "to its %lld tokens",
                           r, s->prefix, s->system, s->middle, s->user, s->suffix, (long long)n);
        }
        /* A request with no system span has nothing to rewrite: it may continue its cache (the
         * next chunk or token of a request already running, beside new guarded prompts). */
        if (s->system > 0 && b->kv_caches && b->kv_caches[r] && b->kv_caches[r]->length != 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_guarded: request %d's KV cache is not empty (%d positions): a "
                           "guarded prompt (a system span) is a fresh prefill",
                           r, b->kv_caches[r]->length);
        }
    }
    return SF_OK;
}

sf_status sf_guarded_embed_cpu(const sf_llm *llm, const sf_sysformer *sf,
                               const sf_guarded_batch *b, float *embeds) {
    sf_status st = validate(llm, sf, b);
    if (st != SF_OK) return st;
    const int64_t d = llm->cfg.hidden_size;
    const int32_t total = b->cu_seqlens[b->n_requests];
    if (total > 0 && (!b->token_ids || !embeds)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_guarded_embed_cpu: NULL ids or output");
    }
    /* Checks the ids (including cu_seqlens[0] == 0 and monotonicity via the spans above). */
    if (b->cu_seqlens[0] != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_guarded: cu_seqlens[0] = %d, not 0",
                       b->cu_seqlens[0]);
    }
    st = sf_llm_embed(llm, b->token_ids, total, embeds);
    if (st != SF_OK || !sf) return st;

    /* Gather every request's system and user rows into packed buffers, rewrite, scatter back. */
    int32_t *cu_s = malloc((size_t)(b->n_requests + 1) * sizeof(int32_t));
    int32_t *cu_u = malloc((size_t)(b->n_requests + 1) * sizeof(int32_t));
    int64_t ts = 0, tu = 0;
    for (int32_t r = 0; r < b->n_requests; r++) {
        ts += b->spans[r].system;
        tu += b->spans[r].user;
    }
    float *sys = malloc((size_t)(ts * d + 1) * sizeof(float));
    float *usr = malloc((size_t)(tu * d + 1) * sizeof(float));
    if (!cu_s || !cu_u || !sys || !usr) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_guarded_embed_cpu: out of memory");
    } else {
        cu_s[0] = cu_u[0] = 0;
        for (int32_t r = 0; r < b->n_requests; r++) {
            const sf_prompt_spans *s = &b->spans[r];
            const int64_t sys_row = (int64_t)b->cu_seqlens[r] + s->prefix;
            const int64_t usr_row = sys_row + s->system + s->middle;
            cu_s[r + 1] = cu_s[r] + s->system;
            cu_u[r + 1] = cu_u[r] + s->user;
            memcpy(sys + (int64_t)cu_s[r] * d, embeds + sys_row * d,
                   (size_t)((int64_t)s->system * d) * sizeof(float));
            memcpy(usr + (int64_t)cu_u[r] * d, embeds + usr_row * d,
                   (size_t)((int64_t)s->user * d) * sizeof(float));
        }
        sf_rewrite_batch rb = {b->n_requests, cu_s, cu_u, sys, usr};
        st = sf_sysformer_forward_cpu(sf, &rb, sys);
        for (int32_t r = 0; st == SF_OK && r < b->n_requests; r++) {
            const int64_t sys_row = (int64_t)b->cu_seqlens[r] + b->spans[r].prefix;
            memcpy(embeds + sys_row * d, sys + (int64_t)cu_s[r] * d,
                   (size_t)((int64_t)b->spans[r].system * d) * sizeof(float));
        }
    }
    free(cu_s);
    free(cu_u);
    free(sys);
    free(usr);
    return st;
}

sf_status sf_guarded_forward_cpu(const sf_llm *llm, const sf_sysformer *sf,
                                 const sf_guarded_batch *b, float *logits) {
    sf_status st = validate(llm, sf, b);
    if (st == SF_OK) st = sf_llm_check_whole(llm, "sf_guarded_forward_cpu");
    if (st != SF_OK) return st;
    const int32_t total = b->cu_seqlens[b->n_requests];
    float *embeds = malloc(((size_t)total * (size_t)llm->cfg.hidden_size + 1) * sizeof(float));
    if (!embeds) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_guarded_forward_cpu: out of memory");
    st = sf_guarded_embed_cpu(llm, sf, b, embeds);
    if (st == SF_OK) {
        sf_batch lb = {b->n_requests, b->cu_seqlens, NULL,         embeds,
                       b->kv_caches,  b->n_logit_rows, b->logit_rows};
        st = sf_llm_forward_cpu(llm, &lb, logits);
    }
    free(embeds);
    return st;
}
