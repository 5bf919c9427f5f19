/* Internal: the per-request bookkeeping shared by sf_generate_cpu and sf_generate_cuda.
 *
 * Both loops feed tokens differently (the CPU reference forward vs the CUDA engine's slots) but
 * must apply the same stop rules and produce the same results, so the argument checks, the
 * handling of each sampled token and the final flush live here once. What differs between them
 * is passed in: the caller's name for messages and how full the request's context is. */
#ifndef SF_MODEL_GENERATION_H
#define SF_MODEL_GENERATION_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One request's state while generating. */
typedef struct sf_gen_request {
    sf_detokenizer *detok;
    int32_t detok_ids;           /* the tokenizer's ids: a sampled id past them has no text   */
    const sf_sampling *sampling; /* the request's setting (g->request_sampling[r] or g->sampling) */
    int32_t max_new;             /* the request's limit (sf_gen_max_new)                        */
    uint64_t rng;     /* the request's own sampling stream, from sampling->seed */
    int32_t last;     /* the token last accepted, the one to feed next */
    bool done;
    char *text;       /* decoded so far */
    size_t text_len, text_cap;
} sf_gen_request;

/* What every accepted token needs; who names the public entry point in messages. */
typedef struct sf_gen_ctx {
    const char *who;
    const sf_generation *g;
    sf_stream_fn stream;
    void *user;
} sf_gen_ctx;

/* How full a request's context is once the token just accepted is stored: the request ends when
 * used reaches capacity, as SF_FINISH_CONTEXT if capacity is the whole window, else as
 * SF_FINISH_LENGTH (a cache sized to prompt + max_new_tokens ran out first). */
typedef struct sf_gen_room {
    int32_t used, capacity, window;
} sf_gen_room;

/* The argument checks before any prompt is looked at; have_model is false for a NULL model or
 * engine, needs_spans true when a Sysformer guards the prompts. */
sf_status sf_gen_check_args(const char *who, bool have_model, bool needs_spans,
                            const sf_tokenizer *tok, const sf_generation *g,
                            const sf_generation_result *results);

/* The stop strings of sf_generation and sf_cuda_session_create: they need a tokenizer, and
 * each must be a valid UTF-8 string (not NULL). */
sf_status sf_gen_check_stop_strings(const char *who, const sf_tokenizer *tok,
                                    const char *const *stop_strings, int32_t n);

/* Request r's limit on new tokens: g->request_max_new_tokens[r], or g->max_new_tokens. */
static inline int32_t sf_gen_max_new(const sf_generation *g, int32_t r) {
    return g->request_max_new_tokens ? g->request_max_new_tokens[r] : g->max_new_tokens;
}

/* Every prompt non-empty and shorter than window; window_name says whose window it is. */
sf_status sf_gen_check_prompts(const char *who, const sf_generation *g, int32_t window,
                               const char *window_name);

/* Sets up a request of prompt_len tokens, in a context of window positions, after the caller's
 * own setup returned st: its sampling setting (borrowed: it must outlive the request) and
 * stream, its limit, its token buffer and, when the setting asks, its log-probability buffer
 * (both allocated even when st is a failure, so that cleanup frees every result alike) and,
 * with a tokenizer, its detokenizer. The buffers hold what the request can be given: max_new
 * tokens, or window - prompt_len + 1 when fewer (the token accepted as the context fills is
 * the last, sf_gen_accept), so a limit far past the window ("no limit") asks for no more
 * memory than the window allows. Returns the first failure. */
sf_status sf_gen_request_start(const char *who, sf_status st, const sf_tokenizer *tok,
                               const sf_sampling *sampling, int32_t max_new, int32_t prompt_len,
                               int32_t window, sf_gen_request *rq, sf_generation_result *res);

/* sf_gen_request_start for request r of c->g (its setting, limit and prompt from the batch) in
 * a context of window positions. */
sf_status sf_gen_request_init(const sf_gen_ctx *c, sf_status st, const sf_tokenizer *tok,
                              int32_t r, int32_t window, sf_gen_request *rq,
                              sf_generation_result *res);

/* What a token's step says of it, for a request that asked (sf_gen_wants_scores): its
 * log-probability, and the setting's top_logprobs most likely tokens with theirs. */
typedef struct sf_gen_scores {
    float logprob;
    const int32_t *top_ids;
    const float *top_logprobs;
} sf_gen_scores;

/* The setting asks for log-probabilities (logprobs, or top_logprobs > 0). */
static inline bool sf_gen_wants_scores(const sf_sampling *s) {
    return s->logprobs || s->top_logprobs > 0;
}

/* SF_ERR_INVALID_ARGUMENT, naming who and what, for a top_logprobs outside
 * [0, SF_MAX_TOP_LOGPROBS]. */
sf_status sf_gen_check_sampling(const char *who, const char *what, const sf_sampling *s);

/* Records one sampled token for request r (with its scores, kept when the request's setting
 * asked for them; else scores may be NULL) and decides whether it finishes the request. */
sf_status sf_gen_accept(const sf_gen_ctx *c, int32_t r, int32_t token,
                        const sf_gen_scores *scores, sf_gen_room room, sf_gen_request *rq,
                        sf_generation_result *res);

/* Ends one request: flushes its text into res (when st is SF_OK; a stop string stays removed)
 * and frees its state. Returns st, or the flush's failure. */
sf_status sf_gen_finish(const char *who, sf_status st, sf_gen_request *rq,
                        sf_generation_result *res);

/* sf_gen_finish for each request (not freeing the array); on failure frees the results too.
 * Returns st, or the first flush's failure. */
sf_status sf_gen_end(const sf_gen_ctx *c, sf_status st, int32_t n, sf_gen_request *rq,
                     sf_generation_result *results);

#ifdef __cplusplus
}
#endif

#endif /* SF_MODEL_GENERATION_H */
