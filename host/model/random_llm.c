/* A small random Llama model written in Hugging Face's on-disk format, so the whole pipeline
 * (config parser, safetensors reader, forward pass, CLI) runs on a machine with no model. */
#include "model/random_llm.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/rng.h"
#include "io/safetensors.h"

sf_llm_config sf_random_llm_default_config(void) {
    sf_llm_config c;
    memset(&c, 0, sizeof c);
    c.arch = SF_ARCH_LLAMA;
    c.vocab_size = 512;
    c.hidden_size = 256;
    c.intermediate_size = 688;
    c.num_layers = 4;
    c.num_heads = 8;
    c.num_kv_heads = 2;
    c.head_dim = 32;
    c.max_position_embeddings = 2048;
    c.rms_norm_eps = 1e-5f;
    c.rope_theta = 500000.0;
    c.rope.type = SF_ROPE_LLAMA3;
    c.rope.factor = 8.0;
    c.rope.low_freq_factor = 1.0;
    c.rope.high_freq_factor = 4.0;
    c.rope.original_max_position_embeddings = 256;
    c.rope.attention_factor = 1.0;
    c.bos_token_id = 1;
    c.n_eos_token_ids = 1;
    c.eos_token_ids[0] = 2;
    return c;
}

static json_t *config_json(const sf_llm_config *c) {
    json_t *j = json_object();
    json_object_set_new(j, "architectures", json_pack("[s]", "LlamaForCausalLM"));
    json_object_set_new(j, "model_type", json_string("llama"));
    json_object_set_new(j, "vocab_size", json_integer(c->vocab_size));
    json_object_set_new(j, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(j, "intermediate_size", json_integer(c->intermediate_size));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->num_layers));
    json_object_set_new(j, "num_attention_heads", json_integer(c->num_heads));
    json_object_set_new(j, "num_key_value_heads", json_integer(c->num_kv_heads));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "max_position_embeddings", json_integer(c->max_position_embeddings));
    json_object_set_new(j, "rms_norm_eps", json_real(c->rms_norm_eps));
    json_object_set_new(j, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(j, "hidden_act", json_string("silu"));
    json_object_set_new(j, "attention_bias", json_boolean(c->attention_bias));
    json_object_set_new(j, "tie_word_embeddings", json_boolean(c->tie_word_embeddings));
    json_object_set_new(j, "bos_token_id", json_integer(c->bos_token_id));
    json_object_set_new(j, "eos_token_id", json_integer(c->eos_token_ids[0]));
    json_object_set_new(j, "torch_dtype", json_string("float32"));
    if (c->rope.type == SF_ROPE_LLAMA3) {
        json_object_set_new(
            j, "rope_scaling",
            json_pack("{s:s, s:f, s:f, s:f, s:i}", "rope_type", "llama3", "factor", c->rope.factor,
                      "low_freq_factor", c->rope.low_freq_factor, "high_freq_factor",
                      c->rope.high_freq_factor, "original_max_position_embeddings",
                      c->rope.original_max_position_embeddings));
    }
    return j;
}

typedef struct tensor_buf {
    char name[96];
    int64_t rows, cols; /* cols == 0: a vector */
    float *data;
} tensor_buf;

/* Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the layers; norms start at 1
 * with a small spread so that the weight is visibly applied. */
static void fill(tensor_buf *t, sf_rng *rng, double mean, double std) {
    const int64_t n = t->rows * (t->cols ? t->cols : 1);
    for (int64_t i = 0; i < n; i++) t->data[i] = (float)(mean + std * sf_rng_normal(rng));
}

