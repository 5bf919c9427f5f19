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

/* Progress of the calling thread's long calls: loading an LLM (sf_llm_load and
 * sf_llm_load_embeddings, "loading weights": bytes of fp32 weights read) and creating a CUDA
 * engine from one (sf_cuda_engine_create, "uploading weights": bytes of bf16 weights on the
 * device). fn(user, what, done, total) runs on the calling thread, from inside the call: with
 * done = 0 when the work starts, after each tensor, and with done = total when it has all
 * succeeded (a failed call stops short of total). what is a constant string. fn must not call
 * the library. fn NULL (the default) reports nothing. Like sf_last_error, it is per thread. */
typedef void (*sf_progress_fn)(void *user, const char *what, uint64_t done, uint64_t total);
void sf_set_progress(sf_progress_fn fn, void *user);

/* The CPU path's matrix products, for logs and benchmark records: OpenBLAS's configuration,
 * which names the kernels it chose (e.g. "OpenBLAS 0.3.21 ... SkylakeX MAX_THREADS=64"), or
 * "portable loop (built without BLAS)". Never NULL. */
const char *sf_cpu_matmul_backend(void);

/* OpenBLAS chooses its kernels by CPU model when it is loaded, and gives a model newer than
 * itself its generic SSE3 ones ("Prescott"): on a 5th-generation Xeon with Debian 12's
 * OpenBLAS 0.3.21 that makes the CPU path's prefill about 3x slower (docs/PERF.md). When that
 * has happened on a CPU with wider vector units, this returns the OPENBLAS_CORETYPE value that
 * names kernels it runs ("SkylakeX" with AVX-512, "Haswell" with AVX2 and FMA, "Sandybridge"
 * with AVX); otherwise (OpenBLAS chose for itself, or no BLAS) NULL. OpenBLAS reads the
 * variable only as it loads, so it must be in the environment the program starts with: the
 * sysformer CLI, the tests and the benchmarks set it and start themselves again when this
 * says so. */
const char *sf_cpu_blas_coretype_hint(void);

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

/* The same (a directory or a .gguf file), reading only the configuration and the embedding
 * table: all that sf_llm_embed, sf_guarded_embed_cpu, a Sysformer's creation or load, and a
 * guard-only CUDA engine (sf_cuda_engine_options.guard_only) need, in vocab x hidden_size floats
 * instead of the whole model's. Every function that runs the LLM refuses such a model with
 * SF_ERR_UNSUPPORTED. */
sf_status sf_llm_load_embeddings(const char *model_dir, sf_llm **out);

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
/* Tokenizers                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* A tokenizer of one of two families: byte-level BPE (GPT-2 / Llama-3 / Qwen2 / SmolLM2) or
 * SentencePiece-style BPE with byte fallback (Llama-2 / Mistral / zephyr / Phi-3). */
typedef struct sf_tokenizer sf_tokenizer;

/* Loads a tokenizer from a model directory (tokenizer.json, plus tokenizer_config.json when
 * present for special tokens, BOS handling and the chat template) or from a .gguf file's
 * tokenizer.ggml.* metadata. */
sf_status sf_tokenizer_load(const char *path, sf_tokenizer **out);
void sf_tokenizer_free(sf_tokenizer *tok);

int32_t sf_tokenizer_vocab_size(const sf_tokenizer *tok);
int32_t sf_tokenizer_bos_id(const sf_tokenizer *tok); /* -1 when none */
int32_t sf_tokenizer_eos_id(const sf_tokenizer *tok); /* -1 when none */
/* Whether encoding adds BOS by default (tokenizer_config / GGUF add_bos_token). */
bool sf_tokenizer_adds_bos(const sf_tokenizer *tok);
/* The id of a token given by its exact text (e.g. "<|im_end|>"), or -1. */
int32_t sf_tokenizer_token_id(const sf_tokenizer *tok, const char *piece);
/* Whether id is a special (control) token, which decoding may skip. */
bool sf_tokenizer_is_special(const sf_tokenizer *tok, int32_t id);
/* The chat template text (Jinja source) the files carry, or NULL. Valid as long as tok. */
const char *sf_tokenizer_chat_template(const sf_tokenizer *tok);

/* Encodes len bytes of UTF-8 text. With parse_special, added/special tokens written in the text
 * ("<|im_start|>") become their ids before BPE runs on the rest; without it they are ordinary
 * text. add_bos prepends BOS (when the tokenizer has one). Writes at most capacity ids; *n_ids
 * receives the number the text needs, and SF_ERR_OUT_OF_RANGE is returned when that exceeds
 * capacity. Invalid UTF-8 fails with SF_ERR_INVALID_ARGUMENT naming the byte offset. */
sf_status sf_tokenizer_encode(const sf_tokenizer *tok, const char *text, size_t len,
                              bool add_bos, bool parse_special, int32_t *ids, int32_t capacity,
                              int32_t *n_ids);

/* Decodes ids to UTF-8 text as transformers' decode does (skip_special drops special tokens).
 * Writes at most cap bytes plus a NUL; *len receives the length needed (excluding the NUL) and
 * SF_ERR_OUT_OF_RANGE is returned when it does not fit. Ids out of range fail. */
sf_status sf_tokenizer_decode(const sf_tokenizer *tok, const int32_t *ids, int32_t n,
                              bool skip_special, char *out, size_t cap, size_t *len);

/* Incremental decoding for streaming: push one id at a time and get only complete UTF-8
 * characters back; bytes of a character split across tokens are held until it completes. */
typedef struct sf_detokenizer sf_detokenizer;
sf_status sf_detokenizer_create(const sf_tokenizer *tok, bool skip_special, sf_detokenizer **out);
void sf_detokenizer_free(sf_detokenizer *d);
/* Appends the text that id completes to out (cap bytes, NUL-terminated); *len receives its
 * length. Never returns a partial UTF-8 sequence. */
