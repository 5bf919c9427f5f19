/* The frozen LLM's training pass on the CPU: the forward over packed input embeddings (the
 * arithmetic of forward_cpu.c, positions from 0, no KV cache), the token and classifier losses,
 * and the backward down to the input embeddings (train.h).
 *
 * The LLM is frozen, so every op's backward is asked for activation gradients only (NULL for
 * every dw/db). That also shrinks what must be kept: a linear layer's input is read only for
 * its weight gradient, so the normalised inputs, the attention output and the SwiGLU output are
 * never saved. The backward of a layer needs its input x (for the attention norm), q and k
 * after RoPE and v (attention), x_mid, the residual after attention (for the MLP norm), and
 * gate and up before SwiGLU. Every layer's input is always kept (with the last layer's output,
 * which the losses read); the rest, T (d + q_dim + 2 kv_dim + 2 ff) floats, is a "set".
 * recompute = false keeps one set per layer; recompute = true keeps a single set, which the
 * backward refills by running the layer's forward again from its saved input with the same
 * calls on the same shapes, so both modes give bit-identical results. (For SmolLM2 a set is
 * 9x a layer input.) The gradient of the residual stream runs in the caller's d_input_embeds.
 *
 * Everything lives in one allocation whose size sf_llm_backward_bytes computes, so the reported
 * bytes are exactly what a call holds (the ops' own transient scratch aside: the attention
 * backward's per-query statistics), and once it is made nothing can fail: validation and
 * allocation come first, and the caller's outputs are written only after them.
 *
 * The LM head runs on the ce_rows only, in chunks of at most HEAD_CHUNK rows, so the logits
 * never take more than HEAD_CHUNK x vocab floats however many rows are scored (the vocabulary
 * of a real model is 50k-150k). The classifier rows reuse the same chunk buffers. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "cpu/ops.h"
#include "model/llm.h"
#include "train/train.h"

/* Rows of the final norm + LM head per chunk. 64 rows keep the head's GEMM on BLAS (which
 * needs >= 16 rows) while holding its logits to 64 x vocab floats (12.6 MB for 49152). */
enum { HEAD_CHUNK = 64 };

/* ---------------------------------------------------------------------------------------- */
/* Memory layout                                                                            */
/* ---------------------------------------------------------------------------------------- */

/* Sizes of one call, in elements; everything derives from the config, T and the mode. */
typedef struct dims {
    int64_t T, d, ff, q_dim, kv_dim, vocab, half;
    int64_t layers;
    int64_t n_sets; /* saved activation sets: one per layer, or one reused (recompute) */
    int64_t chunk;  /* rows of the head chunk: min(T, HEAD_CHUNK) */
} dims;

static dims make_dims(const sf_llm_config *c, int64_t T, bool recompute) {
    dims m;
    m.T = T;
    m.d = c->hidden_size;
    m.ff = c->intermediate_size;
    m.q_dim = (int64_t)c->num_heads * c->head_dim;
    m.kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    m.vocab = c->vocab_size;
    m.half = c->head_dim / 2;
    m.layers = c->num_layers;
    m.n_sets = recompute ? (m.layers > 0 ? 1 : 0) : m.layers;
    m.chunk = T < HEAD_CHUNK ? T : HEAD_CHUNK;
    return m;
}

/* Floats of one saved set: x_mid, q, k, v, gate, up (the layer input lives in xs). */
static int64_t set_floats(const dims *m) {
    return m->T * (m->d + m->q_dim + 2 * m->kv_dim + 2 * m->ff);
}

/* Floats of everything in the arena:
 *   xs        (layers + 1) T d          every layer's input and the last layer's output
 *   sets      n_sets * set_floats
 *   work      T (d + 2 q_dim + 2 kv_dim + 2 ff)
 *               xn [T, d], attn [T, q_dim], act [T, ff]        forward temporaries, reused by
 *                                                             the backward for dxn, dattn, dact
 *               dq [T, q_dim], dk, dv [T, kv_dim], dup [T, ff] backward only
 *   head      chunk (2 d + vocab)  rows [chunk, d], normed rows [chunk, d], logits [chunk, vocab]
 * plus half doubles (a request's RoPE inverse frequencies, first, for alignment) and T int32
 * positions (last). The residual gradient runs in the caller's d_input_embeds. */
