/* sysformer forward / info: run token ids through a model; print a model's config. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

enum { MAX_REQUESTS = 64 };

static void forward_usage(FILE *out) {
    fprintf(out,
            "usage: sysformer forward --model DIR --tokens IDS [--spans P,S,M,U,X]\n"
            "                         [--tokens IDS [--spans ...] ...] [--sysformer DIR] [--top K]\n"
            "                         [--device cpu|cuda] [--attention K]\n"
            "\n"
            "Runs each --tokens list (comma-separated token ids, one request each) through the\n"
            "model as one packed batch, on the CPU reference path unless --device cuda says\n"
            "otherwise, and prints the K most likely next tokens of every request with their\n"
            "probabilities.\n"
            "\n"
            "  --model DIR      Hugging Face model directory (config.json + *.safetensors)\n"
            "  --tokens IDS     token ids of one request, e.g. 1,15,2; repeat for a batch\n"
            "  --spans LENS     the request's span lengths prefix,system,middle,user,suffix\n"
            "                   (they must add up to its token count); needed with --sysformer\n"
            "  --sysformer DIR  guard the prompts: rewrite each system span with this Sysformer\n"
            "  --top K          how many next tokens to print (default 5)\n"
            "  --device D       cpu (default: the fp32 reference) or cuda (the bf16 engine)\n"
            "  --attention K    the CUDA engine's fused attention: auto (default: the library's\n"
            "                   choice), mma (mma.sync, any GPU), wgmma or wgmma_ws (Hopper, the\n"
            "                   pipelined or the warp-specialized kernel); the CPU path ignores it\n");
}

/* The same prefill on the CUDA engine: one step with no sampling, then the last rows' logits.
 * The engine is sized for exactly this batch. */
static sf_status forward_cuda(const sf_llm *llm, const sf_sysformer *sf, int32_t n_req,
                              const int32_t *cu, const int32_t *ids, const sf_prompt_spans *spans,
                              sf_attention_kernel attention, float *logits, double *seconds) {
    const int32_t max_pos = sf_llm_get_config(llm)->max_position_embeddings;
    const int32_t ctx = max_pos < 4096 ? max_pos : 4096; /* the engine's default max_context */
    sf_cuda_engine_options opts = sf_cuda_engine_default_options();
    opts.max_slots = n_req;
    opts.max_context = 0;
    opts.attention = attention;
    /* A guarded step lays the Sysformer's rows out padded: n_req x the longest span. */
    int32_t need = cu[n_req];
    for (int32_t r = 0; sf && r < n_req; r++) {
        if (n_req * spans[r].system > need) need = n_req * spans[r].system;
        if (n_req * spans[r].user > need) need = n_req * spans[r].user;
    }
    opts.max_batch_tokens = need > ctx ? need : 0;
    sf_cuda_engine *engine = NULL;
    sf_status st = sf_cuda_engine_create(llm, sf, &opts, &engine);
    sf_cuda_memory mem;
    if (st == SF_OK) st = sf_cuda_engine_memory(engine, &mem);
    if (st == SF_OK) {
        const double mib = 1024.0 * 1024.0;
        fprintf(stderr, "device: cuda %d; engine: weights %.1f MiB, KV cache %.1f MiB, "
                        "activations %.1f MiB\n", opts.device, (double)mem.weights / mib,
                (double)mem.kv_cache / mib, (double)mem.activations / mib);
    }
    int32_t slots[MAX_REQUESTS];
    for (int32_t r = 0; r < n_req; r++) slots[r] = r;
    const sf_cuda_step step = {
        .n_requests = n_req,
        .slots = slots,
        .cu_seqlens = cu,
        .token_ids = ids,
        .spans = sf ? spans : NULL,
    };
    const double t0 = cli_now();
    if (st == SF_OK) st = sf_cuda_engine_step(engine, &step);
    if (st == SF_OK) st = sf_cuda_engine_read_logits(engine, logits, n_req);
    *seconds = cli_now() - t0;
    sf_cuda_engine_free(engine);
    return st;
}

