/* The Sysformer on the device, and the guarded embedding built from it: the GPU twin of
 * host/sysformer/forward_cpu.c and sf_guarded_embed_cpu (host/model/guarded.c).
 *
 * The requests' system rows are gathered into a padded layout of max_system rows per request
 * (max_user for the user rows), so every GEMM runs once over all requests and the fused
 * attention sees per-request lengths (kv_len) for its keys. Padding rows are zeros, are never
 * attended to as keys, and are never spliced back: they cost max_system / mean(system) extra
 * GEMM rows and nothing else. Everything reads device memory only, so this runs inside a step
 * with no host round trip, and serves sf_cuda_guarded_embed on the caller's stream. */
#include <math.h>
#include <stdint.h>

#include "activations.h"
#include "attention.h"
#include "core/error.h"
#include "cuda/engine.h"
#include "embedding.h"
#include "guard.h"
#include "norms.h"

static sf_status gemm(sf_cuda_engine *e, sf_bf16 *y, int64_t ldy, const sf_bf16 *x, int64_t ldx,
                      const sf_bf16 *w, const sf_bf16 *bias, int64_t m, int64_t n, int64_t k,
                      sf_gemm_epilogue epi, cudaStream_t stream) {
    sf_gemm_args a = {y, ldy, false, x, ldx, w, bias, m, n, k, epi};
    return sf_cuda_gemm(e->gemm, &a, stream);
}

typedef struct sys_step {
    int32_t n_requests, max_system, max_user;
    int64_t Ts, Tu; /* padded system and user rows */
} sys_step;

static sf_status attend(sf_cuda_engine *e, const sys_step *p, sf_bf16 *out, const sf_bf16 *q,
                        int64_t q_stride, const sf_bf16 *k, const sf_bf16 *v, int64_t kv_stride,
                        bool cross, cudaStream_t s) {
    const sf_cuda_arena *a = &e->a;
    const int32_t heads = e->sys_cfg.num_heads;
    const int32_t hd = (int32_t)(e->d / heads);
    sf_attention_args at = {0};
    at.out = out;
    at.q = q;
    at.k = k;
    at.v = v;
    at.cu_q = a->cu_sys;
    at.cu_kv = cross ? a->cu_user : a->cu_sys;
    at.kv_len = cross ? a->user_len : a->sys_len;
    at.n_requests = p->n_requests;
    at.max_q_len = p->max_system;
    at.n_heads = at.n_kv_heads = heads;
    at.head_dim = hd;
    at.q_stride = q_stride;
    at.kv_stride = kv_stride;
    at.out_stride = e->d;
    at.causal = false;
    at.scale = (float)(1.0 / sqrt((double)hd));
    at.kernel = e->attention;
    return sf_cuda_attention_bf16(&at, s);
}

/* s_tmp = SA(in): nn.MultiheadAttention over the request's own system rows. */
static sf_status self_attention(sf_cuda_engine *e, const sf_cuda_sys_layer *L, const sys_step *p,
                                const sf_bf16 *in, cudaStream_t s) {
    sf_cuda_arena *a = &e->a;
    const int64_t d = e->d;
    SF_TRY(gemm(e, a->s_qkv, 3 * d, in, d, L->sa_in_w, L->sa_in_b, p->Ts, 3 * d, d, SF_GEMM_BIAS,
                s));
    SF_TRY(attend(e, p, a->s_attn, a->s_qkv, 3 * d, a->s_qkv + d, a->s_qkv + 2 * d, 3 * d, false,
                  s));
    return gemm(e, a->s_tmp, d, a->s_attn, d, L->sa_out_w, L->sa_out_b, p->Ts, d, d,
                SF_GEMM_BIAS, s);
}

/* s_tmp = CA(in, user rows): queries from the system rows, keys and values from the user's. */
static sf_status cross_attention(sf_cuda_engine *e, const sf_cuda_sys_layer *L,
                                 const sys_step *p, const sf_bf16 *in, cudaStream_t s) {
    sf_cuda_arena *a = &e->a;
    const int64_t d = e->d;
    SF_TRY(gemm(e, a->s_qkv, d, in, d, L->ca_in_w, L->ca_in_b, p->Ts, d, d, SF_GEMM_BIAS, s));
    SF_TRY(gemm(e, a->u_kv, 2 * d, a->u, d, L->ca_in_w + d * d, L->ca_in_b + d, p->Tu, 2 * d, d,
                SF_GEMM_BIAS, s));
    SF_TRY(attend(e, p, a->s_attn, a->s_qkv, d, a->u_kv, a->u_kv + d, 2 * d, true, s));
    return gemm(e, a->s_tmp, d, a->s_attn, d, L->ca_out_w, L->ca_out_b, p->Ts, d, d,
                SF_GEMM_BIAS, s);
}

