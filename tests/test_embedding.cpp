// sf_cpu_embedding: a gather, so the result must equal the table rows exactly.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <vector>

namespace {

TEST(Embedding, GathersRowsExactly) {
    sf_test::Rng rng(900);
    for (int64_t dim : {1, 7, 65, 576}) {
        const int64_t vocab = 1000;
        std::vector<float> table = rng.normal_vec(vocab * dim);
        for (int64_t n : {1, 7, 65}) {
            std::vector<int32_t> ids(n);
            for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)rng.below(vocab);
            ids[0] = (int32_t)(vocab - 1); // the last row
            if (n > 2) {
                ids[1] = 0;      // the first row
                ids[2] = ids[0]; // a repeat
            }
            std::vector<float> out(n * dim, NAN);
            sf_cpu_embedding(out.data(), table.data(), ids.data(), n, dim);
            for (int64_t i = 0; i < n; i++)
                for (int64_t d = 0; d < dim; d++)
                    ASSERT_EQ(out[i * dim + d], table[(int64_t)ids[i] * dim + d])
                        << "row " << i << " id " << ids[i] << " dim " << dim;
        }
    }
}

TEST(Embedding, ZeroTokensWritesNothing) {
    float table[4] = {1, 2, 3, 4}, out[2] = {7, 8};
    sf_cpu_embedding(out, table, nullptr, 0, 2);
    EXPECT_EQ(out[0], 7.0f);
    EXPECT_EQ(out[1], 8.0f);
}

} // namespace
