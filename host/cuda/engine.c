/* The CUDA engine's life cycle: options, sizing, the three device allocations (weights, KV
 * cache, arena) and the pinned staging, made once at creation, or with another engine's LLM
 * weights (sf_cuda_engine_create_sharing); slots, timing and accessors. Nothing here runs on
 * the hot path. */
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "core/error.h"
#include "core/half.h"
#include "cpu/ops.h"
#include "cuda/engine.h"
#include "model/llm.h"
#include "sampling.h"
#include "sysformer/module.h"

sf_cuda_engine_options sf_cuda_engine_default_options(void) {
    sf_cuda_engine_options o;
    memset(&o, 0, sizeof o);
    o.device = 0;
    o.max_slots = 8;
    o.max_context = 0;
    o.max_batch_tokens = 0;
    o.cuda_graphs = true;
    o.attention = SF_ATTENTION_AUTO;
    o.embedding_dtype = SF_EMBEDDING_BF16;
    return o;
}

int32_t sf_cuda_engine_max_context(const sf_cuda_engine *e) { return e ? e->max_context : 0; }
int32_t sf_cuda_engine_max_slots(const sf_cuda_engine *e) { return e ? e->max_slots : 0; }
int32_t sf_cuda_engine_vocab(const sf_cuda_engine *e) { return e ? e->cfg.vocab_size : 0; }

static bool attention_head_dim(int64_t hd) { return hd == 64 || hd == 80 || hd == 96 || hd == 128; }

/* The split decode's workspace for any batch of up to max_slots requests: its split count falls
 * as requests are added, so the largest need is found by trying each count. */
static size_t decode_workspace_bytes(const sf_cuda_engine *e) {
    sf_attention_args at;
    memset(&at, 0, sizeof at);
    at.max_q_len = 1;
    at.max_kv_len = e->max_context;
    at.n_heads = e->cfg.num_heads;
    at.n_kv_heads = e->cfg.num_kv_heads;
    at.head_dim = e->cfg.head_dim;
    size_t most = 0;
    for (int32_t n = 1; n <= e->max_slots; n++) {
        at.n_requests = n;
        const size_t need = sf_cuda_attention_workspace_bytes(&at);
        if (need > most) most = need;
    }
    return most;
}

/* The arena's part for steps: the LLM's activations, logits, sampling and the slots. */
static void carve_step(sf_cuda_engine *e, sf_carver *cv) {
    sf_carver c = *cv;
    sf_cuda_arena *a = &e->a;
    const size_t T = (size_t)e->max_batch_tokens, R = (size_t)e->max_slots;
    const size_t d = (size_t)e->d, b = sizeof(sf_bf16), i4 = sizeof(int32_t);
    a->ids = sf_carve(&c, T * i4);
    a->cu_seqlens = sf_carve(&c, (R + 1) * i4);
    a->spans = sf_carve(&c, R * 5 * i4);
    a->slots = sf_carve(&c, R * i4);
    a->uniforms = sf_carve(&c, R * sizeof(double));
    a->positions = sf_carve(&c, T * i4);
    a->kv_rows = sf_carve(&c, T * i4);
    a->rope_table = sf_carve(&c, T * i4);
    a->cu_q = sf_carve(&c, (R + 1) * i4);
    a->cu_kv = sf_carve(&c, (R + 1) * i4);
    a->kv_len = sf_carve(&c, R * i4);
    a->q_pos0 = sf_carve(&c, R * i4);
    a->last_row = sf_carve(&c, R * i4);
    a->x = sf_carve(&c, T * d * b);
    a->xn = sf_carve(&c, T * d * b);
    a->tmp = sf_carve(&c, T * d * b);
    a->qkv = sf_carve(&c, T * (size_t)e->qkv_dim * b);
    a->attn = sf_carve(&c, T * (size_t)e->q_dim * b);
    a->gate_up = sf_carve(&c, T * 2 * (size_t)e->ff * b);
    a->act = sf_carve(&c, T * (size_t)e->ff * b);
    a->head_x = sf_carve(&c, R * d * b);
    a->head_tmp = sf_carve(&c, R * d * b);
    a->logits = sf_carve(&c, R * (size_t)e->cfg.vocab_size * sizeof(float));
    a->sampled = sf_carve(&c, R * i4);
    a->nll = sf_carve(&c, R * sizeof(float));
    a->top_ids = sf_carve(&c, R * SF_MAX_TOP_LOGPROBS * i4);
    a->top_lp = sf_carve(&c, R * SF_MAX_TOP_LOGPROBS * sizeof(float));
    a->sample_ws_bytes = sf_cuda_sample_workspace_bytes((int64_t)R, e->cfg.vocab_size);
    a->sample_ws = sf_carve(&c, a->sample_ws_bytes);
    a->attn_ws_bytes = decode_workspace_bytes(e);
    a->attn_ws = sf_carve(&c, a->attn_ws_bytes);
    a->slot_len = sf_carve(&c, R * i4);
    a->slot_next = sf_carve(&c, R * i4);
    a->inv_freq = sf_carve(&c, (size_t)e->cfg.head_dim * sizeof(float));
    *cv = c;
}

