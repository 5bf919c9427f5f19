/* Parsing a Hugging Face config.json into sf_llm_config.
 *
 * The reference is what transformers 5 makes of the same file for the same model_type: its
 * per-class defaults for absent keys, its null handling (num_key_value_heads: null means "as many
 * as the query heads", which differs from absent for Mistral and Qwen2), and its RoPE
 * standardisation, which accepts both the old layout (top-level rope_theta plus a rope_scaling
 * dict with "type" or "rope_type") and the new one (everything inside rope_parameters).
 *
 * Everything read is validated here, once, so that the model code can trust the struct: sizes are
 * positive and bounded so that products of them fit in 64 bits with room to spare, head counts
 * divide as the attention code assumes, and every real number is finite and positive. */
#include "io/llm_config.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/error.h"
#include "core/file.h"

/* config.json files are a few KiB; Phi-3's longrope lists make the largest ones a few tens. */
#define SF_CONFIG_MAX_BYTES ((size_t)16 * 1024 * 1024)

/* Bounds on what a real model can have, generous by orders of magnitude: they exist so that a
 * hostile or corrupted file cannot ask for allocations that overflow or exhaust memory later. */
#define SF_CFG_MAX_VOCAB (INT64_C(1) << 24)
#define SF_CFG_MAX_HIDDEN (INT64_C(1) << 20)
#define SF_CFG_MAX_INTERMEDIATE (INT64_C(1) << 22)
#define SF_CFG_MAX_LAYERS INT64_C(4096)
#define SF_CFG_MAX_HEADS (INT64_C(1) << 14)
#define SF_CFG_MAX_HEAD_DIM INT64_C(512)
#define SF_CFG_MAX_POSITIONS (INT64_C(1) << 28)

/* ------------------------------------------------------------------------------------------ */
/* Per-model_type defaults (the dataclass defaults of transformers' *Config classes)            */
/* ------------------------------------------------------------------------------------------ */

typedef struct arch_defaults {
    const char *model_type;
    sf_arch arch;
    int32_t vocab_size;
    int32_t hidden_size;
    int32_t intermediate_size;
    int32_t num_layers;
    int32_t num_heads;
    int32_t num_kv_heads; /* 0: as many as num_heads (the class default is None) */
    int32_t max_position_embeddings;
    double rms_norm_eps;
    int32_t bos_token_id; /* -1: None */
    int32_t eos_token_id; /* -1: None */
} arch_defaults;

static const arch_defaults k_arch_defaults[] = {
    {"llama", SF_ARCH_LLAMA, 32000, 4096, 11008, 32, 32, 0, 2048, 1e-6, 1, 2},
    {"mistral", SF_ARCH_MISTRAL, 32000, 4096, 14336, 32, 32, 8, 4096 * 32, 1e-6, 1, 2},
    {"qwen2", SF_ARCH_QWEN2, 151936, 4096, 22016, 32, 32, 32, 32768, 1e-6, -1, -1},
    {"phi3", SF_ARCH_PHI3, 32064, 3072, 8192, 32, 32, 0, 4096, 1e-5, 1, 32000},
};

/* transformers' RotaryEmbeddingConfigMixin.default_theta; none of the four classes overrides it. */
static const double k_default_rope_theta = 10000.0;
/* Mistral's class default; an explicit null turns the window off. */
static const int32_t k_mistral_default_window = 4096;
/* Qwen2Config defaults that decide which layers would use the sliding window. */
static const int32_t k_qwen2_default_window = 4096;
static const int32_t k_qwen2_default_max_window_layers = 28;
/* Phi3Config declares original_max_position_embeddings with this default, so for phi3 the
 * attribute always exists and (see resolve_original_max) always wins over the rope dict. */
static const int32_t k_phi3_default_original_max = 4096;

/* ------------------------------------------------------------------------------------------ */
/* Typed key access                                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef enum key_state { KEY_ABSENT, KEY_NULL, KEY_SET } key_state;

/* Where a key lives, for messages: the file, and "" or "rope_scaling." for nested dicts. */
typedef struct scope {
    const char *src;
    const char *prefix;
} scope;

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown JSON value";
}

