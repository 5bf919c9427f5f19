/* The per-request bookkeeping of generation, shared by the CPU and CUDA loops (generation.h).
 *
 * Messages carry the caller's name, so each entry point reports failures as its own. */
#include "model/generation.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "tokenizer/tokenizer_internal.h"

static sf_status text_append(const char *who, sf_gen_request *rq, const char *s, size_t n) {
    if (rq->text_len + n + 1 > rq->text_cap) {
        size_t cap = rq->text_cap ? rq->text_cap * 2 : 256;
        while (cap < rq->text_len + n + 1) cap *= 2;
        char *grown = realloc(rq->text, cap);
        if (!grown) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
        rq->text = grown;
        rq->text_cap = cap;
    }
    memcpy(rq->text + rq->text_len, s, n);
    rq->text_len += n;
    rq->text[rq->text_len] = '\0';
    return SF_OK;
}

static bool ends_with_stop_string(const sf_gen_request *rq, const sf_generation *g,
                                  size_t *stop_len) {
    for (int32_t i = 0; i < g->n_stop_strings; i++) {
        const size_t n = strlen(g->stop_strings[i]);
        if (n && rq->text_len >= n && !memcmp(rq->text + rq->text_len - n, g->stop_strings[i], n)) {
            *stop_len = n;
            return true;
        }
    }
    return false;
}

sf_status sf_gen_check_sampling(const char *who, const char *what, const sf_sampling *s) {
    if (s->temperature == INFINITY) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: %s.temperature is infinite", who, what);
    }
    if (s->top_logprobs < 0 || s->top_logprobs > SF_MAX_TOP_LOGPROBS) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: %s.top_logprobs = %d, outside [0, %d]", who,
                       what, s->top_logprobs, SF_MAX_TOP_LOGPROBS);
    }
    return SF_OK;
}

sf_status sf_gen_check_args(const char *who, bool have_model, bool needs_spans,
                            const sf_tokenizer *tok, const sf_generation *g,
                            const sf_generation_result *results) {
    if (!have_model || !g || !results || g->n_requests < 0 || !g->cu_seqlens || !g->token_ids) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL argument", who);
    }
    if (!g->request_max_new_tokens && g->max_new_tokens < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: max_new_tokens = %d", who,
                       g->max_new_tokens);
    }
    for (int32_t r = 0; g->request_max_new_tokens && r < g->n_requests; r++) {
        if (g->request_max_new_tokens[r] < 1) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request_max_new_tokens[%d] = %d", who,
                           r, g->request_max_new_tokens[r]);
        }
    }
    sf_status st = sf_gen_check_sampling(who, "sampling", &g->sampling);
    for (int32_t r = 0; st == SF_OK && g->request_sampling && r < g->n_requests; r++) {
        char what[48];
        snprintf(what, sizeof what, "request_sampling[%d]", r);
        st = sf_gen_check_sampling(who, what, &g->request_sampling[r]);
    }
    if (st != SF_OK) return st;
    if (needs_spans && !g->spans) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: a Sysformer needs each prompt's spans", who);
    }
    if (g->n_stop_ids < 0 || g->n_stop_strings < 0 || (g->n_stop_ids > 0 && !g->stop_ids) ||
        (g->n_stop_strings > 0 && !g->stop_strings)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: %d stop ids, %d stop strings, and their "
                       "arrays not all given", who, g->n_stop_ids, g->n_stop_strings);
    }
    return sf_gen_check_stop_strings(who, tok, g->stop_strings, g->n_stop_strings);
}

sf_status sf_gen_check_stop_strings(const char *who, const sf_tokenizer *tok,
                                    const char *const *stop_strings, int32_t n) {
    if (n > 0 && !tok) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: stop strings need a tokenizer", who);
    }
    for (int32_t i = 0; i < n; i++) {
        if (!stop_strings[i]) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: stop string %d is NULL", who, i);
        }
        /* Replies are valid UTF-8 and a stop string is cut from a reply's end: one that is
         * not valid UTF-8 could cut a character in two. */
        const size_t len = strlen(stop_strings[i]);
        const size_t valid = sf_utf8_validate(stop_strings[i], len);
        if (valid != len) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: stop string %d is not valid UTF-8 "
                           "(at byte %zu)", who, i, valid);
        }
    }
    return SF_OK;
}

sf_status sf_gen_check_prompts(const char *who, const sf_generation *g, int32_t window,
                               const char *window_name) {
    for (int32_t r = 0; r < g->n_requests; r++) {
        const int32_t n = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        if (n < 1) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: prompt %d is empty", who, r);
        if (n >= window) {
            return sf_fail(SF_ERR_OUT_OF_RANGE,
                           "prompt %d has %d tokens; %s is %d, leaving no room to generate "
                           "(shorten the prompt)",
                           r, n, window_name, window);
        }
    }
    return SF_OK;
}

