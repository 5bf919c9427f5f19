/* sysformer train: trains a Sysformer for a frozen LLM on prompt datasets (DESIGN.md §6). The
 * library does the work (host/train/trainer.h); this reads the flags, prints progress to
 * stderr and writes one JSON object per step and per validation to OUT/train_log.jsonl. */
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "core/error.h"
#include "eval/eval.h"
#include "train/trainer.h"

int cmd_train(int argc, char **argv);

static const char k_default_system[] = "You are a helpful assistant.";
static const char k_default_refusal[] = "I am sorry I cannot help you";

typedef struct options {
    const char *llm, *tokenizer, *harmful, *harmless, *harmful_val, *harmless_val;
    const char *jailbreak, *out, *system, *template_name, *refusal, *init;
    int32_t max_harmful, max_harmless, max_val;
    int32_t layers, heads, ff;
    int32_t compl_max_tokens, max_tokens, gen_batch;
    bool resume, gelu, system_embedder, wrap_harmless;
    sf_train_options t;
} options;

static void usage(FILE *out) {
    const sf_train_options d = sf_train_default_options();
    fprintf(out,
            "usage: sysformer train --llm PATH --harmful FILE --harmless FILE --out DIR "
            "[options]\n"
            "\n"
            "Trains a Sysformer for the frozen LLM so that it refuses the harmful prompts and\n"
            "answers the harmless ones (docs/SYSFORMER.md, \"Training\"). Datasets are JSON\n"
            "lists of {\"instruction\": ...} (optional \"input\", and \"response\" or\n"
            "\"output\": the desired reply; harmless prompts without one get the LLM's own\n"
            "greedy reply, made once and cached in DIR/completions.jsonl). DIR receives the\n"
            "Sysformer (sysformer.json + sysformer.safetensors) and train_state.safetensors\n"
            "(for --resume) after every epoch, and train_log.jsonl. Ctrl-C stops after the\n"
            "current step with a checkpoint.\n"
            "\n"
            "data:\n"
            "  --llm PATH               a .gguf file or a Hugging Face model directory\n"
            "  --tokenizer PATH         default: the LLM's own files\n"
            "  --harmful FILE           harmful training prompts (trained to refuse)\n"
            "  --harmless FILE          harmless training prompts (trained to answer)\n"
            "  --harmful-val FILE       validation prompts (losses and refusal rates per epoch)\n"
            "  --harmless-val FILE\n"
            "  --jailbreaks FILE        jailbreak wrappers (bench/jailbreaks.json's format):\n"
            "                           each harmful prompt is also trained wrapped in one\n"
            "                           wrapper not marked held_out (alias:\n"
            "                           --jailbreak-templates)\n"
            "  --wrap-harmless          with --jailbreaks: each harmless prompt is also trained\n"
            "                           wrapped, towards the LLM's own reply to the wrapped\n"
            "                           prompt, so that a wrapper alone does not mean refusal\n"
            "  --max-harmful N          seeded sample of N prompts (default: all)\n"
            "  --max-harmless N         (default: as many as harmful prompts)\n"
            "  --max-val N              of each validation file (default 32)\n"
            "  --system TEXT            the system prompt the Sysformer rewrites (default\n"
            "                           \"%s\")\n"
            "  --template NAME          chat template (default: detected from the tokenizer)\n"
            "  --refusal TEXT           the L_ref reply (default \"%s\")\n"
            "  --compl-max-tokens N     length of generated harmless replies (default 64)\n"
            "  --max-tokens N           longest example, prompt + reply (default 256)\n"
            "  --gen-batch N            prompts generated together (default 8)\n"
            "\n"
            "losses (L = w_ref L_ref + w_compl L_compl + w_class L_class + w_recon L_recon):\n"
            "  --w-ref X --w-compl X --w-class X --w-recon X   (default %g %g %g %g)\n"
            "\n",
            k_default_system, k_default_refusal, d.w_ref, d.w_compl, d.w_class, d.w_recon);
    fprintf(out,
            "optimisation:\n"
            "  --epochs N               default %d\n"
            "  --lr X                   peak learning rate (default %g)\n"
            "  --schedule S             cosine (default) or constant, after the warm-up\n"
            "  --warmup N               warm-up steps (default: 5%% of all steps)\n"
            "  --min-lr-ratio R         cosine ends at lr x R (default %g)\n"
            "  --weight-decay X         AdamW, decoupled (default %g)\n"
            "  --clip X                 global gradient-norm clipping, 0 = off (default %g)\n"
            "  --batch-tokens N         packed tokens per step (default %d)\n"
            "  --seed N                 shuffles, samples, templates, initialisation (default 0)\n"
            "  --recompute              recompute each LLM layer's forward in the backward instead\n"
            "                           of storing its activations (less memory, CPU and GPU)\n"
            "  --deterministic          GPU steps that repeat bit for bit at any length: the\n"
            "                           attention backward sums dq without atomics (slower)\n"
            "  --device cpu|cuda[:N]    where each step's loss and gradient are computed\n"
            "                           (default cpu: fp32; cuda: the GPU in bf16)\n"
            "  --resume                 continue from DIR's checkpoint (same data and flags)\n"
            "\n"
            "a new Sysformer:\n"
            "  --layers N --heads N --ff N   (default 2, the LLM's heads, 4 x hidden)\n"
            "  --activation relu|gelu        (default relu)\n"
            "  --system-embedder        train the SystemEmbedder baseline instead: one learned\n"
            "                           system-prompt embedding (no layers, not conditioned on\n"
            "                           the user prompt), same losses, same code\n"
            "  --init DIR               start from this Sysformer's weights (fine-tuning; its\n"
            "                           recorded system prompt must be --system)\n"
            "\n"
            "validation:\n"
            "  --val-harmful-n N        harmful validation prompts generated and judged (%d)\n"
            "  --val-harmless-n N       harmless ones (%d)\n"
            "  --val-max-new-tokens N   (default %d)\n"
            "  --no-initial-val         skip the validation before the first step\n",
            d.epochs, d.lr, d.min_lr_ratio, d.adamw.weight_decay, d.clip_norm, d.batch_tokens,
            d.val_harmful_n, d.val_harmless_n, d.val_max_new_tokens);
}

