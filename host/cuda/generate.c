/* sf_generate_cuda and the generation session (sf_cuda_session_*): sf_generate_cpu's loop
 * (host/model/generate.c) driving the CUDA engine, with continuous batching.
 *
 * A session holds its requests by id, in submission order, in a ring that spans the ids from
 * the oldest not yet taken to the newest (so a long-lived session holds what its caller has not
 * taken, not every request it ever had); they take the engine's slots first come, first served,
 * and wait for one when all are taken. Each round is one step:
 *   - when a slot is free and the next waiting prompt fits the step (max_batch_tokens, and the
 *     Sysformer's rows padded to the longest span), a prefill step: the running requests' next
 *     tokens as 1-token chunks (spans {0, 0, 0, 0, 1}: they continue their slots) and the
 *     prompts admitted now (guarded, into their freshly emptied slots);
 *   - otherwise a decode step over the running requests (replayed as a CUDA graph).
 * A request that stops leaves the next step and frees its slot for the next waiting prompt.
 * Sampling runs on the device; the host only supplies each request's uniform draw and reads the
 * picked ids back, which it needs anyway to apply the stop rules and to stream text.
 * sf_generate_cuda is one session: every request submitted, then rounds until none is left.
 *
 * The per-request bookkeeping (stop ids, stop strings through the detokenizer, streaming, the
 * finish reasons, the final flush) is model/generation.c's, the same code sf_generate_cpu runs,
 * so both apply the same stop rules and give the same results. What stays here is the slot
 * bookkeeping and the context rule: the window is the engine's max_context. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "cuda/engine.h" /* max_context, max_slots accessors; has_sysformer */
#include "model/generation.h"
#include "sysformer.h"

/* The draw sf_sample makes for a non-greedy token, taken from the same stream in the same way:
 * one splitmix64 step, 53 bits, [0, 1). sf_sample then scales it by the kept mass; the device
 * sampler does that scaling itself. */
static double next_uniform(uint64_t *state) {
    sf_rng rng = sf_rng_seed(*state);
    const double u = sf_rng_uniform(&rng);
    *state = rng.state;
    return u;
}

/* Request rq's next step: its setting into *setting, and its uniform. sf_sample treats anything
 * but a positive temperature (NaN included) as greedy and then draws nothing, so the stream
 * advances only for sampled tokens, here as there (a greedy request's uniform is unused). */
static double draw(sf_gen_request *rq, sf_sampling *setting) {
    *setting = *rq->sampling;
    return rq->sampling->temperature > 0.0f ? next_uniform(&rq->rng) : 0.0;
}

/* The step a scheduling round builds: its requests (running ones first), their slots, draws
 * and settings, and for a prefill step the packed tokens and spans. */
typedef struct step_plan {
    int32_t *req, *slots, *cu, *ids, *picked;
    float *logprobs; /* the picked tokens' log-probabilities, when some request asks */
    int32_t *top_ids; /* [rows * SF_MAX_TOP_LOGPROBS] the most likely tokens ... */
    float *top_lp;    /* ... and their log-probabilities, when some request asks */
    sf_prompt_spans *spans;
    double *uniforms;
    sf_sampling *settings;
    int32_t *free_slots, n_free; /* a stack: the next slot to hand out is on top */
} step_plan;

static void plan_free(step_plan *p) {
    free(p->req);
    free(p->slots);
    free(p->cu);
    free(p->ids);
    free(p->picked);
    free(p->logprobs);
    free(p->top_ids);
    free(p->top_lp);
    free(p->spans);
    free(p->uniforms);
    free(p->settings);
    free(p->free_slots);
    memset(p, 0, sizeof *p);
}

