/* One Sysformer training batch on the GPU: forward with saved activations, the four losses, and
 * the backward to every Sysformer weight (host/cuda/train.h). The device twin of the CPU step
 * in host/train/trainer.c, which strings together sf_sysformer_forward_train,
 * sf_llm_loss_backward_cpu and sf_sysformer_backward; the ops and their order are those of the
 * CPU files, with bf16 storage, fp32 accumulation and fp32 gradient streams.
 *
 * Where things live. The frozen LLM is held by a minimal sf_cuda_engine (one slot of one
 * position: its KV cache and arena are a few KiB besides cuBLASLt's workspace), which gives the
 * bf16 upload (weights.c, q/k/v and gate/up stacked), the RoPE tables, the stream and the
 * cuBLASLt cache without a second copy of that code. Everything a batch needs is planned here
 * at creation for max_tokens rows and carved from one device allocation; nothing is allocated
 * per call. The Sysformer's fp32 master weights, its gradient and AdamW's m and v are device
 * arrays in sf_sysformer_flat's order (a tensor's gradient and moments sit at its weight's
 * offset in sf->weights); the forward reads per-tensor bf16 copies (256-byte aligned, as the
 * engine's), rounded from the master weights whenever those change.
 *
 * Two ways to step. sf_cuda_train_step keeps the optimizer on the device: after the backward
 * it enqueues the global gradient norm and clip coefficient (kernels/optim.cu, which leaves
 * both in device memory), AdamW reading that coefficient, and the bf16 refresh, so a step moves
 * only the batch in and a few scalars out; the weights and moments cross PCIe only in
 * sf_cuda_train_upload_state / sf_cuda_train_download_state (creation, resume, checkpoints,
 * validation). sf_cuda_train_loss_grad is the older split: it uploads sf's weights every call
 * and hands the gradient back for an optimizer on the host.
 *
 * The pass:
 *   embed        x0 = E[ids] (bf16)
 *   sysformer    S, U gathered from x0 (packed per request, no padding: the fused attention
 *                takes per-request offsets), plus the learned system offset when the module
 *                has one (the SystemEmbedder baseline: no layers); the layers, saving every
 *                sub-block's input, normalised input, projections, attention outputs and
 *                log-sum-exps; S' scattered over the system rows of x0
 *   llm layers   per layer saved: input, residual after attention, qkv after RoPE, attention
 *                output and log-sum-exp, gate_up (the backward's needs); with the recompute
 *                option only the inputs are kept, one set serves every layer, and the backward
 *                runs each layer's forward again into it just before the layer's backward
 *   losses       the LM head over the cross-entropy rows in chunks of head_chunk rows (logits
 *                fp32, sf_cuda_cross_entropy with its gradient in bf16), the classifier as a
 *                two-way cross-entropy (below); their gradients go back through the LM head /
 *                classifier GEMM and the final RMSNorm and are added into dL/dx at their rows
 *   llm backward activation gradients only, fp32 residual stream, rounded to bf16 where a GEMM
 *                reads it; no LLM weight gradient is formed
 *   sysformer    dL/dS' gathered from the system rows (+ L_recon's), then the backward of each
 *   backward     sub-block; weight gradients accumulate in fp32; the offset's is the sum of
 *                dL/dX0 over the requests' spans
 *
 * Rows added into dL/dx by the heads: a chunk never lists a row twice (the host starts a new
 * chunk at a repeat), so each chunk gathers its rows of dL/dx, adds the final norm's backward
 * in place (sf_cuda_rmsnorm_backward's accumulate) and scatters them back; fp32 rows move
 * through the bf16 row kernels as pairs of 16-bit halves (a bit copy).
 *
 * The classifier z = w . h + b with BCE(z, y) is a two-class cross-entropy: the row (-b, w . h)
 * with target 1 and weight c y gives c y softplus(-z) = c y BCE(z, 1), the row (w . h, -b) with
 * target 1 and weight c (1 - y) gives c (1 - y) BCE(z, 0), and the two gradients with respect
 * to w . h add up to c (sigmoid(z) - y). One GEMM against [w; w] writes both rows' w . h, the
 * host puts -b in the other column, and the fused cross-entropy kernel does the rest.
 *
 * L_recon needs S' - S over N_s d elements and nothing on the device adds two fp32 vectors with
 * a factor: S' and S (bf16) are copied to pinned memory right after the Sysformer's forward, the
 * host forms the loss and 2 w (S' - S) / (N_s d) in double (the CPU's arithmetic) while the
 * device runs the LLM, and the result is added into dL/dS' with sf_cuda_bias_backward over one
 * row (an fp32 add). The host waits only for that copy, long done by the time it is needed. */
#include "cuda/train.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "activations.h"
#include "attention.h"
#include "convert.h"
#include "core/error.h"
#include "core/half.h"
#include "cuda/engine.h"
#include "embedding.h"
#include "guard.h"
#include "loss.h"
#include "model/llm.h"
#include "norms.h"
#include "optim.h"
#include "rope.h"
#include "sysformer/module.h"

/* ---------------------------------------------------------------------------------------- */
/* State                                                                                    */
/* ---------------------------------------------------------------------------------------- */

/* One LLM layer's saved activations. */
typedef struct llm_saved {
    sf_bf16 *x_mid;   /* [T, d]       residual after attention            */
    sf_bf16 *qkv;     /* [T, qkv_dim] q and k after RoPE, v               */
    sf_bf16 *attn;    /* [T, q_dim]   attention output                    */
    float *lse;       /* [T, heads]                                        */
    sf_bf16 *gate_up; /* [T, 2 ff]    before SwiGLU                       */
} llm_saved;

/* One Sysformer layer's saved activations (host/sysformer/backward_cpu.c's layer_tape). */
typedef struct sys_saved {
    sf_bf16 *nrm[3];  /* [Ts, d] norm_first: LN_j(stream); post-LN: stream + block(stream) */
    sf_bf16 *qkv;     /* [Ts, 3d] self-attention q, k, v                               */
    sf_bf16 *a1;      /* [Ts, d]  its output                                           */
    float *lse1;      /* [Ts, heads]                                                   */
    sf_bf16 *cq;      /* [Ts, d]  cross-attention queries                              */
    sf_bf16 *ckv;     /* [Tu, 2d] its keys and values (from the user rows)             */
    sf_bf16 *a2;      /* [Ts, d]                                                       */
    float *lse2;
    sf_bf16 *f_pre;   /* [Ts, ff] linear1's output (GELU's input)                      */
    sf_bf16 *f_act;   /* [Ts, ff] after the activation (ReLU: the epilogue's output)   */
} sys_saved;

/* The per-call inputs and outputs, carved identically in pinned host memory and on the device
 * so that one copy moves each block. */
typedef struct io_block {
    int32_t *ids, *cu, *pos, *rope_table;         /* [T], [T + 1], [T], [T]   */
    int32_t *sys_rows, *user_rows, *cu_sys, *cu_user;
    int32_t *ce_rows, *ce_targets;                /* [T]                      */
    float *ce_weights;
    int32_t *class_rows;                          /* [T]                      */
    int32_t *class_targets;                       /* [2T]                     */
    float *class_weights;                         /* [2T]                     */
    float *class_logits;                          /* [T, 4] (-b, wh | wh, -b) */
    size_t in_bytes;                              /* up to here: the inputs   */
    float *ce_loss;                               /* [T]                      */
    int32_t *ce_correct;                          /* [T]                      */
    float *class_loss;                            /* [2T]                     */
    size_t bytes;
} io_block;

struct sf_cuda_trainer {
    const sf_llm *llm;
    const sf_sysformer *sf;
    sf_cuda_engine *e;            /* the frozen LLM's weights, stream, cuBLASLt cache     */
    cudaStream_t s;
    int32_t T, chunk;             /* max_tokens, head_chunk                               */
    int64_t d, q, kv, qkv, ff, vocab, heads;
    int64_t sd, sff, sheads;      /* the Sysformer: d_model, dim_feedforward, heads       */
    int32_t slayers;
    float seps;
    int64_t n_w;                  /* floats in sf->weights                                */
    bool recompute;               /* one llm_saved set, refilled per layer in the backward */
    bool deterministic;           /* attention backwards without dq atomics               */
    int32_t n_sets;               /* llm_saved sets: num_layers, or 1 with recompute      */

    /* device: the Sysformer's weights and optimizer state */
    void *wbase;
    size_t wbytes;                /* all of wbase: weights + optimizer                    */
    size_t obytes;                /* its optimizer part: g, m, v, the norm and scratch    */
    float *w32;                   /* [n_w] fp32 master weights, sf->weights' layout       */
    float *g;                     /* [n_w] fp32 gradients, same offsets                   */
    float *m, *v;                 /* [n_w] AdamW's moments, same offsets                  */
    double *stats;                /* [2] the last step's gradient norm and clip coefficient */
    void *gnorm_ws;               /* sf_cuda_grad_norm's partial sums                     */
    size_t gnorm_ws_bytes;
    int64_t n_tensors;
    int64_t *t_off, *t_numel;     /* per tensor: offset in sf->weights, size              */
    sf_bf16 **t_bf16;             /* per tensor: its bf16 copy                            */
    sf_cuda_sys_layer *sl;        /* bf16 pointers per layer                              */
    sf_bf16 *final_w, *final_b;   /* or NULL                                              */
    sf_bf16 *cls_w2;              /* [2, d] the classifier weight twice                   */

    /* device: activations */
    void *abase;
    size_t abytes;
    io_block io;                  /* device copy                                          */
    sf_bf16 *xs;                  /* [layers + 1, T, d]                                   */
    llm_saved *ls;                /* [n_sets]                                             */
    sf_bf16 *xn, *tmp, *act;      /* [T, d], [T, d], [T, ff]                              */
    float *dx, *dact, *dxn;       /* [T, d], [T, ff], [T, d]                              */
    sf_bf16 *dx16, *dgu16, *dattn16; /* [T, d], [T, 2 ff], [T, q]                         */
    float *dqkv32;                /* [T, qkv]                                             */
    sf_bf16 *dqkv16;
    float *delta;                 /* [T, max(heads, sheads)]                              */
    sf_bf16 *hx, *hn;             /* [chunk, d]                                           */
    float *logits;                /* [chunk, vocab]                                       */
    sf_bf16 *dlogits;             /* [chunk, vocab]                                       */
    float *dh, *hg;               /* [chunk, d]                                           */
    sf_bf16 *dcls16;              /* [T, 4]                                               */
    float *dcls_w2, *dcls_b2;     /* [2, d], [2]                                          */
    sf_bf16 **stream;             /* [3 slayers + 1] of [T, d]                            */
    sf_bf16 *s_out, *u, *y;       /* [T, d]                                               */
    sys_saved *ss;                /* [slayers]                                            */
    float *gx, *sdh;              /* [T, d]                                               */
    sf_bf16 *gx16, *da16;         /* [T, d]                                               */
    float *sdqkv32, *sdkv32, *sdff, *grec; /* [T, 3d], [T, 2d], [T, sff], [T, d]         */
    sf_bf16 *sdqkv16, *sdkv16, *sdff16;
    void *norm_ws;
    size_t norm_ws_bytes;

