/*
 * sysformer.h — the one public header of libsysformer.
 *
 * libsysformer runs a frozen Llama-family LLM (and, in later releases, the Sysformer module that
 * rewrites its system-prompt embeddings per request). Everything here is plain C with a stable
 * C ABI; no C++ and no CUDA types appear in this header.
 *
 * Conventions that hold for every function:
 *   - Functions that can fail return an sf_status. On failure, sf_last_error() returns a message
 *     for the calling thread naming what failed and where (file, tensor name, byte offset).
 *   - The library never prints, never exits and never aborts.
 *   - Objects returned through an out-pointer are owned by the caller and released with the
 *     matching *_free() function; *_free(NULL) is a no-op.
 *   - Sizes that multiply dimensions are 64-bit; token ids, lengths and offsets are int32_t.
 *   - Matrices are row-major; "[a, b]" in a comment gives a buffer's shape.
 */
#ifndef SYSFORMER_H
#define SYSFORMER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SF_VERSION_MAJOR 0
#define SF_VERSION_MINOR 1
#define SF_VERSION_PATCH 0

/* ------------------------------------------------------------------------------------------ */
/* Status and errors                                                                           */
/* ------------------------------------------------------------------------------------------ */

typedef enum sf_status {
    SF_OK = 0,
    SF_ERR_INVALID_ARGUMENT = 1, /* a NULL pointer, a negative count, an id out of range      */
    SF_ERR_IO = 2,               /* a file could not be opened, mapped, read or written        */
    SF_ERR_FORMAT = 3,           /* a file is truncated, corrupt or malformed (JSON included)  */
    SF_ERR_UNSUPPORTED = 4,      /* well-formed, but asks for something not implemented        */
    SF_ERR_NOT_FOUND = 5,        /* a required tensor or field is missing                      */
    SF_ERR_SHAPE = 6,            /* a tensor's shape or dtype disagrees with the config        */
    SF_ERR_CONFIG = 7,           /* a config value is absurd (0 layers, heads not dividing d)  */
    SF_ERR_OUT_OF_RANGE = 8,     /* a prompt longer than the model or KV cache allows          */
    SF_ERR_OUT_OF_MEMORY = 9,    /* host or device allocation failed                           */
    SF_ERR_CUDA = 10,            /* a CUDA runtime or library call failed                      */
    SF_ERR_NO_DEVICE = 11,       /* CUDA support not built in, or no usable GPU present        */
} sf_status;

/* A short constant English name for a status ("invalid argument", ...). Never NULL. */
const char *sf_status_string(sf_status status);

/* The message of the most recent failure on the calling thread, or "" if there was none.
 * The pointer stays valid until the next library call on this thread. */
const char *sf_last_error(void);

/* Clears the calling thread's last-error message. */
void sf_clear_error(void);

/* ------------------------------------------------------------------------------------------ */
/* The frozen LLM: configuration                                                               */
/* ------------------------------------------------------------------------------------------ */

typedef enum sf_arch {
    SF_ARCH_LLAMA = 0,   /* LlamaForCausalLM (Llama 2/3/3.1, SmolLM2)          */
    SF_ARCH_MISTRAL = 1, /* MistralForCausalLM (optional sliding window)         */
    SF_ARCH_QWEN2 = 2,   /* Qwen2ForCausalLM (bias on q/k/v projections)         */
    SF_ARCH_PHI3 = 3,    /* Phi3ForCausalLM (fused qkv_proj and gate_up_proj)    */
} sf_arch;

typedef enum sf_rope_type {
    SF_ROPE_DEFAULT = 0,  /* inv_freq[i] = theta^(-2i/head_dim)                              */
    SF_ROPE_LINEAR = 1,   /* inv_freq / factor                                                */
    SF_ROPE_LLAMA3 = 2,   /* Llama-3.1 wavelength-banded scaling                              */
    SF_ROPE_LONGROPE = 3, /* Phi-3 per-dimension short/long factors plus an attention factor  */
} sf_rope_type;

#define SF_MAX_EOS_IDS 8

/* What config.json says, after defaults are applied the way Hugging Face transformers applies
 * them for the same model_type. Pointer members are owned by the object they came from. */