static int64_t arena_floats(const dims *m) {
    return (m->layers + 1) * m->T * m->d + m->n_sets * set_floats(m) +
           m->T * (m->d + 2 * m->q_dim + 2 * m->kv_dim + 2 * m->ff) +
           m->chunk * (2 * m->d + m->vocab);
}

static size_t arena_bytes(const dims *m) {
    if (m->T <= 0) return 0;
    return (size_t)m->half * sizeof(double) + (size_t)arena_floats(m) * sizeof(float) +
           (size_t)m->T * sizeof(int32_t);
}

size_t sf_llm_backward_bytes(const sf_llm *llm, int64_t T, const sf_llm_backward_options *o) {
    if (!llm || T <= 0) return 0;
    const dims m = make_dims(&llm->cfg, T, o && o->recompute);
    return arena_bytes(&m);
}

/* One layer's saved activations. */
typedef struct act_set {
    float *x_mid;     /* [T, d]      residual after attention */
    float *q;         /* [T, q_dim]  after RoPE               */
    float *k, *v;     /* [T, kv_dim] k after RoPE             */
    float *gate, *up; /* [T, ff]     before SwiGLU            */
} act_set;

/* The arena, carved in the order arena_floats lists it. */
typedef struct arena {
    void *base;
    double *inv_freq; /* [half] */
    float *xs;        /* [layers + 1, T, d] */
    float *sets;      /* [n_sets, set_floats] */
    float *xn, *attn, *act;
    float *dq, *dk, *dv, *dup;
    float *head_rows, *head_norm, *logits;
    int32_t *pos;     /* [T] */
} arena;

static sf_status arena_alloc(arena *a, const dims *m) {
    memset(a, 0, sizeof *a);
    a->base = malloc(arena_bytes(m));
    if (!a->base) {
        return sf_fail(SF_ERR_OUT_OF_MEMORY,
                       "sf_llm_loss_backward_cpu: cannot allocate %zu bytes of activations for "
                       "%lld rows",
                       arena_bytes(m), (long long)m->T);
    }
    a->inv_freq = a->base;
    float *p = (float *)(a->inv_freq + m->half);
    a->xs = p, p += (m->layers + 1) * m->T * m->d;
    a->sets = p, p += m->n_sets * set_floats(m);
    a->xn = p, p += m->T * m->d;
    a->attn = p, p += m->T * m->q_dim;
    a->act = p, p += m->T * m->ff;
    a->dq = p, p += m->T * m->q_dim;
    a->dk = p, p += m->T * m->kv_dim;
    a->dv = p, p += m->T * m->kv_dim;
    a->dup = p, p += m->T * m->ff;
    a->head_rows = p, p += m->chunk * m->d;
    a->head_norm = p, p += m->chunk * m->d;
    a->logits = p, p += m->chunk * m->vocab;
    a->pos = (int32_t *)p;
    return SF_OK;
}

/* Layer l's input ([T, d]); l = layers is the last layer's output. */
static float *x_at(const arena *a, const dims *m, int64_t l) { return a->xs + l * m->T * m->d; }

/* Saved set number s. */
static act_set set_at(const arena *a, const dims *m, int64_t s) {
    float *p = a->sets + s * set_floats(m);
    act_set set;
    set.x_mid = p, p += m->T * m->d;
    set.q = p, p += m->T * m->q_dim;
    set.k = p, p += m->T * m->kv_dim;
    set.v = p, p += m->T * m->kv_dim;
    set.gate = p, p += m->T * m->ff;
    set.up = p;
    return set;
}

/* ---------------------------------------------------------------------------------------- */
/* Validation                                                                               */
/* ---------------------------------------------------------------------------------------- */

/* Everything that could make the pass read out of bounds or produce a meaningless loss is
 * checked here, before any allocation, so the computation itself cannot fail. */
