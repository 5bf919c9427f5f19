/* Internal: the engine's bookkeeping kernels (kernels/guard.cu): turning a step's packed
 * offsets, prompt spans and KV-slot lengths into the row indices, positions and attention
 * offsets the other kernels read, on the device, so a step needs no host round trip and a
 * decode step can be replayed as a CUDA graph. CPU twins: the loops of host/model/guarded.c
 * and host/model/forward_cpu.c that compute the same indices. Device pointers; each launcher
 * enqueues on the given stream, never synchronises, validates what it can on the host
 * (SF_ERR_INVALID_ARGUMENT) and returns SF_ERR_CUDA when the launch fails. */
#ifndef SF_KERNELS_GUARD_H
#define SF_KERNELS_GUARD_H

#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The Sysformer's view of a packed guarded batch, in a padded layout of max_system query rows
 * and max_user key rows per request. For request r with spans (prefix, system, middle, user,
 * suffix) over packed rows [cu_seqlens[r], cu_seqlens[r+1]) of a batch of n_tokens rows:
 *   valid   = rows inside the batch (0 <= cu_seqlens[r] <= cu_seqlens[r+1] <= n_tokens: the
 *             offsets are device memory, so a caller's hostile ones must not become rows
 *             outside it), spans non-negative, adding up to the request's length,
 *             system <= max_system, user <= max_user, not (system > 0 and user == 0), and,
 *             when system_rows > 0 (a module with a learned system offset of that many rows),
 *             system 0 or exactly system_rows;
 *   sys_rows[r * max_system + i]  = cu_seqlens[r] + prefix + i      for i < system, else -1
 *   user_rows[r * max_user + j]   = cu_seqlens[r] + prefix + system + middle + j  (j < user)
 *   cu_sys[r] = r * max_system, cu_user[r] = r * max_user (r <= n_requests)
 *   sys_len[r] = system, user_len[r] = user  (both 0 for an invalid request)
 * An invalid request is left unrewritten and, when errors is not NULL, increments *errors.
 * max_system, max_user, system_rows >= 0; n_requests < 65536. */
sf_status sf_cuda_guard_layout(const int32_t *cu_seqlens, const int32_t *spans, int32_t n_requests,
                               int32_t n_tokens, int32_t max_system, int32_t max_user,
                               int32_t system_rows, int32_t *sys_rows, int32_t *user_rows,
                               int32_t *cu_sys, int32_t *cu_user, int32_t *sys_len,
                               int32_t *user_len, int *errors, cudaStream_t stream);

/* Per request r: flags[r] = why sf_cuda_guard_layout would not rewrite it (SF_GUARD_BAD_OFFSETS,
 * _BAD_SPANS, _TOO_LONG of sysformer.h; the span flags only when spans is not NULL: a batch
 * with a Sysformer), | SF_GUARD_BAD_TOKEN when one of its rows (those inside [0, n_tokens))
 * holds an id outside [0, vocab); 0 for a request guarded as asked. Same argument limits as
 * sf_cuda_guard_layout. */
sf_status sf_cuda_guard_check_flags(const int32_t *cu_seqlens, const int32_t *spans,
                                    const int32_t *ids, int32_t n_requests, int32_t n_tokens,
                                    int32_t vocab, int32_t max_system, int32_t max_user,
                                    int32_t system_rows, int32_t *flags, cudaStream_t stream);

/* dst[i, :] = src[rows[i], :] (rows of dim bf16; src row stride src_stride, dst dst_stride), or
 * zeros where rows[i] < 0. n <= INT32_MAX. */
sf_status sf_cuda_gather_rows_bf16(sf_bf16 *dst, int64_t dst_stride, const sf_bf16 *src,
                                   int64_t src_stride, const int32_t *rows, int64_t n, int64_t dim,
                                   cudaStream_t stream);

/* dst[rows[i], :] = src[i, :] for rows[i] >= 0 (strides as above). Rows must be distinct. */
sf_status sf_cuda_scatter_rows_bf16(sf_bf16 *dst, int64_t dst_stride, const sf_bf16 *src,
                                    int64_t src_stride, const int32_t *rows, int64_t n,
                                    int64_t dim, cudaStream_t stream);

/* The same two moves between the 16-bit formats, for an engine whose embeddings are fp16
 * (SF_EMBEDDING_F16): each value is rounded to nearest, ties to even (an fp16 value past bf16's
 * 8 significant bits rounds; a bf16 one with |x| >= 65520 becomes +-inf, as torch's
 * .to(torch.float16)). The gather writes zeros for rows[i] < 0; the scatter skips them. */
sf_status sf_cuda_gather_rows_f16_to_bf16(sf_bf16 *dst, int64_t dst_stride, const sf_f16 *src,
                                          int64_t src_stride, const int32_t *rows, int64_t n,
                                          int64_t dim, cudaStream_t stream);
sf_status sf_cuda_scatter_rows_bf16_to_f16(sf_f16 *dst, int64_t dst_stride, const sf_bf16 *src,
                                           int64_t src_stride, const int32_t *rows, int64_t n,
                                           int64_t dim, cudaStream_t stream);

/* One step's per-row and per-request indices from the slots' lengths, then the lengths
 * advanced. Request r (slot s = slots[r], L = slot_len[s], new tokens n_r = cu_seqlens[r+1] -
 * cu_seqlens[r], or 1 each when cu_seqlens is NULL: a decode step) gets, for its packed rows
 * t = cu_seqlens[r] + i:
 *   positions[t] = L + i;   kv_rows[t] = s * max_context + L + i   (its K/V cache row)
 *   rope_table[t] = (L + n_r > long_after) ? 1 : 0   (longrope's switch; NULL: not written)
 * and per request: cu_q[r] = cu_seqlens[r] (also cu_q[n]), cu_kv[r] = s * max_context,
 * kv_len[r] = L + n_r, q_pos0[r] = L, last_row[r] = cu_seqlens[r+1] - 1; then slot_len[s] =
 * L + n_r. In a decode step (cu_seqlens NULL) also ids[r] = slot_next[s]: the token sampled for
 * the slot by the previous step. The host has checked that the slots are distinct and that
 * L + n_r <= max_context. */
sf_status sf_cuda_step_layout(const int32_t *slots, const int32_t *cu_seqlens, int32_t n_requests,
                              int32_t *slot_len, int32_t max_context, int32_t long_after,
                              const int32_t *slot_next, int32_t *ids, int32_t *positions,
                              int32_t *kv_rows, int32_t *rope_table, int32_t *cu_q,
                              int32_t *cu_kv, int32_t *kv_len, int32_t *q_pos0,
                              int32_t *last_row, cudaStream_t stream);

/* slot_next[slots[r]] = tokens[r] for r < n_requests. */
sf_status sf_cuda_store_next(int32_t *slot_next, const int32_t *slots, const int32_t *tokens,
                             int32_t n_requests, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
