/* The CPU reference forward pass over a packed variable-length batch.
 *
 * All requests' new tokens are processed together by every GEMM (rows back to back, no padding);
 * only RoPE and attention look at request boundaries. Each request's new keys and values go to
 * its KV cache at positions [length, length + n), and its queries attend causally over the
 * cache's [0, length + n). Without caches, the packed k/v rows of the current layer serve as a
 * transient cache and positions start at 0.
 *
 * Every buffer is allocated before the first layer runs, so once computing starts nothing can
 * fail, and the caches' lengths are advanced only at the end. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "cpu/ops.h"
#include "model/llm.h"

sf_status sf_llm_embed(const sf_llm *llm, const int32_t *ids, int64_t n, float *out) {
    if (!llm || (n > 0 && (!ids || !out)) || n < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_embed: NULL argument or negative count");
    }
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= llm->cfg.vocab_size) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_llm_embed: token id %d at index %lld outside [0, %d)", ids[i],
                           (long long)i, llm->cfg.vocab_size);
        }
    }
    sf_cpu_embedding(out, llm->embed, ids, n, llm->cfg.hidden_size);
    return SF_OK;
}

/* Checks everything about the batch that could make the forward pass fail or read out of
 * bounds, so that the computation itself cannot. */
static sf_status validate_batch(const sf_llm *llm, const sf_batch *b, const float *logits) {
    const sf_llm_config *c = &llm->cfg;
    const sf_status whole = sf_llm_check_whole(llm, "sf_llm_forward_cpu");
    if (whole != SF_OK) return whole;
    if (b->n_requests < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_forward_cpu: n_requests = %d",
                       b->n_requests);
    }
    if (!b->cu_seqlens) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_forward_cpu: cu_seqlens is NULL");
    }
    if (b->cu_seqlens[0] != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_forward_cpu: cu_seqlens[0] = %d, not 0",
                       b->cu_seqlens[0]);
    }
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int32_t n = b->cu_seqlens[r + 1] - b->cu_seqlens[r];
        if (b->cu_seqlens[r + 1] < b->cu_seqlens[r]) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_llm_forward_cpu: cu_seqlens decreases at request %d (%d -> %d)", r,
                           b->cu_seqlens[r], b->cu_seqlens[r + 1]);
        }
        if (b->kv_caches) {
            const sf_kv_cache *kv = b->kv_caches[r];
            if (!kv) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT,
                               "sf_llm_forward_cpu: kv_caches[%d] is NULL", r);
            }
            if (kv->n_layers != c->num_layers ||
                kv->kv_dim != (int64_t)c->num_kv_heads * c->head_dim) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT,
                               "sf_llm_forward_cpu: kv_caches[%d] was made for another model", r);
            }
            for (int32_t q = 0; q < r; q++) {
                if (b->kv_caches[q] == kv) {
                    return sf_fail(SF_ERR_INVALID_ARGUMENT,
                                   "sf_llm_forward_cpu: requests %d and %d share a KV cache", q, r);
                }
            }
            if ((int64_t)kv->length + n > kv->capacity) {
                return sf_fail(SF_ERR_OUT_OF_RANGE,
                               "sf_llm_forward_cpu: request %d needs %lld positions; its KV cache "
                               "holds %d",
                               r, (long long)kv->length + n, kv->capacity);
            }
        } else if (n > c->max_position_embeddings) {
            return sf_fail(SF_ERR_OUT_OF_RANGE,
                           "sf_llm_forward_cpu: request %d has %d tokens; the model allows %d "
                           "(max_position_embeddings)",
                           r, n, c->max_position_embeddings);
        }
    }
    const int32_t total = b->cu_seqlens[b->n_requests];
    if (total > 0 && (b->token_ids == NULL) == (b->input_embeds == NULL)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_llm_forward_cpu: give exactly one of token_ids and input_embeds");
    }
    if (b->token_ids) {
        for (int32_t t = 0; t < total; t++) {
            if (b->token_ids[t] < 0 || b->token_ids[t] >= c->vocab_size) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT,
                               "sf_llm_forward_cpu: token id %d at packed row %d outside [0, %d)",
                               b->token_ids[t], t, c->vocab_size);
            }
        }
    }
    if (b->n_logit_rows < 0 || (b->n_logit_rows > 0 && (!b->logit_rows || !logits))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_llm_forward_cpu: n_logit_rows = %d with logit_rows or logits NULL",
                       b->n_logit_rows);
    }
    for (int32_t i = 0; i < b->n_logit_rows; i++) {
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= total) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_llm_forward_cpu: logit_rows[%d] = %d outside [0, %d)", i,
                           b->logit_rows[i], total);
        }
    }
    return SF_OK;
}