    /* pinned host */
    void *hbase;
    size_t hbytes;
    io_block h;                   /* host copy                                            */
    float *h_w32;                 /* [n_w]                                                */
    uint16_t *h_sout, *h_s;       /* [T, d] S' and S, bf16                                */
    float *h_grec;                /* [T, d]                                               */
    double *h_stats;              /* [2] the device's stats after a step                  */
    float *h_cls_b;               /* [1] the classifier bias after a device step          */
    float cls_b;                  /* the master weights' classifier bias: sf's own copy is
                                     behind after sf_cuda_train_step                      */
    double last_coef;             /* the clip coefficient applied to g (1: not clipped)   */
    int32_t *h_seen;              /* [T] malloc'd: the chunk planner's last chunk per row */
    cudaEvent_t recon_ready;
};

/* ---------------------------------------------------------------------------------------- */
/* Memory plan                                                                              */
/* ---------------------------------------------------------------------------------------- */

static void carve_io(sf_carver *c, io_block *b, size_t T) {
    const size_t i4 = sizeof(int32_t), f4 = sizeof(float);
    const size_t start = c->off;
    b->ids = sf_carve(c, T * i4);
    b->cu = sf_carve(c, (T + 1) * i4);
    b->pos = sf_carve(c, T * i4);
    b->rope_table = sf_carve(c, T * i4);
    b->sys_rows = sf_carve(c, T * i4);
    b->user_rows = sf_carve(c, T * i4);
    b->cu_sys = sf_carve(c, (T + 1) * i4);
    b->cu_user = sf_carve(c, (T + 1) * i4);
    b->ce_rows = sf_carve(c, T * i4);
    b->ce_targets = sf_carve(c, T * i4);
    b->ce_weights = sf_carve(c, T * f4);
    b->class_rows = sf_carve(c, T * i4);
    b->class_targets = sf_carve(c, 2 * T * i4);
    b->class_weights = sf_carve(c, 2 * T * f4);
    b->class_logits = sf_carve(c, 4 * T * f4);
    b->in_bytes = c->off - start;
    b->ce_loss = sf_carve(c, T * f4);
    b->ce_correct = sf_carve(c, T * i4);
    b->class_loss = sf_carve(c, 2 * T * f4);
    b->bytes = c->off - start;
}

/* Lays out (base NULL: measures) the activation arena; ls, ss and stream must be allocated. */
static size_t carve_activations(sf_cuda_trainer *t, char *base) {
    sf_carver c = {base, 0};
    const size_t T = (size_t)t->T, C = (size_t)t->chunk, b = sizeof(sf_bf16), f = sizeof(float);
    const size_t d = (size_t)t->d, sd = (size_t)t->sd, sff = (size_t)t->sff;
    const int layers = t->llm->cfg.num_layers;
    carve_io(&c, &t->io, T);
    t->xs = sf_carve(&c, (size_t)(layers + 1) * T * d * b);
    for (int l = 0; l < t->n_sets; l++) {
        llm_saved *L = &t->ls[l];
        L->x_mid = sf_carve(&c, T * d * b);
        L->qkv = sf_carve(&c, T * (size_t)t->qkv * b);
        L->attn = sf_carve(&c, T * (size_t)t->q * b);
        L->lse = sf_carve(&c, T * (size_t)t->heads * f);
        L->gate_up = sf_carve(&c, T * 2 * (size_t)t->ff * b);
    }
    t->xn = sf_carve(&c, T * d * b);
    t->tmp = sf_carve(&c, T * d * b);
    t->act = sf_carve(&c, T * (size_t)t->ff * b);
    t->dx = sf_carve(&c, T * d * f);
    t->dact = sf_carve(&c, T * (size_t)t->ff * f);
    t->dxn = sf_carve(&c, T * d * f);
    t->dx16 = sf_carve(&c, T * d * b);
    t->dgu16 = sf_carve(&c, T * 2 * (size_t)t->ff * b);
    t->dattn16 = sf_carve(&c, T * (size_t)t->q * b);
    t->dqkv32 = sf_carve(&c, T * (size_t)t->qkv * f);
    t->dqkv16 = sf_carve(&c, T * (size_t)t->qkv * b);
    const size_t hmax = (size_t)(t->heads > t->sheads ? t->heads : t->sheads);
    t->delta = sf_carve(&c, T * hmax * f);
    t->hx = sf_carve(&c, C * d * b);
    t->hn = sf_carve(&c, C * d * b);
    t->logits = sf_carve(&c, C * (size_t)t->vocab * f);
    t->dlogits = sf_carve(&c, C * (size_t)t->vocab * b);
    t->dh = sf_carve(&c, C * d * f);
    t->hg = sf_carve(&c, C * d * f);
    t->dcls16 = sf_carve(&c, 4 * T * b);
    t->dcls_w2 = sf_carve(&c, 2 * d * f);
    t->dcls_b2 = sf_carve(&c, 2 * f);
    /* the Sysformer (T bounds its system and user rows) */
    for (int i = 0; i < 3 * t->slayers + 1; i++) t->stream[i] = sf_carve(&c, T * sd * b);
    t->s_out = t->sf->cfg.final_norm ? sf_carve(&c, T * sd * b) : t->stream[3 * t->slayers];
    t->u = sf_carve(&c, T * sd * b);
    t->y = sf_carve(&c, T * sd * b);
    for (int i = 0; i < t->slayers; i++) {
        sys_saved *S = &t->ss[i];
        for (int j = 0; j < 3; j++) S->nrm[j] = sf_carve(&c, T * sd * b);
        S->qkv = sf_carve(&c, T * 3 * sd * b);
        S->a1 = sf_carve(&c, T * sd * b);
        S->lse1 = sf_carve(&c, T * (size_t)t->sheads * f);
        S->cq = sf_carve(&c, T * sd * b);
        S->ckv = sf_carve(&c, T * 2 * sd * b);
        S->a2 = sf_carve(&c, T * sd * b);
        S->lse2 = sf_carve(&c, T * (size_t)t->sheads * f);
        S->f_pre = sf_carve(&c, T * sff * b);
        S->f_act = sf_carve(&c, T * sff * b);
    }
    t->gx = sf_carve(&c, T * sd * f);
    t->sdh = sf_carve(&c, T * sd * f);
    t->gx16 = sf_carve(&c, T * sd * b);
    t->da16 = sf_carve(&c, T * sd * b);
    t->sdqkv32 = sf_carve(&c, T * 3 * sd * f);
    t->sdkv32 = sf_carve(&c, T * 2 * sd * f);
    t->sdff = sf_carve(&c, T * sff * f);
    t->grec = sf_carve(&c, T * sd * f);
    t->sdqkv16 = sf_carve(&c, T * 3 * sd * b);
    t->sdkv16 = sf_carve(&c, T * 2 * sd * b);
    t->sdff16 = sf_carve(&c, T * sff * b);
    t->norm_ws_bytes = sf_cuda_norm_backward_workspace_bytes((int64_t)T);
    t->norm_ws = sf_carve(&c, t->norm_ws_bytes);
    return c.off;
}

/* The Sysformer's weights (per-tensor bf16 copies, the fp32 master weights), then the
 * optimizer's part, whose size goes to *opt_bytes: the gradients, AdamW's m and v, the norm
 * and clip coefficient, and the norm's scratch. */
static size_t carve_weights(sf_cuda_trainer *t, char *base, size_t *opt_bytes) {
    sf_carver c = {base, 0};
    const size_t nw = (size_t)t->n_w * sizeof(float);
    for (int64_t i = 0; i < t->n_tensors; i++) {
        t->t_bf16[i] = sf_carve(&c, (size_t)t->t_numel[i] * sizeof(sf_bf16));
    }
    t->cls_w2 = sf_carve(&c, 2 * (size_t)t->d * sizeof(sf_bf16));
    t->w32 = sf_carve(&c, nw);
    const size_t opt0 = c.off;
    t->g = sf_carve(&c, nw);
    t->m = sf_carve(&c, nw);
    t->v = sf_carve(&c, nw);
    t->stats = sf_carve(&c, 2 * sizeof(double));
    t->gnorm_ws_bytes = sf_cuda_grad_norm_workspace_bytes(t->n_w);
    t->gnorm_ws = sf_carve(&c, t->gnorm_ws_bytes);
    *opt_bytes = c.off - opt0;
    return c.off;
}

static size_t carve_host(sf_cuda_trainer *t, char *base) {
    sf_carver c = {base, 0};
    const size_t T = (size_t)t->T, sd = (size_t)t->sd;
    carve_io(&c, &t->h, T);
    t->h_w32 = sf_carve(&c, (size_t)t->n_w * sizeof(float));
    t->h_sout = sf_carve(&c, T * sd * sizeof(uint16_t));
    t->h_s = sf_carve(&c, T * sd * sizeof(uint16_t));
    t->h_grec = sf_carve(&c, T * sd * sizeof(float));
    t->h_stats = sf_carve(&c, 2 * sizeof(double));
    t->h_cls_b = sf_carve(&c, sizeof(float));
    return c.off;
}

/* ---------------------------------------------------------------------------------------- */
/* Life cycle                                                                               */
/* ---------------------------------------------------------------------------------------- */

sf_cuda_train_options sf_cuda_train_default_options(void) {
    sf_cuda_train_options o;
    memset(&o, 0, sizeof o);
    o.max_tokens = 1024;
    o.head_chunk = 256;
    return o;
}

static bool fused_head_dim(int64_t hd) { return hd == 64 || hd == 80 || hd == 96 || hd == 128; }

/* The bf16 copy of the tensor at host pointer p of the Sysformer (NULL for NULL). */
static sf_bf16 *dev_tensor(const sf_cuda_trainer *t, const float *p) {
    if (!p) return NULL;
    const int64_t off = p - t->sf->weights;
    for (int64_t i = 0; i < t->n_tensors; i++) {
        if (t->t_off[i] == off) return t->t_bf16[i];
    }
    return NULL;
}

/* The gradient of the tensor at host pointer p (same offset in g). */
static float *grad_of(const sf_cuda_trainer *t, const float *p) {
    return t->g + (p - t->sf->weights);
}

static sf_status dev_alloc(void **p, size_t bytes, const char *what) {
    cudaError_t err = cudaMalloc(p, bytes ? bytes : 1);
    if (err != cudaSuccess) {
        *p = NULL;
        (void)cudaGetLastError();
        return sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                       "sf_cuda_train_create: cannot allocate %zu bytes (%.2f GiB) of device "
                       "memory for %s: %s",
                       bytes, (double)bytes / (1u << 30), what, cudaGetErrorString(err));
    }
    return SF_OK;
}

static sf_status check_create(const sf_llm *llm, const sf_sysformer *sf,
                              const sf_cuda_train_options *o) {
    static const char *fn = "sf_cuda_train_create";
    const sf_llm_config *c = &llm->cfg;
    const sf_sysformer_config *s = &sf->cfg;
    if (o->device < 0 || o->max_tokens < 0 || o->head_chunk < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: device %d, max_tokens %d, head_chunk %d",
                       fn, o->device, o->max_tokens, o->head_chunk);
    }
    if (o->gen_slots < 0 || o->gen_slots > 65535 ||
        (o->gen_slots > 0 && (o->gen_context < 1 ||
                              o->gen_context > c->max_position_embeddings ||
                              (int64_t)o->gen_slots * o->gen_context > INT32_MAX))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: gen_slots %d (0..65535), gen_context %d "
                       "(1..%d, and slots x context below 2^31)", fn, o->gen_slots,
                       o->gen_context, c->max_position_embeddings);
    }
    SF_TRY(sf_llm_check_whole(llm, fn));
    if (s->d_model != c->hidden_size) {
        return sf_fail(SF_ERR_CONFIG, "%s: the Sysformer's d_model %d is not the LLM's hidden "
                       "size %d", fn, s->d_model, c->hidden_size);
    }
    if (s->num_heads <= 0 || s->d_model % s->num_heads != 0 || s->num_layers < 0 ||
        s->dim_feedforward <= 0 || !fused_head_dim(s->d_model / s->num_heads)) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: Sysformer d_model %d with %d heads (head dim "
                       "must be 64, 80, 96 or 128 for the fused attention), ff %d", fn,
                       s->d_model, s->num_heads, s->dim_feedforward);
    }
    if (!sf->weights || sf->n_weights <= 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: the Sysformer has no weights", fn);
    }
    return SF_OK;
}