/* Lays out (or, with base NULL, measures) the arena: the step part (none for a guard-only
 * engine), the Sysformer's, the cuBLASLt workspace. */
static size_t carve_arena(sf_cuda_engine *e, char *base) {
    sf_carver c = {base, 0};
    sf_cuda_arena *a = &e->a;
    const size_t T = (size_t)e->max_batch_tokens, R = (size_t)e->max_slots;
    const size_t d = (size_t)e->d, b = sizeof(sf_bf16), i4 = sizeof(int32_t);
    if (!e->guard_only) carve_step(e, &c);
    if (e->has_sysformer) {
        a->sys_rows = sf_carve(&c, T * i4);
        a->user_rows = sf_carve(&c, T * i4);
        a->cu_sys = sf_carve(&c, (R + 1) * i4);
        a->cu_user = sf_carve(&c, (R + 1) * i4);
        a->sys_len = sf_carve(&c, R * i4);
        a->user_len = sf_carve(&c, R * i4);
        a->s_x = sf_carve(&c, T * d * b);
        a->s_xn = sf_carve(&c, T * d * b);
        a->s_tmp = sf_carve(&c, T * d * b);
        a->s_attn = sf_carve(&c, T * d * b);
        a->s_qkv = sf_carve(&c, T * 3 * d * b);
        a->u = sf_carve(&c, T * d * b);
        a->u_kv = sf_carve(&c, T * 2 * d * b);
        a->s_ff = sf_carve(&c, T * (size_t)e->sys_ff * b);
    }
    a->gemm_ws = sf_carve(&c, SF_GEMM_WORKSPACE_BYTES);
    return c.off;
}

static sf_status device_alloc(void **p, size_t bytes, const char *what) {
    cudaError_t err = cudaMalloc(p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        *p = NULL;
        (void)cudaGetLastError(); /* an allocation failure is not sticky: clear it */
        return sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                       "sf_cuda_engine: cannot allocate %zu bytes (%.2f GiB) of device memory "
                       "for %s: %s",
                       bytes, (double)bytes / (1u << 30), what, cudaGetErrorString(err));
    }
    return SF_OK;
}

/* The checks that need no device. */
static sf_status check_inputs(const sf_llm_config *cfg, const sf_sysformer_config *scfg,
                              const sf_cuda_engine_options *o) {
    if (!o->guard_only && !attention_head_dim(cfg->head_dim)) {
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "sf_cuda_engine: LLM head_dim %d (the fused attention has 64, 80, 96, "
                       "128)",
                       cfg->head_dim);
    }
    /* d % 8: the Sysformer's attention reads rows of d values in 16-byte chunks */
    if (cfg->hidden_size <= 0 || cfg->hidden_size % 8 != 0 || cfg->intermediate_size <= 0 ||
        cfg->num_layers <= 0 || cfg->num_heads <= 0 ||
        cfg->num_kv_heads <= 0 || cfg->num_heads % cfg->num_kv_heads != 0 ||
        cfg->vocab_size <= 0 || cfg->max_position_embeddings <= 0) {
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "sf_cuda_engine: LLM shape d %d, ff %d, layers %d, heads %d/%d, vocab %d "
                       "(d must be a positive multiple of 8)",
                       cfg->hidden_size, cfg->intermediate_size, cfg->num_layers, cfg->num_heads,
                       cfg->num_kv_heads, cfg->vocab_size);
    }
    if (scfg) {
        if (scfg->d_model != cfg->hidden_size || scfg->num_heads <= 0 ||
            scfg->d_model % scfg->num_heads != 0 || scfg->num_layers < 0 ||
            scfg->dim_feedforward <= 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine: Sysformer d_model %d, heads %d, ff %d for an LLM of "
                           "hidden size %d",
                           scfg->d_model, scfg->num_heads, scfg->dim_feedforward,
                           cfg->hidden_size);
        }
        if (scfg->system_offset_rows < 0 || scfg->system_offset_rows > (1 << 16)) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_cuda_engine: system_offset_rows = %d (0: none; at most 65536)",
                           scfg->system_offset_rows);
        }
        if (!attention_head_dim(scfg->d_model / scfg->num_heads)) {
            return sf_fail(SF_ERR_UNSUPPORTED,
                           "sf_cuda_engine: Sysformer head dim %d (the fused attention has 64, "
                           "80, 96, 128)",
                           scfg->d_model / scfg->num_heads);
        }
    }
    if (o->max_slots < 1 || o->max_slots > 65535 || o->max_context < 0 ||
        o->max_batch_tokens < 0 || o->device < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: options max_slots %d (1..65535), max_context %d, "
                       "max_batch_tokens %d, device %d",
                       o->max_slots, o->max_context, o->max_batch_tokens, o->device);
    }
    if (o->attention != SF_ATTENTION_AUTO && o->attention != SF_ATTENTION_MMA &&
        o->attention != SF_ATTENTION_WGMMA && o->attention != SF_ATTENTION_WGMMA_WS) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: options attention %d (not an sf_attention_kernel)",
                       (int)o->attention);
    }
    if (o->embedding_table && (!o->guard_only || ((uintptr_t)o->embedding_table & 1))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: a borrowed embedding_table (%p) needs guard_only and a "
                       "bf16-aligned address",
                       o->embedding_table);
    }
    if (o->embedding_dtype != SF_EMBEDDING_BF16 &&
        (o->embedding_dtype != SF_EMBEDDING_F16 || !o->guard_only)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: options embedding_dtype %d (SF_EMBEDDING_BF16, or "
                       "SF_EMBEDDING_F16 with guard_only)",
                       (int)o->embedding_dtype);
    }
    if (o->max_context > cfg->max_position_embeddings) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: max_context %d exceeds the model's "
                       "max_position_embeddings %d",
                       o->max_context, cfg->max_position_embeddings);
    }
    return SF_OK;
}