sf_status sf_detokenizer_push(sf_detokenizer *d, int32_t id, char *out, size_t cap, size_t *len);
/* Returns what is still held (an incomplete sequence at the end comes back as U+FFFD). */
sf_status sf_detokenizer_flush(sf_detokenizer *d, char *out, size_t cap, size_t *len);

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
    int32_t system_offset_rows; /* > 0: a learned offset system_offset [rows, d] is added to
                                   the system rows before the layers: X = S + offset, so every
                                   system span must be empty or exactly this many tokens. With
                                   num_layers = 0 that is the SystemEmbedder baseline, one
                                   learned system-prompt embedding S' = S + offset that does
                                   not depend on the user prompt. 0: none (a Sysformer)     */
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
    sf_kv_cache *const *kv_caches; /* [n_requests], or NULL; as in sf_batch. A request with a
                                      system span needs an empty cache (a guarded prompt is a
                                      fresh prefill); one with system span 0 is not guarded
                                      and may continue its cache (its next chunk or token) */
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
/* Chat templates                                                                              */
/* ------------------------------------------------------------------------------------------ */

/* The built-in chat templates. Each is a family's template cut into fixed text pieces around
 * the system and user contents (no Jinja engine): see docs/TEMPLATES.md, which also says how
 * to add one. */
typedef enum sf_template_id {
    SF_TEMPLATE_LLAMA3 = 0,
    SF_TEMPLATE_LLAMA2 = 1,
    SF_TEMPLATE_MISTRAL = 2, /* no system role: the system text opens the first [INST]       */
    SF_TEMPLATE_PHI3 = 3,
    SF_TEMPLATE_ZEPHYR = 4,
    SF_TEMPLATE_CHATML = 5,  /* SmolLM2, Qwen2                                               */
} sf_template_id;

/* The text pieces of a template, in prompt order:
 *   prefix  SYSTEM  middle  [history]  USER  suffix  → the assistant reply → assistant_end
 * A conversation's earlier turns go between middle and the last user message, each as
 *   user_i  suffix  reply_i  assistant_end  user_start
 * end_of_turn is the token text that ends an assistant reply ("<|eot_id|>", "<|im_end|>").
 * A prompt with no system turn at all is  no_system  USER  suffix  (sf_chat_encode_no_system). */
typedef struct sf_template_text {
    const char *name;
    const char *prefix;
    const char *middle;
    const char *suffix;
    const char *assistant_end;
    const char *user_start;
    const char *end_of_turn;
    const char *no_system;     /* opens a conversation that has no system turn, up to the user
                                  content ("<|im_start|>user\n", "<s>[INST] ", ...)            */
} sf_template_text;

/* The pieces of a built-in template (static storage). NULL for an unknown id. */
const sf_template_text *sf_template_get(sf_template_id id);

/* Looks a template up by name ("llama3", "chatml", ...). SF_ERR_NOT_FOUND lists the names. */
sf_status sf_template_by_name(const char *name, sf_template_id *out);

/* Recognises a family from a Jinja chat-template source (tokenizer_config.json or GGUF
 * tokenizer.chat_template) by the markers it uses. SF_ERR_NOT_FOUND when none matches. */
sf_status sf_template_detect(const char *jinja_source, sf_template_id *out);

/* One earlier exchange of a conversation. */
typedef struct sf_chat_turn {
    const char *user;
    const char *assistant;
} sf_chat_turn;

/* Tokenizes a chat prompt piece by piece so that its spans are exact: the template pieces with
 * special tokens parsed, the system and user contents as plain text (a user cannot inject a
 * control token). history (n_history turns, may be 0) lands in the middle span. Writes at most
 * capacity ids and the spans; SF_ERR_OUT_OF_RANGE when the prompt needs more (*n_ids says how
 * many). */
sf_status sf_chat_encode(const sf_tokenizer *tok, sf_template_id tmpl, const char *system_text,
                         const sf_chat_turn *history, int32_t n_history, const char *user_text,
                         int32_t *ids, int32_t capacity, int32_t *n_ids, sf_prompt_spans *spans);

/* The same prompt with no system turn at all: no_system + user + suffix, for measuring an LLM
 * without any system prompt. This is the literal absence of a system message, which is not what
 * every family's Jinja template renders for one: SmolLM2's and Qwen2's chatml templates insert
 * their own default system prompt when none is given, Llama 3.1's a dated system header.
 * spans->system and spans->middle are 0 and the opening is the prefix span, so the prompt has
 * nothing for a Sysformer to rewrite. Capacity, *n_ids and failures as in sf_chat_encode. */
sf_status sf_chat_encode_no_system(const sf_tokenizer *tok, sf_template_id tmpl,
                                   const char *user_text, int32_t *ids, int32_t capacity,
                                   int32_t *n_ids, sf_prompt_spans *spans);

/* ------------------------------------------------------------------------------------------ */
/* Generation                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* The most alternatives a token's log-probabilities can list (sf_sampling.top_logprobs). */
#define SF_MAX_TOP_LOGPROBS 20

typedef struct sf_sampling {
    float temperature; /* <= 0 (or NaN): greedy (argmax; the lowest id wins a tie); +inf is
                          refused (every logit would become 0)                              */
    int32_t top_k;     /* keep the k most likely tokens; <= 0: off                           */
    float top_p;       /* keep the smallest set with probability mass >= top_p; >= 1: off    */
    uint64_t seed;     /* each request draws from its own stream started from this seed, so
                          a request's output does not depend on the rest of the batch       */
    bool logprobs;     /* generation also reports each generated token's log-probability
                          (sf_generation_result.logprobs); it does not change the pick      */
    int32_t top_logprobs; /* 0..SF_MAX_TOP_LOGPROBS: and, at each step, the n most likely
                          tokens with their log-probabilities (sf_generation_result.top_ids,
                          .top_logprobs); n > 0 implies logprobs                             */
} sf_sampling;

