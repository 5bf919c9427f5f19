/* cuDNN's fused scaled-dot-product attention (flash forward, inference: no stats output, no
 * dropout), built with cuDNN's backend API (cudnn_graph.h) in bench/cudnn_attention.cu: the peer
 * bench_attention measures sf_cuda_attention_bf16 against on the same buffers. Bench code only:
 * libsysformer does not depend on cuDNN, and CMake compiles this pair into bench_attention only
 * when it finds cuDNN (SF_BENCH_HAVE_CUDNN).
 *
 * Layout: our packed one, every request the same length. Q and O are [batch, s_q] token rows of
 * n_heads * head_dim bf16 values (head after head), K and V [batch, s_kv] rows of
 * n_kv_heads * head_dim, all contiguous; query head h reads kv head h / (n_heads / n_kv_heads).
 * To cuDNN that is Q, O = [b, h, s_q, d] with strides [s_q*h*d, d, h*d, 1] and K, V =
 * [b, h_kv, s_kv, d] with strides [s_kv*h_kv*d, d, h_kv*d, 1].
 *
 * Errors: every function that can fail returns false and writes a message naming the step and
 * cuDNN's status (cudnnGetErrorString, plus cudnnGetLastErrorString when it has one) to err.
 * Nothing prints, exits or aborts, and a failed call leaks nothing. */
#ifndef SF_BENCH_CUDNN_ATTENTION_H
#define SF_BENCH_CUDNN_ATTENTION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cudnn_sdpa_shape {
    int64_t batch;      /* requests, all of the same length                                */
    int64_t n_heads;    /* query (and output) heads                                        */
    int64_t n_kv_heads; /* key/value heads; divides n_heads (GQA)                          */
    int64_t s_q;        /* queries per request                                             */
    int64_t s_kv;       /* keys (and values) per request                                   */
    int64_t head_dim;   /* a multiple of 8 (16-byte rows)                                  */
    bool causal;        /* top-left aligned: query i sees keys 0..i; needs s_q == s_kv.
                           false: every query sees every key of its request               */
    float scale;        /* multiplies q . k before the softmax                             */
} cudnn_sdpa_shape;

/* A finalized execution plan for one shape, with the cuDNN handle it runs on. */
typedef struct cudnn_sdpa_plan cudnn_sdpa_plan;

/* Builds the operation graph for shape, asks cuDNN's heuristics for engine configurations and
 * keeps those whose execution plans finalize, in the heuristic's order, up to 4 candidates; the
 * first is selected. Needs a CUDA device. On success *plan owns everything (free it with
 * cudnn_sdpa_destroy); on failure *plan is NULL. */
bool cudnn_sdpa_create(const cudnn_sdpa_shape *shape, cudnn_sdpa_plan **plan, char *err,
                       size_t err_len);

/* Device workspace bytes cudnn_sdpa_run needs with any candidate selected (may be 0). */
int64_t cudnn_sdpa_workspace_bytes(const cudnn_sdpa_plan *plan);

/* How many candidate plans the plan holds (at least 1), and which one cudnn_sdpa_run executes
 * (false for an index out of range; the selection is then unchanged). A caller that wants
 * cuDNN at its best times each and selects the fastest, as cuDNN's own frontend's autotuning
 * does. */
int cudnn_sdpa_candidates(const cudnn_sdpa_plan *plan);
bool cudnn_sdpa_select(cudnn_sdpa_plan *plan, int i);

/* Enqueues out = softmax(scale * q k^T [masked]) v on stream; asynchronous, never synchronises.
 * Pointers are device pointers in the layout above (16-byte aligned; out must not alias the
 * inputs); workspace holds cudnn_sdpa_workspace_bytes (NULL when that is 0). The variant pack is
 * rebuilt only when the pointers differ from the previous call, so repeated calls with the same
 * buffers cost cuDNN's execute alone. */
bool cudnn_sdpa_run(cudnn_sdpa_plan *plan, void *out, const void *q, const void *k, const void *v,
                    void *workspace, cudaStream_t stream, char *err, size_t err_len);

/* Frees the plan and its handle; NULL is ignored. */
void cudnn_sdpa_destroy(cudnn_sdpa_plan *plan);

/* "cuDNN <runtime version> (headers <compile-time version>)" into buf. */
void cudnn_sdpa_version_string(char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* SF_BENCH_CUDNN_ATTENTION_H */