typedef struct sf_llm_config {
    sf_arch arch;
    int32_t vocab_size;
    int32_t hidden_size;
    int32_t intermediate_size;
    int32_t num_layers;
    int32_t num_heads;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    struct {
        sf_rope_type type;
        double factor;           /* linear, llama3; longrope: max_pos / original_max_pos     */
        double low_freq_factor;  /* llama3                                                   */
        double high_freq_factor; /* llama3                                                   */
        int32_t original_max_position_embeddings; /* llama3, longrope                        */
        double attention_factor; /* longrope: scales cos and sin; 1 otherwise                */
        const float *short_factor; /* longrope: [head_dim / 2]                               */
        const float *long_factor;  /* longrope: [head_dim / 2]                               */
    } rope;
    int32_t sliding_window;    /* 0: none; else key j is visible from query i iff i - j < w    */
    bool attention_bias;       /* bias on q, k, v and o projections (Llama attention_bias)    */
    bool qkv_bias;             /* bias on q, k, v only (Qwen2)                                */
    bool tie_word_embeddings;  /* the LM head is the embedding table                          */
    int32_t bos_token_id;      /* -1 when absent                                              */
    int32_t n_eos_token_ids;
    int32_t eos_token_ids[SF_MAX_EOS_IDS];
} sf_llm_config;

/* ------------------------------------------------------------------------------------------ */
/* The frozen LLM: weights and the CPU reference forward pass                                  */
/* ------------------------------------------------------------------------------------------ */

typedef struct sf_llm sf_llm;

/* Loads a Hugging Face model directory: config.json plus model.safetensors, or sharded
 * model-*.safetensors with model.safetensors.index.json. Weights in F32, F16 or BF16 are held
 * as fp32. Every tensor is checked against the config by name, shape and dtype. */
sf_status sf_llm_load(const char *model_dir, sf_llm **out);

void sf_llm_free(sf_llm *llm);

/* The parsed configuration; valid as long as the model. */
const sf_llm_config *sf_llm_get_config(const sf_llm *llm);

/* Gathers embedding rows: out[i, :] = E[ids[i], :]. out is [n, hidden_size].
 * Fails with SF_ERR_INVALID_ARGUMENT if an id is outside [0, vocab_size). */
sf_status sf_llm_embed(const sf_llm *llm, const int32_t *ids, int64_t n, float *out);

/* A per-request key/value cache for the CPU path: capacity positions for every layer. */
typedef struct sf_kv_cache sf_kv_cache;

/* capacity must be in [1, max_position_embeddings]. */
sf_status sf_kv_cache_create(const sf_llm *llm, int32_t capacity, sf_kv_cache **out);
void sf_kv_cache_free(sf_kv_cache *cache);
/* Positions already stored; the next token of this request gets this position. */
int32_t sf_kv_cache_length(const sf_kv_cache *cache);
int32_t sf_kv_cache_capacity(const sf_kv_cache *cache);
/* Forgets every stored position, so the cache can serve a new request. */
void sf_kv_cache_reset(sf_kv_cache *cache);

/* A packed variable-length batch: the new tokens of all requests back to back, no padding.
 * Request r owns packed rows [cu_seqlens[r], cu_seqlens[r + 1]). Prefill and decode are the same
 * call: a request's new rows continue at its cache's current length (decode = one row). */
typedef struct sf_batch {
    int32_t n_requests;
    const int32_t *cu_seqlens;     /* [n_requests + 1], starts at 0, non-decreasing            */
    const int32_t *token_ids;      /* [total]; exactly one of token_ids and input_embeds        */
    const float *input_embeds;     /* [total, hidden_size], e.g. with a rewritten system span  */
    sf_kv_cache *const *kv_caches; /* [n_requests], one distinct cache per request; or NULL:
                                      positions start at 0 and nothing is kept                  */
    int32_t n_logit_rows;          /* how many packed rows to compute logits for               */
    const int32_t *logit_rows;     /* [n_logit_rows], packed row indices in [0, total)          */
} sf_batch;

/* Runs the batch through the model in fp32 on the CPU and writes logits [n_logit_rows,
 * vocab_size]. The caches are appended to only when the call succeeds. Fails with
 * SF_ERR_OUT_OF_RANGE when a request would pass its cache's capacity or, without caches,
 * max_position_embeddings. */
sf_status sf_llm_forward_cpu(const sf_llm *llm, const sf_batch *batch, float *logits);