/* Picks one token from a row of logits. *rng_state is the request's stream (start it at
 * sampling->seed); it advances by one draw per sampled token. sampling->logprobs is not read
 * (sf_token_logprob gives the pick's log-probability). */
sf_status sf_sample(const float *logits, int32_t vocab, const sf_sampling *sampling,
                    uint64_t *rng_state, int32_t *token);

/* The log-probability of token under the model's distribution over a row of logits:
 * logits[token] - log(sum_i exp(logits[i])), in double, rounded once. It is the raw
 * distribution's (temperature 1, nothing cut), whatever setting picked the token, as the
 * probability a scorer or a serving API reports. SF_ERR_INVALID_ARGUMENT for NULL, vocab < 1
 * or token outside [0, vocab). */
sf_status sf_token_logprob(const float *logits, int32_t vocab, int32_t token, float *logprob);

/* The n most likely tokens of a row of logits (larger logit first; of equal logits the lower
 * id; NaN logits never rank) into ids[n], with their log-probabilities as sf_token_logprob's
 * into logprobs[n]; past the row's non-NaN values, id -1 and NaN. SF_ERR_INVALID_ARGUMENT for
 * NULL, vocab < 1 or n outside [1, SF_MAX_TOP_LOGPROBS]. */
sf_status sf_top_logprobs(const float *logits, int32_t vocab, int32_t n, int32_t *ids,
                          float *logprobs);

typedef enum sf_finish_reason {
    SF_FINISH_LENGTH = 0,      /* max_new_tokens reached                     */
    SF_FINISH_STOP_TOKEN = 1,  /* a stop id (EOS, end of turn) was generated  */
    SF_FINISH_STOP_STRING = 2, /* the text ended with a stop string          */
    SF_FINISH_CONTEXT = 3,     /* the context window is full                 */
    SF_FINISH_CALLBACK = 4,    /* the stream callback asked to stop          */
} sf_finish_reason;

/* A batch of prompts to continue: packed token ids as in sf_guarded_batch. */
typedef struct sf_generation {
    int32_t n_requests;
    const int32_t *cu_seqlens;     /* [n_requests + 1]                                      */
    const int32_t *token_ids;      /* [total] the prompts                                   */
    const sf_prompt_spans *spans;  /* [n_requests]; required with a Sysformer, else unused  */
    int32_t max_new_tokens;
    sf_sampling sampling;
    const int32_t *stop_ids;       /* [n_stop_ids] tokens that end a reply (not emitted)    */
    int32_t n_stop_ids;
    const char *const *stop_strings; /* [n_stop_strings] valid UTF-8 (an empty one never
                                        matches); need a tokenizer; removed from the text */
    int32_t n_stop_strings;
    const sf_sampling *request_sampling; /* [n_requests] or NULL: request r samples with
                                            request_sampling[r] (its own temperature, top_k,
                                            top_p, and a stream started from its own seed)
                                            instead of sampling, as if generated alone    */
    const int32_t *request_max_new_tokens; /* [n_requests] or NULL: request r's own limit
                                              (each >= 1) instead of max_new_tokens      */
} sf_generation;

/* Streaming: called after every new token of a request, with the UTF-8 text it completes (may
 * be empty; never a partial character; only with a tokenizer, else NULL). Return false to stop
 * that request. */
typedef bool (*sf_stream_fn)(void *user, int32_t request, int32_t token, const char *text,
                             size_t text_len);

typedef struct sf_generation_result {
    int32_t *tokens;  /* the generated ids (stop id excluded); free with the result */
    int32_t n_tokens;
    char *text;       /* the decoded reply (special tokens skipped, stop string removed), when
                         a tokenizer was given; else NULL */
    sf_finish_reason finish;
    float *logprobs;  /* [n_tokens] when the request's sampling asked (sf_sampling.logprobs or
                         top_logprobs), else NULL: tokens[i]'s log-probability under the
                         model's distribution at its step (sf_token_logprob's; on the GPU
                         computed there in fp32 from the engine's logits); free with the
                         result */
    int32_t n_top;    /* the request's sampling.top_logprobs (0: none asked)                */
    int32_t *top_ids; /* [n_tokens * n_top] when n_top > 0, else NULL: at tokens[i]'s step, the
                         n_top most likely tokens, most likely first (sf_top_logprobs's order),
                         at top_ids[i * n_top + j]; free with the result                     */
    float *top_logprobs; /* [n_tokens * n_top]: their log-probabilities                     */
} sf_generation_result;

/* Generates continuations for every prompt on the CPU: one packed prefill (guarded when
 * sysformer is not NULL), then batched decode steps of one token per unfinished request, each
 * with its own KV cache, until each request stops. results[n_requests] are filled (release each
 * with sf_generation_result_free). tok may be NULL (no text, no stop strings). A prompt that
 * leaves no room in the context window fails with SF_ERR_OUT_OF_RANGE. */
sf_status sf_generate_cpu(const sf_llm *llm, const sf_sysformer *sysformer,
                          const sf_tokenizer *tok, const sf_generation *gen, sf_stream_fn stream,
                          void *user, sf_generation_result *results);

void sf_generation_result_free(sf_generation_result *result);

/* ------------------------------------------------------------------------------------------ */
/* CUDA                                                                                        */
/* ------------------------------------------------------------------------------------------ */

/* True when the library was built with CUDA support. */
bool sf_cuda_built(void);

/* Number of usable CUDA devices in *count (0 without CUDA support or without a GPU).
 * Returns SF_OK in both of those cases; SF_ERR_CUDA only when the runtime itself fails. */
sf_status sf_cuda_device_count(int *count);