void sf_cuda_train_free(sf_cuda_trainer *t) {
    if (!t) return;
    if (t->e) {
        (void)cudaStreamSynchronize(t->s);
        if (t->recon_ready) (void)cudaEventDestroy(t->recon_ready);
        cudaFree(t->wbase);
        cudaFree(t->abase);
        if (t->hbase) cudaFreeHost(t->hbase);
        (void)cudaGetLastError();
        sf_cuda_engine_free(t->e);
    }
    free(t->t_off);
    free(t->t_numel);
    free(t->t_bf16);
    free(t->sl);
    free(t->ls);
    free(t->ss);
    free(t->stream);
    free(t->h_seen);
    free(t);
}

/* The engine that holds the frozen LLM: one slot of one position (the minimal one), or, with
 * room for generation, gen_slots slots of gen_context positions, whose prefill takes them all
 * at once (and, holding the Sysformer too, the padded system and user rows: each is at most
 * gen_context per request). */
static sf_cuda_engine_options llm_engine_options(const sf_cuda_train_options *o) {
    sf_cuda_engine_options eo = sf_cuda_engine_default_options();
    eo.device = o->device;
    if (o->gen_slots > 0) {
        eo.max_slots = o->gen_slots;
        eo.max_context = o->gen_context;
        eo.max_batch_tokens = o->gen_slots * o->gen_context;
        return eo;
    }
    eo.max_slots = 1;
    eo.max_context = 1;
    eo.max_batch_tokens = 1;
    eo.cuda_graphs = false;
    return eo;
}

/* Shapes, the Sysformer's tensor list, the host arrays and the byte count of every block,
 * with no device call (shared by creation and sf_cuda_train_plan). */
static sf_status layout(sf_cuda_trainer *t, const sf_cuda_train_options *o) {
    const sf_llm *llm = t->llm;
    const sf_sysformer *sf = t->sf;
    const sf_llm_config *c = &llm->cfg;
    t->T = o->max_tokens ? o->max_tokens : 1024;
    t->chunk = o->head_chunk ? o->head_chunk : 256;
    if (t->chunk > t->T) t->chunk = t->T;
    t->d = c->hidden_size;
    t->q = (int64_t)c->num_heads * c->head_dim; /* the engine's q_dim, kv_dim, qkv_dim */
    t->kv = (int64_t)c->num_kv_heads * c->head_dim;
    t->qkv = t->q + 2 * t->kv;
    t->ff = c->intermediate_size;
    t->vocab = c->vocab_size;
    t->heads = c->num_heads;
    t->sd = sf->cfg.d_model;
    t->sff = sf->cfg.dim_feedforward;
    t->sheads = sf->cfg.num_heads;
    t->slayers = sf->cfg.num_layers;
    t->seps = sf->cfg.layer_norm_eps;
    t->n_w = sf->n_weights;
    t->recompute = o->recompute;
    t->deterministic = o->deterministic;
    t->n_sets = o->recompute ? (c->num_layers > 0 ? 1 : 0) : c->num_layers;

    /* the Sysformer's tensors, by offset into its flat weights (the listing only reads sf) */
    sf_sysformer_tensor *ts = sf_sysformer_tensors((sf_sysformer *)sf, &t->n_tensors);
    if (!ts) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_train_create: out of host memory");
    t->t_off = calloc((size_t)t->n_tensors + 1, sizeof *t->t_off);
    t->t_numel = calloc((size_t)t->n_tensors + 1, sizeof *t->t_numel);
    t->t_bf16 = calloc((size_t)t->n_tensors + 1, sizeof *t->t_bf16);
    t->sl = calloc((size_t)t->slayers + 1, sizeof *t->sl);
    t->ls = calloc((size_t)t->n_sets + 1, sizeof *t->ls);
    t->ss = calloc((size_t)t->slayers + 1, sizeof *t->ss);
    t->stream = calloc((size_t)(3 * t->slayers + 1), sizeof *t->stream);
    t->h_seen = malloc((size_t)t->T * sizeof *t->h_seen);
    if (!t->t_off || !t->t_numel || !t->t_bf16 || !t->sl || !t->ls || !t->ss || !t->stream ||
        !t->h_seen) {
        free(ts);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_train_create: out of host memory");
    }
    int64_t n_live = 0;
    for (int64_t i = 0; i < t->n_tensors; i++) {
        const float *p = *ts[i].slot;
        if (!p) continue;
        t->t_off[n_live] = p - sf->weights;
        t->t_numel[n_live] = ts[i].shape[0] * (ts[i].ndim == 2 ? ts[i].shape[1] : 1);
        n_live++;
    }
    free(ts);
    t->n_tensors = n_live;
    t->wbytes = carve_weights(t, NULL, &t->obytes);
    t->abytes = carve_activations(t, NULL);
    t->hbytes = carve_host(t, NULL);
    return SF_OK;
}

static sf_status create(sf_cuda_trainer *t, const sf_cuda_train_options *o) {
    const sf_sysformer *sf = t->sf;
    const sf_cuda_engine_options eo = llm_engine_options(o);
    SF_TRY(sf_cuda_engine_create(t->llm, o->gen_slots > 0 ? sf : NULL, &eo, &t->e));
    t->s = t->e->stream;
    SF_TRY(layout(t, o));

    SF_TRY(dev_alloc(&t->wbase, t->wbytes, "the Sysformer's weights and optimizer state"));
    size_t obytes = 0;
    carve_weights(t, t->wbase, &obytes);
    for (int i = 0; i < t->slayers; i++) {
        const sf_sysformer_layer *H = &sf->layers[i];
        sf_cuda_sys_layer *S = &t->sl[i];
        S->sa_in_w = dev_tensor(t, H->self_attn.in_proj_weight);
        S->sa_in_b = dev_tensor(t, H->self_attn.in_proj_bias);
        S->sa_out_w = dev_tensor(t, H->self_attn.out_proj_weight);
        S->sa_out_b = dev_tensor(t, H->self_attn.out_proj_bias);
        S->ca_in_w = dev_tensor(t, H->cross_attn.in_proj_weight);
        S->ca_in_b = dev_tensor(t, H->cross_attn.in_proj_bias);
        S->ca_out_w = dev_tensor(t, H->cross_attn.out_proj_weight);
        S->ca_out_b = dev_tensor(t, H->cross_attn.out_proj_bias);
        S->l1_w = dev_tensor(t, H->linear1_weight);
        S->l1_b = dev_tensor(t, H->linear1_bias);
        S->l2_w = dev_tensor(t, H->linear2_weight);
        S->l2_b = dev_tensor(t, H->linear2_bias);
        for (int k = 0; k < 3; k++) {
            S->norm_w[k] = dev_tensor(t, H->norm_weight[k]);
            S->norm_b[k] = dev_tensor(t, H->norm_bias[k]);
        }
    }
    t->final_w = dev_tensor(t, sf->final_norm_weight);
    t->final_b = dev_tensor(t, sf->final_norm_bias);

    SF_TRY(dev_alloc(&t->abase, t->abytes, "the training activations"));
    carve_activations(t, t->abase);

    cudaError_t err = cudaHostAlloc(&t->hbase, t->hbytes, cudaHostAllocDefault);
    if (err != cudaSuccess) {
        t->hbase = NULL;
        (void)cudaGetLastError();
        return sf_fail(err == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA,
                       "sf_cuda_train_create: cannot pin %zu bytes of host staging: %s",
                       t->hbytes, cudaGetErrorString(err));
    }
    carve_host(t, t->hbase);
    SF_CUDA_OR_FAIL(cudaEventCreateWithFlags(&t->recon_ready, cudaEventDisableTiming));
    /* ready to step: sf's weights, zero moments, and no gradient yet */
    t->last_coef = 1.0;
    SF_CUDA_OR_FAIL(cudaMemsetAsync(t->g, 0, (size_t)t->n_w * sizeof(float), t->s));
    return sf_cuda_train_upload_state(t, sf->weights, NULL, NULL);
}

sf_status sf_cuda_train_create(const sf_llm *llm, const sf_sysformer *sf,
                               const sf_cuda_train_options *options, sf_cuda_trainer **out) {
    if (out) *out = NULL;
    if (!llm || !sf || !out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_train_create: NULL model, Sysformer "
                       "or out");
    }
    const sf_cuda_train_options o = options ? *options : sf_cuda_train_default_options();
    SF_TRY(check_create(llm, sf, &o));
    sf_cuda_trainer *t = calloc(1, sizeof *t);
    if (!t) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_train_create: out of host memory");
    t->llm = llm;
    t->sf = sf;
    sf_status st = create(t, &o);
    if (st != SF_OK) {
        sf_cuda_train_free(t);
        return st;
    }
    *out = t;
    return SF_OK;
}

static void fill_memory(const sf_cuda_trainer *t, const sf_cuda_memory *engine,
                        sf_cuda_train_memory *out) {
    out->llm_weights = engine->total;
    out->sysformer = t->wbytes;
    out->optimizer = t->obytes;
    out->activations = t->abytes;
    out->pinned_host = t->hbytes;
    out->total = out->llm_weights + out->sysformer + out->activations;
}

