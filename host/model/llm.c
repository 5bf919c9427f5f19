/* Loading a Hugging Face Llama-family checkpoint into fp32 host memory.
 *
 * The loader first lists every tensor the config implies (name, shape, where its pointer goes),
 * checks all of them against the archive, then makes one allocation and converts. So a missing
 * or misshapen tensor is reported before any large allocation, and the model owns exactly two
 * blocks (weights and the layer table) besides its config. */
#include "model/llm.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/progress.h"
#include "io/llm_config.h"
#include "io/safetensors.h"

enum { SF_NAME_MAX = 128 };

/* A tensor to load: where it comes from and which pointers receive it. A fused Phi-3 tensor
 * feeds several pointers (q, k, v row blocks), each at its own float offset into the tensor. */
typedef struct weight_slot {
    char name[SF_NAME_MAX];
    int32_t ndim;
    int64_t shape[2];
    int64_t offset; /* into sf_llm.weights, in floats, once assigned */
    int n_dst;
    const float **dst[3];
    int64_t dst_offset[3];
} weight_slot;

typedef struct slot_list {
    weight_slot *items;
    int64_t count;
    int64_t cap;
} slot_list;

static weight_slot *slot_add(slot_list *list, int32_t ndim, int64_t d0, int64_t d1,
                             const char *fmt, int layer) {
    if (list->count == list->cap) {
        int64_t cap = list->cap ? list->cap * 2 : 64;
        weight_slot *items = realloc(list->items, (size_t)cap * sizeof *items);
        if (!items) return NULL;
        list->items = items;
        list->cap = cap;
    }
    weight_slot *s = &list->items[list->count++];
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, fmt, layer);
    s->ndim = ndim;
    s->shape[0] = d0;
    s->shape[1] = d1;
    return s;
}

static void slot_target(weight_slot *s, const float **dst, int64_t offset_floats) {
    s->dst[s->n_dst] = dst;
    s->dst_offset[s->n_dst] = offset_floats;
    s->n_dst++;
}

/* Lists every tensor of the model with its expected shape. Returns SF_ERR_OUT_OF_MEMORY only. */
static sf_status list_weights(sf_llm *llm, slot_list *list) {
    const sf_llm_config *c = &llm->cfg;
    const int64_t d = c->hidden_size, ff = c->intermediate_size, v = c->vocab_size;
    const int64_t q_dim = (int64_t)c->num_heads * c->head_dim;
    const int64_t kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    weight_slot *s;

#define ADD(ndim, d0, d1, fmt, layer)                                                          \
    do {                                                                                       \
        s = slot_add(list, ndim, d0, d1, fmt, layer);                                          \
        if (!s) return sf_fail(SF_ERR_OUT_OF_MEMORY, "cannot allocate the weight table");    \
    } while (0)

    ADD(2, v, d, "model.embed_tokens.weight", 0);
    slot_target(s, &llm->embed, 0);
    if (llm->embeddings_only) return SF_OK;
    ADD(1, d, 0, "model.norm.weight", 0);
    slot_target(s, &llm->final_norm, 0);
    if (!c->tie_word_embeddings) {
        ADD(2, v, d, "lm_head.weight", 0);
        slot_target(s, &llm->lm_head, 0);
    }

    for (int i = 0; i < c->num_layers; i++) {
        sf_llm_layer *L = &llm->layers[i];
        ADD(1, d, 0, "model.layers.%d.input_layernorm.weight", i);
        slot_target(s, &L->attn_norm, 0);
        ADD(1, d, 0, "model.layers.%d.post_attention_layernorm.weight", i);
        slot_target(s, &L->mlp_norm, 0);
        if (c->arch == SF_ARCH_PHI3) {
            ADD(2, q_dim + 2 * kv_dim, d, "model.layers.%d.self_attn.qkv_proj.weight", i);
            slot_target(s, &L->wq, 0);
            slot_target(s, &L->wk, q_dim * d);
            slot_target(s, &L->wv, (q_dim + kv_dim) * d);
            ADD(2, 2 * ff, d, "model.layers.%d.mlp.gate_up_proj.weight", i);
            slot_target(s, &L->w_gate, 0); /* transformers chunks gate first, then up */
            slot_target(s, &L->w_up, ff * d);
        } else {
            ADD(2, q_dim, d, "model.layers.%d.self_attn.q_proj.weight", i);
            slot_target(s, &L->wq, 0);
            ADD(2, kv_dim, d, "model.layers.%d.self_attn.k_proj.weight", i);
            slot_target(s, &L->wk, 0);
            ADD(2, kv_dim, d, "model.layers.%d.self_attn.v_proj.weight", i);
            slot_target(s, &L->wv, 0);
            ADD(2, ff, d, "model.layers.%d.mlp.gate_proj.weight", i);
            slot_target(s, &L->w_gate, 0);
            ADD(2, ff, d, "model.layers.%d.mlp.up_proj.weight", i);
            slot_target(s, &L->w_up, 0);
        }
        if (c->attention_bias || c->qkv_bias) {
            ADD(1, q_dim, 0, "model.layers.%d.self_attn.q_proj.bias", i);
            slot_target(s, &L->bq, 0);
            ADD(1, kv_dim, 0, "model.layers.%d.self_attn.k_proj.bias", i);
            slot_target(s, &L->bk, 0);
            ADD(1, kv_dim, 0, "model.layers.%d.self_attn.v_proj.bias", i);
            slot_target(s, &L->bv, 0);
        }
        ADD(2, d, q_dim, "model.layers.%d.self_attn.o_proj.weight", i);
        slot_target(s, &L->wo, 0);
        if (c->attention_bias) {
            ADD(1, d, 0, "model.layers.%d.self_attn.o_proj.bias", i);
            slot_target(s, &L->bo, 0);
        }
        ADD(2, d, ff, "model.layers.%d.mlp.down_proj.weight", i);
        slot_target(s, &L->w_down, 0);
    }
#undef ADD
    return SF_OK;
}

