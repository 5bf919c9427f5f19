/* Internal: the CUDA engine's state (the files of host/cuda/). One engine = one device, one
 * stream, the weights as bf16, one arena of activations sized at creation, and the KV cache
 * slots.
 *
 *   engine.c            create / free / options / memory / slots / timing
 *   weights.c           bf16 upload of an sf_llm and an sf_sysformer, or random weights
 *   llm_forward.c       the decoder layers and the LM head over a packed step
 *   sysformer_forward.c the Sysformer on the device and the guarded embedding (integration point)
 *   step.c              sf_cuda_engine_step: validation, upload, decode CUDA graphs, read-back
 *   generate.c          sf_generate_cuda */
#ifndef SF_CUDA_ENGINE_H
#define SF_CUDA_ENGINE_H

#include <cuda_runtime.h>

#include "cuda/gemm.h"
#include "kernels.h"
#include "sysformer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One LLM decoder layer on the device. The q, k and v projections are stacked row blocks of
 * one [q_dim + 2 kv_dim, d] matrix (one GEMM), gate and up likewise ([2 ff, d]). */
typedef struct sf_cuda_llm_layer {
    sf_bf16 *attn_norm;  /* [d]                          */
    sf_bf16 *w_qkv;      /* [q_dim + 2 kv_dim, d]         */
    sf_bf16 *b_qkv;      /* [q_dim + 2 kv_dim] or NULL    */
    sf_bf16 *w_o;        /* [d, q_dim]                    */
    sf_bf16 *b_o;        /* [d] or NULL                   */
    sf_bf16 *mlp_norm;   /* [d]                           */
    sf_bf16 *w_gate_up;  /* [2 ff, d]: gate rows, then up */
    sf_bf16 *w_down;     /* [d, ff]                       */
} sf_cuda_llm_layer;

/* One Sysformer layer (PyTorch nn.TransformerDecoderLayer names). in_proj stacks q, k, v. */
typedef struct sf_cuda_sys_layer {
    sf_bf16 *sa_in_w, *sa_in_b;   /* [3d, d], [3d] */
    sf_bf16 *sa_out_w, *sa_out_b; /* [d, d], [d]   */
    sf_bf16 *ca_in_w, *ca_in_b;   /* [3d, d], [3d]: rows [0, d) project the queries, [d, 3d)
                                     the user rows' keys and values                         */
    sf_bf16 *ca_out_w, *ca_out_b;
    sf_bf16 *l1_w, *l1_b;         /* [ff, d], [ff] */
    sf_bf16 *l2_w, *l2_b;         /* [d, ff], [d]  */
    sf_bf16 *norm_w[3], *norm_b[3];
} sf_cuda_sys_layer;

/* Everything a step reads and writes on the device, carved from one allocation. T =
 * max_batch_tokens rows, R = max_slots requests. */