sf_status sf_cuda_train_memory_report(const sf_cuda_trainer *t, sf_cuda_train_memory *out) {
    if (!t || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_train_memory_report: NULL");
    sf_cuda_memory m;
    SF_TRY(sf_cuda_engine_memory(t->e, &m));
    fill_memory(t, &m, out);
    return SF_OK;
}

sf_status sf_cuda_train_plan(const sf_llm *llm, const sf_sysformer *sf,
                             const sf_cuda_train_options *options, sf_cuda_train_memory *out) {
    if (out) memset(out, 0, sizeof *out);
    if (!llm || !sf || !out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_train_plan: NULL model, Sysformer or "
                       "out");
    }
    const sf_cuda_train_options o = options ? *options : sf_cuda_train_default_options();
    SF_TRY(check_create(llm, sf, &o));
    const sf_cuda_engine_options eo = llm_engine_options(&o);
    sf_cuda_memory m;
    SF_TRY(sf_cuda_engine_plan(&llm->cfg, o.gen_slots > 0 ? &sf->cfg : NULL, &eo, &m));
    sf_cuda_trainer *t = calloc(1, sizeof *t);
    if (!t) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_cuda_train_plan: out of host memory");
    t->llm = llm;
    t->sf = sf;
    const sf_status st = layout(t, &o);
    if (st == SF_OK) fill_memory(t, &m, out);
    sf_cuda_train_free(t); /* no engine: frees the host arrays only */
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* Validation and the host-side layout                                                      */
/* ---------------------------------------------------------------------------------------- */

static sf_status validate(const sf_cuda_trainer *t, const sf_cuda_train_batch *b) {
    static const char *fn = "sf_cuda_train_loss_grad";
    const sf_llm_config *c = &t->llm->cfg;
    if (b->n_requests < 0 || b->n_requests > 65535) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_requests = %d (0..65535)", fn,
                       b->n_requests);
    }
    if (b->n_requests > t->T) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: %d requests; the trainer was sized for "
                       "max_tokens = %d", fn, b->n_requests, t->T);
    }
    if (!b->cu_seqlens || (b->n_requests > 0 && !b->spans)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_seqlens or spans is NULL", fn);
    }
    if (b->cu_seqlens[0] != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_seqlens[0] = %d, not 0", fn,
                       b->cu_seqlens[0]);
    }
    for (int32_t r = 0; r < b->n_requests; r++) {
        const int64_t n = (int64_t)b->cu_seqlens[r + 1] - b->cu_seqlens[r];
        if (n < 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cu_seqlens decreases at request %d",
                           fn, r);
        }
        if (n > c->max_position_embeddings) {
            return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: request %d has %lld tokens; the model "
                           "allows %d", fn, r, (long long)n, c->max_position_embeddings);
        }
        if ((int64_t)b->cu_seqlens[r + 1] > t->T) {
            return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: the batch has more than %d packed rows "
                           "(%d at request %d); the trainer was sized for max_tokens = %d", fn,
                           t->T, b->cu_seqlens[r + 1], r, t->T);
        }
        const sf_prompt_spans *s = &b->spans[r];
        if (s->prefix < 0 || s->system < 0 || s->middle < 0 || s->user < 0 || s->suffix < 0 ||
            (int64_t)s->prefix + s->system + s->middle + s->user + s->suffix != n) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request %d: spans (%d, %d, %d, %d, %d) "
                           "do not split its %lld rows", fn, r, s->prefix, s->system, s->middle,
                           s->user, s->suffix, (long long)n);
        }
        if (s->system > 0 && s->user == 0) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request %d has a system span but an "
                           "empty user span; cross-attention needs at least one user token",
                           fn, r);
        }
        const int32_t offset_rows = t->sf->cfg.system_offset_rows;
        if (offset_rows > 0 && s->system != 0 && s->system != offset_rows) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: request %d has a system span of %d "
                           "tokens, but this module's learned system offset has %d rows (it "
                           "was trained for one system prompt; use that prompt)", fn, r,
                           s->system, offset_rows);
        }
    }
    const int32_t T = b->cu_seqlens[b->n_requests];
    if (T > 0 && !b->ids) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: ids is NULL", fn);
    for (int32_t i = 0; i < T; i++) {
        if (b->ids[i] < 0 || b->ids[i] >= c->vocab_size) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: ids[%d] = %d outside [0, %d)", fn, i,
                           b->ids[i], c->vocab_size);
        }
    }
    if (b->n_ce < 0 || b->n_ce > t->T || b->n_class < 0 || b->n_class > t->T) {
        return sf_fail(b->n_ce < 0 || b->n_class < 0 ? SF_ERR_INVALID_ARGUMENT
                                                     : SF_ERR_OUT_OF_RANGE,
                       "%s: n_ce = %d, n_class = %d (0..max_tokens = %d)", fn, b->n_ce,
                       b->n_class, t->T);
    }
    if ((b->n_ce > 0 && (!b->ce_rows || !b->ce_targets)) ||
        (b->n_class > 0 && (!b->class_rows || !b->class_labels))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL loss rows, targets or labels", fn);
    }
    for (int32_t i = 0; i < b->n_ce; i++) {
        if (b->ce_rows[i] < 0 || b->ce_rows[i] >= T || b->ce_targets[i] < 0 ||
            b->ce_targets[i] >= c->vocab_size ||
            (b->ce_weights && !isfinite(b->ce_weights[i]))) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: cross-entropy entry %d: row %d of %d, "
                           "target %d of %d, or a weight that is not finite", fn, i,
                           b->ce_rows[i], T, b->ce_targets[i], c->vocab_size);
        }
    }
    if (b->n_class > 0 && !t->sf->classifier_weight) {
        return sf_fail(SF_ERR_CONFIG, "%s: classifier rows given but the Sysformer has no "
                       "classifier head", fn);
    }
    for (int32_t i = 0; i < b->n_class; i++) {
        const float y = b->class_labels[i];
        if (b->class_rows[i] < 0 || b->class_rows[i] >= T || !(y >= 0.0f && y <= 1.0f) ||
            (b->class_weights && !isfinite(b->class_weights[i]))) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: classifier entry %d: row %d of %d, "
                           "label %g (must be in [0, 1]), or a weight that is not finite", fn,
                           i, b->class_rows[i], T, (double)y);
        }
    }
    if (!(b->w_recon >= 0.0) || !isfinite(b->w_recon)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: w_recon = %g", fn, b->w_recon);
    }
    return SF_OK;
}

/* The host's view of one batch. */
typedef struct plan {
    int32_t n, T, Ts, Tu, max_len, max_sys, max_user;
} plan;

/* Fills the pinned input block. */
static void stage_inputs(sf_cuda_trainer *t, const sf_cuda_train_batch *b, plan *p) {
    io_block *h = &t->h;
    const int32_t n = b->n_requests;
    p->n = n;
    p->T = b->cu_seqlens[n];
    p->Ts = p->Tu = p->max_len = p->max_sys = p->max_user = 0;
    memcpy(h->ids, b->ids, (size_t)p->T * sizeof(int32_t));
    memcpy(h->cu, b->cu_seqlens, (size_t)(n + 1) * sizeof(int32_t));
    h->cu_sys[0] = h->cu_user[0] = 0;
    const int32_t long_after = t->e->long_after;
    for (int32_t r = 0; r < n; r++) {
        const int32_t r0 = b->cu_seqlens[r], len = b->cu_seqlens[r + 1] - r0;
        const sf_prompt_spans *s = &b->spans[r];
        for (int32_t i = 0; i < len; i++) {
            h->pos[r0 + i] = i;
            /* longrope's long factors when the request passes the original context, as
             * sf_cpu_rope_freqs(cfg, len) picks them */
            h->rope_table[r0 + i] = len > long_after ? 1 : 0;
        }
        const int32_t sys0 = r0 + s->prefix, usr0 = sys0 + s->system + s->middle;
        for (int32_t i = 0; i < s->system; i++) h->sys_rows[p->Ts + i] = sys0 + i;
        for (int32_t i = 0; i < s->user; i++) h->user_rows[p->Tu + i] = usr0 + i;
        p->Ts += s->system;
        p->Tu += s->user;
        h->cu_sys[r + 1] = p->Ts;
        h->cu_user[r + 1] = p->Tu;
        if (len > p->max_len) p->max_len = len;
        if (s->system > p->max_sys) p->max_sys = s->system;
        if (s->user > p->max_user) p->max_user = s->user;
    }
    if (b->n_ce > 0) {
        memcpy(h->ce_rows, b->ce_rows, (size_t)b->n_ce * sizeof(int32_t));
        memcpy(h->ce_targets, b->ce_targets, (size_t)b->n_ce * sizeof(int32_t));
    }
    for (int32_t i = 0; i < b->n_ce; i++) h->ce_weights[i] = b->ce_weights ? b->ce_weights[i] : 1;
    const float cb = t->cls_b;
    for (int32_t i = 0; i < b->n_class; i++) {
        const double w = b->class_weights ? b->class_weights[i] : 1.0;
        const double y = b->class_labels[i];
        h->class_rows[i] = b->class_rows[i];
        h->class_targets[2 * i] = h->class_targets[2 * i + 1] = 1;
        h->class_weights[2 * i] = (float)(w * y);
        h->class_weights[2 * i + 1] = (float)(w * (1.0 - y));
        float *z = h->class_logits + 4 * i;
        z[0] = -cb, z[1] = 0.0f, z[2] = 0.0f, z[3] = -cb; /* the GEMM writes z[1], z[2] */
    }
}

/* The next chunk of rows[i0 .. n): at most cap entries and no row twice. Returns its end. */
static int32_t chunk_end(sf_cuda_trainer *t, const int32_t *rows, int32_t i0, int32_t n,
                         int32_t cap, int32_t stamp) {
    int32_t i = i0;
    while (i < n && i - i0 < cap && t->h_seen[rows[i]] != stamp) t->h_seen[rows[i++]] = stamp;
    return i;
}

/* ---------------------------------------------------------------------------------------- */
/* Small wrappers                                                                           */
/* ---------------------------------------------------------------------------------------- */

static sf_status gemm(sf_cuda_trainer *t, void *y, bool y_f32, int64_t ldy, const sf_bf16 *x,
                      int64_t ldx, const sf_bf16 *w, const sf_bf16 *bias, int64_t m, int64_t n,
                      int64_t k, sf_gemm_epilogue epi) {
    sf_gemm_args a = {y, ldy, y_f32, x, ldx, w, bias, m, n, k, epi};
    return sf_cuda_gemm(t->e->gemm, &a, t->s);
}

/* dx (fp32 or bf16, =|+=) dy . w */
static sf_status gemm_dx(sf_cuda_trainer *t, void *dx, bool dx_f32, bool acc, int64_t lddx,
                         const sf_bf16 *dy, int64_t lddy, const sf_bf16 *w, int64_t m, int64_t n,
                         int64_t k) {
    sf_gemm_dx_args a = {dx, lddx, dx_f32, acc, dy, lddy, w, m, n, k};
    return sf_cuda_gemm_dx(t->e->gemm, &a, t->s);
}

/* dw += dy^T . x (fp32) */
static sf_status gemm_dw(sf_cuda_trainer *t, float *dw, float *db, bool acc, const sf_bf16 *dy,
                         int64_t lddy, const sf_bf16 *x, int64_t ldx, int64_t m, int64_t n,
                         int64_t k) {
    sf_gemm_dw_args a = {dw, db, acc, dy, lddy, x, ldx, m, n, k};
    return sf_cuda_gemm_dw(t->e->gemm, &a, t->s);
}

/* db += column sums of the fp32 dy [rows, ldy] (the bias gradient; over one row: an add). */
static sf_status colsum(sf_cuda_trainer *t, float *db, const float *dy, int64_t ldy, int64_t rows,
                        int64_t dim) {
    return sf_cuda_bias_backward(db, true, dy, false, ldy, rows, dim, t->s);
}

/* fp32 rows moved as pairs of bf16 halves (bit copies). */
static sf_status gather_f32(sf_cuda_trainer *t, float *dst, const float *src, const int32_t *rows,
                            int64_t n, int64_t dim) {
    return sf_cuda_gather_rows_bf16((sf_bf16 *)dst, 2 * dim, (const sf_bf16 *)src, 2 * dim, rows,
                                    n, 2 * dim, t->s);
}
static sf_status scatter_f32(sf_cuda_trainer *t, float *dst, const float *src,
                             const int32_t *rows, int64_t n, int64_t dim) {
    return sf_cuda_scatter_rows_bf16((sf_bf16 *)dst, 2 * dim, (const sf_bf16 *)src, 2 * dim,
                                     rows, n, 2 * dim, t->s);
}

/* ---------------------------------------------------------------------------------------- */
/* The Sysformer: forward with saved activations                                            */
/* ---------------------------------------------------------------------------------------- */

static void sys_attention_args(const sf_cuda_trainer *t, const plan *p, bool cross,
                               sf_attention_args *at) {
    memset(at, 0, sizeof *at);
    const int32_t hd = (int32_t)(t->sd / t->sheads);
    at->cu_q = t->io.cu_sys;
    at->cu_kv = cross ? t->io.cu_user : t->io.cu_sys;
    at->n_requests = p->n;
    at->max_q_len = p->max_sys;
    at->n_heads = at->n_kv_heads = (int32_t)t->sheads;
    at->head_dim = hd;
    at->out_stride = t->sd;
    at->causal = false;
    at->scale = (float)(1.0 / sqrt((double)hd)); /* backward_cpu.c's attention_scale */
}

