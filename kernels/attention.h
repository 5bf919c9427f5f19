/* Internal: fused scaled-dot-product attention on bf16 tensors (flash-style online softmax, fp32
 * statistics and accumulation, tensor cores). CPU twin: sf_cpu_attention in host/cpu/attention.c,
 * whose semantics hold per request. */
#ifndef SF_KERNELS_ATTENTION_H
#define SF_KERNELS_ATTENTION_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One launch attends a batch of independent requests packed row after row ("varlen"): request r
 * owns query rows cu_q[r] .. cu_q[r+1]-1 of q and out, and key/value rows cu_kv[r] .. cu_kv[r+1]-1
 * of k and v. A row holds the heads one after another, head_dim values each: query head h of row
 * i starts at q + i * q_stride + h * head_dim; kv head g of row j at k + j * kv_stride +
 * g * head_dim (v likewise). Query head h reads kv head h / (n_heads / n_kv_heads).
 *
 * Masking, per request, exactly as sf_cpu_attention: query i of request r sits at position
 * q_pos0[r] + i (q_pos0 == NULL: 0), key j (counted from the request's first kv row) at j.
 *   causal:  key j is visible when j <= pos, and, when window > 0, also pos - j < window.
 *   !causal: every key of the request (q_pos0 and window ignored).
 * A query that sees no key gets zeros. One struct covers:
 *   - causal packed prefill:      cu_kv == cu_q, q_pos0 == NULL;
 *   - chunked prefill / decode against a KV cache: k, v = the cache rows (the new tokens'
 *     included), q_pos0[r] = position of the request's first new token (decode: one query);
 *   - bidirectional self-attention (!causal, cu_kv == cu_q);
 *   - cross-attention (!causal, other q and kv lengths).
 *
 * Requirements (checked on the host, before any CUDA call):
 *   head_dim in {64, 80, 96, 128}, otherwise SF_ERR_UNSUPPORTED;
 *   n_heads, n_kv_heads > 0 and n_kv_heads divides n_heads; n_requests, max_q_len >= 0;
 *   strides at least one row of heads (q/out: n_heads * head_dim, kv: n_kv_heads * head_dim),
 *   otherwise SF_ERR_INVALID_ARGUMENT;
 *   pointers 16-byte aligned and strides multiples of 8 elements (16-byte row chunks),
 *   n_requests and n_kv_heads <= 65535, max_q_len * (n_heads / n_kv_heads) < 2^31 - 256,
 *   otherwise SF_ERR_UNSUPPORTED.
 * max_q_len must bound every request's query count: rows past it are not computed. The offsets
 * live on the device and are not validated: they must be non-decreasing and inside the tensors.
 * Only the out rows of the requests' queries (first n_heads * head_dim values of each) are
 * written; out must not alias q, k or v. Asynchronous on stream; never synchronises. */
typedef struct sf_attention_args {
    sf_bf16 *out;         /* [rows, out_stride] (device)                                   */
    const sf_bf16 *q;     /* [rows, q_stride] (device)                                     */
    const sf_bf16 *k;     /* [kv rows, kv_stride] (device)                                 */
    const sf_bf16 *v;     /* [kv rows, kv_stride] (device)                                 */
    const int32_t *cu_q;  /* [n_requests + 1] first query row of each request, then the end */
    const int32_t *cu_kv; /* [n_requests + 1] first key/value row of each request, then end */
    const int32_t *kv_len; /* [n_requests] or NULL: request r's keys are the kv_len[r] rows from
                              cu_kv[r] (then cu_kv[n_requests] is not read), so requests can
                              sit in fixed KV-cache slots with gaps between them; NULL:
                              cu_kv[r+1] - cu_kv[r]                                          */
    const int32_t *q_pos0; /* [n_requests] position of each request's first query; NULL = 0 */
    int32_t n_requests;
    int32_t max_q_len; /* upper bound on cu_q[r+1] - cu_q[r], sizes the grid */
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int64_t q_stride;   /* elements between consecutive query rows                          */
    int64_t kv_stride;  /* elements between consecutive key rows (and value rows)           */
    int64_t out_stride; /* elements between consecutive output rows                         */
    bool causal;
    int32_t window; /* > 0: sliding window (causal only); <= 0: none                        */
    float scale;    /* multiplies q . k before the softmax, usually 1 / sqrt(head_dim)      */
} sf_attention_args;

/* Enqueues the attention described by *a on stream. Returns SF_ERR_INVALID_ARGUMENT /
 * SF_ERR_UNSUPPORTED for arguments outside the requirements above (before touching CUDA),
 * SF_ERR_CUDA when the launch fails, SF_OK otherwise (also when there is nothing to do). */
sf_status sf_cuda_attention_bf16(const sf_attention_args *a, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
