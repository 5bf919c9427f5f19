/* The Sysformer's forward pass on the CPU, over a packed batch of requests.
 *
 * Every linear layer runs once over all requests' system rows (or user rows) back to back; only
 * attention looks at request boundaries: self-attention among a request's own system rows,
 * cross-attention from them to the same request's user rows, neither masked. Same math as
 * PyTorch's nn.TransformerDecoder in eval mode (see sf_activation and docs/SYSFORMER.md). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "cpu/ops.h"
#include "sysformer/module.h"

static sf_status validate(const sf_sysformer *sf, const sf_rewrite_batch *b, const float *out) {
    if (b->n_requests < 0 || !b->cu_system || !b->cu_user) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_forward_cpu: bad batch arrays");
    }
    if (b->cu_system[0] != 0 || b->cu_user[0] != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_sysformer_forward_cpu: cu_system[0] and cu_user[0] must be 0");
    }
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int32_t ns = b->cu_system[r + 1] - b->cu_system[r];
        const int32_t nu = b->cu_user[r + 1] - b->cu_user[r];
        if (ns < 0 || nu < 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_sysformer_forward_cpu: offsets decrease at request %d", r);
        }
        if (ns > 0 && nu == 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "sf_sysformer_forward_cpu: request %d has a system span of %d tokens "
                           "but an empty user span; cross-attention needs at least one user token",
                           r, ns);
        }
    }
    const int32_t ts = b->cu_system[b->n_requests], tu = b->cu_user[b->n_requests];
    if ((ts > 0 && (!b->system || !out)) || (tu > 0 && !b->user)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_forward_cpu: NULL data");
    }
    (void)sf;
    return SF_OK;
}

typedef struct scratch {
    float *h;          /* [Ts, d]  normalised input of a sub-block          */
    float *q, *k, *v;  /* [Ts, d]  self-attention projections               */
    float *ck, *cv;    /* [Tu, d]  cross-attention keys and values          */
    float *attn;       /* [Ts, d]  attention output before out_proj         */
    float *y;          /* [Ts, d]  a sub-block's output                      */
    float *ff;         /* [Ts, ff]                                          */
} scratch;

static void scratch_free(scratch *s) {
    free(s->h);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->ck);
    free(s->cv);
    free(s->attn);
    free(s->y);
    free(s->ff);
}

static sf_status scratch_alloc(scratch *s, int64_t ts, int64_t tu, int64_t d, int64_t ff) {
    memset(s, 0, sizeof *s);
    const size_t sd = (size_t)(ts * d + 1) * sizeof(float);
    const size_t ud = (size_t)(tu * d + 1) * sizeof(float);
    s->h = malloc(sd);
    s->q = malloc(sd);
    s->k = malloc(sd);
    s->v = malloc(sd);
    s->attn = malloc(sd);
    s->y = malloc(sd);
    s->ck = malloc(ud);
    s->cv = malloc(ud);
    s->ff = malloc((size_t)(ts * ff + 1) * sizeof(float));
    if (!s->h || !s->q || !s->k || !s->v || !s->attn || !s->y || !s->ck || !s->cv || !s->ff) {
        scratch_free(s);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_forward_cpu: out of memory");
    }
    return SF_OK;
}

/* y = MHA(queries from xq, keys/values from kv rows) for every request: the in_proj row blocks
 * are q, k, v; attention is per request and unmasked; then out_proj. For self-attention kv is
 * xq itself (cu_kv == cu_q). */
static void mha(const sf_mha_weights *w, const float *xq, const float *xkv, const int32_t *cu_q,
                const int32_t *cu_kv, int32_t n_req, int64_t tq, int64_t tkv, int32_t d,
                int32_t heads, scratch *s, float *q, float *k, float *v, float *y) {
    const int64_t dd = (int64_t)d * d;
    sf_cpu_matmul(q, xq, w->in_proj_weight, w->in_proj_bias, tq, d, d);
    sf_cpu_matmul(k, xkv, w->in_proj_weight + dd, w->in_proj_bias + d, tkv, d, d);
    sf_cpu_matmul(v, xkv, w->in_proj_weight + 2 * dd, w->in_proj_bias + 2 * d, tkv, d, d);
    const int32_t hd = d / heads;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int32_t r = 0; r < n_req; r++) {
        const int64_t q0 = cu_q[r], nq = cu_q[r + 1] - cu_q[r];
        const int64_t k0 = cu_kv[r], nk = cu_kv[r + 1] - cu_kv[r];
        if (nq == 0) continue;
        sf_cpu_attention(s->attn + q0 * d, q + q0 * d, k + k0 * d, v + k0 * d, nq, nk, heads,
                         heads, hd, false, 0, 0, scale);
    }
    sf_cpu_matmul(y, s->attn, w->out_proj_weight, w->out_proj_bias, tq, d, d);
}