/* The CUDA engine: the frozen LLM and (optionally) a Sysformer on one GPU, bf16 storage with
 * fp32 accumulation. Every function below exists in every build; without CUDA support, or
 * for a device ordinal with no GPU behind it, they return SF_ERR_NO_DEVICE.
 *
 * The engine owns one CUDA stream, its weights (uploaded once as bf16), one device arena sized
 * at creation (activations for max_batch_tokens packed tokens, logits and sampling scratch for
 * max_slots rows, cuBLASLt workspace) and a KV cache of max_context positions for each of
 * max_slots request slots. Nothing is allocated after creation. A step enqueues its work on the
 * engine's stream and returns without waiting for the GPU: there is no device synchronisation
 * and no device-to-host copy inside it, except the asynchronous copy of the sampled token ids
 * into pinned host memory, which sf_cuda_engine_read_tokens waits for. Decode steps (one token
 * per request, input = the token the previous step sampled for that slot) are captured once per
 * batch size (and sampling setting; see sf_cuda_engine_step) as a CUDA graph and replayed.
 * NVTX ranges name every stage and every layer.
 *
 * An engine is not thread-safe: one host thread drives it at a time. */
typedef struct sf_cuda_engine sf_cuda_engine;

/* Which fused-attention kernel the engine's prefill, Sysformer and non-split decode attention
 * run on. Decode steps whose keys split over blocks keep the split-KV kernel either way. */
typedef enum sf_attention_kernel {
    SF_ATTENTION_AUTO = 0,  /* the library's choice for the device: today SF_ATTENTION_MMA
                               everywhere (the wgmma kernel has not yet been validated on a
                               GPU)                                                          */
    SF_ATTENTION_MMA = 1,   /* mma.sync tensor cores, any supported device (sm_80+)          */
    SF_ATTENTION_WGMMA = 2, /* Hopper's warpgroup tensor cores: a build with sm_90 among its
                               CUDA architectures and a compute capability 9.0 device, else
                               sf_cuda_engine_create fails with SF_ERR_UNSUPPORTED           */
    SF_ATTENTION_WGMMA_WS = 3, /* the same instruction on a warp-specialized schedule (a
                               producer warpgroup copying, two consumers taking turns on the
                               tensor cores); the same requirements as SF_ATTENTION_WGMMA   */
} sf_attention_kernel;

/* The 16-bit format of a guard-only engine's embeddings: of its embedding table (its own or
 * the lent embedding_table) and of what sf_cuda_guarded_embed writes. The Sysformer itself
 * always runs in bf16 with fp32 accumulation. */
typedef enum sf_embedding_dtype {
    SF_EMBEDDING_BF16 = 0, /* bfloat16 (the default, and every full engine's)                  */
    SF_EMBEDDING_F16 = 1,  /* IEEE fp16, for a stack that runs its LLM in fp16 (Llama 2's
                              checkpoints are fp16): the table and every plain row are the
                              stack's fp16 values exactly; the system rows the Sysformer reads
                              are rounded to bf16 and its S' rows rounded back to fp16 (to
                              nearest; |x| >= 65520 becomes +-inf), so a fresh Sysformer gives
                              S' = S only to within one bf16 rounding (2^-8 relative) in fp16   */
} sf_embedding_dtype;

typedef struct sf_cuda_engine_options {
    int32_t device;           /* CUDA device ordinal (default 0)                                */
    int32_t max_slots;        /* KV cache slots = requests held at once, and the most requests
                                 in one step (default 8)                                      */
    int32_t max_context;      /* positions each slot holds; 0: min(max_position_embeddings,
                                 4096). Never more than max_position_embeddings.             */
    int32_t max_batch_tokens; /* packed tokens in one step (sum over its requests); 0:
                                 max_context                                                   */
    bool cuda_graphs;         /* replay decode steps as CUDA graphs (default true)           */
    sf_attention_kernel attention; /* (default SF_ATTENTION_AUTO)                             */
    bool guard_only;          /* hold only what sf_cuda_guarded_embed needs, for a serving
                                 stack that runs its own LLM: the embedding table, the
                                 Sysformer and their arena for max_batch_tokens rows; no
                                 decoder layer, LM head or KV cache is uploaded or allocated
                                 (so the LLM's head dimension is not checked), and steps,
                                 slot resets and generation answer SF_ERR_UNSUPPORTED
                                 (default false)                                           */
    const void *embedding_table; /* guard_only only: the serving stack's own device copy of the
                                 LLM's embedding table, [vocab_size, hidden_size] row-major in
                                 embedding_dtype, on options.device, to read instead of
                                 uploading a second one (vocab x hidden x 2 bytes saved: about
                                 1 GiB for Llama 3's vocabulary). Borrowed: the engine never
                                 writes or frees it; it must be written, and that work
                                 synchronised, before the engine is created (creation reads a
                                 few rows back and refuses a table that is not the LLM's,
                                 SF_ERR_INVALID_ARGUMENT), and outlive the engine. All
                                 vocab_size rows must be on this device (a stack that shards its
                                 embedding by vocabulary keeps the engine's own copy).
                                 sf_cuda_engine_plan only asks whether it is NULL. NULL: upload
                                 the LLM's (default) */
    sf_embedding_dtype embedding_dtype; /* guard_only only (a full engine refuses anything but
                                 SF_EMBEDDING_BF16, SF_ERR_INVALID_ARGUMENT): the format of the
                                 table, its own or lent, and of sf_cuda_guarded_embed's output;
                                 the same bytes either way (default SF_EMBEDDING_BF16)      */
} sf_cuda_engine_options;

sf_cuda_engine_options sf_cuda_engine_default_options(void);