/* Prints the top k entries of one row of logits as probabilities (softmax in double). */
static void print_top(const float *logits, int32_t vocab, int k) {
    double max = logits[0];
    for (int32_t i = 1; i < vocab; i++) max = logits[i] > max ? logits[i] : max;
    double sum = 0.0;
    for (int32_t i = 0; i < vocab; i++) sum += exp((double)logits[i] - max);
    char *taken = calloc((size_t)vocab, 1);
    if (!taken) return;
    for (int j = 0; j < k && j < vocab; j++) {
        int32_t best = -1;
        for (int32_t i = 0; i < vocab; i++) {
            if (!taken[i] && (best < 0 || logits[i] > logits[best])) best = i;
        }
        taken[best] = 1;
        printf("    %2d. token %6d  p = %.4f  logit = %+.4f\n", j + 1, best,
               exp((double)logits[best] - max) / sum, logits[best]);
    }
    free(taken);
}

int cmd_forward(int argc, char **argv) {
    const char *model_dir = NULL, *sysformer_dir = NULL;
    const char *token_lists[MAX_REQUESTS];
    const char *span_lists[MAX_REQUESTS] = {NULL};
    int n_req = 0;
    int32_t top = 5;
    cli_device asked = CLI_DEVICE_CPU;
    sf_attention_kernel attention = SF_ATTENTION_AUTO;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            forward_usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer forward: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--model")) model_dir = argv[++i];
        else if (!strcmp(a, "--tokens")) {
            if (n_req == MAX_REQUESTS) {
                fprintf(stderr, "sysformer forward: at most %d requests\n", MAX_REQUESTS);
                return 2;
            }
            token_lists[n_req++] = argv[++i];
        } else if (!strcmp(a, "--spans")) {
            if (n_req == 0) {
                fprintf(stderr, "sysformer forward: --spans follows the --tokens it describes\n");
                return 2;
            }
            span_lists[n_req - 1] = argv[++i];
        } else if (!strcmp(a, "--sysformer")) {
            sysformer_dir = argv[++i];
        } else if (!strcmp(a, "--device")) {
            if (cli_parse_device("forward", argv[++i], &asked)) return 2;
        } else if (!strcmp(a, "--attention")) {
            if (cli_parse_attention("forward", argv[++i], &attention)) return 2;
        } else if (!strcmp(a, "--top")) {
            if (cli_parse_int("forward", a, argv[++i], 1, INT32_MAX, &top)) return 2;
        } else {
            fprintf(stderr, "sysformer forward: unknown option '%s'\n", a);
            forward_usage(stderr);
            return 2;
        }
    }
    if (!model_dir || n_req == 0) {
        fprintf(stderr, "sysformer forward: --model and --tokens are required\n");
        forward_usage(stderr);
        return 2;
    }
    /* forward stays on the CPU unless asked: it is the reference path's tool */
    cli_device dev = CLI_DEVICE_CPU;
    if (asked == CLI_DEVICE_CUDA && cli_resolve_device("forward", asked, &dev)) return 1;
    const bool cuda = dev == CLI_DEVICE_CUDA;

    /* Pack the requests back to back. */
    int32_t cu[MAX_REQUESTS + 1] = {0};
    int32_t *ids = NULL;
    for (int r = 0; r < n_req; r++) {
        int32_t *one = NULL, n = 0;
        if (cli_parse_ids(token_lists[r], &one, &n) != 0) {
            free(ids);
            return 2;
        }
        int32_t *grown = realloc(ids, (size_t)(cu[r] + n) * sizeof *ids);
        if (!grown) {
            free(one);
            free(ids);
            fprintf(stderr, "sysformer forward: out of memory\n");
            return 1;
        }
        ids = grown;
        memcpy(ids + cu[r], one, (size_t)n * sizeof *ids);
        cu[r + 1] = cu[r] + n;
        free(one);
    }

    sf_prompt_spans spans[MAX_REQUESTS];
    for (int r = 0; r < n_req; r++) {
        int32_t *lens = NULL, n = 0;
        if (!span_lists[r]) {
            if (sysformer_dir) {
                fprintf(stderr, "sysformer forward: request %d needs --spans with --sysformer\n", r);
                free(ids);
                return 2;
            }
            continue;
        }
        if (cli_parse_ids(span_lists[r], &lens, &n) != 0) {
            free(ids);
            return 2;
        }
        if (n != 5) {
            fprintf(stderr, "sysformer forward: --spans takes 5 lengths, got %d\n", n);
            free(lens);
            free(ids);
            return 2;
        }
        spans[r] = (sf_prompt_spans){lens[0], lens[1], lens[2], lens[3], lens[4]};
        free(lens);
    }

    fprintf(stderr, "loading %s ...\n", model_dir);
    double t0 = cli_now();
    sf_llm *llm = NULL;
    sf_status st = sf_llm_load(model_dir, &llm);
    if (st != SF_OK) {
        free(ids);
        return cli_report("loading the model", st);
    }
    const sf_llm_config *cfg = sf_llm_get_config(llm);
    fprintf(stderr, "loaded in %.2f s: %d layers, hidden %d, vocab %d\n", cli_now() - t0,
            cfg->num_layers, cfg->hidden_size, cfg->vocab_size);
    sf_sysformer *sf = NULL;
    if (sysformer_dir) {
        st = sf_sysformer_load(sysformer_dir, llm, &sf);
        if (st != SF_OK) {
            free(ids);
            sf_llm_free(llm);
            return cli_report("loading the Sysformer", st);
        }
        fprintf(stderr, "guarding with the Sysformer in %s (%d layers)\n", sysformer_dir,
                sf_sysformer_get_config(sf)->num_layers);
    }

    int32_t last_rows[MAX_REQUESTS];
    for (int r = 0; r < n_req; r++) last_rows[r] = cu[r + 1] - 1;
    float *logits = malloc((size_t)n_req * (size_t)cfg->vocab_size * sizeof(float));
    sf_batch batch = {
        .n_requests = n_req,
        .cu_seqlens = cu,
        .token_ids = ids,
        .n_logit_rows = n_req,
        .logit_rows = last_rows,
    };
    int rc = 0;
    t0 = cli_now();
    double dt = 0.0;
    if (!logits) {
        st = SF_ERR_OUT_OF_MEMORY;
    } else if (cuda) {
        st = forward_cuda(llm, sf, n_req, cu, ids, spans, attention, logits, &dt);
    } else if (sf) {
        sf_guarded_batch gb = {n_req, cu, ids, spans, NULL, n_req, last_rows};
        st = sf_guarded_forward_cpu(llm, sf, &gb, logits);
    } else {
        st = sf_llm_forward_cpu(llm, &batch, logits);
    }
    if (!cuda) dt = cli_now() - t0;
    if (st != SF_OK) {
        rc = cli_report("forward", st);
    } else {
        printf("%sprefill of %d tokens in %d request%s: %.3f s (%.1f tokens/s, %s)\n",
               sf ? "guarded " : "", cu[n_req], n_req, n_req == 1 ? "" : "s", dt,
               cu[n_req] / (dt > 0 ? dt : 1e-9), cuda ? "CUDA" : "CPU");
        for (int r = 0; r < n_req; r++) {
            printf("request %d (%d tokens), next token:\n", r, cu[r + 1] - cu[r]);
            print_top(logits + (size_t)r * (size_t)cfg->vocab_size, cfg->vocab_size, top);
        }
    }
    free(logits);
    free(ids);
    sf_sysformer_free(sf);
    sf_llm_free(llm);
    return rc;
}