/* Scratch for one call: activations of every packed row plus per-row positions. */
typedef struct scratch {
    float *x;        /* [T, d]   the residual stream                 */
    float *xn;       /* [T, d]   normalised input of a sub-block     */
    float *q;        /* [T, h*hd]                                    */
    float *k, *v;    /* [T, kv*hd] this layer's new keys and values  */
    float *attn;     /* [T, h*hd] attention output                   */
    float *gate, *up; /* [T, ff]                                     */
    float *rows;     /* [n_logit_rows, d] rows whose logits are wanted */
    int32_t *pos;    /* [T] position of each packed row               */
    double *inv_freq; /* [hd/2]                                      */
} scratch;

static void scratch_free(scratch *s) {
    free(s->x);
    free(s->xn);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->attn);
    free(s->gate);
    free(s->up);
    free(s->rows);
    free(s->pos);
    free(s->inv_freq);
}

static sf_status scratch_alloc(scratch *s, const sf_llm_config *c, int64_t T, int64_t n_logits) {
    memset(s, 0, sizeof *s);
    const int64_t d = c->hidden_size, ff = c->intermediate_size;
    const int64_t q_dim = (int64_t)c->num_heads * c->head_dim;
    const int64_t kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    /* +1 keeps every size non-zero, so NULL always means failure. */
    s->x = malloc(((size_t)(T * d) + 1) * sizeof(float));
    s->xn = malloc(((size_t)(T * d) + 1) * sizeof(float));
    s->q = malloc(((size_t)(T * q_dim) + 1) * sizeof(float));
    s->k = malloc(((size_t)(T * kv_dim) + 1) * sizeof(float));
    s->v = malloc(((size_t)(T * kv_dim) + 1) * sizeof(float));
    s->attn = malloc(((size_t)(T * q_dim) + 1) * sizeof(float));
    s->gate = malloc(((size_t)(T * ff) + 1) * sizeof(float));
    s->up = malloc(((size_t)(T * ff) + 1) * sizeof(float));
    s->rows = malloc(((size_t)(n_logits * d) + 1) * sizeof(float));
    s->pos = malloc(((size_t)T + 1) * sizeof(int32_t));
    s->inv_freq = malloc(((size_t)c->head_dim / 2 + 1) * sizeof(double));
    if (!s->x || !s->xn || !s->q || !s->k || !s->v || !s->attn || !s->gate || !s->up ||
        !s->rows || !s->pos || !s->inv_freq) {
        scratch_free(s);
        return sf_fail(SF_ERR_OUT_OF_MEMORY,
                       "sf_llm_forward_cpu: cannot allocate activations for %lld rows",
                       (long long)T);
    }
    return SF_OK;
}

/* Self-attention of one layer for every request: RoPE on the new q/k rows, new k/v into the
 * cache (or used in place), then causal attention over the request's whole history. */
static void attention_block(const sf_llm *llm, const sf_batch *b, int layer, scratch *s) {
    const sf_llm_config *c = &llm->cfg;
    const int64_t q_dim = (int64_t)c->num_heads * c->head_dim;
    const int64_t kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    const float scale = (float)(1.0 / sqrt((double)c->head_dim));

    for (int32_t r = 0; r < b->n_requests; r++) {
        const int64_t row0 = b->cu_seqlens[r];
        const int64_t n = b->cu_seqlens[r + 1] - row0;
        if (n == 0) continue;
        const int64_t start = b->kv_caches ? b->kv_caches[r]->length : 0;

        /* Longrope picks its factors from the request's length after this call, as
         * transformers does from max(position_ids) + 1 of each forward call. */
        double attention_scale = 1.0;
        sf_cpu_rope_freqs(c, start + n, s->inv_freq, &attention_scale);
        float *q = s->q + row0 * q_dim;
        float *k = s->k + row0 * kv_dim;
        float *v = s->v + row0 * kv_dim;
        sf_cpu_rope_apply(q, s->pos + row0, n, c->num_heads, c->head_dim, s->inv_freq,
                          attention_scale);
        sf_cpu_rope_apply(k, s->pos + row0, n, c->num_kv_heads, c->head_dim, s->inv_freq,
                          attention_scale);

        const float *keys = k, *values = v;
        if (b->kv_caches) {
            sf_kv_cache *kv = b->kv_caches[r];
            float *kc = kv->k + (int64_t)layer * kv->capacity * kv_dim;
            float *vc = kv->v + (int64_t)layer * kv->capacity * kv_dim;
            memcpy(kc + start * kv_dim, k, (size_t)(n * kv_dim) * sizeof(float));
            memcpy(vc + start * kv_dim, v, (size_t)(n * kv_dim) * sizeof(float));
            keys = kc;
            values = vc;
        }
        sf_cpu_attention(s->attn + row0 * q_dim, q, keys, values, n, start + n, c->num_heads,
                         c->num_kv_heads, c->head_dim, true, start, c->sliding_window, scale);
    }
}