/* ------------------------------------------------------------------------------------------ */
/* The Sysformer: rewriting system-prompt embeddings per request                               */
/* ------------------------------------------------------------------------------------------ */

/* A PyTorch nn.TransformerDecoder over the system-prompt embeddings S (queries, self-attention)
 * with the user-prompt embeddings P as memory (cross-attention), no masks, no dropout:
 *   norm_first = false:  X = LN1(X + SA(X));  X = LN2(X + CA(X, P));  X = LN3(X + FF(X))
 *   norm_first = true:   X = X + SA(LN1(X));  X = X + CA(LN2(X), P);  X = X + FF(LN3(X))
 * FF(x) = linear2(act(linear1(x))); S' = X, or norm(X) with final_norm. See docs/SYSFORMER.md
 * for the on-disk format (sysformer.json + sysformer.safetensors with PyTorch's names). */
typedef enum sf_activation {
    SF_ACT_RELU = 0,
    SF_ACT_GELU = 1, /* exact erf form, as PyTorch's "gelu" */
} sf_activation;

typedef struct sf_sysformer_config {
    int32_t d_model;         /* must equal the LLM's hidden size                        */
    int32_t num_layers;
    int32_t num_heads;       /* must divide d_model                                     */
    int32_t dim_feedforward;
    sf_activation activation;
    bool norm_first;
    float layer_norm_eps;
    bool final_norm;
    bool has_classifier;     /* the training head classifier.weight [1, d] / .bias [1]   */
    /* Provenance, all optional (NULL or 0 when unknown); strings owned by the Sysformer. */
    const char *llm_name;
    int32_t llm_hidden_size;
    int32_t llm_vocab_size;
    const char *llm_embedding_hash; /* "fnv1a64:<16 hex>" over the fp32 embedding table */
    const char *system_prompt;      /* the default system prompt text                   */
    const char *chat_template;      /* the chat template name, e.g. "llama3"            */
} sf_sysformer_config;

typedef struct sf_sysformer sf_sysformer;

/* The configuration a new Sysformer gets for this LLM: d_model = hidden size, 2 layers, the
 * LLM's head count, 4·d feed-forward, relu, norm_first = true, eps 1e-5, no final norm, with a
 * classifier head, and the LLM's sizes as provenance. */
sf_sysformer_config sf_sysformer_default_config(const sf_llm *llm);

/* Creates a Sysformer for llm. out_proj and linear2 (weights and biases) are zero, so that with
 * norm_first and no final norm S' = S exactly (a -0.0 input entry comes out as +0.0, which
 * compares equal); the other weights follow PyTorch's default initialisation (xavier-uniform
 * in_proj, kaiming-uniform linears, zero attention biases, unit norms) drawn from seed, each
 * layer independently. Fails with SF_ERR_CONFIG when cfg disagrees with the LLM. */
sf_status sf_sysformer_init(const sf_llm *llm, const sf_sysformer_config *cfg, uint64_t seed,
                            sf_sysformer **out);

/* Loads dir/sysformer.json and the safetensors file it names (default sysformer.safetensors)
 * and validates it against llm: d_model equals the hidden size, heads divide d_model, every
 * tensor is present with the right shape, and recorded provenance (hidden size, vocab size,
 * embedding hash) matches. Errors name the tensor or key. */
sf_status sf_sysformer_load(const char *dir, const sf_llm *llm, sf_sysformer **out);

/* Writes dir/sysformer.json and dir/sysformer.safetensors (F32). dir must exist. */
sf_status sf_sysformer_save(const sf_sysformer *sysformer, const char *dir);

void sf_sysformer_free(sf_sysformer *sysformer);

const sf_sysformer_config *sf_sysformer_get_config(const sf_sysformer *sysformer);

/* Computes "fnv1a64:<16 hex digits>", FNV-1a 64 over the bytes of the LLM's embedding table as
 * little-endian fp32 (vocab x hidden), into buf (at least 25 bytes). */
sf_status sf_llm_embedding_hash(const sf_llm *llm, char *buf, size_t buf_size);

/* A packed batch of rewrite requests: request r's system rows are [cu_system[r],
 * cu_system[r+1]) of system, its user rows [cu_user[r], cu_user[r+1]) of user. A request with
 * no system rows has nothing to rewrite; one with system rows but no user rows is refused
 * (SF_ERR_INVALID_ARGUMENT): cross-attention over nothing is undefined. */