/* s_tmp = linear2(act(linear1(in))). */
static sf_status feed_forward(sf_cuda_engine *e, const sf_cuda_sys_layer *L, const sys_step *p,
                              const sf_bf16 *in, cudaStream_t s) {
    sf_cuda_arena *a = &e->a;
    const int64_t d = e->d, ff = e->sys_ff;
    const bool relu = e->sys_cfg.activation == SF_ACT_RELU;
    SF_TRY(gemm(e, a->s_ff, ff, in, d, L->l1_w, L->l1_b, p->Ts, ff, d,
                relu ? SF_GEMM_RELU_BIAS : SF_GEMM_BIAS, s));
    if (!relu) SF_TRY(sf_cuda_gelu_bf16(a->s_ff, a->s_ff, p->Ts * ff, s));
    return gemm(e, a->s_tmp, d, a->s_ff, ff, L->l2_w, L->l2_b, p->Ts, d, ff, SF_GEMM_BIAS, s);
}

/* out = LayerNorm_k(x (+ residual)), residual_out as in sf_cuda_layernorm_bf16. */
static sf_status norm(sf_cuda_engine *e, const sf_cuda_sys_layer *L, int k, sf_bf16 *out,
                      sf_bf16 *residual_out, const sf_bf16 *x, const sf_bf16 *residual,
                      int64_t rows, cudaStream_t s) {
    return sf_cuda_layernorm_bf16(out, residual_out, x, residual, L->norm_w[k], L->norm_b[k],
                                  rows, e->d, e->sys_cfg.layer_norm_eps, s);
}

/* The decoder stack over s_x (in place), user rows in u. */
static sf_status sysformer_layers(sf_cuda_engine *e, const sys_step *p, cudaStream_t s) {
    sf_cuda_arena *a = &e->a;
    const int64_t Ts = p->Ts, d = e->d;
    const int n_layers = e->sys_cfg.num_layers;
    if (e->sys_cfg.norm_first) {
        /* x = x + SA(LN1(x)); x = x + CA(LN2(x)); x = x + FF(LN3(x)): each norm also performs
         * the residual add of the sub-block before it */
        for (int l = 0; l < n_layers; l++) {
            const sf_cuda_sys_layer *L = &e->sys_layers[l];
            if (l == 0) {
                SF_TRY(norm(e, L, 0, a->s_xn, NULL, a->s_x, NULL, Ts, s));
            } else {
                SF_TRY(norm(e, L, 0, a->s_xn, a->s_x, a->s_tmp, a->s_x, Ts, s));
            }
            SF_TRY(self_attention(e, L, p, a->s_xn, s));
            SF_TRY(norm(e, L, 1, a->s_xn, a->s_x, a->s_tmp, a->s_x, Ts, s));
            SF_TRY(cross_attention(e, L, p, a->s_xn, s));
            SF_TRY(norm(e, L, 2, a->s_xn, a->s_x, a->s_tmp, a->s_x, Ts, s));
            SF_TRY(feed_forward(e, L, p, a->s_xn, s));
        }
        if (n_layers > 0) {
            if (e->sys_final_w) {
                return sf_cuda_layernorm_bf16(a->s_x, NULL, a->s_tmp, a->s_x, e->sys_final_w,
                                              e->sys_final_b, Ts, d, e->sys_cfg.layer_norm_eps,
                                              s);
            }
            return sf_cuda_add_bf16(a->s_x, a->s_x, a->s_tmp, Ts * d, s);
        }
    } else {
        /* x = LN1(x + SA(x)); x = LN2(x + CA(x)); x = LN3(x + FF(x)) */
        for (int l = 0; l < n_layers; l++) {
            const sf_cuda_sys_layer *L = &e->sys_layers[l];
            SF_TRY(self_attention(e, L, p, a->s_x, s));
            SF_TRY(norm(e, L, 0, a->s_x, NULL, a->s_tmp, a->s_x, Ts, s));
            SF_TRY(cross_attention(e, L, p, a->s_x, s));
            SF_TRY(norm(e, L, 1, a->s_x, NULL, a->s_tmp, a->s_x, Ts, s));
            SF_TRY(feed_forward(e, L, p, a->s_x, s));
            SF_TRY(norm(e, L, 2, a->s_x, NULL, a->s_tmp, a->s_x, Ts, s));
        }
    }
    if (e->sys_final_w) {
        return sf_cuda_layernorm_bf16(a->s_x, NULL, a->s_x, NULL, e->sys_final_w, e->sys_final_b,
                                      Ts, d, e->sys_cfg.layer_norm_eps, s);
    }
    return SF_OK;
}

