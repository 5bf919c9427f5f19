/* Loading a llama.cpp GGUF file as a frozen LLM: the config from the metadata, the tensors
 * dequantised to fp32 and renamed to Hugging Face's names through an sf_weight_source.
 *
 * Name map (GGUF -> Hugging Face):
 *   token_embd.weight          model.embed_tokens.weight
 *   output_norm.weight         model.norm.weight
 *   output.weight              lm_head.weight (absent: tied embeddings)
 *   blk.N.attn_norm.weight     model.layers.N.input_layernorm.weight
 *   blk.N.ffn_norm.weight      model.layers.N.post_attention_layernorm.weight
 *   blk.N.attn_{q,k,v,output}  model.layers.N.self_attn.{q,k,v,o}_proj  (.weight / .bias)
 *   blk.N.ffn_{gate,up,down}   model.layers.N.mlp.{gate,up,down}_proj   (.weight)
 * ggml lists dimensions fastest first, so an nn.Linear weight [out, in] has ne = {in, out} and
 * the same bytes in the same order.
 *
 * llama.cpp's converter reorders the rows of q_proj and k_proj (weights and biases) for the llama
 * architecture, because its RoPE rotates adjacent pairs (x0, x1), (x2, x3), ... where Hugging
 * Face's rotates halves (x_j, x_{j + hd/2}). Within each head of head_dim hd it stores HF row
 * a * hd/2 + j (a in {0, 1}, j < hd/2) at row 2j + a. Reading attn_q / attn_k undoes that (with
 * the query head count for q and the key/value head count for k), so the weights come back in
 * HF's rotate-half layout and the CPU path's RoPE applies unchanged. Qwen2 GGUFs are written
 * unpermuted (llama.cpp runs them with NEOX-style, i.e. rotate-half, RoPE). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "io/gguf.h"
#include "io/llm_config.h"
#include "model/llm.h"

/* The same bounds the config.json parser applies (host/io/llm_config.c): far beyond real models,
 * there so that a hostile file cannot size allocations that overflow or exhaust memory. */
#define GG_MAX_VOCAB (INT64_C(1) << 24)
#define GG_MAX_HIDDEN (INT64_C(1) << 20)
#define GG_MAX_INTERMEDIATE (INT64_C(1) << 22)
#define GG_MAX_LAYERS INT64_C(4096)
#define GG_MAX_HEADS (INT64_C(1) << 14)
#define GG_MAX_HEAD_DIM INT64_C(512)
#define GG_MAX_POSITIONS (INT64_C(1) << 28)

/* transformers' defaults for values a GGUF may leave out. */
#define GG_DEFAULT_RMS_EPS 1e-6
#define GG_DEFAULT_ROPE_THETA 10000.0

enum { GG_NAME_MAX = 96 };

typedef struct gguf_source {
    sf_gguf *g;
    bool permuted_qk; /* llama layout: undo the converter's q/k row permutation */
    int32_t n_heads;
    int32_t n_kv_heads;
} gguf_source;

/* ------------------------------------------------------------------------------------------ */
/* Metadata                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct meta {
    const sf_gguf *g;
    const char *path;
    const char *arch; /* key prefix: "llama", "mistral", "qwen2" */
} meta;

static bool is_int_type(sf_gguf_type t) {
    return t == SF_GGUF_UINT8 || t == SF_GGUF_INT8 || t == SF_GGUF_UINT16 || t == SF_GGUF_INT16 ||
           t == SF_GGUF_UINT32 || t == SF_GGUF_INT32 || t == SF_GGUF_UINT64 || t == SF_GGUF_INT64;
}

