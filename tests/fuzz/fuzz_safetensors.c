/* Fuzzes the safetensors reader (host/io/safetensors.c). Input starting with '{' is a sharded
 * model's model.safetensors.index.json, beside two real shards with distinct tensor names
 * (tests/golden's llm/llama_gqa_llama3/model.safetensors as model-00001-of-00002.safetensors,
 * sysformer/preln_relu_1layer_8heads/sysformer.safetensors as model-00002-of-00002...);
 * anything else is a single model.safetensors. An archive that opens has every tensor of a
 * modest size converted to fp32. */
#include "fuzz_common.h"
#include "io/safetensors.h"

#ifndef SF_FUZZ_DATA
#error "SF_FUZZ_DATA: the repository's tests/golden"
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fuzz_copy(SF_FUZZ_DATA "/llm/llama_gqa_llama3/model.safetensors",
              "model-00001-of-00002.safetensors");
    fuzz_copy(SF_FUZZ_DATA "/sysformer/preln_relu_1layer_8heads/sysformer.safetensors",
              "model-00002-of-00002.safetensors");
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const bool index = size > 0 && data[0] == '{';
    const char *path = fuzz_write(index ? "model.safetensors.index.json" : "model.safetensors",
                                  data, size);
    sf_st_archive *a = NULL;
    const sf_status st = sf_st_open(path, &a);
    fuzz_check_message(st);
    if (st != SF_OK) return 0;
    static float buf[1 << 16];
    for (int64_t i = 0; i < sf_st_count(a); i++) {
        const sf_st_tensor *t = sf_st_at(a, i);
        if (t->numel <= (int64_t)(sizeof buf / sizeof buf[0])) {
            fuzz_check_message(sf_st_to_f32(t, buf));
        }
    }
    sf_st_close(a);
    return 0;
}