typedef struct sf_cuda_arena {
    /* step inputs (copied from the pinned staging) */
    int32_t *ids;        /* [T]     */
    int32_t *cu_seqlens; /* [R + 1] */
    int32_t *spans;      /* [R * 5] */
    int32_t *slots;      /* [R]     */
    double *uniforms;    /* [R]     */
    /* step layout (kernels/guard.h) */
    int32_t *positions, *kv_rows, *rope_table;          /* [T]     */
    int32_t *cu_q, *cu_kv;                              /* [R + 1] */
    int32_t *kv_len, *q_pos0, *last_row;                /* [R]     */
    /* the LLM's activations */
    sf_bf16 *x, *xn, *tmp;        /* [T, d]          */
    sf_bf16 *qkv;                 /* [T, qkv_dim]    */
    sf_bf16 *attn;                /* [T, q_dim]      */
    sf_bf16 *gate_up;             /* [T, 2 ff]       */
    sf_bf16 *act;                 /* [T, ff]         */
    /* the Sysformer's (padded layout: R x max_system query rows, R x max_user key rows) */
    int32_t *sys_rows, *user_rows; /* [T]            */
    int32_t *cu_sys, *cu_user;     /* [R + 1]        */
    int32_t *sys_len, *user_len;   /* [R]            */
    sf_bf16 *s_x, *s_xn, *s_tmp, *s_attn; /* [T, d]  */
    sf_bf16 *s_qkv;                /* [T, 3d]        */
    sf_bf16 *u;                    /* [T, d] user rows   */
    sf_bf16 *u_kv;                 /* [T, 2d]        */
    sf_bf16 *s_ff;                 /* [T, sys ff]    */
    /* the head */
    sf_bf16 *head_x, *head_tmp;   /* [R, d]          */
    float *logits;                /* [R, vocab]      */
    int32_t *sampled;             /* [R]             */
    float *nll;                   /* [R] -log p of each sampled token (when asked) */
    int32_t *top_ids;             /* [R, SF_MAX_TOP_LOGPROBS] each row's most likely ... */
    float *top_lp;                /* ... tokens and their log p (when asked; n_top a row) */
    void *sample_ws;
    size_t sample_ws_bytes;
    void *gemm_ws;
    float *attn_ws;               /* the split decode's scratch (attention.h)             */
    size_t attn_ws_bytes;
    /* state that outlives a step */
    int32_t *slot_len;            /* [R] positions stored per slot   */
    int32_t *slot_next;           /* [R] last token sampled per slot */
    float *inv_freq;              /* [2, head_dim / 2] rope tables (short, long) */
} sf_cuda_arena;

/* Host-pinned staging of one step's inputs and of the sampled ids. */
typedef struct sf_cuda_staging {
    int32_t *ids, *cu_seqlens, *spans, *slots;
    double *uniforms;
    int32_t *tokens; /* [R] sampled ids, copied back asynchronously */
    float *nll;      /* [R] their -log p, when the step took them, likewise      */
    int32_t *top_ids; /* [R, n_top] each row's most likely tokens, likewise      */
    float *top_lp;    /* [R, n_top] and their log p                             */
    void *base;
} sf_cuda_staging;

enum { SF_STAGE_EVENTS = 7 };

/* The requests of a step that sample with one setting (step.c): after the step's reordering,
 * rows [first, first + count) of its logits, uniforms and sampled ids. */
typedef struct sf_sample_group {
    sf_sampling sampling; /* canonical: greedy {0, 0, 1, 0}; top_k off 0, top_p off 1; seed 0 */
    int32_t first, count;
} sf_sample_group;

typedef struct sf_cuda_graph {
    cudaGraphExec_t exec; /* NULL: not captured */
    sf_sampling sampling; /* the one group it samples, canonical (sampling_on) */
    bool sampling_on;     /* false: the forward only, any sampling follows it eagerly */
    bool logprobs;        /* with sampling_on: the picks' log-probabilities taken inside too */
    int32_t n_top;        /* with sampling_on: the most likely tokens a row taken inside     */
} sf_cuda_graph;

struct sf_cuda_engine {
    sf_llm_config cfg;            /* rope factor pointers cleared: the tables are on the device */
    bool has_sysformer;
    bool sysformer_torn;          /* a set_sysformer failed mid-upload: the device holds a mix
                                     of two Sysformers, and guarded work is refused until a
                                     set_sysformer succeeds (sf_cuda_check_sysformer)        */
    sf_sysformer_config sys_cfg;  /* provenance strings cleared */
    int32_t device;
    int32_t max_slots, max_context, max_batch_tokens;
    bool cuda_graphs;
    bool guard_only;              /* embedding table + Sysformer only (options.guard_only) */
    sf_attention_kernel attention; /* every sf_attention_args.kernel */
    int64_t d, q_dim, kv_dim, qkv_dim, ff, sys_ff;
    int32_t long_after;           /* longrope: table 1 when a request's length passes this */
    float rope_scale[2];

