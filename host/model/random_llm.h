/* Internal: writing a small random Llama model, the embedded default until a real model ships. */
#ifndef SF_MODEL_RANDOM_LLM_H
#define SF_MODEL_RANDOM_LLM_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The shape of the default random model: a Llama-3-style decoder (GQA, llama3 RoPE scaling)
 * small enough to run anywhere in milliseconds. */
sf_llm_config sf_random_llm_default_config(void);

/* Writes dir/config.json (transformers' format, model_type "llama") and dir/model.safetensors
 * (F32) with weights drawn from a seeded normal distribution. dir must exist. Only the fields
 * of cfg that a Llama config.json carries are used; rope must be default or llama3. */
sf_status sf_random_llm_write(const char *dir, const sf_llm_config *cfg, uint64_t seed);

#ifdef __cplusplus
}
#endif

#endif
