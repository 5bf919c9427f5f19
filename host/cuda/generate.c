/* sf_generate_cuda: sf_generate_cpu's loop (host/model/generate.c) driving the CUDA engine,
 * with continuous batching.
 *
 * Requests take the engine's slots in order, and wait for one when there are more requests than
 * slots. Each round is one step:
 *   - when a slot is free and the next waiting prompt fits the step (max_batch_tokens, and the
 *     Sysformer's rows padded to the longest span), a prefill step: the running requests' next
 *     tokens as 1-token chunks (spans {0, 0, 0, 0, 1}: they continue their slots) and the
 *     prompts admitted now (guarded, into their freshly emptied slots);
 *   - otherwise a decode step over the running requests (replayed as a CUDA graph).
 * A request that stops leaves the next step and frees its slot for the next waiting prompt.
 * Sampling runs on the device; the host only supplies each request's uniform draw and reads the
 * picked ids back, which it needs anyway to apply the stop rules and to stream text.
 *
 * The per-request bookkeeping (argument checks, stop ids, stop strings through the detokenizer,
 * streaming, the finish reasons, the final flush) is model/generation.c's, the same code
 * sf_generate_cpu runs, so both apply the same stop rules and give the same results. What stays
 * here is the slot bookkeeping and the context rule: the window is the engine's max_context. */
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "cuda/engine.h" /* max_context, max_slots accessors; has_sysformer */
#include "model/generation.h"
#include "sysformer.h"

static const char who[] = "sf_generate_cuda";

/* A request's slot in the engine. */
typedef struct slot_state {
    int32_t slot;
    int32_t length;   /* positions stored in the slot; the next fed token gets this position */
} slot_state;

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

/* The token just accepted has no position left to be fed at once the slot holds max_context
 * positions. On the CPU the cache is min(prompt + max_new_tokens, max_position_embeddings)
 * long, so only the model's window can end a request there; here it is the slot's max_context
 * (equal to the model's window unless the engine was created smaller), always a full window. */
static sf_gen_room room_of(const slot_state *s, int32_t max_context) {
    return (sf_gen_room){s->length, max_context, max_context};
}

static sf_status validate(const sf_cuda_engine *e, const sf_tokenizer *tok,
                          const sf_generation *g, const sf_generation_result *results) {
    /* Without the spans check an engine step given no spans would run unguarded, silently. */
    sf_status st = sf_gen_check_args(who, e != NULL, e && e->has_sysformer, tok, g, results);
    if (st != SF_OK) return st;
    if (e->guard_only) {
        return sf_fail(SF_ERR_UNSUPPORTED, "sf_generate_cuda: a guard-only engine holds no LLM "
                       "to generate with (it serves sf_cuda_guarded_embed)");
    }
    st = sf_gen_check_prompts(who, g, sf_cuda_engine_max_context(e),
                              "the engine's context window (max_context)");
    /* Each prompt must fit a step alone (its spans then do too); more requests than slots wait
     * for one. */
    const int32_t budget = e->max_batch_tokens;
    for (int32_t r = 0; st == SF_OK && r < g->n_requests; r++) {
        const int32_t len = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        if (len > budget) {
            st = sf_fail(SF_ERR_OUT_OF_RANGE,
                         "sf_generate_cuda: prompt %d has %d tokens; one engine step takes %d "
                         "(max_batch_tokens)",
                         r, len, budget);
        }
    }
    return st;
}

/* The step a scheduling round builds: its requests (running ones first), their slots, draws
 * and settings, and for a prefill step the packed tokens and spans. */
typedef struct step_plan {
    int32_t *req, *slots, *cu, *ids, *picked;
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
    p->spans = malloc((size_t)rows * sizeof *p->spans);
    p->uniforms = malloc((size_t)rows * sizeof *p->uniforms);
    p->settings = malloc((size_t)rows * sizeof *p->settings);
    p->free_slots = malloc((size_t)rows * sizeof *p->free_slots);
    if (!p->req || !p->slots || !p->cu || !p->ids || !p->picked || !p->spans || !p->uniforms ||
        !p->settings || !p->free_slots) {
        plan_free(p);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cuda: out of memory");
    }
    return SF_OK;
}

