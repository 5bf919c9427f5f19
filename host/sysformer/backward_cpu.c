/* The Sysformer's training pass on the CPU: the forward of forward_cpu.c with every activation
 * the backward needs kept on a tape, and the backward that adds dL/dW for every weight.
 *
 * The forward issues exactly the same op calls on exactly the same values as
 * sf_sysformer_forward_cpu (so S' is bit-identical); it only writes intermediate results into
 * tape buffers instead of reusing scratch. The residual stream is kept at every sub-block
 * boundary: stream[3 i + j] enters sub-block j (self-attention, cross-attention, feed-forward)
 * of layer i, stream[3 L] is what the final norm (if any) reads.
 *
 * Per sub-block j of layer i the tape also holds nrm[j]:
 *   norm_first:  nrm = LN_j(stream)         (the sub-block's input; LN's input is the stream)
 *   post-LN:     nrm = stream + block(stream) (LN_j's input; the sub-block reads the stream)
 * so that each LayerNorm backward has its input and each linear backward its input. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "cpu/ops.h"
#include "sysformer/module.h"
#include "train/train.h"

/* One layer's saved activations; pointers into the tape's block. */
typedef struct layer_tape {
    float *nrm[3];          /* [ts, d] see the file comment                          */
    float *q, *k, *v, *a1;  /* [ts, d] self-attention projections and its output      */
    float *cq, *a2;         /* [ts, d] cross-attention queries and its output         */
    float *ck, *cv;         /* [tu, d] cross-attention keys and values (from the user) */
    float *f_pre, *f_act;   /* [ts, ff] linear1's output before and after activation   */
} layer_tape;

struct sf_sysformer_tape {
    /* The configuration the forward ran with, numbers only (the Sysformer's strings may go). */
    int32_t d, layers, heads, ff;
    sf_activation activation;
    bool norm_first, final_norm;
    float eps;
    /* The batch; its arrays belong to the caller (see train.h). */
    int32_t n_requests;
    const int32_t *cu_system, *cu_user;
    const float *user;
    int64_t ts, tu;
    float *block;       /* every buffer below lives in this one allocation */
    float **stream;     /* [3 layers + 1] of [ts, d] */
    layer_tape *lt;     /* [layers] */
};

/* ---- shared helpers ------------------------------------------------------------------------ */

static float attention_scale(int32_t d, int32_t heads) {
    return (float)(1.0 / sqrt((double)(d / heads))); /* the value forward_cpu.c uses */
}

static bool same_config(const sf_sysformer_config *a, const sf_sysformer_config *b) {
    return a->d_model == b->d_model && a->num_layers == b->num_layers &&
           a->num_heads == b->num_heads && a->dim_feedforward == b->dim_feedforward &&
           a->activation == b->activation && a->norm_first == b->norm_first &&
           a->final_norm == b->final_norm && a->layer_norm_eps == b->layer_norm_eps &&
           a->system_offset_rows == b->system_offset_rows;
}

static bool tape_matches(const sf_sysformer_tape *t, const sf_sysformer_config *c) {
    return t->d == c->d_model && t->layers == c->num_layers && t->heads == c->num_heads &&
           t->ff == c->dim_feedforward && t->activation == c->activation &&
           t->norm_first == c->norm_first && t->final_norm == c->final_norm &&
           t->eps == c->layer_norm_eps;
}

/* The rules of sf_sysformer_forward_cpu, under this function's name. */
static sf_status validate_batch(const sf_rewrite_batch *b, const float *out) {
    static const char *fn = "sf_sysformer_forward_train";
    if (b->n_requests < 0 || !b->cu_system || !b->cu_user) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: bad batch arrays", fn);
    }
    if (b->cu_system[0] != 0 || b->cu_user[0] != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_system[0] and cu_user[0] must be 0", fn);
    }
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int32_t ns = b->cu_system[r + 1] - b->cu_system[r];
        const int32_t nu = b->cu_user[r + 1] - b->cu_user[r];
        if (ns < 0 || nu < 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: offsets decrease at request %d", fn, r);
        }
        if (ns > 0 && nu == 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "%s: request %d has a system span of %d tokens but an empty user "
                           "span; cross-attention needs at least one user token",
                           fn, r, ns);
        }
    }
    const int32_t ts = b->cu_system[b->n_requests], tu = b->cu_user[b->n_requests];
    if ((ts > 0 && (!b->system || !out)) || (tu > 0 && !b->user)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL data", fn);
    }
    return SF_OK;
}