static void feed_forward(const sf_sysformer_layer *L, const sf_sysformer_config *c,
                         const float *x, int64_t ts, scratch *s, float *y) {
    const int64_t ff = c->dim_feedforward;
    sf_cpu_matmul(s->ff, x, L->linear1_weight, L->linear1_bias, ts, ff, c->d_model);
    if (c->activation == SF_ACT_GELU) sf_cpu_gelu(s->ff, s->ff, ts * ff);
    else sf_cpu_relu(s->ff, s->ff, ts * ff);
    sf_cpu_matmul(y, s->ff, L->linear2_weight, L->linear2_bias, ts, c->d_model, ff);
}

sf_status sf_sysformer_forward_cpu(const sf_sysformer *sf, const sf_rewrite_batch *b,
                                   float *out) {
    if (!sf || !b) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_forward_cpu: NULL");
    sf_status st = validate(sf, b, out);
    if (st != SF_OK) return st;
    const sf_sysformer_config *c = &sf->cfg;
    const int32_t d = c->d_model, heads = c->num_heads;
    const int64_t ts = b->cu_system[b->n_requests], tu = b->cu_user[b->n_requests];
    const float eps = c->layer_norm_eps;
    if (ts == 0) return SF_OK;

    scratch s;
    st = scratch_alloc(&s, ts, tu, d, c->dim_feedforward);
    if (st != SF_OK) return st;
    float *x = out; /* the residual stream lives in the output buffer */
    if (out != b->system) memcpy(x, b->system, (size_t)(ts * d) * sizeof(float));
    if (c->system_offset_rows > 0) {
        st = sf_sysformer_add_offset(sf, b->cu_system, b->n_requests, x,
                                     "sf_sysformer_forward_cpu");
        if (st != SF_OK) {
            scratch_free(&s);
            return st;
        }
    }

    for (int i = 0; i < c->num_layers; i++) {
        const sf_sysformer_layer *L = &sf->layers[i];
        if (c->norm_first) {
            /* X = X + SA(LN1(X)); X = X + CA(LN2(X), M); X = X + FF(LN3(X)) */
            sf_cpu_layernorm(s.h, x, L->norm_weight[0], L->norm_bias[0], ts, d, eps);
            mha(&L->self_attn, s.h, s.h, b->cu_system, b->cu_system, b->n_requests, ts, ts, d,
                heads, &s, s.q, s.k, s.v, s.y);
            sf_cpu_add(x, x, s.y, ts * d);
            sf_cpu_layernorm(s.h, x, L->norm_weight[1], L->norm_bias[1], ts, d, eps);
            mha(&L->cross_attn, s.h, b->user, b->cu_system, b->cu_user, b->n_requests, ts, tu, d,
                heads, &s, s.q, s.ck, s.cv, s.y);
            sf_cpu_add(x, x, s.y, ts * d);
            sf_cpu_layernorm(s.h, x, L->norm_weight[2], L->norm_bias[2], ts, d, eps);
            feed_forward(L, c, s.h, ts, &s, s.y);
            sf_cpu_add(x, x, s.y, ts * d);
        } else {
            /* X = LN1(X + SA(X)); X = LN2(X + CA(X, M)); X = LN3(X + FF(X)) */
            mha(&L->self_attn, x, x, b->cu_system, b->cu_system, b->n_requests, ts, ts, d, heads,
                &s, s.q, s.k, s.v, s.y);
            sf_cpu_add(x, x, s.y, ts * d);
            sf_cpu_layernorm(x, x, L->norm_weight[0], L->norm_bias[0], ts, d, eps);
            mha(&L->cross_attn, x, b->user, b->cu_system, b->cu_user, b->n_requests, ts, tu, d,
                heads, &s, s.q, s.ck, s.cv, s.y);
            sf_cpu_add(x, x, s.y, ts * d);
            sf_cpu_layernorm(x, x, L->norm_weight[1], L->norm_bias[1], ts, d, eps);
            feed_forward(L, c, x, ts, &s, s.y);
            sf_cpu_add(x, x, s.y, ts * d);
            sf_cpu_layernorm(x, x, L->norm_weight[2], L->norm_bias[2], ts, d, eps);
        }
    }
    if (c->final_norm) sf_cpu_layernorm(x, x, sf->final_norm_weight, sf->final_norm_bias, ts, d, eps);
    scratch_free(&s);
    return SF_OK;
}
