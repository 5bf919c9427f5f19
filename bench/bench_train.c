/* Benchmark of ONE Sysformer training step (DESIGN.md §6): the forward through the Sysformer and
 * the frozen LLM, the four losses, the backward through the LLM to its input embeddings (no LLM
 * weight gradients) and on to every Sysformer weight and the classifier head, gradient clipping
 * and the AdamW update. On the CPU (the fp32 reference) and, when the build has CUDA and a device
 * is present, on the GPU; each with the LLM's recompute option off and on, and on the GPU once
 * more with the deterministic option (recompute off): its attention backwards compute dq in a
 * pass of their own instead of with atomics, and the row shows what that costs.
 *
 * usage: bench_train [--config smollm2-135m|tiny] [--model DIR|FILE.gguf] [--devices cpu,cuda]
 *                    [--batch-tokens 1024] [--prompt 128] [--system 6] [--reply 16]
 *                    [--repeats 3] [--max-tokens 8192] [--seed 1] [--peak 989]
 *
 * The LLM: --config writes a random Llama of that shape (fp32 safetensors, ~540 MB for
 * smollm2-135m) into a temporary directory under /tmp, loads it and deletes the files once
 * loaded (the mapping stays valid); --model loads an existing Hugging Face directory or GGUF
 * file instead. smollm2-135m is SmolLM2-135M's published shape (hidden 576, 30 layers, 9 heads,
 * 3 KV heads, head dim 64, feed-forward 1536, vocabulary 49152, tied embeddings, RoPE theta 1e5);
 * tiny is sf_random_llm_default_config() with 4 heads of 64 (the GPU's fused attention takes
 * head dims 64, 80, 96 and 128 only). The Sysformer is sf_sysformer_default_config's (2 layers,
 * the LLM's head count, feed-forward 4 d, classifier head), from sf_sysformer_init, fresh for
 * every row so that every row starts from the same weights.
 *
 * The data: examples of --prompt tokens, prefix 5 | system S | middle 5 | user (the rest) |
 * suffix 3, followed by a reply of --reply tokens; random ids in [0, vocab) from a fixed-seed
 * generator, the template pieces and the system prompt the same in every example, the user text
 * drawn per example; every other example is harmful, with one fixed refusal as its reply, the
 * others get random replies. The trainer packs floor(batch_tokens / (prompt + reply))
 * examples (at least one) per step; all examples have the same length, so every step has the
 * same token count. All four losses are on (w_ref = w_compl = w_class = 1 and w_recon = 1; the
 * trainer's default w_recon is 0), clipping at 1.0.
 *
 * What is timed: one optimizer step exactly as the trainer takes it, by the trainer's own clock
 * (its step event's batch_tokens / tokens_per_s): packing the batch and gathering its
 * embeddings on the host, the forward, losses and backward, clipping and AdamW (on the GPU all
 * on the device: the batch goes up, the losses and the gradient norm come back; the weights
 * and moments stay there). Not counted: what sf_trainer_run(t, 1, NULL) does after its steps,
 * copying the GPU's weights and moments back to the host (3 x 42 MB at this shape); the
 * "call" column is the wall clock (CLOCK_MONOTONIC) around the whole call, that copy included.
 * One warm-up step, then the median of --repeats steps. Progress goes to stderr; stdout has one
 * line per row and a "SUMMARY train ..." line (key=value) per row. Memory: sf_trainer_memory
 * of each row's trainer, and the GPU's plan from sf_cuda_train_plan, which needs no device (so
 * it is printed on machines without a GPU too, when the library was built with CUDA).
 *
 * FLOPs of one step (multiply-add = 2 FLOPs), "model FLOPs" (what the math needs, not counting
 * the recompute option's second forward or flash attention's recomputed scores). A step packs
 * k requests of n = prompt + reply rows: T = k n rows, C = k reply rows scored by the LM head
 * (both paths run the head on those rows only), k S system and k U user rows.
 *   G = 2 T L [d hd (2 H + 2 Hkv) + 3 d ff]   the LLM's q, k, v, o and SwiGLU GEMMs, forward
 *   A = 4 hd H L k pairs(n)                    QK^T and PV over the visible causal pairs,
 *                                              pairs(n) = n (n + 1) / 2 without a sliding window
 *   Hd = 2 d V C                               the LM head on the cross-entropy rows
 *   F_s = the Sysformer's forward, per layer:  2 kS d 3d + 2 kS d d (self-attention in/out
 *         projections) + 4 d k S^2 (its scores and values) + 2 kS d d + 2 kU d 2d + 2 kS d d
 *         (cross-attention q, k and v of the user rows, out) + 4 d k S U + 4 kS d ff_s
 * The LLM is frozen, so its backward forms activation gradients only: each GEMM's dX costs what
 * its forward did (G once more, no dW), the attention backward's dP, dV, dQ and dK are 2 A, and
 * the head's dh is Hd once more. The Sysformer's backward forms dX and dW: ~2 F_s (the
 * Sysformer is ~2% of the total at SmolLM2-135M shapes, so the approximation hardly matters).
 * The classifier (2 d per request), norms, RoPE, activations, softmax, losses and AdamW are not
 * counted (memory-bound or negligible). So
 *   FLOPs = (G + A + Hd) + (G + 2 A + Hd) + 3 F_s = 2 G + 3 A + 2 Hd + 3 F_s,
 * and with recompute the hardware runs another G + A that the model FLOPs leave out (the MFU of
 * a recompute row is therefore lower for the same kernels). MFU (GPU rows only) = FLOPs / step
 * time / peak, peak = 989 TFLOP/s, the H200's dense bf16 spec (--peak); since the step time
 * includes the host's packing and the transfers, it is a lower bound on the kernels' own.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_models.h"
#include "bench_util.h"
#include "core/native_blas.h"
#include "cuda/train.h"
#include "model/random_llm.h"
#include "sysformer.h"
#include "sysformer/module.h"
#include "train/trainer.h"

#define MAX_REPEATS 99
#define PREFIX 5
#define MIDDLE 5
#define SUFFIX 3

/* ---------------------------------------------------------------------------------------- */
/* Options and shapes                                                                          */
/* ---------------------------------------------------------------------------------------- */