/* Uploads llm (and sysformer, which may be NULL: no rewriting) to the GPU and sizes everything.
 * The CPU objects are only read: they may be freed once this returns. SF_ERR_OUT_OF_MEMORY
 * (naming the bytes asked for) when the device cannot hold it all; SF_ERR_UNSUPPORTED for a
 * head dimension the fused attention does not have (64, 80, 96, 128), for the LLM or the
 * Sysformer. */
sf_status sf_cuda_engine_create(const sf_llm *llm, const sf_sysformer *sysformer,
                                const sf_cuda_engine_options *options, sf_cuda_engine **out);

/* The same with weights drawn on the device (uniform, scaled like PyTorch's default init; RMSNorm
 * and LayerNorm weights near 1), for benchmarks at real model shapes without any file.
 * sysformer_cfg NULL: no Sysformer. Token ids are then in [0, llm_cfg->vocab_size). A
 * borrowed options.embedding_table is refused (SF_ERR_INVALID_ARGUMENT): there is no model to
 * check it against. */
sf_status sf_cuda_engine_create_random(const sf_llm_config *llm_cfg,
                                       const sf_sysformer_config *sysformer_cfg, uint64_t seed,
                                       const sf_cuda_engine_options *options,
                                       sf_cuda_engine **out);

/* Another engine over the LLM weights that base already holds on the device, which are not
 * uploaded again: for several guard policies on one copy of a frozen LLM (two Sysformers
 * under an A/B test, a policy per tenant, baselines evaluated side by side), each engine with
 * its own Sysformer (sysformer, which may be NULL: no rewriting), its own options (slots,
 * context, batch tokens, attention kernel, graphs, guard_only), KV cache, arena and stream.
 * The engines may step at the same time, from different threads: the shared weights are only
 * read. They stay on the device until the last engine reading them is freed, whichever order
 * the engines are freed in (base may be freed first; an embedding table base borrowed must
 * outlive them all). options.device must be base's device, options.embedding_table NULL (the
 * base's table is read) and options.embedding_dtype base's; a full engine cannot share a
 * guard-only base (which has no decoder layers): SF_ERR_INVALID_ARGUMENT. Otherwise the same
 * checks and errors as sf_cuda_engine_create, for the options and the Sysformer.
 * sf_cuda_engine_memory reports only the new engine's own bytes: its Sysformer's weights, KV
 * cache and arena. The new engine steps bit for bit as one made by sf_cuda_engine_create with
 * the same LLM, Sysformer and options. */
sf_status sf_cuda_engine_create_sharing(const sf_cuda_engine *base, const sf_sysformer *sysformer,
                                        const sf_cuda_engine_options *options,
                                        sf_cuda_engine **out);

void sf_cuda_engine_free(sf_cuda_engine *engine);

/* Replaces the Sysformer the engine runs (a retrained one, or another under an A/B test)
 * without uploading the LLM again. It must have the shape of the one the engine was created
 * with: d_model, num_layers, num_heads, dim_feedforward, final_norm and system_offset_rows
 * (the weights and the arena are sized by them); activation, norm_first and layer_norm_eps may
 * differ. Ordered on the engine's stream after the work already enqueued there (steps,
 * generation); work the caller enqueued on its own streams (sf_cuda_guarded_embed) must have
 * finished. Returns once the new weights are on the device: later steps and guarded
 * embeddings use them, and sysformer may be freed. SF_ERR_INVALID_ARGUMENT for an engine made
 * without a Sysformer or a Sysformer of another shape, with the engine unchanged. After a
 * device error (an upload may stop part-way, leaving a mix of both) the engine refuses guarded
 * steps and guarded embeddings (SF_ERR_INVALID_ARGUMENT, saying why) until a later call
 * succeeds; unguarded steps and the requests already in its slots go on. */
sf_status sf_cuda_engine_set_sysformer(sf_cuda_engine *engine, const sf_sysformer *sysformer);

/* Device bytes the engine holds, by purpose. */
typedef struct sf_cuda_memory {
    size_t weights;     /* LLM + Sysformer, bf16 (a borrowed embedding table is the
                           lender's, not counted; nor is an LLM shared with the engine
                           sf_cuda_engine_create_sharing made this one from)          */
    size_t kv_cache;    /* max_slots x max_context positions x layers x K and V (0
                           for a guard-only engine)                                  */
    size_t activations; /* the arena: activations, logits, sampling and GEMM scratch */
    size_t total;
} sf_cuda_memory;
sf_status sf_cuda_engine_memory(const sf_cuda_engine *engine, sf_cuda_memory *out);

/* The bytes sf_cuda_engine_create (or _create_random) would allocate for these shapes and
 * options, without a device or a CUDA call: for sizing a deployment before creating it. Equal
 * to what sf_cuda_engine_memory reports on the engine made with the same arguments. The same
 * shape checks as creation (SF_ERR_UNSUPPORTED, SF_ERR_INVALID_ARGUMENT, SF_ERR_OUT_OF_RANGE);
 * a build without CUDA answers SF_ERR_NO_DEVICE. */
sf_status sf_cuda_engine_plan(const sf_llm_config *llm_cfg,
                              const sf_sysformer_config *sysformer_cfg,
                              const sf_cuda_engine_options *options, sf_cuda_memory *out);

/* The engine's cudaStream_t, for callers that order their own work around its steps. */
void *sf_cuda_engine_stream(const sf_cuda_engine *engine);

/* Positions stored in a slot (the next token of its request gets this position); -1 for a slot
 * outside [0, max_slots). */
int32_t sf_cuda_engine_slot_length(const sf_cuda_engine *engine, int32_t slot);
/* Empties a slot so that it can serve a new request. */
sf_status sf_cuda_engine_reset_slot(sf_cuda_engine *engine, int32_t slot);

