/* sf_generate_cuda: sf_generate_cpu's loop (host/model/generate.c) driving the CUDA engine.
 *
 * One guarded prefill step over slots 0 .. n-1, then decode steps over the slots of the requests
 * still running; a request that stops simply leaves the next step's slots array. Sampling runs on
 * the device; the host only supplies each request's uniform draw and reads the picked ids back,
 * which it needs anyway to apply the stop rules and to stream text.
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
    const int32_t max_slots = sf_cuda_engine_max_slots(e);
    if (g->n_requests > max_slots) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "sf_generate_cuda: %d requests, but the engine holds %d at once (create it "
                       "with max_slots >= %d, or split the batch)",
                       g->n_requests, max_slots, g->n_requests);
    }
    return sf_gen_check_prompts(who, g, sf_cuda_engine_max_context(e),
                                "the engine's context window (max_context)");
}

sf_status sf_generate_cuda(sf_cuda_engine *e, const sf_tokenizer *tok, const sf_generation *g,
                           sf_stream_fn stream, void *user, sf_generation_result *results) {
    sf_status st = validate(e, tok, g, results);
    if (st != SF_OK) return st;
    const sf_gen_ctx c = {who, g, stream, user};
    const int32_t n = g->n_requests;
    const int32_t max_context = sf_cuda_engine_max_context(e);
    memset(results, 0, (size_t)n * sizeof *results);
    if (n == 0) return SF_OK;

    sf_gen_request *rq = calloc((size_t)n, sizeof *rq);
    slot_state *rs = calloc((size_t)n, sizeof *rs);
    int32_t *slots = malloc((size_t)n * sizeof *slots);
    int32_t *active = malloc((size_t)n * sizeof *active);
    int32_t *picked = malloc((size_t)n * sizeof *picked);
    double *uniforms = malloc((size_t)n * sizeof *uniforms);
    sf_sampling *settings = malloc((size_t)n * sizeof *settings); /* the step's requests' */
    if (!rq || !rs || !slots || !active || !picked || !uniforms || !settings) {
        st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_generate_cuda: out of memory");
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        rs[r].slot = r;
        rs[r].length = g->cu_seqlens[r + 1] - g->cu_seqlens[r];
        st = sf_cuda_engine_reset_slot(e, r);
        st = sf_gen_request_init(&c, st, tok, r, &rq[r], &results[r]);
    }

    /* Prefill every prompt in one packed step; the engine samples each prompt's last row. The
     * spans go to the engine only with a Sysformer: without one the CPU path ignores them. */
    if (st == SF_OK) {
        for (int32_t r = 0; r < n; r++) {
            slots[r] = rs[r].slot;
            uniforms[r] = draw(&rq[r], &settings[r]);
        }
        const sf_cuda_step step = {
            .n_requests = n,
            .slots = slots,
            .cu_seqlens = g->cu_seqlens,
            .token_ids = g->token_ids,
            .spans = e->has_sysformer ? g->spans : NULL,
            .sampling = g->request_sampling ? NULL : &g->sampling,
            .uniforms = uniforms,
            .request_sampling = g->request_sampling ? settings : NULL,
        };
        st = sf_cuda_engine_step(e, &step);
        if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, picked, n);
    }
    for (int32_t r = 0; st == SF_OK && r < n; r++) {
        st = sf_gen_accept(&c, r, picked[r], room_of(&rs[r], max_context), &rq[r], &results[r]);
    }

    /* Decode: one token per request still running, fed from the token its slot last picked
     * (the one just accepted: a request whose pick was a stop id is done and left out). */
    while (st == SF_OK) {
        int32_t m = 0;
        for (int32_t r = 0; r < n; r++) {
            if (rq[r].done) continue;
            active[m] = r;
            slots[m] = rs[r].slot;
            uniforms[m] = draw(&rq[r], &settings[m]);
            m++;
        }
        if (m == 0) break;
        const sf_cuda_step step = {
            .n_requests = m,
            .slots = slots,
            .sampling = g->request_sampling ? NULL : &g->sampling,
            .uniforms = uniforms,
            .request_sampling = g->request_sampling ? settings : NULL,
        };
        st = sf_cuda_engine_step(e, &step);
        if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, picked, m);
        for (int32_t i = 0; st == SF_OK && i < m; i++) {
            const int32_t r = active[i];
            rs[r].length++;
            const sf_gen_room room = room_of(&rs[r], max_context);
            st = sf_gen_accept(&c, r, picked[i], room, &rq[r], &results[r]);
        }
    }

    st = sf_gen_end(&c, st, n, rq, results);
    free(rq);
    free(rs);
    free(slots);
    free(active);
    free(picked);
    free(uniforms);
    free(settings);
    return st;
}
