// The engine's bookkeeping kernels: row indices, positions and attention offsets of a step,
// computed on the device from device inputs. CPU twins: the index loops of
// host/model/guarded.c (spans -> system/user rows) and host/model/forward_cpu.c (positions,
// cache rows). These are tiny (a few thousand integers); what matters is that they keep the
// host out of the step, not their speed.
#include <cuda_bf16.h>

#include "bf16_vec.cuh"
#include "cuda_check.cuh"
#include "guard.h"

namespace {

constexpr int kBlock = 128;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// SF_GUARD_BAD_OFFSETS when request r's rows are not inside the batch [0, n_tokens).
__device__ int offset_flags(const int32_t *__restrict__ cu_seqlens, int32_t r, int32_t n_tokens) {
    const int32_t begin = cu_seqlens[r], end = cu_seqlens[r + 1];
    return begin < 0 || end < begin || end > n_tokens ? SF_GUARD_BAD_OFFSETS : 0;
}

// Why request r of a guarded batch is not rewritten (SF_GUARD_BAD_* of sysformer.h; 0: it is),
// from its offsets and spans alone (sf_cuda_guard_layout's validity). int64 sums: hostile spans
// must not overflow into a false "valid".
__device__ int request_flags(const int32_t *__restrict__ cu_seqlens,
                             const int32_t *__restrict__ spans, int32_t r, int32_t n_tokens,
                             int32_t max_system, int32_t max_user, int32_t system_rows) {
    const int32_t begin = cu_seqlens[r], end = cu_seqlens[r + 1];
    const int32_t prefix = spans[5 * r + 0], system = spans[5 * r + 1], middle = spans[5 * r + 2],
                  user = spans[5 * r + 3], suffix = spans[5 * r + 4];
    const int64_t sum = (int64_t)prefix + system + middle + user + suffix;
    int flags = offset_flags(cu_seqlens, r, n_tokens);
    if (prefix < 0 || system < 0 || middle < 0 || user < 0 || suffix < 0 ||
        sum != (int64_t)end - begin || (system > 0 && user == 0) ||
        (system_rows > 0 && system != 0 && system != system_rows)) {
        flags |= SF_GUARD_BAD_SPANS;
    }
    if (system > max_system || user > max_user) flags |= SF_GUARD_TOO_LONG;
    return flags;
}

// One block per request.
__global__ void __launch_bounds__(kBlock)
    guard_layout_kernel(const int32_t *__restrict__ cu_seqlens, const int32_t *__restrict__ spans,
                        int32_t n_requests, int32_t n_tokens, int32_t max_system,
                        int32_t max_user, int32_t system_rows, int32_t *__restrict__ sys_rows,
                        int32_t *__restrict__ user_rows, int32_t *__restrict__ cu_sys,
                        int32_t *__restrict__ cu_user, int32_t *__restrict__ sys_len,
                        int32_t *__restrict__ user_len, int *__restrict__ errors) {
    const int32_t r = blockIdx.x;
    const bool valid = request_flags(cu_seqlens, spans, r, n_tokens, max_system, max_user,
                                     system_rows) == 0;
    const int32_t begin = cu_seqlens[r], prefix = spans[5 * r + 0], system = spans[5 * r + 1],
                  middle = spans[5 * r + 2], user = spans[5 * r + 3];
    const int32_t ns = valid ? system : 0, nu = valid ? user : 0;
    const int32_t sys0 = begin + (valid ? prefix : 0);
    const int32_t user0 = sys0 + (valid ? system + middle : 0);
    for (int32_t i = threadIdx.x; i < max_system; i += blockDim.x) {
        sys_rows[(int64_t)r * max_system + i] = i < ns ? sys0 + i : -1;
    }
    for (int32_t j = threadIdx.x; j < max_user; j += blockDim.x) {
        user_rows[(int64_t)r * max_user + j] = j < nu ? user0 + j : -1;
    }
    if (threadIdx.x == 0) {
        sys_len[r] = ns;
        user_len[r] = nu;
        cu_sys[r] = r * max_system;
        cu_user[r] = r * max_user;
        if (r == n_requests - 1) {
            cu_sys[n_requests] = n_requests * max_system;
            cu_user[n_requests] = n_requests * max_user;
        }
        if (!valid && errors) atomicAdd(errors, 1);
    }
}

// One block per request: request_flags (spans only with a Sysformer), and SF_GUARD_BAD_TOKEN
// when one of its rows holds an id outside [0, vocab). Rows are read only inside [0, n_tokens).
__global__ void __launch_bounds__(kBlock)
    guard_check_kernel(const int32_t *__restrict__ cu_seqlens, const int32_t *__restrict__ spans,
                       const int32_t *__restrict__ ids, int32_t n_tokens, int32_t vocab,
                       int32_t max_system, int32_t max_user, int32_t system_rows,
                       int32_t *__restrict__ flags_out) {
    __shared__ int bad_token;
    const int32_t r = blockIdx.x;
    if (threadIdx.x == 0) bad_token = 0;
    __syncthreads();
    const int32_t begin = max(cu_seqlens[r], 0), end = min(cu_seqlens[r + 1], n_tokens);
    for (int32_t i = begin + (int32_t)threadIdx.x; i < end; i += blockDim.x) {
        if (ids[i] < 0 || ids[i] >= vocab) atomicOr(&bad_token, (int)SF_GUARD_BAD_TOKEN);
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    flags_out[r] = bad_token | (spans ? request_flags(cu_seqlens, spans, r, n_tokens, max_system,
                                                      max_user, system_rows)
                                      : offset_flags(cu_seqlens, r, n_tokens));
}

// What move_rows_kernel does to each value on the way: Same copies the bits; Convert<From, To>
// rounds from one 16-bit float format to the other (sf_vec::Bf16, sf_vec::F16), one value or the
// 8 of a uint4. A zero row is +0 in both formats.
struct Same {
    template <typename T>
    __device__ T operator()(T x) const {
        return x;
    }
};

template <class From, class To>
struct Convert {
    __device__ uint16_t operator()(uint16_t x) const { return To::from_f32(From::to_f32(x)); }
    __device__ uint32_t pair(uint32_t w) const {
        return To::pack2(From::to_f32((uint16_t)(w & 0xffffu)), From::to_f32((uint16_t)(w >> 16)));
    }
    __device__ uint4 operator()(uint4 x) const {
        return make_uint4(pair(x.x), pair(x.y), pair(x.z), pair(x.w));
    }
};

// One block per row, T = uint4 (8 values, when the rows are 16-byte aligned) or uint16_t: row i
// of src to row rows[i] of dst (scatter), or row rows[i] of src to row i of dst (gather), each
// value through Conv. A negative index skips the row (scatter) or writes zeros (gather). Strides
// are in T.
template <typename T, bool kScatter, class Conv>
__global__ void __launch_bounds__(kBlock)
    move_rows_kernel(T *__restrict__ dst, int64_t dst_stride, const T *__restrict__ src,
                     int64_t src_stride, const int32_t *__restrict__ rows, int64_t dim) {
    const int64_t i = blockIdx.x;
    const int32_t r = rows[i];
    if (kScatter && r < 0) return;
    T *d = dst + (kScatter ? (int64_t)r : i) * dst_stride;
    const T *from = src + (kScatter ? i : (int64_t)r) * src_stride;
    const Conv conv;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) d[c] = r >= 0 ? conv(from[c]) : T{};
}

// One block per request. Every thread reads the slot's length before thread 0 advances it.
__global__ void __launch_bounds__(kBlock)
    step_layout_kernel(const int32_t *__restrict__ slots, const int32_t *__restrict__ cu_seqlens,
                       int32_t n_requests, int32_t *__restrict__ slot_len, int32_t max_context,
                       int32_t long_after, const int32_t *__restrict__ slot_next,
                       int32_t *__restrict__ ids, int32_t *__restrict__ positions,
                       int32_t *__restrict__ kv_rows, int32_t *__restrict__ rope_table,
                       int32_t *__restrict__ cu_q, int32_t *__restrict__ cu_kv,
                       int32_t *__restrict__ kv_len, int32_t *__restrict__ q_pos0,
                       int32_t *__restrict__ last_row) {
    const int32_t r = blockIdx.x;
    const int32_t s = slots[r];
    const int32_t begin = cu_seqlens ? cu_seqlens[r] : r;
    const int32_t end = cu_seqlens ? cu_seqlens[r + 1] : r + 1;
    const int32_t len = slot_len[s];
    const int32_t n = end - begin;
    const int32_t table = (len + n > long_after) ? 1 : 0;
    for (int32_t i = threadIdx.x; i < n; i += blockDim.x) {
        positions[begin + i] = len + i;
        kv_rows[begin + i] = s * max_context + len + i;
        if (rope_table) rope_table[begin + i] = table;
    }
    if (threadIdx.x == 0) {
        cu_q[r] = begin;
        if (r == n_requests - 1) cu_q[n_requests] = end;
        cu_kv[r] = s * max_context;
        if (r == n_requests - 1) cu_kv[n_requests] = s * max_context + len + n;
        kv_len[r] = len + n;
        q_pos0[r] = len;
        last_row[r] = end - 1;
        if (!cu_seqlens) ids[r] = slot_next[s];
    }
    __syncthreads();
    if (threadIdx.x == 0) slot_len[s] = len + n;
}

__global__ void store_next_kernel(int32_t *__restrict__ slot_next,
                                  const int32_t *__restrict__ slots,
                                  const int32_t *__restrict__ tokens, int32_t n_requests) {
    const int32_t r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < n_requests) slot_next[slots[r]] = tokens[r];
}

