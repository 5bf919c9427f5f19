/* End-to-end benchmark of the CUDA engine at real model shapes, random bf16 weights drawn on the
 * device (sf_cuda_engine_create_random): guarded prefill, unguarded prefill, decode, and the
 * serving-stack entry point sf_cuda_guarded_embed. bench/peer_e2e.py measures PyTorch +
 * transformers at the same shapes in the same device run.
 *
 * usage: bench_engine [--configs llama3.1-8b,mistral-7b,phi3.5-mini,smollm2-135m]  (or tiny)
 *                     [--requests 32] [--prompt 512] [--system 64] [--user 384] [--decode 32]
 *                     [--repeats 5] [--seed 1] [--peak 989] [--no-graphs]
 *                     [--attention auto|mma|wgmma|wgmma_ws] [--serve N] [--top-logprobs N]
 *
 * Each request's prompt is prefix 5 | system S | middle 5 | user U | suffix (the rest) tokens,
 * random ids in [0, vocab) from a fixed-seed generator; all requests are packed into one step.
 * Timing: wall clock (CLOCK_MONOTONIC) around sf_cuda_engine_step + sf_cuda_engine_read_tokens
 * (the end-to-end number a serving loop sees), plus the engine's own per-stage CUDA-event times.
 * Prefill numbers are the median of --repeats after one warm-up.
 *
 * FLOPs of one prefill (multiply-add = 2 FLOPs; R requests of P tokens, T = R·P):
 *   LLM  = 2·T·L·[d·hd·(2·H + 2·Hkv) + 3·d·ff]        q, k, v, o projections and the SwiGLU MLP
 *        + 4·hd·H·L·pairs                             QK^T and PV over the visible causal pairs,
 *                                                     pairs = R·P·(P+1)/2 (no sliding window)
 *        + 2·d·V·R                                    LM head on one row per request
 *   Sysformer (guarded only), per layer, Rs = R·S, Ru = R·U, ffs = its feed-forward width:
 *        + 2·Rs·d·3d + 2·Rs·d·d                       self-attention in_proj (q, k, v) and out_proj
 *        + 4·d·R·S·S                                  self-attention scores and values (hd·heads = d)
 *        + 2·Rs·d·d + 2·Ru·d·2d + 2·Rs·d·d            cross-attention q (system rows), k and v
 *                                                     (user rows), out_proj
 *        + 4·d·R·S·U                                  cross-attention scores and values
 *        + 2·2·Rs·d·ffs                               linear1 and linear2
 * Norms, RoPE, activations, softmax and sampling are not counted (they are memory-bound).
 * MFU = FLOPs / time / peak, with peak = 989 TFLOP/s, the H200's dense bf16 spec (--peak).
 *
 * --top-logprobs N: the decode steps run again with every request asking for log-probabilities
 * and its N most likely tokens (each step then also reads them back), and the difference is
 * reported: the cost of sf_cuda_logprobs's extra read of the logit rows and the copies.
 *
 * --serve N: generation throughput of N guarded requests (the prompts above, random ids) whose
 * reply limits are drawn uniformly from 1 .. decode (greedy; random weights rarely stop on
 * their own, so the limits set the lengths), on the same engine of `requests` slots, two ways:
 * one sf_generate_cuda call over all N (continuous batching: a request starts as soon as a
 * slot frees), and one call per batch of `requests` in turn (static batches: each waits for its
 * longest reply). Generated tokens per second of each, wall clock around the calls. Then the
 * same requests arrive over time (Poisson, at 80% of the request rate the continuous run
 * sustained) at a serving loop on a generation session (sf_cuda_session_*): tokens per second,
 * time to first token (arrival to first token) and time per output token, at p50/p90/p99.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_models.h"
#include "bench_util.h"
#include "sysformer.h"

#define MAX_REPEATS 99

/* ---------------------------------------------------------------------------------------- */
/* Options, shapes, FLOPs                                                                      */
/* ---------------------------------------------------------------------------------------- */

typedef struct options {
    const char *configs;
    int requests, prompt, system, user, decode, repeats, serve;
    uint64_t seed;
    double peak_tflops;
    bool graphs;
    sf_attention_kernel attention; /* the engine's option: which fused-attention kernel */
    int top_logprobs; /* > 0: decode again taking log-probabilities and this many alternatives */
} options;

/* sf_sysformer_default_config's values, by hand (there is no CPU sf_llm here). */
static sf_sysformer_config make_sysformer_config(const sf_llm_config *c) {
    sf_sysformer_config s;
    memset(&s, 0, sizeof s);
    s.d_model = c->hidden_size;
    s.num_layers = 2;
    s.num_heads = c->num_heads;
    s.dim_feedforward = 4 * c->hidden_size;
    s.activation = SF_ACT_RELU;
    s.norm_first = true;
    s.layer_norm_eps = 1e-5f;
    s.final_norm = false;
    s.has_classifier = true;
    s.llm_hidden_size = c->hidden_size;
    s.llm_vocab_size = c->vocab_size;
    return s;
}

static double llm_prefill_flops(const sf_llm_config *c, int R, int P) {
    const double T = (double)R * P;
    return 2.0 * T * c->num_layers * bench_layer_weights(c)
           + 4.0 * c->head_dim * c->num_heads * c->num_layers * (R * bench_causal_pairs(c, P))
           + 2.0 * (double)c->hidden_size * c->vocab_size * R;
}

/* Bytes one decode step must read at least: the LLM's matmul weights and LM head (bf16), and
 * the KV cache of every request at an average context ctx. */
static double decode_bytes(const sf_llm_config *c, int R, double ctx) {
    const double w =
        c->num_layers * bench_layer_weights(c) + (double)c->hidden_size * c->vocab_size;
    const double kv = (double)R * ctx * c->num_layers * 2.0 * c->num_kv_heads * c->head_dim;
    return 2.0 * (w + kv);
}

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                               */
/* ---------------------------------------------------------------------------------------- */