/* Integer flags: non-negative, in int32 range. */
static int count_flag(const char *a, const char *v, int32_t *out) {
    return cli_parse_count("train", a, v, out);
}

static int bad_number(const char *a, const char *v) {
    fprintf(stderr, "sysformer train: %s wants a number, not '%s' (see --help)\n", a, v);
    return 2;
}

static int parse_real(const char *a, const char *v, double *out) {
    char *end = NULL;
    const double x = strtod(v, &end);
    if (end == v || *end || !(x >= 0) || x > 1e30) return bad_number(a, v);
    *out = x;
    return 0;
}

static int parse_options(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->t = sf_train_default_options();
    o->max_val = 32;
    o->compl_max_tokens = 64;
    o->max_tokens = 256;
    o->gen_batch = 8;
    o->system = k_default_system;
    o->refusal = k_default_refusal;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return -1;
        }
        if (!strcmp(a, "--resume")) { o->resume = true; continue; }
        if (!strcmp(a, "--recompute")) { o->t.recompute = true; continue; }
        if (!strcmp(a, "--deterministic")) { o->t.deterministic = true; continue; }
        if (!strcmp(a, "--system-embedder")) { o->system_embedder = true; continue; }
        if (!strcmp(a, "--wrap-harmless")) { o->wrap_harmless = true; continue; }
        if (!strcmp(a, "--no-initial-val")) { o->t.validate_first = false; continue; }
        if (i + 1 >= argc) {
            fprintf(stderr, "sysformer train: %s needs a value (see --help)\n", a);
            return 2;
        }
        const char *v = argv[++i];
        int rc = 0;
        int32_t x = 0;
        if (!strcmp(a, "--llm") || !strcmp(a, "--model")) o->llm = v;
        else if (!strcmp(a, "--tokenizer")) o->tokenizer = v;
        else if (!strcmp(a, "--harmful")) o->harmful = v;
        else if (!strcmp(a, "--harmless")) o->harmless = v;
        else if (!strcmp(a, "--harmful-val")) o->harmful_val = v;
        else if (!strcmp(a, "--harmless-val")) o->harmless_val = v;
        else if (!strcmp(a, "--jailbreaks") || !strcmp(a, "--jailbreak-templates")) {
            o->jailbreak = v;
        }
        else if (!strcmp(a, "--out")) o->out = v;
        else if (!strcmp(a, "--init")) o->init = v;
        else if (!strcmp(a, "--system")) o->system = v;
        else if (!strcmp(a, "--template")) o->template_name = v;
        else if (!strcmp(a, "--refusal")) o->refusal = v;
        else if (!strcmp(a, "--max-harmful")) rc = count_flag(a, v, &o->max_harmful);
        else if (!strcmp(a, "--max-harmless")) rc = count_flag(a, v, &o->max_harmless);
        else if (!strcmp(a, "--max-val")) rc = count_flag(a, v, &o->max_val);
        else if (!strcmp(a, "--compl-max-tokens")) rc = count_flag(a, v, &o->compl_max_tokens);
        else if (!strcmp(a, "--max-tokens")) rc = count_flag(a, v, &o->max_tokens);
        else if (!strcmp(a, "--gen-batch")) rc = count_flag(a, v, &o->gen_batch);
        else if (!strcmp(a, "--layers")) rc = count_flag(a, v, &o->layers);
        else if (!strcmp(a, "--heads")) rc = count_flag(a, v, &o->heads);
        else if (!strcmp(a, "--ff")) rc = count_flag(a, v, &o->ff);
        else if (!strcmp(a, "--epochs")) rc = count_flag(a, v, &o->t.epochs);
        else if (!strcmp(a, "--batch-tokens")) rc = count_flag(a, v, &o->t.batch_tokens);
        else if (!strcmp(a, "--val-harmful-n")) rc = count_flag(a, v, &o->t.val_harmful_n);
        else if (!strcmp(a, "--val-harmless-n")) rc = count_flag(a, v, &o->t.val_harmless_n);
        else if (!strcmp(a, "--val-max-new-tokens")) {
            rc = count_flag(a, v, &o->t.val_max_new_tokens);
        } else if (!strcmp(a, "--warmup")) {
            rc = count_flag(a, v, &x);
            o->t.warmup_steps = x;
        } else if (!strcmp(a, "--lr")) rc = parse_real(a, v, &o->t.lr);
        else if (!strcmp(a, "--min-lr-ratio")) rc = parse_real(a, v, &o->t.min_lr_ratio);
        else if (!strcmp(a, "--weight-decay")) rc = parse_real(a, v, &o->t.adamw.weight_decay);
        else if (!strcmp(a, "--clip")) rc = parse_real(a, v, &o->t.clip_norm);
        else if (!strcmp(a, "--w-ref")) rc = parse_real(a, v, &o->t.w_ref);
        else if (!strcmp(a, "--w-compl")) rc = parse_real(a, v, &o->t.w_compl);
        else if (!strcmp(a, "--w-class")) rc = parse_real(a, v, &o->t.w_class);
        else if (!strcmp(a, "--w-recon")) rc = parse_real(a, v, &o->t.w_recon);
        else if (!strcmp(a, "--seed")) rc = cli_parse_seed("train", a, v, &o->t.seed);
        else if (!strcmp(a, "--schedule")) {
            if (!strcmp(v, "cosine")) o->t.schedule = SF_LR_COSINE;
            else if (!strcmp(v, "constant")) o->t.schedule = SF_LR_CONSTANT;
            else {
                fprintf(stderr, "sysformer train: --schedule is cosine or constant\n");
                rc = 2;
            }
        } else if (!strcmp(a, "--device")) {
            if (!strcmp(v, "cpu")) {
                o->t.device = SF_TRAIN_CPU;
            } else if (!strncmp(v, "cuda", 4) && (v[4] == '\0' || v[4] == ':')) {
                o->t.device = SF_TRAIN_CUDA;
                o->t.cuda_device = 0;
                if (v[4] == ':') rc = count_flag(a, v + 5, &o->t.cuda_device);
                if (!rc && o->t.cuda_device < 0) rc = bad_number(a, v);
            } else {
                fprintf(stderr, "sysformer train: --device is cpu, cuda or cuda:N\n");
                rc = 2;
            }
        } else if (!strcmp(a, "--activation")) {
            if (!strcmp(v, "gelu")) o->gelu = true;
            else if (strcmp(v, "relu") != 0) {
                fprintf(stderr, "sysformer train: --activation is relu or gelu\n");
                rc = 2;
            }
        } else {
            fprintf(stderr, "sysformer train: unknown option '%s' (see --help)\n", a);
            return 2;
        }
        if (rc) return rc;
    }
    if (!o->llm || !o->harmful || !o->harmless || !o->out) {
        fprintf(stderr, "sysformer train: --llm, --harmful, --harmless and --out are required "
                        "(see --help; ../shared/datasets has the prompt sets)\n");
        return 2;
    }
    if (o->wrap_harmless && !o->jailbreak) {
        fprintf(stderr, "sysformer train: --wrap-harmless needs --jailbreaks FILE\n");
        return 2;
    }
    if (o->t.epochs < 1 || o->t.batch_tokens < 1 || !(o->t.lr > 0) || o->max_tokens < 8 ||
        o->compl_max_tokens < 1 || o->gen_batch < 1 || o->t.val_max_new_tokens < 1) {
        fprintf(stderr, "sysformer train: --epochs, --batch-tokens, --lr, --compl-max-tokens, "
                        "--gen-batch and --val-max-new-tokens must be positive, --max-tokens at "
                        "least 8\n");
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Progress                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static volatile sig_atomic_t g_interrupted = 0;
static void on_sigint(int sig) {
    (void)sig;
    g_interrupted = 1;
}

typedef struct progress {
    FILE *log;
    int32_t epochs;
} progress;

static void log_event(FILE *log, const sf_train_event *e) {
    if (!log) return;
    json_t *j = json_object();
    if (e->kind == SF_TRAIN_EVENT_STEP) {
        json_object_set_new(j, "type", json_string("step"));
        json_object_set_new(j, "epoch", json_integer(e->epoch));
        json_object_set_new(j, "step", json_integer(e->step));
        json_object_set_new(j, "total_steps", json_integer(e->total_steps));
        json_object_set_new(j, "loss", json_real(e->loss));
        json_object_set_new(j, "loss_ce", json_real(e->loss_ce));
        json_object_set_new(j, "loss_class", json_real(e->loss_class));
        json_object_set_new(j, "loss_recon", json_real(e->loss_recon));
        json_object_set_new(j, "lr", json_real(e->lr));
        json_object_set_new(j, "grad_norm", json_real(e->grad_norm));
        json_object_set_new(j, "batch_examples", json_integer(e->batch_examples));
        json_object_set_new(j, "batch_tokens", json_integer(e->batch_tokens));
        json_object_set_new(j, "tokens_per_s", json_real(e->tokens_per_s));
        json_object_set_new(j, "seconds", json_real(e->seconds));
    } else {
        json_object_set_new(j, "type", json_string("validation"));
        json_object_set_new(j, "epoch", json_integer(e->epoch));
        json_object_set_new(j, "step", json_integer(e->step));
        json_object_set_new(j, "l_ref", json_real(e->val_ref));
        json_object_set_new(j, "l_compl", json_real(e->val_compl));
        json_object_set_new(j, "l_class", json_real(e->val_class));
        json_object_set_new(j, "l_recon", json_real(e->val_recon));
        json_object_set_new(j, "total", json_real(e->val_total));
        if (e->refusal_harmful >= 0) {
            json_object_set_new(j, "refusal_harmful", json_real(e->refusal_harmful));
            json_object_set_new(j, "n_harmful", json_integer(e->n_judged_harmful));
        }
        if (e->refusal_harmless >= 0) {
            json_object_set_new(j, "refusal_harmless", json_real(e->refusal_harmless));
            json_object_set_new(j, "n_harmless", json_integer(e->n_judged_harmless));
        }
        if (e->sample_harmful) {
            json_object_set_new(j, "sample_harmful", json_string(e->sample_harmful));
        }
        if (e->sample_harmless) {
            json_object_set_new(j, "sample_harmless", json_string(e->sample_harmless));
        }
        json_object_set_new(j, "seconds", json_real(e->seconds));
    }
    char *line = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(7));
    if (line) {
        fprintf(log, "%s\n", line);
        fflush(log);
    }
    free(line);
    json_decref(j);
}

