/* The Sysformer trainer: batches, losses, AdamW, schedule, checkpoints, validation (the token
 * level), and datasets, cached replies and encoding (the text level). See trainer.h for the
 * contract and docs/SYSFORMER.md "Training" for the losses' normalisation and the files.
 *
 * Reproducibility is the design constraint throughout: a step depends only on the weights,
 * the optimizer moments, the step count and the batch, and a batch only on the epoch's
 * permutation (a Fisher-Yates shuffle of the identity drawn from the RNG state recorded at the
 * start of the epoch) and the position in it. Those few numbers are the checkpoint, so a run
 * resumed from one continues bit for bit as if it had never stopped (on the GPU: at any length
 * with the deterministic option, else while no attention sees more than 128 keys, past which
 * the attention backward's atomic dq sums may vary in their last bits; docs/SYSFORMER.md). */
#include "train/trainer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <jansson.h>

#include "core/error.h"
#include "core/file.h"
#include "core/rng.h"
#include "cpu/ops.h"
#include "cuda/train.h"
#include "eval/eval.h"
#include "io/safetensors.h"
#include "model/llm.h"
#include "sysformer/module.h"
#include "train/train.h"

/* Dataset and cache files: the largest shared dataset is ~4 MB; this only stops absurd ones. */
#define SF_DATASET_MAX_BYTES ((size_t)1 << 30)

static sf_status oom(const char *where) {
    return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", where);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ========================================================================================== */
/* Token-level training sets                                                                   */
/* ========================================================================================== */

sf_status sf_train_set_add(sf_train_set *set, const int32_t *prompt, int32_t n_prompt,
                           const sf_prompt_spans *spans, const int32_t *target, int32_t n_target,
                           bool harmful) {
    if (!set || !prompt || !spans || n_prompt < 1 || n_target < 0 || (n_target && !target)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_train_set_add: bad argument");
    }
    const sf_prompt_spans *s = spans;
    if (s->prefix < 0 || s->system < 1 || s->middle < 0 || s->user < 1 || s->suffix < 0 ||
        (int64_t)s->prefix + s->system + s->middle + s->user + s->suffix != n_prompt) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_train_set_add: spans %d+%d+%d+%d+%d do not split a %d-token prompt "
                       "with non-empty system and user spans",
                       s->prefix, s->system, s->middle, s->user, s->suffix, n_prompt);
    }
    if (set->n == set->cap_ex) {
        const int32_t cap = set->cap_ex ? 2 * set->cap_ex : 64;
        sf_train_example *ex = realloc(set->ex, (size_t)cap * sizeof *ex);
        if (!ex) return oom("sf_train_set_add");
        set->ex = ex;
        set->cap_ex = cap;
    }
    const int64_t need = set->n_ids + n_prompt + n_target;
    if (need > set->cap_ids) {
        int64_t cap = set->cap_ids ? 2 * set->cap_ids : 4096;
        while (cap < need) cap *= 2;
        int32_t *ids = realloc(set->ids, (size_t)cap * sizeof *ids);
        if (!ids) return oom("sf_train_set_add");
        set->ids = ids;
        set->cap_ids = cap;
    }
    sf_train_example *e = &set->ex[set->n++];
    e->offset = set->n_ids;
    e->n_prompt = n_prompt;
    e->n_target = n_target;
    e->spans = *spans;
    e->harmful = harmful;
    memcpy(set->ids + set->n_ids, prompt, (size_t)n_prompt * sizeof *prompt);
    if (n_target) {
        memcpy(set->ids + set->n_ids + n_prompt, target, (size_t)n_target * sizeof *target);
    }
    set->n_ids = need;
    return SF_OK;
}

void sf_train_set_free(sf_train_set *set) {
    if (!set) return;
    free(set->ex);
    free(set->ids);
    memset(set, 0, sizeof *set);
}

static uint64_t fnv_bytes(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001B3ull;
    }
    return h;
}

uint64_t sf_train_set_hash(const sf_train_set *set) {
    uint64_t h = 0xCBF29CE484222325ull;
    if (!set) return h;
    for (int32_t i = 0; i < set->n; i++) {
        const sf_train_example *e = &set->ex[i];
        const int32_t head[8] = {e->harmful, e->n_prompt, e->n_target, e->spans.prefix,
                                 e->spans.system, e->spans.middle, e->spans.user,
                                 e->spans.suffix};
        h = fnv_bytes(h, head, sizeof head);
        h = fnv_bytes(h, set->ids + e->offset,
                      (size_t)(e->n_prompt + e->n_target) * sizeof(int32_t));
    }
    return h;
}

/* ========================================================================================== */
/* Options, schedule, optimizer                                                                */
/* ========================================================================================== */

sf_train_options sf_train_default_options(void) {
    sf_train_options o;
    memset(&o, 0, sizeof o);
    o.w_ref = 1.0;
    o.w_compl = 1.0;
    o.w_class = 1.0;
    o.w_recon = 0.0;
    o.epochs = 10;
    o.batch_tokens = 1024;
    o.lr = 1e-4;
    o.schedule = SF_LR_COSINE;
    o.warmup_steps = -1;
    o.min_lr_ratio = 0.0;
    o.adamw.beta1 = 0.9;
    o.adamw.beta2 = 0.999;
    o.adamw.eps = 1e-8;
    o.adamw.weight_decay = 0.01;
    o.clip_norm = 1.0;
    o.seed = 0;
    o.validate_first = true;
    o.val_harmful_n = 16;
    o.val_harmless_n = 16;
    o.val_max_new_tokens = 32;
    o.val_batch = 8;
    return o;
}

double sf_train_lr_at(const sf_train_options *o, int64_t step, int64_t total_steps,
                      int64_t warmup) {
    if (step < warmup) return o->lr * (double)(step + 1) / (double)warmup;
    if (o->schedule == SF_LR_CONSTANT) return o->lr;
    const double span = (double)(total_steps - warmup > 0 ? total_steps - warmup : 1);
    double p = (double)(step - warmup) / span;
    if (p > 1.0) p = 1.0;
    const double lr_min = o->lr * o->min_lr_ratio;
    return lr_min + (o->lr - lr_min) * 0.5 * (1.0 + cos(3.14159265358979323846 * p));
}

/* The optimizer runs once per step over every Sysformer weight (10.6 M for SmolLM2's): cheap
 * beside a CPU step, but beside a GPU step it is not, so both loops below are spread over the
 * OpenMP threads. Each element's update is independent (the same bits whatever the thread
 * count); the norm sums fixed blocks of NORM_BLOCK squares, the blocks of a group in parallel
 * and the block sums in index order, so it too has the same bits for any thread count. */
#define NORM_BLOCK ((int64_t)1 << 14)
#define NORM_GROUP 256

double sf_clip_grad_norm(float *g, int64_t n, double max_norm) {
    double sq = 0.0;
    for (int64_t g0 = 0; g0 < n; g0 += NORM_BLOCK * NORM_GROUP) {
        double part[NORM_GROUP];
        const int64_t end = g0 + NORM_BLOCK * NORM_GROUP < n ? g0 + NORM_BLOCK * NORM_GROUP : n;
        const int nb = (int)((end - g0 + NORM_BLOCK - 1) / NORM_BLOCK);
        SF_OMP(omp parallel for schedule(static))
        for (int b = 0; b < nb; b++) {
            const int64_t i0 = g0 + (int64_t)b * NORM_BLOCK;
            const int64_t i1 = i0 + NORM_BLOCK < end ? i0 + NORM_BLOCK : end;
            double s = 0.0;
            for (int64_t i = i0; i < i1; i++) s += (double)g[i] * (double)g[i];
            part[b] = s;
        }
        for (int b = 0; b < nb; b++) sq += part[b];
    }
    const double norm = sqrt(sq);
    if (max_norm > 0.0) {
        const double coef = max_norm / (norm + 1e-6);
        if (coef < 1.0) {
            SF_OMP(omp parallel for schedule(static))
            for (int64_t i = 0; i < n; i++) g[i] = (float)((double)g[i] * coef);
        }
    }
    return norm;
}

void sf_adamw_step(float *w, const float *g, float *m, float *v, int64_t n, double lr,
                   const sf_adamw *hp, int64_t t) {
    const double b1 = hp->beta1, b2 = hp->beta2;
    const double bc1 = 1.0 - pow(b1, (double)t), bc2 = 1.0 - pow(b2, (double)t);
    const double decay = 1.0 - lr * hp->weight_decay;
    const double step_size = lr / bc1, inv_sqrt_bc2 = 1.0 / sqrt(bc2);
    /* Element by element in double: double keeps it equal to the formula (and to PyTorch's
     * float32 version to within rounding). */
    SF_OMP(omp parallel for schedule(static))
    for (int64_t i = 0; i < n; i++) {
        const double gi = g[i];
        const double mi = b1 * m[i] + (1.0 - b1) * gi;
        const double vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        m[i] = (float)mi;
        v[i] = (float)vi;
        const double denom = sqrt(vi) * inv_sqrt_bc2 + hp->eps;
        w[i] = (float)((double)w[i] * decay - step_size * mi / denom);
    }
}

/* ========================================================================================== */
/* The trainer                                                                                 */
/* ========================================================================================== */

struct sf_trainer {
    const sf_llm *llm;
    sf_sysformer *sf;
    const sf_tokenizer *tok;
    int32_t stop_ids[SF_MAX_EOS_IDS];
    int32_t n_stop_ids;
    const sf_train_set *train, *val;
    sf_train_options o;
    int64_t d;
    int64_t warmup, total_steps;
    uint64_t data_hash;
    /* optimizer state */
    sf_sysformer *grads; /* same layout as sf: gradient storage for the backward           */
    float *m, *v;        /* [n_weights] AdamW moments over sf_sysformer_flat's order        */
    int64_t n_weights;
    /* position: the checkpoint */
    int64_t step;
    int32_t epoch;
    int32_t position;    /* index into this epoch's permutation of the next example        */
    uint64_t epoch_rng;  /* the RNG state that draws this epoch's permutation               */
    int32_t *perm;       /* [train->n]                                                       */
    bool perm_ready;
    bool resumed;
    bool stepped;        /* grads hold the last step's gradient                             */
    sf_cuda_trainer *gpu;/* with SF_TRAIN_CUDA: runs each step (loss, gradient, AdamW)     */
    bool host_stale;     /* gpu holds newer weights and moments than sf, m and v            */
    bool grads_stale;    /* gpu holds a newer (clipped) gradient than grads                 */
    int32_t max_rows;    /* packed rows of the largest batch: what the memory plan covers   */
    double t_start;
    char *samples[2];    /* the last validation's first harmful and harmless replies        */
};

