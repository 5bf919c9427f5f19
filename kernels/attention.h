/* Internal: fused scaled-dot-product attention on bf16 tensors (flash-style online softmax, fp32
 * statistics and accumulation, tensor cores), forward (attention.cu) and backward
 * (attention_backward.cu). CPU twins: sf_cpu_attention and sf_cpu_attention_backward in
 * host/cpu/attention.c, whose semantics hold per request. */
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
 * written (and, when lse is given, their lse entries); out must not alias q, k or v.
 * Asynchronous on stream; never synchronises. Zero-initialise the struct: fields added later
 * (such as lse) then keep their off state. */
typedef struct sf_attention_args {
    sf_bf16 *out;         /* [rows, out_stride] (device)                                   */
    float *lse;           /* [rows, n_heads] fp32 (device) or NULL. Given: lse[i * n_heads + h]
                             = ln sum_j exp(scale * q_ih . k_j) over the keys query i sees (the
                             maximum included, natural log; -inf when it sees none), which the
                             backward needs. NULL: not computed, and the forward runs exactly
                             the code it runs without the option.                            */
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
    /* Decode (max_q_len == 1, at most 8 query heads per kv head, no lse) splits each
     * request's keys over several blocks (attention_decode.cu) when max_kv_len > 0 bounds
     * every request's visible key count (the engine passes its context length, a host value,
     * so a captured graph stays valid) and a workspace of sf_cuda_attention_workspace_bytes
     * (16-byte aligned; none needed when that is 0) is given; otherwise decode runs in the
     * tiled kernel, with the same results up to rounding. Keys past max_kv_len are not seen. */
    int32_t max_kv_len;
    float *workspace;       /* (device) scratch for the split decode, or NULL                 */
    size_t workspace_bytes;
    /* The tiled kernel sf_cuda_attention_bf16 runs: SF_ATTENTION_AUTO (0) and
     * SF_ATTENTION_MMA its own mma.sync kernel, SF_ATTENTION_WGMMA sf_cuda_attention_sm90_bf16
     * and SF_ATTENTION_WGMMA_WS sf_cuda_attention_sm90_ws_bf16 (with their requirements). A
     * split decode runs in attention_decode.cu either way. */
    sf_attention_kernel kernel;
} sf_attention_args;

/* Bytes of workspace the split decode needs for *a (0: none, or not a split decode). */
size_t sf_cuda_attention_workspace_bytes(const sf_attention_args *a);

/* Internal to the attention family (attention_decode.cu): whether *a is a decode the split
 * kernel takes, and that kernel's launcher (arguments already checked by
 * sf_cuda_attention_bf16, which calls it). */
bool sf_attention_decode_applies(const sf_attention_args *a);
sf_status sf_cuda_attention_decode_bf16(const sf_attention_args *a, cudaStream_t stream);

/* Enqueues the attention described by *a on stream. Returns SF_ERR_INVALID_ARGUMENT /
 * SF_ERR_UNSUPPORTED for arguments outside the requirements above (before touching CUDA),
 * SF_ERR_CUDA when the launch fails, SF_OK otherwise (also when there is nothing to do). */
sf_status sf_cuda_attention_bf16(const sf_attention_args *a, cudaStream_t stream);

/* The same forward on Hopper's warpgroup tensor-core instruction (attention_sm90.cu): the
 * arguments, results (up to rounding: its fp32 sums run in another order) and errors of
 * sf_cuda_attention_bf16, with every case in the tiled kernel (decode too; a->kernel is only
 * validated), plus SF_ERR_UNSUPPORTED when sf_cuda_attention_sm90_check fails. Not yet run on a GPU,
 * so sf_cuda_attention_bf16 runs it only when asked (a->kernel). */
sf_status sf_cuda_attention_sm90_bf16(const sf_attention_args *a, cudaStream_t stream);

/* sf_cuda_attention_sm90_bf16 with key tiles of block_n keys: 64, 96 or 128 (0: the default, 128);
 * anything else is SF_ERR_INVALID_ARGUMENT. For tests and bench_attention to compare them. */
sf_status sf_cuda_attention_sm90_tiles_bf16(const sf_attention_args *a, int32_t block_n,
                                            cudaStream_t stream);

/* The same on a warp-specialized schedule (attention_sm90.cu's second kernel): a producer
 * warpgroup copies K and V through mbarriers while two consumer warpgroups take turns on the
 * tensor cores. Tiles of block_n keys as in sf_cuda_attention_sm90_tiles_bf16; the same
 * arguments, results up to rounding and errors. Not yet run on a GPU: for tests and benchmarks
 * to compare with the pipelined kernel, and for the engine when asked (SF_ATTENTION_WGMMA_WS). */
sf_status sf_cuda_attention_sm90_ws_bf16(const sf_attention_args *a, int32_t block_n,
                                         cudaStream_t stream);

/* SF_OK when sf_cuda_attention_sm90_bf16 can run on the current device; SF_ERR_UNSUPPORTED
 * saying why not (the library was built without sm_90, or the device is not of compute
 * capability 9.0); SF_ERR_CUDA when the device cannot be queried. */
sf_status sf_cuda_attention_sm90_check(void);

