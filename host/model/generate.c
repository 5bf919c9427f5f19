/* Sampling and batched generation on the CPU path.
 *
 * One packed prefill for all prompts (guarded when a Sysformer is given), then decode steps
 * that batch one token of every request still running; a request that stops simply leaves the
 * next step's batch. Each request owns its KV cache, RNG stream and detokenizer. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "model/llm.h"

typedef struct scored {
    double logit;
    int32_t id;
} scored;

/* Descending by logit, ascending by id on ties, so the order is total and reproducible. */
static int by_logit_desc(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

sf_status sf_sample(const float *logits, int32_t vocab, const sf_sampling *s, uint64_t *rng_state,
                    int32_t *token) {
    if (!logits || vocab < 1 || !s || !rng_state || !token) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sample: bad argument");
    }
    if (!(s->temperature > 0.0f)) {
        int32_t best = 0;
        for (int32_t i = 1; i < vocab; i++) best = logits[i] > logits[best] ? i : best;
        *token = best;
        return SF_OK;
    }
    scored *c = malloc((size_t)vocab * sizeof *c);
    if (!c) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sample: out of memory");
    for (int32_t i = 0; i < vocab; i++) c[i] = (scored){(double)logits[i] / s->temperature, i};
    qsort(c, (size_t)vocab, sizeof *c, by_logit_desc);
    int32_t keep = vocab;
    if (s->top_k > 0 && s->top_k < keep) keep = s->top_k;
    /* Probabilities over the kept tokens, max subtracted; then the nucleus: the shortest
     * prefix of the sorted list whose mass reaches top_p (always at least one token). */
    const double max = c[0].logit;
    double total = 0.0;
    for (int32_t i = 0; i < keep; i++) {
        c[i].logit = exp(c[i].logit - max); /* c[i].logit now holds a weight */
        total += c[i].logit;
    }
    if (s->top_p > 0.0f && s->top_p < 1.0f) {
        double mass = 0.0;
        int32_t n = 0;
        while (n < keep) {
            mass += c[n].logit / total;
            n++;
            if (mass >= s->top_p) break;
        }
        keep = n;
        total = 0.0;
        for (int32_t i = 0; i < keep; i++) total += c[i].logit;
    }
    sf_rng rng = sf_rng_seed(*rng_state);
    const double u = sf_rng_uniform(&rng) * total;
    *rng_state = rng.state;
    double acc = 0.0;
    int32_t pick = c[keep - 1].id; /* rounding can leave u just above the last sum */
    for (int32_t i = 0; i < keep; i++) {
        acc += c[i].logit;
        if (u < acc) {
            pick = c[i].id;
            break;
        }
    }
    free(c);
    *token = pick;
    return SF_OK;
}

void sf_generation_result_free(sf_generation_result *r) {
    if (!r) return;
    free(r->tokens);
    free(r->text);
    memset(r, 0, sizeof *r);
}

/* Per-request state while generating. */
typedef struct request_state {
    sf_kv_cache *cache;
    sf_detokenizer *detok;
    uint64_t rng;
    int32_t last;     /* the token to feed next */
    bool done;
    char *text;       /* decoded so far */
    size_t text_len, text_cap;
} request_state;

static sf_status text_append(request_state *rs, const char *s, size_t n) {
    if (rs->text_len + n + 1 > rs->text_cap) {
        size_t cap = rs->text_cap ? rs->text_cap * 2 : 256;
        while (cap < rs->text_len + n + 1) cap *= 2;
        char *grown = realloc(rs->text, cap);
        if (!grown) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cpu: out of memory");
        rs->text = grown;
        rs->text_cap = cap;
    }
    memcpy(rs->text + rs->text_len, s, n);
    rs->text_len += n;
    rs->text[rs->text_len] = '\0';
    return SF_OK;
}

static bool ends_with_stop_string(const request_state *rs, const sf_generation *g,
                                  size_t *stop_len) {
    for (int32_t i = 0; i < g->n_stop_strings; i++) {
        const size_t n = strlen(g->stop_strings[i]);
        if (n && rs->text_len >= n && !memcmp(rs->text + rs->text_len - n, g->stop_strings[i], n)) {
            *stop_len = n;
            return true;
        }
    }
    return false;
}

