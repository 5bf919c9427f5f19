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
    uint64_t seed = 1234;
    sf_llm_config cfg = sf_random_llm_default_config();
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: sysformer random-model --out DIR [--seed N] [--heads N]\n"
                   "                              [--kv-heads N]\n\n"
                   "Writes a small random Llama model (config.json + model.safetensors, F32) to\n"
                   "DIR: %d layers, hidden %d, GQA %d/%d heads, llama3 RoPE, vocab %d.\n\n"
                   "  --heads N     attention heads (head dim %d / N; the CUDA engine runs head\n"
                   "                dims 64, 80, 96 and 128: --heads 4 or 2)\n"
                   "  --kv-heads N  key/value heads, a divisor of --heads (default: %d, or\n"
                   "                --heads when fewer)\n",
                   cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.vocab_size, cfg.hidden_size, cfg.num_kv_heads);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer random-model: %s needs a value\n", argv[i]);
            return 2;
        }
        int rc = 0;
        if (!strcmp(argv[i], "--out")) out = argv[++i];
        else if (!strcmp(argv[i], "--seed")) {
            rc = cli_parse_seed("random-model", argv[i], argv[i + 1], &seed);
            i++;
        }
        else if (!strcmp(argv[i], "--heads")) {
            rc = cli_parse_count("random-model", argv[i], argv[i + 1], &cfg.num_heads);
            i++;
            if (!rc && cfg.num_kv_heads > cfg.num_heads) cfg.num_kv_heads = cfg.num_heads;
        } else if (!strcmp(argv[i], "--kv-heads")) {
            rc = cli_parse_count("random-model", argv[i], argv[i + 1], &cfg.num_kv_heads);
            i++;
        } else {
            fprintf(stderr, "sysformer random-model: unknown option '%s'\n", argv[i]);
            return 2;
        }
        if (rc) return rc;
    }
    if (cfg.num_heads < 1 || cfg.hidden_size % cfg.num_heads || cfg.num_kv_heads < 1 ||
        cfg.num_heads % cfg.num_kv_heads) {
        fprintf(stderr, "sysformer random-model: --heads must divide %d and --kv-heads must "
                "divide --heads (got %d and %d)\n", cfg.hidden_size, cfg.num_heads,
                cfg.num_kv_heads);
        return 2;
    }
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
    if (!out) {
        fprintf(stderr, "sysformer random-model: --out DIR is required\n");
        return 2;
    }
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "sysformer random-model: cannot create %s: %s\n", out, strerror(errno));
        return 1;
    }
    sf_status st = sf_random_llm_write(out, &cfg, seed);
    if (st != SF_OK) return cli_report("writing the random model", st);
    printf("wrote %s/config.json and %s/model.safetensors (seed %llu)\n", out, out,
           (unsigned long long)seed);
    return 0;
}
