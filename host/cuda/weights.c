/* The engine's weights on the device: one bf16 allocation laid out tensor by tensor (256-byte
 * aligned, so every GEMM operand meets cuBLASLt's best alignment), filled either from the CPU
 * objects (fp32, rounded to nearest-even bf16 on the device) or with random values drawn on the
 * device for benchmarks. The q/k/v projections are stacked into one matrix, gate and up into
 * another, so each costs one GEMM. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "core/error.h"
#include "core/progress.h"
#include "cuda/engine.h"
#include "model/llm.h"
#include "random.h"
#include "sysformer/module.h"

#define STAGE_FLOATS ((size_t)16 << 20) /* 64 MiB of fp32 per upload chunk */

static const char kUploading[] = "uploading weights"; /* sf_set_progress's what */

static sf_bf16 *carve(sf_carver *c, size_t elems) {
    return (sf_bf16 *)sf_carve(c, elems * sizeof(sf_bf16));
}

static bool llm_has_qkv_bias(const sf_llm_config *c) { return c->attention_bias || c->qkv_bias; }

/* The decoder layers the engine holds: none when guard-only. */
static int llm_layers(const sf_cuda_engine *e) { return e->guard_only ? 0 : e->cfg.num_layers; }

/* The engine's own tensors: the LLM's (unless it shares another engine's) and the
 * Sysformer's. */
static size_t carve_weights(sf_cuda_engine *e, char *base) {
    sf_carver c = {base, 0};
    const sf_llm_config *cfg = &e->cfg;
    const size_t d = (size_t)e->d, ff = (size_t)e->ff;
    if (!e->borrowed_embed && !e->shares_llm) e->embed = carve(&c, (size_t)cfg->vocab_size * d);
    if (!e->guard_only && !e->shares_llm) {
        e->final_norm = carve(&c, d);
        e->lm_head = cfg->tie_word_embeddings ? e->embed : carve(&c, (size_t)cfg->vocab_size * d);
    }
    for (int l = 0; !e->shares_llm && l < llm_layers(e); l++) {
        sf_cuda_llm_layer *L = &e->layers[l];
        L->attn_norm = carve(&c, d);
        L->w_qkv = carve(&c, (size_t)e->qkv_dim * d);
        L->b_qkv = llm_has_qkv_bias(cfg) ? carve(&c, (size_t)e->qkv_dim) : NULL;
        L->w_o = carve(&c, d * (size_t)e->q_dim);
        L->b_o = cfg->attention_bias ? carve(&c, d) : NULL;
        L->mlp_norm = carve(&c, d);
        L->w_gate_up = carve(&c, 2 * ff * d);
        L->w_down = carve(&c, d * ff);
    }
    if (e->has_sysformer) {
        const size_t sff = (size_t)e->sys_ff;
        for (int l = 0; l < e->sys_cfg.num_layers; l++) {
            sf_cuda_sys_layer *S = &e->sys_layers[l];
            S->sa_in_w = carve(&c, 3 * d * d);
            S->sa_in_b = carve(&c, 3 * d);
            S->sa_out_w = carve(&c, d * d);
            S->sa_out_b = carve(&c, d);
            S->ca_in_w = carve(&c, 3 * d * d);
            S->ca_in_b = carve(&c, 3 * d);
            S->ca_out_w = carve(&c, d * d);
            S->ca_out_b = carve(&c, d);
            S->l1_w = carve(&c, sff * d);
            S->l1_b = carve(&c, sff);
            S->l2_w = carve(&c, d * sff);
            S->l2_b = carve(&c, d);
            for (int k = 0; k < 3; k++) {
                S->norm_w[k] = carve(&c, d);
                S->norm_b[k] = carve(&c, d);
            }
        }
        e->sys_final_w = e->sys_cfg.final_norm ? carve(&c, d) : NULL;
        e->sys_final_b = e->sys_cfg.final_norm ? carve(&c, d) : NULL;
        const size_t offset_rows = (size_t)e->sys_cfg.system_offset_rows;
        e->sys_offset = offset_rows > 0 ? carve(&c, offset_rows * d) : NULL;
    }
    return c.off;
}

sf_status sf_cuda_weights_layout(sf_cuda_engine *e) {
    e->layers = calloc((size_t)e->cfg.num_layers, sizeof *e->layers);
    e->sys_layers = calloc((size_t)(e->has_sysformer ? e->sys_cfg.num_layers : 0) + 1,
                           sizeof *e->sys_layers);
    if (!e->layers || !e->sys_layers) {
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_engine: out of host memory");
    }
    e->weight_bytes = carve_weights(e, NULL);
    return SF_OK;
}

