/* The frozen LLM's decoder layers and LM head on the device, over one step's packed rows. The
 * GPU twin of host/model/forward_cpu.c: the same sub-blocks in the same order, with bf16
 * activations, and each request's new K/V rows written into its slot of the KV cache before
 * attention reads the slot (so prefill and decode are one code path, as on the CPU).
 *
 * Per layer (T packed rows):
 *   xn = rmsnorm(x (+ tmp, the previous sub-block's output; fused residual add))
 *   qkv = xn W_qkv^T (+ b)            one GEMM for q, k and v
 *   rope(q) in place, rope(k) and v   one launch (sf_cuda_rope_kv_cache_bf16)
 *     -> the rows' cache slots
 *   attn = attention(q, cache)        causal, GQA, per-request positions and lengths
 *   tmp = attn W_o^T (+ b)
 *   xn = rmsnorm(x += tmp)
 *   act = swiglu(xn W_gate_up^T)      one GEMM for gate and up, one fused activation
 *   tmp = act W_down^T                the residual add happens in the next norm */
#include <math.h>
#include <stdio.h>

#include "activations.h"
#include "attention.h"
#include "core/error.h"
#include "cuda/engine.h"
#include "guard.h"
#include "norms.h"
#include "rope.h"

static sf_status gemm(sf_cuda_engine *e, void *y, bool y_f32, int64_t ldy, const sf_bf16 *x,
                      int64_t ldx, const sf_bf16 *w, const sf_bf16 *bias, int64_t m, int64_t n,
                      int64_t k, cudaStream_t stream) {
    sf_gemm_args a = {y, ldy, y_f32, x, ldx, w, bias, m, n, k,
                      bias ? SF_GEMM_BIAS : SF_GEMM_NONE};
    return sf_cuda_gemm(e->gemm, &a, stream);
}

static sf_status layer(sf_cuda_engine *e, int l, int32_t n_requests, int64_t T,
                       int32_t max_q_len, cudaStream_t s) {
    const sf_llm_config *c = &e->cfg;
    const sf_cuda_llm_layer *L = &e->layers[l];
    sf_cuda_arena *a = &e->a;
    const int64_t d = e->d, q = e->q_dim, kv = e->kv_dim, qkv = e->qkv_dim, ff = e->ff;
    const int64_t cache_rows = (int64_t)e->max_slots * e->max_context;
    sf_bf16 *kc = e->k_cache + (int64_t)l * cache_rows * kv;
    sf_bf16 *vc = e->v_cache + (int64_t)l * cache_rows * kv;

    /* the first layer normalises the embeddings; later ones add the previous MLP output */
    SF_TRY(sf_cuda_rmsnorm_bf16(a->xn, l ? a->x : NULL, l ? a->tmp : a->x, l ? a->x : NULL,
                                L->attn_norm, T, d, c->rms_norm_eps, s));
    SF_TRY(gemm(e, a->qkv, false, qkv, a->xn, d, L->w_qkv, L->b_qkv, T, qkv, d, s));
    SF_TRY(sf_cuda_rope_kv_cache_bf16(a->qkv, qkv, T, c->num_heads, c->num_kv_heads,
                                      c->head_dim, a->positions, a->rope_table, a->inv_freq,
                                      e->rope_scale[0], e->rope_scale[1], a->kv_rows, kc, vc, kv,
                                      s));

    sf_attention_args at = {0};
    at.out = a->attn;
    at.q = a->qkv;
    at.k = kc;
    at.v = vc;
    at.cu_q = a->cu_q;
    at.cu_kv = a->cu_kv;
    at.kv_len = a->kv_len;
    at.q_pos0 = a->q_pos0;
    at.n_requests = n_requests;
    at.max_q_len = max_q_len;
    at.n_heads = c->num_heads;
    at.n_kv_heads = c->num_kv_heads;
    at.head_dim = c->head_dim;
    at.q_stride = qkv;
    at.kv_stride = kv;
    at.out_stride = q;
    at.causal = true;
    at.window = c->sliding_window;
    at.scale = (float)(1.0 / sqrt((double)c->head_dim));
    /* decode: the keys split over blocks, bounded by the context (a host value, so the
     * captured decode graph stays valid as the caches grow) */
    at.max_kv_len = e->max_context;
    at.workspace = a->attn_ws;
    at.workspace_bytes = a->attn_ws_bytes;
    at.kernel = e->attention;
    SF_TRY(sf_cuda_attention_bf16(&at, s));

    SF_TRY(gemm(e, a->tmp, false, d, a->attn, q, L->w_o, L->b_o, T, d, q, s));
    SF_TRY(sf_cuda_rmsnorm_bf16(a->xn, a->x, a->tmp, a->x, L->mlp_norm, T, d, c->rms_norm_eps, s));
    SF_TRY(gemm(e, a->gate_up, false, 2 * ff, a->xn, d, L->w_gate_up, NULL, T, 2 * ff, d, s));
    SF_TRY(sf_cuda_swiglu_fused_bf16(a->act, a->gate_up, T, ff, s));
    SF_TRY(gemm(e, a->tmp, false, d, a->act, ff, L->w_down, NULL, T, d, ff, s));
    return SF_OK;
}

sf_status sf_cuda_llm_layers(sf_cuda_engine *e, int32_t n_requests, int32_t n_tokens,
                             int32_t max_q_len, cudaStream_t stream) {
    for (int l = 0; l < e->cfg.num_layers; l++) {
        char name[32];
        snprintf(name, sizeof name, "llm layer %d", l);
        sf_nvtx_push(name);
        sf_status st = layer(e, l, n_requests, n_tokens, max_q_len, stream);
        sf_nvtx_pop();
        if (st != SF_OK) return st;
    }
    return SF_OK;
}

sf_status sf_cuda_llm_head(sf_cuda_engine *e, int32_t n_requests, cudaStream_t s) {
    const sf_llm_config *c = &e->cfg;
    sf_cuda_arena *a = &e->a;
    const int64_t d = e->d;
    sf_nvtx_push("llm head");
    /* only each request's last row: gather it from the residual stream and the last MLP's
     * output, then the last residual add, the final norm and the LM head on those rows */
    sf_status st = sf_cuda_gather_rows_bf16(a->head_x, d, a->x, d, a->last_row, n_requests, d, s);
    if (st == SF_OK) {
        st = sf_cuda_gather_rows_bf16(a->head_tmp, d, a->tmp, d, a->last_row, n_requests, d, s);
    }
    if (st == SF_OK) {
        st = sf_cuda_rmsnorm_bf16(a->head_x, NULL, a->head_tmp, a->head_x, e->final_norm,
                                  n_requests, d, c->rms_norm_eps, s);
    }
    if (st == SF_OK) {
        st = gemm(e, a->logits, true, c->vocab_size, a->head_x, d, e->lm_head, NULL, n_requests,
                  c->vocab_size, d, s);
    }
    sf_nvtx_pop();
    return st;
}
