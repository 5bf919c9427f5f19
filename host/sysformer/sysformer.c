/* The Sysformer object: its tensor table, configuration checks and initialisation. */
#include "sysformer/module.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "model/llm.h"

sf_sysformer_config sf_sysformer_default_config(const sf_llm *llm) {
    sf_sysformer_config c;
    memset(&c, 0, sizeof c);
    const int32_t d = llm ? llm->cfg.hidden_size : 0;
    c.d_model = d;
    c.num_layers = 2;
    c.num_heads = llm ? llm->cfg.num_heads : 0;
    c.dim_feedforward = 4 * d;
    c.activation = SF_ACT_RELU;
    c.norm_first = true;
    c.layer_norm_eps = 1e-5f;
    c.final_norm = false;
    c.has_classifier = true;
    c.llm_hidden_size = d;
    c.llm_vocab_size = llm ? llm->cfg.vocab_size : 0;
    return c;
}

const sf_sysformer_config *sf_sysformer_get_config(const sf_sysformer *sf) {
    return sf ? &sf->cfg : NULL;
}

void sf_sysformer_free(sf_sysformer *sf) {
    if (!sf) return;
    free(sf->weights);
    free(sf->layers);
    free(sf->strings);
    free(sf);
}

sf_status sf_sysformer_check_config(const sf_sysformer_config *c, const sf_llm *llm,
                                    const char *source) {
    /* Generous upper bounds that still keep every product of sizes far from overflow. */
    if (c->d_model < 1 || c->d_model > (1 << 16)) {
        return sf_fail(SF_ERR_CONFIG, "%s: d_model = %d", source, c->d_model);
    }
    if (c->num_layers < 0 || c->num_layers > 256) {
        return sf_fail(SF_ERR_CONFIG, "%s: num_layers = %d", source, c->num_layers);
    }
    if (c->num_heads < 1 || c->d_model % c->num_heads != 0) {
        return sf_fail(SF_ERR_CONFIG, "%s: num_heads = %d does not divide d_model = %d", source,
                       c->num_heads, c->d_model);
    }
    if (c->system_offset_rows < 0 || c->system_offset_rows > (1 << 16)) {
        return sf_fail(SF_ERR_CONFIG, "%s: system_offset_rows = %d", source,
                       c->system_offset_rows);
    }
    if (c->dim_feedforward < 1 || c->dim_feedforward > (1 << 20)) {
        return sf_fail(SF_ERR_CONFIG, "%s: dim_feedforward = %d", source, c->dim_feedforward);
    }
    if (c->activation != SF_ACT_RELU && c->activation != SF_ACT_GELU) {
        return sf_fail(SF_ERR_CONFIG, "%s: unknown activation %d", source, (int)c->activation);
    }
    if (!(c->layer_norm_eps > 0.0f) || !isfinite(c->layer_norm_eps)) {
        return sf_fail(SF_ERR_CONFIG, "%s: layer_norm_eps = %g", source, c->layer_norm_eps);
    }
    if (!llm) return SF_OK;
    const sf_llm_config *l = &llm->cfg;
    if (c->d_model != l->hidden_size) {
        return sf_fail(SF_ERR_CONFIG, "%s: d_model = %d but the LLM's hidden size is %d", source,
                       c->d_model, l->hidden_size);
    }
    if (c->llm_hidden_size != 0 && c->llm_hidden_size != l->hidden_size) {
        return sf_fail(SF_ERR_CONFIG, "%s: trained for an LLM with hidden size %d, not %d",
                       source, c->llm_hidden_size, l->hidden_size);
    }
    if (c->llm_vocab_size != 0 && c->llm_vocab_size != l->vocab_size) {
        return sf_fail(SF_ERR_CONFIG, "%s: trained for an LLM with vocab size %d, not %d", source,
                       c->llm_vocab_size, l->vocab_size);
    }
    if (c->llm_embedding_hash && c->llm_embedding_hash[0]) {
        char hash[32];
        sf_status st = sf_llm_embedding_hash(llm, hash, sizeof hash);
        if (st != SF_OK) return st;
        if (strcmp(hash, c->llm_embedding_hash) != 0) {
            return sf_fail(SF_ERR_CONFIG,
                           "%s: trained for an LLM whose embedding table hashes to %s; this "
                           "LLM's is %s",
                           source, c->llm_embedding_hash, hash);
        }
    }
    return SF_OK;
}

sf_status sf_sysformer_set_config(sf_sysformer *sf, const sf_sysformer_config *src) {
    const char *strs[5] = {src->llm_name, src->llm_embedding_hash, src->system_prompt,
                           src->chat_template, NULL};
    size_t total = 0;
    for (int i = 0; i < 4; i++) total += strs[i] ? strlen(strs[i]) + 1 : 0;
    char *block = total ? malloc(total) : NULL;
    if (total && !block) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sysformer: out of memory");
    const char *copies[4] = {NULL, NULL, NULL, NULL};
    char *p = block;
    for (int i = 0; i < 4; i++) {
        if (!strs[i]) continue;
        size_t n = strlen(strs[i]) + 1;
        memcpy(p, strs[i], n);
        copies[i] = p;
        p += n;
    }
    free(sf->strings);
    sf->strings = block;
    sf->cfg = *src;
    sf->cfg.llm_name = copies[0];
    sf->cfg.llm_embedding_hash = copies[1];
    sf->cfg.system_prompt = copies[2];
    sf->cfg.chat_template = copies[3];
    return SF_OK;
}