static key_state state_of(const json_t *v) {
    if (!v) return KEY_ABSENT;
    return json_is_null(v) ? KEY_NULL : KEY_SET;
}

/* Fails on null unless null_ok; callers that treat null specially pass null_ok and look at
 * *state. Absent and null keys leave *out alone, so it can be preloaded with the default. */
static sf_status null_check(const scope *s, const char *key, const json_t *v, bool null_ok,
                            const char *expected) {
    if (json_is_null(v) && !null_ok)
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s: expected %s, got null", s->src, s->prefix, key,
                       expected);
    return SF_OK;
}

/* An integer in [lo, hi]. JSON reals are refused even when integral (64.0), as transformers'
 * strict dataclass validation refuses a float for an int field. */
static sf_status get_int(const scope *s, json_t *obj, const char *key, bool null_ok, int64_t lo,
                         int64_t hi, int32_t *out, key_state *state) {
    json_t *v = json_object_get(obj, key);
    if (state) *state = state_of(v);
    if (!v) return SF_OK;
    sf_status st = null_check(s, key, v, null_ok, "an integer");
    if (st != SF_OK || json_is_null(v)) return st;
    if (!json_is_integer(v))
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s: expected an integer, got %s", s->src, s->prefix,
                       key, type_name(v));
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s = %lld is out of range (must be in [%lld, %lld])",
                       s->src, s->prefix, key, (long long)x, (long long)lo, (long long)hi);
    *out = (int32_t)x;
    return SF_OK;
}

/* A finite number > 0. Integers are accepted wherever the value is real-valued: rope_theta is
 * written 10000 as often as 10000.0, and Python's json would hand either to transformers. */
static sf_status get_positive_real(const scope *s, json_t *obj, const char *key, bool null_ok,
                                   double *out, key_state *state) {
    json_t *v = json_object_get(obj, key);
    if (state) *state = state_of(v);
    if (!v) return SF_OK;
    sf_status st = null_check(s, key, v, null_ok, "a number");
    if (st != SF_OK || json_is_null(v)) return st;
    if (!json_is_number(v))
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s: expected a number, got %s", s->src, s->prefix, key,
                       type_name(v));
    double x = json_number_value(v);
    if (!isfinite(x) || !(x > 0.0))
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s = %.9g must be a positive finite number", s->src,
                       s->prefix, key, x);
    *out = x;
    return SF_OK;
}

static sf_status get_bool(const scope *s, json_t *obj, const char *key, bool *out) {
    json_t *v = json_object_get(obj, key);
    if (!v) return SF_OK;
    if (!json_is_boolean(v))
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s: expected true or false, got %s", s->src, s->prefix,
                       key, type_name(v));
    *out = json_is_true(v);
    return SF_OK;
}

static sf_status get_string(const scope *s, json_t *obj, const char *key, const char **out) {
    json_t *v = json_object_get(obj, key);
    if (!v) return SF_OK;
    if (!json_is_string(v))
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s: expected a string, got %s", s->src, s->prefix, key,
                       type_name(v));
    *out = json_string_value(v);
    return SF_OK;
}

static sf_status require(const scope *s, json_t *obj, const char *key, const char *why) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return sf_fail(SF_ERR_NOT_FOUND, "%s: %s%s is required %s", s->src, s->prefix, key, why);
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Token ids                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* Ids are not checked against vocab_size: transformers only warns about that, and an eos id the
 * model can never emit is harmless. Negative ids are refused because -1 means "none" here. */