static sf_status plan_alloc(step_plan *p, int32_t rows, int32_t tokens) {
    memset(p, 0, sizeof *p);
    p->req = malloc((size_t)rows * sizeof *p->req);
    p->slots = malloc((size_t)rows * sizeof *p->slots);
    p->cu = malloc((size_t)(rows + 1) * sizeof *p->cu);
    p->ids = malloc((size_t)tokens * sizeof *p->ids);
    p->picked = malloc((size_t)rows * sizeof *p->picked);
    p->logprobs = malloc((size_t)rows * sizeof *p->logprobs);
    p->top_ids = malloc((size_t)rows * SF_MAX_TOP_LOGPROBS * sizeof *p->top_ids);
    p->top_lp = malloc((size_t)rows * SF_MAX_TOP_LOGPROBS * sizeof *p->top_lp);
    p->spans = malloc((size_t)rows * sizeof *p->spans);
    p->uniforms = malloc((size_t)rows * sizeof *p->uniforms);
    p->settings = malloc((size_t)rows * sizeof *p->settings);
    p->free_slots = malloc((size_t)rows * sizeof *p->free_slots);
    if (!p->req || !p->slots || !p->cu || !p->ids || !p->picked || !p->logprobs ||
        !p->top_ids || !p->top_lp || !p->spans || !p->uniforms || !p->settings ||
        !p->free_slots) {
        plan_free(p);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "out of memory for a step's plan");
    }
    for (int32_t k = rows - 1; k >= 0; k--) p->free_slots[p->n_free++] = k;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The session                                                                                 */
/* ------------------------------------------------------------------------------------------ */

typedef enum request_state { WAITING, RUNNING, DONE } request_state;

/* One request of a session. */
typedef struct session_request {
    int32_t *ids;            /* its prompt, until it starts */
    int32_t n_ids;
    sf_prompt_spans spans;   /* with a Sysformer */
    sf_sampling sampling;    /* rq.sampling points here */
    sf_gen_request rq;       /* model/generation.c's bookkeeping */
    sf_generation_result res;
    int32_t slot;            /* while running */
    int32_t length;          /* positions stored in its slot; the next fed token gets this one */
    request_state state;
    bool cancelled;          /* by its own stream callback: it ends once that returns */
} session_request;

struct sf_cuda_session {
    sf_cuda_engine *e;
    const sf_tokenizer *tok;
    const char *who;          /* the entry point that messages name */
    sf_generation rules;      /* the stop rules: stop ids and strings, nothing else */
    int32_t *stop_ids;        /* owned copies behind rules */
    char **stop_strings;
    session_request **req;    /* [cap], a power of two: id's request at id & (cap - 1) for ids in
                                 [base, n), NULL once taken; ids below base are all taken */
    size_t cap;
    int32_t base, n;          /* n: the next id to give */
    int32_t next;             /* ids below it have left the queue (started, or cancelled) */
    int32_t *running;         /* [n_running] the ids in slots, ascending */
    int32_t n_running, n_waiting;
    step_plan p;
    bool in_step;             /* a round is running (its stream callback may not step) */
    int32_t accepting;        /* the request whose token is being accepted (streamed), or -1 */
    sf_status failed;         /* SF_OK, or the failure that broke the session ... */
    char failure[256];        /* ... and its message */
};

static void request_free(const char *who, session_request *q) {
    if (!q) return;
    free(q->ids);
    (void)sf_gen_finish(who, SF_ERR_INVALID_ARGUMENT, &q->rq, &q->res); /* frees, no flush */
    sf_generation_result_free(&q->res);
    free(q);
}

void sf_cuda_session_free(sf_cuda_session *s) {
    if (!s) return;
    for (int32_t id = s->base; s->req && id < s->n; id++) {
        request_free(s->who, s->req[(size_t)id & (s->cap - 1)]);
    }
    free(s->req);
    free(s->running);
    plan_free(&s->p);
    free(s->stop_ids);
    for (int32_t i = 0; s->stop_strings && i < s->rules.n_stop_strings; i++) {
        free(s->stop_strings[i]);
    }
    free(s->stop_strings);
    free(s);
}