sf_status sf_cuda_weights_alloc(sf_cuda_engine *e) {
    /* (a guard-only engine with a borrowed table and no Sysformer has no bytes of its own) */
    cudaError_t err = cudaMalloc(&e->weights, e->weight_bytes ? e->weight_bytes : 1);
    if (err != cudaSuccess) {
        e->weights = NULL;
        (void)cudaGetLastError();
        return sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                       "sf_cuda_engine: cannot allocate %zu bytes (%.2f GiB) of device memory "
                       "for the weights: %s",
                       e->weight_bytes, (double)e->weight_bytes / (1u << 30),
                       cudaGetErrorString(err));
    }
    carve_weights(e, e->weights);
    return SF_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Upload from the CPU objects                                                              */
/* ---------------------------------------------------------------------------------------- */

/* counting: only adds up the bytes (a first pass, for the progress total). total > 0: each
 * tensor enqueued reports its progress, short of total (the last report waits for the work). */
typedef struct uploader {
    float *stage; /* device fp32, STAGE_FLOATS */
    cudaStream_t stream;
    bool counting;
    uint64_t done, total; /* bf16 bytes */
} uploader;

/* n floats of src into dst as bf16, or as fp16 when f16 (an SF_EMBEDDING_F16 table). */
static sf_status put(uploader *u, uint16_t *dst, const float *src, size_t n, bool f16) {
    if (u->counting) {
        u->done += n * sizeof(sf_bf16);
        return SF_OK;
    }
    for (size_t off = 0; off < n; off += STAGE_FLOATS) {
        const size_t m = n - off < STAGE_FLOATS ? n - off : STAGE_FLOATS;
        cudaError_t err = cudaMemcpyAsync(u->stage, src + off, m * sizeof(float),
                                          cudaMemcpyHostToDevice, u->stream);
        if (err != cudaSuccess) {
            (void)cudaGetLastError(); /* not the next launch check's error */
            return sf_fail(SF_ERR_CUDA, "sf_cuda_engine: weight upload: %s",
                           cudaGetErrorString(err));
        }
        sf_status st = f16 ? sf_cuda_f32_to_f16(dst + off, u->stage, (int64_t)m, u->stream)
                           : sf_cuda_f32_to_bf16(dst + off, u->stage, (int64_t)m, u->stream);
        if (st != SF_OK) return st;
    }
    u->done += n * sizeof(sf_bf16);
    if (u->total > 0 && u->done < u->total) sf_progress(kUploading, u->done, u->total);
    return SF_OK;
}

static sf_status put_one(void *user, sf_bf16 *dst, const float *src, size_t n) {
    return put(user, dst, src, n, false);
}

#define EACH(dst, src, n)                                     \
    do {                                                      \
        sf_status st_ = fn(user, (dst), (src), (size_t)(n));  \
        if (st_ != SF_OK) return st_;                         \
    } while (0)

sf_status sf_cuda_weights_each_sysformer(sf_cuda_engine *e, const sf_sysformer *sf,
                                         sf_cuda_tensor_fn fn, void *user) {
    const int64_t d = e->d, sff = e->sys_ff;
    for (int l = 0; l < e->sys_cfg.num_layers; l++) {
        const sf_sysformer_layer *H = &sf->layers[l];
        sf_cuda_sys_layer *S = &e->sys_layers[l];
        EACH(S->sa_in_w, H->self_attn.in_proj_weight, 3 * d * d);
        EACH(S->sa_in_b, H->self_attn.in_proj_bias, 3 * d);
        EACH(S->sa_out_w, H->self_attn.out_proj_weight, d * d);
        EACH(S->sa_out_b, H->self_attn.out_proj_bias, d);
        EACH(S->ca_in_w, H->cross_attn.in_proj_weight, 3 * d * d);
        EACH(S->ca_in_b, H->cross_attn.in_proj_bias, 3 * d);
        EACH(S->ca_out_w, H->cross_attn.out_proj_weight, d * d);
        EACH(S->ca_out_b, H->cross_attn.out_proj_bias, d);
        EACH(S->l1_w, H->linear1_weight, sff * d);
        EACH(S->l1_b, H->linear1_bias, sff);
        EACH(S->l2_w, H->linear2_weight, d * sff);
        EACH(S->l2_b, H->linear2_bias, d);
        for (int k = 0; k < 3; k++) {
            EACH(S->norm_w[k], H->norm_weight[k], d);
            EACH(S->norm_b[k], H->norm_bias[k], d);
        }
    }
    if (e->sys_final_w) {
        EACH(e->sys_final_w, sf->final_norm_weight, d);
        EACH(e->sys_final_b, sf->final_norm_bias, d);
    }
    if (e->sys_offset) EACH(e->sys_offset, sf->system_offset, e->sys_cfg.system_offset_rows * d);
    return SF_OK;
}
#undef EACH