/* Rows of x (the engine's format) into the Sysformer's bf16 layout, and S' back: a copy, or for
 * an fp16 engine a rounding into bf16 on the way in and back to fp16 on the way out (the
 * Sysformer runs in bf16 either way). */
static sf_status rows_in(const sf_cuda_engine *e, sf_bf16 *dst, const void *x,
                         const int32_t *rows, int64_t n, cudaStream_t s) {
    const int64_t d = e->d;
    return e->embed_f16 ? sf_cuda_gather_rows_f16_to_bf16(dst, d, x, d, rows, n, d, s)
                        : sf_cuda_gather_rows_bf16(dst, d, x, d, rows, n, d, s);
}

static sf_status rows_out(const sf_cuda_engine *e, void *x, const sf_bf16 *src,
                          const int32_t *rows, int64_t n, cudaStream_t s) {
    const int64_t d = e->d;
    return e->embed_f16 ? sf_cuda_scatter_rows_bf16_to_f16(x, d, src, d, rows, n, d, s)
                        : sf_cuda_scatter_rows_bf16(x, d, src, d, rows, n, d, s);
}

sf_status sf_cuda_rewrite_system(sf_cuda_engine *e, int32_t n_requests, int32_t n_tokens,
                                 const int32_t *d_cu_seqlens, const int32_t *d_spans,
                                 int32_t max_system, int32_t max_user, void *x, int *d_errors,
                                 cudaStream_t s) {
    if (!e->has_sysformer || n_requests == 0) return SF_OK;
    sf_cuda_arena *a = &e->a;
    const int64_t d = e->d;
    /* With a learned system offset of n rows only spans of 0 or n rows are valid, so no
     * request needs more than n rows of the layout. */
    const int32_t offset_rows = e->sys_cfg.system_offset_rows;
    if (offset_rows > 0 && max_system > offset_rows) max_system = offset_rows;
    sys_step p = {n_requests, max_system, max_user, (int64_t)n_requests * max_system,
                  (int64_t)n_requests * max_user};
    sf_nvtx_push("sysformer");
    sf_status st = sf_cuda_guard_layout(d_cu_seqlens, d_spans, n_requests, n_tokens, max_system,
                                        max_user, offset_rows, a->sys_rows, a->user_rows,
                                        a->cu_sys, a->cu_user, a->sys_len, a->user_len, d_errors,
                                        s);
    /* max_system 0: no system row to rewrite, but the layout has counted the requests that
     * have one (over max_system) */
    if (max_system == 0) {
        sf_nvtx_pop();
        return st;
    }
    if (st == SF_OK) st = rows_in(e, a->s_x, x, a->sys_rows, p.Ts, s);
    /* X = S + offset (sf_sysformer_add_offset). The layout is then [n_requests, n d]: the offset
     * is one bias row over it. A request without a valid system span gets it on padding rows,
     * which are never keys and never spliced back. (max_system < n: no span is valid.) */
    if (st == SF_OK && e->sys_offset && max_system == offset_rows) {
        st = sf_cuda_bias_add_bf16(a->s_x, e->sys_offset, n_requests, (int64_t)offset_rows * d, s);
    }
    if (st == SF_OK) st = rows_in(e, a->u, x, a->user_rows, p.Tu, s);
    if (st == SF_OK) st = sysformer_layers(e, &p, s);
    /* the splice: S' over the system rows of x (padding rows and invalid requests: -1, skipped) */
    if (st == SF_OK) st = rows_out(e, x, a->s_x, a->sys_rows, p.Ts, s);
    sf_nvtx_pop();
    return st;
}