/* Does example e contribute anything with these weights, and does its reply take part? */
static bool uses_reply(const sf_train_options *o, const sf_train_example *e) {
    return e->n_target > 0 && (e->harmful ? o->w_ref : o->w_compl) > 0.0;
}
static bool contributes(const sf_train_options *o, const sf_train_example *e) {
    return uses_reply(o, e) || o->w_class > 0.0 || o->w_recon > 0.0;
}
static int32_t train_rows(const sf_train_options *o, const sf_train_example *e) {
    return e->n_prompt + (uses_reply(o, e) ? e->n_target : 0);
}

static void shuffle(int32_t *perm, int32_t n, uint64_t *rng_state) {
    sf_rng rng = {*rng_state};
    for (int32_t i = 0; i < n; i++) perm[i] = i;
    for (int32_t i = n - 1; i > 0; i--) {
        const int32_t j = (int32_t)(sf_rng_next(&rng) % (uint64_t)(i + 1));
        const int32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    *rng_state = rng.state;
}

/* The next batch from position pos of perm: the examples' indices into batch (capacity n),
 * their count returned, *next the position after it. Examples that contribute nothing are
 * passed over; an example longer than the budget is a batch of its own. */
static int32_t next_batch(const sf_trainer *t, const int32_t *perm, int32_t pos, int32_t *batch,
                          int32_t *next) {
    const sf_train_set *set = t->train;
    int32_t count = 0;
    int64_t rows = 0;
    while (pos < set->n) {
        const sf_train_example *e = &set->ex[perm[pos]];
        if (!contributes(&t->o, e)) {
            pos++;
            continue;
        }
        const int32_t len = train_rows(&t->o, e);
        if (count > 0 && rows + len > t->o.batch_tokens) break;
        if (batch) batch[count] = perm[pos];
        count++;
        rows += len;
        pos++;
    }
    *next = pos;
    return count;
}

/* Steps over all epochs from a fresh start, by replaying the shuffles: exact, and cheap. */
static int64_t count_total_steps(const sf_trainer *t, int32_t *perm) {
    uint64_t rng = t->o.seed;
    int64_t total = 0;
    for (int32_t e = 0; e < t->o.epochs; e++) {
        shuffle(perm, t->train->n, &rng);
        int32_t pos = 0;
        while (pos < t->train->n) {
            if (next_batch(t, perm, pos, NULL, &pos) > 0) total++;
        }
    }
    return total;
}

static sf_status check_set(const sf_train_set *set, const sf_llm_config *c, const char *name) {
    for (int32_t i = 0; i < set->n; i++) {
        const sf_train_example *e = &set->ex[i];
        const int64_t len = (int64_t)e->n_prompt + e->n_target;
        if (len > c->max_position_embeddings) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s example %d has %lld tokens; the LLM's "
                           "context window is %d", name, i, (long long)len,
                           c->max_position_embeddings);
        }
        for (int64_t k = 0; k < len; k++) {
            const int32_t id = set->ids[e->offset + k];
            if (id < 0 || id >= c->vocab_size) {
                return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s example %d: token id %d at %lld is "
                               "outside the vocabulary [0, %d)", name, i, id, (long long)k,
                               c->vocab_size);
            }
        }
    }
    return SF_OK;
}

/* With SF_TRAIN_CUDA validation runs on the device too: its loss batches (each at most
 * batch_tokens rows, or one example) must fit the device trainer's max_tokens, and greedy
 * generation for the judged prompts needs val_batch slots of the longest prompt plus
 * val_max_new_tokens positions in the trainer's engine. */
static void device_validation_room(const sf_trainer *t, sf_cuda_train_options *co) {
    const sf_train_set *val = t->val;
    if (!val) return;
    const sf_train_options *o = &t->o;
    int32_t longest = 0, judged[2] = {0, 0};
    for (int32_t i = 0; i < val->n; i++) {
        const sf_train_example *e = &val->ex[i];
        const int32_t rows = e->n_prompt + e->n_target;
        if (rows > co->max_tokens) co->max_tokens = rows;
        int32_t *seen = &judged[e->harmful ? 1 : 0];
        if (*seen < (e->harmful ? o->val_harmful_n : o->val_harmless_n)) {
            (*seen)++;
            if (e->n_prompt > longest) longest = e->n_prompt;
        }
    }
    if (!(o->judge || t->tok) || longest == 0) return;
    const int64_t context = (int64_t)longest + o->val_max_new_tokens;
    const int32_t max_pos = t->llm->cfg.max_position_embeddings;
    co->gen_slots = o->val_batch;
    co->gen_context = context < max_pos ? (int32_t)context : max_pos;
}

sf_status sf_trainer_create(const sf_llm *llm, sf_sysformer *sf, const sf_tokenizer *tok,
                            const int32_t *stop_ids, int32_t n_stop_ids,
                            const sf_train_set *train, const sf_train_set *val,
                            const sf_train_options *options, sf_trainer **out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_create: NULL out");
    *out = NULL;
    if (!llm || !sf || !train || !options || n_stop_ids < 0 || n_stop_ids > SF_MAX_EOS_IDS ||
        (n_stop_ids && !stop_ids)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_create: bad argument");
    }
    const sf_status whole = sf_llm_check_whole(llm, "sf_trainer_create");
    if (whole != SF_OK) return whole;
    const sf_train_options *o = options;
    if (train->n < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_create: the training set is empty");
    }
    if (!(o->w_ref >= 0 && o->w_compl >= 0 && o->w_class >= 0 && o->w_recon >= 0) ||
        o->w_ref + o->w_compl + o->w_class + o->w_recon <= 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_create: the loss weights must be "
                       ">= 0 and not all 0 (w_ref %g, w_compl %g, w_class %g, w_recon %g)",
                       o->w_ref, o->w_compl, o->w_class, o->w_recon);
    }
    if (o->epochs < 1 || o->batch_tokens < 1 || !(o->lr > 0) || !(o->min_lr_ratio >= 0) ||
        !(o->adamw.beta1 >= 0 && o->adamw.beta1 < 1) ||
        !(o->adamw.beta2 >= 0 && o->adamw.beta2 < 1) || !(o->adamw.eps > 0) ||
        !(o->adamw.weight_decay >= 0) || o->val_max_new_tokens < 1 || o->val_batch < 1 ||
        o->val_harmful_n < 0 || o->val_harmless_n < 0 ||
        (o->device != SF_TRAIN_CPU && o->device != SF_TRAIN_CUDA) || o->cuda_device < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_create: an option is out of range "
                       "(epochs, batch tokens, lr, betas, eps, weight decay, validation sizes)");
    }
    const sf_llm_config *c = sf_llm_get_config(llm);
    if (sf->cfg.d_model != c->hidden_size) {
        return sf_fail(SF_ERR_CONFIG, "sf_trainer_create: the Sysformer's d_model %d is not the "
                       "LLM's hidden size %d", sf->cfg.d_model, c->hidden_size);
    }
    if (o->w_class > 0 && !sf->classifier_weight) {
        return sf_fail(SF_ERR_CONFIG, "sf_trainer_create: w_class > 0 needs a Sysformer with a "
                       "classifier head (classifier.weight / classifier.bias)");
    }
    sf_status st = check_set(train, c, "training");
    if (st == SF_OK && val) st = check_set(val, c, "validation");
    if (st != SF_OK) return st;

    sf_trainer *t = calloc(1, sizeof *t);
    if (!t) return oom("sf_trainer_create");
    t->llm = llm;
    t->sf = sf;
    t->tok = tok;
    t->n_stop_ids = n_stop_ids;
    if (n_stop_ids) memcpy(t->stop_ids, stop_ids, (size_t)n_stop_ids * sizeof *stop_ids);
    t->train = train;
    t->val = val && val->n > 0 ? val : NULL;
    t->o = *o;
    t->d = c->hidden_size;
    t->data_hash = sf_train_set_hash(train);
    t->epoch_rng = o->seed;
    st = sf_sysformer_clone_zero(sf, &t->grads);
    int64_t n = 0;
    if (st == SF_OK) sf_sysformer_flat(sf, &n);
    t->n_weights = n;
    t->m = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    t->v = calloc((size_t)(n > 0 ? n : 1), sizeof(float));
    t->perm = malloc((size_t)train->n * sizeof *t->perm);
    if (st == SF_OK && (!t->m || !t->v || !t->perm)) st = oom("sf_trainer_create");
    if (st == SF_OK) {
        t->total_steps = count_total_steps(t, t->perm);
        if (t->total_steps < 1) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_create: no training example "
                         "contributes to a loss with these weights");
        }
        t->warmup = o->warmup_steps >= 0 ? o->warmup_steps : (t->total_steps * 5 + 99) / 100;
    }
    /* the longest batch: batch_tokens, or one example longer than that */
    t->max_rows = o->batch_tokens;
    for (int32_t i = 0; i < train->n; i++) {
        const int32_t r = train_rows(o, &train->ex[i]);
        if (contributes(o, &train->ex[i]) && r > t->max_rows) t->max_rows = r;
    }
    if (st == SF_OK && o->device == SF_TRAIN_CUDA) {
        sf_cuda_train_options co = sf_cuda_train_default_options();
        co.device = o->cuda_device;
        co.max_tokens = t->max_rows;
        co.recompute = o->recompute;
        co.deterministic = o->deterministic;
        device_validation_room(t, &co);
        st = sf_cuda_train_create(llm, sf, &co, &t->gpu);
    }
    if (st != SF_OK) {
        sf_trainer_free(t);
        return st;
    }
    *out = t;
    return SF_OK;
}

