/* sysformer — command-line front end of libsysformer. The library never prints; this does. */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "core/native_blas.h"

int cmd_train(int argc, char **argv); /* cmd_train.c */
int cmd_judge(int argc, char **argv); /* cmd_judge.c */
int cmd_eval(int argc, char **argv);  /* cmd_eval.c */

static void usage(FILE *out) {
    fprintf(out,
            "usage: sysformer <command> [options]\n"
            "\n"
            "commands:\n"
            "  generate       reply to a prompt, or to a JSONL file of prompts\n"
            "  chat           an interactive conversation\n"
            "  forward        run token ids through a model and print the top next tokens\n"
            "  info           print a model's configuration\n"
            "  init           create a new Sysformer for a model\n"
            "  rewrite        write a system prompt's embeddings before and after a Sysformer\n"
            "  train          train a Sysformer for a model on prompt datasets\n"
            "  judge          the refusal rate of a JSONL file of replies\n"
            "  eval           refusal rates of every method (baselines, Sysformer) on prompt sets\n"
            "  random-model   write a small random Llama model (the embedded default)\n"
            "  version        print the library version\n"
            "\n"
            "generate and chat run on the GPU when this build has CUDA support and a GPU is\n"
            "present, else on the CPU; --device cpu|cuda chooses (forward: cpu unless asked).\n"
            "Run 'sysformer <command> --help' for a command's options.\n");
}

int cli_report(const char *what, sf_status status) {
    const char *msg = sf_last_error();
    fprintf(stderr, "sysformer: %s: %s%s%s\n", what, sf_status_string(status), *msg ? ": " : "",
            msg);
    return 1;
}

int cli_parse_int(const char *cmd, const char *flag, const char *value, int32_t lo, int32_t hi,
                  int32_t *out) {
    char *end = NULL;
    errno = 0;
    const long long x = strtoll(value, &end, 10);
    if (end == value || *end || errno || x < lo || x > hi) {
        fprintf(stderr, "sysformer %s: %s wants ", cmd, flag);
        if (lo == INT32_MIN && hi == INT32_MAX) fprintf(stderr, "a 32-bit integer");
        else if (lo == 0 && hi == INT32_MAX) fprintf(stderr, "a non-negative integer");
        else if (hi == INT32_MAX) fprintf(stderr, "an integer >= %d", lo);
        else fprintf(stderr, "an integer from %d to %d", lo, hi);
        fprintf(stderr, ", not '%s' (see --help)\n", value);
        return 2;
    }
    *out = (int32_t)x;
    return 0;
}

int cli_parse_count(const char *cmd, const char *flag, const char *value, int32_t *out) {
    return cli_parse_int(cmd, flag, value, 0, INT32_MAX, out);
}

int cli_parse_seed(const char *cmd, const char *flag, const char *value, uint64_t *out) {
    char *end = NULL;
    errno = 0;
    /* strtoull takes a sign (and wraps "-1" round to 2^64 - 1): only digits are a seed. */
    const unsigned long long x = value[0] >= '0' && value[0] <= '9' ? strtoull(value, &end, 10)
                                                                    : 0;
    if (!end || *end || errno) {
        fprintf(stderr, "sysformer %s: %s wants an integer from 0 to 2^64 - 1, not '%s' "
                        "(see --help)\n", cmd, flag, value);
        return 2;
    }
    *out = (uint64_t)x;
    return 0;
}

int cli_parse_float(const char *cmd, const char *flag, const char *value, float *out) {
    char *end = NULL;
    errno = 0;
    const double x = strtod(value, &end);
    /* strtod reads "nan" and "inf", and gives HUGE_VAL with ERANGE past a double's range; a
     * number past a float's range would become an infinity too. Underflow (ERANGE with a
     * tiny result) is fine: it is a number close to 0. */
    if (end == value || *end || !isfinite(x) || fabs(x) > FLT_MAX) {
        fprintf(stderr, "sysformer %s: %s wants a finite number, not '%s' (see --help)\n", cmd,
                flag, value);
        return 2;
    }
    *out = (float)x;
    return 0;
}

int cli_parse_attention(const char *cmd, const char *value, sf_attention_kernel *out) {
    static const struct {
        const char *name;
        sf_attention_kernel kernel;
    } kernels[] = {{"auto", SF_ATTENTION_AUTO},
                   {"mma", SF_ATTENTION_MMA},
                   {"wgmma", SF_ATTENTION_WGMMA},
                   {"wgmma_ws", SF_ATTENTION_WGMMA_WS}};
    for (size_t i = 0; i < sizeof kernels / sizeof kernels[0]; i++) {
        if (!strcmp(value, kernels[i].name)) {
            *out = kernels[i].kernel;
            return 0;
        }
    }
    fprintf(stderr, "sysformer %s: --attention is auto, mma, wgmma or wgmma_ws, not '%s'\n", cmd,
            value);
    return 2;
}

