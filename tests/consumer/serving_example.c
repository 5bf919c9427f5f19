/* A serving stack's use of sf_cuda_guarded_embed: the stack owns the device buffers and the
 * stream, the library only writes the guarded input embeddings, which the stack would then feed
 * to its own LLM forward as inputs_embeds.
 *
 * It writes a tiny random Llama (config.json + model.safetensors, by hand: the public API has no
 * writer, and the CLI's random model has head_dim 32, which the fused attention does not take),
 * loads its configuration and embedding table (sf_llm_load_embeddings), creates a fresh
 * Sysformer and a guard-only engine that borrows the stack's own device copy of the embedding
 * table, assembles two chat prompts, and checks the device result against
 * sf_guarded_embed_cpu. A fresh Sysformer is the identity (S' == S exactly: its out_proj and
 * linear2 are zero, norm_first, no final norm), so every row, system span included,
 * must be exactly bf16(E[token]) — the stack's table holds E as bf16, rounded to nearest even.
 * Then a bad token id (counted, and its request named by sf_cuda_guard_check), and the call
 * captured into a CUDA graph and replayed, as a stack that graphs its forward would.
 *
 * Usage: serving_example [DIR]   (DIR: where the model is written; default a temporary folder)
 * Without CUDA support or without a GPU it says so and exits 0: it is a demo; the engine tests
 * carry the proofs. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cuda_runtime.h>
#include <sysformer.h>

enum { VOCAB = 256, HIDDEN = 128, HEADS = 2, KV_HEADS = 1, HEAD_DIM = 64, FF = 256 };

#define CUDA_OK(call)                                                                          \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "serving_example: %s: %s\n", #call, cudaGetErrorString(e_));       \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

#define SF_OK_OR_FAIL(what, call)                                                              \
    do {                                                                                       \
        sf_status s_ = (call);                                                                 \
        if (s_ != SF_OK) {                                                                     \
            fprintf(stderr, "serving_example: %s: %s: %s\n", what, sf_status_string(s_),        \
                    sf_last_error());                                                          \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* A tiny random Llama on disk                                                                 */
/* ------------------------------------------------------------------------------------------ */

typedef struct tensor_spec {
    const char *name;
    int64_t rows, cols; /* cols 0: a vector */
    float fill;         /* 0: random in [-0.1, 0.1); else every entry (norm weights) */
} tensor_spec;