/* The step's memory plan, on stderr and as the log's {"type": "memory"} line. */
static void report_memory(FILE *log, const sf_train_memory *m, bool gpu) {
    const double mib = 1024.0 * 1024.0;
    fprintf(stderr, "memory: %.1f MiB of %s activations for batches up to %d rows (recompute "
                    "%s), %.1f MiB of gradients + AdamW state on the host",
            (double)m->activations / mib, gpu ? "device" : "LLM backward", m->max_rows,
            m->recompute ? "on" : "off", (double)m->optimizer / mib);
    if (gpu) fprintf(stderr, ", %.1f MiB on the device in all", (double)m->device_total / mib);
    fprintf(stderr, "\n");
    json_t *j = json_object();
    json_object_set_new(j, "type", json_string("memory"));
    json_object_set_new(j, "device", json_string(gpu ? "cuda" : "cpu"));
    json_object_set_new(j, "max_rows", json_integer(m->max_rows));
    json_object_set_new(j, "recompute", json_boolean(m->recompute));
    json_object_set_new(j, "activation_bytes", json_integer((json_int_t)m->activations));
    json_object_set_new(j, "optimizer_bytes", json_integer((json_int_t)m->optimizer));
    if (gpu) {
        json_object_set_new(j, "device_bytes", json_integer((json_int_t)m->device_total));
    }
    char *line = json_dumps(j, JSON_COMPACT);
    if (line) {
        fprintf(log, "%s\n", line);
        fflush(log);
    }
    free(line);
    json_decref(j);
}