static sf_status session_new(sf_cuda_engine *e, const sf_tokenizer *tok, const char *who,
                             const int32_t *stop_ids, int32_t n_stop_ids,
                             const char *const *stop_strings, int32_t n_stop_strings,
                             sf_cuda_session **out) {
    *out = NULL;
    if (!e) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL engine", who);
    if (e->guard_only) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: a guard-only engine holds no LLM to generate "
                       "with (it serves sf_cuda_guarded_embed)", who);
    }
    if (n_stop_ids < 0 || n_stop_strings < 0 || (n_stop_ids > 0 && !stop_ids) ||
        (n_stop_strings > 0 && !stop_strings)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: %d stop ids, %d stop strings, and their "
                       "arrays %s", who, n_stop_ids, n_stop_strings, "not all given");
    }
    sf_status st = sf_gen_check_stop_strings(who, tok, stop_strings, n_stop_strings);
    if (st != SF_OK) return st;
    sf_cuda_session *s = calloc(1, sizeof *s);
    if (!s) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    s->e = e;
    s->tok = tok;
    s->who = who;
    s->accepting = -1;
    const int32_t slots = sf_cuda_engine_max_slots(e);
    s->running = malloc((size_t)slots * sizeof *s->running);
    s->stop_ids = malloc((size_t)(n_stop_ids > 0 ? n_stop_ids : 1) * sizeof *s->stop_ids);
    s->stop_strings = calloc((size_t)(n_stop_strings > 0 ? n_stop_strings : 1),
                             sizeof *s->stop_strings);
    st = s->running && s->stop_ids && s->stop_strings
             ? SF_OK
             : sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
    if (st == SF_OK) st = plan_alloc(&s->p, slots, e->max_batch_tokens);
    if (st == SF_OK && n_stop_ids > 0) memcpy(s->stop_ids, stop_ids, (size_t)n_stop_ids * 4);
    s->rules.stop_ids = s->stop_ids;
    s->rules.n_stop_ids = n_stop_ids;
    s->rules.stop_strings = (const char *const *)s->stop_strings;
    for (int32_t i = 0; st == SF_OK && i < n_stop_strings; i++) {
        if (!(s->stop_strings[i] = strdup(stop_strings[i]))) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", who);
        }
        s->rules.n_stop_strings = i + 1; /* what sf_cuda_session_free releases */
    }
    if (st != SF_OK) {
        sf_cuda_session_free(s);
        return st;
    }
    *out = s;
    return SF_OK;
}

sf_status sf_cuda_session_create(sf_cuda_engine *engine, const sf_tokenizer *tok,
                                 const int32_t *stop_ids, int32_t n_stop_ids,
                                 const char *const *stop_strings, int32_t n_stop_strings,
                                 sf_cuda_session **out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_create: NULL out");
    return session_new(engine, tok, "sf_cuda_session", stop_ids, n_stop_ids, stop_strings,
                       n_stop_strings, out);
}

/* A session that failed refuses every later submission and step, with the first failure. */
static sf_status broken(const sf_cuda_session *s) {
    return sf_fail(s->failed, "%s: the session failed earlier: %s", s->who, s->failure);
}

static sf_status break_session(sf_cuda_session *s, sf_status st) {
    s->failed = st;
    snprintf(s->failure, sizeof s->failure, "%s", sf_last_error());
    return st;
}

/* Doubles the ring (64 entries at first), each held id moving to its place in the new one. */
static sf_status grow_ring(sf_cuda_session *s) {
    const size_t cap = s->cap ? 2 * s->cap : 64;
    session_request **ring = calloc(cap, sizeof *ring);
    if (!ring) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", s->who);
    for (int32_t id = s->base; id < s->n; id++) {
        ring[(size_t)id & (cap - 1)] = s->req[(size_t)id & (s->cap - 1)];
    }
    free(s->req);
    s->req = ring;
    s->cap = cap;
    return SF_OK;
}