static const char *arch_name(sf_arch a) {
    switch (a) {
    case SF_ARCH_LLAMA: return "llama";
    case SF_ARCH_MISTRAL: return "mistral";
    case SF_ARCH_QWEN2: return "qwen2";
    case SF_ARCH_PHI3: return "phi3";
    }
    return "?";
}

static const char *rope_name(sf_rope_type t) {
    switch (t) {
    case SF_ROPE_DEFAULT: return "default";
    case SF_ROPE_LINEAR: return "linear";
    case SF_ROPE_LLAMA3: return "llama3";
    case SF_ROPE_LONGROPE: return "longrope";
    }
    return "?";
}

static void info_usage(FILE *out) {
    fprintf(out,
            "usage: sysformer info --model PATH [--slots N] [--context N] [--batch-tokens N]\n"
            "\n"
            "Prints a model's configuration (reading only it and the embedding table) and the\n"
            "device memory CUDA engines for it would take (sf_cuda_engine_plan: no GPU needed):\n"
            "the full engine with the default Sysformer, and a serving stack's guard-only\n"
            "engine, on its own embedding table and on one the stack lends.\n"
            "  --slots N         requests held at once (default 8)\n"
            "  --context N       positions per request (default min(model's, 4096))\n"
            "  --batch-tokens N  tokens in one step (default: --context)\n");
}