/* y = SA(h) (j 0), CA(h, U) (j 1) or FF(h) (j 2) of layer i, saving what the backward reads. */
static sf_status sys_block_forward(sf_cuda_trainer *t, const plan *p, int i, int j,
                                   const sf_bf16 *h) {
    const sf_cuda_sys_layer *L = &t->sl[i];
    sys_saved *S = &t->ss[i];
    const int64_t d = t->sd, Ts = p->Ts, Tu = p->Tu;
    sf_attention_args at;
    if (j == 0) {
        SF_TRY(gemm(t, S->qkv, false, 3 * d, h, d, L->sa_in_w, L->sa_in_b, Ts, 3 * d, d,
                    SF_GEMM_BIAS));
        sys_attention_args(t, p, false, &at);
        at.out = S->a1;
        at.lse = S->lse1;
        at.q = S->qkv;
        at.k = S->qkv + d;
        at.v = S->qkv + 2 * d;
        at.q_stride = at.kv_stride = 3 * d;
        SF_TRY(sf_cuda_attention_bf16(&at, t->s));
        return gemm(t, t->y, false, d, S->a1, d, L->sa_out_w, L->sa_out_b, Ts, d, d,
                    SF_GEMM_BIAS);
    }
    if (j == 1) {
        SF_TRY(gemm(t, S->cq, false, d, h, d, L->ca_in_w, L->ca_in_b, Ts, d, d, SF_GEMM_BIAS));
        SF_TRY(gemm(t, S->ckv, false, 2 * d, t->u, d, L->ca_in_w + d * d, L->ca_in_b + d, Tu,
                    2 * d, d, SF_GEMM_BIAS));
        sys_attention_args(t, p, true, &at);
        at.out = S->a2;
        at.lse = S->lse2;
        at.q = S->cq;
        at.q_stride = d;
        at.k = S->ckv;
        at.v = S->ckv + d;
        at.kv_stride = 2 * d;
        SF_TRY(sf_cuda_attention_bf16(&at, t->s));
        return gemm(t, t->y, false, d, S->a2, d, L->ca_out_w, L->ca_out_b, Ts, d, d,
                    SF_GEMM_BIAS);
    }
    const int64_t ff = t->sff;
    if (t->sf->cfg.activation == SF_ACT_RELU) {
        SF_TRY(gemm(t, S->f_act, false, ff, h, d, L->l1_w, L->l1_b, Ts, ff, d,
                    SF_GEMM_RELU_BIAS));
    } else {
        SF_TRY(gemm(t, S->f_pre, false, ff, h, d, L->l1_w, L->l1_b, Ts, ff, d, SF_GEMM_BIAS));
        SF_TRY(sf_cuda_gelu_bf16(S->f_act, S->f_pre, Ts * ff, t->s));
    }
    return gemm(t, t->y, false, d, S->f_act, ff, L->l2_w, L->l2_b, Ts, d, ff, SF_GEMM_BIAS);
}

static sf_status sys_forward(sf_cuda_trainer *t, const plan *p) {
    const int64_t Ts = p->Ts, d = t->sd;
    const bool norm_first = t->sf->cfg.norm_first;
    const float eps = t->seps;
    for (int i = 0; i < t->slayers; i++) {
        const sf_cuda_sys_layer *L = &t->sl[i];
        sys_saved *S = &t->ss[i];
        sf_bf16 *const *x = t->stream + 3 * i;
        for (int j = 0; j < 3; j++) {
            if (norm_first) {
                /* x[j+1] = x[j] + B(LN_j(x[j])) */
                SF_TRY(sf_cuda_layernorm_bf16(S->nrm[j], NULL, x[j], NULL, L->norm_w[j],
                                              L->norm_b[j], Ts, d, eps, t->s));
                SF_TRY(sys_block_forward(t, p, i, j, S->nrm[j]));
                SF_TRY(sf_cuda_add_bf16(x[j + 1], x[j], t->y, Ts * d, t->s));
            } else {
                /* x[j+1] = LN_j(nrm = x[j] + B(x[j])) */
                SF_TRY(sys_block_forward(t, p, i, j, x[j]));
                SF_TRY(sf_cuda_layernorm_bf16(x[j + 1], S->nrm[j], t->y, x[j], L->norm_w[j],
                                              L->norm_b[j], Ts, d, eps, t->s));
            }
        }
    }
    if (t->final_w) {
        SF_TRY(sf_cuda_layernorm_bf16(t->s_out, NULL, t->stream[3 * t->slayers], NULL,
                                      t->final_w, t->final_b, Ts, d, eps, t->s));
    }
    return SF_OK;
}

/* X0 = S + system_offset (sf_sysformer_add_offset) over the gathered system rows, stream[0].
 * Every span in the batch is empty or exactly the offset's n rows (validate), so the packed
 * rows are Ts / n spans back to back: [Ts / n, n d], and the offset is one bias row over them. */
static sf_status add_offset(sf_cuda_trainer *t, const plan *p) {
    const sf_sysformer *sf = t->sf;
    const int64_t n = sf->cfg.system_offset_rows;
    if (n == 0 || p->Ts == 0) return SF_OK;
    return sf_cuda_bias_add_bf16(t->stream[0], dev_tensor(t, sf->system_offset), p->Ts / n,
                                 n * t->sd, t->s);
}

/* Its backward: the offset, shared by every request, collects the sum of dL/dX0 over the spans
 * (gx after sys_backward): the column sums of gx seen as [Ts / n, n d]. */
static sf_status add_offset_backward(sf_cuda_trainer *t, const plan *p) {
    const sf_sysformer *sf = t->sf;
    const int64_t n = sf->cfg.system_offset_rows;
    if (n == 0 || p->Ts == 0) return SF_OK;
    return colsum(t, grad_of(t, sf->system_offset), t->gx, n * t->sd, p->Ts / n, n * t->sd);
}

/* ---------------------------------------------------------------------------------------- */
/* The Sysformer: backward                                                                  */
/* ---------------------------------------------------------------------------------------- */

/* Backward of sub-block j of layer i, y = B(h): gy = dL/dy (fp32, and gy16 its bf16 copy);
 * the weight gradients are added; dst (=|+= per acc) receives dL/dh. gy is read before dst is
 * written, so dst may be gy (the post-LN case). */
static sf_status sys_block_backward(sf_cuda_trainer *t, const plan *p, int i, int j,
                                    const float *gy, const sf_bf16 *gy16, const sf_bf16 *h,
                                    float *dst, bool acc) {
    const sf_sysformer_layer *H = &t->sf->layers[i];
    const sf_cuda_sys_layer *L = &t->sl[i];
    const sys_saved *S = &t->ss[i];
    const int64_t d = t->sd, Ts = p->Ts, Tu = p->Tu;
    if (j == 2) {
        const int64_t ff = t->sff;
        SF_TRY(gemm_dw(t, grad_of(t, H->linear2_weight), NULL, true, gy16, d, S->f_act, ff, Ts,
                       d, ff));
        SF_TRY(colsum(t, grad_of(t, H->linear2_bias), gy, d, Ts, d));
        SF_TRY(gemm_dx(t, t->sdff, true, false, ff, gy16, d, L->l2_w, Ts, d, ff));
        if (t->sf->cfg.activation == SF_ACT_RELU) {
            SF_TRY(sf_cuda_relu_backward(t->sdff, false, t->sdff, S->f_act, Ts * ff, t->s));
        } else {
            SF_TRY(sf_cuda_gelu_backward(t->sdff, false, t->sdff, S->f_pre, Ts * ff, t->s));
        }
        SF_TRY(colsum(t, grad_of(t, H->linear1_bias), t->sdff, ff, Ts, ff));
        SF_TRY(sf_cuda_f32_to_bf16(t->sdff16, t->sdff, Ts * ff, t->s));
        SF_TRY(gemm_dw(t, grad_of(t, H->linear1_weight), NULL, true, t->sdff16, ff, h, d, Ts, ff,
                       d));
        return gemm_dx(t, dst, true, acc, d, t->sdff16, ff, L->l1_w, Ts, ff, d);
    }
    const sf_mha_weights *M = j == 0 ? &H->self_attn : &H->cross_attn;
    const sf_bf16 *in_w = j == 0 ? L->sa_in_w : L->ca_in_w;
    const sf_bf16 *out_w = j == 0 ? L->sa_out_w : L->ca_out_w;
    sf_bf16 *a = j == 0 ? S->a1 : S->a2;
    /* out_proj */
    SF_TRY(gemm_dw(t, grad_of(t, M->out_proj_weight), NULL, true, gy16, d, a, d, Ts, d, d));
    SF_TRY(colsum(t, grad_of(t, M->out_proj_bias), gy, d, Ts, d));
    SF_TRY(gemm_dx(t, t->da16, false, false, d, gy16, d, out_w, Ts, d, d));
    /* attention */
    sf_attention_args at;
    sys_attention_args(t, p, j == 1, &at);
    at.out = a;
    at.lse = j == 0 ? S->lse1 : S->lse2;
    sf_attention_grads g;
    memset(&g, 0, sizeof g);
    g.dout = t->da16;
    g.dout_stride = d;
    g.delta = t->delta;
    g.deterministic = t->deterministic;
    float *gin_w = grad_of(t, M->in_proj_weight), *gin_b = grad_of(t, M->in_proj_bias);
    if (j == 0) {
        at.q = S->qkv;
        at.k = S->qkv + d;
        at.v = S->qkv + 2 * d;
        at.q_stride = at.kv_stride = 3 * d;
        g.dq = t->sdqkv32;
        g.dk = t->sdqkv32 + d;
        g.dv = t->sdqkv32 + 2 * d;
        g.dq_stride = g.dkv_stride = 3 * d;
        g.max_kv_len = p->max_sys;
        SF_TRY(sf_cuda_attention_backward_bf16(&at, &g, t->s));
        /* q, k and v all project h: one GEMM each way over the stacked [3d, d] in_proj */
        SF_TRY(colsum(t, gin_b, t->sdqkv32, 3 * d, Ts, 3 * d));
        SF_TRY(sf_cuda_f32_to_bf16(t->sdqkv16, t->sdqkv32, Ts * 3 * d, t->s));
        SF_TRY(gemm_dw(t, gin_w, NULL, true, t->sdqkv16, 3 * d, h, d, Ts, 3 * d, d));
        return gemm_dx(t, dst, true, acc, d, t->sdqkv16, 3 * d, in_w, Ts, 3 * d, d);
    }
    at.q = S->cq;
    at.q_stride = d;
    at.k = S->ckv;
    at.v = S->ckv + d;
    at.kv_stride = 2 * d;
    g.dq = t->sdqkv32;
    g.dq_stride = d;
    g.dk = t->sdkv32;
    g.dv = t->sdkv32 + d;
    g.dkv_stride = 2 * d;
    g.max_kv_len = p->max_user;
    /* user rows of requests without system rows get no gradient (as on the CPU) */
    SF_CUDA_OR_FAIL(cudaMemsetAsync(t->sdkv32, 0, (size_t)(Tu * 2 * d) * sizeof(float), t->s));
    SF_TRY(sf_cuda_attention_backward_bf16(&at, &g, t->s));
    SF_TRY(colsum(t, gin_b, t->sdqkv32, d, Ts, d));
    SF_TRY(colsum(t, gin_b + d, t->sdkv32, 2 * d, Tu, 2 * d));
    SF_TRY(sf_cuda_f32_to_bf16(t->sdqkv16, t->sdqkv32, Ts * d, t->s));
    SF_TRY(sf_cuda_f32_to_bf16(t->sdkv16, t->sdkv32, Tu * 2 * d, t->s));
    SF_TRY(gemm_dw(t, gin_w, NULL, true, t->sdqkv16, d, h, d, Ts, d, d));
    SF_TRY(gemm_dw(t, gin_w + d * d, NULL, true, t->sdkv16, 2 * d, t->u, d, Tu, 2 * d, d));
    /* the keys and values come from the frozen user rows: only the queries reach h */
    return gemm_dx(t, dst, true, acc, d, t->sdqkv16, d, in_w, Ts, d, d);
}