void sf_sysformer_tape_free(sf_sysformer_tape *tape) {
    if (!tape) return;
    free(tape->block);
    free(tape->stream);
    free(tape->lt);
    free(tape);
}

/* Allocates the tape and carves its block. */
static sf_status tape_alloc(const sf_sysformer_config *c, const sf_rewrite_batch *b,
                            sf_sysformer_tape **out) {
    sf_sysformer_tape *t = calloc(1, sizeof *t);
    if (!t) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_forward_train: out of memory");
    t->d = c->d_model;
    t->layers = c->num_layers;
    t->heads = c->num_heads;
    t->ff = c->dim_feedforward;
    t->activation = c->activation;
    t->norm_first = c->norm_first;
    t->final_norm = c->final_norm;
    t->eps = c->layer_norm_eps;
    t->n_requests = b->n_requests;
    t->cu_system = b->cu_system;
    t->cu_user = b->cu_user;
    t->user = b->user;
    t->ts = b->cu_system[b->n_requests];
    t->tu = b->cu_user[b->n_requests];

    const int64_t sd = t->ts * t->d, ud = t->tu * t->d, sff = t->ts * t->ff;
    const int64_t nl = t->layers;
    /* stream: 3L + 1; per layer nrm x3, q k v a1 cq a2: 9 [ts, d], ck cv: 2 [tu, d], 2 [ts, ff]
     * (rows < 2^31, d <= 2^16, ff <= 2^20, L <= 256 by the config checks: under 2^62). */
    const int64_t total = (3 * nl + 1) * sd + nl * (9 * sd + 2 * ud + 2 * sff);
    t->stream = calloc((size_t)(3 * nl + 1), sizeof *t->stream);
    t->lt = calloc((size_t)(nl ? nl : 1), sizeof *t->lt);
    t->block = (uint64_t)total < SIZE_MAX / sizeof(float) - 1
                   ? malloc((size_t)(total + 1) * sizeof(float))
                   : NULL;
    if (!t->stream || !t->lt || !t->block) {
        sf_sysformer_tape_free(t);
        return sf_fail(SF_ERR_OUT_OF_MEMORY,
                       "sf_sysformer_forward_train: cannot allocate a tape of %lld floats",
                       (long long)total);
    }
    float *p = t->block;
    for (int64_t i = 0; i < 3 * nl + 1; i++, p += sd) t->stream[i] = p;
    for (int64_t i = 0; i < nl; i++) {
        layer_tape *L = &t->lt[i];
        float **sbufs[9] = {&L->nrm[0], &L->nrm[1], &L->nrm[2], &L->q, &L->k,
                            &L->v,      &L->a1,     &L->cq,     &L->a2};
        for (int j = 0; j < 9; j++, p += sd) *sbufs[j] = p;
        L->ck = p;
        p += ud;
        L->cv = p;
        p += ud;
        L->f_pre = p;
        p += sff;
        L->f_act = p;
        p += sff;
    }
    *out = t;
    return SF_OK;
}

/* ---- forward ------------------------------------------------------------------------------- */

/* forward_cpu.c's mha, keeping q, k, v and the attention output a. */
static void mha_forward(const sf_mha_weights *w, const float *xq, const float *xkv,
                        const int32_t *cu_q, const int32_t *cu_kv, int32_t n_req, int64_t tq,
                        int64_t tkv, int32_t d, int32_t heads, float *q, float *k, float *v,
                        float *a, float *y) {
    const int64_t dd = (int64_t)d * d;
    sf_cpu_matmul(q, xq, w->in_proj_weight, w->in_proj_bias, tq, d, d);
    sf_cpu_matmul(k, xkv, w->in_proj_weight + dd, w->in_proj_bias + d, tkv, d, d);
    sf_cpu_matmul(v, xkv, w->in_proj_weight + 2 * dd, w->in_proj_bias + 2 * d, tkv, d, d);
    const int32_t hd = d / heads;
    const float scale = attention_scale(d, heads);
    for (int32_t r = 0; r < n_req; r++) {
        const int64_t q0 = cu_q[r], nq = cu_q[r + 1] - cu_q[r];
        const int64_t k0 = cu_kv[r], nk = cu_kv[r + 1] - cu_kv[r];
        if (nq == 0) continue;
        sf_cpu_attention(a + q0 * d, q + q0 * d, k + k0 * d, v + k0 * d, nq, nk, heads, heads,
                         hd, false, 0, 0, scale);
    }
    sf_cpu_matmul(y, a, w->out_proj_weight, w->out_proj_bias, tq, d, d);
}