/* Element i of an integer array, widened; false if it does not fit in int64. */
static bool array_int(const sf_gguf_kv *kv, uint64_t i, int64_t *out) {
    const unsigned char *p = kv->v.arr.data;
    switch (kv->v.arr.type) {
    case SF_GGUF_UINT8: *out = p[i]; return true;
    case SF_GGUF_INT8: *out = (int8_t)p[i]; return true;
    case SF_GGUF_UINT16: {
        uint16_t x;
        memcpy(&x, p + 2 * i, 2);
        *out = x;
        return true;
    }
    case SF_GGUF_INT16: {
        int16_t x;
        memcpy(&x, p + 2 * i, 2);
        *out = x;
        return true;
    }
    case SF_GGUF_UINT32: {
        uint32_t x;
        memcpy(&x, p + 4 * i, 4);
        *out = x;
        return true;
    }
    case SF_GGUF_INT32: {
        int32_t x;
        memcpy(&x, p + 4 * i, 4);
        *out = x;
        return true;
    }
    case SF_GGUF_UINT64: {
        uint64_t x;
        memcpy(&x, p + 8 * i, 8);
        if (x > (uint64_t)INT64_MAX) return false;
        *out = (int64_t)x;
        return true;
    }
    case SF_GGUF_INT64: memcpy(out, p + 8 * i, 8); return true;
    default: return false;
    }
}

/* Fails with status st and the current last error, prefixed with "<prefix>: " unless prefix is
 * NULL. The message is copied first, since sf_fail writes the buffer sf_last_error() points to. */
static sf_status fail_wrapping(sf_status st, const char *prefix) {
    char cause[1024];
    snprintf(cause, sizeof cause, "%s", sf_last_error());
    if (!prefix) return sf_fail(st, "%s", cause);
    return sf_fail(st, "%s: %s", prefix, cause);
}

/* "<arch>.<suffix>" into buf. */
static const char *arch_key(const meta *m, const char *suffix, char *buf, size_t cap) {
    snprintf(buf, cap, "%s.%s", m->arch, suffix);
    return buf;
}

/* An integer key in [lo, hi]. Absent: *out keeps its default unless required (then NOT_FOUND).
 * With per_layer, a list of n_layers equal integers is accepted too (llama.cpp allows per-layer
 * lists; layers that differ are not implemented). *present says whether the key was there. */
static sf_status get_int_key(const meta *m, const char *key, bool required, int64_t lo,
                             int64_t hi, int64_t n_layers, int32_t *out, bool *present) {
    const sf_gguf_kv *kv = sf_gguf_find(m->g, key);
    if (present) *present = kv != NULL;
    if (!kv) {
        if (required)
            return sf_fail(SF_ERR_NOT_FOUND, "%s: metadata key '%s' is required", m->path, key);
        return SF_OK;
    }
    int64_t x = 0;
    if (kv->type == SF_GGUF_ARRAY && n_layers > 0 && is_int_type(kv->v.arr.type)) {
        if (kv->v.arr.n != (uint64_t)n_layers)
            return sf_fail(SF_ERR_CONFIG, "%s: metadata key '%s' lists %llu values for %lld layers",
                           m->path, key, (unsigned long long)kv->v.arr.n, (long long)n_layers);
        for (uint64_t i = 0; i < kv->v.arr.n; i++) {
            int64_t y = 0;
            if (!array_int(kv, i, &y))
                return sf_fail(SF_ERR_CONFIG, "%s: metadata key '%s'[%llu] does not fit in int64",
                               m->path, key, (unsigned long long)i);
            if (i == 0) x = y;
            else if (y != x)
                return sf_fail(SF_ERR_UNSUPPORTED,
                               "%s: metadata key '%s' differs between layers (%lld at layer 0, "
                               "%lld at layer %llu); per-layer sizes are not supported",
                               m->path, key, (long long)x, (long long)y, (unsigned long long)i);
        }
    } else {
        sf_status st = sf_gguf_get_int(m->g, key, &x);
        if (st == SF_ERR_FORMAT)
            return fail_wrapping(SF_ERR_CONFIG, NULL);
        if (st != SF_OK) return st;
    }
    if (x < lo || x > hi)
        return sf_fail(SF_ERR_CONFIG, "%s: metadata key '%s' = %lld is out of range (must be in "
                       "[%lld, %lld])",
                       m->path, key, (long long)x, (long long)lo, (long long)hi);
    *out = (int32_t)x;
    return SF_OK;
}