/* gx holds dL/dS' on entry; the weight gradients are added into g. */
static sf_status sys_backward(sf_cuda_trainer *t, const plan *p) {
    const sf_sysformer *sf = t->sf;
    const int64_t Ts = p->Ts, d = t->sd;
    const float eps = t->seps;
    void *ws = t->norm_ws;
    const size_t wsb = t->norm_ws_bytes;
    if (t->final_w) {
        SF_TRY(sf_cuda_layernorm_backward(t->gx, false, grad_of(t, sf->final_norm_weight),
                                          grad_of(t, sf->final_norm_bias), t->gx,
                                          t->stream[3 * t->slayers], t->final_w, Ts, d, eps, ws,
                                          wsb, t->s));
    }
    for (int i = t->slayers - 1; i >= 0; i--) {
        const sf_sysformer_layer *H = &sf->layers[i];
        const sf_cuda_sys_layer *L = &t->sl[i];
        const sys_saved *S = &t->ss[i];
        for (int j = 2; j >= 0; j--) {
            const sf_bf16 *x = t->stream[3 * i + j];
            float *gw = grad_of(t, H->norm_weight[j]), *gb = grad_of(t, H->norm_bias[j]);
            if (sf->cfg.norm_first) {
                /* x' = x + B(LN(x)):  dx = gx + LN'^T (B'^T gx) */
                SF_TRY(sf_cuda_f32_to_bf16(t->gx16, t->gx, Ts * d, t->s));
                SF_TRY(sys_block_backward(t, p, i, j, t->gx, t->gx16, S->nrm[j], t->sdh, false));
                SF_TRY(sf_cuda_layernorm_backward(t->gx, true, gw, gb, t->sdh, x, L->norm_w[j],
                                                  Ts, d, eps, ws, wsb, t->s));
            } else {
                /* x' = LN(u), u = x + B(x):  du = LN'^T gx;  dx = du + B'^T du */
                SF_TRY(sf_cuda_layernorm_backward(t->gx, false, gw, gb, t->gx, S->nrm[j],
                                                  L->norm_w[j], Ts, d, eps, ws, wsb, t->s));
                SF_TRY(sf_cuda_f32_to_bf16(t->gx16, t->gx, Ts * d, t->s));
                SF_TRY(sys_block_backward(t, p, i, j, t->gx, t->gx16, x, t->gx, true));
            }
        }
    }
    return SF_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The frozen LLM: forward with saved activations, backward to the input embeddings         */
/* ---------------------------------------------------------------------------------------- */

static void llm_attention_args(const sf_cuda_trainer *t, const plan *p, const llm_saved *S,
                               sf_attention_args *at) {
    const sf_llm_config *c = &t->llm->cfg;
    memset(at, 0, sizeof *at);
    at->out = S->attn;
    at->lse = S->lse;
    at->q = S->qkv;
    at->k = S->qkv + t->q;
    at->v = S->qkv + t->q + t->kv;
    at->cu_q = at->cu_kv = t->io.cu;
    at->n_requests = p->n;
    at->max_q_len = p->max_len;
    at->n_heads = c->num_heads;
    at->n_kv_heads = c->num_kv_heads;
    at->head_dim = c->head_dim;
    at->q_stride = at->kv_stride = t->qkv;
    at->out_stride = t->q;
    at->causal = true;
    at->window = c->sliding_window;
    at->scale = (float)(1.0 / sqrt((double)c->head_dim)); /* backward_cpu.c's p.scale */
}

/* Layer l's saved set: its own, or the one set the recompute option refills per layer. */
static const llm_saved *saved(const sf_cuda_trainer *t, int l) {
    return &t->ls[t->recompute ? 0 : l];
}

/* Layer l over xs[l], filling its saved set and, when write_out, xs[l + 1] (the backward's
 * recomputation needs only the set). */
static sf_status llm_layer_forward(sf_cuda_trainer *t, const plan *p, int l, bool write_out) {
    const sf_llm_config *c = &t->llm->cfg;
    const sf_cuda_llm_layer *L = &t->e->layers[l];
    const llm_saved *S = saved(t, l);
    const int64_t T = p->T, d = t->d, ff = t->ff;
    const sf_bf16 *x = t->xs + (int64_t)l * t->T * d;
    sf_bf16 *x_out = t->xs + (int64_t)(l + 1) * t->T * d;
    SF_TRY(sf_cuda_rmsnorm_bf16(t->xn, NULL, x, NULL, L->attn_norm, T, d, c->rms_norm_eps, t->s));
    SF_TRY(gemm(t, S->qkv, false, t->qkv, t->xn, d, L->w_qkv, L->b_qkv, T, t->qkv, d,
                L->b_qkv ? SF_GEMM_BIAS : SF_GEMM_NONE));
    SF_TRY(sf_cuda_rope2_bf16(S->qkv, t->io.pos, t->io.rope_table, T,
                              c->num_heads + c->num_kv_heads, c->head_dim, t->qkv,
                              t->e->a.inv_freq, t->e->rope_scale[0], t->e->rope_scale[1], t->s));
    sf_attention_args at;
    llm_attention_args(t, p, S, &at);
    SF_TRY(sf_cuda_attention_bf16(&at, t->s));
    SF_TRY(gemm(t, t->tmp, false, d, S->attn, t->q, L->w_o, L->b_o, T, d, t->q,
                L->b_o ? SF_GEMM_BIAS : SF_GEMM_NONE));
    /* x_mid = x + o (rounded to bf16), xn = rmsnorm(x_mid) */
    SF_TRY(sf_cuda_rmsnorm_bf16(t->xn, S->x_mid, t->tmp, x, L->mlp_norm, T, d, c->rms_norm_eps,
                                t->s));
    SF_TRY(gemm(t, S->gate_up, false, 2 * ff, t->xn, d, L->w_gate_up, NULL, T, 2 * ff, d,
                SF_GEMM_NONE));
    if (!write_out) return SF_OK;
    SF_TRY(sf_cuda_swiglu_fused_bf16(t->act, S->gate_up, T, ff, t->s));
    SF_TRY(gemm(t, t->tmp, false, d, t->act, ff, L->w_down, NULL, T, d, ff, SF_GEMM_NONE));
    return sf_cuda_add_bf16(x_out, S->x_mid, t->tmp, T * d, t->s);
}

/* dx holds dL/d(layer output) and leaves holding dL/d(layer input). */
static sf_status llm_layer_backward(sf_cuda_trainer *t, const plan *p, int l) {
    const sf_llm_config *c = &t->llm->cfg;
    const sf_cuda_llm_layer *L = &t->e->layers[l];
    const llm_saved *S = saved(t, l);
    const int64_t T = p->T, d = t->d, ff = t->ff, q = t->q, qkv = t->qkv;
    const sf_bf16 *x = t->xs + (int64_t)l * t->T * d;
    /* MLP: out = x_mid + down(swiglu(gate_up)), gate_up = W . rmsnorm(x_mid) */
    SF_TRY(sf_cuda_f32_to_bf16(t->dx16, t->dx, T * d, t->s));
    SF_TRY(gemm_dx(t, t->dact, true, false, ff, t->dx16, d, L->w_down, T, d, ff));
    SF_TRY(sf_cuda_swiglu_fused_backward(t->dgu16, true, t->dact, S->gate_up, T, ff, t->s));
    SF_TRY(gemm_dx(t, t->dxn, true, false, d, t->dgu16, 2 * ff, L->w_gate_up, T, 2 * ff, d));
    SF_TRY(sf_cuda_rmsnorm_backward(t->dx, true, NULL, t->dxn, S->x_mid, L->mlp_norm, T, d,
                                    c->rms_norm_eps, NULL, 0, t->s));
    /* attention: x_mid = x + o(attention(rope(q), rope(k), v)), qkv = W . rmsnorm(x) */
    SF_TRY(sf_cuda_f32_to_bf16(t->dx16, t->dx, T * d, t->s));
    SF_TRY(gemm_dx(t, t->dattn16, false, false, q, t->dx16, d, L->w_o, T, d, q));
    sf_attention_args at;
    llm_attention_args(t, p, S, &at);
    sf_attention_grads g;
    memset(&g, 0, sizeof g);
    g.dout = t->dattn16;
    g.dout_stride = q;
    g.dq = t->dqkv32;
    g.dk = t->dqkv32 + q;
    g.dv = t->dqkv32 + q + t->kv;
    g.dq_stride = g.dkv_stride = qkv;
    g.delta = t->delta;
    g.deterministic = t->deterministic;
    g.max_kv_len = p->max_len;
    SF_TRY(sf_cuda_attention_backward_bf16(&at, &g, t->s));
    /* v's gradient converted as is; then q's and k's rotated back over their bf16 copies (the
     * rotation writes only the q and k heads of each row) */
    SF_TRY(sf_cuda_f32_to_bf16(t->dqkv16, t->dqkv32, T * qkv, t->s));
    SF_TRY(sf_cuda_rope2_backward(t->dqkv16, true, t->dqkv32, t->io.pos, t->io.rope_table, T,
                                  c->num_heads + c->num_kv_heads, c->head_dim, qkv,
                                  t->e->a.inv_freq, t->e->rope_scale[0], t->e->rope_scale[1],
                                  t->s));
    SF_TRY(gemm_dx(t, t->dxn, true, false, d, t->dqkv16, qkv, L->w_qkv, T, qkv, d));
    return sf_cuda_rmsnorm_backward(t->dx, true, NULL, t->dxn, x, L->attn_norm, T, d,
                                    c->rms_norm_eps, NULL, 0, t->s);
}

/* ---------------------------------------------------------------------------------------- */
/* The losses on the last hidden state                                                      */
/* ---------------------------------------------------------------------------------------- */

/* hx = rows of the last hidden state, hn = final_norm(hx). */
static sf_status head_rows(sf_cuda_trainer *t, const int32_t *d_rows, int64_t n) {
    const sf_llm_config *c = &t->llm->cfg;
    const sf_bf16 *xl = t->xs + (int64_t)c->num_layers * t->T * t->d;
    SF_TRY(sf_cuda_gather_rows_bf16(t->hx, t->d, xl, t->d, d_rows, n, t->d, t->s));
    return sf_cuda_rmsnorm_bf16(t->hn, NULL, t->hx, NULL, t->e->final_norm, n, t->d,
                                c->rms_norm_eps, t->s);
}

/* dh = dL/d(normed rows): back through the final norm and added into dx at the rows (which
 * are distinct within a chunk). */
static sf_status head_scatter(sf_cuda_trainer *t, const int32_t *d_rows, int64_t n) {
    const sf_llm_config *c = &t->llm->cfg;
    SF_TRY(gather_f32(t, t->hg, t->dx, d_rows, n, t->d));
    SF_TRY(sf_cuda_rmsnorm_backward(t->hg, true, NULL, t->dh, t->hx, t->e->final_norm, n, t->d,
                                    c->rms_norm_eps, NULL, 0, t->s));
    return scatter_f32(t, t->dx, t->hg, d_rows, n, t->d);
}

static sf_status ce_losses(sf_cuda_trainer *t, const sf_cuda_train_batch *b, bool backward,
                           int32_t *stamp) {
    const int64_t d = t->d, V = t->vocab;
    int32_t i0 = 0;
    while (i0 < b->n_ce) {
        const int32_t i1 = chunk_end(t, b->ce_rows, i0, b->n_ce, t->chunk, ++*stamp);
        const int64_t n = i1 - i0;
        const int32_t *rows = t->io.ce_rows + i0;
        SF_TRY(head_rows(t, rows, n));
        SF_TRY(gemm(t, t->logits, true, V, t->hn, d, t->e->lm_head, NULL, n, V, d,
                    SF_GEMM_NONE));
        SF_TRY(sf_cuda_cross_entropy(t->io.ce_loss + i0, t->io.ce_correct + i0,
                                     backward ? t->dlogits : NULL, true, t->logits, false,
                                     t->io.ce_targets + i0, t->io.ce_weights + i0, n,
                                     (int32_t)V, t->s));
        if (backward) {
            SF_TRY(gemm_dx(t, t->dh, true, false, d, t->dlogits, V, t->e->lm_head, n, V, d));
            SF_TRY(head_scatter(t, rows, n));
        }
        i0 = i1;
    }
    return SF_OK;
}

static sf_status class_losses(sf_cuda_trainer *t, const sf_cuda_train_batch *b, bool backward,
                              int32_t *stamp) {
    const int64_t d = t->d;
    bool first = true;
    int32_t i0 = 0;
    while (i0 < b->n_class) {
        const int32_t i1 = chunk_end(t, b->class_rows, i0, b->n_class, t->chunk, ++*stamp);
        const int64_t n = i1 - i0;
        const int32_t *rows = t->io.class_rows + i0;
        float *z = t->io.class_logits + 4 * (int64_t)i0;
        sf_bf16 *dz = t->dcls16 + 4 * (int64_t)i0;
        SF_TRY(head_rows(t, rows, n));
        /* columns 1 and 2 of each [n, 4] row: w . h twice */
        SF_TRY(gemm(t, z + 1, true, 4, t->hn, d, t->cls_w2, NULL, n, 2, d, SF_GEMM_NONE));
        SF_TRY(sf_cuda_cross_entropy(t->io.class_loss + 2 * (int64_t)i0, NULL,
                                     backward ? dz : NULL, true, z, false,
                                     t->io.class_targets + 2 * (int64_t)i0,
                                     t->io.class_weights + 2 * (int64_t)i0, 2 * n, 2, t->s));
        if (backward) {
            SF_TRY(gemm_dw(t, t->dcls_w2, t->dcls_b2, !first, dz + 1, 4, t->hn, d, n, 2, d));
            SF_TRY(gemm_dx(t, t->dh, true, false, d, dz + 1, 4, t->cls_w2, n, 2, d));
            SF_TRY(head_scatter(t, rows, n));
        }
        first = false;
        i0 = i1;
    }
    if (backward && b->n_class > 0) {
        /* the two copies of w (and of the logit's bias path) sum into the head's gradients */
        SF_TRY(colsum(t, grad_of(t, t->sf->classifier_weight), t->dcls_w2, d, 2, d));
        SF_TRY(colsum(t, grad_of(t, t->sf->classifier_bias), t->dcls_b2, 1, 2, 1));
    }
    return SF_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The step                                                                                 */
/* ---------------------------------------------------------------------------------------- */

/* Rounds the master weights into the per-tensor bf16 copies the forward reads. */
static sf_status refresh_bf16(sf_cuda_trainer *t) {
    const sf_sysformer *sf = t->sf;
    for (int64_t i = 0; i < t->n_tensors; i++) {
        SF_TRY(sf_cuda_f32_to_bf16(t->t_bf16[i], t->w32 + t->t_off[i], t->t_numel[i], t->s));
    }
    if (sf->classifier_weight) {
        const float *w = t->w32 + (sf->classifier_weight - sf->weights);
        SF_TRY(sf_cuda_f32_to_bf16(t->cls_w2, w, t->d, t->s));
        SF_TRY(sf_cuda_f32_to_bf16(t->cls_w2 + t->d, w, t->d, t->s));
    }
    return SF_OK;
}

/* Uploads weights [n_w] (through the pinned staging) as the master weights, and rounds them. */
static sf_status upload_weights(sf_cuda_trainer *t, const float *weights) {
    memcpy(t->h_w32, weights, (size_t)t->n_w * sizeof(float));
    const sf_sysformer *sf = t->sf;
    t->cls_b = sf->classifier_bias ? weights[sf->classifier_bias - sf->weights] : 0.0f;
    SF_CUDA_OR_FAIL(cudaMemcpyAsync(t->w32, t->h_w32, (size_t)t->n_w * sizeof(float),
                                    cudaMemcpyHostToDevice, t->s));
    return refresh_bf16(t);
}

/* Clip and AdamW over the gradient in g, then the bf16 refresh; the norm and the coefficient
 * land in t->stats and are copied to the pinned t->h_stats. Nothing waits for the host. */
static sf_status enqueue_update(sf_cuda_trainer *t, const sf_cuda_train_update *u) {
    sf_nvtx_push("train optimizer");
    sf_status st = sf_cuda_grad_norm(t->stats, t->g, t->n_w, u->clip_norm, t->gnorm_ws,
                                     t->gnorm_ws_bytes, t->s);
    if (st == SF_OK) {
        st = sf_cuda_adamw(t->w32, t->g, t->m, t->v, t->n_w, u->lr, &u->adamw, u->step,
                           t->stats + 1, t->s);
    }
    if (st == SF_OK) st = refresh_bf16(t);
    if (st == SF_OK) {
        const cudaError_t err = cudaMemcpyAsync(t->h_stats, t->stats, 2 * sizeof(double),
                                                cudaMemcpyDeviceToHost, t->s);
        if (err != cudaSuccess) {
            st = sf_fail(SF_ERR_CUDA, "sf_cuda_train_step: reading the gradient norm: %s",
                         cudaGetErrorString(err));
        }
    }
    if (st == SF_OK && t->sf->classifier_bias) {
        /* the next batch's classifier logits need the updated bias on the host */
        const float *b = t->w32 + (t->sf->classifier_bias - t->sf->weights);
        const cudaError_t err = cudaMemcpyAsync(t->h_cls_b, b, sizeof(float),
                                                cudaMemcpyDeviceToHost, t->s);
        if (err != cudaSuccess) {
            st = sf_fail(SF_ERR_CUDA, "sf_cuda_train_step: reading the classifier bias: %s",
                         cudaGetErrorString(err));
        }
    }
    sf_nvtx_pop();
    return st;
}

/* The forward: embeddings, the Sysformer on the system rows (S and S' copied to the host for
 * L_recon when recon_on), the LLM's layers. */
static sf_status enqueue_forward(sf_cuda_trainer *t, const plan *p, bool recon_on) {
    const sf_llm_config *c = &t->llm->cfg;
    const int64_t T = p->T, d = t->d, Ts = p->Ts;
    SF_TRY(sf_cuda_embedding_bf16(t->xs, t->e->embed, t->io.ids, T, d, c->vocab_size, NULL,
                                  t->s));
    if (Ts > 0) {
        const size_t bytes = (size_t)(Ts * d) * sizeof(sf_bf16);
        SF_TRY(sf_cuda_gather_rows_bf16(t->stream[0], d, t->xs, d, t->io.sys_rows, Ts, d, t->s));
        SF_TRY(sf_cuda_gather_rows_bf16(t->u, d, t->xs, d, t->io.user_rows, p->Tu, d, t->s));
        if (recon_on) {
            SF_CUDA_OR_FAIL(cudaMemcpyAsync(t->h_s, t->stream[0], bytes, cudaMemcpyDeviceToHost,
                                            t->s));
        }
        SF_TRY(add_offset(t, p));
        SF_TRY(sys_forward(t, p));
        SF_TRY(sf_cuda_scatter_rows_bf16(t->xs, d, t->s_out, d, t->io.sys_rows, Ts, d, t->s));
        if (recon_on) {
            SF_CUDA_OR_FAIL(cudaMemcpyAsync(t->h_sout, t->s_out, bytes, cudaMemcpyDeviceToHost,
                                            t->s));
            SF_CUDA_OR_FAIL(cudaEventRecord(t->recon_ready, t->s));
        }
    }
    for (int l = 0; l < c->num_layers; l++) SF_TRY(llm_layer_forward(t, p, l, true));
    return SF_OK;
}

/* The cross-entropy and classifier terms (and their gradients into dx when backward); their
 * values copied back to the host. */
static sf_status enqueue_losses(sf_cuda_trainer *t, const sf_cuda_train_batch *b,
                                const plan *p, bool backward) {
    const int64_t T = p->T, d = t->d;
    const size_t out_off = (size_t)((char *)t->io.ce_loss - (char *)t->io.ids);
    if (backward) SF_CUDA_OR_FAIL(cudaMemsetAsync(t->dx, 0, (size_t)(T * d) * sizeof(float), t->s));
    int32_t stamp = 0;
    for (int32_t i = 0; i < T; i++) t->h_seen[i] = 0;
    SF_TRY(ce_losses(t, b, backward, &stamp));
    SF_TRY(class_losses(t, b, backward, &stamp));
    SF_CUDA_OR_FAIL(cudaMemcpyAsync((char *)t->h.ids + out_off, (char *)t->io.ids + out_off,
                                    t->io.bytes - out_off, cudaMemcpyDeviceToHost, t->s));
    return SF_OK;
}

/* L_recon into *recon (0 when off), and with backward its gradient added to gx. */
static sf_status recon_term(sf_cuda_trainer *t, const sf_cuda_train_batch *b, const plan *p,
                            bool recon_on, bool backward, double *recon) {
    *recon = 0.0;
    if (!recon_on) return SF_OK;
    /* The CPU trainer's arithmetic, on the device's S' and S: the loss in double and
     * 2 scale (S' - S) rounded once to fp32. */
    SF_CUDA_OR_FAIL(cudaEventSynchronize(t->recon_ready));
    const int64_t n = p->Ts * t->d;
    const double scale = b->w_recon / (double)n;
    double sum = 0.0;
    for (int64_t k = 0; k < n; k++) {
        const double diff = (double)sf_bf16_to_f32(t->h_sout[k]) -
                            (double)sf_bf16_to_f32(t->h_s[k]);
        sum += diff * diff;
        t->h_grec[k] = (float)(2.0 * scale * diff);
    }
    *recon = scale * sum;
    if (backward) {
        SF_CUDA_OR_FAIL(cudaMemcpyAsync(t->grec, t->h_grec, (size_t)n * sizeof(float),
                                        cudaMemcpyHostToDevice, t->s));
        SF_TRY(colsum(t, t->gx, t->grec, n, 1, n));
    }
    return SF_OK;
}

/* The backward: the LLM's layers down to the input embeddings, L_recon's term, the Sysformer. */
static sf_status enqueue_backward(sf_cuda_trainer *t, const sf_cuda_train_batch *b,
                                  const plan *p, bool recon_on, double *recon) {
    const int64_t d = t->d, Ts = p->Ts;
    for (int l = t->llm->cfg.num_layers - 1; l >= 0; l--) {
        if (t->recompute) SF_TRY(llm_layer_forward(t, p, l, false));
        SF_TRY(llm_layer_backward(t, p, l));
    }
    if (Ts > 0) SF_TRY(gather_f32(t, t->gx, t->dx, t->io.sys_rows, Ts, d));
    SF_TRY(recon_term(t, b, p, recon_on, true, recon));
    if (Ts > 0) SF_TRY(sys_backward(t, p));
    if (Ts > 0) SF_TRY(add_offset_backward(t, p));
    return SF_OK;
}

/* Enqueues the whole pass; *recon is filled on the host in between when w_recon > 0. Each
 * stage is an NVTX range, closed on every path out. */
static sf_status enqueue(sf_cuda_trainer *t, const sf_cuda_train_batch *b, const plan *p,
                         bool backward, double *recon) {
    SF_CUDA_OR_FAIL(cudaMemcpyAsync(t->io.ids, t->h.ids, t->io.in_bytes, cudaMemcpyHostToDevice,
                                    t->s));
    /* a forward alone leaves the last gradient where sf_cuda_train_download_state finds it */
    if (backward) SF_CUDA_OR_FAIL(cudaMemsetAsync(t->g, 0, (size_t)t->n_w * sizeof(float), t->s));
    const bool recon_on = b->w_recon > 0.0 && p->Ts > 0;

    sf_nvtx_push("train forward");
    sf_status st = enqueue_forward(t, p, recon_on);
    sf_nvtx_pop();
    if (st != SF_OK) return st;

    sf_nvtx_push("train losses");
    st = enqueue_losses(t, b, p, backward);
    sf_nvtx_pop();
    if (st != SF_OK) return st;

    if (!backward) return recon_term(t, b, p, recon_on, false, recon);
    sf_nvtx_push("train backward");
    st = enqueue_backward(t, b, p, recon_on, recon);
    sf_nvtx_pop();
    return st;
}

/* A CUDA call's result as a status. */
static sf_status cuda_status(cudaError_t err, const char *what) {
    if (err == cudaSuccess) return SF_OK;
    return sf_fail(SF_ERR_CUDA, "%s: %s", what, cudaGetErrorString(err));
}

/* Drains the stream at the end of a call: on failure too, since nothing enqueued may outlive
 * the call's buffers. The first error wins. */
static sf_status finish(sf_cuda_trainer *t, sf_status st, const char *fn) {
    const cudaError_t err = cudaStreamSynchronize(t->s);
    if (st != SF_OK) return st;
    if (err != cudaSuccess) return sf_fail(SF_ERR_CUDA, "%s: %s", fn, cudaGetErrorString(err));
    return SF_OK;
}

/* The batch's loss terms from the pinned output block (after finish). */
static sf_llm_loss_result collect(const sf_cuda_trainer *t, const sf_cuda_train_batch *b) {
    sf_llm_loss_result res = {0};
    for (int32_t i = 0; i < b->n_ce; i++) {
        res.ce += t->h.ce_loss[i];
        res.ce_correct += t->h.ce_correct[i];
    }
    for (int32_t i = 0; i < 2 * b->n_class; i++) res.cls += t->h.class_loss[i];
    res.total = res.ce + res.cls;
    return res;
}

/* The start of a call over one batch: its outputs zeroed, the batch checked, the device set. */
static sf_status start_call(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                            sf_llm_loss_result *result, double *recon) {
    memset(result, 0, sizeof *result);
    if (recon) *recon = 0.0;
    SF_TRY(validate(t, batch));
    SF_CUDA_OR_FAIL(cudaSetDevice(t->e->device));
    return SF_OK;
}

/* Its end: the stream drained (finish), then the batch's loss terms and L_recon. */
static sf_status end_call(sf_cuda_trainer *t, sf_status st, const char *fn,
                          const sf_cuda_train_batch *batch, const plan *p, double rec,
                          sf_llm_loss_result *result, double *recon) {
    SF_TRY(finish(t, st, fn));
    if (p->T > 0) *result = collect(t, batch);
    if (recon) *recon = rec;
    return SF_OK;
}

sf_status sf_cuda_train_loss_grad(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                                  sf_llm_loss_result *result, double *recon, float *grads) {
    static const char fn[] = "sf_cuda_train_loss_grad";
    if (!t || !batch || !result) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL trainer, batch or result", fn);
    }
    SF_TRY(start_call(t, batch, result, recon));
    /* sf's current weights become the device's (the host optimizer's way of stepping) */
    sf_status st = upload_weights(t, t->sf->weights);
    plan p;
    stage_inputs(t, batch, &p);
    if (grads) t->last_coef = 1.0; /* g will hold a raw gradient (else it keeps the last one) */
    double rec = 0.0;
    if (st == SF_OK && p.T > 0) st = enqueue(t, batch, &p, grads != NULL, &rec);
    if (st == SF_OK && p.T == 0 && grads) {
        st = cuda_status(cudaMemsetAsync(t->g, 0, (size_t)t->n_w * sizeof(float), t->s), fn);
    }
    if (st == SF_OK && grads) {
        st = cuda_status(cudaMemcpyAsync(grads, t->g, (size_t)t->n_w * sizeof(float),
                                         cudaMemcpyDeviceToHost, t->s),
                         "sf_cuda_train_loss_grad: reading the gradients");
    }
    return end_call(t, st, fn, batch, &p, rec, result, recon);
}

sf_status sf_cuda_train_loss(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                             sf_llm_loss_result *result, double *recon) {
    static const char fn[] = "sf_cuda_train_loss";
    if (!t || !batch || !result) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL trainer, batch or result", fn);
    }
    SF_TRY(start_call(t, batch, result, recon));
    plan p;
    stage_inputs(t, batch, &p);
    double rec = 0.0;
    const sf_status st = p.T > 0 ? enqueue(t, batch, &p, false, &rec) : SF_OK;
    return end_call(t, st, fn, batch, &p, rec, result, recon);
}

