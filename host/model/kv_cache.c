/* The CPU path's per-request key/value cache. */
#include <stdlib.h>

#include "core/error.h"
#include "model/llm.h"

sf_status sf_kv_cache_create(const sf_llm *llm, int32_t capacity, sf_kv_cache **out) {
    if (!llm || !out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_kv_cache_create: NULL argument");
    *out = NULL;
    const sf_llm_config *c = &llm->cfg;
    if (capacity < 1 || capacity > c->max_position_embeddings) {
        return sf_fail(SF_ERR_OUT_OF_RANGE,
                       "sf_kv_cache_create: capacity %d outside [1, %d] (max_position_embeddings)",
                       capacity, c->max_position_embeddings);
    }
    sf_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_kv_cache_create: out of memory");
    kv->n_layers = c->num_layers;
    kv->capacity = capacity;
    kv->kv_dim = (int64_t)c->num_kv_heads * c->head_dim;
    const size_t n = (size_t)kv->n_layers * (size_t)capacity * (size_t)kv->kv_dim;
    kv->k = malloc(n * sizeof(float));
    kv->v = malloc(n * sizeof(float));
    if (!kv->k || !kv->v) {
        sf_kv_cache_free(kv);
        return sf_fail(SF_ERR_OUT_OF_MEMORY, "sf_kv_cache_create: cannot allocate 2 x %zu bytes",
                       n * sizeof(float));
    }
    *out = kv;
    return SF_OK;
}

void sf_kv_cache_free(sf_kv_cache *cache) {
    if (!cache) return;
    free(cache->k);
    free(cache->v);
    free(cache);
}

int32_t sf_kv_cache_length(const sf_kv_cache *cache) { return cache ? cache->length : 0; }

int32_t sf_kv_cache_capacity(const sf_kv_cache *cache) { return cache ? cache->capacity : 0; }

void sf_kv_cache_reset(sf_kv_cache *cache) {
    if (cache) cache->length = 0;
}