static const tensor_spec k_tensors[] = {
    {"model.embed_tokens.weight", VOCAB, HIDDEN, 0.0f},
    {"model.norm.weight", HIDDEN, 0, 1.0f},
    {"model.layers.0.input_layernorm.weight", HIDDEN, 0, 1.0f},
    {"model.layers.0.post_attention_layernorm.weight", HIDDEN, 0, 1.0f},
    {"model.layers.0.self_attn.q_proj.weight", HEADS * HEAD_DIM, HIDDEN, 0.0f},
    {"model.layers.0.self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN, 0.0f},
    {"model.layers.0.self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN, 0.0f},
    {"model.layers.0.self_attn.o_proj.weight", HIDDEN, HEADS * HEAD_DIM, 0.0f},
    {"model.layers.0.mlp.gate_proj.weight", FF, HIDDEN, 0.0f},
    {"model.layers.0.mlp.up_proj.weight", FF, HIDDEN, 0.0f},
    {"model.layers.0.mlp.down_proj.weight", HIDDEN, FF, 0.0f},
};
enum { N_TENSORS = sizeof k_tensors / sizeof k_tensors[0] };

static int64_t numel(const tensor_spec *t) { return t->rows * (t->cols ? t->cols : 1); }

/* A fixed sequence (xorshift32), so that every run writes the same model. */
static float next_weight(uint32_t *state) {
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return ((float)(x >> 8) / 16777216.0f - 0.5f) * 0.2f;
}

static int write_model(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "serving_example: cannot write %s\n", path);
        return 1;
    }
    fprintf(f,
            "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
            "\"vocab_size\": %d, \"hidden_size\": %d, \"intermediate_size\": %d, "
            "\"num_hidden_layers\": 1, \"num_attention_heads\": %d, \"num_key_value_heads\": %d, "
            "\"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0, "
            "\"hidden_act\": \"silu\", \"tie_word_embeddings\": true, \"bos_token_id\": 1, "
            "\"eos_token_id\": 2}\n",
            VOCAB, HIDDEN, FF, HEADS, KV_HEADS);
    if (fclose(f) != 0) return 1;

    /* safetensors: u64 header length, the JSON header (space-padded to 8 bytes), then the data
     * as little-endian F32, tensors back to back in the order listed. */
    char header[4096];
    size_t len = (size_t)snprintf(header, sizeof header, "{");
    int64_t offset = 0;
    for (int i = 0; i < N_TENSORS; i++) {
        const tensor_spec *t = &k_tensors[i];
        const int64_t bytes = numel(t) * 4;
        char shape[64];
        if (t->cols) snprintf(shape, sizeof shape, "[%lld, %lld]", (long long)t->rows,
                              (long long)t->cols);
        else snprintf(shape, sizeof shape, "[%lld]", (long long)t->rows);
        len += (size_t)snprintf(header + len, sizeof header - len,
                                "%s\"%s\": {\"dtype\": \"F32\", \"shape\": %s, "
                                "\"data_offsets\": [%lld, %lld]}",
                                i ? ", " : "", t->name, shape, (long long)offset,
                                (long long)(offset + bytes));
        offset += bytes;
    }
    len += (size_t)snprintf(header + len, sizeof header - len, "}");
    while (len % 8) header[len++] = ' ';
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "serving_example: cannot write %s\n", path);
        return 1;
    }
    const uint64_t header_len = len; /* the format is little-endian, as is every CUDA host */
    int ok = fwrite(&header_len, 8, 1, f) == 1 && fwrite(header, 1, len, f) == len;
    uint32_t state = 12345u;
    for (int i = 0; ok && i < N_TENSORS; i++) {
        for (int64_t j = 0; ok && j < numel(&k_tensors[i]); j++) {
            const float v = k_tensors[i].fill != 0.0f ? k_tensors[i].fill : next_weight(&state);
            ok = fwrite(&v, 4, 1, f) == 1;
        }
    }
    if (fclose(f) != 0 || !ok) {
        fprintf(stderr, "serving_example: error writing %s\n", path);
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* bf16 on the host                                                                            */
/* ------------------------------------------------------------------------------------------ */

static float bf16_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16, rounding to nearest even (what __float2bfloat16 does). */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float round_bf16(float f) { return bf16_to_float(to_bf16(f)); }

/* ------------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    int devices = 0;
    if (!sf_cuda_built() || sf_cuda_device_count(&devices) != SF_OK || devices < 1) {
        printf("serving_example: no CUDA device; skipped\n");
        return 0;
    }
    char tmp_dir[] = "/tmp/sf_serving_XXXXXX";
    const char *dir = argc > 1 ? argv[1] : mkdtemp(tmp_dir);
    if (!dir || (argc > 1 && mkdir(dir, 0755) != 0 && access(dir, W_OK) != 0)) {
        fprintf(stderr, "serving_example: cannot use %s as the model folder\n",
                argc > 1 ? argv[1] : "a temporary folder");
        return 1;
    }
    if (write_model(dir) != 0) return 1;

    /* The library side: the frozen LLM's configuration and embedding table (all a guard needs:
     * the stack's own LLM runs the rest) and a fresh Sysformer. */
    sf_llm *llm = NULL;
    SF_OK_OR_FAIL("loading the embeddings", sf_llm_load_embeddings(dir, &llm));
    const sf_sysformer_config sf_cfg = sf_sysformer_default_config(llm);
    sf_sysformer *sysformer = NULL;
    SF_OK_OR_FAIL("creating the Sysformer", sf_sysformer_init(llm, &sf_cfg, 7, &sysformer));

    /* The serving stack's LLM already holds the embedding table on the device in bf16 (here it
     * is made from the same weights). The guard-only engine borrows it instead of uploading a
     * second copy: its device memory is then the Sysformer and its arena only. */
    uint16_t *d_table = NULL;
    {
        int32_t every[VOCAB];
        for (int32_t t = 0; t < VOCAB; t++) every[t] = t;
        float *rows = malloc((size_t)VOCAB * HIDDEN * sizeof *rows);
        uint16_t *bf16 = malloc((size_t)VOCAB * HIDDEN * sizeof *bf16);
        if (!rows || !bf16) {
            fprintf(stderr, "serving_example: out of memory\n");
            return 1;
        }
        SF_OK_OR_FAIL("embedding the vocabulary", sf_llm_embed(llm, every, VOCAB, rows));
        for (size_t i = 0; i < (size_t)VOCAB * HIDDEN; i++) bf16[i] = to_bf16(rows[i]);
        CUDA_OK(cudaMalloc((void **)&d_table, (size_t)VOCAB * HIDDEN * sizeof *d_table));
        CUDA_OK(cudaMemcpy(d_table, bf16, (size_t)VOCAB * HIDDEN * sizeof *d_table,
                           cudaMemcpyHostToDevice));
        free(rows);
        free(bf16);
    }
    sf_cuda_engine_options opts = sf_cuda_engine_default_options();
    opts.max_slots = 2;
    opts.guard_only = true;
    opts.embedding_table = d_table;
    sf_cuda_engine *engine = NULL;
    SF_OK_OR_FAIL("creating the engine", sf_cuda_engine_create(llm, sysformer, &opts, &engine));
    sf_cuda_memory mem;
    SF_OK_OR_FAIL("reading its memory", sf_cuda_engine_memory(engine, &mem));
    printf("serving_example: guard-only engine on the stack's embedding table: %zu bytes of "
           "weights (the Sysformer's), %zu of KV cache, %zu of arena\n",
           mem.weights, mem.kv_cache, mem.activations);

    /* Two prompts assembled from one template's pieces: different system and user lengths. */
    const int32_t prefix[] = {1, 10}, middle[] = {11, 12}, suffix[] = {13, 14};
    const sf_chat_template tmpl = {prefix, 2, middle, 2, suffix, 2};
    const int32_t system0[] = {20, 21, 22, 23, 24, 25, 26, 27, 28, 29}, user0[] = {40, 41, 42};
    const int32_t system1[] = {30, 31, 32, 33, 34}, user1[] = {50, 51, 52, 53, 54, 55, 56};
    enum { CAP = 64 };
    int32_t ids[CAP], cu[3] = {0, 0, 0};
    sf_prompt_spans spans[2];
    SF_OK_OR_FAIL("assembling prompt 0", sf_assemble_prompt(&tmpl, system0, 10, user0, 3, ids,
                                                            CAP, &spans[0]));
    cu[1] = spans[0].prefix + spans[0].system + spans[0].middle + spans[0].user + spans[0].suffix;
    SF_OK_OR_FAIL("assembling prompt 1", sf_assemble_prompt(&tmpl, system1, 5, user1, 7,
                                                            ids + cu[1], CAP - cu[1], &spans[1]));
    cu[2] = cu[1] + spans[1].prefix + spans[1].system + spans[1].middle + spans[1].user +
            spans[1].suffix;
    const int32_t n_tokens = cu[2], max_system = 10, max_user = 7;
    const size_t n_values = (size_t)n_tokens * HIDDEN;

    /* The serving stack's side: its own stream, its own device buffers. */
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    int32_t *d_cu = NULL, *d_ids = NULL;
    sf_prompt_spans *d_spans = NULL;
    uint16_t *d_embeds = NULL; /* bf16; cudaMalloc aligns far beyond the 16 bytes asked */
    int *d_errors = NULL;
    CUDA_OK(cudaMalloc((void **)&d_cu, sizeof cu));
    CUDA_OK(cudaMalloc((void **)&d_ids, (size_t)n_tokens * sizeof *ids));
    CUDA_OK(cudaMalloc((void **)&d_spans, sizeof spans));
    CUDA_OK(cudaMalloc((void **)&d_embeds, n_values * sizeof *d_embeds));
    CUDA_OK(cudaMalloc((void **)&d_errors, sizeof *d_errors));
    CUDA_OK(cudaMemcpyAsync(d_cu, cu, sizeof cu, cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemcpyAsync(d_ids, ids, (size_t)n_tokens * sizeof *ids, cudaMemcpyHostToDevice,
                            stream));
    CUDA_OK(cudaMemcpyAsync(d_spans, spans, sizeof spans, cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemsetAsync(d_errors, 0, sizeof *d_errors, stream));

    /* The integration point: everything is enqueued on the stack's stream; nothing waits. */
    SF_OK_OR_FAIL("sf_cuda_guarded_embed",
                  sf_cuda_guarded_embed(engine, 2, n_tokens, d_cu, d_ids, d_spans, max_system,
                                        max_user, d_embeds, d_errors, stream));

    uint16_t *got = malloc(n_values * sizeof *got);
    float *want = malloc(n_values * sizeof *want);
    if (!got || !want) {
        fprintf(stderr, "serving_example: out of memory\n");
        return 1;
    }
    int errors = -1;
    CUDA_OK(cudaMemcpyAsync(got, d_embeds, n_values * sizeof *got, cudaMemcpyDeviceToHost,
                            stream));
    CUDA_OK(cudaMemcpyAsync(&errors, d_errors, sizeof errors, cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaStreamSynchronize(stream));

    /* The CPU reference of the same batch. */
    const sf_guarded_batch batch = {2, cu, ids, spans, NULL, 0, NULL};
    SF_OK_OR_FAIL("sf_guarded_embed_cpu", sf_guarded_embed_cpu(llm, sysformer, &batch, want));
    size_t mismatches = 0, first = 0;
    for (size_t i = 0; i < n_values; i++) {
        /* == on floats: an identity Sysformer may turn -0.0 into +0.0, which compares equal. */
        if (bf16_to_float(got[i]) != round_bf16(want[i]) && mismatches++ == 0) first = i;
    }
    if (errors != 0 || mismatches != 0) {
        fprintf(stderr, "serving_example: device error count %d; %zu of %zu values differ from "
                        "bf16(CPU)", errors, mismatches, n_values);
        if (mismatches) {
            fprintf(stderr, ", first at row %zu column %zu: %g, want %g", first / HIDDEN,
                    first % HIDDEN, bf16_to_float(got[first]), round_bf16(want[first]));
        }
        fprintf(stderr, "\n");
        return 1;
    }

    /* Validity without a host round trip: a token id outside the vocabulary is counted in
     * d_errors and its row embedded as zeros, so the stack can drop the batch on the device. */
    const int32_t bad = VOCAB;
    CUDA_OK(cudaMemcpyAsync(d_ids, &bad, sizeof bad, cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemsetAsync(d_errors, 0, sizeof *d_errors, stream));
    SF_OK_OR_FAIL("sf_cuda_guarded_embed (bad id)",
                  sf_cuda_guarded_embed(engine, 2, n_tokens, d_cu, d_ids, d_spans, max_system,
                                        max_user, d_embeds, d_errors, stream));
    CUDA_OK(cudaMemcpyAsync(got, d_embeds, HIDDEN * sizeof *got, cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaMemcpyAsync(&errors, d_errors, sizeof errors, cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    int zero_row = 1;
    for (int j = 0; j < HIDDEN; j++) zero_row &= bf16_to_float(got[j]) == 0.0f;
    if (errors != 1 || !zero_row) {
        fprintf(stderr, "serving_example: an id outside the vocabulary gave error count %d "
                        "(want 1) and %s row\n", errors, zero_row ? "a zero" : "a non-zero");
        return 1;
    }
    /* Which request to drop, still on the device: per-request reasons (request 0 holds the
     * bad id, request 1 is fine). */
    int32_t *d_flags = NULL, flags[2] = {-1, -1};
    CUDA_OK(cudaMalloc((void **)&d_flags, sizeof flags));
    SF_OK_OR_FAIL("sf_cuda_guard_check",
                  sf_cuda_guard_check(engine, 2, n_tokens, d_cu, d_ids, d_spans, max_system,
                                      max_user, d_flags, stream));
    CUDA_OK(cudaMemcpyAsync(flags, d_flags, sizeof flags, cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    cudaFree(d_flags);
    if (flags[0] != SF_GUARD_BAD_TOKEN || flags[1] != 0) {
        fprintf(stderr, "serving_example: sf_cuda_guard_check gave flags %d, %d (want %d, 0)\n",
                flags[0], flags[1], SF_GUARD_BAD_TOKEN);
        return 1;
    }

    /* A stack that replays its forward as a CUDA graph captures the guard with it: the reset of
     * d_errors and the call, once; each replay reads the buffers as they are then. Here the bad
     * id is put back, and one replay gives the first batch's embeddings again. */
    CUDA_OK(cudaMemcpyAsync(d_ids, ids, sizeof *ids, cudaMemcpyHostToDevice, stream));
    cudaGraph_t graph = NULL;
    cudaGraphExec_t replay = NULL;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    CUDA_OK(cudaMemsetAsync(d_errors, 0, sizeof *d_errors, stream));
    const sf_status captured = sf_cuda_guarded_embed(engine, 2, n_tokens, d_cu, d_ids, d_spans,
                                                     max_system, max_user, d_embeds, d_errors,
                                                     stream);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    SF_OK_OR_FAIL("sf_cuda_guarded_embed (captured)", captured);
    CUDA_OK(cudaGraphInstantiate(&replay, graph, 0));
    CUDA_OK(cudaMemsetAsync(d_embeds, 0xff, n_values * sizeof *d_embeds, stream));
    CUDA_OK(cudaGraphLaunch(replay, stream));
    CUDA_OK(cudaMemcpyAsync(got, d_embeds, n_values * sizeof *got, cudaMemcpyDeviceToHost,
                            stream));
    CUDA_OK(cudaMemcpyAsync(&errors, d_errors, sizeof errors, cudaMemcpyDeviceToHost, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    cudaGraphExecDestroy(replay);
    cudaGraphDestroy(graph);
    mismatches = 0;
    for (size_t i = 0; i < n_values; i++) {
        mismatches += bf16_to_float(got[i]) != round_bf16(want[i]);
    }
    if (errors != 0 || mismatches != 0) {
        fprintf(stderr, "serving_example: the CUDA-graph replay counted %d errors and left %zu "
                        "values unlike the eager call's\n", errors, mismatches);
        return 1;
    }

    free(got);
    free(want);
    cudaFree(d_cu);
    cudaFree(d_ids);
    cudaFree(d_spans);
    cudaFree(d_embeds);
    cudaFree(d_errors);
    cudaStreamDestroy(stream);
    sf_cuda_engine_free(engine);
    cudaFree(d_table); /* the lender frees its table after the engine that borrowed it */
    sf_sysformer_free(sysformer);
    sf_llm_free(llm);
    if (argc <= 1) {
        char path[4096];
        snprintf(path, sizeof path, "%s/config.json", dir);
        remove(path);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        remove(path);
        rmdir(dir);
    }
    printf("serving_example: OK: %d tokens in 2 requests, guarded embeddings on the caller's "
           "stream equal bf16(E[token]) (fresh Sysformer = identity), eager and replayed from a "
           "CUDA graph; a bad id is counted and its request named\n",
           n_tokens);
    return 0;
}
