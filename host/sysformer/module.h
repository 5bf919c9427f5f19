/* Internal: the Sysformer's weights as held by the CPU path. */
#ifndef SF_SYSFORMER_MODULE_H
#define SF_SYSFORMER_MODULE_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One multi-head attention block, PyTorch nn.MultiheadAttention layout: in_proj stacks the q,
 * k and v projections as row blocks. */
typedef struct sf_mha_weights {
    float *in_proj_weight;  /* [3d, d] */
    float *in_proj_bias;    /* [3d]    */
    float *out_proj_weight; /* [d, d]  */
    float *out_proj_bias;   /* [d]     */
} sf_mha_weights;

typedef struct sf_sysformer_layer {
    sf_mha_weights self_attn;
    sf_mha_weights cross_attn; /* PyTorch's multihead_attn */
    float *linear1_weight;     /* [ff, d] */
    float *linear1_bias;       /* [ff]    */
    float *linear2_weight;     /* [d, ff] */
    float *linear2_bias;       /* [d]     */
    float *norm_weight[3];     /* norm1, norm2, norm3: [d] each */
    float *norm_bias[3];
} sf_sysformer_layer;

struct sf_sysformer {
    sf_sysformer_config cfg; /* string members point into `strings` below */
    char *strings;           /* one block holding the provenance strings  */
    float *weights;          /* one fp32 block holding every tensor       */
    int64_t n_weights;
    sf_sysformer_layer *layers;
    float *final_norm_weight; /* [d] or NULL */
    float *final_norm_bias;
    float *system_offset;     /* [system_offset_rows, d] or NULL */
    float *classifier_weight; /* [1, d] or NULL */
    float *classifier_bias;   /* [1] */
};

/* One tensor of the Sysformer, as named in PyTorch's state dict. */
typedef struct sf_sysformer_tensor {
    char name[96];
    int32_t ndim;
    int64_t shape[2];
    float **slot; /* where its pointer lives in the sf_sysformer */
} sf_sysformer_tensor;

/* Lists every tensor cfg implies, in state-dict order, pointing into sf. *count receives how
 * many; the array is malloc'd (NULL on allocation failure). */
sf_sysformer_tensor *sf_sysformer_tensors(sf_sysformer *sf, int64_t *count);

/* Allocates sf->weights for every listed tensor and points the slots into it (uninitialised).
 * Also allocates sf->layers. */
sf_status sf_sysformer_alloc(sf_sysformer *sf);

/* Copies the provenance strings of src into one block owned by sf (cfg strings re-pointed). */
sf_status sf_sysformer_set_config(sf_sysformer *sf, const sf_sysformer_config *src);

/* X = S + system_offset for every request's system rows (cfg.system_offset_rows > 0; a
 * request's span must have exactly that many rows, else SF_ERR_INVALID_ARGUMENT naming fn). */
sf_status sf_sysformer_add_offset(const sf_sysformer *sf, const int32_t *cu_system,
                                  int32_t n_requests, float *x, const char *fn);

/* Checks cfg on its own and against llm (NULL: skip the LLM checks). */
sf_status sf_sysformer_check_config(const sf_sysformer_config *cfg, const sf_llm *llm,
                                    const char *source);

#ifdef __cplusplus
}
#endif

#endif