/* One step over a packed batch of requests, each bound to its own KV slot.
 *   Prefill (token_ids != NULL): request r appends the tokens token_ids[cu_seqlens[r] ..
 *   cu_seqlens[r+1]) to its slot. With spans (and a Sysformer) the step is guarded: spans[r]
 *   splits the request's prompt as in sf_guarded_batch, and the system rows' embeddings are
 *   rewritten on the device before the LLM runs. A request with a system span must start in
 *   an empty slot; one with system span 0 is not guarded and may continue its slot, so that a
 *   step can carry new guarded prompts beside the next tokens (or prompt chunks) of requests
 *   already running (continuous batching: the caller passes a running request's last sampled
 *   token as a 1-token chunk with spans {0, 0, 0, 0, 1}).
 *   Decode (token_ids == NULL, cu_seqlens and spans NULL): each request appends one token, the
 *   one the last sampling step picked for its slot.
 * Afterwards the logits of each request's last new row are kept on the device (fp32 [n_requests,
 * vocab]); with sampling != NULL one token per request is picked on the device from them (the
 * temperature/top-k/top-p of sf_sample; uniforms[r] in [0, 1) is request r's draw, as sf_sample
 * would take from the request's stream; NULL for greedy) and copied back asynchronously.
 * With request_sampling instead, each request is picked with its own setting (uniforms[r] is
 * read only for the requests that sample). Requests with equal settings are picked together:
 * the engine runs the step with its requests grouped by setting (results come back in the
 * caller's order), and one sampling pass per distinct setting. A decode graph then holds the
 * LLM's forward only, and the passes follow it; steps whose requests all share one setting
 * keep the passes in the graph. Settings that act alike count as one (any temperature <= 0 is
 * greedy; top_k <= 0 or >= vocab and top_p outside (0, 1) are off). When any request's
 * setting has logprobs set (or top_logprobs > 0), the step also takes each picked token's
 * log-probability from the same logits on the device (fp32; the raw distribution's, as
 * sf_token_logprob), and the largest top_logprobs asked of the n most likely tokens of every
 * row (sf_top_logprobs's), and copies them back with the tokens
 * (sf_cuda_engine_read_logprobs, _read_top_logprobs): one more read of the logit rows.
 * Every argument is checked on the host before anything is enqueued: SF_ERR_INVALID_ARGUMENT
 * for a bad slot, a repeated slot, a system span in a non-empty slot, ids outside the vocabulary,
 * spans that do not add up, or (a Sysformer with a learned system offset) a system span that is
 * neither empty nor exactly the offset's rows; SF_ERR_OUT_OF_RANGE for more requests than
 * slots, more tokens than max_batch_tokens, a slot that would pass max_context, or a guarded
 * step whose requests padded to its longest system (or user) span pass max_batch_tokens rows.
 * A decode step needs a token sampled for each of its slots by the previous step
 * (SF_ERR_INVALID_ARGUMENT otherwise); sampling and request_sampling together, or a sampling
 * request without its uniform in [0, 1), or a top_logprobs outside [0, SF_MAX_TOP_LOGPROBS],
 * are SF_ERR_INVALID_ARGUMENT too.
 * If the step fails after validation, its slots (and no others) are emptied: SF_ERR_CUDA for a
 * CUDA error, SF_ERR_OUT_OF_MEMORY when the decode graph cannot be instantiated for lack of
 * memory. A refused launch leaves the engine usable; after a kernel fault (an illegal address)
 * the CUDA context is lost and every later call fails. */
typedef struct sf_cuda_step {
    int32_t n_requests;
    const int32_t *slots;         /* [n_requests] distinct slots in [0, max_slots)           */
    const int32_t *cu_seqlens;    /* [n_requests + 1] (prefill), every request >= 1 token    */
    const int32_t *token_ids;     /* [cu_seqlens[n]] (prefill), or NULL (decode)             */
    const sf_prompt_spans *spans; /* [n_requests] (guarded prefill), or NULL                 */
    const sf_sampling *sampling;  /* NULL: no sampling, logits only                          */
    const double *uniforms;       /* [n_requests] when any request samples (not greedy)      */
    const sf_sampling *request_sampling; /* [n_requests] or NULL: each request's own setting
                                            (with sampling NULL); seeds unused, as above     */
} sf_cuda_step;
sf_status sf_cuda_engine_step(sf_cuda_engine *engine, const sf_cuda_step *step);

/* Waits for the last step and copies its n sampled tokens to tokens (host). */
sf_status sf_cuda_engine_read_tokens(sf_cuda_engine *engine, int32_t *tokens, int32_t n);

/* Waits for the last step and copies the log-probabilities of its n sampled tokens to logprobs
 * (host), in the caller's request order. SF_ERR_INVALID_ARGUMENT when the last step did not
 * take them (no request's setting had logprobs or top_logprobs set) or sampled fewer than n. */
sf_status sf_cuda_engine_read_logprobs(sf_cuda_engine *engine, float *logprobs, int32_t n);

/* Waits for the last step and copies, for its first n requests (in the caller's order), the k
 * most likely tokens and their log-probabilities to ids[n * k] and logprobs[n * k] (request r's
 * j-th at r * k + j). SF_ERR_INVALID_ARGUMENT when the last step took fewer than k a row (the
 * largest top_logprobs its requests asked) or sampled fewer than n. */
sf_status sf_cuda_engine_read_top_logprobs(sf_cuda_engine *engine, int32_t *ids, float *logprobs,
                                           int32_t n, int32_t k);

/* Waits for the last step and copies its logits (fp32 [n, vocab]) to host memory: for tests and
 * tools; a serving loop never needs it. */
sf_status sf_cuda_engine_read_logits(sf_cuda_engine *engine, float *logits, int32_t n);

/* Stage timing, for benchmarks and profiling: when on, eager steps record CUDA events between
 * their stages (no synchronisation); sf_cuda_engine_stage_times waits for the last step and
 * reports the milliseconds of each stage. A step replayed as a CUDA graph is timed as a whole
 * (its stages then read 0 and total the step). */
