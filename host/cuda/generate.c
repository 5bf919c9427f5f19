/* sf_generate_cuda: sf_generate_cpu's loop (host/model/generate.c) driving the CUDA engine.
 *
 * One guarded prefill step over slots 0 .. n-1, then decode steps over the slots of the requests
 * still running; a request that stops simply leaves the next step's slots array. Sampling runs on
 * the device; the host only supplies each request's uniform draw and reads the picked ids back,
 * which it needs anyway to apply the stop rules and to stream text.
 *
 * The per-request bookkeeping (stop ids, stop strings through the detokenizer, streaming, the
 * finish reasons, the final flush) repeats the CPU file's on purpose: both are short, and keeping
 * them side by side line for line is what makes "the same stop rules and results" checkable.
 * The one difference is the context rule: here the window is the engine's max_context. */
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "cuda/engine.h" /* max_context, max_slots accessors; has_sysformer */
#include "sysformer.h"

/* Per-request state while generating. */
typedef struct request_state {
    sf_detokenizer *detok;
    uint64_t rng;     /* the request's own stream, as in sf_generate_cpu */
    int32_t slot;
    int32_t length;   /* positions stored in the slot; the next fed token gets this position */
    bool done;
    char *text;       /* decoded so far */
    size_t text_len, text_cap;
} request_state;

/* The draw sf_sample makes for a non-greedy token, taken from the same stream in the same way:
 * one splitmix64 step, 53 bits, [0, 1). sf_sample then scales it by the kept mass; the device
 * sampler does that scaling itself. */
static double next_uniform(uint64_t *state) {
    sf_rng rng = sf_rng_seed(*state);
    const double u = sf_rng_uniform(&rng);
    *state = rng.state;
    return u;
}

static sf_status text_append(request_state *rs, const char *s, size_t n) {
    if (rs->text_len + n + 1 > rs->text_cap) {
        size_t cap = rs->text_cap ? rs->text_cap * 2 : 256;
        while (cap < rs->text_len + n + 1) cap *= 2;
        char *grown = realloc(rs->text, cap);
        if (!grown) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cuda: out of memory");
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
static sf_status accept_token(int32_t max_context, const sf_generation *g, sf_stream_fn stream,
                              void *user, int32_t r, int32_t token, request_state *rs,
                              sf_generation_result *res) {
    for (int32_t i = 0; i < g->n_stop_ids; i++) {
        if (token == g->stop_ids[i]) {
            rs->done = true;
            res->finish = SF_FINISH_STOP_TOKEN;
            return SF_OK;
        }
    }
    res->tokens[res->n_tokens++] = token;
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
    } else if (rs->length >= max_context) {
        /* The token just accepted has no position left to be fed at. On the CPU the cache is
         * min(prompt + max_new_tokens, max_position_embeddings) long, so only the model's
         * window can end a request here; on the GPU it is the slot's max_context (equal to
         * the model's window unless the engine was created smaller). */
        rs->done = true;
        res->finish = SF_FINISH_CONTEXT;
    }
    return SF_OK;
}

static sf_status validate(const sf_cuda_engine *e, const sf_tokenizer *tok,
                          const sf_generation *g, const sf_generation_result *results) {
    if (!e || !g || !results || g->n_requests < 0 || !g->cu_seqlens || !g->token_ids) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cuda: NULL argument");
    }
    if (g->max_new_tokens < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cuda: max_new_tokens = %d",
                       g->max_new_tokens);
    }
    /* Without this an engine step given no spans would run unguarded, silently. */
    if (e->has_sysformer && !g->spans) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_generate_cuda: a Sysformer needs each prompt's spans");
    }
    if (g->n_stop_strings > 0 && !tok) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cuda: stop strings need a tokenizer");
    }
    if ((g->n_stop_ids > 0 && !g->stop_ids) || (g->n_stop_strings > 0 && !g->stop_strings)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cuda: NULL stop list");
    }
    const int32_t max_slots = sf_cuda_engine_max_slots(e);
    if (g->n_requests > max_slots) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "sf_generate_cuda: %d requests, but the engine holds %d at once (create it "
                       "with max_slots >= %d, or split the batch)",
                       g->n_requests, max_slots, g->n_requests);
    }
    const int32_t max_context = sf_cuda_engine_max_context(e);
    for (int32_t r = 0; r < g->n_requests; r++) {
        const int32_t n = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        if (n < 1) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_generate_cuda: prompt %d is empty", r);
        }
        if (n >= max_context) {
            return sf_fail(SF_ERR_OUT_OF_RANGE,
                           "prompt %d has %d tokens; the engine's context window (max_context) "
                           "is %d, leaving no room to generate (shorten the prompt)",
                           r, n, max_context);
        }
    }
    return SF_OK;
}