static sf_status parse_eos(const scope *s, json_t *root, int32_t default_eos, sf_llm_config *cfg) {
    json_t *v = json_object_get(root, "eos_token_id");
    cfg->n_eos_token_ids = 0;
    if (!v) {
        if (default_eos >= 0) cfg->eos_token_ids[cfg->n_eos_token_ids++] = default_eos;
        return SF_OK;
    }
    if (json_is_null(v)) return SF_OK;
    if (json_is_integer(v)) {
        int32_t id = 0;
        sf_status st = get_int(s, root, "eos_token_id", false, 0, INT32_MAX, &id, NULL);
        if (st != SF_OK) return st;
        cfg->eos_token_ids[cfg->n_eos_token_ids++] = id;
        return SF_OK;
    }
    if (!json_is_array(v))
        return sf_fail(SF_ERR_CONFIG,
                       "%s: eos_token_id: expected an integer, a list of integers or null, got %s",
                       s->src, type_name(v));
    size_t n = json_array_size(v);
    if (n > SF_MAX_EOS_IDS)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: eos_token_id lists %zu ids, more than the %d supported", s->src, n,
                       SF_MAX_EOS_IDS);
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_integer(e))
            return sf_fail(SF_ERR_CONFIG, "%s: eos_token_id[%zu]: expected an integer, got %s",
                           s->src, i, type_name(e));
        json_int_t x = json_integer_value(e);
        if (x < 0 || x > INT32_MAX)
            return sf_fail(SF_ERR_CONFIG,
                           "%s: eos_token_id[%zu] = %lld is out of range (must be in [0, %d])",
                           s->src, i, (long long)x, INT32_MAX);
        cfg->eos_token_ids[cfg->n_eos_token_ids++] = (int32_t)x;
    }
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* RoPE                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Reads a longrope factor list into a new array of exactly n floats. The kernels index it by
 * frequency, so any other length would read out of bounds or silently drop frequencies. */
static sf_status get_factor_list(const scope *s, json_t *rope, const char *key, int32_t n,
                                 float **out) {
    *out = NULL;
    sf_status st = require(s, rope, key, "for longrope");
    if (st != SF_OK) return st;
    json_t *v = json_object_get(rope, key);
    if (!json_is_array(v))
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s: expected a list of numbers, got %s", s->src,
                       s->prefix, key, type_name(v));
    size_t len = json_array_size(v);
    if (len != (size_t)n)
        return sf_fail(SF_ERR_CONFIG, "%s: %s%s has %zu entries, but head_dim / 2 = %d are needed",
                       s->src, s->prefix, key, len, n);
    float *a = malloc((size_t)n * sizeof *a);
    if (!a)
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: cannot allocate %s%s", s->src, s->prefix, key);
    for (size_t i = 0; i < len; i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_number(e)) {
            free(a);
            return sf_fail(SF_ERR_CONFIG, "%s: %s%s[%zu]: expected a number, got %s", s->src,
                           s->prefix, key, i, type_name(e));
        }
        double x = json_number_value(e);
        /* A factor divides the frequency; zero, negative or beyond float range is nonsense. */
        if (!(x > 0.0) || !(x <= FLT_MAX)) {
            free(a);
            return sf_fail(SF_ERR_CONFIG, "%s: %s%s[%zu] = %.9g must be a positive finite number",
                           s->src, s->prefix, key, i, x);
        }
        a[i] = (float)x;
    }
    *out = a;
    return SF_OK;
}

/* The context length the scaled RoPE types were pretrained with. transformers' standardisation
 * gives a top-level original_max_position_embeddings priority over the one inside the rope dict
 * (the model re-standardises when building its rotary embedding, after all config attributes are
 * set). Phi3Config declares that attribute with a default, so for phi3 it is never absent. The
 * rope dict comes next, then max_position_embeddings. */
static sf_status resolve_original_max(const scope *top, const scope *rs, json_t *root, json_t *rope,
                                      sf_arch arch, int32_t max_pos, int32_t *out) {
    int32_t v = 0;
    key_state st_top = KEY_ABSENT;
    sf_status st = get_int(top, root, "original_max_position_embeddings", true, 1,
                           SF_CFG_MAX_POSITIONS, &v, &st_top);
    if (st != SF_OK) return st;
    if (st_top == KEY_SET) {
        *out = v;
        return SF_OK;
    }
    if (arch == SF_ARCH_PHI3 && st_top == KEY_ABSENT) {
        *out = k_phi3_default_original_max;
        return SF_OK;
    }
    key_state st_rope = KEY_ABSENT;
    st = get_int(rs, rope, "original_max_position_embeddings", false, 1, SF_CFG_MAX_POSITIONS, &v,
                 &st_rope);
    if (st != SF_OK) return st;
    *out = st_rope == KEY_SET ? v : max_pos;
    return SF_OK;
}

