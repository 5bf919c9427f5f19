/* Loading and saving a Sysformer: sysformer.json plus safetensors with PyTorch
 * nn.TransformerDecoder state-dict names (docs/SYSFORMER.md). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/file.h"
#include "io/safetensors.h"
#include "model/llm.h"
#include "sysformer/module.h"

enum { SF_SYSFORMER_JSON_MAX = 1 << 20 };
static const char k_default_weights[] = "sysformer.safetensors";

/* Typed field readers: absent keys keep the default; present keys must have the right type. */
static sf_status read_int(json_t *root, const char *key, const char *path, int32_t *out) {
    json_t *v = json_object_get(root, key);
    if (!v) return SF_OK;
    if (!json_is_integer(v) || json_integer_value(v) < -2147483647LL ||
        json_integer_value(v) > 2147483647LL) {
        return sf_fail(SF_ERR_CONFIG, "%s: \"%s\" must be an integer", path, key);
    }
    *out = (int32_t)json_integer_value(v);
    return SF_OK;
}

static sf_status read_bool(json_t *root, const char *key, const char *path, bool *out) {
    json_t *v = json_object_get(root, key);
    if (!v) return SF_OK;
    if (!json_is_boolean(v)) return sf_fail(SF_ERR_CONFIG, "%s: \"%s\" must be true or false", path, key);
    *out = json_is_true(v);
    return SF_OK;
}

static sf_status read_string(json_t *root, const char *key, const char *path, const char **out) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return SF_OK;
    if (!json_is_string(v)) return sf_fail(SF_ERR_CONFIG, "%s: \"%s\" must be a string", path, key);
    *out = json_string_value(v);
    return SF_OK;
}

/* Fills cfg from the JSON object. String members point into root (copied by the caller). */
static sf_status parse_config(json_t *root, const char *path, sf_sysformer_config *cfg,
                              const char **weights_file, const char **prefix) {
    memset(cfg, 0, sizeof *cfg);
    cfg->num_layers = 2;
    cfg->activation = SF_ACT_RELU;
    cfg->norm_first = false; /* PyTorch's nn.TransformerDecoderLayer default */
    cfg->layer_norm_eps = 1e-5f;

    const char *format = NULL;
    sf_status st = read_string(root, "format", path, &format);
    if (st == SF_OK && format && strcmp(format, "sysformer") != 0) {
        st = sf_fail(SF_ERR_FORMAT, "%s: \"format\" is \"%s\", not \"sysformer\"", path, format);
    }
    if (st == SF_OK && !json_object_get(root, "d_model")) {
        st = sf_fail(SF_ERR_NOT_FOUND, "%s: \"d_model\" is required", path);
    }
    if (st == SF_OK) st = read_int(root, "d_model", path, &cfg->d_model);
    if (st == SF_OK) st = read_int(root, "num_layers", path, &cfg->num_layers);
    if (st == SF_OK) st = read_int(root, "num_heads", path, &cfg->num_heads);
    if (st == SF_OK) {
        st = read_int(root, "system_offset_rows", path, &cfg->system_offset_rows);
    }
    /* default 4 d, when that is an int (a negative d_model is refused later) */
    cfg->dim_feedforward = cfg->d_model > 0 && cfg->d_model <= (1 << 28) ? 4 * cfg->d_model : 0;
    if (st == SF_OK) st = read_int(root, "dim_feedforward", path, &cfg->dim_feedforward);
    if (st == SF_OK) st = read_bool(root, "norm_first", path, &cfg->norm_first);
    if (st == SF_OK) st = read_bool(root, "final_norm", path, &cfg->final_norm);
    const char *act = NULL;
    if (st == SF_OK) st = read_string(root, "activation", path, &act);
    if (st == SF_OK && act) {
        if (!strcmp(act, "relu")) cfg->activation = SF_ACT_RELU;
        else if (!strcmp(act, "gelu")) cfg->activation = SF_ACT_GELU;
        else st = sf_fail(SF_ERR_UNSUPPORTED, "%s: activation \"%s\" (relu or gelu)", path, act);
    }
    json_t *eps = json_object_get(root, "layer_norm_eps");
    if (st == SF_OK && eps) {
        if (!json_is_number(eps)) st = sf_fail(SF_ERR_CONFIG, "%s: \"layer_norm_eps\" must be a number", path);
        else cfg->layer_norm_eps = (float)json_number_value(eps);
    }
    json_t *llm = json_object_get(root, "llm");
    if (st == SF_OK && llm && !json_is_object(llm)) {
        st = sf_fail(SF_ERR_CONFIG, "%s: \"llm\" must be an object", path);
    }
    if (st == SF_OK && llm) {
        st = read_string(llm, "name", path, &cfg->llm_name);
        if (st == SF_OK) st = read_int(llm, "hidden_size", path, &cfg->llm_hidden_size);
        if (st == SF_OK) st = read_int(llm, "vocab_size", path, &cfg->llm_vocab_size);
        if (st == SF_OK) st = read_string(llm, "embedding_hash", path, &cfg->llm_embedding_hash);
    }
    if (st == SF_OK) st = read_string(root, "system_prompt", path, &cfg->system_prompt);
    if (st == SF_OK) st = read_string(root, "chat_template", path, &cfg->chat_template);
    *weights_file = k_default_weights;
    *prefix = "";
    if (st == SF_OK) st = read_string(root, "weights", path, weights_file);
    if (st == SF_OK) st = read_string(root, "tensor_prefix", path, prefix);
    if (st == SF_OK && (strchr(*weights_file, '/') || strstr(*weights_file, ".."))) {
        st = sf_fail(SF_ERR_FORMAT, "%s: \"weights\" must be a file name beside it, not \"%s\"",
                     path, *weights_file);
    }
    return st;
}