/* Queues a request after checking everything a step would refuse of it alone. */
static sf_status submit(sf_cuda_session *s, const int32_t *ids, int32_t n_ids,
                        const sf_prompt_spans *spans, const sf_sampling *sampling,
                        int32_t max_new, int32_t *id) {
    const sf_cuda_engine *e = s->e;
    const int32_t r = s->n, window = sf_cuda_engine_max_context(e);
    const bool guarded = e->has_sysformer;
    if (s->n == INT32_MAX) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: %d requests in one session", s->who, s->n);
    }
    if (!ids || n_ids < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request %d has %d prompt tokens (at "
                       "least 1)", s->who, r, ids ? n_ids : 0);
    }
    if (n_ids >= window) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: prompt %d has %d tokens; the engine's context "
                       "window (max_context) is %d", s->who, r, n_ids, window);
    }
    /* Each prompt must fit a step alone (its spans then do too, padded rows included, as they
     * add up to its length); more requests than slots wait for one. */
    if (n_ids > e->max_batch_tokens) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: prompt %d has %d tokens; one engine step takes "
                       "%d (max_batch_tokens)", s->who, r, n_ids, e->max_batch_tokens);
    }
    if (max_new < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request %d asks for %d new tokens (at "
                       "least 1)", s->who, r, max_new);
    }
    if (guarded && !spans) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request %d has no spans; the engine's "
                       "Sysformer needs them", s->who, r);
    }
    if (sampling) SF_TRY(sf_gen_check_sampling(s->who, "sampling", sampling));
    SF_TRY(sf_cuda_check_prompt(e, s->who, r, ids, n_ids, guarded ? spans : NULL));
    if ((size_t)(s->n - s->base) == s->cap) SF_TRY(grow_ring(s));
    session_request *q = calloc(1, sizeof *q);
    if (!q) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", s->who);
    q->ids = malloc((size_t)n_ids * sizeof *q->ids);
    q->n_ids = n_ids;
    if (guarded) q->spans = *spans;
    q->sampling = sampling ? *sampling : (sf_sampling){.temperature = 0.0f, .top_p = 1.0f};
    q->slot = -1;
    q->state = WAITING;
    sf_status st = q->ids ? SF_OK : sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", s->who);
    st = sf_gen_request_start(s->who, st, s->tok, &q->sampling, max_new, n_ids, window, &q->rq,
                              &q->res);
    if (st != SF_OK) {
        request_free(s->who, q);
        return st;
    }
    memcpy(q->ids, ids, (size_t)n_ids * sizeof *ids);
    s->req[(size_t)s->n & (s->cap - 1)] = q;
    *id = s->n++;
    s->n_waiting++;
    return SF_OK;
}

sf_status sf_cuda_session_submit(sf_cuda_session *s, const int32_t *token_ids, int32_t n_tokens,
                                 const sf_prompt_spans *spans, const sf_sampling *sampling,
                                 int32_t max_new_tokens, int32_t *id) {
    if (!s || !id) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_submit: NULL");
    if (s->failed != SF_OK) return broken(s);
    return submit(s, token_ids, n_tokens, spans, sampling, max_new_tokens, id);
}

/* The request an id names, or NULL (never given, or taken). */
static session_request *lookup(const sf_cuda_session *s, int32_t id) {
    return id >= s->base && id < s->n ? s->req[(size_t)id & (s->cap - 1)] : NULL;
}

/* Request q (in a slot or not) has ended: its text flushed, its slot free for the next. */
static sf_status finish(sf_cuda_session *s, session_request *q) {
    if (q->state == RUNNING) s->p.free_slots[s->p.n_free++] = q->slot;
    if (q->state == WAITING) s->n_waiting--;
    q->state = DONE;
    q->slot = -1;
    free(q->ids);
    q->ids = NULL;
    return sf_gen_finish(s->who, SF_OK, &q->rq, &q->res);
}

/* The running list without the requests that have ended, order kept. */
static void prune_running(sf_cuda_session *s) {
    int32_t k = 0;
    for (int32_t i = 0; i < s->n_running; i++) {
        const session_request *q = lookup(s, s->running[i]);
        if (q && q->state == RUNNING) s->running[k++] = s->running[i];
    }
    s->n_running = k;
}

/* The token just accepted has no position left to be fed at once the slot holds max_context
 * positions. On the CPU the cache is min(prompt + max_new_tokens, max_position_embeddings)
 * long, so only the model's window can end a request there; here it is the slot's max_context
 * (equal to the model's window unless the engine was created smaller), always a full window. */
static sf_gen_room room_of(const session_request *q, int32_t max_context) {
    return (sf_gen_room){q->length, max_context, max_context};
}

/* One round: the running requests' next tokens and the waiting prompts that fit now, as one
 * step; then each request's token accepted (streamed, stop rules applied), and the slots of
 * those that ended freed. Nothing to run: nothing happens. */