/* Picks the rope dict the way transformers' convert_rope_params_to_dict does: a non-empty
 * rope_scaling (old checkpoints) wins over rope_parameters (what transformers 5 writes). Sets
 * *rope to NULL when neither is there, and *name to the key, for messages. */
static sf_status pick_rope_dict(const scope *top, json_t *root, json_t **rope, const char **name) {
    *rope = NULL;
    *name = "rope_parameters";
    static const char *const keys[] = {"rope_scaling", "rope_parameters"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        json_t *v = json_object_get(root, keys[k]);
        if (!v || json_is_null(v)) continue;
        if (!json_is_object(v))
            return sf_fail(SF_ERR_CONFIG, "%s: %s: expected an object or null, got %s", top->src,
                           keys[k], type_name(v));
        if (json_object_size(v) == 0) continue; /* {} is falsy in Python: fall through */
        *rope = v;
        *name = keys[k];
        return SF_OK;
    }
    return SF_OK;
}

static sf_status parse_rope(const scope *top, json_t *root, sf_llm_config *cfg, float **short_f,
                            float **long_f) {
    json_t *rope = NULL;
    const char *rope_key = NULL;
    sf_status st = pick_rope_dict(top, root, &rope, &rope_key);
    if (st != SF_OK) return st;

    char prefix[32];
    snprintf(prefix, sizeof prefix, "%s.", rope_key);
    const scope rs = {top->src, prefix};
    json_t *empty = NULL;
    if (!rope) {
        /* No dict: everything comes from top-level keys and defaults. An empty object keeps the
         * lookups below uniform. */
        empty = json_object();
        if (!empty) return sf_fail(SF_ERR_OUT_OF_MEMORY, "%s: out of memory", top->src);
        rope = empty;
    }

    /* Models that give each layer type its own rope dict nest them under the type's name. */
    if (json_object_get(rope, "full_attention") || json_object_get(rope, "sliding_attention")) {
        st = sf_fail(SF_ERR_UNSUPPORTED, "%s: %s: per-layer-type RoPE parameters are not supported",
                     top->src, rope_key);
        goto done;
    }

    /* rope_theta: the dict's own value, else the top-level key, else the class default. */
    key_state ks = KEY_ABSENT;
    double theta = k_default_rope_theta;
    st = get_positive_real(&rs, rope, "rope_theta", false, &theta, &ks);
    if (st != SF_OK) goto done;
    if (ks == KEY_ABSENT) {
        st = get_positive_real(top, root, "rope_theta", false, &theta, NULL);
        if (st != SF_OK) goto done;
    }
    cfg->rope_theta = theta;

    /* Only full rotation is implemented. The dict's value wins over the top-level one. */
    double partial = 1.0;
    st = get_positive_real(&rs, rope, "partial_rotary_factor", true, &partial, &ks);
    if (st != SF_OK) goto done;
    if (ks != KEY_SET) {
        st = get_positive_real(top, root, "partial_rotary_factor", true, &partial, NULL);
        if (st != SF_OK) goto done;
    }
    if (partial != 1.0) {
        st = sf_fail(SF_ERR_UNSUPPORTED,
                     "%s: partial_rotary_factor = %.9g: only full rotary embeddings (1.0) are "
                     "supported",
                     top->src, partial);
        goto done;
    }

    /* "type" is the pre-4.45 spelling of "rope_type"; when both are present rope_type wins. */
    const char *type = "default";
    const char *type_key = json_object_get(rope, "rope_type") ? "rope_type" : "type";
    st = get_string(&rs, rope, type_key, &type);
    if (st != SF_OK) goto done;
    /* Phi3Config maps the LongRoPE paper's original name "su" (and "yarn") onto longrope. */
    if (cfg->arch == SF_ARCH_PHI3 && (!strcmp(type, "su") || !strcmp(type, "yarn")))
        type = "longrope";

    cfg->rope.factor = 1.0;
    cfg->rope.attention_factor = 1.0;
    if (!strcmp(type, "default")) {
        cfg->rope.type = SF_ROPE_DEFAULT;
    } else if (!strcmp(type, "linear") && cfg->arch != SF_ARCH_PHI3) {
        cfg->rope.type = SF_ROPE_LINEAR;
        st = require(&rs, rope, "factor", "for linear RoPE");
        if (st == SF_OK)
            st = get_positive_real(&rs, rope, "factor", false, &cfg->rope.factor, NULL);
    } else if (!strcmp(type, "llama3") && cfg->arch != SF_ARCH_PHI3) {
        cfg->rope.type = SF_ROPE_LLAMA3;
        static const char *const needed[] = {"factor", "low_freq_factor", "high_freq_factor"};
        for (size_t i = 0; i < 3 && st == SF_OK; i++)
            st = require(&rs, rope, needed[i], "for llama3 RoPE");
        if (st == SF_OK)
            st = get_positive_real(&rs, rope, "factor", false, &cfg->rope.factor, NULL);
        if (st == SF_OK)
            st = get_positive_real(&rs, rope, "low_freq_factor", false, &cfg->rope.low_freq_factor,
                                   NULL);
        if (st == SF_OK)
            st = get_positive_real(&rs, rope, "high_freq_factor", false,
                                   &cfg->rope.high_freq_factor, NULL);
        if (st == SF_OK && !(cfg->rope.high_freq_factor > cfg->rope.low_freq_factor))
            st =
                sf_fail(SF_ERR_CONFIG,
                        "%s: %shigh_freq_factor = %.9g must be greater than low_freq_factor = %.9g",
                        top->src, prefix, cfg->rope.high_freq_factor, cfg->rope.low_freq_factor);
        if (st == SF_OK)
            st = resolve_original_max(top, &rs, root, rope, cfg->arch, cfg->max_position_embeddings,
                                      &cfg->rope.original_max_position_embeddings);
    } else if (!strcmp(type, "longrope")) {
        cfg->rope.type = SF_ROPE_LONGROPE;
        int32_t orig = 0;
        st = resolve_original_max(top, &rs, root, rope, cfg->arch, cfg->max_position_embeddings,
                                  &orig);
        if (st != SF_OK) goto done;
        cfg->rope.original_max_position_embeddings = orig;
        /* The factor defaults to how far max_position_embeddings stretches the pretrained
         * context; transformers computes it in Python floats, i.e. doubles. */
        double factor = (double)cfg->max_position_embeddings / (double)orig;
        st = get_positive_real(&rs, rope, "factor", true, &factor, NULL);
        if (st != SF_OK) goto done;
        cfg->rope.factor = factor;
        key_state as = KEY_ABSENT;
        double attn = 1.0;
        st = get_positive_real(&rs, rope, "attention_factor", true, &attn, &as);
        if (st != SF_OK) goto done;
        if (as != KEY_SET && factor > 1.0) {
            /* The LongRoPE paper's attention temperature. ln(1) = 0 would divide by zero. */
            if (orig < 2) {
                st = sf_fail(SF_ERR_CONFIG,
                             "%s: original_max_position_embeddings = %d is too small for longrope "
                             "scaling",
                             top->src, orig);
                goto done;
            }
            attn = sqrt(1.0 + log(factor) / log((double)orig));
        }
        cfg->rope.attention_factor = attn;
        st = get_factor_list(&rs, rope, "short_factor", cfg->head_dim / 2, short_f);
        if (st == SF_OK) st = get_factor_list(&rs, rope, "long_factor", cfg->head_dim / 2, long_f);
    } else {
        st = sf_fail(SF_ERR_UNSUPPORTED, "%s: %s%s = \"%s\" is not supported for %s", top->src,
                     prefix, type_key, type,
                     cfg->arch == SF_ARCH_PHI3 ? "phi3 (default or longrope only)"
                                               : "this model (default, linear, llama3, longrope)");
    }

done:
    json_decref(empty);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Sliding window                                                                              */
/* ------------------------------------------------------------------------------------------ */

static sf_status parse_sliding_window(const scope *s, json_t *root, sf_llm_config *cfg) {
    cfg->sliding_window = 0;
    switch (cfg->arch) {
    case SF_ARCH_LLAMA:
        /* LlamaAttention has no window: the key, if someone wrote it, has no effect. */
        return SF_OK;
    case SF_ARCH_MISTRAL:
    case SF_ARCH_PHI3: {
        int32_t w = cfg->arch == SF_ARCH_MISTRAL ? k_mistral_default_window : 0;
        key_state ks = KEY_ABSENT;
        sf_status st = get_int(s, root, "sliding_window", true, 1, INT32_MAX, &w, &ks);
        if (st != SF_OK) return st;
        cfg->sliding_window = ks == KEY_NULL ? 0 : w;
        return SF_OK;
    }
    case SF_ARCH_QWEN2: {
        /* Qwen2 slides only layers >= max_window_layers, and only with use_sliding_window; an
         * explicit layer_types list replaces that rule. Per-layer windows are not implemented,
         * so any configuration that would actually slide some layer is refused. */
        json_t *lt = json_object_get(root, "layer_types");
        if (lt && !json_is_null(lt)) {
            if (!json_is_array(lt))
                return sf_fail(SF_ERR_CONFIG, "%s: layer_types: expected a list of strings, got %s",
                               s->src, type_name(lt));
            for (size_t i = 0; i < json_array_size(lt); i++) {
                json_t *e = json_array_get(lt, i);
                if (!json_is_string(e))
                    return sf_fail(SF_ERR_CONFIG, "%s: layer_types[%zu]: expected a string, got %s",
                                   s->src, i, type_name(e));
                if (strcmp(json_string_value(e), "full_attention") != 0)
                    return sf_fail(SF_ERR_UNSUPPORTED,
                                   "%s: layer_types[%zu] = \"%s\": only full_attention layers are "
                                   "supported for qwen2",
                                   s->src, i, json_string_value(e));
            }
        }
        bool use = false;
        sf_status st = get_bool(s, root, "use_sliding_window", &use);
        if (st != SF_OK) return st;
        int32_t w = k_qwen2_default_window;
        key_state ks = KEY_ABSENT;
        st = get_int(s, root, "sliding_window", true, 1, INT32_MAX, &w, &ks);
        if (st != SF_OK) return st;
        int32_t mwl = k_qwen2_default_max_window_layers;
        st = get_int(s, root, "max_window_layers", false, 0, INT32_MAX, &mwl, NULL);
        if (st != SF_OK) return st;
        bool explicit_types = lt && !json_is_null(lt);
        if (use && ks != KEY_NULL && !explicit_types && mwl < cfg->num_layers)
            return sf_fail(SF_ERR_UNSUPPORTED,
                           "%s: use_sliding_window = true (window %d on layers %d..%d): Qwen2's "
                           "per-layer sliding windows are not supported",
                           s->src, w, mwl, cfg->num_layers - 1);
        return SF_OK;
    }
    }
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* The whole config                                                                            */
/* ------------------------------------------------------------------------------------------ */

static sf_status parse_root(const scope *s, json_t *root, sf_llm_config *cfg, float **short_f,
                            float **long_f) {
    const char *model_type = NULL;
    sf_status st = require(s, root, "model_type", "to know the architecture");
    if (st == SF_OK) st = get_string(s, root, "model_type", &model_type);
    if (st != SF_OK) return st;
    const arch_defaults *d = NULL;
    for (size_t i = 0; i < sizeof k_arch_defaults / sizeof k_arch_defaults[0]; i++)
        if (!strcmp(model_type, k_arch_defaults[i].model_type)) d = &k_arch_defaults[i];
    if (!d)
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: model_type = \"%s\" is not supported (llama, mistral, qwen2, phi3 are)",
                       s->src, model_type);
    cfg->arch = d->arch;

    /* Features the forward pass does not implement are refused before anything is sized. */
    const char *act = "silu";
    st = get_string(s, root, "hidden_act", &act);
    if (st != SF_OK) return st;
    /* transformers maps "swish" to the same nn.SiLU. */
    if (strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0)
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: hidden_act = \"%s\" is not supported (only silu)",
                       s->src, act);

    cfg->vocab_size = d->vocab_size;
    cfg->hidden_size = d->hidden_size;
    cfg->intermediate_size = d->intermediate_size;
    cfg->num_layers = d->num_layers;
    cfg->num_heads = d->num_heads;
    cfg->max_position_embeddings = d->max_position_embeddings;
    st = get_int(s, root, "vocab_size", false, 1, SF_CFG_MAX_VOCAB, &cfg->vocab_size, NULL);
    if (st == SF_OK)
        st = get_int(s, root, "hidden_size", false, 1, SF_CFG_MAX_HIDDEN, &cfg->hidden_size, NULL);
    if (st == SF_OK)
        st = get_int(s, root, "intermediate_size", false, 1, SF_CFG_MAX_INTERMEDIATE,
                     &cfg->intermediate_size, NULL);
    if (st == SF_OK)
        st = get_int(s, root, "num_hidden_layers", false, 1, SF_CFG_MAX_LAYERS, &cfg->num_layers,
                     NULL);
    if (st == SF_OK)
        st = get_int(s, root, "num_attention_heads", false, 1, SF_CFG_MAX_HEADS, &cfg->num_heads,
                     NULL);
    if (st == SF_OK)
        st = get_int(s, root, "max_position_embeddings", false, 1, SF_CFG_MAX_POSITIONS,
                     &cfg->max_position_embeddings, NULL);
    if (st != SF_OK) return st;

    /* Absent means the class default (8 for Mistral, 32 for Qwen2); null means "no GQA",
     * except for Mistral, whose field is a plain int that transformers 5 refuses to set to None. */
    key_state ks = KEY_ABSENT;
    int32_t kv = d->num_kv_heads;
    st = get_int(s, root, "num_key_value_heads", cfg->arch != SF_ARCH_MISTRAL, 1, SF_CFG_MAX_HEADS,
                 &kv, &ks);
    if (st != SF_OK) return st;
    if (ks == KEY_NULL || kv == 0) kv = cfg->num_heads;
    if (cfg->num_heads % kv != 0)
        return sf_fail(SF_ERR_CONFIG,
                       "%s: num_key_value_heads = %d does not divide num_attention_heads = %d",
                       s->src, kv, cfg->num_heads);
    cfg->num_kv_heads = kv;

    /* LlamaConfig validates the divisibility even when head_dim is given; the other classes
     * only need it when head_dim is derived from it. */
    int32_t hd = 0;
    st = get_int(s, root, "head_dim", true, 1, SF_CFG_MAX_HEAD_DIM, &hd, &ks);
    if (st != SF_OK) return st;
    bool derived = ks != KEY_SET;
    if ((derived || cfg->arch == SF_ARCH_LLAMA) && cfg->hidden_size % cfg->num_heads != 0)
        return sf_fail(SF_ERR_CONFIG,
                       "%s: num_attention_heads = %d does not divide hidden_size = %d", s->src,
                       cfg->num_heads, cfg->hidden_size);
    if (derived) {
        hd = cfg->hidden_size / cfg->num_heads;
        if (hd > SF_CFG_MAX_HEAD_DIM)
            return sf_fail(SF_ERR_CONFIG,
                           "%s: head_dim = hidden_size / num_attention_heads = %d is larger than "
                           "the %lld supported",
                           s->src, hd, (long long)SF_CFG_MAX_HEAD_DIM);
    }
    /* RoPE rotates pairs of dimensions. */
    if (hd % 2 != 0)
        return sf_fail(SF_ERR_CONFIG, "%s: head_dim = %d%s must be even", s->src, hd,
                       derived ? " (hidden_size / num_attention_heads)" : "");
    cfg->head_dim = hd;

    /* The struct holds a float, so the value must survive the narrowing as a positive number. */
    double eps = d->rms_norm_eps;
    st = get_positive_real(s, root, "rms_norm_eps", false, &eps, NULL);
    if (st != SF_OK) return st;
    if (!((float)eps > 0.0f) || !isfinite((float)eps))
        return sf_fail(SF_ERR_CONFIG, "%s: rms_norm_eps = %.9g is not representable as a float",
                       s->src, eps);
    cfg->rms_norm_eps = (float)eps;

    cfg->tie_word_embeddings = false;
    st = get_bool(s, root, "tie_word_embeddings", &cfg->tie_word_embeddings);
    if (st != SF_OK) return st;

    cfg->attention_bias = false;
    cfg->qkv_bias = false;
    if (cfg->arch == SF_ARCH_LLAMA) {
        st = get_bool(s, root, "attention_bias", &cfg->attention_bias);
        if (st != SF_OK) return st;
        bool mlp_bias = false;
        st = get_bool(s, root, "mlp_bias", &mlp_bias);
        if (st != SF_OK) return st;
        if (mlp_bias)
            return sf_fail(SF_ERR_UNSUPPORTED, "%s: mlp_bias = true is not supported", s->src);
    } else if (cfg->arch == SF_ARCH_QWEN2) {
        /* Qwen2Attention hard-codes bias on q/k/v and none on o; there is no key for it. */
        cfg->qkv_bias = true;
    }

    cfg->bos_token_id = d->bos_token_id;
    st = get_int(s, root, "bos_token_id", true, 0, INT32_MAX, &cfg->bos_token_id, &ks);
    if (st != SF_OK) return st;
    if (ks == KEY_NULL) cfg->bos_token_id = -1;
    st = parse_eos(s, root, d->eos_token_id, cfg);
    if (st != SF_OK) return st;

    st = parse_sliding_window(s, root, cfg);
    if (st != SF_OK) return st;
    return parse_rope(s, root, cfg, short_f, long_f);
}

