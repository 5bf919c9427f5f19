/* sf_cuda_engine_step: host-side validation, one packed upload through pinned staging, then
 * the whole step on the engine's stream, and the read-back of the sampled ids.
 *
 * The stages (NVTX-named, and timed with CUDA events when timing is on):
 *   upload     ids, offsets, spans, slots: pinned host -> device, asynchronous
 *   embed      step layout (positions, cache rows, attention offsets; slot lengths advanced),
 *              embedding gather
 *   sysformer  guarded prefill only: the Sysformer rewrites the system rows in place
 *   layers     the LLM's decoder layers
 *   head       last row of each request: final norm, LM head (fp32 logits)
 *   sample     the uniforms uploaded, token choice on the device (one pass per group of
 *              requests with one setting), remembered per slot, the picks' log-probabilities
 *              when asked, copied back asynchronously
 * Nothing in a step waits for the device, with one exception that a caller never meets in a
 * read-tokens loop: the pinned staging is reused, so a step first waits until the previous
 * step's upload has been consumed.
 *
 * Decode steps (every request one token, the one last sampled for its slot) read their inputs
 * from the device and the staging only, so with cuda_graphs they are captured once per batch
 * size (and sampling setting) and replayed: the upload memcpys are graph nodes reading the same
 * pinned buffers, whose contents change between replays. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "cuda/engine.h"
#include "embedding.h"
#include "guard.h"
#include "loss.h"
#include "sampling.h"

/* What validation learns about a step. */
typedef struct step_info {
    int32_t n, tokens, max_q_len, max_system, max_user;
    bool decode, guarded;
    bool sample, greedy; /* some request samples; every one that does is greedy (no uniforms) */
    bool reorder;        /* the requests run grouped by sampling setting (e->order)          */
    bool logprobs;       /* some request's setting asks for log-probabilities                 */
    int32_t n_top;       /* the most likely tokens a row: the largest top_logprobs asked      */
} step_info;

static bool is_greedy(const sf_sampling *s) { return !(s->temperature > 0.0f); }

/* The setting request r of a sampling step picks with. */
static const sf_sampling *setting(const sf_cuda_step *s, int32_t r) {
    return s->request_sampling ? &s->request_sampling[r] : s->sampling;
}

sf_status sf_cuda_check_prompt(const sf_cuda_engine *e, const char *who, int64_t r,
                               const int32_t *ids, int32_t n, const sf_prompt_spans *spans) {
    for (int32_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= e->cfg.vocab_size) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "%s: request %lld's token id %d (its row %d) is outside [0, %d)", who,
                           (long long)r, ids[t], t, e->cfg.vocab_size);
        }
    }
    if (!spans) return SF_OK;
    const sf_prompt_spans *p = spans;
    const int64_t sum = (int64_t)p->prefix + p->system + p->middle + p->user + p->suffix;
    if (p->prefix < 0 || p->system < 0 || p->middle < 0 || p->user < 0 || p->suffix < 0 ||
        sum != n) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: spans of request %lld (%d %d %d %d %d) do not add up to its %d "
                       "tokens",
                       who, (long long)r, p->prefix, p->system, p->middle, p->user, p->suffix, n);
    }
    if (p->system > 0 && p->user == 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: request %lld has a system span but no user span to attend to", who,
                       (long long)r);
    }
    const int32_t offset_rows = e->has_sysformer ? e->sys_cfg.system_offset_rows : 0;
    if (offset_rows > 0 && p->system != 0 && p->system != offset_rows) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: request %lld has a system span of %d tokens, but the Sysformer's "
                       "learned system offset has %d rows (it was trained for one system "
                       "prompt; use that prompt)",
                       who, (long long)r, p->system, offset_rows);
    }
    return SF_OK;
}