/* A positive finite number. Absent: *out keeps its default. */
static sf_status get_real_key(const meta *m, const char *key, double *out, bool *present) {
    const sf_gguf_kv *kv = sf_gguf_find(m->g, key);
    if (present) *present = kv != NULL;
    if (!kv) return SF_OK;
    double x = 0.0;
    sf_status st = sf_gguf_get_float(m->g, key, &x);
    if (st == SF_ERR_FORMAT) return fail_wrapping(SF_ERR_CONFIG, NULL);
    if (st != SF_OK) return st;
    if (!isfinite(x) || !(x > 0.0))
        return sf_fail(SF_ERR_CONFIG, "%s: metadata key '%s' = %.9g must be a positive finite "
                       "number",
                       m->path, key, x);
    *out = x;
    return SF_OK;
}

/* A token id in [0, INT32_MAX], or -1 when absent. */
static sf_status get_token_key(const meta *m, const char *key, int32_t *out) {
    *out = -1;
    return get_int_key(m, key, false, 0, INT32_MAX, 0, out, NULL);
}

static bool string_is(sf_gguf_string s, const char *lit) {
    size_t n = strlen(lit);
    return s.len == n && memcmp(s.data, lit, n) == 0;
}

static sf_status parse_rope_scaling(const meta *m, sf_llm_config *cfg) {
    char key[128];
    cfg->rope.type = SF_ROPE_DEFAULT;
    cfg->rope.factor = 1.0;
    cfg->rope.attention_factor = 1.0;

    /* llama.cpp stores Llama-3.1's wavelength-banded frequencies as a tensor of per-dimension
     * divisors rather than as parameters; that form is not implemented. */
    if (sf_gguf_find_tensor(m->g, "rope_freqs.weight"))
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: tensor 'rope_freqs.weight' (per-dimension RoPE frequency factors, as "
                       "llama.cpp writes Llama-3.1-style 'llama3' rope scaling) is not supported; "
                       "load the Hugging Face checkpoint instead",
                       m->path);

    const sf_gguf_kv *type_kv =
        sf_gguf_find(m->g, arch_key(m, "rope.scaling.type", key, sizeof key));
    double factor = 0.0;
    bool have_factor = false;
    if (type_kv) {
        sf_gguf_string s = {NULL, 0};
        sf_status st = sf_gguf_get_string(m->g, key, &s);
        if (st != SF_OK) return fail_wrapping(SF_ERR_CONFIG, NULL);
        if (string_is(s, "none")) return SF_OK;
        if (!string_is(s, "linear")) {
            int shown = s.len > 64 ? 64 : (int)s.len;
            return sf_fail(
                SF_ERR_UNSUPPORTED,
                "%s: metadata key '%s' = \"%.*s\" is not supported (none and linear are)", m->path,
                key, shown, s.data);
        }
        st = get_real_key(m, arch_key(m, "rope.scaling.factor", key, sizeof key), &factor,
                          &have_factor);
        if (st != SF_OK) return st;
    } else {
        /* Older converters wrote only the linear factor. */
        sf_status st = get_real_key(m, arch_key(m, "rope.scale_linear", key, sizeof key), &factor,
                                    &have_factor);
        if (st != SF_OK) return st;
        if (!have_factor) return SF_OK;
    }
    cfg->rope.type = SF_ROPE_LINEAR;
    cfg->rope.factor = have_factor ? factor : 1.0;
    return SF_OK;
}

