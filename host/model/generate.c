/* Sampling and batched generation on the CPU path.
 *
 * One packed prefill for all prompts (guarded when a Sysformer is given), then decode steps
 * that batch one token of every request still running; a request that stops simply leaves the
 * next step's batch. Each request owns its KV cache, RNG stream and detokenizer. The stop rules,
 * streaming and finish reasons are model/generation.c's, shared with sf_generate_cuda; only the
 * context rule is this file's: a request ends when its cache is full. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "cpu/ops.h"
#include "model/generation.h"
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
    /* logit / inf is 0 for every finite logit: a tie of all the vocabulary, which the sort
     * would break by id and the device sampler by logit. Refused everywhere instead. */
    if (s->temperature == INFINITY) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sample: the temperature is infinite");
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
    free(r->logprobs);
    free(r->top_ids);
    free(r->top_logprobs);
    free(r->text);
    memset(r, 0, sizeof *r);
}

static const char who[] = "sf_generate_cpu";

/* How full a request's cache is: it is min(prompt + max_new_tokens, max_position_embeddings)
 * long, so running out of it ends the request for length unless it spans the model's window. */
static sf_gen_room room_of(const sf_llm *llm, const sf_kv_cache *cache) {
    return (sf_gen_room){sf_kv_cache_length(cache), sf_kv_cache_capacity(cache),
                         llm->cfg.max_position_embeddings};
}

/* Request r's next token from its row of logits, with its scores when asked. */
static sf_status pick(const sf_gen_ctx *c, int32_t r, const float *logits, int32_t vocab,
                      sf_gen_room room, sf_gen_request *rq, sf_generation_result *res) {
    int32_t t, top_ids[SF_MAX_TOP_LOGPROBS];
    float top_lp[SF_MAX_TOP_LOGPROBS];
    sf_gen_scores scores = {0.0f, top_ids, top_lp};
    const sf_sampling *s = rq->sampling;
    sf_status st = sf_sample(logits, vocab, s, &rq->rng, &t);
    if (st == SF_OK && sf_gen_wants_scores(s)) {
        st = sf_cpu_token_scores(logits, vocab, t, s->top_logprobs, &scores.logprob, top_ids,
                                 top_lp);
    }
    return st == SF_OK ? sf_gen_accept(c, r, t, &scores, room, rq, res) : st;
}

sf_status sf_generate_cpu(const sf_llm *llm, const sf_sysformer *sf, const sf_tokenizer *tok,
                          const sf_generation *g, sf_stream_fn stream, void *user,
                          sf_generation_result *results) {
    sf_status st = sf_gen_check_args(who, llm != NULL, sf != NULL, tok, g, results);
    if (st == SF_OK) st = sf_llm_check_whole(llm, who);
    if (st == SF_OK) {
        st = sf_gen_check_prompts(who, g, llm->cfg.max_position_embeddings,
                                  "the model's context window");
    }
    if (st != SF_OK) return st;
    const sf_gen_ctx c = {who, g, stream, user};
    const int32_t n = g->n_requests;
    const int32_t vocab = llm->cfg.vocab_size;
    memset(results, 0, (size_t)n * sizeof *results);
    if (n == 0) return SF_OK;

    sf_gen_request *rq = calloc((size_t)n, sizeof *rq);
    sf_kv_cache **own = calloc((size_t)n, sizeof *own); /* request r's cache */
    sf_kv_cache **caches = calloc((size_t)n, sizeof *caches);
    int32_t *rows = malloc((size_t)n * sizeof *rows);
    int32_t *step_cu = malloc((size_t)(n + 1) * sizeof *step_cu);
    int32_t *step_ids = malloc((size_t)n * sizeof *step_ids);
    int32_t *active = malloc((size_t)n * sizeof *active);
    float *logits = malloc((size_t)n * (size_t)vocab * sizeof *logits);
    if (!rq || !own || !caches || !rows || !step_cu || !step_ids || !active || !logits) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cpu: out of memory");
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        const int32_t len = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        int64_t cap = (int64_t)len + sf_gen_max_new(g, r);
        if (cap > llm->cfg.max_position_embeddings) cap = llm->cfg.max_position_embeddings;
        st = sf_kv_cache_create(llm, (int32_t)cap, &own[r]);
        caches[r] = own[r];
        st = sf_gen_request_init(&c, st, tok, r, llm->cfg.max_position_embeddings, &rq[r],
                                 &results[r]);
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
        st = pick(&c, r, logits + (size_t)r * vocab, vocab, room_of(llm, own[r]), &rq[r],
                  &results[r]);
    }

    /* Decode: one row per request still running. */
    while (st == SF_OK) {
        int32_t m = 0;
        for (int32_t r = 0; r < n; r++) {
            if (rq[r].done) continue;
            active[m] = r;
            step_ids[m] = rq[r].last;
            caches[m] = own[r];
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
            st = pick(&c, r, logits + (size_t)i * vocab, vocab, room_of(llm, own[r]), &rq[r],
                      &results[r]);
        }
    }

    for (int32_t r = 0; own && r < n; r++) sf_kv_cache_free(own[r]);
    st = sf_gen_end(&c, st, n, rq, results);
    free(rq);
    free(own);
    free(caches);
    free(rows);
    free(step_cu);
    free(step_ids);
    free(active);
    free(logits);
    return st;
}