static sf_status validate(const sf_llm *llm, int32_t n_requests, const int32_t *cu_seqlens,
                          const float *input_embeds, const sf_llm_loss_spec *spec,
                          const sf_llm_loss_result *result) {
    static const char *fn = "sf_llm_loss_backward_cpu";
    if (!llm || !spec || !result) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL model, loss spec or result", fn);
    }
    const sf_status whole = sf_llm_check_whole(llm, fn);
    if (whole != SF_OK) return whole;
    const sf_llm_config *c = &llm->cfg;
    if (n_requests < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_requests = %d", fn, n_requests);
    }
    if (!cu_seqlens) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_seqlens is NULL", fn);
    if (cu_seqlens[0] != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_seqlens[0] = %d, not 0", fn,
                       cu_seqlens[0]);
    }
    for (int32_t r = 0; r < n_requests; r++) {
        if (cu_seqlens[r + 1] < cu_seqlens[r]) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_seqlens decreases at request %d "
                           "(%d -> %d)", fn, r, cu_seqlens[r], cu_seqlens[r + 1]);
        }
        const int32_t n = cu_seqlens[r + 1] - cu_seqlens[r];
        if (n > c->max_position_embeddings) {
            return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: request %d has %d tokens; the model allows "
                           "%d (max_position_embeddings)", fn, r, n, c->max_position_embeddings);
        }
    }
    const int32_t T = cu_seqlens[n_requests];
    if (T > 0 && !input_embeds) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: input_embeds is NULL for %d rows", fn, T);
    }

    if (spec->n_ce < 0) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_ce = %d", fn, spec->n_ce);
    if (spec->n_ce > 0 && (!spec->ce_rows || !spec->ce_targets)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_ce = %d with ce_rows or ce_targets NULL",
                       fn, spec->n_ce);
    }
    for (int32_t i = 0; i < spec->n_ce; i++) {
        if (spec->ce_rows[i] < 0 || spec->ce_rows[i] >= T) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: ce_rows[%d] = %d outside [0, %d)", fn,
                           i, spec->ce_rows[i], T);
        }
        if (spec->ce_targets[i] < 0 || spec->ce_targets[i] >= c->vocab_size) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: ce_targets[%d] = %d outside [0, %d)",
                           fn, i, spec->ce_targets[i], c->vocab_size);
        }
        if (spec->ce_weights && !isfinite(spec->ce_weights[i])) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: ce_weights[%d] is not finite", fn, i);
        }
    }

    if (spec->n_class < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_class = %d", fn, spec->n_class);
    }
    if (spec->n_class > 0 && (!spec->class_rows || !spec->class_labels || !spec->class_w)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: n_class = %d with class_rows, class_labels or class_w NULL", fn,
                       spec->n_class);
    }
    for (int32_t i = 0; i < spec->n_class; i++) {
        if (spec->class_rows[i] < 0 || spec->class_rows[i] >= T) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: class_rows[%d] = %d outside [0, %d)",
                           fn, i, spec->class_rows[i], T);
        }
        /* Soft labels are fine for BCE; anything outside [0, 1] (or NaN) is not a label. */
        const float y = spec->class_labels[i];
        if (!(y >= 0.0f && y <= 1.0f)) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: class_labels[%d] = %g outside [0, 1]",
                           fn, i, (double)y);
        }
        if (spec->class_weights && !isfinite(spec->class_weights[i])) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: class_weights[%d] is not finite", fn,
                           i);
        }
    }
    return SF_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The layer, forward and backward                                                          */
/* ---------------------------------------------------------------------------------------- */

typedef struct pass {
    const sf_llm *llm;
    int32_t n_requests;
    const int32_t *cu_seqlens;
    dims m;
    arena a;
    float scale; /* softmax scale, 1 / sqrt(head_dim) */
} pass;

/* RoPE on q and k, then causal attention, request by request. Longrope picks its factors from
 * the request's own length (positions 0..n-1), as the forward without a cache does. */
static void attention_forward(pass *p, act_set *s) {
    const sf_llm_config *c = &p->llm->cfg;
    for (int32_t r = 0; r < p->n_requests; r++) {
        const int64_t row0 = p->cu_seqlens[r];
        const int64_t n = p->cu_seqlens[r + 1] - row0;
        if (n == 0) continue;
        double attention_scale = 1.0;
        sf_cpu_rope_freqs(c, n, p->a.inv_freq, &attention_scale);
        float *q = s->q + row0 * p->m.q_dim;
        float *k = s->k + row0 * p->m.kv_dim;
        const float *v = s->v + row0 * p->m.kv_dim;
        const int32_t *pos = p->a.pos + row0;
        sf_cpu_rope_apply(q, pos, n, c->num_heads, c->head_dim, p->a.inv_freq, attention_scale);
        sf_cpu_rope_apply(k, pos, n, c->num_kv_heads, c->head_dim, p->a.inv_freq,
                          attention_scale);
        sf_cpu_attention(p->a.attn + row0 * p->m.q_dim, q, k, v, n, n, c->num_heads,
                         c->num_kv_heads, c->head_dim, true, 0, c->sliding_window, p->scale);
    }
}