static sf_status parse_config(const sf_gguf *g, sf_llm_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    const char *path = sf_gguf_path(g);
    char key[128];

    sf_gguf_string arch = {NULL, 0};
    sf_status st = sf_gguf_get_string(g, "general.architecture", &arch);
    if (st == SF_ERR_NOT_FOUND)
        return sf_fail(SF_ERR_NOT_FOUND, "%s: metadata key 'general.architecture' is required to "
                       "know the model family",
                       path);
    if (st != SF_OK) return st;
    meta m = {g, path, NULL};
    if (string_is(arch, "llama")) {
        m.arch = "llama";
        cfg->arch = SF_ARCH_LLAMA;
    } else if (string_is(arch, "mistral")) {
        m.arch = "mistral";
        cfg->arch = SF_ARCH_MISTRAL;
    } else if (string_is(arch, "qwen2")) {
        m.arch = "qwen2";
        cfg->arch = SF_ARCH_QWEN2;
    } else {
        int shown = arch.len > 64 ? 64 : (int)arch.len;
        return sf_fail(
            SF_ERR_UNSUPPORTED,
            "%s: general.architecture = \"%.*s\" is not supported (llama, mistral, qwen2 "
            "are)",
            path, shown, arch.data);
    }

    st = get_int_key(&m, arch_key(&m, "block_count", key, sizeof key), true, 1, GG_MAX_LAYERS, 0,
                     &cfg->num_layers, NULL);
    const int64_t L = cfg->num_layers;
    if (st == SF_OK)
        st = get_int_key(&m, arch_key(&m, "context_length", key, sizeof key), true, 1,
                         GG_MAX_POSITIONS, 0, &cfg->max_position_embeddings, NULL);
    if (st == SF_OK)
        st = get_int_key(&m, arch_key(&m, "embedding_length", key, sizeof key), true, 1,
                         GG_MAX_HIDDEN, 0, &cfg->hidden_size, NULL);
    if (st == SF_OK)
        st = get_int_key(&m, arch_key(&m, "feed_forward_length", key, sizeof key), true, 1,
                         GG_MAX_INTERMEDIATE, L, &cfg->intermediate_size, NULL);
    if (st == SF_OK)
        st = get_int_key(&m, arch_key(&m, "attention.head_count", key, sizeof key), true, 1,
                         GG_MAX_HEADS, L, &cfg->num_heads, NULL);
    if (st != SF_OK) return st;
    cfg->num_kv_heads = cfg->num_heads;
    st = get_int_key(&m, arch_key(&m, "attention.head_count_kv", key, sizeof key), false, 1,
                     GG_MAX_HEADS, L, &cfg->num_kv_heads, NULL);
    if (st != SF_OK) return st;
    if (cfg->num_heads % cfg->num_kv_heads != 0)
        return sf_fail(SF_ERR_CONFIG, "%s: %s = %d does not divide %s.attention.head_count = %d",
                       path, key, cfg->num_kv_heads, m.arch, cfg->num_heads);

    /* head_dim: attention.key_length, else rope.dimension_count, else hidden / heads. A rotary
     * dimension smaller than the head (partial RoPE) is not implemented. */
    int32_t key_len = 0, rope_dim = 0, value_len = 0;
    bool has_key_len = false, has_rope_dim = false, has_value_len = false;
    char rope_key[128], value_key[128];
    st = get_int_key(&m, arch_key(&m, "attention.key_length", key, sizeof key), false, 1,
                     GG_MAX_HEAD_DIM, 0, &key_len, &has_key_len);
    if (st == SF_OK)
        st = get_int_key(&m, arch_key(&m, "rope.dimension_count", rope_key, sizeof rope_key), false,
                         1, GG_MAX_HEAD_DIM, 0, &rope_dim, &has_rope_dim);
    if (st == SF_OK)
        st = get_int_key(&m, arch_key(&m, "attention.value_length", value_key, sizeof value_key),
                         false, 1, GG_MAX_HEAD_DIM, 0, &value_len, &has_value_len);
    if (st != SF_OK) return st;
    bool derived = !has_key_len && !has_rope_dim;
    if ((derived || cfg->arch == SF_ARCH_LLAMA) && cfg->hidden_size % cfg->num_heads != 0)
        return sf_fail(SF_ERR_CONFIG,
                       "%s: %s.attention.head_count = %d does not divide %s.embedding_length = %d",
                       path, m.arch, cfg->num_heads, m.arch, cfg->hidden_size);
    int32_t hd = has_key_len    ? key_len
                 : has_rope_dim ? rope_dim
                                : cfg->hidden_size / cfg->num_heads;
    if (hd > GG_MAX_HEAD_DIM)
        return sf_fail(SF_ERR_CONFIG,
                       "%s: head_dim = embedding_length / head_count = %d is larger than the %lld "
                       "supported",
                       path, hd, (long long)GG_MAX_HEAD_DIM);
    if (has_rope_dim && rope_dim != hd)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: %s = %d differs from the head dimension %d: partial rotary embeddings "
                       "are not supported",
                       path, rope_key, rope_dim, hd);
    if (has_value_len && value_len != hd)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: %s = %d differs from the key length %d; this is not supported", path,
                       value_key, value_len, hd);
    if (hd % 2 != 0)
        return sf_fail(SF_ERR_CONFIG, "%s: head_dim = %d must be even (RoPE rotates pairs)", path,
                       hd);
    cfg->head_dim = hd;

    double eps = GG_DEFAULT_RMS_EPS;
    st = get_real_key(&m, arch_key(&m, "attention.layer_norm_rms_epsilon", key, sizeof key), &eps,
                      NULL);
    if (st != SF_OK) return st;
    if (!((float)eps > 0.0f) || !isfinite((float)eps))
        return sf_fail(SF_ERR_CONFIG, "%s: metadata key '%s' = %.9g is not representable as a "
                       "float",
                       path, key, eps);
    cfg->rms_norm_eps = (float)eps;
    cfg->rope_theta = GG_DEFAULT_ROPE_THETA;
    st = get_real_key(&m, arch_key(&m, "rope.freq_base", key, sizeof key), &cfg->rope_theta, NULL);
    if (st == SF_OK) st = parse_rope_scaling(&m, cfg);
    if (st != SF_OK) return st;

    /* vocab_size: the metadata key, else the tokenizer's token list, else the embedding rows. */
    bool has_vocab = false;
    st = get_int_key(&m, arch_key(&m, "vocab_size", key, sizeof key), false, 1, GG_MAX_VOCAB, 0,
                     &cfg->vocab_size, &has_vocab);
    if (st != SF_OK) return st;
    if (!has_vocab) {
        const sf_gguf_kv *tokens = sf_gguf_find(g, "tokenizer.ggml.tokens");
        const sf_gguf_tensor *emb = sf_gguf_find_tensor(g, "token_embd.weight");
        int64_t v = -1;
        const char *from = NULL;
        if (tokens && tokens->type == SF_GGUF_ARRAY) {
            v = (int64_t)tokens->v.arr.n;
            from = "the length of tokenizer.ggml.tokens";
        } else if (emb) {
            v = emb->ne[1];
            from = "the rows of token_embd.weight";
        }
        if (!from)
            return sf_fail(SF_ERR_NOT_FOUND,
                           "%s: no %s, tokenizer.ggml.tokens or token_embd.weight to size the "
                           "vocabulary",
                           path, key);
        if (v < 1 || v > GG_MAX_VOCAB)
            return sf_fail(SF_ERR_CONFIG, "%s: vocab size %lld (%s) is out of range (must be in "
                           "[1, %lld])",
                           path, (long long)v, from, (long long)GG_MAX_VOCAB);
        cfg->vocab_size = (int32_t)v;
    }

    /* Mistral's window, when the converter recorded one; llama and qwen2 attend fully (llama.cpp
     * ignores any window for them, and Qwen2's per-layer windows are off by default). */
    cfg->sliding_window = 0;
    if (cfg->arch == SF_ARCH_MISTRAL) {
        st = get_int_key(&m, arch_key(&m, "attention.sliding_window", key, sizeof key), false, 0,
                         INT32_MAX, 0, &cfg->sliding_window, NULL);
        if (st != SF_OK) return st;
    }

    cfg->tie_word_embeddings = sf_gguf_find_tensor(g, "output.weight") == NULL;
    /* Biases: Qwen2 always has them on q/k/v (never on o). llama.cpp's llama graph takes optional
     * biases; on q/k/v alone they map to qkv_bias, together with o to attention_bias. */
    const bool q_bias = sf_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    const bool o_bias = sf_gguf_find_tensor(g, "blk.0.attn_output.bias") != NULL;
    if (cfg->arch == SF_ARCH_QWEN2) {
        cfg->qkv_bias = true;
    } else {
        cfg->attention_bias = q_bias && o_bias;
        cfg->qkv_bias = q_bias && !o_bias;
    }

    cfg->bos_token_id = -1;
    int32_t eos = -1;
    st = get_token_key(&m, "tokenizer.ggml.bos_token_id", &cfg->bos_token_id);
    if (st == SF_OK) st = get_token_key(&m, "tokenizer.ggml.eos_token_id", &eos);
    if (st != SF_OK) return st;
    cfg->n_eos_token_ids = 0;
    if (eos >= 0) cfg->eos_token_ids[cfg->n_eos_token_ids++] = eos;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Tensor names                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef enum qk_kind { QK_NONE, QK_Q, QK_K } qk_kind;