typedef struct sf_rewrite_batch {
    int32_t n_requests;
    const int32_t *cu_system; /* [n_requests + 1] */
    const int32_t *cu_user;   /* [n_requests + 1] */
    const float *system;      /* [cu_system[n], d_model] the LLM's embeddings of the system spans */
    const float *user;        /* [cu_user[n], d_model]   the LLM's embeddings of the user spans   */
} sf_rewrite_batch;

/* Runs the Sysformer on the CPU: system_out [cu_system[n], d_model] receives S'. system_out may
 * equal system (in place). */
sf_status sf_sysformer_forward_cpu(const sf_sysformer *sysformer, const sf_rewrite_batch *batch,
                                   float *system_out);

/* ------------------------------------------------------------------------------------------ */
/* Guarded prompts                                                                             */
/* ------------------------------------------------------------------------------------------ */

/* The five spans of an assembled chat prompt, as token counts, in order:
 * prefix | system content | middle | user content | suffix (the suffix opens the assistant
 * turn). */
typedef struct sf_prompt_spans {
    int32_t prefix, system, middle, user, suffix;
} sf_prompt_spans;

/* A chat template split into the token ids of its fixed pieces. (Tokenizers and the built-in
 * templates that produce these arrive with the tokenizer; callers can fill it themselves.) */
typedef struct sf_chat_template {
    const int32_t *prefix;
    int32_t n_prefix;
    const int32_t *middle;
    int32_t n_middle;
    const int32_t *suffix;
    int32_t n_suffix;
} sf_chat_template;

/* Writes prefix ⊕ system ⊕ middle ⊕ user ⊕ suffix into out_ids (capacity ids) and the span
 * lengths into *spans. Fails with SF_ERR_OUT_OF_RANGE if capacity is too small. */
sf_status sf_assemble_prompt(const sf_chat_template *tmpl, const int32_t *system_ids,
                             int32_t n_system, const int32_t *user_ids, int32_t n_user,
                             int32_t *out_ids, int32_t capacity, sf_prompt_spans *spans);

/* A packed batch of assembled prompts: request r's tokens are token_ids[cu_seqlens[r] ..
 * cu_seqlens[r+1]), split by spans[r] (whose lengths must add up to the request's length). */
typedef struct sf_guarded_batch {
    int32_t n_requests;
    const int32_t *cu_seqlens;     /* [n_requests + 1]                                    */
    const int32_t *token_ids;      /* [total]                                             */
    const sf_prompt_spans *spans;  /* [n_requests]                                        */
    sf_kv_cache *const *kv_caches; /* [n_requests], or NULL; as in sf_batch. Each cache must
                                      be empty: a guarded prompt is a fresh prefill         */
    int32_t n_logit_rows;
    const int32_t *logit_rows;     /* [n_logit_rows], packed row indices                 */
} sf_guarded_batch;

/* Builds the LLM's input embeddings for the batch: E[token] for every row, with the system
 * span of each request replaced by the Sysformer's S' (computed from that request's system and
 * user embeddings). embeds is [total, hidden_size]. With sysformer NULL, plain E[token]. */
sf_status sf_guarded_embed_cpu(const sf_llm *llm, const sf_sysformer *sysformer,
                               const sf_guarded_batch *batch, float *embeds);

/* sf_guarded_embed_cpu, then the LLM prefill from those embeddings (sf_llm_forward_cpu):
 * logits [n_logit_rows, vocab]. Decoding then continues with sf_llm_forward_cpu on the same
 * caches, one token per request. */
sf_status sf_guarded_forward_cpu(const sf_llm *llm, const sf_sysformer *sysformer,
                                 const sf_guarded_batch *batch, float *logits);

/* ------------------------------------------------------------------------------------------ */
/* CUDA                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* True when the library was built with CUDA support. */
bool sf_cuda_built(void);

/* Number of usable CUDA devices in *count (0 without CUDA support or without a GPU).
 * Returns SF_OK in both of those cases; SF_ERR_CUDA only when the runtime itself fails. */
sf_status sf_cuda_device_count(int *count);

#ifdef __cplusplus
}
#endif

#endif /* SYSFORMER_H */