static void ff_forward(const sf_sysformer_layer *L, const sf_sysformer_config *c, const float *x,
                       int64_t ts, float *f_pre, float *f_act, float *y) {
    const int64_t ff = c->dim_feedforward;
    sf_cpu_matmul(f_pre, x, L->linear1_weight, L->linear1_bias, ts, ff, c->d_model);
    if (c->activation == SF_ACT_GELU) sf_cpu_gelu(f_act, f_pre, ts * ff);
    else sf_cpu_relu(f_act, f_pre, ts * ff);
    sf_cpu_matmul(y, f_act, L->linear2_weight, L->linear2_bias, ts, c->d_model, ff);
}

sf_status sf_sysformer_forward_train(const sf_sysformer *sf, const sf_rewrite_batch *batch,
                                     float *system_out, sf_sysformer_tape **tape) {
    if (tape) *tape = NULL;
    if (!sf || !batch || !tape) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_forward_train: NULL argument");
    }
    sf_status st = validate_batch(batch, system_out);
    if (st != SF_OK) return st;
    const sf_sysformer_config *c = &sf->cfg;
    sf_sysformer_tape *t = NULL;
    st = tape_alloc(c, batch, &t);
    if (st != SF_OK) return st;
    const int64_t ts = t->ts, tu = t->tu;
    const int32_t d = c->d_model, heads = c->num_heads, nr = batch->n_requests;
    const float eps = c->layer_norm_eps;
    if (ts == 0) { /* nothing to rewrite; the (empty) tape still serves the backward */
        *tape = t;
        return SF_OK;
    }
    /* The sub-blocks' outputs before their residual add; only the forward needs them. */
    float *y = malloc((size_t)(ts * d) * sizeof(float));
    if (!y) {
        sf_sysformer_tape_free(t);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_forward_train: out of memory");
    }
    /* Copied before anything is written, so system_out may be batch->system, as in forward. */
    memcpy(t->stream[0], batch->system, (size_t)(ts * d) * sizeof(float));
    if (c->system_offset_rows > 0) {
        st = sf_sysformer_add_offset(sf, batch->cu_system, nr, t->stream[0],
                                     "sf_sysformer_forward_train");
        if (st != SF_OK) {
            free(y);
            sf_sysformer_tape_free(t);
            return st;
        }
    }
    const int32_t *cs = batch->cu_system, *cu = batch->cu_user;
    for (int i = 0; i < c->num_layers; i++) {
        const sf_sysformer_layer *L = &sf->layers[i];
        layer_tape *T = &t->lt[i];
        float *const *x = t->stream + 3 * i; /* x[0..3]: before SA, CA, FF, and after */
        if (c->norm_first) {
            sf_cpu_layernorm(T->nrm[0], x[0], L->norm_weight[0], L->norm_bias[0], ts, d, eps);
            mha_forward(&L->self_attn, T->nrm[0], T->nrm[0], cs, cs, nr, ts, ts, d, heads, T->q,
                        T->k, T->v, T->a1, y);
            sf_cpu_add(x[1], x[0], y, ts * d);
            sf_cpu_layernorm(T->nrm[1], x[1], L->norm_weight[1], L->norm_bias[1], ts, d, eps);
            mha_forward(&L->cross_attn, T->nrm[1], batch->user, cs, cu, nr, ts, tu, d, heads,
                        T->cq, T->ck, T->cv, T->a2, y);
            sf_cpu_add(x[2], x[1], y, ts * d);
            sf_cpu_layernorm(T->nrm[2], x[2], L->norm_weight[2], L->norm_bias[2], ts, d, eps);
            ff_forward(L, c, T->nrm[2], ts, T->f_pre, T->f_act, y);
            sf_cpu_add(x[3], x[2], y, ts * d);
        } else {
            mha_forward(&L->self_attn, x[0], x[0], cs, cs, nr, ts, ts, d, heads, T->q, T->k,
                        T->v, T->a1, y);
            sf_cpu_add(T->nrm[0], x[0], y, ts * d);
            sf_cpu_layernorm(x[1], T->nrm[0], L->norm_weight[0], L->norm_bias[0], ts, d, eps);
            mha_forward(&L->cross_attn, x[1], batch->user, cs, cu, nr, ts, tu, d, heads, T->cq,
                        T->ck, T->cv, T->a2, y);
            sf_cpu_add(T->nrm[1], x[1], y, ts * d);
            sf_cpu_layernorm(x[2], T->nrm[1], L->norm_weight[1], L->norm_bias[1], ts, d, eps);
            ff_forward(L, c, x[2], ts, T->f_pre, T->f_act, y);
            sf_cpu_add(T->nrm[2], x[2], y, ts * d);
            sf_cpu_layernorm(x[3], T->nrm[2], L->norm_weight[2], L->norm_bias[2], ts, d, eps);
        }
    }
    const float *last = t->stream[3 * c->num_layers];
    if (c->final_norm) {
        sf_cpu_layernorm(system_out, last, sf->final_norm_weight, sf->final_norm_bias, ts, d,
                         eps);
    } else {
        memcpy(system_out, last, (size_t)(ts * d) * sizeof(float));
    }
    free(y);
    *tape = t;
    return SF_OK;
}