static const struct {
    const char *hf;
    const char *gguf;
    qk_kind kind;
} k_layer_names[] = {
    {"input_layernorm.weight", "attn_norm.weight", QK_NONE},
    {"post_attention_layernorm.weight", "ffn_norm.weight", QK_NONE},
    {"self_attn.q_proj.weight", "attn_q.weight", QK_Q},
    {"self_attn.k_proj.weight", "attn_k.weight", QK_K},
    {"self_attn.v_proj.weight", "attn_v.weight", QK_NONE},
    {"self_attn.o_proj.weight", "attn_output.weight", QK_NONE},
    {"self_attn.q_proj.bias", "attn_q.bias", QK_Q},
    {"self_attn.k_proj.bias", "attn_k.bias", QK_K},
    {"self_attn.v_proj.bias", "attn_v.bias", QK_NONE},
    {"self_attn.o_proj.bias", "attn_output.bias", QK_NONE},
    {"mlp.gate_proj.weight", "ffn_gate.weight", QK_NONE},
    {"mlp.up_proj.weight", "ffn_up.weight", QK_NONE},
    {"mlp.down_proj.weight", "ffn_down.weight", QK_NONE},
};

static const struct {
    const char *hf;
    const char *gguf;
} k_global_names[] = {
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
};

/* Hugging Face name -> GGUF name; false if the name has no counterpart. */
static bool map_name(const char *hf, char *out, size_t cap, qk_kind *kind) {
    *kind = QK_NONE;
    for (size_t i = 0; i < sizeof k_global_names / sizeof k_global_names[0]; i++) {
        if (strcmp(hf, k_global_names[i].hf) == 0) {
            snprintf(out, cap, "%s", k_global_names[i].gguf);
            return true;
        }
    }
    static const char prefix[] = "model.layers.";
    if (strncmp(hf, prefix, sizeof prefix - 1) != 0) return false;
    const char *p = hf + sizeof prefix - 1;
    long layer = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 6) {
        layer = layer * 10 + (*p - '0');
        p++;
        digits++;
    }
    if (digits == 0 || *p != '.') return false;
    p++;
    for (size_t i = 0; i < sizeof k_layer_names / sizeof k_layer_names[0]; i++) {
        if (strcmp(p, k_layer_names[i].hf) == 0) {
            snprintf(out, cap, "blk.%ld.%s", layer, k_layer_names[i].gguf);
            *kind = k_layer_names[i].kind;
            return true;
        }
    }
    return false;
}