static sf_status validate(const sf_cuda_engine *e, const sf_cuda_step *s, step_info *info) {
    memset(info, 0, sizeof *info);
    if (!s) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: NULL step");
    if (e->guard_only) {
        return sf_fail(SF_ERR_UNSUPPORTED, "sf_cuda_engine_step: a guard-only engine holds no "
                       "LLM to step (it serves sf_cuda_guarded_embed)");
    }
    const int32_t n = s->n_requests;
    if (n < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: n_requests = %d", n);
    }
    if (n > e->max_slots) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "sf_cuda_engine_step: %d requests; the engine has %d slots", n,
                       e->max_slots);
    }
    if (!s->slots) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: slots is NULL");
    for (int32_t r = 0; r < n; r++) {
        const int32_t slot = s->slots[r];
        if (slot < 0 || slot >= e->max_slots) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine_step: slots[%d] = %d outside [0, %d)", r, slot,
                           e->max_slots);
        }
        for (int32_t q = 0; q < r; q++) {
            if (s->slots[q] == slot) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT,
                               "sf_cuda_engine_step: requests %d and %d share slot %d", q, r,
                               slot);
            }
        }
    }
    info->n = n;
    info->decode = s->token_ids == NULL;
    if (info->decode) {
        if (s->cu_seqlens || s->spans) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine_step: a decode step (token_ids NULL) takes no "
                           "cu_seqlens or spans");
        }
        for (int32_t r = 0; r < n; r++) {
            const int32_t slot = s->slots[r];
            if (!e->host_slot_sampled[slot]) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT,
                               "sf_cuda_engine_step: decode in slot %d, which has no sampled "
                               "token to continue from",
                               slot);
            }
            if (e->host_slot_len[slot] + 1 > e->max_context) {
                return sf_fail(SF_ERR_OUT_OF_RANGE,
                               "sf_cuda_engine_step: slot %d is full (%d positions)", slot,
                               e->max_context);
            }
        }
        info->tokens = n;
        info->max_q_len = 1;
    } else {
        const int32_t *cu = s->cu_seqlens;
        if (!cu) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: cu_seqlens is NULL");
        }
        if (cu[0] != 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: cu_seqlens[0] = %d",
                           cu[0]);
        }
        for (int32_t r = 0; r < n; r++) {
            const int64_t len = (int64_t)cu[r + 1] - cu[r];
            if (len < 1) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT,
                               "sf_cuda_engine_step: request %d has %lld new tokens (at least "
                               "1)",
                               r, (long long)len);
            }
            if (cu[r + 1] > e->max_batch_tokens) {
                return sf_fail(SF_ERR_OUT_OF_RANGE,
                               "sf_cuda_engine_step: %d+ tokens in one step; the engine takes "
                               "%d (max_batch_tokens)",
                               cu[r + 1], e->max_batch_tokens);
            }
            const int32_t slot = s->slots[r];
            if (e->host_slot_len[slot] + len > e->max_context) {
                return sf_fail(SF_ERR_OUT_OF_RANGE,
                               "sf_cuda_engine_step: request %d needs %lld positions; slot %d "
                               "holds %d",
                               r, (long long)(e->host_slot_len[slot] + len), slot,
                               e->max_context);
            }
            if (len > info->max_q_len) info->max_q_len = (int32_t)len;
        }
        info->tokens = cu[n];
        for (int32_t r = 0; r < n; r++) {
            SF_TRY(sf_cuda_check_prompt(e, "sf_cuda_engine_step", r, s->token_ids + cu[r],
                                        cu[r + 1] - cu[r], s->spans ? &s->spans[r] : NULL));
        }
        if (s->spans) {
            for (int32_t r = 0; r < n; r++) {
                const sf_prompt_spans *p = &s->spans[r];
                if (p->system > 0 && e->host_slot_len[s->slots[r]] != 0) {
                    return sf_fail(SF_ERR_INVALID_ARGUMENT,
                                   "sf_cuda_engine_step: guarded prefill (request %d's system "
                                   "span) into slot %d, which holds %d positions (reset it first)",
                                   r, s->slots[r], e->host_slot_len[s->slots[r]]);
                }
                if (p->system > info->max_system) info->max_system = p->system;
                if (p->user > info->max_user) info->max_user = p->user;
            }
            if (!sf_cuda_padded_rows_fit(e, n, info->max_system, info->max_user)) {
                return sf_fail(SF_ERR_OUT_OF_RANGE,
                               "sf_cuda_engine_step: %d requests x %d system / %d user rows "
                               "(padded to the longest) pass max_batch_tokens %d",
                               n, info->max_system, info->max_user, e->max_batch_tokens);
            }
            info->guarded = e->has_sysformer && info->max_system > 0;
            if (info->guarded) SF_TRY(sf_cuda_check_sysformer(e, "sf_cuda_engine_step"));
        }
    }
    if (s->sampling && s->request_sampling) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: sampling and "
                       "request_sampling are both set (give one)");
    }
    info->sample = s->sampling || s->request_sampling;
    info->greedy = true;
    for (int32_t r = 0; info->sample && r < n; r++) {
        const sf_sampling *p = setting(s, r);
        if (p->top_logprobs < 0 || p->top_logprobs > SF_MAX_TOP_LOGPROBS) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine_step: request %d's top_logprobs = %d, outside [0, %d]",
                           r, p->top_logprobs, SF_MAX_TOP_LOGPROBS);
        }
        if (p->temperature == INFINITY) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine_step: request %d's temperature is infinite", r);
        }
        info->logprobs = info->logprobs || p->logprobs || p->top_logprobs > 0;
        if (p->top_logprobs > info->n_top) info->n_top = p->top_logprobs;
        if (is_greedy(p)) continue;
        info->greedy = false;
        if (!s->uniforms) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine_step: request %d samples at temperature %g and needs "
                           "uniforms",
                           r, (double)p->temperature);
        }
        if (!(s->uniforms[r] >= 0.0 && s->uniforms[r] < 1.0)) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine_step: uniforms[%d] = %g outside [0, 1)", r,
                           s->uniforms[r]);
        }
    }
    return SF_OK;
}