/* The RoPE settings' check, for an engine that makes its own tables from them (one that shares
 * another engine's LLM copies that one's). */
static sf_status check_rope(const sf_llm_config *cfg) {
    if (cfg->rope.type == SF_ROPE_LONGROPE &&
        (!cfg->rope.short_factor || !cfg->rope.long_factor ||
         cfg->rope.original_max_position_embeddings <= 0)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: longrope needs short_factor, long_factor and "
                       "original_max_position_embeddings");
    }
    return SF_OK;
}

/* The engine's shape and sizes from its inputs, with no device call: what engine_new and
 * sf_cuda_engine_plan share. Fills e (calloc'd by the caller) and its host layer arrays, and
 * the byte counts of the weights, the KV cache and the arena (the pointers stay unset). */
static sf_status engine_layout(sf_cuda_engine *e, const sf_llm_config *cfg,
                               const sf_sysformer_config *scfg, const sf_cuda_engine_options *o) {
    e->cfg = *cfg;
    e->has_sysformer = scfg != NULL;
    if (scfg) {
        e->sys_cfg = *scfg;
        e->sys_cfg.llm_name = e->sys_cfg.llm_embedding_hash = NULL;
        e->sys_cfg.system_prompt = e->sys_cfg.chat_template = NULL;
    }
    e->device = o->device;
    e->max_slots = o->max_slots;
    e->max_context = o->max_context ? o->max_context
                                    : (cfg->max_position_embeddings < 4096
                                           ? cfg->max_position_embeddings
                                           : 4096);
    e->max_batch_tokens = o->max_batch_tokens ? o->max_batch_tokens : e->max_context;
    if (e->max_batch_tokens < e->max_slots) e->max_batch_tokens = e->max_slots;
    e->cuda_graphs = o->cuda_graphs;
    e->guard_only = o->guard_only;
    e->borrowed_embed = o->embedding_table != NULL;
    e->embed_f16 = o->embedding_dtype == SF_EMBEDDING_F16;
    e->embed = (sf_bf16 *)o->embedding_table; /* read only; carved from weights when NULL */
    e->attention = o->attention;
    e->d = cfg->hidden_size;
    e->q_dim = (int64_t)cfg->num_heads * cfg->head_dim;
    e->kv_dim = (int64_t)cfg->num_kv_heads * cfg->head_dim;
    e->qkv_dim = e->q_dim + 2 * e->kv_dim;
    e->ff = cfg->intermediate_size;
    e->sys_ff = scfg ? scfg->dim_feedforward : 0;
    e->cfg.rope.short_factor = e->cfg.rope.long_factor = NULL;
    if ((int64_t)e->max_slots * e->max_context > 0x7fffffff) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "sf_cuda_engine: %d slots x %d positions pass 2^31 cache rows",
                       e->max_slots, e->max_context);
    }
    sf_status st = sf_cuda_weights_layout(e);
    if (st != SF_OK) return st;
    /* K and V: two allocations of this size each (none for a guard-only engine) */
    e->kv_bytes = e->guard_only ? 0
                                : (size_t)cfg->num_layers * (size_t)e->max_slots *
                                      (size_t)e->max_context * (size_t)e->kv_dim *
                                      sizeof(sf_bf16);
    e->arena_bytes = carve_arena(e, NULL);
    return SF_OK;
}

/* The RoPE tables: the short one (any request up to the original context) and the long one,
 * their inverse frequencies in the arena (fp32) and their attention scales. */