static sf_status run_round(sf_cuda_session *s, sf_stream_fn stream, void *user) {
    sf_cuda_engine *e = s->e;
    step_plan *p = &s->p;
    const sf_gen_ctx c = {s->who, &s->rules, stream, user};
    const bool guarded = e->has_sysformer;
    const int32_t budget = e->max_batch_tokens, max_context = sf_cuda_engine_max_context(e);
    /* The spans go to the engine only with a Sysformer: without one the CPU path ignores them. */
    const sf_prompt_spans next_token = {0, 0, 0, 0, 1};
    int32_t m = 0, max_system = 0, max_user = 0, n_top = 0;
    bool logprobs = false;
    for (int32_t i = 0; i < s->n_running; i++) p->req[m++] = s->running[i];
    const int32_t running = m;
    int64_t tokens = running;
    sf_status st = SF_OK;
    while (s->next < s->n && p->n_free > 0) {
        session_request *q = lookup(s, s->next);
        if (!q || q->state != WAITING) { /* cancelled while it waited */
            s->next++;
            continue;
        }
        const int32_t ms = guarded && q->spans.system > max_system ? q->spans.system : max_system;
        const int32_t mu = guarded && q->spans.user > max_user ? q->spans.user : max_user;
        /* the engine's limits for a step: its packed tokens, and (guarded) the Sysformer's
         * padded rows */
        if (tokens + q->n_ids > budget || !sf_cuda_padded_rows_fit(e, m + 1, ms, mu)) break;
        q->slot = p->free_slots[--p->n_free];
        st = sf_cuda_engine_reset_slot(e, q->slot);
        if (st != SF_OK) return break_session(s, st);
        q->state = RUNNING;
        s->n_waiting--;
        p->req[m++] = s->next++;
        tokens += q->n_ids;
        max_system = ms;
        max_user = mu;
    }
    if (m == 0) return SF_OK; /* idle: every waiting prompt fits an empty step (submit) */
    const bool prefill = m > running;
    if (prefill) p->cu[0] = 0;
    for (int32_t i = 0; i < m; i++) {
        session_request *q = lookup(s, p->req[i]);
        p->slots[i] = q->slot;
        p->uniforms[i] = draw(&q->rq, &p->settings[i]);
        logprobs = logprobs || sf_gen_wants_scores(&p->settings[i]);
        if (p->settings[i].top_logprobs > n_top) n_top = p->settings[i].top_logprobs;
        if (!prefill) continue;
        /* a running request feeds the token its slot last picked (the one just accepted); a
         * new one its whole prompt */
        const int32_t *src = i < running ? &q->rq.last : q->ids;
        const int32_t len = i < running ? 1 : q->n_ids;
        memcpy(p->ids + p->cu[i], src, (size_t)len * sizeof *src);
        p->cu[i + 1] = p->cu[i] + len;
        if (guarded) p->spans[i] = i < running ? next_token : q->spans;
    }
    /* each request its own setting: the engine picks requests that share one together, and
     * with one for the whole step keeps the sampling inside the decode graph */
    const sf_cuda_step step = {
        .n_requests = m,
        .slots = p->slots,
        .cu_seqlens = prefill ? p->cu : NULL,
        .token_ids = prefill ? p->ids : NULL,
        .spans = prefill && guarded ? p->spans : NULL,
        .uniforms = p->uniforms,
        .request_sampling = p->settings,
    };
    st = sf_cuda_engine_step(e, &step);
    if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, p->picked, m);
    if (st == SF_OK && logprobs) st = sf_cuda_engine_read_logprobs(e, p->logprobs, m);
    if (st == SF_OK && n_top > 0) {
        st = sf_cuda_engine_read_top_logprobs(e, p->top_ids, p->top_lp, m, n_top);
    }
    for (int32_t i = 0; st == SF_OK && i < m; i++) {
        session_request *q = lookup(s, p->req[i]);
        if (!q || q->state != RUNNING) continue; /* cancelled by a callback of this round */
        if (i >= running) { /* its prompt is in its slot now */
            q->length = q->n_ids;
            free(q->ids);
            q->ids = NULL;
        } else {
            q->length++;
        }
        s->accepting = p->req[i];
        const sf_gen_scores scores = {logprobs ? p->logprobs[i] : 0.0f,
                                      p->top_ids + (size_t)i * n_top,
                                      p->top_lp + (size_t)i * n_top};
        st = sf_gen_accept(&c, p->req[i], p->picked[i], &scores, room_of(q, max_context),
                           &q->rq, &q->res);
        s->accepting = -1;
        if (st == SF_OK && q->cancelled) {
            q->rq.done = true;
            q->res.finish = SF_FINISH_CALLBACK;
        }
        if (st == SF_OK && q->rq.done) st = finish(s, q);
    }
    if (st != SF_OK) return break_session(s, st);
    s->n_running = 0;
    for (int32_t i = 0; i < m; i++) s->running[s->n_running++] = p->req[i];
    prune_running(s);
    return SF_OK;
}