/* A sampling setting in the one form that settings acting alike share (sf_sample's and the
 * device sampler's rules): any temperature <= 0 (or NaN) is greedy, and top_k and top_p off
 * are 0 and 1; the seed is not the engine's (the caller draws the uniforms), and logprobs and
 * top_logprobs are the step's (taken for every row when any request asks). */
static sf_sampling canonical(const sf_sampling *s, int32_t vocab) {
    if (is_greedy(s)) return (sf_sampling){.temperature = 0.0f, .top_p = 1.0f};
    return (sf_sampling){.temperature = s->temperature,
                         .top_k = s->top_k > 0 && s->top_k < vocab ? s->top_k : 0,
                         .top_p = s->top_p > 0.0f && s->top_p < 1.0f ? s->top_p : 1.0f};
}

static bool same_setting(const sf_sampling *a, const sf_sampling *b) {
    return a->temperature == b->temperature && a->top_k == b->top_k && a->top_p == b->top_p;
}

/* The order of groups (greedy first, then by temperature, top_k, top_p), so that batches with
 * the same mix of settings are laid out alike and share a decode graph. Canonical settings
 * hold no NaN. */
static bool goes_before(const sf_sampling *a, const sf_sampling *b) {
    if (a->temperature != b->temperature) return a->temperature < b->temperature;
    if (a->top_k != b->top_k) return a->top_k < b->top_k;
    return a->top_p < b->top_p;
}

/* Groups a validated sampling step's requests by setting into e->groups, and lays the step out
 * group after group (each group's requests in the caller's order): request r runs at row
 * e->row_of[r], row i holds request e->order[i]. One group keeps the caller's order. */