/* ---- backward ------------------------------------------------------------------------------ */

typedef struct bwd_scratch {
    float *dh;      /* [ts, d]  gradient wrt a pre-LN sub-block's normalised input */
    float *da;      /* [ts, d]  gradient wrt an attention output (out_proj's input) */
    float *dq;      /* [ts, d]                                                     */
    float *dk, *dv; /* [max(ts, tu), d]                                            */
    float *dff;     /* [ts, ff]                                                    */
} bwd_scratch;

static void bwd_scratch_free(bwd_scratch *s) {
    free(s->dh);
    free(s->da);
    free(s->dq);
    free(s->dk);
    free(s->dv);
    free(s->dff);
}

static sf_status bwd_scratch_alloc(bwd_scratch *s, int64_t ts, int64_t tu, int64_t d,
                                   int64_t ff) {
    memset(s, 0, sizeof *s);
    const int64_t kv = ts > tu ? ts : tu;
    const size_t sd = (size_t)(ts * d + 1) * sizeof(float);
    const size_t kd = (size_t)(kv * d + 1) * sizeof(float);
    s->dh = malloc(sd);
    s->da = malloc(sd);
    s->dq = malloc(sd);
    s->dk = malloc(kd);
    s->dv = malloc(kd);
    s->dff = malloc((size_t)(ts * ff + 1) * sizeof(float));
    if (!s->dh || !s->da || !s->dq || !s->dk || !s->dv || !s->dff) {
        bwd_scratch_free(s);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_backward: out of memory");
    }
    return SF_OK;
}

/* Backward of mha_forward given dy = dL/dy [tq, d]: adds the weight gradients into g and, when
 * dx != NULL, writes (accumulate false) or adds the gradient wrt the query-side input xq into dx.
 * For self-attention (xkv == xq) the k and v paths add into dx as well; for cross-attention the
 * keys and values come from the frozen user rows, so their input gradient is not formed. */