/* One line of engine plan: GiB by purpose, or why there is none. */
static void print_plan(const char *what, const sf_llm_config *c, const sf_sysformer_config *s,
                       const sf_cuda_engine_options *o) {
    sf_cuda_memory m;
    const sf_status st = sf_cuda_engine_plan(c, s, o, &m);
    const double gib = 1.0 / (1u << 30);
    if (st == SF_OK) {
        printf("  %-34s weights %7.2f  kv cache %7.2f  arena %7.2f  total %7.2f GiB\n", what,
               gib * (double)m.weights, gib * (double)m.kv_cache, gib * (double)m.activations,
               gib * (double)m.total);
    } else {
        printf("  %-34s n/a: %s\n", what, sf_last_error());
    }
}

int cmd_info(int argc, char **argv) {
    const char *model = NULL;
    sf_cuda_engine_options opts = sf_cuda_engine_default_options();
    for (int i = 1; i < argc; i += 2) { /* every option takes a value */
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            info_usage(stdout);
            return 0;
        }
        if (!v) {
            info_usage(stderr);
            return 2;
        }
        int rc = 0;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--slots")) rc = cli_parse_count("info", a, v, &opts.max_slots);
        else if (!strcmp(a, "--context")) rc = cli_parse_count("info", a, v, &opts.max_context);
        else if (!strcmp(a, "--batch-tokens")) {
            rc = cli_parse_count("info", a, v, &opts.max_batch_tokens);
        } else {
            fprintf(stderr, "sysformer info: unknown option %s\n", a);
            info_usage(stderr);
            return 2;
        }
        if (rc) return rc;
    }
    if (!model) {
        info_usage(stderr);
        return 2;
    }
    sf_llm *llm = NULL;
    sf_status st = sf_llm_load_embeddings(model, &llm);
    if (st != SF_OK) return cli_report("loading the model", st);
    const sf_llm_config *c = sf_llm_get_config(llm);
    printf("arch                  %s\n", arch_name(c->arch));
    printf("vocab_size            %d\n", c->vocab_size);
    printf("hidden_size           %d\n", c->hidden_size);
    printf("intermediate_size     %d\n", c->intermediate_size);
    printf("layers                %d\n", c->num_layers);
    printf("heads / kv heads      %d / %d (head_dim %d)\n", c->num_heads, c->num_kv_heads,
           c->head_dim);
    printf("max positions         %d\n", c->max_position_embeddings);
    printf("rms_norm_eps          %g\n", c->rms_norm_eps);
    printf("rope                  %s, theta %g\n", rope_name(c->rope.type), c->rope_theta);
    printf("sliding window        %d\n", c->sliding_window);
    printf("tied embeddings       %s\n", c->tie_word_embeddings ? "yes" : "no");
    printf("attention bias        %s\n",
           c->attention_bias ? "q, k, v, o" : (c->qkv_bias ? "q, k, v" : "none"));

    const sf_sysformer_config sc = sf_sysformer_default_config(llm);
    const int32_t ctx = opts.max_context ? opts.max_context
                        : c->max_position_embeddings < 4096 ? c->max_position_embeddings
                                                            : 4096;
    printf("\nCUDA engines (%d slots x %d positions, %d tokens a step; a default Sysformer: %d "
           "layers, %d heads, ff %d):\n",
           opts.max_slots, ctx, opts.max_batch_tokens ? opts.max_batch_tokens : ctx,
           sc.num_layers, sc.num_heads, sc.dim_feedforward);
    if (!sf_cuda_built()) {
        printf("  n/a: this build has no CUDA\n");
    } else {
        print_plan("full engine", c, &sc, &opts);
        opts.guard_only = true;
        print_plan("guard-only engine", c, &sc, &opts);
        opts.embedding_table = &opts; /* the plan only asks whether one is lent */
        print_plan("guard-only, on the stack's table", c, &sc, &opts);
    }
    sf_llm_free(llm);
    return 0;
}