/* Rounds one master tensor into the engine's bf16 copy (sf_cuda_weights_each_sysformer). */
static sf_status round_into_engine(void *user, sf_bf16 *dst, const float *src, size_t n) {
    sf_cuda_trainer *t = user;
    return sf_cuda_f32_to_bf16(dst, t->w32 + (src - t->sf->weights), (int64_t)n, t->s);
}

sf_status sf_cuda_train_generate(sf_cuda_trainer *t, const sf_tokenizer *tok,
                                 const sf_generation *gen, sf_generation_result *results) {
    static const char fn[] = "sf_cuda_train_generate";
    if (!t || !gen || !results) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL trainer, generation or results", fn);
    }
    if (!t->e->has_sysformer) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: the trainer was created without room for "
                       "generation (gen_slots 0)", fn);
    }
    SF_CUDA_OR_FAIL(cudaSetDevice(t->e->device));
    /* the engine's Sysformer becomes the master weights as they stand, rounded as an upload
     * of them would be; sf_generate_cuda runs on the same stream, after it */
    sf_status st = sf_cuda_weights_each_sysformer(t->e, t->sf, round_into_engine, t);
    if (st == SF_OK) st = sf_generate_cuda(t->e, tok, gen, NULL, NULL, results);
    return finish(t, st, fn);
}