static void mha_backward(const sf_mha_weights *w, const sf_mha_weights *g, const float *dy,
                         const float *xq, const float *xkv, bool self, const float *q,
                         const float *k, const float *v, const float *a, const int32_t *cu_q,
                         const int32_t *cu_kv, int32_t n_req, int64_t tq, int64_t tkv, int32_t d,
                         int32_t heads, float *dx, bool accumulate, bwd_scratch *s) {
    const int64_t dd = (int64_t)d * d;
    sf_cpu_linear_backward(s->da, false, g->out_proj_weight, g->out_proj_bias, dy, a,
                           w->out_proj_weight, tq, d, d);
    /* Keys and values of requests without system rows get no gradient from attention, and
     * attention_backward writes only the rows it is given: zero the rest. */
    if (!self) {
        memset(s->dk, 0, (size_t)(tkv * d) * sizeof(float));
        memset(s->dv, 0, (size_t)(tkv * d) * sizeof(float));
    }
    const int32_t hd = d / heads;
    const float scale = attention_scale(d, heads);
    for (int32_t r = 0; r < n_req; r++) {
        const int64_t q0 = cu_q[r], nq = cu_q[r + 1] - cu_q[r];
        const int64_t k0 = cu_kv[r], nk = cu_kv[r + 1] - cu_kv[r];
        if (nq == 0) continue;
        sf_cpu_attention_backward(s->dq + q0 * d, s->dk + k0 * d, s->dv + k0 * d, s->da + q0 * d,
                                  q + q0 * d, k + k0 * d, v + k0 * d, nq, nk, heads, heads, hd,
                                  false, 0, 0, scale);
    }
    sf_cpu_linear_backward(dx, accumulate, g->in_proj_weight, g->in_proj_bias, s->dq, xq,
                           w->in_proj_weight, tq, d, d);
    float *dkv = self ? dx : NULL;
    sf_cpu_linear_backward(dkv, true, g->in_proj_weight + dd, g->in_proj_bias + d, s->dk, xkv,
                           w->in_proj_weight + dd, tkv, d, d);
    sf_cpu_linear_backward(dkv, true, g->in_proj_weight + 2 * dd, g->in_proj_bias + 2 * d, s->dv,
                           xkv, w->in_proj_weight + 2 * dd, tkv, d, d);
}

/* Backward of ff_forward: weight gradients into G, the input gradient written or added to dx. */
static void ff_backward(const sf_sysformer_layer *L, sf_sysformer_layer *G,
                        const sf_sysformer_tape *t, const layer_tape *T, const float *dy,
                        const float *x, float *dx, bool accumulate, bwd_scratch *s) {
    const int64_t ts = t->ts, ff = t->ff, d = t->d;
    sf_cpu_linear_backward(s->dff, false, G->linear2_weight, G->linear2_bias, dy, T->f_act,
                           L->linear2_weight, ts, d, ff);
    if (t->activation == SF_ACT_GELU) sf_cpu_gelu_backward(s->dff, s->dff, T->f_pre, ts * ff);
    else sf_cpu_relu_backward(s->dff, s->dff, T->f_pre, ts * ff);
    sf_cpu_linear_backward(dx, accumulate, G->linear1_weight, G->linear1_bias, s->dff, x,
                           L->linear1_weight, ts, ff, d);
}

/* One sub-block j (0 SA, 1 CA, 2 FF) of layer i, with gx = dL/d(stream after the sub-block) on
 * entry and dL/d(stream before it) on return. */
static void sublayer_backward(const sf_sysformer *sf, sf_sysformer *grads,
                              const sf_sysformer_tape *t, int i, int j, float *gx,
                              bwd_scratch *s) {
    const sf_sysformer_layer *L = &sf->layers[i];
    sf_sysformer_layer *G = &grads->layers[i];
    const layer_tape *T = &t->lt[i];
    const float *x = t->stream[3 * i + j];
    const int64_t ts = t->ts, tu = t->tu, n = ts * t->d;
    const int32_t d = t->d, heads = t->heads, nr = t->n_requests;
    const int32_t *cs = t->cu_system, *cu = t->cu_user;
    if (t->norm_first) {
        /* x' = x + B(LN(x)):  dx = gx + LN'^T (B'^T gx) */
        const float *h = T->nrm[j];
        if (j == 0) {
            mha_backward(&L->self_attn, &G->self_attn, gx, h, h, true, T->q, T->k, T->v, T->a1,
                         cs, cs, nr, ts, ts, d, heads, s->dh, false, s);
        } else if (j == 1) {
            mha_backward(&L->cross_attn, &G->cross_attn, gx, h, t->user, false, T->cq, T->ck,
                         T->cv, T->a2, cs, cu, nr, ts, tu, d, heads, s->dh, false, s);
        } else {
            ff_backward(L, G, t, T, gx, h, s->dh, false, s);
        }
        sf_cpu_layernorm_backward(s->dh, G->norm_weight[j], G->norm_bias[j], s->dh, x,
                                  L->norm_weight[j], ts, d, t->eps);
        sf_cpu_add(gx, gx, s->dh, n);
    } else {
        /* x' = LN(u), u = x + B(x):  du = LN'^T gx;  dx = du + B'^T du */
        sf_cpu_layernorm_backward(gx, G->norm_weight[j], G->norm_bias[j], gx, T->nrm[j],
                                  L->norm_weight[j], ts, d, t->eps);
        /* gx now holds du; each backward below reads it as dy before its last step adds into
         * it (out_proj / linear2 consume dy first). */
        if (j == 0) {
            mha_backward(&L->self_attn, &G->self_attn, gx, x, x, true, T->q, T->k, T->v, T->a1,
                         cs, cs, nr, ts, ts, d, heads, gx, true, s);
        } else if (j == 1) {
            mha_backward(&L->cross_attn, &G->cross_attn, gx, x, t->user, false, T->cq, T->ck,
                         T->cv, T->a2, cs, cu, nr, ts, tu, d, heads, gx, true, s);
        } else {
            ff_backward(L, G, t, T, gx, x, gx, true, s);
        }
    }
}