/* Whether the config uses GGUF tensor `name`: every tensor in the file must be one the model
 * reads, since an ignored tensor means a feature the forward pass would silently lack. */
static bool tensor_expected(const sf_llm_config *c, const char *name) {
    if (!strcmp(name, "token_embd.weight") || !strcmp(name, "output_norm.weight")) return true;
    if (!strcmp(name, "output.weight")) return !c->tie_word_embeddings;
    static const char prefix[] = "blk.";
    if (strncmp(name, prefix, sizeof prefix - 1) != 0) return false;
    const char *p = name + sizeof prefix - 1;
    long layer = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 6) {
        layer = layer * 10 + (*p - '0');
        p++;
        digits++;
    }
    if (digits == 0 || *p != '.' || layer >= c->num_layers) return false;
    /* Reject "blk.01." so that two spellings cannot name one layer. */
    if (digits > 1 && name[sizeof prefix - 1] == '0') return false;
    p++;
    for (size_t i = 0; i < sizeof k_layer_names / sizeof k_layer_names[0]; i++) {
        if (strcmp(p, k_layer_names[i].gguf) != 0) continue;
        if (!strcmp(p, "attn_output.bias")) return c->attention_bias;
        if (strstr(p, ".bias")) return c->attention_bias || c->qkv_bias;
        return true;
    }
    return false;
}