typedef struct sf_cuda_stage_times {
    float upload_ms;    /* host inputs -> device (ids, offsets, spans)                   */
    float embed_ms;     /* embedding gather                                              */
    float sysformer_ms; /* Sysformer rewrite of the system rows, and the splice          */
    float layers_ms;    /* the LLM's decoder layers                                      */
    float head_ms;      /* final norm and LM head on the logit rows                      */
    float sample_ms;    /* sampling and the copy of the ids back                         */
    float total_ms;
    uint64_t step;      /* which step these are of: the engine numbers its steps 1, 2, ...
                           from its creation, so a caller that reads the times more than
                           once after a step (say, from a stream callback per request) can
                           count each step once                                        */
} sf_cuda_stage_times;
sf_status sf_cuda_engine_set_timing(sf_cuda_engine *engine, bool on);
sf_status sf_cuda_engine_stage_times(sf_cuda_engine *engine, sf_cuda_stage_times *out);

/* A generation session: requests arrive at any time and share the engine's slots with
 * continuous batching, for a serving loop that cannot know its requests in advance
 * (sf_generate_cuda is one session over a fixed set of requests, run until all are done).
 * Each sf_cuda_session_step is one engine step: the running requests' next tokens, and the
 * waiting prompts (first come, first served) that a free slot and the step's budget admit now,
 * each as its guarded prefill; a round that admits nothing is a decode step (a CUDA graph).
 * Stop rules, sampling streams, streaming and results are sf_generate_cuda's. A request's id is
 * its number in the session (0, 1, 2, ... in submission order), the `request` the stream
 * callback is given.
 *
 * The session owns the engine's slots while it lives: other steps on the engine would corrupt
 * its requests' caches. Not thread-safe: one host thread drives a session and its engine. A
 * session holds the requests not yet taken: its table of ids spans the oldest one not taken to
 * the newest (8 bytes each), so a server that takes its results can run one session for good,
 * up to 2^31 - 1 requests (then submissions fail with SF_ERR_OUT_OF_RANGE). If a step fails (a
 * CUDA error) the session is broken: later submissions and steps return that failure; finished
 * results can still be taken. */
typedef struct sf_cuda_session sf_cuda_session;

/* A session on engine (a full engine, not guard-only: SF_ERR_UNSUPPORTED). tok may be NULL (no
 * text, no stop strings). stop_ids and stop_strings are sf_generation's, copied. */
sf_status sf_cuda_session_create(sf_cuda_engine *engine, const sf_tokenizer *tok,
                                 const int32_t *stop_ids, int32_t n_stop_ids,
                                 const char *const *stop_strings, int32_t n_stop_strings,
                                 sf_cuda_session **out);

/* Queues one request: its prompt (token_ids[0 .. n_tokens), copied), spans (required with a
 * Sysformer, as in sf_guarded_batch; else unused), sampling (NULL: greedy; its seed starts the
 * request's own stream) and limit (>= 1). Checked now, so that a bad request never reaches a
 * step that others share: SF_ERR_INVALID_ARGUMENT for ids outside the vocabulary, spans
 * sf_cuda_engine_step would refuse or a top_logprobs outside [0, SF_MAX_TOP_LOGPROBS],
 * SF_ERR_OUT_OF_RANGE for a prompt that leaves no room in the engine's context window or fits
 * no step alone (more tokens, or a longer system or user span, than max_batch_tokens). *id
 * receives its id. */
sf_status sf_cuda_session_submit(sf_cuda_session *session, const int32_t *token_ids,
                                 int32_t n_tokens, const sf_prompt_spans *spans,
                                 const sf_sampling *sampling, int32_t max_new_tokens,
                                 int32_t *id);

/* Runs one round (waiting for its tokens), streaming each accepted token (stream may be NULL;
 * returning false stops that request). Afterwards *running holds the requests in slots and
 * *waiting those queued (either may be NULL); with none of either the call does nothing. The
 * stream callback may submit, cancel and take (a request it cancels that has not yet had its
 * token this round gets none; the request whose token it is given, cancelled, ends with that
 * token once the callback returns, as if it had returned false, and is taken after that); it
 * may not step (SF_ERR_INVALID_ARGUMENT) or free the session. */
sf_status sf_cuda_session_step(sf_cuda_session *session, sf_stream_fn stream, void *user,
                               int32_t *running, int32_t *waiting);

/* Stops a request: one still waiting never starts, a running one leaves its slot now; either
 * ends with SF_FINISH_CALLBACK and the tokens it has. A finished request is left as it is.
 * SF_ERR_INVALID_ARGUMENT for an id never given or already taken. */
sf_status sf_cuda_session_cancel(sf_cuda_session *session, int32_t id);

/* A finished request's result, moved into *out (release it with sf_generation_result_free):
 * *done true, and the id is gone from the session. While the request waits or runs: *done
 * false and *out untouched. SF_ERR_INVALID_ARGUMENT for an id never given or already taken. */
sf_status sf_cuda_session_take(sf_cuda_session *session, int32_t id, sf_generation_result *out,
                               bool *done);

/* A borrowed view of a request's reply as it stands, without taking it: for a stream callback
 * that wants more than the token it is given (its log-probability is view->logprobs
 * [view->n_tokens - 1] when the request's sampling asked), or a server that shows partial
 * replies. view->tokens and view->logprobs (NULL unless asked) hold what the request has been
 * given so far (a waiting request: none); view->text and view->finish are the result's once
 * *done (before that, text is NULL: the stream callback has the text as it comes). The view is
 * the session's: never free it; its pointers stay valid until the session's next step, take or
 * free. SF_ERR_INVALID_ARGUMENT for an id never given or already taken, or a NULL argument. */
sf_status sf_cuda_session_peek(const sf_cuda_session *session, int32_t id,
                               sf_generation_result *view, bool *done);