#define PUT(dst, src, n)                                          \
    do {                                                          \
        sf_status st_ = put(u, (dst), (src), (size_t)(n), false); \
        if (st_ != SF_OK) return st_;                             \
    } while (0)

static sf_status uploader_open(uploader *u, cudaStream_t stream) {
    u->stream = stream;
    u->counting = false;
    u->done = u->total = 0;
    const cudaError_t err = cudaMalloc((void **)&u->stage, STAGE_FLOATS * sizeof(float));
    if (err != cudaSuccess) {
        u->stage = NULL;
        (void)cudaGetLastError();
        return sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                       "sf_cuda_engine: cannot allocate %zu bytes of device memory to stage the "
                       "weight upload: %s", STAGE_FLOATS * sizeof(float), cudaGetErrorString(err));
    }
    return SF_OK;
}

/* st, unless the upload's work failed: the staging buffer is read by work still in flight, so
 * this waits for it before freeing the buffer. */
static sf_status uploader_close(uploader *u, sf_status st) {
    const cudaError_t err = cudaStreamSynchronize(u->stream);
    cudaFree(u->stage);
    if (st == SF_OK && err != cudaSuccess) {
        st = sf_fail(SF_ERR_CUDA, "sf_cuda_engine: weight upload: %s", cudaGetErrorString(err));
    }
    return st;
}

sf_status sf_cuda_weights_upload_sysformer(sf_cuda_engine *e, const sf_sysformer *sf) {
    uploader u;
    SF_TRY(uploader_open(&u, e->stream));
    return uploader_close(&u, sf_cuda_weights_each_sysformer(e, sf, put_one, &u));
}

/* Every tensor of llm and sf through u, in the layout's order. */
static sf_status put_all(sf_cuda_engine *e, const sf_llm *llm, const sf_sysformer *sf,
                         uploader *u) {
    const sf_llm_config *c = &e->cfg;
    const int64_t d = e->d, ff = e->ff, q = e->q_dim, kv = e->kv_dim;
    if (!e->borrowed_embed) {
        SF_TRY(put(u, e->embed, llm->embed, (size_t)c->vocab_size * (size_t)d, e->embed_f16));
    }
    if (e->final_norm) PUT(e->final_norm, llm->final_norm, d);
    if (e->lm_head && e->lm_head != e->embed) {
        PUT(e->lm_head, llm->lm_head, (int64_t)c->vocab_size * d);
    }
    for (int l = 0; l < llm_layers(e); l++) {
        const sf_llm_layer *H = &llm->layers[l];
        sf_cuda_llm_layer *L = &e->layers[l];
        PUT(L->attn_norm, H->attn_norm, d);
        PUT(L->w_qkv, H->wq, q * d);
        PUT(L->w_qkv + q * d, H->wk, kv * d);
        PUT(L->w_qkv + (q + kv) * d, H->wv, kv * d);
        if (L->b_qkv) {
            PUT(L->b_qkv, H->bq, q);
            PUT(L->b_qkv + q, H->bk, kv);
            PUT(L->b_qkv + q + kv, H->bv, kv);
        }
        PUT(L->w_o, H->wo, d * q);
        if (L->b_o) PUT(L->b_o, H->bo, d);
        PUT(L->mlp_norm, H->mlp_norm, d);
        PUT(L->w_gate_up, H->w_gate, ff * d);
        PUT(L->w_gate_up + ff * d, H->w_up, ff * d);
        PUT(L->w_down, H->w_down, d * ff);
    }
    if (sf && e->has_sysformer) return sf_cuda_weights_each_sysformer(e, sf, put_one, u);
    return SF_OK;
}
#undef PUT

