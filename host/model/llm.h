/* Internal: the frozen LLM's weights as held by the CPU reference path. */
#ifndef SF_MODEL_LLM_H
#define SF_MODEL_LLM_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One decoder layer. Pointers point into sf_llm.weights; biases are NULL when absent.
 * Phi-3's fused qkv_proj / gate_up_proj are row blocks of one tensor, so they are seen here as
 * the separate q/k/v and gate/up projections they are (rows of an nn.Linear weight). */
typedef struct sf_llm_layer {
    const float *attn_norm;        /* [d]                          */
    const float *wq, *wk, *wv;     /* [h*hd, d], [kv*hd, d] x 2    */
    const float *bq, *bk, *bv;     /* [h*hd], [kv*hd] x 2, or NULL */
    const float *wo;               /* [d, h*hd]                    */
    const float *bo;               /* [d] or NULL                  */
    const float *mlp_norm;         /* [d]                          */
    const float *w_gate, *w_up;    /* [ff, d] x 2                  */
    const float *w_down;           /* [d, ff]                      */
} sf_llm_layer;

struct sf_llm {
    sf_llm_config cfg;
    float *weights;            /* one fp32 allocation holding every tensor below */
    int64_t n_weights;         /* floats in it                                  */
    const float *embed;        /* [vocab, d]                                    */
    const float *final_norm;   /* [d]                                           */
    const float *lm_head;      /* [vocab, d]; == embed when tied                */
    sf_llm_layer *layers;      /* [num_layers]                                  */
    bool embeddings_only;      /* sf_llm_load_embeddings: only embed is loaded; final_norm,
                                  lm_head (unless tied) and the layers' pointers are NULL */
};

/* SF_OK for a whole model; SF_ERR_UNSUPPORTED, naming fn, for one loaded with its embeddings
 * only (every function that runs the LLM asks this first). */
sf_status sf_llm_check_whole(const sf_llm *llm, const char *fn);

struct sf_kv_cache {
    int32_t n_layers;
    int32_t capacity;
    int32_t length;
    int64_t kv_dim;            /* num_kv_heads * head_dim                 */
    float *k;                  /* [n_layers, capacity, kv_dim]            */
    float *v;                  /* [n_layers, capacity, kv_dim]            */
};

/* Where a model's tensors come from, named as in Hugging Face checkpoints
 * ("model.layers.3.self_attn.q_proj.weight"): a safetensors archive, or a GGUF file whose names
 * and layouts the source translates. */
typedef struct sf_weight_source {
    void *ctx;
    /* Fails (naming the tensor) unless `name` exists with this shape (ndim entries) and can be
     * read as floats. */
    sf_status (*check)(void *ctx, const char *name, int32_t ndim, const int64_t *shape);
    /* Writes the checked tensor to dst as fp32, in Hugging Face layout. */
    sf_status (*read)(void *ctx, const char *name, float *dst);
} sf_weight_source;

/* Builds a model from a parsed config, which it takes over (cfg is zeroed; on failure it is
 * released), checking every tensor the config implies (only the embedding table with
 * embeddings_only) before one fp32 allocation. */
sf_status sf_llm_build(sf_llm_config *cfg, const sf_weight_source *src, bool embeddings_only,
                       sf_llm **out);

/* llm_gguf.c: loads a llama.cpp GGUF file (config from its metadata, tensors dequantised; only
 * the embedding table with embeddings_only). */
sf_status sf_llm_load_gguf(const char *path, bool embeddings_only, sf_llm **out);

#ifdef __cplusplus
}
#endif

#endif
