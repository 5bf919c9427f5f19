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
};

struct sf_kv_cache {
    int32_t n_layers;
    int32_t capacity;
    int32_t length;
    int64_t kv_dim;            /* num_kv_heads * head_dim                 */
    float *k;                  /* [n_layers, capacity, kv_dim]            */
    float *v;                  /* [n_layers, capacity, kv_dim]            */
};

#ifdef __cplusplus
}
#endif

#endif