/* The first line of s, at most 70 bytes, for a one-line preview. */
static void preview(const char *label, const char *s) {
    if (!s) return;
    size_t n = strcspn(s, "\n");
    if (n > 70) n = 70;
    fprintf(stderr, "    %s: \"%.*s%s\"\n", label, (int)n, s, s[n] ? "..." : "");
}

static bool on_event(void *user, const sf_train_event *e) {
    progress *p = user;
    switch (e->kind) {
    case SF_TRAIN_EVENT_STEP:
        fprintf(stderr, "epoch %d/%d step %lld/%lld  loss %.4f (ce %.4f class %.4f recon %.4f)  "
                        "lr %.2e  |g| %.3f  %d ex, %d tok, %.0f tok/s\n",
                e->epoch + 1, p->epochs, (long long)e->step, (long long)e->total_steps, e->loss,
                e->loss_ce, e->loss_class, e->loss_recon, e->lr, e->grad_norm,
                e->batch_examples, e->batch_tokens, e->tokens_per_s);
        log_event(p->log, e);
        break;
    case SF_TRAIN_EVENT_VALIDATION:
        fprintf(stderr, "validation %s epoch %d: L_ref %.4f L_compl %.4f L_class %.4f "
                        "L_recon %.3g (weighted %.4f)",
                e->epoch == 0 ? "before" : "after", e->epoch == 0 ? 1 : e->epoch, e->val_ref,
                e->val_compl, e->val_class, e->val_recon, e->val_total);
        if (e->refusal_harmful >= 0) {
            fprintf(stderr, "; refused %.0f%% of %d harmful", 100.0 * e->refusal_harmful,
                    e->n_judged_harmful);
        }
        if (e->refusal_harmless >= 0) {
            fprintf(stderr, ", %.0f%% of %d harmless", 100.0 * e->refusal_harmless,
                    e->n_judged_harmless);
        }
        fputc('\n', stderr);
        preview("harmful reply", e->sample_harmful);
        preview("harmless reply", e->sample_harmless);
        log_event(p->log, e);
        break;
    case SF_TRAIN_EVENT_CHECKPOINT:
        fprintf(stderr, "checkpoint: %s (epoch %d, step %lld)\n", e->path, e->epoch,
                (long long)e->step);
        break;
    case SF_TRAIN_EVENT_COMPLETIONS:
        fprintf(stderr, "\rgenerating harmless replies: %d/%d", e->done, e->total);
        if (e->done >= e->total) fputc('\n', stderr);
        break;
    }
    if (g_interrupted) fprintf(stderr, "interrupted: stopping with a checkpoint\n");
    return !g_interrupted;
}