/* The layer's forward from x, filling the set s; when x_out is not NULL also the layer's
 * output. The calls are those of sf_llm_forward_cpu, in its order, so a recomputation from the
 * same x gives the same bits. */
static void layer_forward(pass *p, int layer, const float *x, act_set *s, float *x_out) {
    const sf_llm_config *c = &p->llm->cfg;
    const sf_llm_layer *L = &p->llm->layers[layer];
    const int64_t T = p->m.T, d = p->m.d, ff = p->m.ff;
    float *xn = p->a.xn;

    sf_cpu_rmsnorm(xn, x, L->attn_norm, T, d, c->rms_norm_eps);
    sf_cpu_matmul(s->q, xn, L->wq, L->bq, T, p->m.q_dim, d);
    sf_cpu_matmul(s->k, xn, L->wk, L->bk, T, p->m.kv_dim, d);
    sf_cpu_matmul(s->v, xn, L->wv, L->bv, T, p->m.kv_dim, d);
    attention_forward(p, s);
    sf_cpu_matmul(xn, p->a.attn, L->wo, L->bo, T, d, p->m.q_dim);
    sf_cpu_add(s->x_mid, x, xn, T * d);

    sf_cpu_rmsnorm(xn, s->x_mid, L->mlp_norm, T, d, c->rms_norm_eps);
    sf_cpu_matmul(s->gate, xn, L->w_gate, NULL, T, ff, d);
    sf_cpu_matmul(s->up, xn, L->w_up, NULL, T, ff, d);
    if (!x_out) return;
    sf_cpu_swiglu(p->a.act, s->gate, s->up, T * ff);
    sf_cpu_matmul(xn, p->a.act, L->w_down, NULL, T, d, ff);
    sf_cpu_add(x_out, s->x_mid, xn, T * d);
}

/* dx holds dL/d(layer output) and leaves holding dL/d(layer input) (x). Every linear backward
 * gets x = NULL: its input is only read for the weight gradient, which is never asked for. */
static void layer_backward(pass *p, int layer, const float *x, const act_set *s, float *dx) {
    const sf_llm_config *c = &p->llm->cfg;
    const sf_llm_layer *L = &p->llm->layers[layer];
    const int64_t T = p->m.T, d = p->m.d, ff = p->m.ff;
    const int64_t q_dim = p->m.q_dim, kv_dim = p->m.kv_dim;
    arena *a = &p->a;

    /* MLP: out = x_mid + down(silu(gate) * up), gate/up = W . rmsnorm(x_mid). */
    sf_cpu_linear_backward(a->act, false, NULL, NULL, dx, NULL, L->w_down, T, d, ff);
    sf_cpu_swiglu_backward(a->act, a->dup, a->act, s->gate, s->up, T * ff);
    sf_cpu_linear_backward(a->xn, false, NULL, NULL, a->act, NULL, L->w_gate, T, ff, d);
    sf_cpu_linear_backward(a->xn, true, NULL, NULL, a->dup, NULL, L->w_up, T, ff, d);
    sf_cpu_rmsnorm_backward(a->xn, NULL, a->xn, s->x_mid, L->mlp_norm, T, d, c->rms_norm_eps);
    sf_cpu_add(dx, dx, a->xn, T * d);

    /* Attention: x_mid = x + o(attention(rope(q), rope(k), v)), q/k/v = W . rmsnorm(x). */
    sf_cpu_linear_backward(a->attn, false, NULL, NULL, dx, NULL, L->wo, T, d, q_dim);
    for (int32_t r = 0; r < p->n_requests; r++) {
        const int64_t row0 = p->cu_seqlens[r];
        const int64_t n = p->cu_seqlens[r + 1] - row0;
        if (n == 0) continue;
        double attention_scale = 1.0;
        sf_cpu_rope_freqs(c, n, a->inv_freq, &attention_scale);
        float *dq = a->dq + row0 * q_dim;
        float *dk = a->dk + row0 * kv_dim;
        sf_cpu_attention_backward(dq, dk, a->dv + row0 * kv_dim, a->attn + row0 * q_dim,
                                  s->q + row0 * q_dim, s->k + row0 * kv_dim,
                                  s->v + row0 * kv_dim, n, n, c->num_heads, c->num_kv_heads,
                                  c->head_dim, true, 0, c->sliding_window, p->scale);
        const int32_t *pos = a->pos + row0;
        sf_cpu_rope_backward(dq, pos, n, c->num_heads, c->head_dim, a->inv_freq,
                             attention_scale);
        sf_cpu_rope_backward(dk, pos, n, c->num_kv_heads, c->head_dim, a->inv_freq,
                             attention_scale);
    }
    sf_cpu_linear_backward(a->xn, false, NULL, NULL, a->dq, NULL, L->wq, T, q_dim, d);
    sf_cpu_linear_backward(a->xn, true, NULL, NULL, a->dk, NULL, L->wk, T, kv_dim, d);
    sf_cpu_linear_backward(a->xn, true, NULL, NULL, a->dv, NULL, L->wv, T, kv_dim, d);
    sf_cpu_rmsnorm_backward(a->xn, NULL, a->xn, x, L->attn_norm, T, d, c->rms_norm_eps);
    sf_cpu_add(dx, dx, a->xn, T * d);
}