static sf_status rope_tables(sf_cuda_engine *e, const sf_llm_config *cfg) {
    e->long_after = cfg->rope.type == SF_ROPE_LONGROPE
                        ? cfg->rope.original_max_position_embeddings
                        : 0x7fffffff;
    const int half = cfg->head_dim / 2;
    double inv[2][256], scale[2];
    sf_cpu_rope_freqs(cfg, 1, inv[0], &scale[0]);
    sf_cpu_rope_freqs(cfg, cfg->max_position_embeddings, inv[1], &scale[1]);
    if (cfg->rope.type != SF_ROPE_LONGROPE) {
        memcpy(inv[1], inv[0], sizeof inv[0]);
        scale[1] = scale[0];
    }
    e->rope_scale[0] = (float)scale[0];
    e->rope_scale[1] = (float)scale[1];
    float inv_f[512];
    for (int t = 0; t < 2; t++) {
        for (int i = 0; i < half; i++) inv_f[t * half + i] = (float)inv[t][i];
    }
    SF_CUDA_OR_FAIL(cudaMemcpyAsync(e->a.inv_freq, inv_f, (size_t)cfg->head_dim * sizeof(float),
                                    cudaMemcpyHostToDevice, e->stream));
    return SF_OK;
}

/* A borrowed embedding table must be device memory the engine's device can read: not host
 * memory, not another device's. */
static sf_status check_borrowed_memory(const void *table, int device) {
    struct cudaPointerAttributes a;
    memset(&a, 0, sizeof a);
    const cudaError_t err = cudaPointerGetAttributes(&a, table);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: the borrowed embedding_table %p: %s", table,
                       cudaGetErrorString(err));
    }
    const bool ok = (a.type == cudaMemoryTypeDevice && a.device == device) ||
                    a.type == cudaMemoryTypeManaged;
    if (!ok) {
        static const char *const kinds[] = {"unregistered host", "host", "device", "managed"};
        const unsigned k = (unsigned)a.type;
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine: the borrowed embedding_table %p is %s memory (device "
                       "%d; device memory on device %d expected)",
                       table, k < 4 ? kinds[k] : "unknown", a.device, device);
    }
    return SF_OK;
}

/* The rows a borrowed table is compared on, spread over the vocabulary (first and last
 * included). */
enum { BORROWED_ROWS_CHECKED = 16 };

/* A borrowed table must be this LLM's embedding table in the engine's format: a few rows are
 * read back and each value must be within one ulp of the LLM's fp32 one, so the lender may
 * have rounded to nearest or truncated: |b - x| <= 2^-7 |x| in bf16 (fp32's exponent range:
 * FLT_MIN covers a flushed subnormal), |b - x| <= 2^-10 |x| + 2^-24 in fp16 (2^-24: the
 * spacing of fp16's subnormals). A table of another model, another dtype or still unwritten is
 * refused here, instead of guarding every request with wrong rows. */
static sf_status check_borrowed_rows(const sf_cuda_engine *e, const sf_llm *llm) {
    const int64_t d = e->d, vocab = e->cfg.vocab_size;
    const int n = vocab < BORROWED_ROWS_CHECKED ? (int)vocab : BORROWED_ROWS_CHECKED;
    const int ulp_bits = e->embed_f16 ? 10 : 7;
    const float floor = e->embed_f16 ? ldexpf(1.0f, -24) : FLT_MIN;
    uint16_t *rows = malloc((size_t)n * (size_t)d * sizeof *rows);
    if (!rows) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_engine: out of host memory");
    sf_status st = SF_OK;
    for (int i = 0; i < n && st == SF_OK; i++) {
        const int64_t r = n > 1 ? (vocab - 1) * i / (n - 1) : 0;
        const cudaError_t err = cudaMemcpy(rows + i * d, e->embed + r * d,
                                           (size_t)d * sizeof *rows, cudaMemcpyDeviceToHost);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            st = sf_fail(SF_ERR_INVALID_ARGUMENT,
                         "sf_cuda_engine: reading row %lld of the borrowed embedding_table: %s",
                         (long long)r, cudaGetErrorString(err));
            break;
        }
        for (int64_t j = 0; j < d; j++) {
            const uint16_t bits = rows[i * d + j];
            const float x = llm->embed[r * d + j];
            const float b = e->embed_f16 ? sf_f16_to_f32(bits) : sf_bf16_to_f32(bits);
            if (!(fabsf(b - x) <= ldexpf(fabsf(x), -ulp_bits) + floor)) {
                st = sf_fail(SF_ERR_INVALID_ARGUMENT,
                             "sf_cuda_engine: the borrowed embedding_table is not this LLM's "
                             "(%s [%lld, %lld]): row %lld column %lld holds %g, the LLM's "
                             "value is %g",
                             e->embed_f16 ? "fp16" : "bf16", (long long)vocab, (long long)d,
                             (long long)r, (long long)j, (double)b, (double)x);
                break;
            }
        }
    }
    free(rows);
    return st;
}

/* The weight allocation of the engine that uploaded an LLM, once made: the engine and every
 * engine sharing its LLM (sf_cuda_engine_create_sharing) hold one count each, and the last to
 * be freed, whichever it is, frees it. Counted atomically: engines may be freed on different
 * threads. */