/* ------------------------------------------------------------------------------------------ */
/* The command                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static const char *base_name(const char *path) {
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/') n--;
    const char *p = path + n;
    while (p > path && p[-1] != '/') p--;
    return p;
}

typedef struct run {
    sf_llm *llm;
    sf_tokenizer *tok;
    sf_sysformer *sf;
    sf_trainer *trainer;
    sf_prompt_set harmful, harmless, wrapped, wrapped_harmless, harmful_val, harmless_val;
    sf_jailbreak_set jb;
    sf_train_set train, val;
    FILE *log;
    char *cache_path, *log_path;
} run;

static void run_free(run *r) {
    if (r->log) fclose(r->log);
    sf_trainer_free(r->trainer);
    sf_train_set_free(&r->train);
    sf_train_set_free(&r->val);
    sf_prompt_set_free(&r->harmful);
    sf_prompt_set_free(&r->harmless);
    sf_jailbreak_set_free(&r->jb);
    sf_prompt_set_free(&r->wrapped);
    sf_prompt_set_free(&r->wrapped_harmless);
    sf_prompt_set_free(&r->harmful_val);
    sf_prompt_set_free(&r->harmless_val);
    sf_sysformer_free(r->sf);
    sf_tokenizer_free(r->tok);
    sf_llm_free(r->llm);
    free(r->cache_path);
    free(r->log_path);
}

static int train_main(const options *o, run *r) {
    if (mkdir(o->out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "sysformer train: cannot create %s: %s\n", o->out, strerror(errno));
        return 1;
    }
    r->cache_path = cli_path_join(o->out, "completions.jsonl");
    r->log_path = cli_path_join(o->out, "train_log.jsonl");
    if (!r->cache_path || !r->log_path) return cli_report("starting", SF_ERR_OUT_OF_MEMORY);

    /* Data first, so that a broken file fails before the slow model load. The harmless sample
     * defaults to the harmful count: balanced classes, and the replies to generate stay
     * proportional to the harmful set rather than to all of Alpaca. */
    const uint64_t seed = o->t.seed;
    sf_status st = sf_prompt_set_read(o->harmful, o->max_harmful, seed, &r->harmful);
    if (st != SF_OK) return cli_report("reading --harmful", st);
    const int32_t max_harmless = o->max_harmless ? o->max_harmless : r->harmful.n;
    st = sf_prompt_set_read(o->harmless, max_harmless, seed + 1, &r->harmless);
    if (st != SF_OK) return cli_report("reading --harmless", st);
    if (o->harmful_val) {
        st = sf_prompt_set_read(o->harmful_val, o->max_val, seed + 2, &r->harmful_val);
        if (st != SF_OK) return cli_report("reading --harmful-val", st);
    }
    if (o->harmless_val) {
        st = sf_prompt_set_read(o->harmless_val, o->max_val, seed + 3, &r->harmless_val);
        if (st != SF_OK) return cli_report("reading --harmless-val", st);
    }
    if (o->jailbreak) {
        st = sf_jailbreak_set_read(o->jailbreak, &r->jb);
        if (st == SF_OK) st = sf_prompt_set_wrap(&r->harmful, &r->jb, seed, &r->wrapped);
        /* Harmless prompts get their own draw of wrappers (another seed), so that a wrapper
         * is not paired with the same instruction on both sides. */
        if (st == SF_OK && o->wrap_harmless) {
            st = sf_prompt_set_wrap(&r->harmless, &r->jb, seed + 7, &r->wrapped_harmless);
        }
        if (st != SF_OK) return cli_report("reading --jailbreaks", st);
    }
    fprintf(stderr, "loading %s ...\n", o->llm);
    st = sf_llm_load(o->llm, &r->llm);
    if (st != SF_OK) return cli_report("loading the LLM", st);
    st = sf_tokenizer_load(o->tokenizer ? o->tokenizer : o->llm, &r->tok);
    if (st != SF_OK) return cli_report("loading the tokenizer (give --tokenizer PATH?)", st);
    sf_template_id tmpl;
    const char *src = sf_tokenizer_chat_template(r->tok);
    if (o->template_name) st = sf_template_by_name(o->template_name, &tmpl);
    else if (src) st = sf_template_detect(src, &tmpl);
    else st = sf_fail(SF_ERR_NOT_FOUND, "the tokenizer carries no chat template; pass "
                      "--template NAME (llama3, llama2, mistral, phi3, zephyr, chatml)");
    if (st != SF_OK) return cli_report("choosing the chat template", st);

    sf_train_text tx = {r->tok, tmpl, o->system, o->refusal, o->max_tokens};
    progress prog = {NULL, o->t.epochs};
    if (o->t.w_compl > 0) {
        int32_t made = 0;
        st = sf_train_fill_completions(r->llm, &tx, &r->harmless, o->compl_max_tokens,
                                       o->gen_batch, r->cache_path, on_event, &prog, &made);
        if (st == SF_OK && r->wrapped_harmless.n) {
            int32_t more = 0;
            st = sf_train_fill_completions(r->llm, &tx, &r->wrapped_harmless,
                                           o->compl_max_tokens, o->gen_batch, r->cache_path,
                                           on_event, &prog, &more);
            made += more;
        }
        if (st == SF_OK && r->harmless_val.n) {
            int32_t more = 0;
            st = sf_train_fill_completions(r->llm, &tx, &r->harmless_val, o->compl_max_tokens,
                                           o->gen_batch, r->cache_path, on_event, &prog, &more);
            made += more;
        }
        if (st != SF_OK) return cli_report("generating the harmless replies", st);
        if (g_interrupted) return 130;
        fprintf(stderr, "harmless replies: %d generated now, the rest from %s\n", made,
                r->cache_path);
    }
    int32_t skipped[6] = {0};
    st = sf_train_set_add_prompts(&r->train, &tx, &r->harmful, true, &skipped[0]);
    if (st == SF_OK && r->wrapped.n) {
        st = sf_train_set_add_prompts(&r->train, &tx, &r->wrapped, true, &skipped[1]);
    }
    if (st == SF_OK) {
        st = sf_train_set_add_prompts(&r->train, &tx, &r->harmless, false, &skipped[2]);
    }
    if (st == SF_OK && r->wrapped_harmless.n) {
        st = sf_train_set_add_prompts(&r->train, &tx, &r->wrapped_harmless, false, &skipped[5]);
    }
    if (st == SF_OK && r->harmful_val.n) {
        st = sf_train_set_add_prompts(&r->val, &tx, &r->harmful_val, true, &skipped[3]);
    }
    if (st == SF_OK && r->harmless_val.n) {
        st = sf_train_set_add_prompts(&r->val, &tx, &r->harmless_val, false, &skipped[4]);
    }
    if (st != SF_OK) return cli_report("encoding the prompts", st);
    int64_t tokens = 0;
    for (int32_t i = 0; i < r->train.n; i++) {
        tokens += r->train.ex[i].n_prompt + r->train.ex[i].n_target;
    }
    fprintf(stderr, "training examples: %d harmful, %d jailbreak-wrapped, %d harmless, %d "
                    "wrapped harmless (%lld tokens); validation: %d harmful, %d harmless; skipped "
                    "as longer than --max-tokens %d: %d\n",
            r->harmful.n - skipped[0], r->wrapped.n - skipped[1], r->harmless.n - skipped[2],
            r->wrapped_harmless.n - skipped[5], (long long)tokens,
            r->harmful_val.n - skipped[3], r->harmless_val.n - skipped[4], o->max_tokens,
            skipped[0] + skipped[1] + skipped[2] + skipped[3] + skipped[4] + skipped[5]);

    /* The Sysformer: the checkpoint's, or a fresh one that starts as the identity. */
    if (o->resume) {
        st = sf_sysformer_load(o->out, r->llm, &r->sf);
        if (st != SF_OK) return cli_report("loading the Sysformer to resume", st);
    } else if (o->init) {
        st = sf_sysformer_load(o->init, r->llm, &r->sf);
        if (st != SF_OK) return cli_report("loading --init", st);
        const char *recorded = sf_sysformer_get_config(r->sf)->system_prompt;
        if (recorded && strcmp(recorded, o->system) != 0) {
            fprintf(stderr, "sysformer train: --init %s was trained to rewrite \"%s\", not "
                            "--system \"%s\"\n", o->init, recorded, o->system);
            return 2;
        }
    } else {
        sf_sysformer_config cfg = sf_sysformer_default_config(r->llm);
        if (o->layers) cfg.num_layers = o->layers;
        if (o->heads) cfg.num_heads = o->heads;
        if (o->ff) cfg.dim_feedforward = o->ff;
        cfg.activation = o->gelu ? SF_ACT_GELU : SF_ACT_RELU;
        if (o->system_embedder) {
            /* The offset has one row per token of the system prompt's span. */
            int32_t ids[1024], n_ids = 0;
            sf_prompt_spans spans;
            st = sf_chat_encode(r->tok, tmpl, o->system, NULL, 0, "x", ids, 1024, &n_ids, &spans);
            if (st != SF_OK) return cli_report("encoding --system", st);
            cfg.num_layers = 0;
            cfg.system_offset_rows = spans.system;
        }
        cfg.system_prompt = o->system;
        cfg.chat_template = sf_template_get(tmpl)->name;
        cfg.llm_name = base_name(o->llm);
        char hash[32];
        st = sf_llm_embedding_hash(r->llm, hash, sizeof hash);
        cfg.llm_embedding_hash = hash;
        if (st == SF_OK) st = sf_sysformer_init(r->llm, &cfg, seed, &r->sf);
        if (st != SF_OK) return cli_report("creating the Sysformer", st);
    }
    const sf_sysformer_config *sc = sf_sysformer_get_config(r->sf);
    if (sc->system_offset_rows > 0 && sc->num_layers == 0) {
        fprintf(stderr, "SystemEmbedder: a learned %d x %d system-prompt embedding starting at "
                        "\"%s\"; template %s\n", sc->system_offset_rows, sc->d_model,
                o->system, sf_template_get(tmpl)->name);
    } else {
        fprintf(stderr, "Sysformer: %d layers, d %d, %d heads, ff %d; system prompt \"%s\"; "
                        "template %s\n", sc->num_layers, sc->d_model, sc->num_heads,
                sc->dim_feedforward, o->system, sf_template_get(tmpl)->name);
    }

    int32_t stop[2], n_stop = 0;
    const int32_t eos = sf_tokenizer_eos_id(r->tok), eot = sf_train_end_of_turn(&tx);
    if (eos >= 0) stop[n_stop++] = eos;
    if (eot >= 0 && eot != eos) stop[n_stop++] = eot;
    sf_train_options t = o->t;
    t.out_dir = o->out;
    t.on_event = on_event;
    t.user = &prog;
    st = sf_trainer_create(r->llm, r->sf, r->tok, stop, n_stop, &r->train,
                           r->val.n ? &r->val : NULL, &t, &r->trainer);
    if (st != SF_OK) return cli_report("setting up training", st);
    if (o->resume) {
        st = sf_trainer_resume(r->trainer, o->out);
        if (st != SF_OK) return cli_report("resuming", st);
        fprintf(stderr, "resuming after %d completed epoch%s, at step %lld of %lld\n",
                sf_trainer_epoch(r->trainer), sf_trainer_epoch(r->trainer) == 1 ? "" : "s",
                (long long)sf_trainer_step(r->trainer),
                (long long)sf_trainer_total_steps(r->trainer));
    }
    r->log = fopen(r->log_path, o->resume ? "a" : "w");
    if (!r->log) {
        fprintf(stderr, "sysformer train: cannot write %s: %s\n", r->log_path, strerror(errno));
        return 1;
    }
    prog.log = r->log;
    fprintf(stderr, "%lld steps over %d epochs, %d tokens per batch, lr %g (%s)\n",
            (long long)sf_trainer_total_steps(r->trainer), o->t.epochs, o->t.batch_tokens,
            o->t.lr, o->t.schedule == SF_LR_COSINE ? "cosine" : "constant");
    sf_train_memory mem;
    st = sf_trainer_memory(r->trainer, &mem);
    if (st != SF_OK) return cli_report("planning memory", st);
    report_memory(r->log, &mem, o->t.device == SF_TRAIN_CUDA);
    bool finished = false;
    st = sf_trainer_run(r->trainer, 0, &finished);
    if (st != SF_OK) return cli_report("training", st);
    if (!finished) {
        fprintf(stderr, "stopped at step %lld; continue with the same command plus --resume\n",
                (long long)sf_trainer_step(r->trainer));
        return 130;
    }
    printf("trained %s written to %s (sysformer.json + sysformer.safetensors); log in %s\n",
           sf_sysformer_get_config(r->sf)->num_layers == 0 ? "SystemEmbedder" : "Sysformer",
           o->out, r->log_path);
    return 0;
}

int cmd_train(int argc, char **argv) {
    options o;
    int rc = parse_options(argc, argv, &o);
    if (rc) return rc < 0 ? 0 : rc;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    run r;
    memset(&r, 0, sizeof r);
    rc = train_main(&o, &r);
    run_free(&r);
    return rc;
}
