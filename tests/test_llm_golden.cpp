// The CPU forward pass against Hugging Face transformers.
//
// Fixtures: tests/golden/llm/<name>/ (made by tests/golden/make_llm_goldens.py; see the README
// there). transformers ran each request alone with a KV cache; here all requests run as ONE
// packed prefill with a cache each, then four decode steps that each feed one token per request
// as one packed batch. So the test covers loading (F32/F16/BF16, sharded, tied), every RoPE
// type, GQA, biases, the sliding window, the packed batch and the KV cache at once.
//
// Tolerance, derived: both sides compute in fp32 and differ only in summation order (BLAS vs
// MKL/oneDNN blockings, our double-accumulated norms and softmax) and in RoPE angles (ours in
// double, transformers' in fp32: |angle error| <= pos * u with pos < 64, about 4e-6 rad). A
// length-K fp32 dot product carries a relative error of order sqrt(K) * u (u = 2^-24) for
// random-signed terms; K <= 112 gives ~6e-7 per matmul. Two layers of ~8 such steps each, with
// normalisation re-scaling rather than amplifying, keep the logits' normwise error ~1e-6; the
// measured values are 3.7e-7..1.8e-6 normwise and at most 2e-6 of max |logit| elementwise
// (SF_TEST_VERBOSE=1 prints them). 1e-5 leaves a 5x margin, while one real bug (a wrong rope
// band, a missing bias, an off-by-one in the window) moves the logits by 1e-2 or more (the
// fixture script measured 0.9 for the window alone). Max elementwise error is held to 1e-5 of
// the logits' max magnitude for the same reasons.
#include <gtest/gtest.h>

#include <dirent.h>
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

constexpr double kNormwiseTol = 1e-5;
constexpr double kMaxAbsTol = 1e-5;  // relative to max |reference logit|

struct Golden {
    std::vector<int32_t> cu_seqlens, prefill_ids, decode_ids;
    std::vector<float> prefill_logits, decode_logits;
    int64_t n_steps = 0;
};

template <typename T>
std::vector<T> read_tensor(const sf_st_archive *ar, const char *name, sf_dtype dtype) {
    const sf_st_tensor *t = sf_st_find(ar, name);
    EXPECT_NE(t, nullptr) << name;
    if (!t) return {};
    EXPECT_EQ(t->dtype, dtype) << name;
    std::vector<T> v((size_t)t->numel);
    memcpy(v.data(), t->data, (size_t)t->nbytes);
    return v;
}

Golden load_golden(const std::string &path) {
    Golden g;
    sf_st_archive *ar = nullptr;
    EXPECT_EQ(sf_st_open(path.c_str(), &ar), SF_OK) << sf_last_error();
    if (!ar) return g;
    g.cu_seqlens = read_tensor<int32_t>(ar, "cu_seqlens", SF_DTYPE_I32);
    g.prefill_ids = read_tensor<int32_t>(ar, "prefill_ids", SF_DTYPE_I32);
    g.decode_ids = read_tensor<int32_t>(ar, "decode_ids", SF_DTYPE_I32);
    g.prefill_logits = read_tensor<float>(ar, "prefill_logits", SF_DTYPE_F32);
    g.decode_logits = read_tensor<float>(ar, "decode_logits", SF_DTYPE_F32);
    const sf_st_tensor *d = sf_st_find(ar, "decode_ids");
    if (d) g.n_steps = d->shape[0];
    sf_st_close(ar);
    return g;
}

void expect_close(const float *got, const float *want, int64_t n, const std::string &what) {
    double max_ref = 0.0, max_err = 0.0;
    for (int64_t i = 0; i < n; i++) {
        ASSERT_TRUE(std::isfinite(got[i])) << what << " index " << i;
        max_ref = fmax(max_ref, fabs((double)want[i]));
        max_err = fmax(max_err, fabs((double)got[i] - (double)want[i]));
    }
    const double rel = rel_error(got, want, (size_t)n);
    EXPECT_LE(rel, kNormwiseTol) << what;
    EXPECT_LE(max_err, kMaxAbsTol * max_ref) << what;
    ::testing::Test::RecordProperty(what, std::to_string(rel));
    if (::testing::Test::HasFailure() || getenv("SF_TEST_VERBOSE")) {
        printf("  %-28s normwise %.2e  max abs %.2e (max |ref| %.2f)\n", what.c_str(), rel,
               max_err, max_ref);
    }
}