    cudaStream_t stream;
    sf_gemm_cache *gemm;
    void *weights;                /* the engine's own weight allocation: a sharing engine's
                                     (its Sysformer's tensors); any other engine's moves into
                                     llm_hold during creation, leaving NULL                 */
    size_t weight_bytes;          /* its size: the LLM's tensors and the Sysformer's, or for a
                                     sharing engine the Sysformer's alone                  */
    bool shares_llm;              /* the LLM's tensors are another engine's (create_sharing) */
    struct sf_cuda_llm_hold *llm_hold; /* the allocation holding the LLM's tensors, counted:
                                     freed with the last engine reading it (engine.c)      */
    sf_bf16 *embed, *final_norm, *lm_head;
    bool borrowed_embed;          /* embed is options.embedding_table, not in weights */
    bool embed_f16;               /* embed holds fp16, not bf16 (SF_EMBEDDING_F16, guard-only) */
    sf_cuda_llm_layer *layers;
    sf_cuda_sys_layer *sys_layers;
    sf_bf16 *sys_final_w, *sys_final_b;
    sf_bf16 *sys_offset;          /* [system_offset_rows, d], or NULL: none */
    sf_bf16 *k_cache, *v_cache;   /* [layers, R * max_context, kv_dim] each */
    size_t kv_bytes;
    void *arena_base;
    size_t arena_bytes;
    sf_cuda_arena a;
    sf_cuda_staging h;

    int32_t *host_slot_len;       /* mirror of a.slot_len, for the host checks */
    bool *host_slot_sampled;      /* a slot has a sampled token to decode from */
    sf_sample_group *groups;      /* [R] the step's sampling groups, n_groups of them */
    int32_t n_groups;
    int32_t *order;               /* [R] the caller's request at each row of the step */
    int32_t *row_of;              /* [R] the row of each of the caller's requests     */
    bool reordered;               /* the last step ran its requests in `order`        */
    int32_t last_n;               /* requests in the last step */
    bool last_sampled;
    bool last_logprobs;           /* the last step took its picks' log-probabilities */
    int32_t last_n_top;           /* and the most likely tokens of each row, this many   */
    cudaEvent_t done;             /* the last step's read-back is complete */
    cudaEvent_t staging_free;     /* the last step's uploads have been read */
    cudaEvent_t ev[SF_STAGE_EVENTS];
    bool timing, last_timed, last_graph;
    uint64_t steps;               /* steps enqueued so far (the last one's number)   */
    sf_cuda_graph *graphs;        /* [R + 1], by decode batch size */
};

/* Returns from the calling function with the status of a failing call. */
#define SF_TRY(call)                           \
    do {                                       \
        sf_status st_ = (call);                \
        if (st_ != SF_OK) return st_;          \
    } while (0)

/* The same for a CUDA runtime call: SF_ERR_CUDA naming the call, SF_ERR_OUT_OF_MEMORY when it
 * could not allocate (a stream or an event too). The runtime's last error is cleared, so that
 * a later launch's check does not report this failure as its own (a sticky error, the device's,
 * stays whatever is cleared). */
#define SF_CUDA_OR_FAIL(call)                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            (void)cudaGetLastError();                                                          \
            return sf_fail(e_ == cudaErrorMemoryAllocation ? SF_ERR_OUT_OF_MEMORY : SF_ERR_CUDA, \
                           "%s: %s", #call, cudaGetErrorString(e_));                           \
        }                                                                                      \
    } while (0)

/* A bump allocator over one device allocation (256-byte aligned pieces); with base NULL it only
 * measures, so one layout function both sizes and carves. */
typedef struct sf_carver {
    char *base;
    size_t off;
} sf_carver;

static inline void *sf_carve(sf_carver *c, size_t bytes) {
    c->off = (c->off + 255) / 256 * 256;
    void *p = c->base ? c->base + c->off : NULL;
    c->off += bytes;
    return p;
}

/* Whether the Sysformer's rows of a guarded prefill step of n requests, laid out padded to its
 * longest system and user spans, fit the arena's max_batch_tokens rows (step.c refuses a step
 * that does not; generate.c admits requests so that none is refused). */