/* ------------------------------------------------------------------------------------------ */
/* The weight source                                                                           */
/* ------------------------------------------------------------------------------------------ */

static sf_status gg_lookup(const gguf_source *s, const char *name, const sf_gguf_tensor **out,
                           qk_kind *kind) {
    char gname[GG_NAME_MAX];
    *out = NULL;
    if (!map_name(name, gname, sizeof gname, kind))
        return sf_fail(SF_ERR_NOT_FOUND, "%s: tensor '%s' has no GGUF counterpart",
                       sf_gguf_path(s->g), name);
    *out = sf_gguf_find_tensor(s->g, gname);
    if (!*out)
        return sf_fail(SF_ERR_NOT_FOUND, "%s: tensor '%s' (Hugging Face '%s') not found",
                       sf_gguf_path(s->g), gname, name);
    return SF_OK;
}

static sf_status gg_check(void *ctx, const char *name, int32_t ndim, const int64_t *shape) {
    const gguf_source *s = ctx;
    const sf_gguf_tensor *t = NULL;
    qk_kind kind;
    sf_status st = gg_lookup(s, name, &t, &kind);
    if (st != SF_OK) return st;
    /* HF shape [a, b] is ggml ne {b, a}; any further ggml dimensions must be 1. */
    bool same = t->n_dims >= 1 && ndim >= 1 && ndim <= 4;
    for (int i = 0; same && i < 4; i++) {
        int64_t want = i < ndim ? shape[ndim - 1 - i] : 1;
        same = t->ne[i] == want;
    }
    if (!same) {
        char have[96], want[96];
        int64_t ne_rev[4];
        for (int i = 0; i < t->n_dims; i++) ne_rev[i] = t->ne[t->n_dims - 1 - i];
        sf_format_shape(have, sizeof have, t->n_dims, ne_rev);
        sf_format_shape(want, sizeof want, ndim, shape);
        return sf_fail(
            SF_ERR_SHAPE,
            "%s: tensor '%s' (data at byte offset %llu) has shape %s (ggml ne reversed), "
            "expected %s for '%s'",
            sf_gguf_path(s->g), t->name, (unsigned long long)t->file_offset, have, want, name);
    }
    switch (t->type) {
    case SF_GGML_F32:
    case SF_GGML_F16:
    case SF_GGML_BF16:
    case SF_GGML_Q8_0:
    case SF_GGML_Q4_0:
    case SF_GGML_Q4_1:
    case SF_GGML_Q4_K:
    case SF_GGML_Q6_K: break;
    default:
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: tensor '%s' (data at byte offset %llu) has ggml type %s, which cannot "
                       "be dequantised (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K can)",
                       sf_gguf_path(s->g), t->name, (unsigned long long)t->file_offset,
                       sf_ggml_type_name(t->type));
    }
    if (kind != QK_NONE && s->permuted_qk) {
        int32_t heads = kind == QK_Q ? s->n_heads : s->n_kv_heads;
        /* Guaranteed by the config (head_dim even) and the shape check; checked anyway since the
         * row shuffle below relies on it. */
        if (t->ne[1 - (ndim == 1)] % (2 * (int64_t)heads) != 0)
            return sf_fail(SF_ERR_SHAPE, "%s: tensor '%s': rows do not split into %d heads of even "
                           "size",
                           sf_gguf_path(s->g), t->name, heads);
    }
    return SF_OK;
}