sf_status sf_gen_request_start(const char *who, sf_status st, const sf_tokenizer *tok,
                               const sf_sampling *sampling, int32_t max_new, int32_t prompt_len,
                               int32_t window, sf_gen_request *rq, sf_generation_result *res) {
    rq->sampling = sampling;
    rq->rng = sampling->seed;
    rq->max_new = max_new;
    const int64_t room = (int64_t)window - prompt_len + 1;
    const int64_t most = room >= 1 && room < max_new ? room : max_new;
    /* Allocated even after a failure, as the caller's cleanup frees every result alike. */
    const size_t count = (size_t)(most > 0 ? most : 1);
    const bool scores = sf_gen_wants_scores(sampling);
    const size_t n_top = sampling->top_logprobs > 0 ? (size_t)sampling->top_logprobs : 0;
    res->tokens = malloc(count * sizeof(int32_t));
    if (scores) res->logprobs = malloc(count * sizeof(float));
    if (n_top) {
        res->n_top = (int32_t)n_top;
        res->top_ids = malloc(count * n_top * sizeof(int32_t));
        res->top_logprobs = malloc(count * n_top * sizeof(float));
    }
    if (st == SF_OK && (!res->tokens || (scores && !res->logprobs) ||
                        (n_top && (!res->top_ids || !res->top_logprobs)))) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    }
    if (st == SF_OK && tok) st = sf_detokenizer_create(tok, true, &rq->detok);
    rq->detok_ids = tok ? sf_tokenizer_vocab_size(tok) : 0;
    return st;
}

sf_status sf_gen_request_init(const sf_gen_ctx *c, sf_status st, const sf_tokenizer *tok,
                              int32_t r, int32_t window, sf_gen_request *rq,
                              sf_generation_result *res) {
    const sf_sampling *sampling =
        c->g->request_sampling ? &c->g->request_sampling[r] : &c->g->sampling;
    const int32_t len = c->g->cu_seqlens[r + 1] - c->g->cu_seqlens[r];
    return sf_gen_request_start(c->who, st, tok, sampling, sf_gen_max_new(c->g, r), len, window,
                                rq, res);
}

sf_status sf_gen_accept(const sf_gen_ctx *c, int32_t r, int32_t token,
                        const sf_gen_scores *scores, sf_gen_room room, sf_gen_request *rq,
                        sf_generation_result *res) {
    const sf_generation *g = c->g;
    for (int32_t i = 0; i < g->n_stop_ids; i++) {
        if (token == g->stop_ids[i]) {
            rq->done = true;
            res->finish = SF_FINISH_STOP_TOKEN;
            return SF_OK;
        }
    }
    if (res->logprobs) res->logprobs[res->n_tokens] = scores->logprob;
    if (res->top_ids) {
        const size_t at = (size_t)res->n_tokens * (size_t)res->n_top;
        memcpy(res->top_ids + at, scores->top_ids, (size_t)res->n_top * sizeof(int32_t));
        memcpy(res->top_logprobs + at, scores->top_logprobs, (size_t)res->n_top * sizeof(float));
    }
    res->tokens[res->n_tokens++] = token;
    rq->last = token;
    /* The token's text. An id past the tokenizer's (the padded rows of an LM head larger than
     * the vocabulary, Qwen2's 151936 against its tokenizer's ~151665, can be sampled) has none,
     * as transformers decodes it to ""; a piece longer than the buffer is pushed again into
     * one of its size (a refused push leaves the detokenizer as it was). */
    char small[256];
    char *piece = small, *grown = NULL;
    size_t piece_len = 0;
    small[0] = '\0';
    if (rq->detok && token >= 0 && token < rq->detok_ids) {
        sf_status st = sf_detokenizer_push(rq->detok, token, small, sizeof small, &piece_len);
        if (st == SF_ERR_OUT_OF_RANGE) {
            grown = malloc(piece_len + 1);
            if (!grown) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", c->who);
            piece = grown;
            st = sf_detokenizer_push(rq->detok, token, grown, piece_len + 1, &piece_len);
        }
        if (st == SF_OK) st = text_append(c->who, rq, piece, piece_len);
        if (st != SF_OK) {
            free(grown);
            return st;
        }
    }
    const bool go_on =
        !c->stream || c->stream(c->user, r, token, rq->detok ? piece : NULL, piece_len);
    free(grown);
    if (!go_on) {
        rq->done = true;
        res->finish = SF_FINISH_CALLBACK;
        return SF_OK;
    }
    size_t stop_len = 0;
    if (rq->detok && ends_with_stop_string(rq, g, &stop_len)) {
        rq->text_len -= stop_len;
        rq->text[rq->text_len] = '\0';
        rq->done = true;
        res->finish = SF_FINISH_STOP_STRING;
    } else if (res->n_tokens >= rq->max_new) {
        rq->done = true;
        res->finish = SF_FINISH_LENGTH;
    } else if (room.used >= room.capacity) {
        /* The token just accepted has no position left to be fed at. */
        rq->done = true;
        res->finish = room.window == room.capacity ? SF_FINISH_CONTEXT : SF_FINISH_LENGTH;
    }
    return SF_OK;
}

sf_status sf_gen_finish(const char *who, sf_status st, sf_gen_request *rq,
                        sf_generation_result *res) {
    if (st == SF_OK && rq->detok) {
        char tail[64];
        size_t tail_len = 0;
        if (res->finish != SF_FINISH_STOP_STRING &&
            sf_detokenizer_flush(rq->detok, tail, sizeof tail, &tail_len) == SF_OK) {
            st = text_append(who, rq, tail, tail_len);
        }
        if (st == SF_OK && !rq->text) st = text_append(who, rq, "", 0);
        res->text = rq->text;
        rq->text = NULL;
    }
    free(rq->text);
    rq->text = NULL;
    sf_detokenizer_free(rq->detok);
    rq->detok = NULL;
    return st;
}

sf_status sf_gen_end(const sf_gen_ctx *c, sf_status st, int32_t n, sf_gen_request *rq,
                     sf_generation_result *results) {
    for (int32_t r = 0; rq && r < n; r++) st = sf_gen_finish(c->who, st, &rq[r], &results[r]);
    if (st != SF_OK) {
        for (int32_t r = 0; r < n; r++) sf_generation_result_free(&results[r]);
    }
    return st;
}