static void group_requests(sf_cuda_engine *e, const sf_cuda_step *s, step_info *info) {
    e->n_groups = 0;
    info->reorder = false;
    if (!info->sample) return;
    const int32_t n = info->n;
    sf_sample_group *g = e->groups;
    int32_t m = 0;
    for (int32_t r = 0; r < n; r++) {
        const sf_sampling c = canonical(setting(s, r), e->cfg.vocab_size);
        int32_t k = 0;
        while (k < m && !same_setting(&g[k].sampling, &c)) k++;
        if (k == m) g[m++] = (sf_sample_group){c, 0, 0};
        g[k].count++;
    }
    for (int32_t k = 1; k < m; k++) {  /* insertion sort: m is at most max_slots */
        const sf_sample_group x = g[k];
        int32_t j = k;
        for (; j > 0 && goes_before(&x.sampling, &g[j - 1].sampling); j--) g[j] = g[j - 1];
        g[j] = x;
    }
    int32_t first = 0;
    for (int32_t k = 0; k < m; k++) {
        g[k].first = first;
        first += g[k].count;
        g[k].count = 0; /* counted again as the rows are handed out */
    }
    for (int32_t r = 0; r < n; r++) {
        const sf_sampling c = canonical(setting(s, r), e->cfg.vocab_size);
        int32_t k = 0;
        while (!same_setting(&g[k].sampling, &c)) k++;
        const int32_t row = g[k].first + g[k].count++;
        e->row_of[r] = row;
        e->order[row] = r;
    }
    e->n_groups = m;
    info->reorder = m > 1;
}

/* Fills the pinned staging with the step's inputs, in the step's row order. */
static void stage_inputs(sf_cuda_engine *e, const sf_cuda_step *s, const step_info *info) {
    sf_cuda_staging *h = &e->h;
    const int32_t n = info->n;
    const int32_t *order = info->reorder ? e->order : NULL;
    for (int32_t i = 0; i < n; i++) h->slots[i] = s->slots[order ? order[i] : i];
    if (!info->decode) {
        if (!order) {
            memcpy(h->ids, s->token_ids, (size_t)info->tokens * 4);
            memcpy(h->cu_seqlens, s->cu_seqlens, (size_t)(n + 1) * 4);
            if (info->guarded) memcpy(h->spans, s->spans, (size_t)n * sizeof(sf_prompt_spans));
        } else {
            h->cu_seqlens[0] = 0;
            for (int32_t i = 0; i < n; i++) {
                const int32_t r = order[i], from = s->cu_seqlens[r];
                const int32_t len = s->cu_seqlens[r + 1] - from;
                memcpy(h->ids + h->cu_seqlens[i], s->token_ids + from, (size_t)len * 4);
                h->cu_seqlens[i + 1] = h->cu_seqlens[i] + len;
                if (info->guarded) memcpy(&h->spans[5 * i], &s->spans[r], sizeof(sf_prompt_spans));
            }
        }
    }
    if (info->sample && !info->greedy) {
        for (int32_t i = 0; i < n; i++) {
            const int32_t r = order ? order[i] : i;
            h->uniforms[i] = is_greedy(setting(s, r)) ? 0.0 : s->uniforms[r];
        }
    }
}

static sf_status mark(sf_cuda_engine *e, int i) {
    if (e->timing) SF_CUDA_OR_FAIL(cudaEventRecord(e->ev[i], e->stream));
    return SF_OK;
}

/* The draws uploaded (here, with the passes that read them, whether or not a graph holds the
 * forward), one sampling pass per group over its rows of the logits, then each pick remembered
 * for its slot and the picks copied back. */