/* Records one sampled token for request r and decides whether it finishes the request. */
static sf_status accept_token(const sf_llm *llm, const sf_generation *g, sf_stream_fn stream, void *user, int32_t r,
                              int32_t token, request_state *rs, sf_generation_result *res) {
    for (int32_t i = 0; i < g->n_stop_ids; i++) {
        if (token == g->stop_ids[i]) {
            rs->done = true;
            res->finish = SF_FINISH_STOP_TOKEN;
            return SF_OK;
        }
    }
    res->tokens[res->n_tokens++] = token;
    rs->last = token;
    char piece[256];
    size_t piece_len = 0;
    if (rs->detok) {
        sf_status st = sf_detokenizer_push(rs->detok, token, piece, sizeof piece, &piece_len);
        if (st == SF_OK) st = text_append(rs, piece, piece_len);
        if (st != SF_OK) return st;
    }
    if (stream && !stream(user, r, token, rs->detok ? piece : NULL, piece_len)) {
        rs->done = true;
        res->finish = SF_FINISH_CALLBACK;
        return SF_OK;
    }
    size_t stop_len = 0;
    if (rs->detok && ends_with_stop_string(rs, g, &stop_len)) {
        rs->text_len -= stop_len;
        rs->text[rs->text_len] = '\0';
        rs->done = true;
        res->finish = SF_FINISH_STOP_STRING;
    } else if (res->n_tokens >= g->max_new_tokens) {
        rs->done = true;
        res->finish = SF_FINISH_LENGTH;
    } else if (sf_kv_cache_length(rs->cache) >= sf_kv_cache_capacity(rs->cache)) {
        rs->done = true;
        res->finish = llm->cfg.max_position_embeddings == sf_kv_cache_capacity(rs->cache)
                          ? SF_FINISH_CONTEXT
                          : SF_FINISH_LENGTH;
    }
    return SF_OK;
}

static sf_status validate(const sf_llm *llm, const sf_sysformer *sf, const sf_tokenizer *tok,
                          const sf_generation *g, const sf_generation_result *results) {
    if (!llm || !g || !results || g->n_requests < 0 || !g->cu_seqlens || !g->token_ids) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cpu: NULL argument");
    }
    if (g->max_new_tokens < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cpu: max_new_tokens = %d",
                       g->max_new_tokens);
    }
    if (sf && !g->spans) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_generate_cpu: a Sysformer needs each prompt's spans");
    }
    if (g->n_stop_strings > 0 && !tok) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cpu: stop strings need a tokenizer");
    }
    if ((g->n_stop_ids > 0 && !g->stop_ids) || (g->n_stop_strings > 0 && !g->stop_strings)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cpu: NULL stop list");
    }
    const int32_t max_pos = llm->cfg.max_position_embeddings;
    for (int32_t r = 0; r < g->n_requests; r++) {
        const int32_t n = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        if (n < 1) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cpu: prompt %d is empty", r);
        }
        if (n >= max_pos) {
            return sf_fail(SF_ERR_OUT_OF_RANGE,
                           "prompt %d has %d tokens; the model's context window is %d, leaving "
                           "no room to generate (shorten the prompt)",
                           r, n, max_pos);
        }
    }
    return SF_OK;
}