sf_status sf_generate_cuda(sf_cuda_engine *e, const sf_tokenizer *tok, const sf_generation *g,
                           sf_stream_fn stream, void *user, sf_generation_result *results) {
    sf_status st = validate(e, tok, g, results);
    if (st != SF_OK) return st;
    const int32_t n = g->n_requests;
    const int32_t max_context = sf_cuda_engine_max_context(e);
    /* sf_sample treats anything but a positive temperature (NaN included) as greedy and then
     * draws nothing, so the streams advance only for sampled tokens, here as there. */
    const bool greedy = !(g->sampling.temperature > 0.0f);
    memset(results, 0, (size_t)n * sizeof *results);
    if (n == 0) return SF_OK;

    request_state *rs = calloc((size_t)n, sizeof *rs);
    int32_t *slots = malloc((size_t)n * sizeof *slots);
    int32_t *active = malloc((size_t)n * sizeof *active);
    int32_t *picked = malloc((size_t)n * sizeof *picked);
    double *uniforms = malloc((size_t)n * sizeof *uniforms);
    if (!rs || !slots || !active || !picked || !uniforms) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cuda: out of memory");
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        rs[r].slot = r;
        rs[r].length = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        rs[r].rng = g->sampling.seed;
        st = sf_cuda_engine_reset_slot(e, r);
        results[r].tokens = malloc((size_t)g->max_new_tokens * sizeof(int32_t));
        if (st == SF_OK && !results[r].tokens) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cuda: out of memory");
        }
        if (st == SF_OK && tok) st = sf_detokenizer_create(tok, true, &rs[r].detok);
    }

    /* Prefill every prompt in one packed step; the engine samples each prompt's last row. The
     * spans go to the engine only with a Sysformer: without one the CPU path ignores them. */
    if (st == SF_OK) {
        for (int32_t r = 0; r < n; r++) {
            slots[r] = rs[r].slot;
            if (!greedy) uniforms[r] = next_uniform(&rs[r].rng);
        }
        const sf_cuda_step step = {
            .n_requests = n,
            .slots = slots,
            .cu_seqlens = g->cu_seqlens,
            .token_ids = g->token_ids,
            .spans = e->has_sysformer ? g->spans : NULL,
            .sampling = &g->sampling,
            .uniforms = greedy ? NULL : uniforms,
        };
        st = sf_cuda_engine_step(e, &step);
        if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, picked, n);
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        st = accept_token(max_context, g, stream, user, r, picked[r], &rs[r], &results[r]);
    }

    /* Decode: one token per request still running, fed from the token its slot last picked
     * (the one just accepted: a request whose pick was a stop id is done and left out). */
    while (st == SF_OK) {
        int32_t m = 0;
        for (int32_t r = 0; r < n; r++) {
            if (rs[r].done) continue;
            active[m] = r;
            slots[m] = rs[r].slot;
            if (!greedy) uniforms[m] = next_uniform(&rs[r].rng);
            m++;
        }
        if (m == 0) break;
        const sf_cuda_step step = {
            .n_requests = m,
            .slots = slots,
            .sampling = &g->sampling,
            .uniforms = greedy ? NULL : uniforms,
        };
        st = sf_cuda_engine_step(e, &step);
        if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, picked, m);
        for (int32_t i = 0; st == SF_OK && i < m; i++) {
            const int32_t r = active[i];
            rs[r].length++;
            st = accept_token(max_context, g, stream, user, r, picked[i], &rs[r], &results[r]);
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
    }
    if (st != SF_OK) {
        for (int32_t r = 0; r < n; r++) sf_generation_result_free(&results[r]);
    }
    free(rs);
    free(slots);
    free(active);
    free(picked);
    free(uniforms);
    return st;
}