struct sf_cuda_llm_hold {
    void *mem;
    atomic_int refs;
};

/* Moves the engine's weight allocation (the LLM's tensors and its Sysformer's) into a hold of
 * its own. */
static sf_status llm_hold_new(sf_cuda_engine *e) {
    struct sf_cuda_llm_hold *h = malloc(sizeof *h);
    if (!h) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_engine: out of host memory");
    h->mem = e->weights;
    atomic_init(&h->refs, 1);
    e->weights = NULL;
    e->llm_hold = h;
    return SF_OK;
}

static void llm_hold_release(struct sf_cuda_llm_hold *h) {
    if (h && atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) == 1) {
        cudaFree(h->mem);
        free(h);
    }
}

/* A sharing engine's view of its base's LLM: the tensors' addresses (the LLM's part of the
 * base's hold, which it now counts in) and the RoPE tables, copied on the engine's stream. */
static sf_status share_llm(sf_cuda_engine *e, const sf_cuda_engine *base) {
    atomic_fetch_add_explicit(&base->llm_hold->refs, 1, memory_order_relaxed);
    e->llm_hold = base->llm_hold;
    e->embed = base->embed;
    e->embed_f16 = base->embed_f16;
    e->final_norm = base->final_norm;
    e->lm_head = base->lm_head;
    if (e->guard_only) return SF_OK; /* the embedding table only, no step state */
    memcpy(e->layers, base->layers, (size_t)e->cfg.num_layers * sizeof *e->layers);
    e->long_after = base->long_after;
    e->rope_scale[0] = base->rope_scale[0];
    e->rope_scale[1] = base->rope_scale[1];
    SF_CUDA_OR_FAIL(cudaMemcpyAsync(e->a.inv_freq, base->a.inv_freq,
                                    (size_t)e->cfg.head_dim * sizeof(float),
                                    cudaMemcpyDeviceToDevice, e->stream));
    return SF_OK;
}

/* Everything but the weights' contents. base: the engine whose LLM this one shares, or NULL
 * for an engine with its own. */
static sf_status engine_new(const sf_llm_config *cfg, const sf_sysformer_config *scfg,
                            const sf_cuda_engine_options *opt, const sf_cuda_engine *base,
                            sf_cuda_engine **out) {
    sf_cuda_engine_options o = opt ? *opt : sf_cuda_engine_default_options();
    sf_status st = check_inputs(cfg, scfg, &o);
    if (st == SF_OK && !base) st = check_rope(cfg);
    if (st != SF_OK) return st;
    int count = 0;
    st = sf_cuda_device_count(&count);
    if (st != SF_OK) return st;
    if (o.device >= count) {
        return sf_fail(SF_ERR_NO_DEVICE, "sf_cuda_engine: no CUDA device %d (%d found)",
                       o.device, count);
    }
    SF_CUDA_OR_FAIL(cudaSetDevice(o.device));
    if (o.embedding_table) SF_TRY(check_borrowed_memory(o.embedding_table, o.device));
    if (o.attention == SF_ATTENTION_WGMMA || o.attention == SF_ATTENTION_WGMMA_WS) {
        st = sf_cuda_attention_sm90_check();
        if (st != SF_OK) return st;
    }

    sf_cuda_engine *e = calloc(1, sizeof *e);
    if (!e) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_engine: out of host memory");
    *out = e;
    e->shares_llm = base != NULL;
    st = engine_layout(e, cfg, scfg, &o);
    if (st != SF_OK) return st;

    st = sf_cuda_weights_alloc(e);
    if (st != SF_OK) return st;
    if (!base) SF_TRY(llm_hold_new(e));
    if (!e->guard_only) {
        st = device_alloc((void **)&e->k_cache, e->kv_bytes, "the K cache");
        if (st != SF_OK) return st;
        st = device_alloc((void **)&e->v_cache, e->kv_bytes, "the V cache");
        if (st != SF_OK) return st;
        e->kv_bytes *= 2;
    }
    st = device_alloc(&e->arena_base, e->arena_bytes, "the activation arena");
    if (st != SF_OK) return st;
    carve_arena(e, e->arena_base);

    /* pinned staging */
    sf_carver hc = {NULL, 0};
    const size_t T = (size_t)e->max_batch_tokens, R = (size_t)e->max_slots;
    for (int pass = 0; pass < 2; pass++) {
        hc.off = 0;
        e->h.ids = sf_carve(&hc, T * 4);
        e->h.cu_seqlens = sf_carve(&hc, (R + 1) * 4);
        e->h.spans = sf_carve(&hc, R * 5 * 4);
        e->h.slots = sf_carve(&hc, R * 4);
        e->h.uniforms = sf_carve(&hc, R * sizeof(double));
        e->h.tokens = sf_carve(&hc, R * 4);
        e->h.nll = sf_carve(&hc, R * sizeof(float));
        e->h.top_ids = sf_carve(&hc, R * SF_MAX_TOP_LOGPROBS * 4);
        e->h.top_lp = sf_carve(&hc, R * SF_MAX_TOP_LOGPROBS * sizeof(float));
        if (pass == 0) {
            cudaError_t err = cudaHostAlloc(&e->h.base, hc.off, cudaHostAllocDefault);
            if (err != cudaSuccess) {
                e->h.base = NULL;
                (void)cudaGetLastError();
                return sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY
                                                                : SF_ERR_CUDA,
                               "sf_cuda_engine: cannot pin %zu bytes of host staging: %s",
                               hc.off, cudaGetErrorString(err));
            }
            hc.base = e->h.base;
        }
    }
    e->host_slot_len = calloc(R, sizeof(int32_t));
    e->host_slot_sampled = calloc(R, sizeof(bool));
    e->graphs = calloc(R + 1, sizeof(sf_cuda_graph));
    e->groups = calloc(R, sizeof(sf_sample_group));
    e->order = calloc(R, sizeof(int32_t));
    e->row_of = calloc(R, sizeof(int32_t));
    if (!e->host_slot_len || !e->host_slot_sampled || !e->graphs || !e->groups || !e->order ||
        !e->row_of) {
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_engine: out of host memory");
    }
    SF_CUDA_OR_FAIL(cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking));
    SF_CUDA_OR_FAIL(cudaEventCreateWithFlags(&e->done, cudaEventDisableTiming));
    SF_CUDA_OR_FAIL(cudaEventCreateWithFlags(&e->staging_free, cudaEventDisableTiming));
    for (int i = 0; i < SF_STAGE_EVENTS; i++) SF_CUDA_OR_FAIL(cudaEventCreate(&e->ev[i]));
    st = sf_gemm_cache_create(e->a.gemm_ws, SF_GEMM_WORKSPACE_BYTES, &e->gemm);
    if (st != SF_OK) return st;

    if (base) SF_TRY(share_llm(e, base));
    if (e->guard_only) return SF_OK; /* no step state */
    if (!base) SF_TRY(rope_tables(e, cfg));
    SF_CUDA_OR_FAIL(cudaMemsetAsync(e->a.slot_len, 0, R * 4, e->stream));
    SF_CUDA_OR_FAIL(cudaMemsetAsync(e->a.slot_next, 0, R * 4, e->stream));
    return SF_OK;
}