sf_status sf_generate_cpu(const sf_llm *llm, const sf_sysformer *sf, const sf_tokenizer *tok,
                          const sf_generation *g, sf_stream_fn stream, void *user,
                          sf_generation_result *results) {
    sf_status st = validate(llm, sf, tok, g, results);
    if (st != SF_OK) return st;
    const int32_t n = g->n_requests;
    const int32_t vocab = llm->cfg.vocab_size;
    memset(results, 0, (size_t)n * sizeof *results);
    if (n == 0) return SF_OK;

    request_state *rs = calloc((size_t)n, sizeof *rs);
    sf_kv_cache **caches = calloc((size_t)n, sizeof *caches);
    int32_t *rows = malloc((size_t)n * sizeof *rows);
    int32_t *step_cu = malloc((size_t)(n + 1) * sizeof *step_cu);
    int32_t *step_ids = malloc((size_t)n * sizeof *step_ids);
    int32_t *active = malloc((size_t)n * sizeof *active);
    float *logits = malloc((size_t)n * (size_t)vocab * sizeof *logits);
    if (!rs || !caches || !rows || !step_cu || !step_ids || !active || !logits) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cpu: out of memory");
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        const int32_t len = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        int64_t cap = (int64_t)len + g->max_new_tokens;
        if (cap > llm->cfg.max_position_embeddings) cap = llm->cfg.max_position_embeddings;
        st = sf_kv_cache_create(llm, (int32_t)cap, &rs[r].cache);
        caches[r] = rs[r].cache;
        rs[r].rng = g->sampling.seed;
        results[r].tokens = malloc((size_t)g->max_new_tokens * sizeof(int32_t));
        if (st == SF_OK && !results[r].tokens) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cpu: out of memory");
        }
        if (st == SF_OK && tok) st = sf_detokenizer_create(tok, true, &rs[r].detok);
        rows[r] = g->cu_seqlens[r + 1] - 1;
    }

    /* Prefill every prompt in one packed call, logits of each prompt's last row. */
    if (st == SF_OK) {
        if (sf) {
            sf_guarded_batch gb = {n, g->cu_seqlens, g->token_ids, g->spans, caches, n, rows};
            st = sf_guarded_forward_cpu(llm, sf, &gb, logits);
        } else {
            sf_batch b = {n, g->cu_seqlens, g->token_ids, NULL, caches, n, rows};
            st = sf_llm_forward_cpu(llm, &b, logits);
        }
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        int32_t t;
        st = sf_sample(logits + (size_t)r * vocab, vocab, &g->sampling, &rs[r].rng, &t);
        if (st == SF_OK) st = accept_token(llm, g, stream, user, r, t, &rs[r], &results[r]);
    }

    /* Decode: one row per request still running. */
    while (st == SF_OK) {
        int32_t m = 0;
        for (int32_t r = 0; r < n; r++) {
            if (rs[r].done) continue;
            active[m] = r;
            step_ids[m] = rs[r].last;
            caches[m] = rs[r].cache;
            rows[m] = m;
            step_cu[m] = m;
            m++;
        }
        if (m == 0) break;
        step_cu[m] = m;
        sf_batch b = {m, step_cu, step_ids, NULL, caches, m, rows};
        st = sf_llm_forward_cpu(llm, &b, logits);
        for (int32_t i = 0; st == SF_OK && i < m; i++) {
            const int32_t r = active[i];
            int32_t t;
            st = sf_sample(logits + (size_t)i * vocab, vocab, &g->sampling, &rs[r].rng, &t);
            if (st == SF_OK) st = accept_token(llm, g, stream, user, r, t, &rs[r], &results[r]);
        }
    }

    for (int32_t r = 0; rs && r < n; r++) {
        if (st == SF_OK && rs[r].detok) {
            char tail[64];
            size_t tail_len = 0;
            if (results[r].finish != SF_FINISH_STOP_STRING &&
                sf_detokenizer_flush(rs[r].detok, tail, sizeof tail, &tail_len) == SF_OK) {
                st = text_append(&rs[r], tail, tail_len);
            }
            if (st == SF_OK && !rs[r].text) st = text_append(&rs[r], "", 0);
            results[r].text = rs[r].text;
            rs[r].text = NULL;
        }
        free(rs[r].text);
        sf_detokenizer_free(rs[r].detok);
        sf_kv_cache_free(rs[r].cache);
    }
    if (st != SF_OK) {
        for (int32_t r = 0; r < n; r++) sf_generation_result_free(&results[r]);
    }
    free(rs);
    free(caches);
    free(rows);
    free(step_cu);
    free(step_ids);
    free(active);
    free(logits);
    return st;
}
