// Embedding gather. CPU twin: host/cpu/embedding.c.
#include "cuda_check.cuh"
#include "kernels.h"

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
    sf_nvtx_range range("sf_cuda_embedding_f32");
    const int block = 256;
    embedding_f32_kernel<<<(unsigned)n, block, 0, stream>>>(out, table, ids, dim, vocab, bad_ids);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}