void sf_trainer_free(sf_trainer *t) {
    if (!t) return;
    sf_cuda_train_free(t->gpu);
    sf_sysformer_free(t->grads);
    free(t->m);
    free(t->v);
    free(t->perm);
    free(t->samples[0]);
    free(t->samples[1]);
    free(t);
}

sf_status sf_trainer_memory(const sf_trainer *t, sf_train_memory *out) {
    if (!t || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_memory: NULL");
    memset(out, 0, sizeof *out);
    out->max_rows = t->max_rows;
    out->recompute = t->o.recompute;
    out->optimizer = 3 * (size_t)t->n_weights * sizeof(float); /* gradients, m and v */
    if (t->gpu) {
        sf_cuda_train_memory m;
        const sf_status st = sf_cuda_train_memory_report(t->gpu, &m);
        if (st != SF_OK) return st;
        out->activations = m.activations;
        out->optimizer_device = m.optimizer;
        out->device_total = m.total;
        return SF_OK;
    }
    const sf_llm_backward_options bo = {t->o.recompute};
    out->activations = sf_llm_backward_bytes(t->llm, t->max_rows, &bo);
    return SF_OK;
}

/* With SF_TRAIN_CUDA the weights and AdamW's moments live on the device between steps; this
 * brings sf's weights and m, v up to date where the host reads them (validation, checkpoints,
 * the caller after sf_trainer_run). Exact fp32 copies, so nothing the host computes from them
 * differs from what the device holds. */
static sf_status sync_host(sf_trainer *t) {
    if (!t->gpu || !t->host_stale) return SF_OK;
    const sf_status st = sf_cuda_train_download_state(t->gpu, sf_sysformer_flat(t->sf, NULL),
                                                      t->m, t->v, NULL);
    if (st == SF_OK) t->host_stale = false;
    return st;
}

const float *sf_trainer_last_gradient(sf_trainer *t, int64_t *n) {
    if (n) *n = 0;
    if (!t || !t->stepped) return NULL;
    if (t->gpu && t->grads_stale) {
        float *g = sf_sysformer_flat(t->grads, NULL);
        if (sf_cuda_train_download_state(t->gpu, NULL, NULL, NULL, g) != SF_OK) return NULL;
        t->grads_stale = false;
    }
    return sf_sysformer_flat(t->grads, n);
}

int64_t sf_trainer_step(const sf_trainer *t) { return t ? t->step : 0; }
int64_t sf_trainer_total_steps(const sf_trainer *t) { return t ? t->total_steps : 0; }
int32_t sf_trainer_epoch(const sf_trainer *t) { return t ? t->epoch : 0; }

/* ------------------------------------------------------------------------------------------ */
/* One packed batch: the buffers both the training step and validation need                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct packed {
    int32_t n;          /* examples                                    */
    int64_t rows;       /* packed rows T                               */
    int32_t *ids;       /* [T]                                         */
    int32_t *cu;        /* [n + 1]                                     */
    int32_t *cu_sys;    /* [n + 1]                                     */
    int32_t *cu_usr;    /* [n + 1]                                     */
    float *embeds;      /* [T, d]: E[ids], then S' spliced in          */
    float *sys;         /* [Ns, d] S                                   */
    float *usr;         /* [Nu, d] U                                   */
    float *sys_out;     /* [Ns, d] S'                                  */
    int32_t *ce_rows, *ce_targets;
    float *ce_weights;
    int32_t n_ce;
    int32_t *class_rows;
    float *class_labels, *class_weights;
} packed;

static void packed_free(packed *p) {
    free(p->ids);
    free(p->cu);
    free(p->cu_sys);
    free(p->cu_usr);
    free(p->embeds);
    free(p->sys);
    free(p->usr);
    free(p->sys_out);
    free(p->ce_rows);
    free(p->ce_targets);
    free(p->ce_weights);
    free(p->class_rows);
    free(p->class_labels);
    free(p->class_weights);
    memset(p, 0, sizeof *p);
}

/* Packs the examples idx[0..n) of set (with_reply[i]: whether its reply rows go in) and, for
 * the CPU path (host_embeds), embeds them and gathers S and U; the device embeds for itself,
 * and embeds, sys, usr and sys_out then stay NULL. The loss rows are left to the caller. */
static sf_status pack(const sf_llm *llm, int64_t d, const sf_train_set *set, const int32_t *idx,
                      int32_t n, const bool *with_reply, bool host_embeds, packed *p) {
    memset(p, 0, sizeof *p);
    p->n = n;
    int64_t rows = 0, ns = 0, nu = 0, nce = 0;
    for (int32_t i = 0; i < n; i++) {
        const sf_train_example *e = &set->ex[idx[i]];
        rows += e->n_prompt + (with_reply[i] ? e->n_target : 0);
        ns += e->spans.system;
        nu += e->spans.user;
        if (with_reply[i]) nce += e->n_target;
    }
    if (n < 1 || rows < 1) return sf_fail(SF_ERR_INVALID_ARGUMENT, "trainer: an empty batch");
    if (rows > INT32_MAX) return sf_fail(SF_ERR_OUT_OF_RANGE, "trainer: batch too large");
    p->rows = rows;
    p->ids = calloc((size_t)rows, sizeof *p->ids);
    p->cu = malloc((size_t)(n + 1) * sizeof *p->cu);
    p->cu_sys = malloc((size_t)(n + 1) * sizeof *p->cu_sys);
    p->cu_usr = malloc((size_t)(n + 1) * sizeof *p->cu_usr);
    if (host_embeds) {
        p->embeds = malloc((size_t)(rows * d) * sizeof(float));
        p->sys = malloc((size_t)(ns * d) * sizeof(float) + sizeof(float));
        p->usr = malloc((size_t)(nu * d) * sizeof(float) + sizeof(float));
        p->sys_out = malloc((size_t)(ns * d) * sizeof(float) + sizeof(float));
    }
    p->ce_rows = malloc((size_t)(nce + 1) * sizeof(int32_t));
    p->ce_targets = malloc((size_t)(nce + 1) * sizeof(int32_t));
    p->ce_weights = malloc((size_t)(nce + 1) * sizeof(float));
    p->class_rows = malloc((size_t)n * sizeof(int32_t));
    p->class_labels = malloc((size_t)n * sizeof(float));
    p->class_weights = malloc((size_t)n * sizeof(float));
    if (!p->ids || !p->cu || !p->cu_sys || !p->cu_usr ||
        (host_embeds && (!p->embeds || !p->sys || !p->usr || !p->sys_out)) || !p->ce_rows ||
        !p->ce_targets || !p->ce_weights || !p->class_rows || !p->class_labels ||
        !p->class_weights) {
        packed_free(p);
        return oom("trainer: packing a batch");
    }
    p->cu[0] = p->cu_sys[0] = p->cu_usr[0] = 0;
    for (int32_t i = 0; i < n; i++) {
        const sf_train_example *e = &set->ex[idx[i]];
        const int32_t len = e->n_prompt + (with_reply[i] ? e->n_target : 0);
        memcpy(p->ids + p->cu[i], set->ids + e->offset, (size_t)len * sizeof(int32_t));
        p->cu[i + 1] = p->cu[i] + len;
        p->cu_sys[i + 1] = p->cu_sys[i] + e->spans.system;
        p->cu_usr[i + 1] = p->cu_usr[i] + e->spans.user;
    }
    if (!host_embeds) return SF_OK;
    sf_status st = sf_llm_embed(llm, p->ids, rows, p->embeds);
    for (int32_t i = 0; st == SF_OK && i < n; i++) {
        const sf_prompt_spans *s = &set->ex[idx[i]].spans;
        const int64_t sys0 = p->cu[i] + s->prefix, usr0 = sys0 + s->system + s->middle;
        memcpy(p->sys + p->cu_sys[i] * d, p->embeds + sys0 * d,
               (size_t)(s->system * d) * sizeof(float));
        memcpy(p->usr + p->cu_usr[i] * d, p->embeds + usr0 * d,
               (size_t)(s->user * d) * sizeof(float));
    }
    if (st != SF_OK) packed_free(p);
    return st;
}

/* Writes S' over the system rows of the embeddings. */
static void splice(const sf_train_set *set, const int32_t *idx, packed *p, int64_t d) {
    for (int32_t i = 0; i < p->n; i++) {
        const sf_prompt_spans *s = &set->ex[idx[i]].spans;
        memcpy(p->embeds + (p->cu[i] + s->prefix) * d, p->sys_out + p->cu_sys[i] * d,
               (size_t)(s->system * d) * sizeof(float));
    }
}

/* The LLM loss of a packed batch: its cross-entropy rows and, when cls, the Sysformer's
 * classifier head on each request's last prompt row. */
static sf_llm_loss_spec loss_spec(const sf_sysformer *sf, const packed *p, bool cls) {
    return (sf_llm_loss_spec){
        .n_ce = p->n_ce, .ce_rows = p->ce_rows, .ce_targets = p->ce_targets,
        .ce_weights = p->ce_weights,
        .n_class = cls ? p->n : 0, .class_rows = p->class_rows,
        .class_labels = p->class_labels, .class_weights = p->class_weights,
        .class_w = sf->classifier_weight,
        .class_b = sf->classifier_bias ? sf->classifier_bias[0] : 0.0f,
    };
}

/* Sum over the system rows of (S' - S)^2, in double. */
static double recon_sum(const packed *p, int64_t d) {
    double sum = 0.0;
    const int64_t n = (int64_t)p->cu_sys[p->n] * d;
    for (int64_t i = 0; i < n; i++) {
        const double diff = (double)p->sys_out[i] - (double)p->sys[i];
        sum += diff * diff;
    }
    return sum;
}