static sf_status sample_tail(sf_cuda_engine *e, const step_info *info) {
    sf_cuda_arena *a = &e->a;
    cudaStream_t s = e->stream;
    const int32_t n = info->n, vocab = e->cfg.vocab_size;
    sf_nvtx_push("sample");
    sf_status st = SF_OK;
    if (!info->greedy && cudaMemcpyAsync(a->uniforms, e->h.uniforms, (size_t)n * sizeof(double),
                                         cudaMemcpyHostToDevice, s) != cudaSuccess) {
        st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine_step: uploading the uniforms");
    }
    for (int32_t k = 0; st == SF_OK && k < e->n_groups; k++) {
        const sf_sample_group *g = &e->groups[k];
        st = sf_cuda_sample_f32(a->sampled + g->first, a->logits + (size_t)g->first * vocab,
                                is_greedy(&g->sampling) ? NULL : a->uniforms + g->first, g->count,
                                vocab, &g->sampling, a->sample_ws, a->sample_ws_bytes, s);
    }
    if (st == SF_OK) st = sf_cuda_store_next(a->slot_next, a->slots, a->sampled, n, s);
    if (st == SF_OK && cudaMemcpyAsync(e->h.tokens, a->sampled, (size_t)n * 4,
                                       cudaMemcpyDeviceToHost, s) != cudaSuccess) {
        st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine_step: copying the sampled ids back");
    }
    /* -log p of each pick (its cross-entropy with the pick as the target) and the most
     * likely tokens, one read of the logits, one block a row (every row: the requests that did
     * not ask cost a row's read each, less than a pass per group would) */
    const size_t n_top = (size_t)info->n_top;
    if (st == SF_OK && info->logprobs) {
        st = sf_cuda_logprobs(a->nll, a->top_ids, a->top_lp, a->logits, a->sampled, n, vocab,
                              info->n_top, s);
    }
    if (st == SF_OK && info->logprobs &&
        (cudaMemcpyAsync(e->h.nll, a->nll, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost,
                         s) != cudaSuccess ||
         (n_top && cudaMemcpyAsync(e->h.top_ids, a->top_ids, (size_t)n * n_top * 4,
                                   cudaMemcpyDeviceToHost, s) != cudaSuccess) ||
         (n_top && cudaMemcpyAsync(e->h.top_lp, a->top_lp, (size_t)n * n_top * sizeof(float),
                                   cudaMemcpyDeviceToHost, s) != cudaSuccess))) {
        st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine_step: copying the log-probabilities back");
    }
    sf_nvtx_pop();
    return st;
}

/* Everything a step enqueues after the host staging holds its inputs, the sampling passes only
 * when `sample` is set. A decode step's body is what a CUDA graph captures (marks are then
 * off). */
static sf_status step_body(sf_cuda_engine *e, const step_info *info, bool sample, bool marks) {
    sf_cuda_arena *a = &e->a;
    sf_cuda_staging *h = &e->h;
    cudaStream_t s = e->stream;
    const int32_t n = info->n;
    sf_nvtx_push("upload");
    if (!info->decode) {
        SF_CUDA_OR_FAIL(cudaMemcpyAsync(a->ids, h->ids, (size_t)info->tokens * 4,
                                        cudaMemcpyHostToDevice, s));
        SF_CUDA_OR_FAIL(cudaMemcpyAsync(a->cu_seqlens, h->cu_seqlens, (size_t)(n + 1) * 4,
                                        cudaMemcpyHostToDevice, s));
        if (info->guarded) {
            SF_CUDA_OR_FAIL(cudaMemcpyAsync(a->spans, h->spans, (size_t)n * 5 * 4,
                                            cudaMemcpyHostToDevice, s));
        }
    }
    SF_CUDA_OR_FAIL(cudaMemcpyAsync(a->slots, h->slots, (size_t)n * 4, cudaMemcpyHostToDevice, s));
    sf_nvtx_pop();
    if (marks) SF_TRY(mark(e, 1));

    sf_nvtx_push("embed");
    sf_status st = sf_cuda_step_layout(
        a->slots, info->decode ? NULL : a->cu_seqlens, n, a->slot_len, e->max_context,
        e->long_after, a->slot_next, a->ids, a->positions, a->kv_rows,
        e->cfg.rope.type == SF_ROPE_LONGROPE ? a->rope_table : NULL, a->cu_q, a->cu_kv,
        a->kv_len, a->q_pos0, a->last_row, s);
    if (st == SF_OK) {  /* ids and spans were checked on the host: no device error count */
        st = sf_cuda_embedding_bf16(a->x, e->embed, a->ids, info->tokens, e->d,
                                    e->cfg.vocab_size, NULL, s);
    }
    sf_nvtx_pop();
    if (st != SF_OK) return st;
    if (marks) SF_TRY(mark(e, 2));

    if (info->guarded) {
        SF_TRY(sf_cuda_rewrite_system(e, n, info->tokens, a->cu_seqlens, a->spans,
                                      info->max_system, info->max_user, a->x, NULL, s));
    }
    if (marks) SF_TRY(mark(e, 3));
    SF_TRY(sf_cuda_llm_layers(e, n, info->tokens, info->max_q_len, s));
    if (marks) SF_TRY(mark(e, 4));
    SF_TRY(sf_cuda_llm_head(e, n, s));
    if (marks) SF_TRY(mark(e, 5));

    return sample && info->sample ? sample_tail(e, info) : SF_OK;
}