static sf_status check_update(const sf_cuda_train_update *u) {
    const sf_adamw *h = &u->adamw;
    if (u->step < 1 || !(u->lr >= 0.0) || !isfinite(u->lr) ||
        !(h->beta1 >= 0.0 && h->beta1 < 1.0) || !(h->beta2 >= 0.0 && h->beta2 < 1.0) ||
        !(h->eps > 0.0) || !isfinite(h->eps) || !(h->weight_decay >= 0.0) ||
        !isfinite(h->weight_decay) || isnan(u->clip_norm)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_train_step: step %lld, lr %g, betas "
                       "(%g, %g), eps %g, weight decay %g, clip_norm %g", (long long)u->step,
                       u->lr, h->beta1, h->beta2, h->eps, h->weight_decay, u->clip_norm);
    }
    return SF_OK;
}

sf_status sf_cuda_train_step(sf_cuda_trainer *t, const sf_cuda_train_batch *batch,
                             const sf_cuda_train_update *update, sf_llm_loss_result *result,
                             double *recon, double *grad_norm) {
    static const char fn[] = "sf_cuda_train_step";
    if (!t || !batch || !update || !result) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL trainer, batch, update or result",
                       fn);
    }
    if (grad_norm) *grad_norm = 0.0;
    SF_TRY(start_call(t, batch, result, recon));
    SF_TRY(check_update(update));
    plan p;
    stage_inputs(t, batch, &p);
    double rec = 0.0;
    sf_status st = SF_OK;
    if (p.T > 0) {
        st = enqueue(t, batch, &p, true, &rec);
    } else { /* no rows: a zero gradient, and AdamW still decays and steps the moments */
        st = cuda_status(cudaMemsetAsync(t->g, 0, (size_t)t->n_w * sizeof(float), t->s), fn);
    }
    if (st == SF_OK) st = enqueue_update(t, update);
    SF_TRY(end_call(t, st, fn, batch, &p, rec, result, recon));
    if (grad_norm) *grad_norm = t->h_stats[0];
    t->last_coef = t->h_stats[1];
    if (t->sf->classifier_bias) t->cls_b = *t->h_cls_b;
    return SF_OK;
}

sf_status sf_cuda_train_upload_state(sf_cuda_trainer *t, const float *weights, const float *m,
                                     const float *v) {
    static const char fn[] = "sf_cuda_train_upload_state";
    if (!t || !weights) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL trainer or weights", fn);
    SF_CUDA_OR_FAIL(cudaSetDevice(t->e->device));
    const size_t bytes = (size_t)t->n_w * sizeof(float);
    sf_status st = upload_weights(t, weights);
    /* pageable sources: the driver copies them out before the call returns */
    if (st == SF_OK) {
        st = cuda_status(m ? cudaMemcpyAsync(t->m, m, bytes, cudaMemcpyHostToDevice, t->s)
                           : cudaMemsetAsync(t->m, 0, bytes, t->s), fn);
    }
    if (st == SF_OK) {
        st = cuda_status(v ? cudaMemcpyAsync(t->v, v, bytes, cudaMemcpyHostToDevice, t->s)
                           : cudaMemsetAsync(t->v, 0, bytes, t->s), fn);
    }
    SF_TRY(finish(t, st, fn));
    return SF_OK;
}

sf_status sf_cuda_train_download_state(sf_cuda_trainer *t, float *weights, float *m, float *v,
                                       float *grads) {
    static const char fn[] = "sf_cuda_train_download_state";
    if (!t) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL trainer", fn);
    SF_CUDA_OR_FAIL(cudaSetDevice(t->e->device));
    const size_t bytes = (size_t)t->n_w * sizeof(float);
    float *dst[4] = {weights, m, v, grads};
    const float *src[4] = {t->w32, t->m, t->v, t->g};
    sf_status st = SF_OK;
    for (int i = 0; st == SF_OK && i < 4; i++) {
        if (dst[i]) {
            st = cuda_status(cudaMemcpyAsync(dst[i], src[i], bytes, cudaMemcpyDeviceToHost, t->s),
                             fn);
        }
    }
    SF_TRY(finish(t, st, fn));
    /* g holds the gradient before clipping; AdamW saw it scaled as sf_clip_grad_norm scales */
    const double coef = t->last_coef;
    if (grads && coef < 1.0) {
        for (int64_t i = 0; i < t->n_w; i++) grads[i] = (float)((double)grads[i] * coef);
    }
    return SF_OK;
}