/* ---------------------------------------------------------------------------------------- */
/* The losses on the last hidden state                                                      */
/* ---------------------------------------------------------------------------------------- */

/* Gathers rows of the last layer's output into head_rows and normalises them into head_norm
 * (the final norm is row-wise, so running it per chunk equals running it on all rows). */
static void head_gather(pass *p, const int32_t *rows, int64_t n) {
    const float *x = x_at(&p->a, &p->m, p->m.layers);
    const int64_t d = p->m.d;
    for (int64_t i = 0; i < n; i++) {
        memcpy(p->a.head_rows + i * d, x + (int64_t)rows[i] * d, (size_t)d * sizeof(float));
    }
    sf_cpu_rmsnorm(p->a.head_norm, p->a.head_rows, p->llm->final_norm, n, d,
                   p->llm->cfg.rms_norm_eps);
}

/* head_norm holds dL/d(normed rows): back through the final norm, then added into dx at the
 * rows (serially: a row may be listed twice). */
static void head_scatter(pass *p, const int32_t *rows, int64_t n, float *dx) {
    const int64_t d = p->m.d;
    sf_cpu_rmsnorm_backward(p->a.head_norm, NULL, p->a.head_norm, p->a.head_rows,
                            p->llm->final_norm, n, d, p->llm->cfg.rms_norm_eps);
    for (int64_t i = 0; i < n; i++) {
        float *dst = dx + (int64_t)rows[i] * d;
        const float *src = p->a.head_norm + i * d;
        for (int64_t j = 0; j < d; j++) dst[j] += src[j];
    }
}

/* Token cross-entropy over the ce rows, chunk by chunk; adds to dx when it is not NULL. */
static void ce_loss(pass *p, const sf_llm_loss_spec *spec, float *dx, sf_llm_loss_result *res) {
    const int64_t d = p->m.d, vocab = p->m.vocab;
    for (int64_t i0 = 0; i0 < spec->n_ce; i0 += p->m.chunk) {
        const int64_t n = spec->n_ce - i0 < p->m.chunk ? spec->n_ce - i0 : p->m.chunk;
        const int32_t *rows = spec->ce_rows + i0;
        const int32_t *targets = spec->ce_targets + i0;
        head_gather(p, rows, n);
        sf_cpu_matmul(p->a.logits, p->a.head_norm, p->llm->lm_head, NULL, n, vocab, d);
        for (int64_t i = 0; i < n; i++) {
            const float *z = p->a.logits + i * vocab;
            int64_t best = 0; /* the first maximum, as torch.argmax */
            for (int64_t v = 1; v < vocab; v++) {
                if (z[v] > z[best]) best = v;
            }
            res->ce_correct += best == targets[i];
        }
        res->ce += sf_cpu_cross_entropy(dx ? p->a.logits : NULL, p->a.logits, targets,
                                        spec->ce_weights ? spec->ce_weights + i0 : NULL, n,
                                        (int32_t)vocab);
        if (!dx) continue;
        sf_cpu_linear_backward(p->a.head_norm, false, NULL, NULL, p->a.logits, NULL,
                               p->llm->lm_head, n, vocab, d);
        head_scatter(p, rows, n, dx);
    }
}

/* Binary cross-entropy with logits of the linear classifier on the normed last hidden state:
 *   BCE(z, y) = max(z, 0) - z y + log(1 + exp(-|z|)),  dBCE/dz = sigmoid(z) - y,
 * the form that neither overflows nor loses the loss to cancellation for large |z|. Adds the
 * classifier's gradients to dw/db and the hidden state's to dx, each when not NULL. */