void sf_cuda_graphs_destroy(sf_cuda_engine *e) {
    if (!e->graphs) return;
    for (int32_t n = 0; n <= e->max_slots; n++) {
        if (e->graphs[n].exec) (void)cudaGraphExecDestroy(e->graphs[n].exec);
        e->graphs[n].exec = NULL;
    }
}

/* A decode graph samples inside when the step has one sampling group (the common case: one
 * setting for the whole batch); with several, it holds the forward only and the passes follow
 * eagerly, so that a changing mix of settings does not recapture the whole forward. */
static bool graph_samples(const sf_cuda_engine *e, const step_info *info) {
    return info->sample && e->n_groups == 1;
}

static bool graph_fits(const sf_cuda_graph *g, const sf_cuda_engine *e, const step_info *info) {
    const bool inside = graph_samples(e, info);
    if (g->sampling_on != inside) return false;
    return !inside || (same_setting(&g->sampling, &e->groups[0].sampling) &&
                       g->logprobs == info->logprobs && g->n_top == info->n_top);
}

/* Captures the decode body for this batch size and sampling layout (once), then launches it,
 * and the sampling passes after it when they are not inside. */
static sf_status decode_graph(sf_cuda_engine *e, const step_info *info) {
    sf_cuda_graph *g = &e->graphs[info->n];
    const bool inside = graph_samples(e, info);
    if (g->exec && !graph_fits(g, e, info)) {
        (void)cudaGraphExecDestroy(g->exec);
        g->exec = NULL;
    }
    if (!g->exec) {
        SF_CUDA_OR_FAIL(cudaStreamBeginCapture(e->stream, cudaStreamCaptureModeThreadLocal));
        sf_status st = step_body(e, info, inside, false);
        cudaGraph_t graph = NULL;
        cudaError_t err = cudaStreamEndCapture(e->stream, &graph);
        if (st == SF_OK && err != cudaSuccess) {
            st = sf_fail(SF_ERR_CUDA,
                         "sf_cuda_engine_step: capturing the decode graph: %s (an engine "
                         "created with cuda_graphs = false decodes without graphs; the CLI: "
                         "--no-cuda-graphs)",
                         cudaGetErrorString(err));
        }
        if (st == SF_OK) {
            err = cudaGraphInstantiate(&g->exec, graph, 0);
            if (err != cudaSuccess) {
                g->exec = NULL;
                st = sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                             "sf_cuda_engine_step: instantiating the decode graph: %s",
                             cudaGetErrorString(err));
            }
        }
        if (graph) (void)cudaGraphDestroy(graph);
        if (st != SF_OK) {
            (void)cudaGetLastError();
            return st;
        }
        g->sampling_on = inside;
        g->sampling = inside ? e->groups[0].sampling : (sf_sampling){0};
        g->logprobs = inside && info->logprobs;
        g->n_top = inside ? info->n_top : 0;
    }
    sf_nvtx_push("decode step (graph)");
    cudaError_t err = cudaGraphLaunch(g->exec, e->stream);
    sf_nvtx_pop();
    if (err != cudaSuccess) {
        return sf_fail(SF_ERR_CUDA, "sf_cuda_engine_step: cudaGraphLaunch: %s",
                       cudaGetErrorString(err));
    }
    return info->sample && !inside ? sample_tail(e, info) : SF_OK;
}