/* The classifier is optional in the file; norm.* must agree with final_norm, system_offset
 * with system_offset_rows, and no layer past num_layers may exist (any of these would mean the
 * config does not describe these weights). */
static sf_status check_extra_tensors(const sf_st_archive *ar, const char *prefix,
                                     const sf_sysformer_config *cfg, const char *path) {
    const size_t plen = strlen(prefix);
    for (int64_t i = 0; i < sf_st_count(ar); i++) {
        const char *name = sf_st_at(ar, i)->name;
        if (strncmp(name, prefix, plen) != 0) continue;
        name += plen;
        if (!cfg->final_norm && !strncmp(name, "norm.", 5)) {
            return sf_fail(SF_ERR_CONFIG, "%s: tensor '%s%s' exists but final_norm is false",
                           path, prefix, name);
        }
        if (!cfg->system_offset_rows && !strcmp(name, "system_offset")) {
            return sf_fail(SF_ERR_CONFIG, "%s: tensor '%s%s' exists but system_offset_rows is "
                           "0", path, prefix, name);
        }
        int layer = -1;
        if (sscanf(name, "layers.%d.", &layer) == 1 && (layer < 0 || layer >= cfg->num_layers)) {
            return sf_fail(SF_ERR_CONFIG, "%s: tensor '%s%s' is past num_layers = %d", path,
                           prefix, name, cfg->num_layers);
        }
    }
    return SF_OK;
}

static sf_status load_tensors(sf_sysformer *sf, const sf_st_archive *ar, const char *prefix) {
    int64_t n = 0;
    sf_sysformer_tensor *t = sf_sysformer_tensors(sf, &n);
    if (!t) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sysformer: out of memory");
    sf_status st = SF_OK;
    char name[256];
    for (int64_t i = 0; st == SF_OK && i < n; i++) {
        snprintf(name, sizeof name, "%s%s", prefix, t[i].name);
        const sf_st_tensor *tensor = NULL;
        st = sf_st_get(ar, name, t[i].ndim, t[i].shape, &tensor);
        if (st == SF_OK) st = sf_st_to_f32(tensor, *t[i].slot);
    }
    free(t);
    return st;
}

sf_status sf_sysformer_load(const char *dir, const sf_llm *llm, sf_sysformer **out) {
    if (!dir || !llm || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_load: NULL");
    *out = NULL;
    char *json_path = sf_path_join(dir, "sysformer.json");
    if (!json_path) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_load: out of memory");
    char *text = NULL, *weights_path = NULL;
    size_t len = 0;
    json_t *root = NULL;
    sf_sysformer *sf = NULL;
    sf_st_archive *ar = NULL;
    sf_sysformer_config cfg = {0};
    const char *weights_file = NULL, *prefix = NULL;

    sf_status st = sf_read_file(json_path, SF_SYSFORMER_JSON_MAX, &text, &len);
    if (st == SF_OK) {
        json_error_t err;
        root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &err);
        if (!root) {
            st = sf_fail(SF_ERR_FORMAT, "%s: line %d, column %d: %s", json_path, err.line,
                         err.column, err.text);
        } else if (!json_is_object(root)) {
            st = sf_fail(SF_ERR_FORMAT, "%s: not a JSON object", json_path);
        }
    }
    if (st == SF_OK) st = parse_config(root, json_path, &cfg, &weights_file, &prefix);
    if (st == SF_OK && cfg.num_heads == 0) cfg.num_heads = llm->cfg.num_heads;
    if (st == SF_OK) st = sf_sysformer_check_config(&cfg, llm, json_path);
    if (st == SF_OK) {
        weights_path = sf_path_join(dir, weights_file);
        sf = calloc(1, sizeof *sf);
        if (!weights_path || !sf) st = sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_load: no memory");
    }
    if (st == SF_OK) st = sf_st_open(weights_path, &ar);
    if (st == SF_OK) {
        char name[256];
        snprintf(name, sizeof name, "%sclassifier.weight", prefix);
        cfg.has_classifier = sf_st_find(ar, name) != NULL;
        st = check_extra_tensors(ar, prefix, &cfg, weights_path);
    }
    if (st == SF_OK) st = sf_sysformer_set_config(sf, &cfg);
    if (st == SF_OK) st = sf_sysformer_alloc(sf);
    if (st == SF_OK) st = load_tensors(sf, ar, prefix);

    sf_st_close(ar);
    json_decref(root);
    free(text);
    free(json_path);
    free(weights_path);
    if (st != SF_OK) {
        sf_sysformer_free(sf);
        return st;
    }
    *out = sf;
    return SF_OK;
}