static void class_loss(pass *p, const sf_llm_loss_spec *spec, float *dx, float *dw, float *db,
                       sf_llm_loss_result *res) {
    const int64_t d = p->m.d;
    for (int64_t i0 = 0; i0 < spec->n_class; i0 += p->m.chunk) {
        const int64_t n = spec->n_class - i0 < p->m.chunk ? spec->n_class - i0 : p->m.chunk;
        const int32_t *rows = spec->class_rows + i0;
        head_gather(p, rows, n);
        for (int64_t i = 0; i < n; i++) {
            float *h = p->a.head_norm + i * d;
            double z = spec->class_b;
            for (int64_t j = 0; j < d; j++) z += (double)h[j] * spec->class_w[j];
            const double y = spec->class_labels[i0 + i];
            const double w = spec->class_weights ? spec->class_weights[i0 + i] : 1.0;
            res->cls += w * (fmax(z, 0.0) - z * y + log1p(exp(-fabs(z))));
            /* sigmoid without overflow: exp of a non-positive number only. */
            const double e = exp(-fabs(z));
            const double sig = z >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
            const float dz = (float)(w * (sig - y));
            if (dw) {
                for (int64_t j = 0; j < d; j++) dw[j] += dz * h[j];
            }
            if (db) *db += dz;
            /* h is no longer needed: it becomes dL/dh for the backward through the norm. */
            for (int64_t j = 0; j < d; j++) h[j] = dz * spec->class_w[j];
        }
        if (dx) head_scatter(p, rows, n, dx);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Entry point                                                                              */
/* ---------------------------------------------------------------------------------------- */

sf_status sf_llm_loss_backward_cpu(const sf_llm *llm, int32_t n_requests,
                                   const int32_t *cu_seqlens, const float *input_embeds,
                                   const sf_llm_loss_spec *spec,
                                   const sf_llm_backward_options *options,
                                   sf_llm_loss_result *result, float *d_input_embeds,
                                   float *d_class_w, float *d_class_b) {
    sf_status st = validate(llm, n_requests, cu_seqlens, input_embeds, spec, result);
    if (st != SF_OK) return st;

    sf_llm_loss_result res = {0};
    const int64_t T = cu_seqlens[n_requests];
    if (T == 0) { /* no rows: no loss term can name a row, and no gradient has a row */
        *result = res;
        return SF_OK;
    }

    const bool recompute = options && options->recompute;
    pass p = {.llm = llm, .n_requests = n_requests, .cu_seqlens = cu_seqlens};
    p.m = make_dims(&llm->cfg, T, recompute);
    p.scale = (float)(1.0 / sqrt((double)llm->cfg.head_dim));
    st = arena_alloc(&p.a, &p.m);
    if (st != SF_OK) return st;

    for (int32_t r = 0; r < n_requests; r++) {
        for (int32_t t = cu_seqlens[r]; t < cu_seqlens[r + 1]; t++) {
            p.a.pos[t] = t - cu_seqlens[r];
        }
    }

    /* Forward, keeping every layer's input and (without recompute) every layer's set. */
    const int64_t layers = p.m.layers, d = p.m.d;
    memcpy(x_at(&p.a, &p.m, 0), input_embeds, (size_t)(T * d) * sizeof(float));
    for (int64_t l = 0; l < layers; l++) {
        act_set s = set_at(&p.a, &p.m, recompute ? 0 : l);
        layer_forward(&p, (int)l, x_at(&p.a, &p.m, l), &s, x_at(&p.a, &p.m, l + 1));
    }

    /* The losses, seeding dL/d(last hidden state) in d_input_embeds, which then carries the
     * residual stream's gradient down through the layers. */
    float *dx = d_input_embeds;
    if (dx) memset(dx, 0, (size_t)(T * d) * sizeof(float));
    ce_loss(&p, spec, dx, &res);
    class_loss(&p, spec, dx, d_class_w, d_class_b, &res);

    if (dx) {
        for (int64_t l = layers - 1; l >= 0; l--) {
            act_set s = set_at(&p.a, &p.m, recompute ? 0 : l);
            if (recompute) layer_forward(&p, (int)l, x_at(&p.a, &p.m, l), &s, NULL);
            layer_backward(&p, (int)l, x_at(&p.a, &p.m, l), &s, dx);
        }
    }

    res.total = res.ce + res.cls;
    *result = res;
    free(p.a.base);
    return SF_OK;
}