typedef struct options {
    const char *config, *model, *devices;
    int batch_tokens, prompt, system, reply, repeats, max_tokens;
    uint64_t seed;
    double peak_tflops;
} options;

/* One example's spans and the number of examples per step. */
typedef struct shape {
    int prompt, system, user, reply;
    int rows;      /* prompt + reply                       */
    int per_step;  /* examples the trainer packs per step  */
} shape;

static shape make_shape(const options *o) {
    shape s;
    s.prompt = o->prompt;
    s.system = o->system;
    s.user = o->prompt - PREFIX - o->system - MIDDLE - SUFFIX;
    s.reply = o->reply;
    s.rows = o->prompt + o->reply;
    s.per_step = o->batch_tokens / s.rows;
    if (s.per_step < 1) s.per_step = 1;
    return s;
}

/* tiny is sf_random_llm_default_config() with 4 heads of 64; smollm2-135m is bench_models.h's,
 * with SmolLM2's BOS and EOS ids for the random model's files. Larger shapes are not offered:
 * the LLM is written and loaded in fp32 on the host first. */
static bool make_llm_config(const char *name, sf_llm_config *c) {
    if (!strcmp(name, "tiny")) {
        *c = sf_random_llm_default_config();
        c->num_heads = 4; /* 4 x 64 = hidden 256: a head dim the GPU attention takes */
        c->num_kv_heads = 2;
        c->head_dim = 64;
        return true;
    }
    const char *note;
    if (strcmp(name, "smollm2-135m") || !bench_llm_config(name, c, &note)) return false;
    c->bos_token_id = 1;
    c->n_eos_token_ids = 1;
    c->eos_token_ids[0] = 2;
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* FLOPs (see the header comment)                                                              */
/* ---------------------------------------------------------------------------------------- */

/* Model FLOPs of one step of k requests: 2 G + 3 A + 2 Hd + 3 F_s. */
static double step_flops(const sf_llm_config *c, const sf_sysformer_config *s, const shape *sh,
                         int k) {
    const double T = (double)k * sh->rows, C = (double)k * sh->reply;
    const double G = 2.0 * T * c->num_layers * bench_layer_weights(c);
    const double A = 4.0 * c->head_dim * c->num_heads * c->num_layers * k *
                     bench_causal_pairs(c, sh->rows);
    const double Hd = 2.0 * (double)c->hidden_size * c->vocab_size * C;
    return 2.0 * G + 3.0 * A + 2.0 * Hd + 3.0 * bench_sysformer_flops(s, k, sh->system, sh->user);
}

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                               */
/* ---------------------------------------------------------------------------------------- */

static uint64_t next_random(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void draw_ids(int32_t *ids, int n, int vocab, uint64_t *state) {
    for (int i = 0; i < n; i++) ids[i] = (int32_t)(next_random(state) % (uint64_t)vocab);
}

static double mib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

/* Deletes the files of a flat directory, then the directory. */
static void remove_dir(const char *dir) {
    DIR *dp = opendir(dir);
    if (dp) {
        const struct dirent *e;
        char path[4096];
        while ((e = readdir(dp)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (unlink(path) != 0)
                fprintf(stderr, "bench_train: cannot delete %s: %s\n", path, strerror(errno));
        }
        closedir(dp);
    }
    if (rmdir(dir) != 0)
        fprintf(stderr, "bench_train: cannot delete %s: %s\n", dir, strerror(errno));
}

/* ---------------------------------------------------------------------------------------- */
/* The training set                                                                            */
/* ---------------------------------------------------------------------------------------- */

/* n examples of shape sh (see the header comment). */
static sf_status build_set(const shape *sh, int vocab, int n, uint64_t seed, sf_train_set *set) {
    uint64_t rng = seed * 0x2545f4914f6cdd1dull + 77u;
    int32_t *prompt = malloc((size_t)sh->prompt * sizeof *prompt);
    int32_t *reply = malloc((size_t)(sh->reply > 0 ? sh->reply : 1) * sizeof *reply);
    int32_t *refusal = malloc((size_t)(sh->reply > 0 ? sh->reply : 1) * sizeof *refusal);
    sf_status st = SF_OK;
    if (!prompt || !reply || !refusal) {
        fprintf(stderr, "bench_train: out of host memory\n");
        st = SF_ERR_OUT_OF_MEMORY;
    }
    const sf_prompt_spans spans = {.prefix = PREFIX, .system = sh->system, .middle = MIDDLE,
                                   .user = sh->user, .suffix = SUFFIX};
    if (st == SF_OK) {
        /* The parts every example shares: template pieces, system prompt, refusal. */
        draw_ids(prompt, sh->prompt, vocab, &rng);
        draw_ids(refusal, sh->reply, vocab, &rng);
    }
    const int user0 = PREFIX + sh->system + MIDDLE;
    for (int i = 0; st == SF_OK && i < n; i++) {
        const bool harmful = i % 2 == 0;
        draw_ids(prompt + user0, sh->user, vocab, &rng);
        if (!harmful) draw_ids(reply, sh->reply, vocab, &rng);
        st = sf_train_set_add(set, prompt, sh->prompt, &spans, harmful ? refusal : reply,
                              sh->reply, harmful);
        if (st != SF_OK)
            fprintf(stderr, "bench_train: sf_train_set_add: %s\n", sf_last_error());
    }
    free(prompt);
    free(reply);
    free(refusal);
    return st;
}

/* ---------------------------------------------------------------------------------------- */
/* One row: a device, a recompute setting, deterministic or not                                */
/* ---------------------------------------------------------------------------------------- */

/* What the step callback saw last. */
typedef struct step_record {
    int64_t steps;
    int32_t tokens, examples;
    double loss, grad_norm;
    double step_s; /* the trainer's own wall time of the step (batch_tokens / tokens_per_s) */
} step_record;

static bool on_event(void *user, const sf_train_event *ev) {
    if (ev->kind == SF_TRAIN_EVENT_STEP) {
        step_record *r = user;
        r->steps++;
        r->tokens = ev->batch_tokens;
        r->examples = ev->batch_examples;
        r->loss = ev->loss;
        r->grad_norm = ev->grad_norm;
        r->step_s = ev->tokens_per_s > 0 ? ev->batch_tokens / ev->tokens_per_s : NAN;
    }
    return true;
}

#define ROW_TRY(what, call)                                                                   \
    do {                                                                                      \
        sf_status st_ = (call);                                                               \
        if (st_ != SF_OK) {                                                                   \
            printf("  ERROR %s %s: %s: %s: %s\n", dev_name, rc_name, (what),                  \
                   sf_status_string(st_), sf_last_error());                                   \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

/* Returns 0 when the row was measured. */
static int bench_row(const sf_llm *llm, const char *config, const options *o, const shape *sh,
                     const sf_train_set *set, sf_train_device device, bool recompute,
                     bool deterministic) {
    const char *dev_name = device == SF_TRAIN_CUDA ? "cuda" : "cpu";
    /* (the name the progress and ERROR lines give the row) */
    const char *rc_name = deterministic ? (recompute ? "on, deterministic" : "off, deterministic")
                                        : recompute ? "on" : "off";
    const sf_llm_config *c = sf_llm_get_config(llm);
    sf_sysformer *sf = NULL;
    sf_trainer *t = NULL;
    int result = 1;
    bool summary = false;
    double times[MAX_REPEATS] = {0}, calls[MAX_REPEATS] = {0};

    fprintf(stderr, "bench_train: %s recompute %s: creating the trainer\n", dev_name, rc_name);
    const sf_sysformer_config scfg = sf_sysformer_default_config(llm);
    ROW_TRY("sf_sysformer_init", sf_sysformer_init(llm, &scfg, o->seed, &sf));
    sf_train_options to = sf_train_default_options();
    to.w_recon = 1.0;
    to.epochs = 1;
    to.batch_tokens = o->batch_tokens;
    to.seed = o->seed;
    to.validate_first = false;
    to.out_dir = NULL;
    to.recompute = recompute;
    to.deterministic = deterministic;
    to.device = device;
    to.cuda_device = 0;
    step_record rec;
    memset(&rec, 0, sizeof rec);
    to.on_event = on_event;
    to.user = &rec;
    const double tc0 = bench_now_s();
    ROW_TRY("sf_trainer_create", sf_trainer_create(llm, sf, NULL, NULL, 0, set, NULL, &to, &t));
    const double create_s = bench_now_s() - tc0;
    sf_train_memory mem;
    ROW_TRY("sf_trainer_memory", sf_trainer_memory(t, &mem));

    int32_t tokens = -1, examples = -1;
    bool uniform = true, finite = true;
    for (int it = -1; it < o->repeats; it++) {
        const int64_t before = rec.steps;
        const double t0 = bench_now_s();
        ROW_TRY("sf_trainer_run", sf_trainer_run(t, 1, NULL));
        const double dt = bench_now_s() - t0;
        if (rec.steps != before + 1) {
            printf("  ERROR %s %s: the trainer took %lld steps instead of 1\n", dev_name, rc_name,
                   (long long)(rec.steps - before));
            goto done;
        }
        if (tokens < 0) {
            tokens = rec.tokens;
            examples = rec.examples;
        } else if (rec.tokens != tokens) {
            uniform = false;
        }
        if (!isfinite(rec.loss) || !isfinite(rec.grad_norm)) finite = false;
        fprintf(stderr, "  %s recompute %s: %s %d: %.3f s (call %.3f s), %d tokens, loss %.4f, "
                "grad norm %.4g\n",
                dev_name, rc_name, it < 0 ? "warm-up" : "step", it < 0 ? 0 : it + 1, rec.step_s,
                dt, rec.tokens, rec.loss, rec.grad_norm);
        if (it >= 0) {
            times[it] = rec.step_s;
            calls[it] = dt;
        }
    }

    const double call_s = bench_median(calls, o->repeats);
    const double step_s = bench_median(times, o->repeats);
    double lo = times[0], hi = times[0];
    for (int i = 1; i < o->repeats; i++) {
        if (times[i] < lo) lo = times[i];
        if (times[i] > hi) hi = times[i];
    }
    const double flops = step_flops(c, &sf->cfg, sh, examples);
    const double tok_s = tokens / step_s;
    const double tflop_s = flops / step_s * 1e-12;
    char mfu[32] = "-";
    if (device == SF_TRAIN_CUDA)
        snprintf(mfu, sizeof mfu, "%.1f%%", 100.0 * tflop_s / o->peak_tflops);
    printf("  %-4s %-14s recompute %-3s%s %6d tokens (%3d req)  step %9.4f s (min %.4f max "
           "%.4f; call %.4f)  %9.1f tokens/s  %8.3f TFLOP/s  MFU %-6s  activations %8.1f MiB  "
           "optimizer %6.1f MiB  device %8.1f MiB  created in %.2f s%s%s\n",
           dev_name, config, recompute ? "on" : "off", deterministic ? " deterministic" : "",
           tokens, examples, step_s, lo, hi, call_s, tok_s, tflop_s, mfu,
           mib(mem.activations), mib(mem.optimizer), mib(mem.device_total), create_s,
           uniform ? "" : "  WARNING: steps had different token counts",
           finite ? "" : "  CHECK FAILED: non-finite loss or gradient norm");
    printf("SUMMARY train device=%s config=%s recompute=%s deterministic=%d tokens_per_step=%d "
           "step_s=%.4f call_s=%.4f tok_s=%.1f tflop_s=%.4f mfu=%s activation_bytes=%zu "
           "optimizer_bytes=%zu device_bytes=%zu loss=%.4f\n",
           dev_name, config, recompute ? "on" : "off", (int)deterministic, tokens, step_s, call_s,
           tok_s, tflop_s, mfu, mem.activations, mem.optimizer, mem.device_total, rec.loss);
    summary = true;
    result = finite ? 0 : 1;

done:
    if (!summary)
        printf("SUMMARY train device=%s config=%s recompute=%s deterministic=%d FAILED\n",
               dev_name, config, recompute ? "on" : "off", (int)deterministic);
    fflush(stdout);
    sf_trainer_free(t);
    sf_sysformer_free(sf);
    return result;
}

/* ---------------------------------------------------------------------------------------- */
/* The GPU memory plan (no device needed)                                                      */
/* ---------------------------------------------------------------------------------------- */

static void print_plan(const sf_llm *llm, const options *o, int step_rows) {
    sf_sysformer *sf = NULL;
    const sf_sysformer_config scfg = sf_sysformer_default_config(llm);
    if (sf_sysformer_init(llm, &scfg, o->seed, &sf) != SF_OK) {
        printf("GPU memory plan: ERROR sf_sysformer_init: %s\n", sf_last_error());
        return;
    }
    printf("GPU memory plan (sf_cuda_train_plan, computed without a device), MiB:\n");
    printf("  %10s %9s %12s %10s %12s %11s %10s\n", "max_tokens", "recompute", "llm_weights",
           "sysformer", "activations", "pinned_host", "total");
    const int sizes[2] = {step_rows, o->max_tokens};
    bool no_device = false;
    for (int i = 0; i < 2 && !no_device; i++) {
        if (i == 1 && sizes[1] == sizes[0]) break;
        for (int r = 0; r < 2 && !no_device; r++) {
            sf_cuda_train_options co = sf_cuda_train_default_options();
            co.max_tokens = sizes[i];
            co.recompute = r == 1;
            sf_cuda_train_memory m;
            const sf_status st = sf_cuda_train_plan(llm, sf, &co, &m);
            if (st == SF_ERR_NO_DEVICE) { /* a build without CUDA: one line says it all */
                printf("  unavailable: %s\n", sf_last_error());
                no_device = true;
                continue;
            }
            if (st != SF_OK) {
                printf("  %10d %9s unavailable: %s: %s\n", sizes[i], r ? "on" : "off",
                       sf_status_string(st), sf_last_error());
                continue;
            }
            printf("  %10d %9s %12.1f %10.1f %12.1f %11.1f %10.1f\n", sizes[i], r ? "on" : "off",
                   mib(m.llm_weights), mib(m.sysformer), mib(m.activations), mib(m.pinned_host),
                   mib(m.total));
        }
    }
    fflush(stdout);
    sf_sysformer_free(sf);
}

/* ---------------------------------------------------------------------------------------- */

static int usage(void) {
    fprintf(stderr,
            "usage: bench_train [--config smollm2-135m|tiny] [--model DIR|FILE.gguf] "
            "[--devices cpu,cuda] [--batch-tokens 1024] [--prompt 128] [--system 6] "
            "[--reply 16] [--repeats 3] [--max-tokens 8192] [--seed 1] [--peak 989]\n");
    return 2;
}

int main(int argc, char **argv) {
    sf_main_use_native_blas(argv);
    options o = {.config = "smollm2-135m", .model = NULL, .devices = "cpu,cuda",
                 .batch_tokens = 1024, .prompt = 128, .system = 6, .reply = 16, .repeats = 3,
                 .max_tokens = 8192, .seed = 1, .peak_tflops = 989.0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        }
        if (i + 1 >= argc) return usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--config")) o.config = v;
        else if (!strcmp(a, "--model")) o.model = v;
        else if (!strcmp(a, "--devices")) o.devices = v;
        else if (!strcmp(a, "--batch-tokens")) o.batch_tokens = atoi(v);
        else if (!strcmp(a, "--prompt")) o.prompt = atoi(v);
        else if (!strcmp(a, "--system")) o.system = atoi(v);
        else if (!strcmp(a, "--reply")) o.reply = atoi(v);
        else if (!strcmp(a, "--repeats")) o.repeats = atoi(v);
        else if (!strcmp(a, "--max-tokens")) o.max_tokens = atoi(v);
        else if (!strcmp(a, "--seed")) o.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--peak")) o.peak_tflops = atof(v);
        else {
            fprintf(stderr, "bench_train: unknown option %s\n", a);
            return usage();
        }
    }
    if (o.system < 1 || o.reply < 1 || o.prompt < PREFIX + o.system + MIDDLE + 1 + SUFFIX ||
        o.batch_tokens < 1 || o.repeats < 1 || o.repeats > MAX_REPEATS || o.max_tokens < 1 ||
        !(o.peak_tflops > 0) || o.prompt > 1000000 || o.reply > 1000000) {
        fprintf(stderr, "bench_train: bad sizes (need system >= 1, reply >= 1, prompt >= %d + "
                        "system + 1, 1 <= repeats <= %d)\n", PREFIX + MIDDLE + SUFFIX,
                MAX_REPEATS);
        return 2;
    }
    char order[2][8];
    int n_dev = 0;
    {
        char *list = strdup(o.devices);
        if (!list) return 1;
        char *save = NULL;
        for (char *d = strtok_r(list, ",", &save); d; d = strtok_r(NULL, ",", &save)) {
            if ((strcmp(d, "cpu") && strcmp(d, "cuda")) || n_dev == 2) {
                fprintf(stderr, "bench_train: --devices takes cpu, cuda or both (in the order "
                                "to run), not '%s'\n", o.devices);
                free(list);
                return 2;
            }
            snprintf(order[n_dev++], sizeof order[0], "%s", d);
        }
        free(list);
    }

    /* The LLM. */
    sf_llm *llm = NULL;
    const char *config = o.config;
    if (o.model) {
        fprintf(stderr, "bench_train: loading %s\n", o.model);
        const sf_status st = sf_llm_load(o.model, &llm);
        if (st != SF_OK) {
            printf("bench_train: ERROR loading %s: %s: %s\n", o.model, sf_status_string(st),
                   sf_last_error());
            return 1;
        }
        const char *slash = strrchr(o.model, '/');
        config = slash && slash[1] ? slash + 1 : o.model;
    } else {
        sf_llm_config cfg;
        if (!make_llm_config(o.config, &cfg)) {
            fprintf(stderr, "bench_train: unknown --config %s (smollm2-135m or tiny)\n", o.config);
            return 2;
        }
        char dir[] = "/tmp/bench_train.XXXXXX";
        if (!mkdtemp(dir)) {
            printf("bench_train: ERROR mkdtemp: %s\n", strerror(errno));
            return 1;
        }
        fprintf(stderr, "bench_train: writing a random %s into %s\n", o.config, dir);
        const double t0 = bench_now_s();
        sf_status st = sf_random_llm_write(dir, &cfg, o.seed);
        if (st == SF_OK) st = sf_llm_load(dir, &llm);
        if (st != SF_OK)
            printf("bench_train: ERROR writing or loading the random model: %s: %s\n",
                   sf_status_string(st), sf_last_error());
        remove_dir(dir); /* a loaded model no longer needs its files */
        if (st != SF_OK) return 1;
        fprintf(stderr, "bench_train: written and loaded in %.1f s (files deleted)\n",
                bench_now_s() - t0);
    }
    const sf_llm_config *c = sf_llm_get_config(llm);

    const shape sh = make_shape(&o);
    const int n_examples = sh.per_step * (1 + o.repeats); /* exactly 1 + repeats steps */
    sf_train_set set;
    memset(&set, 0, sizeof set);
    if (build_set(&sh, c->vocab_size, n_examples, o.seed, &set) != SF_OK) {
        sf_llm_free(llm);
        return 1;
    }

    int failed = 0;
    {
        sf_sysformer *probe = NULL;
        const sf_sysformer_config scfg = sf_sysformer_default_config(llm);
        int64_t n_w = 0;
        if (sf_sysformer_init(llm, &scfg, o.seed, &probe) == SF_OK) n_w = probe->n_weights;
        const double flops = probe ? step_flops(c, &probe->cfg, &sh, sh.per_step) : NAN;
        const double f_sys = probe ? 3.0 * bench_sysformer_flops(&probe->cfg, sh.per_step,
                                                                     sh.system, sh.user)
                                   : NAN;
        sf_sysformer_free(probe);
        const double llm_params =
            (double)c->vocab_size * c->hidden_size * (c->tie_word_embeddings ? 1 : 2) +
            (double)c->num_layers * bench_layer_weights(c);
        const char *omp = getenv("OMP_NUM_THREADS");
        printf("bench_train: %s (d %d, %d layers, %d/%d heads of %d, ff %d, vocab %d, %.1f M "
               "params); Sysformer %d layers, %d heads, ff %d, %.2f M weights\n",
               config, c->hidden_size, c->num_layers, c->num_heads, c->num_kv_heads, c->head_dim,
               c->intermediate_size, c->vocab_size, llm_params * 1e-6, scfg.num_layers,
               scfg.num_heads, scfg.dim_feedforward, (double)n_w * 1e-6);
        printf("  step: %d requests x (%d prompt = prefix %d | system %d | middle %d | user %d | "
               "suffix %d, + %d reply) = %d tokens (--batch-tokens %d); half harmful; losses "
               "ref, compl, class, recon all on; median of %d after 1 warm-up; "
               "OMP_NUM_THREADS=%s\n",
               sh.per_step, sh.prompt, PREFIX, sh.system, MIDDLE, sh.user, SUFFIX, sh.reply,
               sh.per_step * sh.rows, o.batch_tokens, o.repeats, omp ? omp : "(unset)");
        printf("  CPU matmul: %s\n", sf_cpu_matmul_backend());
        printf("  model FLOPs per step %.4f T (Sysformer fwd+bwd %.2f%%): 2 G + 3 A + 2 Hd + "
               "3 F_s, the frozen LLM's backward forming dX only; recompute's extra forward "
               "not counted\n",
               flops * 1e-12, 100.0 * f_sys / flops);
    }
    const int step_rows = sh.rows > o.batch_tokens ? sh.rows : o.batch_tokens;
    print_plan(llm, &o, step_rows);

    int n_cuda = 0;
    const sf_status cst = sf_cuda_device_count(&n_cuda);
    const bool have_cuda = sf_cuda_built() && cst == SF_OK && n_cuda > 0;
    for (int i = 0; i < n_dev; i++) {
        if (!strcmp(order[i], "cuda")) {
            if (!have_cuda) {
                printf("bench_train: no CUDA device: GPU rows skipped (%s)\n",
                       !sf_cuda_built()  ? "the library was built without CUDA"
                       : cst != SF_OK    ? sf_last_error()
                                         : "CUDA build, 0 devices");
                fflush(stdout);
                continue;
            }
            for (int r = 0; r < 3; r++) {
                failed += bench_row(llm, config, &o, &sh, &set, SF_TRAIN_CUDA, r == 1,
                                    r == 2) != 0;
            }
        } else {
            for (int r = 0; r < 2; r++)
                failed += bench_row(llm, config, &o, &sh, &set, SF_TRAIN_CPU, r == 1, false) != 0;
        }
    }

    sf_train_set_free(&set);
    sf_llm_free(llm);
    printf("\nbench_train: %s\n", failed ? "some rows failed (see ERROR lines)" : "done");
    return failed ? 1 : 0;
}
