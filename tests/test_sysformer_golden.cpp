// The Sysformer's CPU forward pass against PyTorch nn.TransformerDecoder.
//
// Fixtures: tests/golden/sysformer/<name>/ (tests/golden/make_sysformer_goldens.py): random
// weights, every parameter randomised, post-LN and pre-LN, relu and gelu, 1 to 3 layers, 2 to 8
// heads, with and without the final norm, and request shapes (n_s, n_u) covering {1, 5, 33} x
// {1, 17, 100}. PyTorch ran each request alone; here the three run as one packed batch.
//
// Tolerance, derived: both sides are fp32 and differ only in summation order (and our
// LayerNorm/softmax/GELU accumulate in double). Each dot product of length K <= 100 carries a
// relative error ~sqrt(K)·u ~ 6e-7; a layer chains ~8 of them, and LayerNorm re-scales the
// stream (amplifying an absolute error by 1/sigma, sigma ~ 1 here). Three layers give
// ~3 * 8 * 6e-7 ~ 1.5e-5 as a pessimistic sum of per-op bounds, and the fixture script measured
// PyTorch's own fp32 result within 6.1e-6 of a float64 evaluation. We hold the normwise error
// to 2e-5, what that bound entitles fp32 to; measured: 1.5e-7..8.0e-7 (SF_TEST_VERBOSE=1
// prints them). A real bug (wrong head split, eps, norm order, activation form) is >= 1e-3.
#include <gtest/gtest.h>

#include <math.h>
#include <string.h>

#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model_fixtures.h"
#include "sysformer.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif

namespace {

constexpr double kNormwiseTol = 2e-5;

template <typename T>
std::vector<T> tensor(const sf_st_archive *ar, const char *name) {
    const sf_st_tensor *t = sf_st_find(ar, name);
    EXPECT_NE(t, nullptr) << name;
    if (!t) return {};
    std::vector<T> v((size_t)t->numel);
    memcpy(v.data(), t->data, (size_t)t->nbytes);
    return v;
}

class SysformerGolden : public ::testing::TestWithParam<const char *> {};

TEST_P(SysformerGolden, PackedBatchMatchesPyTorch) {
    const std::string dir = std::string(SF_TEST_DATA_DIR) + "/sysformer/" + GetParam();
    sf_st_archive *ar = nullptr;
    ASSERT_EQ(sf_st_open((dir + "/golden.safetensors").c_str(), &ar), SF_OK) << sf_last_error();
    auto cu_s = tensor<int32_t>(ar, "cu_system");
    auto cu_u = tensor<int32_t>(ar, "cu_user");
    auto system = tensor<float>(ar, "system");
    auto user = tensor<float>(ar, "user");
    auto expected = tensor<float>(ar, "expected");
    sf_st_close(ar);
    ASSERT_GE(cu_s.size(), 2u);

    // The loader validates against an LLM; a random one with hidden size 32 stands in.
    TempDir llm_dir;
    sf_llm_config lcfg = tiny_llama_config();
    ASSERT_EQ(lcfg.hidden_size, 32);
    ASSERT_EQ(sf_random_llm_write(llm_dir.path().c_str(), &lcfg, 3), SF_OK) << sf_last_error();
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(llm_dir.path().c_str(), &llm), SF_OK) << sf_last_error();
    sf_sysformer *sf = nullptr;
    ASSERT_EQ(sf_sysformer_load(dir.c_str(), llm, &sf), SF_OK) << sf_last_error();

    const int32_t n_req = (int32_t)cu_s.size() - 1;
    const int64_t d = sf_sysformer_get_config(sf)->d_model;
    sf_rewrite_batch b = {n_req, cu_s.data(), cu_u.data(), system.data(), user.data()};
    std::vector<float> out(system.size(), NAN);
    ASSERT_EQ(sf_sysformer_forward_cpu(sf, &b, out.data()), SF_OK) << sf_last_error();
    for (int32_t r = 0; r < n_req; r++) {
        const size_t off = (size_t)cu_s[r] * d, n = (size_t)(cu_s[r + 1] - cu_s[r]) * d;
        const double err = rel_error(out.data() + off, expected.data() + off, n);
        EXPECT_LE(err, kNormwiseTol) << "request " << r;
        if (getenv("SF_TEST_VERBOSE")) {
            printf("  %-28s request %d (n_s %d, n_u %d): normwise %.2e\n", GetParam(), r,
                   cu_s[r + 1] - cu_s[r], cu_u[r + 1] - cu_u[r], err);
        }
    }

    // In place (system_out == system) gives the same bits.
    ASSERT_EQ(sf_sysformer_forward_cpu(sf, &b, system.data()), SF_OK) << sf_last_error();
    EXPECT_EQ(0, memcmp(system.data(), out.data(), out.size() * sizeof(float)));
    sf_sysformer_free(sf);
    sf_llm_free(llm);
}

INSTANTIATE_TEST_SUITE_P(PyTorch, SysformerGolden,
                         ::testing::Values("postln_relu_1layer", "postln_gelu_2layer_final",
                                           "preln_relu_3layer", "preln_gelu_2layer_final",
                                           "preln_relu_1layer_8heads"),
                         [](const ::testing::TestParamInfo<const char *> &info) {
                             return std::string(info.param);
                         });

}  // namespace
