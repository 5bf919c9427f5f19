/* sysformer init / rewrite: create a Sysformer for an LLM; inspect what it does to a prompt. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "io/safetensors.h"

static void init_usage(FILE *out) {
    fprintf(out,
            "usage: sysformer init --model DIR --out DIR [options]\n"
            "\n"
            "Creates a new Sysformer for the model and saves it (sysformer.json +\n"
            "sysformer.safetensors). out_proj and linear2 start at zero, so before training\n"
            "it leaves the system prompt unchanged (with the default pre-LN, no final norm).\n"
            "\n"
            "  --seed N             initialisation seed (default 0)\n"
            "  --layers N           decoder layers (default 2)\n"
            "  --heads N            attention heads (default: the LLM's)\n"
            "  --ff N               feed-forward width (default 4 x hidden size)\n"
            "  --activation A       relu (default) or gelu\n"
            "  --post-ln            norm_first = false (PyTorch's default layout)\n"
            "  --final-norm         add the final LayerNorm\n"
            "  --system-prompt TXT  record the default system prompt text\n"
            "  --template NAME      record the chat template name\n");
}

static int parse_positive(const char *opt, const char *v, int32_t *out) {
    char *end = NULL;
    long x = strtol(v, &end, 10);
    if (end == v || *end || x < 1 || x > (1 << 20)) {
        fprintf(stderr, "sysformer init: %s wants a positive integer, not '%s'\n", opt, v);
        return 2;
    }
    *out = (int32_t)x;
    return 0;
}

/* The last path component, for the provenance name. */
static const char *base_name(const char *path) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    const char *p = path + n;
    while (p > path && p[-1] != '/') p--;
    return p;
}

int cmd_init(int argc, char **argv) {
    const char *model_dir = NULL, *out = NULL, *system_prompt = NULL, *tmpl = NULL;
    uint64_t seed = 0;
    int32_t layers = 0, heads = 0, ff = 0;
    int post_ln = 0, final_norm = 0, gelu = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            init_usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--post-ln")) { post_ln = 1; continue; }
        if (!strcmp(a, "--final-norm")) { final_norm = 1; continue; }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer init: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        int rc = 0;
        if (!strcmp(a, "--model")) model_dir = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--seed")) rc = cli_parse_seed("init", a, v, &seed);
        else if (!strcmp(a, "--layers")) rc = parse_positive(a, v, &layers);
        else if (!strcmp(a, "--heads")) rc = parse_positive(a, v, &heads);
        else if (!strcmp(a, "--ff")) rc = parse_positive(a, v, &ff);
        else if (!strcmp(a, "--system-prompt")) system_prompt = v;
        else if (!strcmp(a, "--template")) tmpl = v;
        else if (!strcmp(a, "--activation")) {
            if (!strcmp(v, "gelu")) gelu = 1;
            else if (strcmp(v, "relu") != 0) {
                fprintf(stderr, "sysformer init: --activation is relu or gelu\n");
                return 2;
            }
        } else {
            fprintf(stderr, "sysformer init: unknown option '%s'\n", a);
            init_usage(stderr);
            return 2;
        }
        if (rc) return rc;
    }
    if (!model_dir || !out) {
        fprintf(stderr, "sysformer init: --model and --out are required\n");
        init_usage(stderr);
        return 2;
    }
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "sysformer init: cannot create %s: %s\n", out, strerror(errno));
        return 1;
    }
    /* a Sysformer needs the model's configuration and embedding table only */
    sf_llm *llm = NULL;
    sf_status st = sf_llm_load_embeddings(model_dir, &llm);
    if (st != SF_OK) return cli_report("loading the model", st);

    sf_sysformer_config cfg = sf_sysformer_default_config(llm);
    if (layers) cfg.num_layers = layers;
    if (heads) cfg.num_heads = heads;
    if (ff) cfg.dim_feedforward = ff;
    cfg.activation = gelu ? SF_ACT_GELU : SF_ACT_RELU;
    cfg.norm_first = !post_ln;
    cfg.final_norm = final_norm;
    cfg.system_prompt = system_prompt;
    cfg.chat_template = tmpl;
    cfg.llm_name = base_name(model_dir);
    char hash[32];
    st = sf_llm_embedding_hash(llm, hash, sizeof hash);
    cfg.llm_embedding_hash = hash;

    sf_sysformer *sf = NULL;
    if (st == SF_OK) st = sf_sysformer_init(llm, &cfg, seed, &sf);
    if (st == SF_OK) st = sf_sysformer_save(sf, out);
    int rc = 0;
    if (st != SF_OK) {
        rc = cli_report("creating the Sysformer", st);
    } else {
        printf("wrote %s/sysformer.json and %s/sysformer.safetensors: %d layers, d_model %d, "
               "%d heads, ff %d, %s, %s%s (seed %llu)\n",
               out, out, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.dim_feedforward,
               gelu ? "gelu" : "relu", cfg.norm_first ? "pre-LN" : "post-LN",
               cfg.final_norm ? ", final norm" : "", (unsigned long long)seed);
    }
    sf_sysformer_free(sf);
    sf_llm_free(llm);
    return rc;
}