/* Undoes the converter's per-head row interleave in place: HF row a * half + j of a head comes
 * from stored row 2j + a. m is [rows, cols], rows = heads * head_dim. */
static sf_status unpermute_rows(float *m, int64_t rows, int64_t cols, int32_t heads,
                                const char *path, const char *name) {
    const int64_t hd = rows / heads, half = hd / 2;
    float *tmp = malloc((size_t)(hd * cols) * sizeof *tmp + 1);
    if (!tmp) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: tensor '%s': out of memory", path, name);
    for (int32_t h = 0; h < heads; h++) {
        float *head = m + (int64_t)h * hd * cols;
        memcpy(tmp, head, (size_t)(hd * cols) * sizeof *tmp);
        for (int64_t a = 0; a < 2; a++)
            for (int64_t j = 0; j < half; j++)
                memcpy(head + (a * half + j) * cols, tmp + (2 * j + a) * cols,
                       (size_t)cols * sizeof *tmp);
    }
    free(tmp);
    return SF_OK;
}

static sf_status gg_read(void *ctx, const char *name, float *dst) {
    const gguf_source *s = ctx;
    const sf_gguf_tensor *t = NULL;
    qk_kind kind;
    sf_status st = gg_lookup(s, name, &t, &kind);
    if (st != SF_OK) return st;
    st = sf_gguf_dequantize(t, dst);
    if (st != SF_OK) return fail_wrapping(st, sf_gguf_path(s->g));
    if (kind == QK_NONE || !s->permuted_qk) return SF_OK;
    /* A weight [rows, in] has ne = {in, rows}; a bias [rows] has ne = {rows}. */
    const bool bias = t->n_dims == 1;
    const int64_t rows = bias ? t->ne[0] : t->ne[1];
    const int64_t cols = bias ? 1 : t->ne[0];
    return unpermute_rows(dst, rows, cols, kind == QK_Q ? s->n_heads : s->n_kv_heads,
                          sf_gguf_path(s->g), t->name);
}

sf_status sf_llm_load_gguf(const char *path, bool embeddings_only, sf_llm **out) {
    if (!path || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_load_gguf: NULL argument");
    *out = NULL;
    sf_gguf *g = NULL;
    sf_status st = sf_gguf_open(path, &g);
    if (st != SF_OK) return st;
    sf_llm_config cfg;
    st = parse_config(g, &cfg);
    for (int64_t i = 0; st == SF_OK && i < sf_gguf_tensor_count(g); i++) {
        const sf_gguf_tensor *t = sf_gguf_tensor_at(g, i);
        if (!tensor_expected(&cfg, t->name))
            st = sf_fail(SF_ERR_UNSUPPORTED,
                         "%s: tensor '%s' (data at byte offset %llu) is not part of the model this "
                         "loader builds (%d layers%s%s%s); it would be ignored",
                         path, t->name, (unsigned long long)t->file_offset, cfg.num_layers,
                         cfg.tie_word_embeddings ? ", tied embeddings" : "",
                         cfg.qkv_bias ? ", q/k/v biases" : "",
                         cfg.attention_bias ? ", q/k/v/o biases" : "");
    }
    if (st != SF_OK) {
        sf_gguf_close(g);
        return st;
    }
    gguf_source src = {g, cfg.arch == SF_ARCH_LLAMA || cfg.arch == SF_ARCH_MISTRAL, cfg.num_heads,
                       cfg.num_kv_heads};
    sf_weight_source ws = {&src, gg_check, gg_read};
    st = sf_llm_build(&cfg, &ws, embeddings_only, out);
    sf_gguf_close(g);
    return st;
}