bool rows_vec8(const void *a, int64_t a_stride, const void *b, int64_t b_stride, int64_t dim) {
    return dim % 8 == 0 && a_stride % 8 == 0 && b_stride % 8 == 0 && sf_vec::aligned16(a) &&
           sf_vec::aligned16(b);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

extern "C" sf_status sf_cuda_guard_layout(const int32_t *cu_seqlens, const int32_t *spans,
                                          int32_t n_requests, int32_t n_tokens,
                                          int32_t max_system, int32_t max_user,
                                          int32_t system_rows, int32_t *sys_rows,
                                          int32_t *user_rows, int32_t *cu_sys,
                                          int32_t *cu_user, int32_t *sys_len, int32_t *user_len,
                                          int *errors, cudaStream_t stream) {
    if (n_requests < 0 || n_requests > 65535 || n_tokens < 0 || max_system < 0 || max_user < 0 ||
        system_rows < 0 || (int64_t)n_requests * max_system > 0x7fffffff ||
        (int64_t)n_requests * max_user > 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_guard_layout: n_requests = %d, n_tokens = %d, max_system = %d, "
                       "max_user = %d, system_rows = %d",
                       n_requests, n_tokens, max_system, max_user, system_rows);
    }
    if (n_requests == 0) return SF_OK;
    if (!cu_seqlens || !spans || !sys_rows || !user_rows || !cu_sys || !cu_user || !sys_len ||
        !user_len) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_guard_layout: NULL pointer");
    }
    if (((uintptr_t)cu_seqlens | (uintptr_t)spans | (uintptr_t)sys_rows | (uintptr_t)user_rows |
         (uintptr_t)cu_sys | (uintptr_t)cu_user | (uintptr_t)sys_len | (uintptr_t)user_len |
         (uintptr_t)errors) & 3u) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_guard_layout: an int array not 4-byte aligned");
    }
    sf_nvtx_range range("sf_cuda_guard_layout");
    guard_layout_kernel<<<n_requests, kBlock, 0, stream>>>(cu_seqlens, spans, n_requests,
                                                           n_tokens, max_system, max_user,
                                                           system_rows,
                                                           sys_rows, user_rows, cu_sys, cu_user,
                                                           sys_len, user_len, errors);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_guard_check_flags(const int32_t *cu_seqlens, const int32_t *spans,
                                               const int32_t *ids, int32_t n_requests,
                                               int32_t n_tokens, int32_t vocab,
                                               int32_t max_system, int32_t max_user,
                                               int32_t system_rows, int32_t *flags,
                                               cudaStream_t stream) {
    if (n_requests < 0 || n_requests > 65535 || n_tokens < 0 || vocab < 0 || max_system < 0 ||
        max_user < 0 || system_rows < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_guard_check_flags: n_requests = %d, n_tokens = %d, vocab = %d, "
                       "max_system = %d, max_user = %d, system_rows = %d",
                       n_requests, n_tokens, vocab, max_system, max_user, system_rows);
    }
    if (n_requests == 0) return SF_OK;
    if (!cu_seqlens || !flags || (n_tokens > 0 && !ids)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_guard_check_flags: NULL pointer");
    }
    if (((uintptr_t)cu_seqlens | (uintptr_t)spans | (uintptr_t)ids | (uintptr_t)flags) & 3u) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_guard_check_flags: an int array not 4-byte aligned");
    }
    sf_nvtx_range range("sf_cuda_guard_check_flags");
    guard_check_kernel<<<n_requests, kBlock, 0, stream>>>(cu_seqlens, spans, ids, n_tokens, vocab,
                                                          max_system, max_user, system_rows,
                                                          flags);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