static sf_status finish_create(sf_cuda_engine *e, sf_status st, sf_cuda_engine **out) {
    if (st == SF_OK) {
        cudaError_t err = cudaStreamSynchronize(e->stream);
        if (err != cudaSuccess) {
            st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine: uploading the weights: %s",
                         cudaGetErrorString(err));
        }
    }
    if (st != SF_OK) {
        sf_cuda_engine_free(e);
        *out = NULL;
        return st;
    }
    *out = e;
    return SF_OK;
}

sf_status sf_cuda_engine_create(const sf_llm *llm, const sf_sysformer *sysformer,
                                const sf_cuda_engine_options *options, sf_cuda_engine **out) {
    if (out) *out = NULL;
    if (!llm || !out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_create: NULL model or out");
    }
    const sf_sysformer_config *scfg = sysformer ? &sysformer->cfg : NULL;
    if (scfg && (scfg->llm_hidden_size && scfg->llm_hidden_size != llm->cfg.hidden_size)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_create: the Sysformer was made for hidden size %d, the "
                       "LLM has %d",
                       scfg->llm_hidden_size, llm->cfg.hidden_size);
    }
    if (!(options && options->guard_only)) {
        SF_TRY(sf_llm_check_whole(llm, "sf_cuda_engine_create"));
    }
    sf_cuda_engine *e = NULL;
    sf_status st = engine_new(&llm->cfg, scfg, options, NULL, &e);
    if (st == SF_OK && e->borrowed_embed) st = check_borrowed_rows(e, llm);
    if (st == SF_OK) st = sf_cuda_weights_upload(e, llm, sysformer);
    if (!e) return st;
    return finish_create(e, st, out);
}

sf_status sf_cuda_engine_create_random(const sf_llm_config *llm_cfg,
                                       const sf_sysformer_config *sysformer_cfg, uint64_t seed,
                                       const sf_cuda_engine_options *options,
                                       sf_cuda_engine **out) {
    if (out) *out = NULL;
    if (!llm_cfg || !out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_create_random: NULL config or out");
    }
    if (options && options->embedding_table) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_create_random: a borrowed embedding_table needs the LLM "
                       "it copies (sf_cuda_engine_create)");
    }
    sf_cuda_engine *e = NULL;
    sf_status st = engine_new(llm_cfg, sysformer_cfg, options, NULL, &e);
    if (st == SF_OK) st = sf_cuda_weights_random(e, seed);
    if (!e) return st;
    return finish_create(e, st, out);
}