static double now_ms(void) { return 1e3 * bench_now_s(); }

/* The median of each stage separately. */
static sf_cuda_stage_times median_stages(const sf_cuda_stage_times *t, int n) {
    sf_cuda_stage_times m;
    memset(&m, 0, sizeof m);
    double v[MAX_REPEATS];
    if (n > MAX_REPEATS) n = MAX_REPEATS;
#define MED_FIELD(f)                                  \
    do {                                              \
        for (int i = 0; i < n; i++) v[i] = t[i].f;    \
        m.f = (float)bench_median(v, n);                    \
    } while (0)
    MED_FIELD(upload_ms);
    MED_FIELD(embed_ms);
    MED_FIELD(sysformer_ms);
    MED_FIELD(layers_ms);
    MED_FIELD(head_ms);
    MED_FIELD(sample_ms);
    MED_FIELD(total_ms);
#undef MED_FIELD
    return m;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double gib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

/* bf16 bits -> float, for a sanity look at sf_cuda_guarded_embed's output. */
static float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static bool tokens_in_range(const int32_t *t, int n, int vocab) {
    for (int i = 0; i < n; i++)
        if (t[i] < 0 || t[i] >= vocab) return false;
    return true;
}

#define SF_TRY(what, call)                                                                   \
    do {                                                                                     \
        sf_status st_ = (call);                                                              \
        if (st_ != SF_OK) {                                                                  \
            printf("  ERROR %s: %s: %s\n", (what), sf_status_string(st_), sf_last_error()); \
            goto done;                                                                       \
        }                                                                                    \
    } while (0)

#define CUDA_TRY(what, call)                                                                 \
    do {                                                                                     \
        cudaError_t ce_ = (call);                                                            \
        if (ce_ != cudaSuccess) {                                                            \
            printf("  ERROR %s: %s\n", (what), cudaGetErrorString(ce_));                    \
            goto done;                                                                       \
        }                                                                                    \
    } while (0)

static sf_status reset_slots(sf_cuda_engine *e, int R) {
    for (int r = 0; r < R; r++) {
        sf_status st = sf_cuda_engine_reset_slot(e, r);
        if (st != SF_OK) return st;
    }
    return SF_OK;
}

/* One timed step: wall time around step + read_tokens, then the engine's stage times. */
static sf_status timed_step(sf_cuda_engine *e, const sf_cuda_step *step, int32_t *tokens,
                            double *wall_ms, sf_cuda_stage_times *stages) {
    const double t0 = now_ms();
    sf_status st = sf_cuda_engine_step(e, step);
    if (st != SF_OK) return st;
    st = sf_cuda_engine_read_tokens(e, tokens, step->n_requests);
    if (st != SF_OK) return st;
    *wall_ms = now_ms() - t0;
    return sf_cuda_engine_stage_times(e, stages);
}

/* Decode timing: from a guarded prefill (gstep) of every slot, `steps` decode steps of the R
 * requests with the given setting (the last one's tokens read each step, and with logprobs
 * their log-probabilities too: what a server asking for them waits for). The first step's wall
 * time (it captures the graph), then the medians over the rest of the wall and device times. */
typedef struct decode_times {
    double first, wall_med, device_med;
    bool in_range;
} decode_times;

static sf_status bench_decode(sf_cuda_engine *e, const sf_cuda_step *gstep,
                              const sf_sampling *setting, int steps, int vocab, int32_t *tokens,
                              decode_times *out) {
    const int R = gstep->n_requests;
    sf_status st = reset_slots(e, R);
    double w;
    sf_cuda_stage_times s;
    if (st == SF_OK) st = timed_step(e, gstep, tokens, &w, &s);
    double *dw = malloc((size_t)steps * sizeof *dw), *dd = malloc((size_t)steps * sizeof *dd);
    float *lp = malloc((size_t)R * (setting->top_logprobs + 1) * sizeof *lp);
    int32_t *ids = malloc((size_t)R * (setting->top_logprobs + 1) * sizeof *ids);
    if (st == SF_OK && (!dw || !dd || !lp || !ids)) {
        printf("  ERROR bench_decode: out of host memory\n");
        st = SF_ERR_OUT_OF_MEMORY;
    }
    const sf_cuda_step dstep = {.n_requests = R, .slots = gstep->slots, .sampling = setting};
    out->in_range = true;
    for (int i = 0; i < steps && st == SF_OK; i++) {
        const double t0 = now_ms();
        st = sf_cuda_engine_step(e, &dstep);
        if (st == SF_OK) st = sf_cuda_engine_read_tokens(e, tokens, R);
        if (st == SF_OK && (setting->logprobs || setting->top_logprobs > 0)) {
            st = sf_cuda_engine_read_logprobs(e, lp, R);
        }
        if (st == SF_OK && setting->top_logprobs > 0) {
            st = sf_cuda_engine_read_top_logprobs(e, ids, lp, R, setting->top_logprobs);
        }
        dw[i] = now_ms() - t0;
        if (st == SF_OK) st = sf_cuda_engine_stage_times(e, &s);
        dd[i] = s.total_ms;
        if (st == SF_OK && !tokens_in_range(tokens, R, vocab)) out->in_range = false;
    }
    if (st == SF_OK && steps > 0) {
        out->first = dw[0];
        out->wall_med = steps > 1 ? bench_median(dw + 1, steps - 1) : dw[0];
        out->device_med = steps > 1 ? bench_median(dd + 1, steps - 1) : dd[0];
    }
    free(dw);
    free(dd);
    free(lp);
    free(ids);
    return st;
}

/* Warm-up 1, then opt->repeats prefills from empty slots. Fills the medians; *same is whether
 * every repeat sampled the same tokens as the warm-up (greedy decoding is deterministic). */
static sf_status bench_prefill(sf_cuda_engine *e, const sf_cuda_step *step, int repeats,
                               int vocab, int32_t *tokens, int32_t *first, double *wall_med,
                               sf_cuda_stage_times *stage_med, bool *same, bool *in_range) {
    double wall[MAX_REPEATS] = {0};
    sf_cuda_stage_times stages[MAX_REPEATS];
    *same = true;
    *in_range = true;
    for (int it = -1; it < repeats; it++) {
        sf_status st = reset_slots(e, step->n_requests);
        if (st != SF_OK) return st;
        double w;
        sf_cuda_stage_times s;
        st = timed_step(e, step, tokens, &w, &s);
        if (st != SF_OK) return st;
        if (!tokens_in_range(tokens, step->n_requests, vocab)) *in_range = false;
        if (it < 0) {
            memcpy(first, tokens, (size_t)step->n_requests * sizeof *tokens);
        } else {
            if (memcmp(first, tokens, (size_t)step->n_requests * sizeof *tokens)) *same = false;
            wall[it] = w;
            stages[it] = s;
        }
    }
    *wall_med = bench_median(wall, repeats);
    *stage_med = median_stages(stages, repeats);
    return SF_OK;
}

static void print_stages(const char *label, const sf_cuda_stage_times *s) {
    printf("  %-22s upload %7.3f  embed %7.3f  sysformer %7.3f  layers %8.3f  head %7.3f  "
           "sample %7.3f  total %8.3f ms\n",
           label, s->upload_ms, s->embed_ms, s->sysformer_ms, s->layers_ms, s->head_ms,
           s->sample_ms, s->total_ms);
}

/* --serve, online: request i arrives at arrive_ms[i] after the start (in order); a serving loop
 * (sf_cuda_session_*) submits what has arrived, runs one round, and waits for the next arrival
 * when idle. Each token's time comes from the stream callback, after its round. */
typedef struct online_log {
    double t0, *first, *last; /* ms since t0 of each request's first and last token */
} online_log;

static bool online_token(void *user, int32_t request, int32_t token, const char *text,
                         size_t len) {
    (void)token, (void)text, (void)len;
    online_log *log = user;
    const double t = now_ms() - log->t0;
    if (log->first[request] < 0) log->first[request] = t;
    log->last[request] = t;
    return true;
}

/* Time to first token (arrival to first token) and time per output token (first to last over
 * the tokens after the first) at the quantiles that serving targets quote; tokens/s over the
 * run. False when a call fails or a request ends before its limit. */
static bool bench_online(sf_cuda_engine *e, const char *name, const options *o, int N,
                         const int32_t *all, int P, const sf_prompt_spans *sp,
                         const int32_t *limit, long want, double rate) {
    double *arrive = malloc((size_t)N * sizeof(double)), *ttft = malloc((size_t)N * sizeof(double));
    double *tpot = malloc((size_t)N * sizeof(double));
    online_log times = {0, malloc((size_t)N * sizeof(double)), malloc((size_t)N * sizeof(double))};
    sf_cuda_session *s = NULL;
    bool ok = arrive && ttft && tpot && times.first && times.last;
    if (!ok) printf("  ERROR out of host memory\n");
    /* Poisson arrivals at `rate` requests/s, from the option's seed */
    uint64_t rng = o->seed * 0x9E3779B97F4A7C15ull + 91u;
    for (int i = 0; ok && i < N; i++) {
        const double u = ((double)(splitmix64(&rng) >> 11) + 0.5) * 0x1.0p-53;
        arrive[i] = (i ? arrive[i - 1] : 0.0) - log(u) / rate * 1e3;
        times.first[i] = times.last[i] = -1.0;
    }
    sf_status st = ok ? sf_cuda_session_create(e, NULL, NULL, 0, NULL, 0, &s) : SF_OK;
    int next = 0, rounds = 0;
    int32_t running = 0, waiting = 0;
    times.t0 = now_ms();
    while (ok && st == SF_OK && (next < N || running > 0 || waiting > 0)) {
        const double t = now_ms() - times.t0;
        for (; st == SF_OK && next < N && arrive[next] <= t; next++) {
            const sf_sampling greedy = {.temperature = 0.0f, .top_p = 1.0f};
            int32_t id = -1;
            st = sf_cuda_session_submit(s, all + (size_t)next * P, P, &sp[next], &greedy,
                                        limit[next], &id);
            waiting++;
        }
        if (st != SF_OK) break;
        if (running == 0 && waiting == 0) { /* idle: spin until the next arrival */
            while (now_ms() - times.t0 < arrive[next]) {
            }
            continue;
        }
        st = sf_cuda_session_step(s, online_token, &times, &running, &waiting);
        rounds++;
    }
    const double wall = now_ms() - times.t0;
    if (st != SF_OK) {
        printf("  ERROR serving session: %s: %s\n", sf_status_string(st), sf_last_error());
        ok = false;
    }
    long got = 0;
    int n_tpot = 0;
    for (int i = 0; ok && i < N; i++) {
        sf_generation_result res = {0};
        bool done = false;
        ok = sf_cuda_session_take(s, i, &res, &done) == SF_OK && done && res.n_tokens == limit[i];
        got += res.n_tokens;
        ttft[i] = times.first[i] - arrive[i];
        if (res.n_tokens > 1) {
            tpot[n_tpot++] = (times.last[i] - times.first[i]) / (res.n_tokens - 1);
        }
        sf_generation_result_free(&res);
    }
    if (ok && got != want) ok = false;
    if (!ok && st == SF_OK) printf("  ERROR online serving: a request ended before its limit\n");
    if (ok) {
        const double p50 = bench_quantile(ttft, N, 0.5), p90 = bench_quantile(ttft, N, 0.9),
                     p99 = bench_quantile(ttft, N, 0.99);
        const double q50 = bench_quantile(tpot, n_tpot, 0.5),
                     q90 = bench_quantile(tpot, n_tpot, 0.9);
        printf("  %-22s %d requests arriving at %.1f/s (Poisson), %d rounds: %.0f tokens/s; time "
               "to first token p50 %.2f p90 %.2f p99 %.2f ms; per output token p50 %.3f p90 "
               "%.3f ms\n",
               "serving online", N, rate, rounds, want / (wall * 1e-3), p50, p90, p99, q50, q90);
        printf("SUMMARY serve_online %s requests=%d slots=%d rate=%.1f tok_s=%.0f ttft_p50_ms=%.2f "
               "ttft_p90_ms=%.2f ttft_p99_ms=%.2f tpot_p50_ms=%.3f tpot_p90_ms=%.3f\n",
               name, N, o->requests, rate, want / (wall * 1e-3), p50, p90, p99, q50, q90);
    }
    sf_cuda_session_free(s);
    free(arrive);
    free(ttft);
    free(tpot);
    free(times.first);
    free(times.last);
    return ok;
}

/* --serve: continuous batching against static batches on engine e (R slots), N requests
 * built from the R prompts in ids/cu/spans (request i is prompt i mod R), reply limits from the
 * option's seed. Prints one line and a SUMMARY line; false when a call fails or a request ends
 * before its limit. */
static bool bench_serving(sf_cuda_engine *e, const char *name, const options *o,
                          const int32_t *ids, const sf_prompt_spans *spans) {
    const int N = o->serve, R = o->requests, P = o->prompt;
    int32_t *all = malloc((size_t)N * (size_t)P * sizeof *all);
    int32_t *cu = malloc((size_t)(N + 1) * sizeof *cu);
    int32_t *limit = malloc((size_t)N * sizeof *limit);
    sf_prompt_spans *sp = malloc((size_t)N * sizeof *sp);
    sf_generation_result *res = calloc((size_t)N, sizeof *res);
    bool ok = all && cu && limit && sp && res;
    if (!ok) printf("  ERROR out of host memory\n");
    uint64_t rng = o->seed * 0x9E3779B97F4A7C15ull + 77u;
    long want = 0;
    for (int i = 0; ok && i <= N; i++) cu[i] = i * P;
    for (int i = 0; ok && i < N; i++) {
        memcpy(all + (size_t)i * P, ids + (size_t)(i % R) * P, (size_t)P * sizeof *all);
        sp[i] = spans[i % R];
        limit[i] = 1 + (int32_t)(splitmix64(&rng) % (uint64_t)o->decode);
        want += limit[i];
    }
    double wall[2] = {0, 0};
    for (int way = 0; ok && way < 2; way++) { /* 0: one call over all N, 1: batches of R */
        const double t0 = now_ms();
        for (int first = 0; ok && first < N; first += way ? R : N) {
            /* every prompt has P tokens, so cu[0 .. n] are the offsets of any n of them */
            const int n = way ? (N - first < R ? N - first : R) : N;
            const sf_generation g = {.n_requests = n,
                                     .cu_seqlens = cu,
                                     .token_ids = all + (size_t)first * P,
                                     .spans = sp + first,
                                     .max_new_tokens = o->decode,
                                     .sampling = {.temperature = 0.0f, .top_p = 1.0f},
                                     .request_max_new_tokens = limit + first};
            const sf_status st = sf_generate_cuda(e, NULL, &g, NULL, NULL, res + first);
            if (st != SF_OK) {
                printf("  ERROR sf_generate_cuda (%s): %s: %s\n",
                       way ? "static batches" : "continuous", sf_status_string(st),
                       sf_last_error());
                ok = false;
            }
        }
        wall[way] = now_ms() - t0;
        long got = 0;
        for (int i = 0; ok && i < N; i++) {
            got += res[i].n_tokens;
            ok = res[i].n_tokens == limit[i];
            sf_generation_result_free(&res[i]);
        }
        if (ok && got != want) ok = false;
        if (!ok) printf("  ERROR serving: a request ended before its limit\n");
    }
    if (ok) {
        const double c_tok_s = want / (wall[0] * 1e-3), s_tok_s = want / (wall[1] * 1e-3);
        printf("  %-22s %d requests, %ld tokens (limits 1..%d): continuous %.0f tokens/s "
               "(%.0f ms), static batches of %d %.0f tokens/s (%.0f ms): %.2fx\n",
               "serving", N, want, o->decode, c_tok_s, wall[0], R, s_tok_s, wall[1],
               c_tok_s / s_tok_s);
        printf("SUMMARY serve %s requests=%d slots=%d continuous_tok_s=%.0f static_tok_s=%.0f "
               "ratio=%.2f\n",
               name, N, R, c_tok_s, s_tok_s, c_tok_s / s_tok_s);
        /* the same requests arriving over time, at 80% of the rate the continuous run sustained */
        const double rate = 0.8 * N / (wall[0] * 1e-3);
        ok = bench_online(e, name, o, N, all, P, sp, limit, want, rate);
    }
    free(all);
    free(cu);
    free(limit);
    free(sp);
    free(res);
    return ok;
}

/* ---------------------------------------------------------------------------------------- */
/* One config                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* The engine options of one config's run: every request in one step. */
static sf_cuda_engine_options engine_options(const options *o) {
    sf_cuda_engine_options eo = sf_cuda_engine_default_options();
    eo.max_slots = o->requests;
    eo.max_context = o->prompt + o->decode;
    eo.max_batch_tokens = o->requests * o->prompt;
    eo.cuda_graphs = o->graphs;
    eo.attention = o->attention;
    return eo;
}

/* What the device-free plan says the full engine and a serving stack's guard-only engine (with
 * its own embedding table, and on the stack's) would hold. */
static sf_status print_plans(const sf_llm_config *c, const sf_sysformer_config *sc,
                             const sf_cuda_engine_options *eo) {
    sf_cuda_memory full, guard, borrowed;
    sf_status st = sf_cuda_engine_plan(c, sc, eo, &full);
    sf_cuda_engine_options go = *eo;
    go.guard_only = true;
    if (st == SF_OK) st = sf_cuda_engine_plan(c, sc, &go, &guard);
    go.embedding_table = &go; /* the plan only asks whether a table is lent */
    if (st == SF_OK) st = sf_cuda_engine_plan(c, sc, &go, &borrowed);
    if (st != SF_OK) {
        printf("  ERROR sf_cuda_engine_plan: %s: %s\n", sf_status_string(st), sf_last_error());
        return st;
    }
    printf("  plan, device memory GiB: full engine weights %.2f  kv_cache %.2f  activations "
           "%.2f  total %.2f\n",
           gib(full.weights), gib(full.kv_cache), gib(full.activations), gib(full.total));
    printf("  a guard-only engine (sf_cuda_guarded_embed alone, for a stack with its own LLM): "
           "weights %.2f  activations %.2f  total %.2f; %.2f in all on the stack's embedding "
           "table\n",
           gib(guard.weights), gib(guard.activations), gib(guard.total), gib(borrowed.total));
    return SF_OK;
}

static int bench_config(const char *name, const options *o) {
    sf_llm_config c;
    const char *note;
    if (!bench_llm_config(name, &c, &note)) {
        printf("\n== %s: unknown config (known: llama3.1-8b, mistral-7b, phi3.5-mini, "
               "smollm2-135m)\nSUMMARY %s FAILED\n", name, name);
        return 1;
    }
    const sf_sysformer_config sc = make_sysformer_config(&c);
    const int R = o->requests, P = o->prompt, S = o->system, U = o->user;
    const int64_t T = (int64_t)R * P;
    const int d = c.hidden_size, V = c.vocab_size;

    printf("\n== %s: d %d, ff %d, layers %d, heads %d/%d, hd %d, vocab %d%s; %s\n", name, d,
           c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, V,
           c.tie_word_embeddings ? ", tied" : "", note);
    printf("   sysformer: %d layers, %d heads (hd %d), ff %d, relu, norm_first; %d requests x "
           "%d tokens (S %d, U %d), decode %d\n",
           sc.num_layers, sc.num_heads, sc.d_model / sc.num_heads, sc.dim_feedforward, R, P, S,
           U, o->decode);
    fflush(stdout);

    int rc = 1;
    bool ok = true, summary = false;
    sf_cuda_engine *e = NULL;
    int32_t *ids = NULL, *cu = NULL, *slots = NULL, *tokens = NULL, *first = NULL;
    sf_prompt_spans *spans = NULL;
    void *d_embeds = NULL, *d_cu = NULL, *d_ids = NULL, *d_spans = NULL;
    int *d_errors = NULL;
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    uint16_t *probe = NULL;

    if ((int64_t)P + o->decode > c.max_position_embeddings) {
        printf("  ERROR prompt + decode exceeds max_position_embeddings %d\n",
               c.max_position_embeddings);
        goto done;
    }

    /* Prompts. */
    ids = malloc((size_t)T * sizeof *ids);
    cu = malloc((size_t)(R + 1) * sizeof *cu);
    slots = malloc((size_t)R * sizeof *slots);
    tokens = malloc((size_t)R * sizeof *tokens);
    first = malloc((size_t)R * sizeof *first);
    spans = malloc((size_t)R * sizeof *spans);
    probe = malloc((size_t)d * sizeof *probe);
    if (!ids || !cu || !slots || !tokens || !first || !spans || !probe) {
        printf("  ERROR out of host memory\n");
        goto done;
    }
    uint64_t rng = o->seed * 0x2545f4914f6cdd1dull + 12345u;
    for (int64_t i = 0; i < T; i++) ids[i] = (int32_t)(splitmix64(&rng) % (uint64_t)V);
    for (int r = 0; r <= R; r++) cu[r] = r * P;
    for (int r = 0; r < R; r++) {
        slots[r] = r;
        spans[r] = (sf_prompt_spans){.prefix = 5, .system = S, .middle = 5, .user = U,
                                     .suffix = P - 10 - S - U};
    }

    /* Engine. */
    const sf_cuda_engine_options eo = engine_options(o);
    const double tc0 = now_ms();
    SF_TRY("sf_cuda_engine_create_random", sf_cuda_engine_create_random(&c, &sc, o->seed, &eo,
                                                                         &e));
    cudaDeviceSynchronize();
    const double create_ms = now_ms() - tc0;
    sf_cuda_memory mem;
    SF_TRY("sf_cuda_engine_memory", sf_cuda_engine_memory(e, &mem));
    printf("  created in %.0f ms; device memory GiB: weights %.2f  kv_cache %.2f  activations "
           "%.2f  total %.2f\n",
           create_ms, gib(mem.weights), gib(mem.kv_cache), gib(mem.activations),
           gib(mem.total));
    if (print_plans(&c, &sc, &eo) != SF_OK) goto done;
    SF_TRY("sf_cuda_engine_set_timing", sf_cuda_engine_set_timing(e, true));

    const sf_sampling greedy = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 0};
    const double f_llm = llm_prefill_flops(&c, R, P);
    const double f_sys = bench_sysformer_flops(&sc, R, S, U);
    const double f_layers = 2.0 * (double)T * c.num_layers * bench_layer_weights(&c)
                            + 4.0 * c.head_dim * c.num_heads * c.num_layers *
                                  (R * bench_causal_pairs(&c, P));
    printf("  FLOPs per prefill: LLM %.3f T (layers %.3f T), Sysformer %.4f T (%.2f%% of "
           "guarded)\n",
           f_llm * 1e-12, f_layers * 1e-12, f_sys * 1e-12, 100.0 * f_sys / (f_llm + f_sys));

    /* Guarded prefill. */
    sf_cuda_step gstep = {.n_requests = R, .slots = slots, .cu_seqlens = cu, .token_ids = ids,
                          .spans = spans, .sampling = &greedy, .uniforms = NULL};
    double g_ms;
    sf_cuda_stage_times g_st;
    bool g_same, g_range;
    SF_TRY("guarded prefill", bench_prefill(e, &gstep, o->repeats, V, tokens, first, &g_ms,
                                            &g_st, &g_same, &g_range));
    const double g_tok_s = (double)T / (g_ms * 1e-3);
    const double g_tflops = (f_llm + f_sys) / (g_ms * 1e-3) * 1e-12;
    const double g_mfu = 100.0 * g_tflops / o->peak_tflops;
    const double share = g_st.total_ms > 0 ? 100.0 * g_st.sysformer_ms / g_st.total_ms : NAN;

    /* Unguarded prefill of the same tokens. */
    sf_cuda_step ustep = gstep;
    ustep.spans = NULL;
    double u_ms;
    sf_cuda_stage_times u_st;
    bool u_same, u_range;
    SF_TRY("unguarded prefill", bench_prefill(e, &ustep, o->repeats, V, tokens, first, &u_ms,
                                              &u_st, &u_same, &u_range));
    const double u_tok_s = (double)T / (u_ms * 1e-3);
    const double u_tflops = f_llm / (u_ms * 1e-3) * 1e-12;

    printf("  %-22s %10s %12s %9s %7s  %s\n", "", "wall ms", "tokens/s", "TFLOP/s", "MFU",
           "checks");
    printf("  %-22s %10.3f %12.0f %9.1f %6.1f%%  tokens %s, repeats %s\n", "guarded prefill",
           g_ms, g_tok_s, g_tflops, g_mfu, g_range ? "in range" : "OUT OF RANGE",
           g_same ? "identical" : "DIFFER");
    printf("  %-22s %10.3f %12.0f %9.1f %6.1f%%  tokens %s, repeats %s\n", "unguarded prefill",
           u_ms, u_tok_s, u_tflops, 100.0 * u_tflops / o->peak_tflops,
           u_range ? "in range" : "OUT OF RANGE", u_same ? "identical" : "DIFFER");
    print_stages("guarded stages", &g_st);
    print_stages("unguarded stages", &u_st);
    printf("  sysformer share %.2f%% of the guarded step (stage sysformer / total); guard cost "
           "%+.2f%% wall vs unguarded; LLM layers alone %.1f TFLOP/s (%.1f%% of peak)\n",
           share, 100.0 * (g_ms / u_ms - 1.0),
           g_st.layers_ms > 0 ? f_layers / (g_st.layers_ms * 1e-3) * 1e-12 : NAN,
           g_st.layers_ms > 0 ? 100.0 * f_layers / (g_st.layers_ms * 1e-3) * 1e-12 /
                                    o->peak_tflops
                              : NAN);

    /* Decode after a guarded prefill: step with token_ids = NULL, read tokens each step; with
     * --top-logprobs, again taking log-probabilities (the same steps otherwise). */
    double d_med = NAN, d_tok_s = NAN;
    if (o->decode > 0) {
        decode_times dt;
        SF_TRY("decode", bench_decode(e, &gstep, &greedy, o->decode, V, tokens, &dt));
        const int32_t len0 = sf_cuda_engine_slot_length(e, 0);
        ok = ok && dt.in_range && len0 == P + o->decode;
        d_med = dt.wall_med;
        d_tok_s = R / (d_med * 1e-3);
        const double ctx = P + 0.5 * o->decode;
        printf("  %-22s first %.3f ms%s, then median %.3f ms wall / %.3f ms "
               "device per step: %.0f tokens/s, ~%.0f GB/s of weights+KV; tokens %s, slot 0 "
               "length %d (expect %d)\n",
               "decode", dt.first, o->graphs ? " (graph capture)" : "", d_med, dt.device_med,
               d_tok_s, decode_bytes(&c, R, ctx) / (d_med * 1e-3) * 1e-9,
               dt.in_range ? "in range" : "OUT OF RANGE", len0, P + o->decode);
        if (o->top_logprobs > 0) {
            sf_sampling with = greedy;
            with.logprobs = true;
            with.top_logprobs = o->top_logprobs;
            decode_times lt;
            SF_TRY("decode with log-probabilities",
                   bench_decode(e, &gstep, &with, o->decode, V, tokens, &lt));
            ok = ok && lt.in_range;
            printf("  %-22s median %.3f ms wall / %.3f ms device per step (%+.2f%% wall, "
                   "%+.2f%% device against plain decode); tokens %s\n",
                   "decode + logprobs", lt.wall_med, lt.device_med,
                   100.0 * (lt.wall_med / d_med - 1.0),
                   100.0 * (lt.device_med / dt.device_med - 1.0),
                   lt.in_range ? "in range" : "OUT OF RANGE");
            printf("SUMMARY %s decode_logprobs top=%d decode_ms=%.3f logprobs_decode_ms=%.3f\n",
                   name, o->top_logprobs, d_med, lt.wall_med);
        }
    }

    /* The integration entry point: guarded embeddings into a caller-owned device buffer. */
    {
        CUDA_TRY("cudaMalloc embeds", cudaMalloc(&d_embeds, (size_t)T * (size_t)d * 2));
        CUDA_TRY("cudaMalloc cu_seqlens", cudaMalloc(&d_cu, (size_t)(R + 1) * sizeof *cu));
        CUDA_TRY("cudaMalloc token ids", cudaMalloc(&d_ids, (size_t)T * sizeof *ids));
        CUDA_TRY("cudaMalloc spans", cudaMalloc(&d_spans, (size_t)R * sizeof *spans));
        CUDA_TRY("cudaMalloc errors", cudaMalloc((void **)&d_errors, sizeof(int)));
        CUDA_TRY("cudaMemcpy cu_seqlens", cudaMemcpy(d_cu, cu, (size_t)(R + 1) * sizeof *cu,
                                                     cudaMemcpyHostToDevice));
        CUDA_TRY("cudaMemcpy ids",
                 cudaMemcpy(d_ids, ids, (size_t)T * sizeof *ids, cudaMemcpyHostToDevice));
        CUDA_TRY("cudaMemcpy spans", cudaMemcpy(d_spans, spans, (size_t)R * sizeof *spans,
                                                cudaMemcpyHostToDevice));
        CUDA_TRY("cudaMemset errors", cudaMemset(d_errors, 0, sizeof(int)));
        CUDA_TRY("cudaMemset embeds", cudaMemset(d_embeds, 0xff, (size_t)T * (size_t)d * 2));
        /* The copies and memsets above are on the legacy stream, which the engine's
         * non-blocking stream does not wait for: they must have landed first. */
        CUDA_TRY("cudaDeviceSynchronize", cudaDeviceSynchronize());
        CUDA_TRY("cudaEventCreate", cudaEventCreate(&ev0));
        CUDA_TRY("cudaEventCreate", cudaEventCreate(&ev1));
        cudaStream_t stream = (cudaStream_t)sf_cuda_engine_stream(e);
        double ge[MAX_REPEATS];
        for (int it = -1; it < o->repeats; it++) {
            CUDA_TRY("cudaEventRecord", cudaEventRecord(ev0, stream));
            SF_TRY("sf_cuda_guarded_embed",
                   sf_cuda_guarded_embed(e, R, (int32_t)T, (const int32_t *)d_cu,
                                         (const int32_t *)d_ids,
                                         (const sf_prompt_spans *)d_spans, S, U, d_embeds,
                                         d_errors, stream));
            CUDA_TRY("cudaEventRecord", cudaEventRecord(ev1, stream));
            CUDA_TRY("cudaEventSynchronize", cudaEventSynchronize(ev1));
            float ms = 0;
            CUDA_TRY("cudaEventElapsedTime", cudaEventElapsedTime(&ms, ev0, ev1));
            if (it >= 0) ge[it] = ms;
        }
        const double ge_ms = bench_median(ge, o->repeats);
        int n_err = -1;
        CUDA_TRY("cudaMemcpy errors",
                 cudaMemcpy(&n_err, d_errors, sizeof n_err, cudaMemcpyDeviceToHost));
        /* Probe the first system row and the last row of the batch: finite after poisoning. */
        int bad = 0;
        const int64_t rows[2] = {5, T - 1};
        for (int k = 0; k < 2; k++) {
            CUDA_TRY("cudaMemcpy probe",
                     cudaMemcpy(probe, (const char *)d_embeds + (size_t)rows[k] * (size_t)d * 2,
                                (size_t)d * 2, cudaMemcpyDeviceToHost));
            for (int j = 0; j < d; j++)
                if (!isfinite(bf16_to_float(probe[j]))) bad++;
        }
        const double ge_bytes = (double)T * d * 2.0 * 2.0; /* gather read + write, bf16 */
        printf("  %-22s %.3f ms median (CUDA events, caller's stream): %.1f TFLOP/s of "
               "Sysformer, %.0f GB/s gather+write; d_errors %d, probed rows %s\n",
               "sf_cuda_guarded_embed", ge_ms, f_sys / (ge_ms * 1e-3) * 1e-12,
               ge_bytes / (ge_ms * 1e-3) * 1e-9, n_err, bad ? "NON-FINITE" : "finite");
        /* prefill_* and mfu: the guarded step (LLM + Sysformer FLOPs); unguarded_*: the LLM
         * alone, which is what peer_e2e.py's prefill_tok_s and mfu measure */
        printf("SUMMARY %s prefill_tok_s=%.0f mfu=%.1f%% sysformer_share=%.2f%% "
               "decode_tok_s=%.0f unguarded_tok_s=%.0f unguarded_mfu=%.1f%% decode_ms=%.3f "
               "guarded_embed_ms=%.3f\n",
               name, g_tok_s, g_mfu, share, d_tok_s, u_tok_s, 100.0 * u_tflops / o->peak_tflops,
               d_med, ge_ms);
        summary = true;
        ok = ok && g_same && g_range && u_same && u_range && n_err == 0 && !bad;
        rc = ok ? 0 : 1;
        if (!ok) printf("  CHECK FAILED: see the checks above\n");
    }
    if (o->serve > 0) {
        SF_TRY("sf_cuda_engine_set_timing", sf_cuda_engine_set_timing(e, false));
        if (!bench_serving(e, name, o, ids, spans)) rc = 1;
    }

done:
    if (!summary) printf("SUMMARY %s FAILED\n", name);
    fflush(stdout);
    if (ev0) cudaEventDestroy(ev0);
    if (ev1) cudaEventDestroy(ev1);
    cudaFree(d_embeds);
    cudaFree(d_cu);
    cudaFree(d_ids);
    cudaFree(d_spans);
    cudaFree(d_errors);
    sf_cuda_engine_free(e);
    free(ids);
    free(cu);
    free(slots);
    free(tokens);
    free(first);
    free(spans);
    free(probe);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */

/* Without a device: the memory each config's engines would take, from the device-free plan. */
static int plans_only(const options *o) {
    printf("device memory plans (sf_cuda_engine_plan, no device needed) for %d requests x %d "
           "tokens, decode %d:\n",
           o->requests, o->prompt, o->decode);
    const sf_cuda_engine_options eo = engine_options(o);
    int failed = 0;
    char *list = strdup(o->configs);
    if (!list) return 1;
    char *save = NULL;
    for (char *name = strtok_r(list, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        sf_llm_config c;
        const char *note;
        if (!bench_llm_config(name, &c, &note)) {
            printf("\n== %s: unknown config\n", name);
            failed++;
            continue;
        }
        const sf_sysformer_config sc = make_sysformer_config(&c);
        printf("\n== %s (Sysformer: %d layers, ff %d)\n", name, sc.num_layers,
               sc.dim_feedforward);
        failed += print_plans(&c, &sc, &eo) != SF_OK;
    }
    free(list);
    return failed ? 1 : 0;
}

static int usage(void) {
    fprintf(stderr,
            "usage: bench_engine [--configs llama3.1-8b,mistral-7b,phi3.5-mini,smollm2-135m] "
            "[--requests 32] [--prompt 512] [--system 64] [--user 384] [--decode 32] "
            "[--repeats 5] [--seed 1] [--peak 989] [--no-graphs] "
            "[--attention auto|mma|wgmma|wgmma_ws] [--serve N] [--top-logprobs N]\n");
    return 2;
}

int main(int argc, char **argv) {
    options o = {.configs = "llama3.1-8b,mistral-7b,phi3.5-mini,smollm2-135m",
                 .requests = 32, .prompt = 512, .system = 64, .user = 384, .decode = 32,
                 .repeats = 5, .seed = 1, .peak_tflops = 989.0, .graphs = true};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--no-graphs")) {
            o.graphs = false;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        }
        if (i + 1 >= argc) return usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--configs")) o.configs = v;
        else if (!strcmp(a, "--requests")) o.requests = atoi(v);
        else if (!strcmp(a, "--prompt")) o.prompt = atoi(v);
        else if (!strcmp(a, "--system")) o.system = atoi(v);
        else if (!strcmp(a, "--user")) o.user = atoi(v);
        else if (!strcmp(a, "--decode")) o.decode = atoi(v);
        else if (!strcmp(a, "--repeats")) o.repeats = atoi(v);
        else if (!strcmp(a, "--serve")) o.serve = atoi(v);
        else if (!strcmp(a, "--top-logprobs")) {
            o.top_logprobs = atoi(v);
            if (o.top_logprobs < 0 || o.top_logprobs > SF_MAX_TOP_LOGPROBS) return usage();
        }
        else if (!strcmp(a, "--seed")) o.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--peak")) o.peak_tflops = atof(v);
        else if (!strcmp(a, "--attention")) {
            if (!strcmp(v, "auto")) o.attention = SF_ATTENTION_AUTO;
            else if (!strcmp(v, "mma")) o.attention = SF_ATTENTION_MMA;
            else if (!strcmp(v, "wgmma")) o.attention = SF_ATTENTION_WGMMA;
            else if (!strcmp(v, "wgmma_ws")) o.attention = SF_ATTENTION_WGMMA_WS;
            else {
                fprintf(stderr,
                        "bench_engine: --attention is auto, mma, wgmma or wgmma_ws, not '%s'\n", v);
                return usage();
            }
        } else {
            fprintf(stderr, "bench_engine: unknown option %s\n", a);
            return usage();
        }
    }
    if (o.requests < 1 || o.system < 1 || o.user < 1 || o.decode < 0 || o.decode > 100000 ||
        o.repeats < 1 || o.repeats > MAX_REPEATS || !(o.peak_tflops > 0) || o.serve < 0 ||
        (o.serve > 0 && o.decode < 1) || (int64_t)o.serve * o.prompt > INT32_MAX / 2 ||
        o.prompt < 10 + o.system + o.user + 1 ||
        (int64_t)o.requests * o.prompt > INT32_MAX / 2) {
        fprintf(stderr, "bench_engine: bad sizes (need prompt >= 10 + system + user + 1, "
                        "1 <= repeats <= %d)\n", MAX_REPEATS);
        return 2;
    }

    int count = 0;
    if (!sf_cuda_built() || sf_cuda_device_count(&count) != SF_OK || count <= 0) {
        printf("bench_engine: no CUDA device; nothing to measure\n");
        return sf_cuda_built() ? plans_only(&o) : 0;
    }
    struct cudaDeviceProp prop;
    memset(&prop, 0, sizeof prop);
    if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) snprintf(prop.name, 8, "unknown");
    printf("bench_engine: %s (%d SMs, %.0f GiB); %d requests x %d tokens = %d packed tokens "
           "per prefill (prefix 5 | system %d | middle 5 | user %d | suffix %d), decode %d "
           "steps, median of %d after 1 warm-up, CUDA graphs %s, attention %s\n",
           prop.name, prop.multiProcessorCount, gib(prop.totalGlobalMem), o.requests, o.prompt,
           o.requests * o.prompt, o.system, o.user, o.prompt - 10 - o.system - o.user,
           o.decode, o.repeats, o.graphs ? "on" : "off",
           o.attention == SF_ATTENTION_WGMMA_WS ? "wgmma_ws"
           : o.attention == SF_ATTENTION_WGMMA ? "wgmma"
           : o.attention == SF_ATTENTION_MMA ? "mma" : "auto");
    printf("assumptions: random bf16 weights drawn on the device; greedy sampling; MFU against "
           "%.0f TFLOP/s dense bf16 (H200 spec; a measured 8192^3 bf16 GEMM reaches ~790);\n"
           "  FLOPs = 2*T*L*[d*hd*(2H+2Hkv) + 3*d*ff] + 4*hd*H*L*causal_pairs + 2*d*V*R "
           "(LM head, 1 row/request) + Sysformer GEMMs and attention (guarded only);\n"
           "  Phi-3.5-mini runs with DEFAULT RoPE (theta 1e4) in place of longrope: same cost, "
           "only shapes matter for throughput\n",
           o.peak_tflops);

    int failed = 0;
    char *list = strdup(o.configs);
    if (!list) return 1;
    char *save = NULL;
    for (char *name = strtok_r(list, ",", &save); name; name = strtok_r(NULL, ",", &save))
        failed += bench_config(name, &o) != 0;
    free(list);
    printf("\nbench_engine: %s\n", failed ? "some configs failed (see ERROR lines)" : "done");
    return failed ? 1 : 0;
}