sf_status sf_cuda_engine_step(sf_cuda_engine *e, const sf_cuda_step *s) {
    if (!e) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_step: NULL engine");
    step_info info;
    SF_TRY(validate(e, s, &info));
    SF_CUDA_OR_FAIL(cudaSetDevice(e->device));

    /* the staging is free once the previous step's uploads have run */
    SF_CUDA_OR_FAIL(cudaEventSynchronize(e->staging_free));
    const int32_t n = info.n;
    e->last_n = 0; /* from here on the last step's results are gone */
    group_requests(e, s, &info);
    stage_inputs(e, s, &info);

    sf_nvtx_push(info.decode ? "sf_cuda_engine_step (decode)"
                             : info.guarded ? "sf_cuda_engine_step (guarded prefill)"
                                            : "sf_cuda_engine_step (prefill)");
    sf_status st = SF_OK;
    const bool graph = info.decode && e->cuda_graphs;
    if (e->timing) st = mark(e, 0);
    if (st == SF_OK) {
        st = graph ? decode_graph(e, &info) : step_body(e, &info, true, true);
    }
    if (st == SF_OK && e->timing) st = mark(e, SF_STAGE_EVENTS - 1);
    if (st == SF_OK && cudaEventRecord(e->staging_free, e->stream) != cudaSuccess) {
        st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine_step: cudaEventRecord");
    }
    if (st == SF_OK && cudaEventRecord(e->done, e->stream) != cudaSuccess) {
        st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine_step: cudaEventRecord");
    }
    sf_nvtx_pop();
    if (st != SF_OK) {
        /* Something failed after validation (a launch or a CUDA call): the slots' device state
         * may be partly advanced, so every slot of this step is emptied. What the step
         * enqueued before the failure still reads the staging when it runs, so staging_free
         * (and done) are recorded after it, as for a whole step: the next step waits for them
         * before refilling the staging. The failure's error is cleared, so that the next
         * step's first launch check does not take it for its own (a sticky error, a fault on
         * the device, stays and fails every later call). */
        (void)cudaGetLastError();
        for (int32_t r = 0; r < n; r++) (void)sf_cuda_engine_reset_slot(e, s->slots[r]);
        (void)cudaEventRecord(e->staging_free, e->stream);
        (void)cudaEventRecord(e->done, e->stream);
        e->last_n = 0;
        e->last_timed = false; /* its stage marks are partly this step's */
        return st;
    }
    for (int32_t r = 0; r < n; r++) {
        const int32_t slot = s->slots[r];
        e->host_slot_len[slot] += info.decode ? 1 : s->cu_seqlens[r + 1] - s->cu_seqlens[r];
        e->host_slot_sampled[slot] = info.sample;
    }
    e->last_n = n;
    e->reordered = info.reorder;
    e->last_sampled = info.sample;
    e->last_logprobs = info.logprobs;
    e->last_n_top = info.n_top;
    e->last_timed = e->timing;
    e->last_graph = graph;
    e->steps++;
    return SF_OK;
}