sf_status sf_cuda_engine_create_sharing(const sf_cuda_engine *base, const sf_sysformer *sysformer,
                                        const sf_cuda_engine_options *options,
                                        sf_cuda_engine **out) {
    static const char fn[] = "sf_cuda_engine_create_sharing";
    if (out) *out = NULL;
    if (!base || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL base engine or out", fn);
    const sf_cuda_engine_options o = options ? *options : sf_cuda_engine_default_options();
    const sf_embedding_dtype base_dtype = base->embed_f16 ? SF_EMBEDDING_F16 : SF_EMBEDDING_BF16;
    if (o.device != base->device || o.embedding_table || o.embedding_dtype != base_dtype) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: options device %d, embedding_table %p, embedding_dtype %d; the base "
                       "engine's LLM is on device %d with %s embeddings (the same device and "
                       "dtype, and no table of its own, expected)",
                       fn, o.device, o.embedding_table, (int)o.embedding_dtype, base->device,
                       base->embed_f16 ? "fp16" : "bf16");
    }
    if (base->guard_only && !o.guard_only) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: the base engine is guard-only: it holds no decoder layer or LM head "
                       "to share with a full engine",
                       fn);
    }
    const sf_sysformer_config *scfg = sysformer ? &sysformer->cfg : NULL;
    if (scfg && scfg->llm_hidden_size && scfg->llm_hidden_size != base->cfg.hidden_size) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: the Sysformer was made for hidden size %d, the LLM has %d", fn,
                       scfg->llm_hidden_size, base->cfg.hidden_size);
    }
    sf_cuda_engine *e = NULL;
    sf_status st = engine_new(&base->cfg, scfg, &o, base, &e);
    if (st == SF_OK && sysformer) st = sf_cuda_weights_upload_sysformer(e, sysformer);
    if (!e) return st;
    return finish_create(e, st, out);
}

sf_status sf_cuda_check_sysformer(const sf_cuda_engine *e, const char *fn) {
    if (!e->sysformer_torn) return SF_OK;
    return sf_fail(SF_ERR_INVALID_ARGUMENT,
                   "%s: the engine's Sysformer is incomplete since a failed "
                   "sf_cuda_engine_set_sysformer (a mix of two Sysformers' weights): set one "
                   "again before guarded work",
                   fn);
}

sf_status sf_cuda_engine_set_sysformer(sf_cuda_engine *e, const sf_sysformer *sf) {
    if (!e || !sf) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_set_sysformer: NULL engine or Sysformer");
    }
    if (!e->has_sysformer) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_set_sysformer: the engine was created without a "
                       "Sysformer, so it has no room for one (create it with one)");
    }
    const sf_sysformer_config *have = &e->sys_cfg, *c = &sf->cfg;
    if (c->d_model != have->d_model || c->num_layers != have->num_layers ||
        c->num_heads != have->num_heads || c->dim_feedforward != have->dim_feedforward ||
        c->final_norm != have->final_norm ||
        c->system_offset_rows != have->system_offset_rows ||
        (c->llm_hidden_size && c->llm_hidden_size != e->cfg.hidden_size)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_set_sysformer: the engine holds a Sysformer of d_model "
                       "%d, %d layers, %d heads, ff %d, final norm %d, %d offset rows; this "
                       "one has %d, %d, %d, %d, %d, %d (made for hidden size %d)",
                       have->d_model, have->num_layers, have->num_heads, have->dim_feedforward,
                       have->final_norm, have->system_offset_rows, c->d_model, c->num_layers,
                       c->num_heads, c->dim_feedforward, c->final_norm, c->system_offset_rows,
                       c->llm_hidden_size);
    }
    SF_CUDA_OR_FAIL(cudaSetDevice(e->device));
    /* Past this point a failure may leave part of the old Sysformer's weights and part of the
     * new one's on the device: guarded work is refused until a swap succeeds. */
    const sf_status st = sf_cuda_weights_upload_sysformer(e, sf);
    e->sysformer_torn = st != SF_OK;
    if (st != SF_OK) return st;
    e->sys_cfg.activation = c->activation;
    e->sys_cfg.norm_first = c->norm_first;
    e->sys_cfg.layer_norm_eps = c->layer_norm_eps;
    return SF_OK;
}

void sf_cuda_engine_free(sf_cuda_engine *e) {
    if (!e) return;
    (void)cudaSetDevice(e->device);
    if (e->stream) (void)cudaStreamSynchronize(e->stream);
    sf_cuda_graphs_destroy(e);
    sf_gemm_cache_free(e->gemm);
    if (e->stream) (void)cudaStreamDestroy(e->stream);
    if (e->done) (void)cudaEventDestroy(e->done);
    if (e->staging_free) (void)cudaEventDestroy(e->staging_free);
    for (int i = 0; i < SF_STAGE_EVENTS; i++) {
        if (e->ev[i]) (void)cudaEventDestroy(e->ev[i]);
    }
    cudaFree(e->weights);
    llm_hold_release(e->llm_hold);
    cudaFree(e->k_cache);
    cudaFree(e->v_cache);
    cudaFree(e->arena_base);
    if (e->h.base) cudaFreeHost(e->h.base);
    (void)cudaGetLastError();
    free(e->layers);
    free(e->sys_layers);
    free(e->host_slot_len);
    free(e->host_slot_sampled);
    free(e->graphs);
    free(e->groups);
    free(e->order);
    free(e->row_of);
    free(e);
}