static sf_status load_weights(sf_llm *llm, const sf_weight_source *src) {
    slot_list list = {0};
    sf_status st = list_weights(llm, &list);
    int64_t total = 0;
    for (int64_t i = 0; st == SF_OK && i < list.count; i++) {
        weight_slot *s = &list.items[i];
        st = src->check(src->ctx, s->name, s->ndim, s->shape);
        if (st == SF_OK) {
            s->offset = total;
            /* shapes were checked against int32 config values, so this cannot overflow */
            total += s->shape[0] * (s->ndim == 2 ? s->shape[1] : 1);
        }
    }
    if (st == SF_OK) {
        llm->weights = malloc((size_t)(total + 1) * sizeof(float));
        if (!llm->weights) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "cannot allocate %lld bytes for the weights",
                         (long long)total * 4);
        }
        llm->n_weights = total;
    }
    const uint64_t bytes = (uint64_t)total * sizeof(float);
    if (st == SF_OK) sf_progress("loading weights", 0, bytes);
    for (int64_t i = 0; st == SF_OK && i < list.count; i++) {
        weight_slot *s = &list.items[i];
        float *dst = llm->weights + s->offset;
        st = src->read(src->ctx, s->name, dst);
        for (int j = 0; j < s->n_dst; j++) *s->dst[j] = dst + s->dst_offset[j];
        const int64_t end = i + 1 < list.count ? list.items[i + 1].offset : total;
        if (st == SF_OK) sf_progress("loading weights", (uint64_t)end * sizeof(float), bytes);
    }
    if (st == SF_OK && llm->cfg.tie_word_embeddings && !llm->embeddings_only) {
        llm->lm_head = llm->embed;
    }
    free(list.items);
    return st;
}

sf_status sf_llm_build(sf_llm_config *cfg, const sf_weight_source *src, bool embeddings_only,
                       sf_llm **out) {
    *out = NULL;
    sf_llm *llm = calloc(1, sizeof *llm);
    if (!llm) {
        sf_llm_config_release(cfg);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_llm_load: out of memory");
    }
    llm->cfg = *cfg;
    llm->embeddings_only = embeddings_only;
    memset(cfg, 0, sizeof *cfg); /* the model owns the config's arrays now */
    sf_status st = SF_OK;
    llm->layers = calloc((size_t)llm->cfg.num_layers, sizeof *llm->layers);
    if (!llm->layers) st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_llm_load: out of memory");
    if (st == SF_OK) st = load_weights(llm, src);
    if (st != SF_OK) {
        sf_llm_free(llm);
        return st;
    }
    *out = llm;
    return SF_OK;
}

/* The safetensors source: tensors by their Hugging Face names, F32/F16/BF16. */
static sf_status st_check(void *ctx, const char *name, int32_t ndim, const int64_t *shape) {
    const sf_st_tensor *t = NULL;
    sf_status st = sf_st_get(ctx, name, ndim, shape, &t);
    if (st == SF_OK && t->dtype != SF_DTYPE_F32 && t->dtype != SF_DTYPE_F16 &&
        t->dtype != SF_DTYPE_BF16) {
        st = sf_fail(SF_ERR_SHAPE, "%s: tensor '%s' has dtype %s; expected F32, F16 or BF16",
                     t->path, name, sf_dtype_name(t->dtype));
    }
    return st;
}

static sf_status st_read(void *ctx, const char *name, float *dst) {
    return sf_st_to_f32(sf_st_find(ctx, name), dst);
}

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static sf_status load(const char *path, bool embeddings_only, sf_llm **out) {
    if (!path || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_load: NULL argument");
    *out = NULL;
    if (ends_with(path, ".gguf")) return sf_llm_load_gguf(path, embeddings_only, out);

    size_t dir_len = strlen(path);
    char *config_path = malloc(dir_len + sizeof "/config.json");
    if (!config_path) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_llm_load: out of memory");
    memcpy(config_path, path, dir_len);
    memcpy(config_path + dir_len, "/config.json", sizeof "/config.json");
    sf_llm_config cfg;
    sf_st_archive *ar = NULL;
    sf_status st = sf_llm_config_load(config_path, &cfg);
    free(config_path);
    if (st != SF_OK) return st;
    st = sf_st_open(path, &ar);
    if (st != SF_OK) {
        sf_llm_config_release(&cfg);
        return st;
    }
    sf_weight_source src = {ar, st_check, st_read};
    st = sf_llm_build(&cfg, &src, embeddings_only, out);
    sf_st_close(ar);
    return st;
}

sf_status sf_llm_load(const char *path, sf_llm **out) { return load(path, false, out); }

sf_status sf_llm_load_embeddings(const char *path, sf_llm **out) {
    return load(path, true, out);
}

sf_status sf_llm_check_whole(const sf_llm *llm, const char *fn) {
    if (llm && llm->embeddings_only) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: the model was loaded with its embedding table "
                       "only (sf_llm_load_embeddings); running it needs sf_llm_load", fn);
    }
    return SF_OK;
}

void sf_llm_free(sf_llm *llm) {
    if (!llm) return;
    sf_llm_config_release(&llm->cfg);
    free(llm->weights);
    free(llm->layers);
    free(llm);
}

const sf_llm_config *sf_llm_get_config(const sf_llm *llm) { return llm ? &llm->cfg : NULL; }
