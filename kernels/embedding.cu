// Embedding gather (fp32, and bf16 or fp16: a 16-bit bit copy) and the splice of S' rows into
// the LLM input buffer.
// CPU twin: host/cpu/embedding.c (the splice is the same row copy with the indices swapped).
#include "cuda_check.cuh"
#include "embedding.h"
#include "guard.h"
#include "kernels.h"

namespace {

// Rows of 16-bit values move as 128-bit words (8 values) when dim is a multiple of 8 and both
// row bases are 16-byte aligned, else value by value.
constexpr int kRowBlock = 128;
constexpr int kVec = 8;

inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// One block per row, threads striding over the row: rows are contiguous, so each warp reads
// and writes 128 consecutive bytes.
__global__ void embedding_f32_kernel(float *__restrict__ out, const float *__restrict__ table,
                                     const int32_t *__restrict__ ids, int64_t dim, int32_t vocab,
                                     int *bad_ids) {
    const int64_t row = blockIdx.x;
    const int32_t id = ids[row];
    float *dst = out + row * dim;
    if (id < 0 || id >= vocab) {
        for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = 0.0f;
        if (threadIdx.x == 0 && bad_ids) atomicAdd(bad_ids, 1);
        return;
    }
    const float *src = table + (int64_t)id * dim;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}

// One 16-bit row copy by the whole block. T is uint4 (8 values) or uint16_t (1 value); dim_t is
// the row length in T units.
template <typename T>
__device__ __forceinline__ void copy_row(T *__restrict__ dst, const T *__restrict__ src,
                                         int64_t dim_t) {
    for (int64_t i = threadIdx.x; i < dim_t; i += blockDim.x) dst[i] = src[i];
}

// The 16-bit gather (bf16 or fp16: bits are copied), one block per row; T as in copy_row.
template <typename T>
__global__ void embedding_16bit_kernel(T *__restrict__ out, const T *__restrict__ table,
                                       const int32_t *__restrict__ ids, int64_t dim_t,
                                       int32_t vocab, int *bad_ids) {
    const int64_t row = blockIdx.x;
    const int32_t id = ids[row];
    T *dst = out + row * dim_t;
    if (id < 0 || id >= vocab) {
        for (int64_t i = threadIdx.x; i < dim_t; i += blockDim.x) dst[i] = T{};
        if (threadIdx.x == 0 && bad_ids) atomicAdd(bad_ids, 1);
        return;
    }
    copy_row(dst, table + (int64_t)id * dim_t, dim_t);
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

extern "C" sf_status sf_cuda_embedding_f32(float *out, const float *table, const int32_t *ids,
                                           int64_t n, int64_t dim, int32_t vocab, int *bad_ids,
                                           cudaStream_t stream) {
    if (n < 0 || dim < 0 || n > 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_embedding_f32: n = %lld, dim = %lld",
                       (long long)n, (long long)dim);
    }
    if (n == 0 || dim == 0) return SF_OK;
    if (!out || !table || !ids) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_embedding_f32: NULL pointer");
    }
    if (((uintptr_t)out | (uintptr_t)table | (uintptr_t)ids | (uintptr_t)bad_ids) & 3u) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_cuda_embedding_f32: pointer not aligned to its element");
    }
    sf_nvtx_range range("sf_cuda_embedding_f32");
    const int block = 256;
    embedding_f32_kernel<<<(unsigned)n, block, 0, stream>>>(out, table, ids, dim, vocab, bad_ids);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

static sf_status embedding_16bit(const char *fn, uint16_t *out, const uint16_t *table,
                                 const int32_t *ids, int64_t n, int64_t dim, int32_t vocab,
                                 int *bad_ids, cudaStream_t stream) {
    if (n < 0 || dim < 0 || n > 0x7fffffff) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld, dim = %lld", fn, (long long)n,
                       (long long)dim);
    }
    if (n == 0 || dim == 0) return SF_OK;
    if (!out || !table || !ids) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", fn);
    const uintptr_t halves = (uintptr_t)out | (uintptr_t)table;
    if ((halves & 1u) || (((uintptr_t)ids | (uintptr_t)bad_ids) & 3u)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: pointer not aligned to its element", fn);
    }
    sf_nvtx_range range(fn);
    // The table's rows are 16-byte aligned iff its base is and dim is a multiple of 8.
    if (dim % kVec == 0 && aligned16(out) && aligned16(table)) {
        embedding_16bit_kernel<uint4><<<(unsigned)n, kRowBlock, 0, stream>>>(
            reinterpret_cast<uint4 *>(out), reinterpret_cast<const uint4 *>(table), ids,
            dim / kVec, vocab, bad_ids);
    } else {
        embedding_16bit_kernel<uint16_t><<<(unsigned)n, kRowBlock, 0, stream>>>(
            out, table, ids, dim, vocab, bad_ids);
    }
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_embedding_bf16(sf_bf16 *out, const sf_bf16 *table, const int32_t *ids,
                                            int64_t n, int64_t dim, int32_t vocab, int *bad_ids,
                                            cudaStream_t stream) {
    return embedding_16bit("sf_cuda_embedding_bf16", out, table, ids, n, dim, vocab, bad_ids,
                           stream);
}

extern "C" sf_status sf_cuda_embedding_f16(sf_f16 *out, const sf_f16 *table, const int32_t *ids,
                                           int64_t n, int64_t dim, int32_t vocab, int *bad_ids,
                                           cudaStream_t stream) {
    return embedding_16bit("sf_cuda_embedding_f16", out, table, ids, n, dim, vocab, bad_ids,
                           stream);
}

// The splice is the scatter of kernels/guard.cu with packed rows (row strides = dim).
extern "C" sf_status sf_cuda_splice_rows_bf16(sf_bf16 *dst, const sf_bf16 *src,
                                              const int32_t *dst_rows, int64_t n_rows,
                                              int64_t dim, cudaStream_t stream) {
    return sf_cuda_scatter_rows_bf16(dst, dim, src, dim, dst_rows, n_rows, dim, stream);
}
