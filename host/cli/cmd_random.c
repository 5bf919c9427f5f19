/* sysformer random-model: writes the embedded default model. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "model/random_llm.h"

int cmd_random_model(int argc, char **argv) {
    const char *out = NULL;
    unsigned long long seed = 1234;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: sysformer random-model --out DIR [--seed N]\n\n"
                   "Writes a small random Llama model (config.json + model.safetensors, F32) to\n"
                   "DIR: %d layers, hidden %d, GQA %d/%d heads, llama3 RoPE, vocab %d.\n",
                   sf_random_llm_default_config().num_layers,
                   sf_random_llm_default_config().hidden_size,
                   sf_random_llm_default_config().num_heads,
                   sf_random_llm_default_config().num_kv_heads,
                   sf_random_llm_default_config().vocab_size);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer random-model: %s needs a value\n", argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "--out")) out = argv[++i];
        else if (!strcmp(argv[i], "--seed")) seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "sysformer random-model: unknown option '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!out) {
        fprintf(stderr, "sysformer random-model: --out DIR is required\n");
        return 2;
    }
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "sysformer random-model: cannot create %s: %s\n", out, strerror(errno));
        return 1;
    }
    sf_llm_config cfg = sf_random_llm_default_config();
    sf_status st = sf_random_llm_write(out, &cfg, seed);
    if (st != SF_OK) return cli_report("writing the random model", st);
    printf("wrote %s/config.json and %s/model.safetensors (seed %llu)\n", out, out, seed);
    return 0;
}