sf_status sf_random_llm_write(const char *dir, const sf_llm_config *c, uint64_t seed) {
    if (!dir || !c) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_random_llm_write: NULL argument");
    if (c->arch != SF_ARCH_LLAMA ||
        (c->rope.type != SF_ROPE_DEFAULT && c->rope.type != SF_ROPE_LLAMA3) || c->qkv_bias) {
        return sf_fail(SF_ERR_UNSUPPORTED, "sf_random_llm_write: only plain Llama configs");
    }
    const int64_t d = c->hidden_size, ff = c->intermediate_size, v = c->vocab_size;
    const int64_t q_dim = (int64_t)c->num_heads * c->head_dim;
    const int64_t kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    const int n_per_layer = c->attention_bias ? 13 : 9;
    const int64_t n_tensors = 3 + (int64_t)c->num_layers * n_per_layer;

    tensor_buf *ts = calloc((size_t)n_tensors, sizeof *ts);
    sf_st_entry *entries = calloc((size_t)n_tensors, sizeof *entries);
    sf_status st = (ts && entries) ? SF_OK
                                   : sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_random_llm_write: no memory");
    int64_t n = 0;
#define T(r, cl, ...)                                                                          \
    do {                                                                                       \
        snprintf(ts[n].name, sizeof ts[n].name, __VA_ARGS__);                                  \
        ts[n].rows = (r);                                                                      \
        ts[n].cols = (cl);                                                                     \
        n++;                                                                                   \
    } while (0)
    if (st == SF_OK) {
        T(v, d, "model.embed_tokens.weight");
        T(d, 0, "model.norm.weight");
        if (!c->tie_word_embeddings) T(v, d, "lm_head.weight");
        for (int i = 0; i < c->num_layers; i++) {
            T(d, 0, "model.layers.%d.input_layernorm.weight", i);
            T(q_dim, d, "model.layers.%d.self_attn.q_proj.weight", i);
            T(kv_dim, d, "model.layers.%d.self_attn.k_proj.weight", i);
            T(kv_dim, d, "model.layers.%d.self_attn.v_proj.weight", i);
            T(d, q_dim, "model.layers.%d.self_attn.o_proj.weight", i);
            if (c->attention_bias) {
                T(q_dim, 0, "model.layers.%d.self_attn.q_proj.bias", i);
                T(kv_dim, 0, "model.layers.%d.self_attn.k_proj.bias", i);
                T(kv_dim, 0, "model.layers.%d.self_attn.v_proj.bias", i);
                T(d, 0, "model.layers.%d.self_attn.o_proj.bias", i);
            }
            T(d, 0, "model.layers.%d.post_attention_layernorm.weight", i);
            T(ff, d, "model.layers.%d.mlp.gate_proj.weight", i);
            T(ff, d, "model.layers.%d.mlp.up_proj.weight", i);
            T(d, ff, "model.layers.%d.mlp.down_proj.weight", i);
        }
    }
#undef T
    sf_rng rng = sf_rng_seed(seed);
    for (int64_t i = 0; st == SF_OK && i < n; i++) {
        tensor_buf *t = &ts[i];
        t->data = malloc((size_t)(t->rows * (t->cols ? t->cols : 1)) * sizeof(float));
        if (!t->data) {
            st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_random_llm_write: cannot allocate '%s'",
                         t->name);
            break;
        }
        if (strstr(t->name, "norm")) fill(t, &rng, 1.0, 0.1);
        else if (strstr(t->name, "embed")) fill(t, &rng, 0.0, 1.0);
        else if (strstr(t->name, "bias")) fill(t, &rng, 0.0, 0.1);
        else fill(t, &rng, 0.0, 1.0 / sqrt((double)t->cols));
        entries[i].name = t->name;
        entries[i].dtype = SF_DTYPE_F32;
        entries[i].ndim = t->cols ? 2 : 1;
        entries[i].shape[0] = t->rows;
        entries[i].shape[1] = t->cols;
        entries[i].data = t->data;
    }

    const size_t dir_len = strlen(dir);
    char *path = malloc(dir_len + 32);
    if (st == SF_OK && !path) st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_random_llm_write: no memory");
    if (st == SF_OK) {
        snprintf(path, dir_len + 32, "%s/model.safetensors", dir);
        const char *meta[] = {"format", "pt", "generator", "sysformer random-model", NULL};
        st = sf_st_write(path, entries, n, meta);
    }
    if (st == SF_OK) {
        snprintf(path, dir_len + 32, "%s/config.json", dir);
        json_t *j = config_json(c);
        if (!j || json_dump_file(j, path, JSON_INDENT(2) | JSON_REAL_PRECISION(9)) != 0) {
            st = sf_fail(SF_ERR_IO, "%s: cannot write the config", path);
        }
        json_decref(j);
    }
    free(path);
    if (ts) {
        for (int64_t i = 0; i < n; i++) free(ts[i].data);
    }
    free(ts);
    free(entries);
    return st;
}