sf_status sf_llm_forward_cpu(const sf_llm *llm, const sf_batch *batch, float *logits) {
    if (!llm || !batch) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_forward_cpu: NULL model or batch");
    }
    sf_status st = validate_batch(llm, batch, logits);
    if (st != SF_OK) return st;

    const sf_llm_config *c = &llm->cfg;
    const int64_t T = batch->cu_seqlens[batch->n_requests];
    const int64_t d = c->hidden_size, ff = c->intermediate_size;
    const int64_t q_dim = (int64_t)c->num_heads * c->head_dim;
    const int64_t kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    const int64_t n_logits = batch->n_logit_rows;

    scratch s;
    st = scratch_alloc(&s, c, T, n_logits);
    if (st != SF_OK) return st;

    for (int32_t r = 0; r < batch->n_requests; r++) {
        const int32_t start = batch->kv_caches ? batch->kv_caches[r]->length : 0;
        for (int32_t t = batch->cu_seqlens[r]; t < batch->cu_seqlens[r + 1]; t++) {
            s.pos[t] = start + (t - batch->cu_seqlens[r]);
        }
    }
    if (batch->token_ids) {
        sf_cpu_embedding(s.x, llm->embed, batch->token_ids, T, d);
    } else if (T > 0) {
        memcpy(s.x, batch->input_embeds, (size_t)(T * d) * sizeof(float));
    }

    for (int layer = 0; layer < c->num_layers; layer++) {
        const sf_llm_layer *L = &llm->layers[layer];

        sf_cpu_rmsnorm(s.xn, s.x, L->attn_norm, T, d, c->rms_norm_eps);
        sf_cpu_matmul(s.q, s.xn, L->wq, L->bq, T, q_dim, d);
        sf_cpu_matmul(s.k, s.xn, L->wk, L->bk, T, kv_dim, d);
        sf_cpu_matmul(s.v, s.xn, L->wv, L->bv, T, kv_dim, d);
        attention_block(llm, batch, layer, &s);
        sf_cpu_matmul(s.xn, s.attn, L->wo, L->bo, T, d, q_dim);
        sf_cpu_add(s.x, s.x, s.xn, T * d);

        sf_cpu_rmsnorm(s.xn, s.x, L->mlp_norm, T, d, c->rms_norm_eps);
        sf_cpu_matmul(s.gate, s.xn, L->w_gate, NULL, T, ff, d);
        sf_cpu_matmul(s.up, s.xn, L->w_up, NULL, T, ff, d);
        sf_cpu_swiglu(s.gate, s.gate, s.up, T * ff);
        sf_cpu_matmul(s.xn, s.gate, L->w_down, NULL, T, d, ff);
        sf_cpu_add(s.x, s.x, s.xn, T * d);
    }

    /* The final norm and the LM head run only on the rows whose logits were asked for. */
    for (int64_t i = 0; i < n_logits; i++) {
        memcpy(s.rows + i * d, s.x + (int64_t)batch->logit_rows[i] * d, (size_t)d * sizeof(float));
    }
    sf_cpu_rmsnorm(s.rows, s.rows, llm->final_norm, n_logits, d, c->rms_norm_eps);
    sf_cpu_matmul(logits, s.rows, llm->lm_head, NULL, n_logits, c->vocab_size, d);

    if (batch->kv_caches) {
        for (int32_t r = 0; r < batch->n_requests; r++) {
            batch->kv_caches[r]->length += batch->cu_seqlens[r + 1] - batch->cu_seqlens[r];
        }
    }
    scratch_free(&s);
    return SF_OK;
}
