/* What the end-to-end benchmarks (bench_engine.c, bench_train.c) share: the published shapes of
 * the models they run, and the FLOP counts of those shapes' parts. Header-only, like
 * bench_util.h. bench/peer_e2e.py holds the same shapes for the PyTorch peer. */
#ifndef SF_BENCH_MODELS_H
#define SF_BENCH_MODELS_H

#include <stdbool.h>
#include <string.h>

#include "sysformer.h"

/* The shapes of the model `name`, by hand (no files needed): llama3.1-8b, mistral-7b,
 * phi3.5-mini, smollm2-135m, or tiny (a test shape, not a model: for checking a benchmark
 * where every kernel is slow, on tools/simt's emulator). Only shapes matter for throughput;
 * RoPE variants differ only in their cos/sin tables. No BOS or EOS token. *note says what
 * differs from the real model. Returns false for an unknown name. */
static inline bool bench_llm_config(const char *name, sf_llm_config *c, const char **note) {
    memset(c, 0, sizeof *c);
    c->rms_norm_eps = 1e-5f;
    c->rope.type = SF_ROPE_DEFAULT;
    c->rope.factor = 1.0;
    c->rope.attention_factor = 1.0;
    c->bos_token_id = -1;
    *note = "";
    if (!strcmp(name, "llama3.1-8b")) {
        c->arch = SF_ARCH_LLAMA;
        c->vocab_size = 128256;
        c->hidden_size = 4096;
        c->intermediate_size = 14336;
        c->num_layers = 32;
        c->num_heads = 32;
        c->num_kv_heads = 8;
        c->head_dim = 128;
        c->max_position_embeddings = 131072;
        c->rope_theta = 500000.0;
        c->rope.type = SF_ROPE_LLAMA3;
        c->rope.factor = 8.0;
        c->rope.low_freq_factor = 1.0;
        c->rope.high_freq_factor = 4.0;
        c->rope.original_max_position_embeddings = 8192;
        *note = "rope llama3 (factor 8, theta 5e5)";
    } else if (!strcmp(name, "mistral-7b")) {
        c->arch = SF_ARCH_MISTRAL;
        c->vocab_size = 32768;
        c->hidden_size = 4096;
        c->intermediate_size = 14336;
        c->num_layers = 32;
        c->num_heads = 32;
        c->num_kv_heads = 8;
        c->head_dim = 128;
        c->max_position_embeddings = 32768;
        c->rope_theta = 1e6;
        c->sliding_window = 0; /* v0.3 has none */
        *note = "rope default (theta 1e6), no sliding window";
    } else if (!strcmp(name, "phi3.5-mini")) {
        c->arch = SF_ARCH_PHI3;
        c->vocab_size = 32064;
        c->hidden_size = 3072;
        c->intermediate_size = 8192;
        c->num_layers = 32;
        c->num_heads = 32;
        c->num_kv_heads = 32;
        c->head_dim = 96;
        c->max_position_embeddings = 131072;
        /* The real model uses longrope (original 4096 positions, per-dimension factors). Only
         * the shapes matter for throughput and prompts here are far below 4096 positions, where
         * longrope uses its short factors anyway, so the plain default RoPE is used. */
        c->rope_theta = 10000.0;
        *note = "rope DEFAULT theta 1e4 instead of longrope (same cost; shapes are what count)";
    } else if (!strcmp(name, "smollm2-135m")) {
        c->arch = SF_ARCH_LLAMA;
        c->vocab_size = 49152;
        c->hidden_size = 576;
        c->intermediate_size = 1536;
        c->num_layers = 30;
        c->num_heads = 9;
        c->num_kv_heads = 3;
        c->head_dim = 64;
        c->max_position_embeddings = 8192;
        c->rope_theta = 100000.0;
        c->tie_word_embeddings = true;
        *note = "rope default (theta 1e5), tied embeddings";
    } else if (!strcmp(name, "tiny")) {
        c->arch = SF_ARCH_LLAMA;
        c->vocab_size = 512;
        c->hidden_size = 256;
        c->intermediate_size = 512;
        c->num_layers = 2;
        c->num_heads = 4;
        c->num_kv_heads = 2;
        c->head_dim = 64;
        c->max_position_embeddings = 1024;
        c->rope_theta = 10000.0;
        *note = "a test shape, not a model";
    } else {
        return false;
    }
    return true;
}

/* Matmul weights one token meets in one LLM decoder layer: q, k, v, o and the SwiGLU MLP. */
static inline double bench_layer_weights(const sf_llm_config *c) {
    const double d = c->hidden_size, hd = c->head_dim;
    return d * hd * (2.0 * c->num_heads + 2.0 * c->num_kv_heads) + 3.0 * d * c->intermediate_size;
}

/* Visible (query, key) pairs of one causal request of n tokens from position 0. */
static inline double bench_causal_pairs(const sf_llm_config *c, int n) {
    const int w = c->sliding_window;
    if (w <= 0 || w >= n) return 0.5 * (double)n * ((double)n + 1.0);
    double pairs = 0.0;
    for (int i = 0; i < n; i++) pairs += i + 1 < w ? i + 1 : w;
    return pairs;
}

/* FLOPs of the Sysformer's forward over R requests of S system and U user rows, per layer
 * (Rs = R S, Ru = R U, d its width, ffs its feed-forward width):
 *   2 Rs d 3d + 2 Rs d d                 self-attention in_proj (q, k, v) and out_proj
 *   4 d R S S                            self-attention scores and values (head dim x heads = d)
 *   2 Rs d d + 2 Ru d 2d + 2 Rs d d      cross-attention q (system rows), k and v (user rows), out
 *   4 d R S U                            cross-attention scores and values
 *   2 2 Rs d ffs                         linear1 and linear2 */
static inline double bench_sysformer_flops(const sf_sysformer_config *s, int R, int S, int U) {
    const double d = s->d_model, Rs = (double)R * S, Ru = (double)R * U;
    const double self_attn =
        2.0 * Rs * d * 3.0 * d + 2.0 * Rs * d * d + 4.0 * d * R * (double)S * S;
    const double cross_attn = 2.0 * Rs * d * d + 2.0 * Ru * d * 2.0 * d + 2.0 * Rs * d * d +
                              4.0 * d * R * (double)S * U;
    const double ff = 4.0 * Rs * d * s->dim_feedforward;
    return s->num_layers * (self_attn + cross_attn + ff);
}

#endif