sf_sysformer_tensor *sf_sysformer_tensors(sf_sysformer *sf, int64_t *count) {
    const sf_sysformer_config *c = &sf->cfg;
    const int64_t d = c->d_model, ff = c->dim_feedforward;
    /* per layer: 2 attention blocks x 4, linear1/2 x 2, norm1..3 x 2; then norm and classifier */
    const int64_t n = 18 * (int64_t)c->num_layers + 2 + 2 + 1;
    sf_sysformer_tensor *t = calloc((size_t)n, sizeof *t);
    *count = 0;
    if (!t) return NULL;
    int64_t k = 0;
#define TENSOR(ptr, d0, d1, ...)                                                               \
    do {                                                                                       \
        snprintf(t[k].name, sizeof t[k].name, __VA_ARGS__);                                   \
        t[k].ndim = (d1) ? 2 : 1;                                                              \
        t[k].shape[0] = (d0);                                                                  \
        t[k].shape[1] = (d1);                                                                  \
        t[k].slot = &(ptr);                                                                    \
        k++;                                                                                   \
    } while (0)
    for (int i = 0; i < c->num_layers; i++) {
        sf_sysformer_layer *L = &sf->layers[i];
        sf_mha_weights *attn[2] = {&L->self_attn, &L->cross_attn};
        const char *attn_name[2] = {"self_attn", "multihead_attn"};
        for (int a = 0; a < 2; a++) {
            TENSOR(attn[a]->in_proj_weight, 3 * d, d, "layers.%d.%s.in_proj_weight", i,
                   attn_name[a]);
            TENSOR(attn[a]->in_proj_bias, 3 * d, 0, "layers.%d.%s.in_proj_bias", i, attn_name[a]);
            TENSOR(attn[a]->out_proj_weight, d, d, "layers.%d.%s.out_proj.weight", i,
                   attn_name[a]);
            TENSOR(attn[a]->out_proj_bias, d, 0, "layers.%d.%s.out_proj.bias", i, attn_name[a]);
        }
        TENSOR(L->linear1_weight, ff, d, "layers.%d.linear1.weight", i);
        TENSOR(L->linear1_bias, ff, 0, "layers.%d.linear1.bias", i);
        TENSOR(L->linear2_weight, d, ff, "layers.%d.linear2.weight", i);
        TENSOR(L->linear2_bias, d, 0, "layers.%d.linear2.bias", i);
        for (int j = 0; j < 3; j++) {
            TENSOR(L->norm_weight[j], d, 0, "layers.%d.norm%d.weight", i, j + 1);
            TENSOR(L->norm_bias[j], d, 0, "layers.%d.norm%d.bias", i, j + 1);
        }
    }
    if (c->final_norm) {
        TENSOR(sf->final_norm_weight, d, 0, "norm.weight");
        TENSOR(sf->final_norm_bias, d, 0, "norm.bias");
    }
    if (c->system_offset_rows > 0) {
        TENSOR(sf->system_offset, c->system_offset_rows, d, "system_offset");
    }
    if (c->has_classifier) {
        TENSOR(sf->classifier_weight, 1, d, "classifier.weight");
        TENSOR(sf->classifier_bias, 1, 0, "classifier.bias");
    }
#undef TENSOR
    *count = k;
    return t;
}

sf_status sf_sysformer_alloc(sf_sysformer *sf) {
    sf->layers = calloc((size_t)(sf->cfg.num_layers ? sf->cfg.num_layers : 1), sizeof *sf->layers);
    if (!sf->layers) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sysformer: out of memory");
    int64_t n = 0;
    sf_sysformer_tensor *t = sf_sysformer_tensors(sf, &n);
    if (!t) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sysformer: out of memory");
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) total += t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
    sf->weights = malloc((size_t)(total + 1) * sizeof(float));
    if (!sf->weights) {
        free(t);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sysformer: cannot allocate %lld bytes of weights",
                       (long long)total * 4);
    }
    sf->n_weights = total;
    float *p = sf->weights;
    for (int64_t i = 0; i < n; i++) {
        *t[i].slot = p;
        p += t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
    }
    free(t);
    return SF_OK;
}