/* Test support for the Hopper kernels: one warpgroup's two products alone, S = Q K^T and
 * O = P V, through the kernels' own operand placement, descriptors, P fragments and accumulator
 * layouts, with no softmax or masking; so a test can tell which operand the tensor cores read
 * otherwise than the kernels assume. Device pointers, row-major: q [64 x head_dim], k and v
 * [block_n x head_dim], p [64 x block_n] (bf16 bits; q, k, v 16-byte aligned); out s
 * [64 x block_n] and o [64 x head_dim] (fp32). head_dim 64, 80, 96 or 128, block_n 64, 96 or 128
 * (SF_ERR_INVALID_ARGUMENT otherwise); sf_cuda_attention_sm90_check's errors; asynchronous on
 * stream. */
sf_status sf_cuda_wgmma_products_bf16(int32_t head_dim, int32_t block_n, const uint16_t *q,
                                      const uint16_t *k, const uint16_t *v, const uint16_t *p,
                                      float *s, float *o, cudaStream_t stream);

/* The forward's requirements on *a, in two halves shared by both launchers: the counts, heads,
 * head dim, strides and scale; then the pointers, alignment and grid limits (a launcher with
 * nothing to do returns in between). Each returns SF_OK or fails naming fn. */
sf_status sf_attention_check_shapes(const sf_attention_args *a, const char *fn);
sf_status sf_attention_check_tensors(const sf_attention_args *a, const char *fn);

/* The backward of sf_cuda_attention_bf16: given the forward's arguments *a (the same q, k, v,
 * offsets, masking, scale; a->out and a->lse as that forward wrote them, lse required) and the
 * gradient dout of out, writes dq, dk, dv as fp32 (a training loop keeps gradients in fp32, and
 * dq is accumulated there anyway). Semantics per request as sf_cpu_attention_backward: each kv
 * head's dk, dv sum over the query heads of its GQA group.
 *
 * Layout of the gradients: dq [rows, dq_stride] like q (query head h of row i at
 * dq + i * dq_stride + h * head_dim); dk, dv [kv rows, dkv_stride] like k and v. Written:
 *   dq: every row of every request's queries (=), head values only (stride padding untouched);
 *   dk, dv: the kv_len rows of every request's keys (=), zeros for keys no query sees; rows in
 *   gaps between the requests' keys are untouched. Requests' key rows must not overlap.
 * delta is scratch of the size of lse, [rows, n_heads] fp32: D = rowsum(dout * out) per
 * (query, head), written by the first kernel, read by the second.
 *
 * Determinism: dk and dv are each summed by one thread block in a fixed order (bit-reproducible).
 * By default dq is summed across key blocks with fp32 atomic adds, so its last bits can change
 * from run to run with the order in which the blocks finish (the values stay within the derived
 * tolerance). With deterministic set, a third kernel computes dq instead, one thread block per
 * tile of queries walking over their keys in order, so every output is the same bits on every
 * run; it recomputes S, P and dP for that (7 matrix products instead of 5). It double-buffers
 * its K and V blocks where a block's shared memory allows (up to 104 KB at head dim 128), else
 * single-buffers them (68 KB at head dim 128; SF_ERR_UNSUPPORTED, before anything is enqueued,
 * on a device that allows less).
 *
 * Requirements, checked before any CUDA call, on top of the forward's (a->out, a->q, a->k, a->v
 * as there): a->lse, dout, dq, dk, dv and delta non-NULL; dout 16-byte aligned with dout_stride
 * >= n_heads * head_dim and a multiple of 8; dq, dk, dv 16-byte aligned, dq_stride >= n_heads *
 * head_dim, dkv_stride >= n_kv_heads * head_dim, both multiples of 4; max_kv_len >= 0 bounding
 * every request's key count (keys past it get no gradient); max_q_len * n_heads < 2^31 - 256.
 * Decode (one query against a cache) works too, but nothing here is tuned for it. */
typedef struct sf_attention_grads {
    const sf_bf16 *dout; /* [rows, dout_stride] (device) gradient of out                      */
    float *dq;           /* [rows, dq_stride] (device)                                         */
    float *dk;           /* [kv rows, dkv_stride] (device)                                     */
    float *dv;           /* [kv rows, dkv_stride] (device)                                     */
    float *delta;        /* [rows, n_heads] (device) scratch                                   */
    int64_t dout_stride; /* elements between consecutive rows of dout                          */
    int64_t dq_stride;   /* elements between consecutive rows of dq                            */
    int64_t dkv_stride;  /* elements between consecutive rows of dk and of dv                  */
    int32_t max_kv_len;  /* upper bound on every request's key count, sizes the grid           */
    bool deterministic;  /* dq by a separate pass, not atomics: bit-reproducible (see above)   */
} sf_attention_grads;

/* Enqueues the backward on stream (two kernels; three when deterministic). Returns
 * SF_ERR_INVALID_ARGUMENT / SF_ERR_UNSUPPORTED for arguments outside the requirements (before
 * touching CUDA), SF_ERR_CUDA when a launch fails, SF_OK otherwise. Asynchronous; never
 * synchronises. */
sf_status sf_cuda_attention_backward_bf16(const sf_attention_args *a, const sf_attention_grads *g,
                                          cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