/* Frees the session, with every result not taken. The engine is the caller's. */
void sf_cuda_session_free(sf_cuda_session *session);

/* sf_generate_cpu on the GPU, with continuous batching: the same stop rules, results and
 * streaming. Requests take slots in order; with more requests than max_slots the rest wait, and
 * each prompt starts (its guarded prefill) in the step after a slot frees, beside the running
 * requests' next tokens; rounds that start nothing are decode steps (CUDA graphs). The
 * requests' uniforms come from their own streams exactly as on the CPU, so with equal logits
 * the CPU and GPU pick the same tokens (a request's logits may differ in the last bits with the
 * company it keeps in a step). Slots 0 .. min(n, max_slots) - 1 are reset and used. A prompt
 * that fits no step alone (more tokens, or a longer system or user span, than
 * max_batch_tokens) is SF_ERR_OUT_OF_RANGE before anything runs. */
sf_status sf_generate_cuda(sf_cuda_engine *engine, const sf_tokenizer *tok,
                           const sf_generation *gen, sf_stream_fn stream, void *user,
                           sf_generation_result *results);

/* The integration point for serving stacks (docs/SERVING.md: set-up, spans, chunked prefill,
 * prefix caching): writes the guarded input embeddings of a packed batch into a caller-owned
 * device buffer, entirely on the caller's stream, reading only device memory: E[token] for
 * every row, with each request's system span replaced by the Sysformer's S' (plain E[token]
 * when the engine has no Sysformer). The caller then feeds the buffer to its own LLM forward
 * (as inputs_embeds).
 *   d_cu_seqlens [n_requests + 1], d_token_ids [n_tokens], d_spans [n_requests]: device memory
 *   (4-byte aligned, as d_errors);
 *   d_embeds: device [n_tokens, hidden_size] in the engine's embedding_dtype (bf16 unless it
 *   was created with SF_EMBEDDING_F16), 16-byte aligned, written in full;
 *   max_system, max_user: host bounds on any request's system and user span lengths (they size
 *   the work: the Sysformer runs on n_requests x max_system query rows);
 *   d_errors: device int or NULL; when not NULL it is incremented for every row with a token id
 *   outside the vocabulary (embedded as zeros) and, with a Sysformer, for every request whose
 *   rows are not inside the batch (cu_seqlens below 0, past n_tokens or decreasing), or whose
 *   spans are negative, do not add up to its length, exceed max_system / max_user, have a
 *   system span without a user span, or (a Sysformer with a learned system offset) have a system
 *   span that is neither empty nor exactly the offset's rows (that request's rows stay plain
 *   E[token]), so the stack can check validity without a host round trip
 *   (sf_cuda_guard_check then names the requests and their reasons).
 * Host-side checks (before anything is enqueued): n_tokens <= max_batch_tokens,
 * n_requests <= max_slots, max_system * n_requests and max_user * n_requests <= max_batch_tokens.
 * It allocates nothing, never synchronises and copies nothing between host and device, so a
 * stack may capture it (with sf_cuda_guard_check) into its own CUDA graph: the host arguments
 * are fixed in the graph, the device buffers read at each replay; d_errors is only ever
 * incremented, so a graph that counts resets it too (cudaMemsetAsync before the call).
 * It launches on the caller's stream, so the engine's device must be the current one (as for
 * any launch there). It uses the engine's arena, so calls must not overlap one another (one
 * host thread at a time, and on one stream, or on streams the caller orders) nor the engine's
 * own steps. A stack that runs its own LLM creates the engine with guard_only: the embedding
 * table and the Sysformer are then all it holds on the device, and with embedding_table it
 * reads the stack's own table instead of a copy. */
sf_status sf_cuda_guarded_embed(sf_cuda_engine *engine, int32_t n_requests, int32_t n_tokens,
                                const int32_t *d_cu_seqlens, const int32_t *d_token_ids,
                                const sf_prompt_spans *d_spans, int32_t max_system,
                                int32_t max_user, void *d_embeds, int *d_errors,
                                void *cuda_stream);

/* Why sf_cuda_guard_check flags a request (an OR of these; 0: guarded as asked). */
enum {
    SF_GUARD_BAD_OFFSETS = 1, /* its rows are not inside the batch: cu_seqlens below 0, past
                                 n_tokens or decreasing                                      */
    SF_GUARD_BAD_SPANS = 2,   /* spans negative, not adding up to its length, a system span
                                 without a user span, or (a learned system offset) a system
                                 span neither empty nor exactly the offset's rows            */
    SF_GUARD_TOO_LONG = 4,    /* system span over max_system or user span over max_user      */
    SF_GUARD_BAD_TOKEN = 8,   /* a token id outside the vocabulary (its row: zeros)          */
};

/* Per-request validity of a batch for sf_cuda_guarded_embed, on the device: d_flags
 * [n_requests] (device int32) receives, for each request, the SF_GUARD_* reasons that call would
 * leave it unguarded or with a zero row, or 0. The span reasons apply only to an engine with a
 * Sysformer (without one, spans are not read). The same arguments and host-side checks as
 * sf_cuda_guarded_embed, d_embeds and d_errors aside; enqueued on cuda_stream, nothing waits and
 * nothing is copied back. For a stack that saw d_errors > 0 and wants to know which requests to
 * drop, or that checks every batch before serving it. */
sf_status sf_cuda_guard_check(sf_cuda_engine *engine, int32_t n_requests, int32_t n_tokens,
                              const int32_t *d_cu_seqlens, const int32_t *d_token_ids,
                              const sf_prompt_spans *d_spans, int32_t max_system,
                              int32_t max_user, int32_t *d_flags, void *cuda_stream);

#ifdef __cplusplus
}
#endif

#endif /* SYSFORMER_H */