sf_status sf_llm_embedding_hash(const sf_llm *llm, char *buf, size_t buf_size) {
    if (!llm || !buf || buf_size < 25) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_embedding_hash: bad argument");
    }
    const unsigned char *bytes = (const unsigned char *)llm->embed;
    const size_t n = (size_t)llm->cfg.vocab_size * (size_t)llm->cfg.hidden_size * sizeof(float);
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 offset basis and prime */
    for (size_t i = 0; i < n; i++) {
        h ^= bytes[i];
        h *= 0x100000001b3ull;
    }
    snprintf(buf, buf_size, "fnv1a64:%016llx", (unsigned long long)h);
    return SF_OK;
}

/* U(-bound, bound) */
static void fill_uniform(float *x, int64_t n, double bound, sf_rng *rng) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)((2.0 * sf_rng_uniform(rng) - 1.0) * bound);
}

static void fill_const(float *x, int64_t n, float v) {
    for (int64_t i = 0; i < n; i++) x[i] = v;
}

sf_status sf_sysformer_init(const sf_llm *llm, const sf_sysformer_config *cfg, uint64_t seed,
                            sf_sysformer **out) {
    if (!llm || !cfg || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_init: NULL");
    *out = NULL;
    sf_status st = sf_sysformer_check_config(cfg, llm, "sf_sysformer_init");
    if (st != SF_OK) return st;
    sf_sysformer *sf = calloc(1, sizeof *sf);
    if (!sf) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_init: out of memory");
    st = sf_sysformer_set_config(sf, cfg);
    if (st == SF_OK) st = sf_sysformer_alloc(sf);
    if (st != SF_OK) {
        sf_sysformer_free(sf);
        return st;
    }

    const int64_t d = cfg->d_model, ff = cfg->dim_feedforward;
    sf_rng rng = sf_rng_seed(seed);
    /* PyTorch: MultiheadAttention draws in_proj_weight with xavier_uniform over [3d, d]
     * (bound sqrt(6 / (d + 3d))) and zeroes both biases; nn.Linear's kaiming_uniform(a=sqrt 5)
     * gives U(+-1/sqrt(fan_in)) for weight and bias; LayerNorm starts at (1, 0). */
    const double xavier = sqrt(6.0 / (double)(d + 3 * d));
    for (int i = 0; i < cfg->num_layers; i++) {
        sf_sysformer_layer *L = &sf->layers[i];
        sf_mha_weights *attn[2] = {&L->self_attn, &L->cross_attn};
        for (int a = 0; a < 2; a++) {
            fill_uniform(attn[a]->in_proj_weight, 3 * d * d, xavier, &rng);
            fill_const(attn[a]->in_proj_bias, 3 * d, 0.0f);
            /* Zero, not PyTorch's default: the residual branches start closed, so S' = S. */
            fill_const(attn[a]->out_proj_weight, d * d, 0.0f);
            fill_const(attn[a]->out_proj_bias, d, 0.0f);
        }
        fill_uniform(L->linear1_weight, ff * d, 1.0 / sqrt((double)d), &rng);
        fill_uniform(L->linear1_bias, ff, 1.0 / sqrt((double)d), &rng);
        fill_const(L->linear2_weight, d * ff, 0.0f);
        fill_const(L->linear2_bias, d, 0.0f);
        for (int j = 0; j < 3; j++) {
            fill_const(L->norm_weight[j], d, 1.0f);
            fill_const(L->norm_bias[j], d, 0.0f);
        }
    }
    if (cfg->final_norm) {
        fill_const(sf->final_norm_weight, d, 1.0f);
        fill_const(sf->final_norm_bias, d, 0.0f);
    }
    /* Zero: the offset starts at the default system prompt's own embedding. */
    if (cfg->system_offset_rows > 0) {
        fill_const(sf->system_offset, (int64_t)cfg->system_offset_rows * d, 0.0f);
    }
    if (cfg->has_classifier) {
        fill_uniform(sf->classifier_weight, d, 1.0 / sqrt((double)d), &rng);
        fill_uniform(sf->classifier_bias, 1, 1.0 / sqrt((double)d), &rng);
    }
    *out = sf;
    return SF_OK;
}

sf_status sf_sysformer_add_offset(const sf_sysformer *sf, const int32_t *cu_system,
                                  int32_t n_requests, float *x, const char *fn) {
    const int64_t rows = sf->cfg.system_offset_rows, d = sf->cfg.d_model;
    /* Every span is checked before any row changes, so a refused batch leaves x as it was. */
    for (int32_t r = 0; r < n_requests; r++) {
        const int32_t ns = cu_system[r + 1] - cu_system[r];
        if (ns != 0 && ns != rows) {
            return sf_fail(SF_ERR_INVALID_ARGUMENT,
                           "%s: request %d has a system span of %d tokens, but this module's "
                           "learned system offset has %lld rows (it was trained for one system "
                           "prompt; use that prompt)",
                           fn, r, ns, (long long)rows);
        }
    }
    for (int32_t r = 0; r < n_requests; r++) {
        if (cu_system[r + 1] == cu_system[r]) continue;
        float *xr = x + (int64_t)cu_system[r] * d;
        for (int64_t i = 0; i < rows * d; i++) xr[i] += sf->system_offset[i];
    }
    return SF_OK;
}