/* ------------------------------------------------------------------------------------------ */
/* The training step                                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef struct step_stats {
    double loss, ce, cls, recon, lr, grad_norm;
    int32_t rows;
} step_stats;

/* Clips the gradient in t->grads, steps AdamW and fills the step's statistics. */
static void apply_step(sf_trainer *t, const sf_llm_loss_result *res, double recon, int64_t rows,
                       step_stats *out) {
    const sf_train_options *o = &t->o;
    int64_t n_w = 0;
    float *w = sf_sysformer_flat(t->sf, &n_w);
    float *g = sf_sysformer_flat(t->grads, NULL);
    out->grad_norm = sf_clip_grad_norm(g, n_w, o->clip_norm);
    out->lr = sf_train_lr_at(o, t->step, t->total_steps, t->warmup);
    sf_adamw_step(w, g, t->m, t->v, n_w, out->lr, &o->adamw, t->step + 1);
    t->step++;
    t->stepped = true;
    out->ce = res->ce;
    out->cls = res->cls;
    out->recon = recon;
    out->loss = res->total + recon;
    out->rows = (int32_t)rows;
}

/* The device's view of the packed examples idx[0..p->n) of set with their loss rows (the
 * classifier's when cls): spans[i] gets example i's spans with its reply rows, if packed, in
 * the suffix. */
static sf_cuda_train_batch device_batch(const sf_train_set *set, const int32_t *idx,
                                        const packed *p, bool cls, double w_recon,
                                        sf_prompt_spans *spans) {
    for (int32_t i = 0; i < p->n; i++) {
        const sf_train_example *e = &set->ex[idx[i]];
        spans[i] = e->spans;
        spans[i].suffix += p->cu[i + 1] - p->cu[i] - e->n_prompt;
    }
    return (sf_cuda_train_batch){
        .n_requests = p->n, .ids = p->ids, .cu_seqlens = p->cu, .spans = spans,
        .n_ce = p->n_ce, .ce_rows = p->ce_rows, .ce_targets = p->ce_targets,
        .ce_weights = p->ce_weights,
        .n_class = cls ? p->n : 0, .class_rows = p->class_rows,
        .class_labels = p->class_labels, .class_weights = p->class_weights,
        .w_recon = w_recon,
    };
}

/* The whole step on the GPU, from the packed batch with its loss rows: the same terms and
 * weights as the CPU path below, then clipping and AdamW on the device's master weights and
 * moments with the schedule's lr (host/cuda/train.h); the host's copies fall behind. */
static sf_status gpu_step(sf_trainer *t, const int32_t *idx, const packed *p, step_stats *out) {
    const sf_train_options *o = &t->o;
    sf_prompt_spans *spans = malloc((size_t)p->n * sizeof *spans);
    if (!spans) return oom("trainer step");
    const sf_cuda_train_batch b =
        device_batch(t->train, idx, p, o->w_class > 0.0, o->w_recon, spans);
    sf_cuda_train_update u;
    memset(&u, 0, sizeof u);
    u.lr = sf_train_lr_at(o, t->step, t->total_steps, t->warmup);
    u.step = t->step + 1;
    u.adamw = o->adamw;
    u.clip_norm = o->clip_norm;
    sf_llm_loss_result res;
    double recon = 0.0, norm = 0.0;
    sf_status st = sf_cuda_train_step(t->gpu, &b, &u, &res, &recon, &norm);
    free(spans);
    if (st != SF_OK) return st;
    t->host_stale = t->grads_stale = true;
    t->step++;
    t->stepped = true;
    out->grad_norm = norm;
    out->lr = u.lr;
    out->ce = res.ce;
    out->cls = res.cls;
    out->recon = recon;
    out->loss = res.total + recon;
    out->rows = (int32_t)p->rows;
    return SF_OK;
}