sf_status sf_cuda_engine_read_tokens(sf_cuda_engine *e, int32_t *tokens, int32_t n) {
    if (!e || !tokens || n < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_read_tokens: bad argument");
    }
    if (!e->last_sampled || n > e->last_n) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_read_tokens: %d tokens asked; the last step sampled %d",
                       n, e->last_sampled ? e->last_n : 0);
    }
    cudaError_t err = cudaEventSynchronize(e->done);
    if (err != cudaSuccess) {
        return sf_fail(SF_ERR_CUDA, "sf_cuda_engine_read_tokens: the step failed: %s",
                       cudaGetErrorString(err));
    }
    for (int32_t r = 0; r < n; r++) tokens[r] = e->h.tokens[e->reordered ? e->row_of[r] : r];
    return SF_OK;
}

sf_status sf_cuda_engine_read_logprobs(sf_cuda_engine *e, float *logprobs, int32_t n) {
    if (!e || !logprobs || n < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_read_logprobs: bad argument");
    }
    if (!e->last_sampled || !e->last_logprobs || n > e->last_n) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_read_logprobs: %d asked; the last step took %d (a "
                       "request's setting must have logprobs set)",
                       n, e->last_sampled && e->last_logprobs ? e->last_n : 0);
    }
    cudaError_t err = cudaEventSynchronize(e->done);
    if (err != cudaSuccess) {
        return sf_fail(SF_ERR_CUDA, "sf_cuda_engine_read_logprobs: the step failed: %s",
                       cudaGetErrorString(err));
    }
    /* 0 - nll, not -nll: a certain token's log-probability is +0, as the CPU's */
    for (int32_t r = 0; r < n; r++) {
        logprobs[r] = 0.0f - e->h.nll[e->reordered ? e->row_of[r] : r];
    }
    return SF_OK;
}

sf_status sf_cuda_engine_read_top_logprobs(sf_cuda_engine *e, int32_t *ids, float *logprobs,
                                           int32_t n, int32_t k) {
    if (!e || !ids || !logprobs || n < 0 || k < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_read_top_logprobs: bad argument");
    }
    const bool took = e->last_sampled && e->last_n_top > 0;
    if (!took || k > e->last_n_top || n > e->last_n) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_read_top_logprobs: %d x %d asked; the last step took %d "
                       "x %d (a request's setting must have top_logprobs set)",
                       n, k, took ? e->last_n : 0, took ? e->last_n_top : 0);
    }
    cudaError_t err = cudaEventSynchronize(e->done);
    if (err != cudaSuccess) {
        return sf_fail(SF_ERR_CUDA, "sf_cuda_engine_read_top_logprobs: the step failed: %s",
                       cudaGetErrorString(err));
    }
    const size_t stride = (size_t)e->last_n_top;
    for (int32_t r = 0; r < n; r++) {
        const size_t from = (size_t)(e->reordered ? e->row_of[r] : r) * stride;
        memcpy(ids + (size_t)r * k, e->h.top_ids + from, (size_t)k * sizeof *ids);
        memcpy(logprobs + (size_t)r * k, e->h.top_lp + from, (size_t)k * sizeof *logprobs);
    }
    return SF_OK;
}

sf_status sf_cuda_engine_read_logits(sf_cuda_engine *e, float *logits, int32_t n) {
    if (!e || !logits || n < 0 || n > e->last_n) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_read_logits: %d rows asked; the last step has %d", n,
                       e ? e->last_n : 0);
    }
    SF_CUDA_OR_FAIL(cudaSetDevice(e->device));
    const size_t row = (size_t)e->cfg.vocab_size;
    if (!e->reordered) {
        SF_CUDA_OR_FAIL(cudaMemcpyAsync(logits, e->a.logits, (size_t)n * row * sizeof(float),
                                        cudaMemcpyDeviceToHost, e->stream));
    }
    for (int32_t r = 0; e->reordered && r < n; r++) {
        SF_CUDA_OR_FAIL(cudaMemcpyAsync(logits + (size_t)r * row,
                                        e->a.logits + (size_t)e->row_of[r] * row,
                                        row * sizeof(float), cudaMemcpyDeviceToHost, e->stream));
    }
    SF_CUDA_OR_FAIL(cudaStreamSynchronize(e->stream));
    return SF_OK;
}