sf_status sf_cuda_session_step(sf_cuda_session *s, sf_stream_fn stream, void *user,
                               int32_t *running, int32_t *waiting) {
    if (!s) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_step: NULL session");
    if (s->in_step) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_step: called from its own "
                       "stream callback");
    }
    s->in_step = true;
    const sf_status st = s->failed != SF_OK ? broken(s) : run_round(s, stream, user);
    s->in_step = false;
    if (running) *running = s->n_running;
    if (waiting) *waiting = s->n_waiting;
    return st;
}

sf_status sf_cuda_session_cancel(sf_cuda_session *s, int32_t id) {
    session_request *q = s ? lookup(s, id) : NULL;
    if (!q) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_cancel: no request %d (never "
                       "submitted, or already taken)", id);
    }
    if (q->state == DONE) return SF_OK;
    if (id == s->accepting) { /* from its own token's callback, which is still using it */
        q->cancelled = true;
        return SF_OK;
    }
    q->rq.done = true;
    q->res.finish = SF_FINISH_CALLBACK;
    const sf_status st = finish(s, q);
    prune_running(s);
    return st;
}

sf_status sf_cuda_session_take(sf_cuda_session *s, int32_t id, sf_generation_result *out,
                               bool *done) {
    session_request *q = s ? lookup(s, id) : NULL;
    if (!q || !out || !done) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_take: no request %d (never "
                       "submitted, or already taken), or a NULL argument", id);
    }
    *done = q->state == DONE;
    if (!*done) return SF_OK;
    *out = q->res;
    memset(&q->res, 0, sizeof q->res);
    request_free(s->who, q);
    s->req[(size_t)id & (s->cap - 1)] = NULL;
    while (s->base < s->n && !lookup(s, s->base)) s->base++; /* the taken oldest leave the ring */
    if (s->next < s->base) s->next = s->base;
    return SF_OK;
}

sf_status sf_cuda_session_peek(const sf_cuda_session *s, int32_t id, sf_generation_result *view,
                               bool *done) {
    const session_request *q = s ? lookup(s, id) : NULL;
    if (!q || !view || !done) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_session_peek: no request %d (never "
                       "submitted, or already taken), or a NULL argument", id);
    }
    *done = q->state == DONE;
    *view = q->res; /* its text is set when it finishes (sf_gen_finish) */
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* sf_generate_cuda: one session over a fixed set of requests                                  */
/* ------------------------------------------------------------------------------------------ */

static const char who[] = "sf_generate_cuda";

sf_status sf_generate_cuda(sf_cuda_engine *e, const sf_tokenizer *tok, const sf_generation *g,
                           sf_stream_fn stream, void *user, sf_generation_result *results) {
    /* Without the spans check an engine step given no spans would run unguarded, silently.
     * Each prompt is checked as it is submitted below (the guard-only engine, the window, a
     * step's budget, ids and spans), all before the first round. */
    sf_status st = sf_gen_check_args(who, e != NULL, e && e->has_sysformer, tok, g, results);
    if (st != SF_OK) return st;
    const int32_t n = g->n_requests;
    memset(results, 0, (size_t)n * sizeof *results);
    sf_cuda_session *s = NULL;
    st = session_new(e, tok, who, g->stop_ids, g->n_stop_ids, g->stop_strings,
                     g->n_stop_strings, &s);
    /* Every request is checked before anything runs; their ids are their indices. */
    for (int32_t r = 0, id = 0; st == SF_OK && r < n; r++) {
        const sf_sampling *sampling = g->request_sampling ? &g->request_sampling[r] : &g->sampling;
        st = submit(s, g->token_ids + g->cu_seqlens[r], g->cu_seqlens[r + 1] - g->cu_seqlens[r],
                    e->has_sysformer ? &g->spans[r] : NULL, sampling, sf_gen_max_new(g, r), &id);
    }
    while (st == SF_OK && (s->n_running > 0 || s->n_waiting > 0)) st = run_round(s, stream, user);
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        bool done; /* every request is, once nothing runs or waits */
        st = sf_cuda_session_take(s, r, &results[r], &done);
    }
    if (st != SF_OK) {
        for (int32_t r = 0; r < n; r++) sf_generation_result_free(&results[r]);
    }
    sf_cuda_session_free(s);
    return st;
}