static void rewrite_usage(FILE *out) {
    fprintf(out,
            "usage: sysformer rewrite --model DIR --sysformer DIR --system IDS --user IDS\n"
            "                         --out FILE.safetensors\n"
            "\n"
            "Embeds the system-prompt and user-prompt token ids with the model's embedding\n"
            "table, runs the Sysformer, and writes fp32 tensors system_in [n_s, d] (the\n"
            "embeddings S) and system_out [n_s, d] (the rewritten S') to FILE.\n");
}

int cmd_rewrite(int argc, char **argv) {
    const char *model_dir = NULL, *sf_dir = NULL, *sys_text = NULL, *usr_text = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            rewrite_usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer rewrite: %s needs a value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        if (!strcmp(a, "--model")) model_dir = v;
        else if (!strcmp(a, "--sysformer")) sf_dir = v;
        else if (!strcmp(a, "--system")) sys_text = v;
        else if (!strcmp(a, "--user")) usr_text = v;
        else if (!strcmp(a, "--out")) out = v;
        else {
            fprintf(stderr, "sysformer rewrite: unknown option '%s'\n", a);
            rewrite_usage(stderr);
            return 2;
        }
    }
    if (!model_dir || !sf_dir || !sys_text || !usr_text || !out) {
        fprintf(stderr, "sysformer rewrite: --model, --sysformer, --system, --user and --out "
                        "are required\n");
        rewrite_usage(stderr);
        return 2;
    }
    int32_t *sys_ids = NULL, *usr_ids = NULL, n_s = 0, n_u = 0;
    if (cli_parse_ids(sys_text, &sys_ids, &n_s) != 0) return 2;
    if (cli_parse_ids(usr_text, &usr_ids, &n_u) != 0) {
        free(sys_ids);
        return 2;
    }
    sf_llm *llm = NULL;
    sf_sysformer *sf = NULL;
    float *s_in = NULL, *s_out = NULL, *p = NULL;
    int rc = 0;
    sf_status st = sf_llm_load_embeddings(model_dir, &llm); /* no LLM layer runs here */
    if (st != SF_OK) {
        rc = cli_report("loading the model", st);
        goto done;
    }
    st = sf_sysformer_load(sf_dir, llm, &sf);
    if (st != SF_OK) {
        rc = cli_report("loading the Sysformer", st);
        goto done;
    }
    const int64_t d = sf_llm_get_config(llm)->hidden_size;
    s_in = malloc((size_t)(n_s * d) * sizeof(float));
    s_out = malloc((size_t)(n_s * d) * sizeof(float));
    p = malloc((size_t)(n_u * d) * sizeof(float));
    if (!s_in || !s_out || !p) {
        fprintf(stderr, "sysformer rewrite: out of memory\n");
        rc = 1;
        goto done;
    }
    st = sf_llm_embed(llm, sys_ids, n_s, s_in);
    if (st == SF_OK) st = sf_llm_embed(llm, usr_ids, n_u, p);
    int32_t cu_s[2] = {0, n_s}, cu_u[2] = {0, n_u};
    sf_rewrite_batch b = {1, cu_s, cu_u, s_in, p};
    if (st == SF_OK) st = sf_sysformer_forward_cpu(sf, &b, s_out);
    if (st == SF_OK) {
        sf_st_entry e[2] = {
            {"system_in", SF_DTYPE_F32, 2, {n_s, d}, s_in},
            {"system_out", SF_DTYPE_F32, 2, {n_s, d}, s_out},
        };
        const char *meta[] = {"model", model_dir, "sysformer", sf_dir, NULL};
        st = sf_st_write(out, e, 2, meta);
    }
    if (st != SF_OK) {
        rc = cli_report("rewrite", st);
        goto done;
    }
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n_s * d; i++) {
        num += ((double)s_out[i] - s_in[i]) * ((double)s_out[i] - s_in[i]);
        den += (double)s_in[i] * s_in[i];
    }
    printf("wrote %s: system_in and system_out [%d, %lld]; ||S' - S|| / ||S|| = %.4g\n", out, n_s,
           (long long)d, den > 0 ? sqrt(num / den) : 0.0);
done:
    free(s_in);
    free(s_out);
    free(p);
    free(sys_ids);
    free(usr_ids);
    sf_sysformer_free(sf);
    sf_llm_free(llm);
    return rc;
}