/* The host-side checks of a serving batch (sf_cuda_guarded_embed, sf_cuda_guard_check). */
static sf_status check_batch(const char *fn, const sf_cuda_engine *e, int32_t n_requests,
                             int32_t n_tokens, int32_t max_system, int32_t max_user) {
    if (!e) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL engine", fn);
    if (n_requests < 0 || n_tokens < 0 || max_system < 0 || max_user < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: n_requests %d, n_tokens %d, max_system %d, max_user %d", fn,
                       n_requests, n_tokens, max_system, max_user);
    }
    if (n_requests > e->max_slots || n_tokens > e->max_batch_tokens ||
        (int64_t)n_requests * max_system > e->max_batch_tokens ||
        (int64_t)n_requests * max_user > e->max_batch_tokens) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "%s: %d requests, %d tokens, %d x %d system and %d x %d user rows; the "
                       "engine was sized for %d requests and %d tokens",
                       fn, n_requests, n_tokens, n_requests, max_system, n_requests, max_user,
                       e->max_slots, e->max_batch_tokens);
    }
    return SF_OK;
}

/* Any of the int32 device arrays off a 4-byte boundary (a corrupt offset: on a GPU, a
 * misaligned-address fault that ends the context). */
static bool misaligned4(const void *a, const void *b, const void *c, const void *d) {
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d) & 3u) != 0;
}

sf_status sf_cuda_guard_check(sf_cuda_engine *e, int32_t n_requests, int32_t n_tokens,
                              const int32_t *d_cu_seqlens, const int32_t *d_token_ids,
                              const sf_prompt_spans *d_spans, int32_t max_system,
                              int32_t max_user, int32_t *d_flags, void *cuda_stream) {
    SF_TRY(check_batch("sf_cuda_guard_check", e, n_requests, n_tokens, max_system, max_user));
    if (n_requests == 0) return SF_OK;
    if (!d_cu_seqlens || !d_flags || (n_tokens > 0 && !d_token_ids) ||
        (e->has_sysformer && !d_spans)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_guard_check: NULL device pointer");
    }
    if (misaligned4(d_cu_seqlens, d_token_ids, d_spans, d_flags)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_guard_check: a device array not 4-byte aligned");
    }
    return sf_cuda_guard_check_flags(
        d_cu_seqlens, e->has_sysformer ? (const int32_t *)d_spans : NULL, d_token_ids,
        n_requests, n_tokens, e->cfg.vocab_size, max_system, max_user,
        e->has_sysformer ? e->sys_cfg.system_offset_rows : 0, d_flags,
        (cudaStream_t)cuda_stream);
}

sf_status sf_cuda_guarded_embed(sf_cuda_engine *e, int32_t n_requests, int32_t n_tokens,
                                const int32_t *d_cu_seqlens, const int32_t *d_token_ids,
                                const sf_prompt_spans *d_spans, int32_t max_system,
                                int32_t max_user, void *d_embeds, int *d_errors,
                                void *cuda_stream) {
    SF_TRY(check_batch("sf_cuda_guarded_embed", e, n_requests, n_tokens, max_system, max_user));
    if (n_tokens == 0) return SF_OK;
    if (!d_cu_seqlens || !d_token_ids || !d_spans || !d_embeds || ((uintptr_t)d_embeds & 15u) ||
        misaligned4(d_cu_seqlens, d_token_ids, d_spans, d_errors)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_guarded_embed: NULL device pointer, d_embeds not 16-byte "
                       "aligned, or an int array not 4-byte aligned");
    }
    if (e->has_sysformer) SF_TRY(sf_cuda_check_sysformer(e, "sf_cuda_guarded_embed"));
    cudaStream_t s = (cudaStream_t)cuda_stream;
    sf_nvtx_push("sf_cuda_guarded_embed");
    const int32_t vocab = e->cfg.vocab_size;
    sf_status st = e->embed_f16 ? sf_cuda_embedding_f16(d_embeds, e->embed, d_token_ids, n_tokens,
                                                        e->d, vocab, d_errors, s)
                                : sf_cuda_embedding_bf16(d_embeds, e->embed, d_token_ids,
                                                         n_tokens, e->d, vocab, d_errors, s);
    if (st == SF_OK) {
        st = sf_cuda_rewrite_system(e, n_requests, n_tokens, d_cu_seqlens,
                                    (const int32_t *)d_spans, max_system, max_user, d_embeds,
                                    d_errors, s);
    }
    sf_nvtx_pop();
    return st;
}