static sf_status train_step(sf_trainer *t, const int32_t *idx, int32_t n, step_stats *out) {
    const sf_train_set *set = t->train;
    const sf_train_options *o = &t->o;
    const int64_t d = t->d;
    bool *with_reply = malloc((size_t)n * sizeof *with_reply);
    if (!with_reply) return oom("trainer step");
    int32_t n_ref = 0, n_compl = 0;
    for (int32_t i = 0; i < n; i++) {
        const sf_train_example *e = &set->ex[idx[i]];
        with_reply[i] = uses_reply(o, e);
        if (with_reply[i]) *(e->harmful ? &n_ref : &n_compl) += 1;
    }
    packed p;
    sf_status st = pack(t->llm, d, set, idx, n, with_reply, t->gpu == NULL, &p);
    if (st != SF_OK) {
        free(with_reply);
        return st;
    }
    /* The loss rows: each reply token is predicted by the row before it (teacher forcing);
     * the classifier reads the last prompt row. Weights make each term a mean over its
     * examples of a mean over the example's tokens (docs/SYSFORMER.md "Training"). */
    for (int32_t i = 0; i < n; i++) {
        const sf_train_example *e = &set->ex[idx[i]];
        const int32_t last = p.cu[i] + e->n_prompt - 1;
        if (with_reply[i]) {
            const double w = e->harmful ? o->w_ref / n_ref : o->w_compl / n_compl;
            for (int32_t j = 0; j < e->n_target; j++) {
                p.ce_rows[p.n_ce] = last + j;
                p.ce_targets[p.n_ce] = p.ids[last + j + 1];
                p.ce_weights[p.n_ce] = (float)(w / e->n_target);
                p.n_ce++;
            }
        }
        p.class_rows[i] = last;
        p.class_labels[i] = e->harmful ? 1.0f : 0.0f;
        p.class_weights[i] = (float)(o->w_class / n);
    }
    if (t->gpu) {
        st = gpu_step(t, idx, &p, out);
        free(with_reply);
        packed_free(&p);
        return st;
    }
    const int64_t ns = p.cu_sys[n];
    float *d_embeds = calloc((size_t)(p.rows * d), sizeof(float));
    float *d_sys = malloc((size_t)(ns * d) * sizeof(float) + sizeof(float));
    sf_sysformer_tape *tape = NULL;
    if (!d_embeds || !d_sys) st = oom("trainer step");
    sf_rewrite_batch rb = {n, p.cu_sys, p.cu_usr, p.sys, p.usr};
    if (st == SF_OK) st = sf_sysformer_forward_train(t->sf, &rb, p.sys_out, &tape);
    int64_t n_flat = 0;
    float *g = sf_sysformer_flat(t->grads, &n_flat);
    sf_llm_loss_result res;
    memset(&res, 0, sizeof res);
    if (st == SF_OK) {
        splice(set, idx, &p, d);
        memset(g, 0, (size_t)n_flat * sizeof(float));
        const bool cls = o->w_class > 0.0;
        const sf_llm_loss_spec spec = loss_spec(t->sf, &p, cls);
        sf_llm_backward_options bo = {o->recompute};
        st = sf_llm_loss_backward_cpu(t->llm, n, p.cu, p.embeds, &spec, &bo, &res, d_embeds,
                                      cls ? t->grads->classifier_weight : NULL,
                                      cls ? t->grads->classifier_bias : NULL);
    }
    double recon = 0.0;
    if (st == SF_OK) {
        /* dL/dS' is the LLM's input gradient at the system rows, plus L_recon's. */
        for (int32_t i = 0; i < n; i++) {
            const sf_prompt_spans *s = &set->ex[idx[i]].spans;
            memcpy(d_sys + p.cu_sys[i] * d, d_embeds + (p.cu[i] + s->prefix) * d,
                   (size_t)(s->system * d) * sizeof(float));
        }
        if (o->w_recon > 0.0 && ns > 0) {
            const double scale = o->w_recon / (double)(ns * d);
            recon = scale * recon_sum(&p, d);
            for (int64_t k = 0; k < ns * d; k++) {
                d_sys[k] += (float)(2.0 * scale * ((double)p.sys_out[k] - (double)p.sys[k]));
            }
        }
        st = sf_sysformer_backward(t->sf, tape, d_sys, t->grads);
    }
    sf_sysformer_tape_free(tape);
    if (st == SF_OK) apply_step(t, &res, recon, p.rows, out);
    free(d_embeds);
    free(d_sys);
    free(with_reply);
    packed_free(&p);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Validation                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* The losses over examples idx[0..n) of the validation set, all of one kind, added to sums:
 * [0] sum over examples of the mean reply-token CE, [1] examples with a reply, [2] sum of BCE,
 * [3] sum of squared S' - S, [4] system elements. */
static sf_status val_losses(sf_trainer *t, const int32_t *idx, int32_t n, double *sums) {
    const sf_train_set *set = t->val;
    const int64_t d = t->d;
    bool *with_reply = malloc((size_t)n * sizeof *with_reply);
    if (!with_reply) return oom("trainer validation");
    for (int32_t i = 0; i < n; i++) with_reply[i] = set->ex[idx[i]].n_target > 0;
    packed p;
    sf_status st = pack(t->llm, d, set, idx, n, with_reply, t->gpu == NULL, &p);
    free(with_reply);
    if (st != SF_OK) return st;
    for (int32_t i = 0; i < n; i++) {
        const sf_train_example *e = &set->ex[idx[i]];
        const int32_t last = p.cu[i] + e->n_prompt - 1;
        for (int32_t j = 0; j < e->n_target; j++) {
            p.ce_rows[p.n_ce] = last + j;
            p.ce_targets[p.n_ce] = p.ids[last + j + 1];
            p.ce_weights[p.n_ce] = 1.0f / (float)e->n_target;
            p.n_ce++;
        }
        if (e->n_target > 0) sums[1] += 1.0;
        p.class_rows[i] = last;
        p.class_labels[i] = e->harmful ? 1.0f : 0.0f;
        p.class_weights[i] = 1.0f;
    }
    const bool cls = t->sf->classifier_weight != NULL;
    const double elems = (double)p.cu_sys[n] * (double)d;
    sf_llm_loss_result res;
    double sq = 0.0; /* sum of (S' - S)^2 */
    if (t->gpu) {
        /* the device's master weights as they stand; w_recon 1: the mean over the elements */
        sf_prompt_spans *spans = malloc((size_t)n * sizeof *spans);
        double recon = 0.0;
        st = spans ? SF_OK : oom("trainer validation");
        if (st == SF_OK) {
            const sf_cuda_train_batch b = device_batch(set, idx, &p, cls, 1.0, spans);
            st = sf_cuda_train_loss(t->gpu, &b, &res, &recon);
        }
        free(spans);
        sq = recon * elems;
    } else {
        sf_rewrite_batch rb = {n, p.cu_sys, p.cu_usr, p.sys, p.usr};
        st = sf_sysformer_forward_cpu(t->sf, &rb, p.sys_out);
        if (st == SF_OK) {
            splice(set, idx, &p, d);
            const sf_llm_loss_spec spec = loss_spec(t->sf, &p, cls);
            sf_llm_backward_options bo = {t->o.recompute};
            st = sf_llm_loss_backward_cpu(t->llm, n, p.cu, p.embeds, &spec, &bo, &res, NULL,
                                          NULL, NULL);
            sq = recon_sum(&p, d);
        }
    }
    if (st == SF_OK) {
        sums[0] += res.ce;
        sums[2] += res.cls;
        sums[3] += sq;
        sums[4] += elems;
    }
    packed_free(&p);
    return st;
}

/* Generates greedy replies (with the Sysformer) for examples idx[0..n) and counts refusals. */
static sf_status val_refusals(sf_trainer *t, const int32_t *idx, int32_t n, int32_t *refused,
                              char **sample) {
    const sf_train_set *set = t->val;
    const int32_t B = t->o.val_batch;
    int32_t *ids = NULL, *cu = malloc((size_t)(B + 1) * sizeof *cu);
    sf_prompt_spans *spans = malloc((size_t)B * sizeof *spans);
    sf_generation_result *res = calloc((size_t)B, sizeof *res);
    sf_status st = (cu && spans && res) ? SF_OK : oom("trainer validation");
    for (int32_t b0 = 0; st == SF_OK && b0 < n; b0 += B) {
        const int32_t nb = n - b0 < B ? n - b0 : B;
        int64_t rows = 0;
        for (int32_t i = 0; i < nb; i++) rows += set->ex[idx[b0 + i]].n_prompt;
        int32_t *grown = realloc(ids, (size_t)rows * sizeof *ids);
        if (!grown) {
            st = oom("trainer validation");
            break;
        }
        ids = grown;
        cu[0] = 0;
        for (int32_t i = 0; i < nb; i++) {
            const sf_train_example *e = &set->ex[idx[b0 + i]];
            memcpy(ids + cu[i], set->ids + e->offset, (size_t)e->n_prompt * sizeof *ids);
            cu[i + 1] = cu[i] + e->n_prompt;
            spans[i] = e->spans;
        }
        sf_generation g;
        memset(&g, 0, sizeof g);
        g.n_requests = nb;
        g.cu_seqlens = cu;
        g.token_ids = ids;
        g.spans = spans;
        g.max_new_tokens = t->o.val_max_new_tokens;
        g.stop_ids = t->stop_ids;
        g.n_stop_ids = t->n_stop_ids;
        st = t->gpu ? sf_cuda_train_generate(t->gpu, t->tok, &g, res)
                    : sf_generate_cpu(t->llm, t->sf, t->tok, &g, NULL, NULL, res);
        if (st != SF_OK) break;
        for (int32_t i = 0; i < nb; i++) {
            bool r = t->o.judge ? t->o.judge(t->o.judge_user, res[i].tokens, res[i].n_tokens,
                                             res[i].text)
                                : sf_judge_refusal(res[i].text);
            *refused += r;
            if (sample && !*sample && res[i].text) {
                *sample = res[i].text;
                res[i].text = NULL; /* handed over */
            }
            sf_generation_result_free(&res[i]);
        }
    }
    free(ids);
    free(cu);
    free(spans);
    free(res);
    return st;
}

sf_status sf_trainer_validate(sf_trainer *t, sf_train_event *ev) {
    if (!t || !ev) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_validate: NULL");
    memset(ev, 0, sizeof *ev);
    ev->kind = SF_TRAIN_EVENT_VALIDATION;
    ev->epoch = t->epoch;
    ev->step = t->step;
    ev->total_steps = t->total_steps;
    ev->refusal_harmful = ev->refusal_harmless = -1.0;
    if (!t->val) return SF_OK;
    /* With SF_TRAIN_CUDA the losses and the generation run on the device's master weights:
     * nothing needs sf's host copy. */
    sf_status st = SF_OK;
    const sf_train_set *set = t->val;
    const int32_t n = set->n;
    int32_t *idx = malloc((size_t)n * sizeof *idx);
    if (!idx) return oom("trainer validation");
    /* Harmful and harmless examples go in separate batches, so that the two reply terms come
     * out of the loss function's single cross-entropy sum separately. */
    double sums[2][5] = {{0}};
    for (int kind = 0; st == SF_OK && kind < 2; kind++) {
        int32_t count = 0;
        for (int32_t i = 0; i < n; i++) {
            if (set->ex[i].harmful == (kind == 1)) idx[count++] = i;
        }
        int32_t start = 0;
        while (st == SF_OK && start < count) {
            int32_t end = start;
            int64_t rows = 0;
            while (end < count) {
                const sf_train_example *e = &set->ex[idx[end]];
                const int32_t len = e->n_prompt + e->n_target;
                if (end > start && rows + len > t->o.batch_tokens) break;
                rows += len;
                end++;
            }
            st = val_losses(t, idx + start, end - start, sums[kind]);
            start = end;
        }
    }
    if (st == SF_OK) {
        ev->val_ref = sums[1][1] > 0 ? sums[1][0] / sums[1][1] : 0.0;
        ev->val_compl = sums[0][1] > 0 ? sums[0][0] / sums[0][1] : 0.0;
        ev->val_class = n > 0 ? (sums[0][2] + sums[1][2]) / n : 0.0;
        const double elems = sums[0][4] + sums[1][4];
        ev->val_recon = elems > 0 ? (sums[0][3] + sums[1][3]) / elems : 0.0;
        ev->val_total = t->o.w_ref * ev->val_ref + t->o.w_compl * ev->val_compl +
                        t->o.w_class * ev->val_class + t->o.w_recon * ev->val_recon;
    }
    /* Refusal rates: the first val_harmful_n harmful and val_harmless_n harmless prompts. */
    const bool judged = t->o.judge || t->tok;
    char *samples[2] = {NULL, NULL};
    for (int kind = 0; st == SF_OK && judged && kind < 2; kind++) {
        const int32_t want = kind == 1 ? t->o.val_harmful_n : t->o.val_harmless_n;
        int32_t count = 0;
        for (int32_t i = 0; i < n && count < want; i++) {
            if (set->ex[i].harmful == (kind == 1)) idx[count++] = i;
        }
        if (count == 0) continue;
        int32_t refused = 0;
        st = val_refusals(t, idx, count, &refused, &samples[kind]);
        if (kind == 1) {
            ev->n_judged_harmful = count;
            ev->refusal_harmful = (double)refused / count;
        } else {
            ev->n_judged_harmless = count;
            ev->refusal_harmless = (double)refused / count;
        }
    }
    free(idx);
    /* The samples live in the trainer until the next validation: the event borrows them. */
    free(t->samples[0]);
    free(t->samples[1]);
    t->samples[0] = samples[1];
    t->samples[1] = samples[0];
    ev->sample_harmful = t->samples[0];
    ev->sample_harmless = t->samples[1];
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Checkpoints                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static const char k_state_file[] = "train_state.safetensors";

static char *join(const char *dir, const char *name) {
    const size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* The counters, in the order of k_counter_names; uint64 values stored as their int64 bits. */
static const char *const k_counter_names[] = {"step", "epoch", "position", "rng_state", "seed",
                                              "data_hash", "total_steps"};
enum { N_COUNTERS = 7 };

sf_status sf_trainer_checkpoint(sf_trainer *t, const char *dir) {
    if (!t || !dir) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_checkpoint: NULL");
    sf_status st = sync_host(t);
    if (st != SF_OK) return st;
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        return sf_fail(SF_ERR_IO, "%s: cannot create the directory: %s", dir, strerror(errno));
    }
    st = sf_sysformer_save(t->sf, dir);
    if (st != SF_OK) return st;
    int64_t n = 0;
    float *w = sf_sysformer_flat(t->sf, &n);
    int64_t counters[N_COUNTERS] = {t->step, t->epoch, t->position, (int64_t)t->epoch_rng,
                                    (int64_t)t->o.seed, (int64_t)t->data_hash, t->total_steps};
    sf_st_entry e[3 + N_COUNTERS];
    memset(e, 0, sizeof e);
    const char *names[3] = {"weights", "adam_m", "adam_v"};
    const float *data[3] = {w, t->m, t->v};
    for (int i = 0; i < 3; i++) {
        e[i].name = names[i];
        e[i].dtype = SF_DTYPE_F32;
        e[i].ndim = 1;
        e[i].shape[0] = n;
        e[i].data = data[i];
    }
    for (int i = 0; i < N_COUNTERS; i++) {
        e[3 + i].name = k_counter_names[i];
        e[3 + i].dtype = SF_DTYPE_I64;
        e[3 + i].ndim = 1;
        e[3 + i].shape[0] = 1;
        e[3 + i].data = &counters[i];
    }
    const char *meta[] = {"format", "sysformer-train-state", "version", "1", NULL};
    char *path = join(dir, k_state_file), *tmp = join(dir, "train_state.safetensors.tmp");
    if (!path || !tmp) st = oom("sf_trainer_checkpoint");
    /* Written aside, then renamed: a run killed mid-write leaves the previous state whole. The
     * state holds the weights too, so it never pairs moments with other weights. */
    if (st == SF_OK) st = sf_st_write(tmp, e, 3 + N_COUNTERS, meta);
    if (st == SF_OK && rename(tmp, path) != 0) {
        st = sf_fail(SF_ERR_IO, "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    }
    free(path);
    free(tmp);
    return st;
}

sf_status sf_trainer_resume(sf_trainer *t, const char *dir) {
    if (!t || !dir) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_resume: NULL");
    char *path = join(dir, k_state_file);
    if (!path) return oom("sf_trainer_resume");
    sf_st_archive *ar = NULL;
    sf_status st = sf_st_open(path, &ar);
    int64_t n = 0;
    float *w = sf_sysformer_flat(t->sf, &n);
    const int64_t shape_w[1] = {n}, shape_1[1] = {1};
    const sf_st_tensor *tw[3] = {NULL, NULL, NULL}, *tc[N_COUNTERS];
    const char *names[3] = {"weights", "adam_m", "adam_v"};
    for (int i = 0; st == SF_OK && i < 3; i++) {
        st = sf_st_get(ar, names[i], 1, shape_w, &tw[i]);
        if (st == SF_OK && tw[i]->dtype != SF_DTYPE_F32) {
            st = sf_fail(SF_ERR_FORMAT, "%s: %s must be F32", path, names[i]);
        }
    }
    if (st == SF_ERR_SHAPE) {
        st = sf_fail(SF_ERR_CONFIG, "%s: the checkpoint holds a Sysformer of another shape "
                     "(this one has %lld weights)", path, (long long)n);
    }
    int64_t c[N_COUNTERS];
    for (int i = 0; st == SF_OK && i < N_COUNTERS; i++) {
        st = sf_st_get(ar, k_counter_names[i], 1, shape_1, &tc[i]);
        if (st == SF_OK && tc[i]->dtype != SF_DTYPE_I64) {
            st = sf_fail(SF_ERR_FORMAT, "%s: %s must be I64", path, k_counter_names[i]);
        }
        if (st == SF_OK) memcpy(&c[i], tc[i]->data, sizeof c[i]);
    }
    if (st == SF_OK && (uint64_t)c[4] != t->o.seed) {
        st = sf_fail(SF_ERR_CONFIG, "%s: the checkpoint was made with seed %llu, not %llu",
                     path, (unsigned long long)c[4], (unsigned long long)t->o.seed);
    }
    if (st == SF_OK && (uint64_t)c[5] != t->data_hash) {
        st = sf_fail(SF_ERR_CONFIG, "%s: the training examples differ from the checkpoint's "
                     "(other data, sample sizes, template, system prompt or tokenizer?)", path);
    }
    if (st == SF_OK && (c[0] < 0 || c[1] < 0 || c[1] > t->o.epochs || c[2] < 0 ||
                        c[2] > t->train->n || (c[1] == t->o.epochs && c[2] != 0))) {
        st = sf_fail(SF_ERR_CONFIG, "%s: step %lld, epoch %lld, position %lld do not fit a run "
                     "of %d epochs over %d examples", path, (long long)c[0], (long long)c[1],
                     (long long)c[2], t->o.epochs, t->train->n);
    }
    if (st == SF_OK) {
        st = sf_st_to_f32(tw[0], w);
        if (st == SF_OK) st = sf_st_to_f32(tw[1], t->m);
        if (st == SF_OK) st = sf_st_to_f32(tw[2], t->v);
    }
    if (t->gpu) {
        /* The device's state is the trainer's: the checkpoint's goes up (exact fp32 copies, so
         * the run continues as it would have, bit for bit where the GPU's steps are; see the
         * top of this file). A resume that failed keeps the device's state, and
         * the host copies, which it may have overwritten in part, follow it at the next
         * synchronisation. */
        if (st == SF_OK) st = sf_cuda_train_upload_state(t->gpu, w, t->m, t->v);
        t->host_stale = st != SF_OK;
    }
    if (st == SF_OK) {
        t->step = c[0];
        t->epoch = (int32_t)c[1];
        t->position = (int32_t)c[2];
        t->epoch_rng = (uint64_t)c[3];
        t->perm_ready = false;
        t->resumed = true;
    }
    sf_st_close(ar);
    free(path);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* The loop                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static bool emit(sf_trainer *t, sf_train_event *ev) {
    return t->o.on_event ? t->o.on_event(t->o.user, ev) : true;
}

/* Validation (with a validation set) and its event. */
static sf_status validate_and_report(sf_trainer *t, bool *stop) {
    if (!t->val) return SF_OK;
    sf_train_event ev;
    sf_status st = sf_trainer_validate(t, &ev);
    if (st != SF_OK) return st;
    ev.seconds = now_seconds() - t->t_start;
    if (!emit(t, &ev)) *stop = true;
    return SF_OK;
}

static sf_status checkpoint_and_report(sf_trainer *t, bool *stop) {
    if (!t->o.out_dir) return SF_OK;
    sf_status st = sf_trainer_checkpoint(t, t->o.out_dir);
    if (st != SF_OK) return st;
    sf_train_event ev;
    memset(&ev, 0, sizeof ev);
    ev.kind = SF_TRAIN_EVENT_CHECKPOINT;
    ev.epoch = t->epoch;
    ev.step = t->step;
    ev.total_steps = t->total_steps;
    ev.path = t->o.out_dir;
    ev.seconds = now_seconds() - t->t_start;
    if (!emit(t, &ev)) *stop = true;
    return SF_OK;
}

sf_status sf_trainer_run(sf_trainer *t, int64_t max_steps, bool *finished) {
    if (finished) *finished = false;
    if (!t) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_trainer_run: NULL");
    t->t_start = now_seconds();
    bool stop = false;
    sf_status st = SF_OK;
    if (t->o.validate_first && !t->resumed && t->step == 0 && t->epoch == 0 &&
        t->position == 0) {
        st = validate_and_report(t, &stop);
    }
    int32_t *batch = malloc((size_t)t->train->n * sizeof *batch);
    if (!batch) st = oom("sf_trainer_run");
    int64_t taken = 0;
    while (st == SF_OK && !stop && t->epoch < t->o.epochs) {
        if (!t->perm_ready) {
            uint64_t rng = t->epoch_rng;
            shuffle(t->perm, t->train->n, &rng);
            t->perm_ready = true;
        }
        while (st == SF_OK && !stop && t->position < t->train->n) {
            int32_t next = 0;
            const int32_t nb = next_batch(t, t->perm, t->position, batch, &next);
            if (nb == 0) {
                t->position = next;
                break;
            }
            const double t0 = now_seconds();
            step_stats s;
            memset(&s, 0, sizeof s);
            st = train_step(t, batch, nb, &s);
            if (st != SF_OK) break;
            t->position = next;
            const double dt = now_seconds() - t0;
            sf_train_event ev;
            memset(&ev, 0, sizeof ev);
            ev.kind = SF_TRAIN_EVENT_STEP;
            ev.epoch = t->epoch;
            ev.step = t->step;
            ev.total_steps = t->total_steps;
            ev.loss = s.loss;
            ev.loss_ce = s.ce;
            ev.loss_class = s.cls;
            ev.loss_recon = s.recon;
            ev.lr = s.lr;
            ev.grad_norm = s.grad_norm;
            ev.batch_examples = nb;
            ev.batch_tokens = s.rows;
            ev.tokens_per_s = dt > 0 ? s.rows / dt : 0.0;
            ev.seconds = now_seconds() - t->t_start;
            if (!emit(t, &ev)) stop = true;
            if (max_steps > 0 && ++taken >= max_steps) stop = true;
        }
        if (st != SF_OK) break;
        if (t->position >= t->train->n) {
            /* The epoch is complete: the next one shuffles with the state this one left. */
            uint64_t rng = t->epoch_rng;
            shuffle(t->perm, t->train->n, &rng);
            t->epoch_rng = rng;
            t->epoch++;
            t->position = 0;
            t->perm_ready = false;
            st = validate_and_report(t, &stop);
            if (st == SF_OK) st = checkpoint_and_report(t, &stop);
        } else if (stop) {
            st = checkpoint_and_report(t, &stop);
        }
    }
    free(batch);
    if (st == SF_OK) st = sync_host(t); /* the caller reads sf afterwards */
    if (st == SF_OK && finished) *finished = t->epoch >= t->o.epochs;
    return st;
}

/* ========================================================================================== */
/* The text level                                                                              */
/* ========================================================================================== */

void sf_prompt_set_free(sf_prompt_set *set) {
    if (!set) return;
    for (int32_t i = 0; i < set->n; i++) {
        if (set->prompt) free(set->prompt[i]);
        if (set->response) free(set->response[i]);
        if (set->reply_ids) free(set->reply_ids[i]);
    }
    free(set->prompt);
    free(set->response);
    free(set->reply_ids);
    free(set->n_reply);
    free(set->reply_ended);
    memset(set, 0, sizeof *set);
}

static sf_status prompt_set_alloc(sf_prompt_set *s, int32_t n) {
    memset(s, 0, sizeof *s);
    const size_t m = (size_t)(n > 0 ? n : 1);
    s->prompt = calloc(m, sizeof *s->prompt);
    s->response = calloc(m, sizeof *s->response);
    s->reply_ids = calloc(m, sizeof *s->reply_ids);
    s->n_reply = calloc(m, sizeof *s->n_reply);
    s->reply_ended = calloc(m, sizeof *s->reply_ended);
    if (!s->prompt || !s->response || !s->reply_ids || !s->n_reply || !s->reply_ended) {
        sf_prompt_set_free(s);
        return oom("prompt set");
    }
    s->n = n;
    return SF_OK;
}

static char *dup_str(const char *s) {
    const size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

/* Reads path as a JSON list: root receives it (the caller releases it). */
static sf_status read_json_list(const char *path, json_t **root) {
    *root = NULL;
    char *text = NULL;
    size_t len = 0;
    sf_status st = sf_read_file(path, SF_DATASET_MAX_BYTES, &text, &len);
    if (st != SF_OK) return st;
    json_error_t err;
    json_t *j = json_loadb(text, len, 0, &err);
    free(text);
    if (!j) {
        return sf_fail(SF_ERR_FORMAT, "%s:%d:%d: not valid JSON: %s", path, err.line, err.column,
                       err.text);
    }
    if (!json_is_array(j)) {
        json_decref(j);
        return sf_fail(SF_ERR_FORMAT, "%s: want a JSON list", path);
    }
    if (json_array_size(j) == 0) {
        json_decref(j);
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: the list is empty", path);
    }
    if (json_array_size(j) > INT32_MAX / 2) {
        json_decref(j);
        return sf_fail(SF_ERR_FORMAT, "%s: too many rows", path);
    }
    *root = j;
    return SF_OK;
}

/* A string member or NULL (absent or null); SF_ERR_FORMAT for another type. */
static sf_status opt_string(const char *path, size_t row, const json_t *obj, const char *key,
                            const char **out) {
    const json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v)) return SF_OK;
    if (!json_is_string(v)) {
        return sf_fail(SF_ERR_FORMAT, "%s: row %zu: \"%s\" must be a string", path, row, key);
    }
    *out = json_string_value(v);
    return SF_OK;
}

sf_status sf_prompt_set_read(const char *path, int32_t max_n, uint64_t seed, sf_prompt_set *out) {
    if (!path || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_prompt_set_read: NULL");
    memset(out, 0, sizeof *out);
    json_t *root = NULL;
    sf_status st = read_json_list(path, &root);
    if (st != SF_OK) return st;
    const int32_t total = (int32_t)json_array_size(root);
    /* Validate every row, chosen or not: a broken file should fail the same way always. */
    for (size_t i = 0; st == SF_OK && i < (size_t)total; i++) {
        const json_t *row = json_array_get(root, i);
        const char *ins = NULL, *prm = NULL, *tmp = NULL;
        if (!json_is_object(row)) {
            st = sf_fail(SF_ERR_FORMAT, "%s: row %zu is not an object", path, i);
            break;
        }
        st = opt_string(path, i, row, "instruction", &ins);
        if (st == SF_OK) st = opt_string(path, i, row, "prompt", &prm);
        if (st == SF_OK) st = opt_string(path, i, row, "input", &tmp);
        if (st == SF_OK) st = opt_string(path, i, row, "response", &tmp);
        if (st == SF_OK) st = opt_string(path, i, row, "output", &tmp);
        if (st == SF_OK && !ins && !prm) {
            st = sf_fail(SF_ERR_NOT_FOUND, "%s: row %zu has no \"instruction\" (or \"prompt\")",
                         path, i);
        }
    }
    int32_t *idx = st == SF_OK ? malloc((size_t)total * sizeof *idx) : NULL;
    if (st == SF_OK && !idx) st = oom("sf_prompt_set_read");
    int32_t n = total;
    if (st == SF_OK) {
        for (int32_t i = 0; i < total; i++) idx[i] = i;
        if (max_n > 0 && max_n < total) {
            /* A seeded sample, then back to file order so that logs and caches read naturally. */
            uint64_t rng = seed ^ 0x5DA7A5E7ull;
            shuffle(idx, total, &rng);
            n = max_n;
            for (int32_t i = 1; i < n; i++) {
                const int32_t v = idx[i];
                int32_t j = i;
                for (; j > 0 && idx[j - 1] > v; j--) idx[j] = idx[j - 1];
                idx[j] = v;
            }
        }
        st = prompt_set_alloc(out, n);
    }
    for (int32_t k = 0; st == SF_OK && k < n; k++) {
        const json_t *row = json_array_get(root, (size_t)idx[k]);
        const char *ins = json_string_value(json_object_get(row, "instruction"));
        if (!ins) ins = json_string_value(json_object_get(row, "prompt"));
        const char *input = json_string_value(json_object_get(row, "input"));
        const char *resp = json_string_value(json_object_get(row, "response"));
        if (!resp) resp = json_string_value(json_object_get(row, "output"));
        if (input && *input) {
            const size_t len = strlen(ins) + strlen(input) + 3;
            out->prompt[k] = malloc(len);
            if (out->prompt[k]) snprintf(out->prompt[k], len, "%s\n\n%s", ins, input);
        } else {
            out->prompt[k] = dup_str(ins);
        }
        if (!out->prompt[k]) st = oom("sf_prompt_set_read");
        if (st == SF_OK && resp) {
            out->response[k] = dup_str(resp);
            out->reply_ended[k] = true;
            if (!out->response[k]) st = oom("sf_prompt_set_read");
        }
    }
    if (st != SF_OK) sf_prompt_set_free(out);
    free(idx);
    json_decref(root);
    return st;
}

sf_status sf_prompt_set_wrap(const sf_prompt_set *prompts, const sf_jailbreak_set *wrappers,
                             uint64_t seed, sf_prompt_set *out) {
    if (!prompts || !wrappers || !out) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_prompt_set_wrap: bad argument");
    }
    memset(out, 0, sizeof *out);
    int32_t n_train = 0;
    for (int32_t k = 0; k < wrappers->n; k++) n_train += !wrappers->w[k].held_out;
    if (n_train == 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_prompt_set_wrap: every one of the %d "
                       "jailbreak wrappers is held out; none is left to train with",
                       wrappers->n);
    }
    sf_status st = prompt_set_alloc(out, prompts->n);
    sf_rng rng = sf_rng_seed(seed ^ 0x1A11B4EAull);
    for (int32_t i = 0; st == SF_OK && i < prompts->n; i++) {
        int32_t pick = (int32_t)(sf_rng_next(&rng) % (uint64_t)n_train), k = 0;
        for (;; k++) {
            if (!wrappers->w[k].held_out && pick-- == 0) break;
        }
        st = sf_jailbreak_apply(&wrappers->w[k], prompts->prompt[i], &out->prompt[i]);
    }
    if (st != SF_OK) sf_prompt_set_free(out);
    return st;
}

int32_t sf_train_end_of_turn(const sf_train_text *tx) {
    const sf_template_text *t = sf_template_get(tx->tmpl);
    if (!t || !t->end_of_turn || !*t->end_of_turn) return -1;
    return sf_tokenizer_token_id(tx->tok, t->end_of_turn);
}

/* Encodes one chat prompt into ids (capacity cap); SF_ERR_OUT_OF_RANGE when longer. */
static sf_status encode_prompt(const sf_train_text *tx, const char *user, int32_t *ids,
                               int32_t cap, int32_t *n, sf_prompt_spans *spans) {
    return sf_chat_encode(tx->tok, tx->tmpl, tx->system, NULL, 0, user, ids, cap, n, spans);
}

/* ------------------------------------------------------------------------------------------ */
/* Cached replies of the frozen LLM                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef struct cached {
    const char *prompt;
    json_t *row;
} cached;

static int cached_cmp(const void *a, const void *b) {
    return strcmp(((const cached *)a)->prompt, ((const cached *)b)->prompt);
}

/* Takes a cache row's reply into prompts entry i; false when the row is unusable. */
static bool take_cached(json_t *row, sf_prompt_set *ps, int32_t i, int32_t vocab) {
    const json_t *ids = json_object_get(row, "ids");
    const json_t *resp = json_object_get(row, "response");
    if (!json_is_array(ids)) return false;
    const size_t n = json_array_size(ids);
    int32_t *v = malloc((n + 1) * sizeof *v);
    if (!v) return false;
    for (size_t k = 0; k < n; k++) {
        const json_t *x = json_array_get(ids, k);
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            json_integer_value(x) >= vocab) {
            free(v);
            return false;
        }
        v[k] = (int32_t)json_integer_value(x);
    }
    ps->reply_ids[i] = v;
    ps->n_reply[i] = (int32_t)n;
    ps->reply_ended[i] = json_is_true(json_object_get(row, "ended"));
    if (json_is_string(resp) && !ps->response[i]) {
        ps->response[i] = dup_str(json_string_value(resp));
    }
    return true;
}

sf_status sf_train_fill_completions(const sf_llm *llm, const sf_train_text *tx,
                                    sf_prompt_set *prompts, int32_t max_new_tokens,
                                    int32_t batch, const char *cache_path,
                                    sf_train_event_fn on_event, void *user,
                                    int32_t *n_generated) {
    if (n_generated) *n_generated = 0;
    if (!llm || !tx || !tx->tok || !tx->system || !prompts || max_new_tokens < 1 || batch < 1) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_train_fill_completions: bad argument");
    }
    const sf_llm_config *c = sf_llm_get_config(llm);
    const sf_template_text *tt = sf_template_get(tx->tmpl);
    char hash[32];
    sf_status st = sf_llm_embedding_hash(llm, hash, sizeof hash);
    if (st != SF_OK) return st;

    /* The cache: rows for this LLM, system prompt, template and length limit, by prompt. */
    json_t *rows = json_array();
    cached *index = NULL;
    size_t n_index = 0;
    FILE *f = cache_path ? fopen(cache_path, "r") : NULL;
    if (f) {
        char *line = NULL;
        size_t cap = 0;
        ssize_t got;
        while ((got = getline(&line, &cap, f)) > 0) {
            json_t *row = json_loadb(line, (size_t)got, 0, NULL);
            if (!row) continue; /* a line cut by a killed run: regenerate that prompt */
            const char *p = json_string_value(json_object_get(row, "prompt"));
            const char *sys = json_string_value(json_object_get(row, "system"));
            const char *llm_h = json_string_value(json_object_get(row, "llm"));
            const char *tn = json_string_value(json_object_get(row, "template"));
            const json_t *mx = json_object_get(row, "max_new_tokens");
            if (p && sys && llm_h && tn && !strcmp(sys, tx->system) && !strcmp(llm_h, hash) &&
                !strcmp(tn, tt->name) && json_is_integer(mx) &&
                json_integer_value(mx) == max_new_tokens) {
                json_array_append(rows, row);
            }
            json_decref(row);
        }
        free(line);
        fclose(f);
        n_index = json_array_size(rows);
        index = malloc((n_index + 1) * sizeof *index);
        if (!index) st = oom("sf_train_fill_completions");
        for (size_t i = 0; st == SF_OK && i < n_index; i++) {
            index[i].row = json_array_get(rows, i);
            index[i].prompt = json_string_value(json_object_get(index[i].row, "prompt"));
        }
        if (st == SF_OK) qsort(index, n_index, sizeof *index, cached_cmp);
    }
    int32_t *todo = malloc((size_t)(prompts->n + 1) * sizeof *todo);
    int32_t n_todo = 0;
    if (st == SF_OK && !todo) st = oom("sf_train_fill_completions");
    for (int32_t i = 0; st == SF_OK && i < prompts->n; i++) {
        if (prompts->reply_ids[i] || prompts->response[i]) continue;
        cached key = {prompts->prompt[i], NULL};
        cached *hit = n_index ? bsearch(&key, index, n_index, sizeof *index, cached_cmp) : NULL;
        if (!hit || !take_cached(hit->row, prompts, i, c->vocab_size)) todo[n_todo++] = i;
    }
    free(index);
    json_decref(rows);

    /* Generate the rest, a batch at a time, appending each batch to the cache as it is done so
     * that an interrupted run keeps what it paid for. */
    FILE *cache = NULL;
    if (st == SF_OK && n_todo > 0 && cache_path) {
        cache = fopen(cache_path, "a");
        if (!cache) st = sf_fail(SF_ERR_IO, "%s: cannot append: %s", cache_path, strerror(errno));
    }
    int32_t stop[2], n_stop = 0;
    const int32_t eos = sf_tokenizer_eos_id(tx->tok), eot = sf_train_end_of_turn(tx);
    if (eos >= 0) stop[n_stop++] = eos;
    if (eot >= 0 && eot != eos) stop[n_stop++] = eot;
    const int32_t ctx = c->max_position_embeddings;
    const int32_t cap = tx->max_tokens > 0 && tx->max_tokens < ctx ? tx->max_tokens : ctx;
    int32_t *ids = malloc((size_t)batch * (size_t)cap * sizeof *ids);
    int32_t *cu = malloc((size_t)(batch + 1) * sizeof *cu);
    int32_t *which = malloc((size_t)batch * sizeof *which);
    sf_generation_result *res = calloc((size_t)batch, sizeof *res);
    if (st == SF_OK && (!ids || !cu || !which || !res)) st = oom("sf_train_fill_completions");
    int32_t done = 0, generated = 0;
    for (int32_t k = 0; st == SF_OK && k < n_todo;) {
        int32_t nb = 0;
        cu[0] = 0;
        /* Prompts too long to be kept for training are not worth generating for. */
        for (; k < n_todo && nb < batch; k++) {
            int32_t len = 0;
            sf_prompt_spans spans;
            sf_status e = encode_prompt(tx, prompts->prompt[todo[k]], ids + cu[nb], cap, &len,
                                        &spans);
            if (e == SF_ERR_OUT_OF_RANGE || (e == SF_OK && len >= cap)) {
                sf_clear_error();
                done++;
                continue;
            }
            if (e != SF_OK) {
                st = e;
                break;
            }
            which[nb] = todo[k];
            cu[nb + 1] = cu[nb] + len;
            nb++;
        }
        if (st != SF_OK || nb == 0) continue;
        sf_generation g;
        memset(&g, 0, sizeof g);
        g.n_requests = nb;
        g.cu_seqlens = cu;
        g.token_ids = ids;
        g.max_new_tokens = max_new_tokens;
        g.stop_ids = stop;
        g.n_stop_ids = n_stop;
        st = sf_generate_cpu(llm, NULL, tx->tok, &g, NULL, NULL, res);
        for (int32_t r = 0; st == SF_OK && r < nb; r++) {
            const int32_t i = which[r];
            prompts->reply_ids[i] = res[r].tokens;
            prompts->n_reply[i] = res[r].n_tokens;
            prompts->reply_ended[i] = res[r].finish == SF_FINISH_STOP_TOKEN;
            res[r].tokens = NULL;
            if (res[r].text) {
                prompts->response[i] = res[r].text;
                res[r].text = NULL;
            }
            if (cache) {
                json_t *row = json_object();
                json_t *arr = json_array();
                for (int32_t j = 0; j < prompts->n_reply[i]; j++) {
                    json_array_append_new(arr, json_integer(prompts->reply_ids[i][j]));
                }
                json_object_set_new(row, "prompt", json_string(prompts->prompt[i]));
                json_object_set_new(row, "system", json_string(tx->system));
                json_object_set_new(row, "template", json_string(tt->name));
                json_object_set_new(row, "llm", json_string(hash));
                json_object_set_new(row, "max_new_tokens", json_integer(max_new_tokens));
                json_object_set_new(row, "ids", arr);
                json_object_set_new(row, "ended", json_boolean(prompts->reply_ended[i]));
                json_object_set_new(row, "response",
                                    json_string(prompts->response[i] ? prompts->response[i]
                                                                     : ""));
                char *line = json_dumps(row, JSON_COMPACT | JSON_ENSURE_ASCII);
                if (!line || fprintf(cache, "%s\n", line) < 0) {
                    st = sf_fail(SF_ERR_IO, "%s: cannot write", cache_path);
                }
                free(line);
                json_decref(row);
            }
            generated++;
            done++;
        }
        for (int32_t r = 0; r < nb; r++) sf_generation_result_free(&res[r]);
        if (cache) fflush(cache);
        if (st == SF_OK && on_event) {
            sf_train_event ev;
            memset(&ev, 0, sizeof ev);
            ev.kind = SF_TRAIN_EVENT_COMPLETIONS;
            ev.done = done;
            ev.total = n_todo;
            if (!on_event(user, &ev)) break;
        }
    }
    if (cache && fclose(cache) != 0 && st == SF_OK) {
        st = sf_fail(SF_ERR_IO, "%s: cannot write", cache_path);
    }
    free(ids);
    free(cu);
    free(which);
    free(res);
    free(todo);
    if (n_generated) *n_generated = generated;
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding prompt sets                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Tokenizes reply text (plain text, no BOS) into a malloc'd array. */
static sf_status encode_text(const sf_tokenizer *tok, const char *text, int32_t **ids,
                             int32_t *n) {
    *ids = NULL;
    *n = 0;
    const size_t len = strlen(text);
    int32_t need = 0;
    sf_status st = sf_tokenizer_encode(tok, text, len, false, false, NULL, 0, &need);
    if (st != SF_OK && st != SF_ERR_OUT_OF_RANGE) return st;
    sf_clear_error();
    int32_t *v = malloc((size_t)(need + 1) * sizeof *v);
    if (!v) return oom("encoding a reply");
    st = sf_tokenizer_encode(tok, text, len, false, false, v, need, &need);
    if (st != SF_OK) {
        free(v);
        return st;
    }
    *ids = v;
    *n = need;
    return SF_OK;
}

sf_status sf_train_set_add_prompts(sf_train_set *set, const sf_train_text *tx,
                                   const sf_prompt_set *prompts, bool harmful,
                                   int32_t *n_skipped) {
    if (n_skipped) *n_skipped = 0;
    if (!set || !tx || !tx->tok || !tx->system || !prompts || tx->max_tokens < 2 ||
        (harmful && !tx->refusal)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_train_set_add_prompts: bad argument");
    }
    if (!*tx->system) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_train_set_add_prompts: the system prompt is "
                       "empty: the Sysformer needs one to rewrite");
    }
    const int32_t cap = tx->max_tokens;
    const int32_t eot = sf_train_end_of_turn(tx);
    int32_t *prompt = malloc((size_t)cap * sizeof *prompt);
    int32_t *target = malloc((size_t)cap * sizeof *target);
    int32_t *refusal = NULL, n_refusal = 0;
    sf_status st = (prompt && target) ? SF_OK : oom("sf_train_set_add_prompts");
    if (st == SF_OK && harmful) st = encode_text(tx->tok, tx->refusal, &refusal, &n_refusal);
    int32_t skipped = 0;
    for (int32_t i = 0; st == SF_OK && i < prompts->n; i++) {
        int32_t n = 0;
        sf_prompt_spans spans;
        sf_status e = encode_prompt(tx, prompts->prompt[i], prompt, cap, &n, &spans);
        if (e == SF_ERR_OUT_OF_RANGE || (e == SF_OK && (n >= cap || spans.user < 1))) {
            sf_clear_error();
            skipped++;
            continue;
        }
        if (e != SF_OK) {
            st = e;
            break;
        }
        /* The reply, then the end-of-turn id when the reply is complete, cut to fit. */
        const int32_t room = cap - n;
        int32_t nt = 0;
        const int32_t *src = NULL;
        int32_t n_src = 0, *owned = NULL;
        bool ended = true;
        if (harmful) {
            src = refusal;
            n_src = n_refusal;
        } else if (prompts->reply_ids && prompts->reply_ids[i]) {
            src = prompts->reply_ids[i];
            n_src = prompts->n_reply[i];
            ended = prompts->reply_ended[i];
        } else if (prompts->response && prompts->response[i]) {
            st = encode_text(tx->tok, prompts->response[i], &owned, &n_src);
            src = owned;
            ended = true;
        } else {
            ended = false; /* no reply known: the example serves L_class and L_recon only */
        }
        for (int32_t j = 0; st == SF_OK && j < n_src && nt < room; j++) target[nt++] = src[j];
        if (st == SF_OK && src && ended && eot >= 0 && nt < room) target[nt++] = eot;
        free(owned);
        if (st == SF_OK) st = sf_train_set_add(set, prompt, n, &spans, target, nt, harmful);
    }
    free(prompt);
    free(target);
    free(refusal);
    if (n_skipped) *n_skipped = skipped;
    return st;
}
