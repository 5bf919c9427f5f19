// CUDA kernels against their CPU twins. Every test skips when the library was built without
// CUDA or no GPU is present (developer machines and CI have none); bench/device_check.sh runs
// them on a lent GPU.
#include <gtest/gtest.h>

#include <string.h>

#include <vector>

#include "cpu/ops.h"
#include "sysformer.h"
#ifdef SF_HAVE_CUDA
#include "kernels.h"
#endif

namespace {

TEST(Cuda, DeviceCountAnswersWithoutAGpu) {
    int count = -1;
    ASSERT_EQ(sf_cuda_device_count(&count), SF_OK) << sf_last_error();
    EXPECT_GE(count, 0);
    if (!sf_cuda_built()) {
        EXPECT_EQ(count, 0);
    }
}

#ifdef SF_HAVE_CUDA
bool have_gpu() {
    int count = 0;
    return sf_cuda_device_count(&count) == SF_OK && count > 0;
}

// A gather copies bits, so the GPU result must equal the CPU twin exactly; an out-of-range id
// gives a zero row and is counted on the device.
TEST(Cuda, EmbeddingGatherMatchesCpuExactly) {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
    const int64_t vocab = 1000, dim = 97, n = 65;
    std::vector<float> table(vocab * dim);
    for (size_t i = 0; i < table.size(); i++) table[i] = (float)((i * 2654435761u) % 1000) - 500.f;
    std::vector<int32_t> ids(n);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)((i * 37 + 11) % vocab);
    std::vector<float> want(n * dim);
    sf_cpu_embedding(want.data(), table.data(), ids.data(), n, dim);
    ids[7] = (int32_t)vocab;  // out of range on the device path only

    float *d_table, *d_out;
    int32_t *d_ids;
    int *d_bad;
    ASSERT_EQ(cudaMalloc(&d_table, table.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_out, want.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_ids, ids.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_bad, sizeof(int)), cudaSuccess);
    cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice);
    cudaMemset(d_out, 0xff, want.size() * 4);  // poison: NaNs where nothing is written
    cudaMemset(d_bad, 0, sizeof(int));
    ASSERT_EQ(sf_cuda_embedding_f32(d_out, d_table, d_ids, n, dim, (int32_t)vocab, d_bad, 0),
              SF_OK)
        << sf_last_error();
    std::vector<float> got(n * dim);
    int bad = 0;
    ASSERT_EQ(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(&bad, d_bad, sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(bad, 1);
    for (int64_t i = 0; i < n; i++) {
        if (i == 7) {
            for (int64_t j = 0; j < dim; j++) EXPECT_EQ(got[i * dim + j], 0.0f);
        } else {
            EXPECT_EQ(0, memcmp(&got[i * dim], &want[i * dim], dim * 4)) << "row " << i;
        }
    }
    cudaFree(d_table);
    cudaFree(d_out);
    cudaFree(d_ids);
    cudaFree(d_bad);
}
#endif

}  // namespace