sf_status sf_generate_cuda(sf_cuda_engine *e, const sf_tokenizer *tok, const sf_generation *g,
                           sf_stream_fn stream, void *user, sf_generation_result *results) {
    sf_status st = validate(e, tok, g, results);
    if (st != SF_OK) return st;
    const sf_gen_ctx c = {who, g, stream, user};
    const int32_t n = g->n_requests;
    const int32_t max_context = sf_cuda_engine_max_context(e);
    const int32_t rows = n < e->max_slots ? n : e->max_slots, budget = e->max_batch_tokens;
    const bool guarded = e->has_sysformer;
    memset(results, 0, (size_t)n * sizeof *results);
    if (n == 0) return SF_OK;

    sf_gen_request *rq = calloc((size_t)n, sizeof *rq);
    slot_state *rs = calloc((size_t)n, sizeof *rs);
    step_plan p;
    st = plan_alloc(&p, rows, budget);
    if (st == SF_OK && (!rq || !rs)) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cuda: out of memory");
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        rs[r].slot = -1;
        st = sf_gen_request_init(&c, st, tok, r, &rq[r], &results[r]);
    }
    for (int32_t k = rows - 1; st == SF_OK && k >= 0; k--) p.free_slots[p.n_free++] = k;

    /* One step a round: the running requests' next tokens, and the waiting prompts that a free
     * slot and the step's budget admit now. The spans go to the engine only with a Sysformer:
     * without one the CPU path ignores them. */
    const sf_prompt_spans next_token = {0, 0, 0, 0, 1};
    int32_t waiting = 0; /* requests [waiting, n) have not started */
    while (st == SF_OK) {
        int32_t m = 0, tokens = 0, max_system = 0, max_user = 0;
        for (int32_t r = 0; r < waiting; r++) {
            if (!rq[r].done) p.req[m++] = r;
        }
        const int32_t running = m;
        tokens = running;
        while (waiting < n && p.n_free > 0) {
            const int32_t r = waiting, len = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
            const int32_t sys = guarded ? g->spans[r].system : 0;
            const int32_t usr = guarded ? g->spans[r].user : 0;
            const int32_t ms = sys > max_system ? sys : max_system;
            const int32_t mu = usr > max_user ? usr : max_user;
            /* the engine's limits for a step: its packed tokens, and (guarded) the Sysformer's
             * padded rows */
            if ((int64_t)tokens + len > budget || !sf_cuda_padded_rows_fit(e, m + 1, ms, mu)) {
                break;
            }
            rs[r].slot = p.free_slots[--p.n_free];
            st = sf_cuda_engine_reset_slot(e, rs[r].slot);
            if (st != SF_OK) break;
            p.req[m++] = r;
            tokens += len;
            max_system = ms;
            max_user = mu;
            waiting++;
        }
        if (st != SF_OK) break;
        if (m == 0) { /* nothing runs: done, unless a prompt fits no step (validate's job) */
            if (waiting < n) {
                st = sf_fail(SF_ERR_OUT_OF_RANGE, "sf_generate_cuda: prompt %d fits no step",
                             waiting);
            }
            break;
        }
        const bool prefill = m > running;
        if (prefill) p.cu[0] = 0;
        for (int32_t i = 0; i < m; i++) {
            const int32_t r = p.req[i];
            p.slots[i] = rs[r].slot;
            p.uniforms[i] = draw(&rq[r], &p.settings[i]);
            if (!prefill) continue;
            /* a running request feeds the token its slot last picked (the one just accepted);
             * a new one its whole prompt */
            const int32_t *src = i < running ? &rq[r].last : g->token_ids + g->cu_seqlens[r];
            const int32_t len = i < running ? 1 : g->cu_seqlens[r + 1] - g->cu_seqlens[r];
            memcpy(p.ids + p.cu[i], src, (size_t)len * sizeof *src);
            p.cu[i + 1] = p.cu[i] + len;
            if (guarded) p.spans[i] = i < running ? next_token : g->spans[r];
        }
        const sf_cuda_step step = {
            .n_requests = m,
            .slots = p.slots,
            .cu_seqlens = prefill ? p.cu : NULL,
            .token_ids = prefill ? p.ids : NULL,
            .spans = prefill && guarded ? p.spans : NULL,
            .sampling = g->request_sampling ? NULL : &g->sampling,
            .uniforms = p.uniforms,
            .request_sampling = g->request_sampling ? p.settings : NULL,
        };
        st = sf_cuda_engine_step(e, &step);
        if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, p.picked, m);
        for (int32_t i = 0; st == SF_OK && i < m; i++) {
            const int32_t r = p.req[i];
            rs[r].length = i < running ? rs[r].length + 1
                                       : g->cu_seqlens[r + 1] - g->cu_seqlens[r];
            st = sf_gen_accept(&c, r, p.picked[i], room_of(&rs[r], max_context), &rq[r],
                               &results[r]);
            if (st == SF_OK && rq[r].done) p.free_slots[p.n_free++] = rs[r].slot;
        }
    }

    st = sf_gen_end(&c, st, n, rq, results);
    plan_free(&p);
    free(rq);
    free(rs);
    return st;
}
