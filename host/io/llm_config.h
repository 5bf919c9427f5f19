/* Internal: parsing a Hugging Face config.json into sf_llm_config. */
#ifndef SF_IO_LLM_CONFIG_H
#define SF_IO_LLM_CONFIG_H

#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Parses config.json text. source names the file in error messages. On success *out is filled
 * and owns rope.short_factor / rope.long_factor (release with sf_llm_config_release). On failure
 * *out holds nothing to release. Unknown keys are ignored; known keys with the wrong JSON type,
 * absurd values (0 layers, heads not dividing hidden_size, kv heads not dividing heads, ...) or
 * features not implemented (another hidden_act, Qwen2's use_sliding_window, ...) fail. */
sf_status sf_llm_config_parse(const char *json, size_t len, const char *source,
                              sf_llm_config *out);

/* Reads and parses a file. */
sf_status sf_llm_config_load(const char *path, sf_llm_config *out);

void sf_llm_config_release(sf_llm_config *cfg);

#ifdef __cplusplus
}
#endif

#endif