sf_status sf_cuda_weights_upload(sf_cuda_engine *e, const sf_llm *llm, const sf_sysformer *sf) {
    uploader count = {.counting = true};
    SF_TRY(put_all(e, llm, sf, &count));
    uploader u;
    SF_TRY(uploader_open(&u, e->stream));
    u.total = count.done;
    sf_progress(kUploading, 0, u.total);
    const sf_status st = uploader_close(&u, put_all(e, llm, sf, &u));
    if (st == SF_OK) sf_progress(kUploading, u.total, u.total);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Random weights                                                                           */
/* ---------------------------------------------------------------------------------------- */

typedef struct filler {
    uint64_t seed;
    cudaStream_t stream;
} filler;

/* Uniform in [lo, hi), in bf16 (or fp16 when f16: an SF_EMBEDDING_F16 table, the same draws);
 * each tensor from its own stream of the seed. */
static sf_status fill(filler *f, uint16_t *x, int64_t n, float lo, float hi, bool f16) {
    f->seed += 0x9E3779B97F4A7C15ull;
    return f16 ? sf_cuda_fill_uniform_f16(x, n, f->seed, lo, hi, f->stream)
               : sf_cuda_fill_uniform_bf16(x, n, f->seed, lo, hi, f->stream);
}

#define FILL(x, n, lo, hi)                                                \
    do {                                                                  \
        sf_status st_ = fill(&f, (x), (int64_t)(n), (lo), (hi), false);   \
        if (st_ != SF_OK) return st_;                                     \
    } while (0)

sf_status sf_cuda_weights_random(sf_cuda_engine *e, uint64_t seed) {
    filler f = {seed, e->stream};
    const sf_llm_config *c = &e->cfg;
    const int64_t d = e->d, ff = e->ff, q = e->q_dim;
    /* nn.Linear's default init bound 1/sqrt(in_features); norms near 1 */
    const float bd = 1.0f / sqrtf((float)d), bq = 1.0f / sqrtf((float)q);
    const float bff = 1.0f / sqrtf((float)ff);
    SF_TRY(fill(&f, e->embed, (int64_t)c->vocab_size * d, -1.0f, 1.0f, e->embed_f16));
    if (e->final_norm) FILL(e->final_norm, d, 0.9f, 1.1f);
    if (e->lm_head && e->lm_head != e->embed) {
        FILL(e->lm_head, (int64_t)c->vocab_size * d, -bd, bd);
    }
    for (int l = 0; l < llm_layers(e); l++) {
        sf_cuda_llm_layer *L = &e->layers[l];
        FILL(L->attn_norm, d, 0.9f, 1.1f);
        FILL(L->w_qkv, e->qkv_dim * d, -bd, bd);
        if (L->b_qkv) FILL(L->b_qkv, e->qkv_dim, -bd, bd);
        FILL(L->w_o, d * q, -bq, bq);
        if (L->b_o) FILL(L->b_o, d, -bq, bq);
        FILL(L->mlp_norm, d, 0.9f, 1.1f);
        FILL(L->w_gate_up, 2 * ff * d, -bd, bd);
        FILL(L->w_down, d * ff, -bff, bff);
    }
    if (e->has_sysformer) {
        const int64_t sff = e->sys_ff;
        const float bs = 1.0f / sqrtf((float)sff);
        for (int l = 0; l < e->sys_cfg.num_layers; l++) {
            sf_cuda_sys_layer *S = &e->sys_layers[l];
            FILL(S->sa_in_w, 3 * d * d, -bd, bd);
            FILL(S->sa_in_b, 3 * d, -bd, bd);
            FILL(S->sa_out_w, d * d, -bd, bd);
            FILL(S->sa_out_b, d, -bd, bd);
            FILL(S->ca_in_w, 3 * d * d, -bd, bd);
            FILL(S->ca_in_b, 3 * d, -bd, bd);
            FILL(S->ca_out_w, d * d, -bd, bd);
            FILL(S->ca_out_b, d, -bd, bd);
            FILL(S->l1_w, sff * d, -bd, bd);
            FILL(S->l1_b, sff, -bd, bd);
            FILL(S->l2_w, d * sff, -bs, bs);
            FILL(S->l2_b, d, -bs, bs);
            for (int k = 0; k < 3; k++) {
                FILL(S->norm_w[k], d, 0.9f, 1.1f);
                FILL(S->norm_b[k], d, -0.1f, 0.1f);
            }
        }
        if (e->sys_final_w) {
            FILL(e->sys_final_w, d, 0.9f, 1.1f);
            FILL(e->sys_final_b, d, -0.1f, 0.1f);
        }
        /* an offset on the scale of the embedding rows it is added to */
        if (e->sys_offset) {
            FILL(e->sys_offset, (int64_t)e->sys_cfg.system_offset_rows * d, -1.0f, 1.0f);
        }
    }
    return SF_OK;
}
