/* Fuzzes the config.json parser (host/io/llm_config.c). */
#include "fuzz_common.h"
#include "io/llm_config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    sf_llm_config cfg;
    const sf_status st = sf_llm_config_parse((const char *)data, size, "config.json", &cfg);
    fuzz_check_message(st);
    if (st == SF_OK) sf_llm_config_release(&cfg);
    return 0;
}