static inline bool sf_cuda_padded_rows_fit(const sf_cuda_engine *e, int64_t n, int64_t max_system,
                                           int64_t max_user) {
    return n * max_system <= e->max_batch_tokens && n * max_user <= e->max_batch_tokens;
}

/* SF_OK, or SF_ERR_INVALID_ARGUMENT naming fn when a failed sf_cuda_engine_set_sysformer left
 * the engine's Sysformer torn (guarded work would run a mix of two Sysformers' weights). */
sf_status sf_cuda_check_sysformer(const sf_cuda_engine *e, const char *fn);

/* step.c: the checks of one request's new tokens that need no slot (its ids in the vocabulary;
 * with spans: non-negative, adding up to n, a user span wherever there is a system span, and
 * a system span that is empty or exactly a learned system offset's rows). who and r name the
 * caller and the request in the message. SF_ERR_INVALID_ARGUMENT on the first failure. */
sf_status sf_cuda_check_prompt(const sf_cuda_engine *e, const char *who, int64_t r,
                               const int32_t *ids, int32_t n, const sf_prompt_spans *spans);

/* engine.c: internal accessors (also used by generate.c). */
int32_t sf_cuda_engine_max_context(const sf_cuda_engine *e);
int32_t sf_cuda_engine_max_slots(const sf_cuda_engine *e);
int32_t sf_cuda_engine_vocab(const sf_cuda_engine *e);

/* weights.c: the layout (host layer arrays, weight_bytes; no device call), then the one
 * device allocation carved by it: every tensor the engine holds itself, which for an engine
 * that shares another's LLM (shares_llm) is only its Sysformer's. */
sf_status sf_cuda_weights_layout(sf_cuda_engine *e);
sf_status sf_cuda_weights_alloc(sf_cuda_engine *e);
sf_status sf_cuda_weights_upload(sf_cuda_engine *e, const sf_llm *llm, const sf_sysformer *sf);
/* The Sysformer's tensors alone (sf of the engine's shape), on the engine's stream; returns once
 * they are on the device. */
sf_status sf_cuda_weights_upload_sysformer(sf_cuda_engine *e, const sf_sysformer *sf);
/* Calls fn(user, dst, src, n) for each of the engine's Sysformer tensors: dst its n bf16
 * values on the device, src the n fp32 values of sf (same configuration) they come from; stops
 * at the first failure. The upload's, and the trainer's refresh from its master weights. */
typedef sf_status (*sf_cuda_tensor_fn)(void *user, sf_bf16 *dst, const float *src, size_t n);
sf_status sf_cuda_weights_each_sysformer(sf_cuda_engine *e, const sf_sysformer *sf,
                                         sf_cuda_tensor_fn fn, void *user);
sf_status sf_cuda_weights_random(sf_cuda_engine *e, uint64_t seed);

/* llm_forward.c: the decoder layers over the step's packed rows (x holds their embeddings; the
 * step layout is in the arena), then the final norm and LM head on each request's last row:
 * logits [n_requests, vocab]. n_tokens and max_q_len are the host's view of the step. */
sf_status sf_cuda_llm_layers(sf_cuda_engine *e, int32_t n_requests, int32_t n_tokens,
                             int32_t max_q_len, cudaStream_t stream);
sf_status sf_cuda_llm_head(sf_cuda_engine *e, int32_t n_requests, cudaStream_t stream);

/* sysformer_forward.c: rewrites the system rows of x [n_tokens, d] (embeddings of a packed
 * guarded batch, in the engine's format: fp16 when embed_f16, else bf16) in place, from device
 * offsets and spans, in the padded layout of sf_cuda_guard_layout. */
sf_status sf_cuda_rewrite_system(sf_cuda_engine *e, int32_t n_requests, int32_t n_tokens,
                                 const int32_t *d_cu_seqlens, const int32_t *d_spans,
                                 int32_t max_system, int32_t max_user, void *x, int *d_errors,
                                 cudaStream_t stream);

/* step.c */
void sf_cuda_graphs_destroy(sf_cuda_engine *e);

#ifdef __cplusplus
}
#endif

#endif