static sf_status rows_args(const char *fn, const void *dst, int64_t dst_stride, const void *src,
                           int64_t src_stride, const int32_t *rows, int64_t n, int64_t dim) {
    if (n < 0 || n > 0x7fffffff || dim < 0 || dst_stride < dim || src_stride < dim) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "%s: n = %lld, dim = %lld, strides %lld / %lld", fn, (long long)n,
                       (long long)dim, (long long)dst_stride, (long long)src_stride);
    }
    if (n > 0 && dim > 0 && (!dst || !src || !rows)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", fn);
    }
    if ((((uintptr_t)dst | (uintptr_t)src) & 1u) || ((uintptr_t)rows & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    return SF_OK;
}

template <bool kScatter, class Conv>
static sf_status move_rows(const char *fn, uint16_t *dst, int64_t dst_stride, const uint16_t *src,
                           int64_t src_stride, const int32_t *rows, int64_t n, int64_t dim,
                           cudaStream_t stream) {
    sf_status st = rows_args(fn, dst, dst_stride, src, src_stride, rows, n, dim);
    if (st != SF_OK || n == 0 || dim == 0) return st;
    sf_nvtx_range range(fn);
    if (rows_vec8(dst, dst_stride, src, src_stride, dim)) {
        move_rows_kernel<uint4, kScatter, Conv><<<(unsigned)n, kBlock, 0, stream>>>(
            reinterpret_cast<uint4 *>(dst), dst_stride / 8,
            reinterpret_cast<const uint4 *>(src), src_stride / 8, rows, dim / 8);
    } else {
        move_rows_kernel<uint16_t, kScatter, Conv><<<(unsigned)n, kBlock, 0, stream>>>(
            dst, dst_stride, src, src_stride, rows, dim);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_gather_rows_bf16(sf_bf16 *dst, int64_t dst_stride,
                                              const sf_bf16 *src, int64_t src_stride,
                                              const int32_t *rows, int64_t n, int64_t dim,
                                              cudaStream_t stream) {
    return move_rows<false, Same>("sf_cuda_gather_rows_bf16", dst, dst_stride, src, src_stride,
                                  rows, n, dim, stream);
}

extern "C" sf_status sf_cuda_scatter_rows_bf16(sf_bf16 *dst, int64_t dst_stride,
                                               const sf_bf16 *src, int64_t src_stride,
                                               const int32_t *rows, int64_t n, int64_t dim,
                                               cudaStream_t stream) {
    return move_rows<true, Same>("sf_cuda_scatter_rows_bf16", dst, dst_stride, src, src_stride,
                                 rows, n, dim, stream);
}

extern "C" sf_status sf_cuda_gather_rows_f16_to_bf16(sf_bf16 *dst, int64_t dst_stride,
                                                     const sf_f16 *src, int64_t src_stride,
                                                     const int32_t *rows, int64_t n,
                                                     int64_t dim, cudaStream_t stream) {
    return move_rows<false, Convert<sf_vec::F16, sf_vec::Bf16>>(
        "sf_cuda_gather_rows_f16_to_bf16", dst, dst_stride, src, src_stride, rows, n, dim, stream);
}

extern "C" sf_status sf_cuda_scatter_rows_bf16_to_f16(sf_f16 *dst, int64_t dst_stride,
                                                      const sf_bf16 *src, int64_t src_stride,
                                                      const int32_t *rows, int64_t n,
                                                      int64_t dim, cudaStream_t stream) {
    return move_rows<true, Convert<sf_vec::Bf16, sf_vec::F16>>(
        "sf_cuda_scatter_rows_bf16_to_f16", dst, dst_stride, src, src_stride, rows, n, dim,
        stream);
}

extern "C" sf_status sf_cuda_step_layout(const int32_t *slots, const int32_t *cu_seqlens,
                                         int32_t n_requests, int32_t *slot_len,
                                         int32_t max_context, int32_t long_after,
                                         const int32_t *slot_next, int32_t *ids,
                                         int32_t *positions, int32_t *kv_rows,
                                         int32_t *rope_table, int32_t *cu_q, int32_t *cu_kv,
                                         int32_t *kv_len, int32_t *q_pos0, int32_t *last_row,
                                         cudaStream_t stream) {
    if (n_requests < 0 || n_requests > 65535 || max_context <= 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_step_layout: n_requests = %d, max_context = %d", n_requests,
                       max_context);
    }
    if (n_requests == 0) return SF_OK;
    if (!slots || !slot_len || !positions || !kv_rows || !cu_q || !cu_kv || !kv_len || !q_pos0 ||
        !last_row || (!cu_seqlens && (!slot_next || !ids))) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_step_layout: NULL pointer");
    }
    sf_nvtx_range range("sf_cuda_step_layout");
    step_layout_kernel<<<n_requests, kBlock, 0, stream>>>(
        slots, cu_seqlens, n_requests, slot_len, max_context, long_after, slot_next, ids,
        positions, kv_rows, rope_table, cu_q, cu_kv, kv_len, q_pos0, last_row);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_store_next(int32_t *slot_next, const int32_t *slots,
                                        const int32_t *tokens, int32_t n_requests,
                                        cudaStream_t stream) {
    if (n_requests < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_store_next: n_requests = %d",
                       n_requests);
    }
    if (n_requests == 0) return SF_OK;
    if (!slot_next || !slots || !tokens) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_store_next: NULL pointer");
    }
    store_next_kernel<<<(n_requests + kBlock - 1) / kBlock, kBlock, 0, stream>>>(
        slot_next, slots, tokens, n_requests);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}