class LlmGolden : public ::testing::TestWithParam<const char *> {};

TEST_P(LlmGolden, PackedPrefillAndDecodeMatchTransformers) {
    const std::string dir = std::string(SF_TEST_DATA_DIR) + "/llm/" + GetParam();
    Golden g = load_golden(dir + "/golden.safetensors");
    ASSERT_GE(g.cu_seqlens.size(), 2u);
    ASSERT_GT(g.n_steps, 0);

    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(dir.c_str(), &llm), SF_OK) << sf_last_error();
    const int64_t vocab = sf_llm_get_config(llm)->vocab_size;
    const int32_t n_req = (int32_t)g.cu_seqlens.size() - 1;
    const int32_t total = g.cu_seqlens.back();
    ASSERT_EQ(g.prefill_logits.size(), (size_t)(total * vocab));

    std::vector<sf_kv_cache *> caches(n_req);
    for (auto &kv : caches) {
        ASSERT_EQ(sf_kv_cache_create(llm, total + (int32_t)g.n_steps, &kv), SF_OK);
    }

    // One packed prefill of all requests, logits for every row.
    std::vector<int32_t> rows(total);
    for (int32_t i = 0; i < total; i++) rows[i] = i;
    sf_batch b = {};
    b.n_requests = n_req;
    b.cu_seqlens = g.cu_seqlens.data();
    b.token_ids = g.prefill_ids.data();
    b.kv_caches = caches.data();
    b.n_logit_rows = total;
    b.logit_rows = rows.data();
    std::vector<float> logits((size_t)(total * vocab));
    ASSERT_EQ(sf_llm_forward_cpu(llm, &b, logits.data()), SF_OK) << sf_last_error();
    for (int32_t r = 0; r < n_req; r++) {
        const int64_t off = (int64_t)g.cu_seqlens[r] * vocab;
        const int64_t n = (int64_t)(g.cu_seqlens[r + 1] - g.cu_seqlens[r]) * vocab;
        expect_close(logits.data() + off, g.prefill_logits.data() + off, n,
                     "prefill request " + std::to_string(r));
    }

    // Decode: one token per request per step, all requests in one batch.
    std::vector<int32_t> cu(n_req + 1);
    for (int32_t r = 0; r <= n_req; r++) cu[r] = r;
    for (int64_t step = 0; step < g.n_steps; step++) {
        b.cu_seqlens = cu.data();
        b.token_ids = g.decode_ids.data() + step * n_req;
        b.n_logit_rows = n_req;
        ASSERT_EQ(sf_llm_forward_cpu(llm, &b, logits.data()), SF_OK) << sf_last_error();
        for (int32_t r = 0; r < n_req; r++) {
            expect_close(logits.data() + r * vocab,
                         g.decode_logits.data() + (step * n_req + r) * vocab, vocab,
                         "decode step " + std::to_string(step) + " request " + std::to_string(r));
        }
    }
    for (int32_t r = 0; r < n_req; r++) {
        EXPECT_EQ(sf_kv_cache_length(caches[r]),
                  g.cu_seqlens[r + 1] - g.cu_seqlens[r] + (int32_t)g.n_steps);
        sf_kv_cache_free(caches[r]);
    }
    sf_llm_free(llm);
}

INSTANTIATE_TEST_SUITE_P(Transformers, LlmGolden,
                         ::testing::Values("llama_gqa_llama3", "mistral_window", "qwen2_bias",
                                           "phi3_longrope", "llama_tied_linear"),
                         [](const ::testing::TestParamInfo<const char *> &info) {
                             return std::string(info.param);
                         });

}  // namespace