static json_t *config_to_json(const sf_sysformer_config *c) {
    json_t *j = json_object();
    json_object_set_new(j, "format", json_string("sysformer"));
    json_object_set_new(j, "version", json_integer(1));
    json_object_set_new(j, "d_model", json_integer(c->d_model));
    json_object_set_new(j, "num_layers", json_integer(c->num_layers));
    json_object_set_new(j, "num_heads", json_integer(c->num_heads));
    json_object_set_new(j, "dim_feedforward", json_integer(c->dim_feedforward));
    json_object_set_new(j, "activation", json_string(c->activation == SF_ACT_GELU ? "gelu" : "relu"));
    json_object_set_new(j, "norm_first", json_boolean(c->norm_first));
    json_object_set_new(j, "layer_norm_eps", json_real(c->layer_norm_eps));
    json_object_set_new(j, "final_norm", json_boolean(c->final_norm));
    if (c->system_offset_rows > 0) {
        json_object_set_new(j, "system_offset_rows", json_integer(c->system_offset_rows));
    }
    json_object_set_new(j, "weights", json_string(k_default_weights));
    json_t *llm = json_object();
    if (c->llm_name) json_object_set_new(llm, "name", json_string(c->llm_name));
    if (c->llm_hidden_size) json_object_set_new(llm, "hidden_size", json_integer(c->llm_hidden_size));
    if (c->llm_vocab_size) json_object_set_new(llm, "vocab_size", json_integer(c->llm_vocab_size));
    if (c->llm_embedding_hash) {
        json_object_set_new(llm, "embedding_hash", json_string(c->llm_embedding_hash));
    }
    json_object_set_new(j, "llm", llm);
    if (c->system_prompt) json_object_set_new(j, "system_prompt", json_string(c->system_prompt));
    if (c->chat_template) json_object_set_new(j, "chat_template", json_string(c->chat_template));
    return j;
}

sf_status sf_sysformer_save(const sf_sysformer *sf, const char *dir) {
    if (!sf || !dir) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_sysformer_save: NULL");
    int64_t n = 0;
    sf_sysformer_tensor *t = sf_sysformer_tensors((sf_sysformer *)sf, &n);
    sf_st_entry *entries = calloc((size_t)(n + 1), sizeof *entries);
    char *st_path = sf_path_join(dir, k_default_weights);
    char *json_path = sf_path_join(dir, "sysformer.json");
    sf_status st = (t && entries && st_path && json_path)
                       ? SF_OK
                       : sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_sysformer_save: out of memory");
    for (int64_t i = 0; st == SF_OK && i < n; i++) {
        entries[i].name = t[i].name;
        entries[i].dtype = SF_DTYPE_F32;
        entries[i].ndim = t[i].ndim;
        entries[i].shape[0] = t[i].shape[0];
        entries[i].shape[1] = t[i].shape[1];
        entries[i].data = *t[i].slot;
    }
    if (st == SF_OK) {
        const char *meta[] = {"format", "pt", "written_by", "libsysformer", NULL};
        st = sf_st_write(st_path, entries, n, meta);
    }
    if (st == SF_OK) {
        json_t *j = config_to_json(&sf->cfg);
        if (!j || json_dump_file(j, json_path, JSON_INDENT(2) | JSON_REAL_PRECISION(9)) != 0) {
            st = sf_fail(SF_ERR_IO, "%s: cannot write", json_path);
        }
        json_decref(j);
    }
    free(t);
    free(entries);
    free(st_path);
    free(json_path);
    return st;
}