int cli_parse_device(const char *cmd, const char *value, cli_device *out) {
    if (!strcmp(value, "cpu")) *out = CLI_DEVICE_CPU;
    else if (!strcmp(value, "cuda")) *out = CLI_DEVICE_CUDA;
    else {
        fprintf(stderr, "sysformer %s: --device is cpu or cuda, not '%s' (see --help)\n", cmd,
                value);
        return 2;
    }
    return 0;
}

int cli_resolve_device(const char *cmd, cli_device asked, cli_device *out) {
    *out = CLI_DEVICE_CPU;
    if (asked == CLI_DEVICE_CPU) return 0;
    int count = 0;
    const sf_status st = sf_cuda_built() ? sf_cuda_device_count(&count) : SF_OK;
    if (asked == CLI_DEVICE_DEFAULT) {
        if (st == SF_OK && count > 0) *out = CLI_DEVICE_CUDA;
        else if (st != SF_OK) sf_clear_error();
        return 0;
    }
    if (!sf_cuda_built()) {
        fprintf(stderr, "sysformer %s: --device cuda: this sysformer was built without CUDA "
                        "(use --device cpu, or rebuild where nvcc is found)\n", cmd);
        return 1;
    }
    if (st != SF_OK) return cli_report("looking for a CUDA device", st);
    if (count < 1) {
        fprintf(stderr, "sysformer %s: --device cuda: no CUDA device found (use --device cpu)\n",
                cmd);
        return 1;
    }
    *out = CLI_DEVICE_CUDA;
    return 0;
}

char *cli_path_join(const char *dir, const char *name) {
    const size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int cli_parse_ids(const char *text, int32_t **ids, int32_t *n) {
    *ids = NULL;
    *n = 0;
    size_t cap = 1;
    for (const char *p = text; *p; p++) cap += (*p == ',');
    int32_t *out = malloc(cap * sizeof *out);
    if (!out) {
        fprintf(stderr, "sysformer: out of memory\n");
        return 2;
    }
    const char *p = text;
    int32_t count = 0;
    while (*p) {
        char *end = NULL;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 0x7fffffffL || (*end != ',' && *end != '\0')) {
            fprintf(stderr, "sysformer: bad token id list '%s' (want e.g. 1,15,2)\n", text);
            free(out);
            return 2;
        }
        out[count++] = (int32_t)v;
        p = (*end == ',') ? end + 1 : end;
    }
    if (count == 0) {
        fprintf(stderr, "sysformer: empty token id list\n");
        free(out);
        return 2;
    }
    *ids = out;
    *n = count;
    return 0;
}

/* Loading and uploading progress (sf_set_progress) on stderr: one line rewritten in place at
 * most every quarter second, for work that lasts over a second; quicker work prints nothing. */
typedef struct progress_line {
    double start, last;
    bool shown;
} progress_line;

static void print_progress(void *user, const char *what, uint64_t done, uint64_t total) {
    progress_line *p = user;
    const double now = cli_now();
    if (done == 0) {
        *p = (progress_line){now, now, false};
        return;
    }
    const bool end = done >= total;
    if (end ? !p->shown : now - p->start < 1.0 || now - p->last < 0.25) return;
    fprintf(stderr, "\r%s: %3.0f%% of %.2f GB%s", what, 100.0 * (double)done / (double)total,
            1e-9 * (double)total, end ? "\n" : "");
    p->last = now;
    p->shown = !end;
}

int main(int argc, char **argv) {
    sf_main_use_native_blas(argv);
    static progress_line progress;
    sf_set_progress(print_progress, &progress);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
        !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "generate")) return cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "chat")) return cmd_chat(argc - 1, argv + 1);
    if (!strcmp(cmd, "forward")) return cmd_forward(argc - 1, argv + 1);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 1, argv + 1);
    if (!strcmp(cmd, "random-model")) return cmd_random_model(argc - 1, argv + 1);
    if (!strcmp(cmd, "init")) return cmd_init(argc - 1, argv + 1);
    if (!strcmp(cmd, "rewrite")) return cmd_rewrite(argc - 1, argv + 1);
    if (!strcmp(cmd, "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(cmd, "judge")) return cmd_judge(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        int devices = 0;
        sf_cuda_device_count(&devices);
        printf("sysformer %d.%d.%d (CUDA %s, %d device%s)\n", SF_VERSION_MAJOR, SF_VERSION_MINOR,
               SF_VERSION_PATCH, sf_cuda_built() ? "built" : "not built", devices,
               devices == 1 ? "" : "s");
        const char *core = getenv("OPENBLAS_CORETYPE"); /* perhaps set by the restart above */
        printf("CPU matmul: %s%s%s%s\n", sf_cpu_matmul_backend(),
               core ? " (OPENBLAS_CORETYPE=" : "", core ? core : "", core ? ")" : "");
        return 0;
    }
    fprintf(stderr, "sysformer: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