sf_status sf_cuda_engine_memory(const sf_cuda_engine *e, sf_cuda_memory *out) {
    if (!e || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_memory: NULL");
    out->weights = e->weight_bytes;
    out->kv_cache = e->kv_bytes;
    out->activations = e->arena_bytes;
    out->total = out->weights + out->kv_cache + out->activations;
    return SF_OK;
}

sf_status sf_cuda_engine_plan(const sf_llm_config *llm_cfg,
                              const sf_sysformer_config *sysformer_cfg,
                              const sf_cuda_engine_options *options, sf_cuda_memory *out) {
    if (out) memset(out, 0, sizeof *out);
    if (!llm_cfg || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_plan: NULL");
    const sf_cuda_engine_options o = options ? *options : sf_cuda_engine_default_options();
    SF_TRY(check_inputs(llm_cfg, sysformer_cfg, &o));
    SF_TRY(check_rope(llm_cfg));
    sf_cuda_engine *e = calloc(1, sizeof *e);
    if (!e) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_engine_plan: out of host memory");
    const sf_status st = engine_layout(e, llm_cfg, sysformer_cfg, &o);
    if (st == SF_OK) {
        out->weights = e->weight_bytes;
        out->kv_cache = 2 * e->kv_bytes;
        out->activations = e->arena_bytes;
        out->total = out->weights + out->kv_cache + out->activations;
    }
    free(e->layers);
    free(e->sys_layers);
    free(e);
    return st;
}

void *sf_cuda_engine_stream(const sf_cuda_engine *e) { return e ? (void *)e->stream : NULL; }

int32_t sf_cuda_engine_slot_length(const sf_cuda_engine *e, int32_t slot) {
    if (!e || slot < 0 || slot >= e->max_slots) return -1;
    return e->host_slot_len[slot];
}

sf_status sf_cuda_engine_reset_slot(sf_cuda_engine *e, int32_t slot) {
    if (!e || slot < 0 || slot >= e->max_slots) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_reset_slot: slot %d of %d", slot,
                       e ? e->max_slots : 0);
    }
    if (e->guard_only) {
        return sf_fail(SF_ERR_UNSUPPORTED, "sf_cuda_engine_reset_slot: a guard-only engine has "
                       "no slots");
    }
    /* ordered after any step already enqueued; the cache rows need no clearing: a slot's
     * attention reads only its first slot_len rows. The stream is the engine's device's. */
    SF_CUDA_OR_FAIL(cudaSetDevice(e->device));
    SF_CUDA_OR_FAIL(cudaMemsetAsync(e->a.slot_len + slot, 0, sizeof(int32_t), e->stream));
    e->host_slot_len[slot] = 0;
    e->host_slot_sampled[slot] = false;
    return SF_OK;
}

sf_status sf_cuda_engine_set_timing(sf_cuda_engine *e, bool on) {
    if (!e) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_set_timing: NULL engine");
    e->timing = on;
    return SF_OK;
}

sf_status sf_cuda_engine_stage_times(sf_cuda_engine *e, sf_cuda_stage_times *out) {
    if (!e || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_engine_stage_times: NULL");
    memset(out, 0, sizeof *out);
    if (!e->last_timed) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_engine_stage_times: the last step was not timed "
                       "(sf_cuda_engine_set_timing before it), or it failed");
    }
    SF_CUDA_OR_FAIL(cudaEventSynchronize(e->ev[SF_STAGE_EVENTS - 1]));
    out->step = e->steps;
    float ms[SF_STAGE_EVENTS - 1] = {0};
    if (e->last_graph) {
        SF_CUDA_OR_FAIL(cudaEventElapsedTime(&out->total_ms, e->ev[0], e->ev[SF_STAGE_EVENTS - 1]));
        return SF_OK;
    }
    for (int i = 0; i + 1 < SF_STAGE_EVENTS; i++) {
        SF_CUDA_OR_FAIL(cudaEventElapsedTime(&ms[i], e->ev[i], e->ev[i + 1]));
    }
    out->upload_ms = ms[0];
    out->embed_ms = ms[1];
    out->sysformer_ms = ms[2];
    out->layers_ms = ms[3];
    out->head_ms = ms[4];
    out->sample_ms = ms[5];
    SF_CUDA_OR_FAIL(cudaEventElapsedTime(&out->total_ms, e->ev[0], e->ev[SF_STAGE_EVENTS - 1]));
    return SF_OK;
}