sf_status sf_sysformer_backward(const sf_sysformer *sf, const sf_sysformer_tape *tape,
                                const float *d_system_out, sf_sysformer *grads) {
    static const char *fn = "sf_sysformer_backward";
    if (!sf || !tape || !grads) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
    if (grads == sf) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: grads is the Sysformer itself; gradients need their own storage", fn);
    }
    if (!tape_matches(tape, &sf->cfg)) {
        return sf_fail(SF_ERR_SHAPE, "%s: the tape was recorded by a Sysformer of another "
                                     "configuration", fn);
    }
    if (!same_config(&grads->cfg, &sf->cfg)) {
        return sf_fail(SF_ERR_SHAPE, "%s: grads has another configuration than the Sysformer "
                                     "(make it with sf_sysformer_clone_zero)", fn);
    }
    const int64_t ts = tape->ts, n = ts * tape->d;
    if (ts == 0) return SF_OK;
    if (!d_system_out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL d_system_out", fn);

    /* gx: dL/d(residual stream), walked from S' back to S. */
    float *gx = malloc((size_t)n * sizeof(float));
    if (!gx) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
    bwd_scratch s;
    sf_status st = bwd_scratch_alloc(&s, ts, tape->tu, tape->d, tape->ff);
    if (st != SF_OK) {
        free(gx);
        return st;
    }
    memcpy(gx, d_system_out, (size_t)n * sizeof(float));
    if (tape->final_norm) {
        sf_cpu_layernorm_backward(gx, grads->final_norm_weight, grads->final_norm_bias, gx,
                                  tape->stream[3 * tape->layers], sf->final_norm_weight, ts,
                                  tape->d, tape->eps);
    }
    for (int i = tape->layers - 1; i >= 0; i--) {
        for (int j = 2; j >= 0; j--) sublayer_backward(sf, grads, tape, i, j, gx, &s);
    }
    /* gx is now dL/dX0 with X0 = S + system_offset: the embeddings S are frozen, and the
     * offset, shared by every request, collects the sum over the requests' spans. */
    if (sf->cfg.system_offset_rows > 0) {
        const int64_t span = (int64_t)sf->cfg.system_offset_rows * tape->d;
        for (int32_t r = 0; r < tape->n_requests; r++) {
            if (tape->cu_system[r + 1] == tape->cu_system[r]) continue;
            const float *g = gx + (int64_t)tape->cu_system[r] * tape->d;
            for (int64_t i = 0; i < span; i++) grads->system_offset[i] += g[i];
        }
    }
    bwd_scratch_free(&s);
    free(gx);
    return SF_OK;
}

/* ---- gradient storage ---------------------------------------------------------------------- */

sf_status sf_sysformer_clone_zero(const sf_sysformer *sf, sf_sysformer **out) {
    if (out) *out = NULL;
    if (!sf || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_clone_zero: NULL");
    sf_sysformer *z = calloc(1, sizeof *z);
    if (!z) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_clone_zero: out of memory");
    sf_status st = sf_sysformer_set_config(z, &sf->cfg);
    if (st == SF_OK) st = sf_sysformer_alloc(z);
    if (st != SF_OK) {
        sf_sysformer_free(z);
        return st;
    }
    memset(z->weights, 0, (size_t)z->n_weights * sizeof(float));
    *out = z;
    return SF_OK;
}

float *sf_sysformer_flat(sf_sysformer *sf, int64_t *n) {
    if (n) *n = sf ? sf->n_weights : 0;
    return sf ? sf->weights : NULL;
}