sf_status sf_llm_config_parse(const char *json, size_t len, const char *source,
                              sf_llm_config *out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_config_parse: out is NULL");
    memset(out, 0, sizeof *out);
    const char *src = source ? source : "config.json";
    if (!json && len > 0)
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: sf_llm_config_parse: json is NULL", src);

    json_error_t err;
    /* Duplicate keys are refused: which of two "hidden_size" entries wins is parser-dependent,
     * and a file that disagrees with itself should not silently load. */
    json_t *root = json_loadb(json ? json : "", len, JSON_REJECT_DUPLICATES, &err);
    if (!root)
        return sf_fail(SF_ERR_FORMAT, "%s: invalid JSON at line %d, column %d: %s", src, err.line,
                       err.column, err.text);
    if (!json_is_object(root)) {
        const char *what = type_name(root);
        json_decref(root);
        return sf_fail(SF_ERR_FORMAT, "%s: expected a JSON object at the top level, got %s", src,
                       what);
    }

    sf_llm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    float *short_f = NULL, *long_f = NULL;
    const scope s = {src, ""};
    sf_status st = parse_root(&s, root, &cfg, &short_f, &long_f);
    json_decref(root);
    if (st != SF_OK) {
        free(short_f);
        free(long_f);
        return st;
    }
    cfg.rope.short_factor = short_f;
    cfg.rope.long_factor = long_f;
    *out = cfg;
    return SF_OK;
}

sf_status sf_llm_config_load(const char *path, sf_llm_config *out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_config_load: out is NULL");
    memset(out, 0, sizeof *out);
    if (!path) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_llm_config_load: path is NULL");
    char *data = NULL;
    size_t len = 0;
    sf_status st = sf_read_file(path, SF_CONFIG_MAX_BYTES, &data, &len);
    if (st != SF_OK) return st;
    st = sf_llm_config_parse(data, len, path, out);
    free(data);
    return st;
}

void sf_llm_config_release(sf_llm_config *cfg) {
    if (!cfg) return;
    /* The arrays were malloc'd by sf_llm_config_parse; the struct exposes them as const only so
     * that users of a model's config cannot write through them. */
    free((void *)cfg->rope.short_factor);
    free((void *)cfg->rope.long_factor);
    cfg->rope.short_factor = NULL;
    cfg->rope.long_factor = NULL;
}
