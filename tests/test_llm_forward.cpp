// The packed CPU forward pass: batch invariance, prefill/decode agreement, the input-embeddings
// path, and every way a batch can be wrong. Golden agreement with transformers lives in
// test_llm_golden.cpp; these tests pin down the engine's own contracts on a tiny random model.
#include <gtest/gtest.h>

#include <string.h>

#include <vector>

#include "model_fixtures.h"
#include "sysformer.h"

namespace {

// Reduction order is the only thing allowed to differ between a request run alone and the same
// request packed with others (BLAS may block a GEMM of M rows differently from one of M' rows).
// Each fp32 dot product of length K <= 56 then differs by at most 2*gamma_K*sum|a||b|, about
// 7e-6 relative in the worst case and ~sqrt(K)*u ~ 5e-7 typically; through 2 layers of ~12 ops
// with normalisation in between this stays well under 1e-5 normwise.
constexpr double kReorderTol = 1e-5;

class LlmForward : public ::testing::Test {
  protected:
    void SetUp() override {
        ASSERT_FALSE(dir_.path().empty());
        sf_llm_config cfg = tiny_llama_config();
        ASSERT_EQ(sf_random_llm_write(dir_.path().c_str(), &cfg, 42), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        vocab_ = sf_llm_get_config(llm_)->vocab_size;
    }
    void TearDown() override { sf_llm_free(llm_); }

    // Deterministic token ids in range.
    std::vector<int32_t> tokens(int n, int salt) const {
        std::vector<int32_t> ids(n);
        for (int i = 0; i < n; i++) ids[i] = (i * 31 + salt * 17 + 5) % vocab_;
        return ids;
    }

    // Logits of every row of a single request run alone, no cache.
    std::vector<float> run_alone(const std::vector<int32_t> &ids) {
        const int n = (int)ids.size();
        int32_t cu[2] = {0, n};
        std::vector<int32_t> rows(n);
        for (int i = 0; i < n; i++) rows[i] = i;
        sf_batch b = {};
        b.n_requests = 1;
        b.cu_seqlens = cu;
        b.token_ids = ids.data();
        b.n_logit_rows = n;
        b.logit_rows = rows.data();
        std::vector<float> logits((size_t)n * vocab_);
        EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();
        return logits;
    }

    TempDir dir_;
    sf_llm *llm_ = nullptr;
    int vocab_ = 0;
};

TEST_F(LlmForward, PackedBatchMatchesRequestsRunAlone) {
    const std::vector<int> lens = {7, 1, 13, 2};
    std::vector<int32_t> cu = {0}, packed;
    for (size_t r = 0; r < lens.size(); r++) {
        auto ids = tokens(lens[r], (int)r);
        packed.insert(packed.end(), ids.begin(), ids.end());
        cu.push_back(cu.back() + lens[r]);
    }
    const int total = cu.back();
    std::vector<int32_t> rows(total);
    for (int i = 0; i < total; i++) rows[i] = i;
    sf_batch b = {};
    b.n_requests = (int32_t)lens.size();
    b.cu_seqlens = cu.data();
    b.token_ids = packed.data();
    b.n_logit_rows = total;
    b.logit_rows = rows.data();
    std::vector<float> logits((size_t)total * vocab_);
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();

    for (size_t r = 0; r < lens.size(); r++) {
        auto alone = run_alone(tokens(lens[r], (int)r));
        const double err = rel_error(logits.data() + (size_t)cu[r] * vocab_, alone.data(),
                                     alone.size());
        EXPECT_LE(err, kReorderTol) << "request " << r;
    }
}

TEST_F(LlmForward, DecodeWithCacheMatchesFullPrefill) {
    const int n_prefill = 9, n_decode = 6, n = n_prefill + n_decode;
    auto ids = tokens(n, 3);
    auto full = run_alone(ids);

    sf_kv_cache *kv = nullptr;
    ASSERT_EQ(sf_kv_cache_create(llm_, n, &kv), SF_OK) << sf_last_error();
    sf_kv_cache *caches[1] = {kv};
    int32_t cu[2] = {0, n_prefill};
    int32_t last = n_prefill - 1;
    std::vector<float> logits(vocab_);
    sf_batch b = {};
    b.n_requests = 1;
    b.cu_seqlens = cu;
    b.token_ids = ids.data();
    b.kv_caches = caches;
    b.n_logit_rows = 1;
    b.logit_rows = &last;
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_kv_cache_length(kv), n_prefill);
    EXPECT_LE(rel_error(logits.data(), full.data() + (size_t)last * vocab_, vocab_), kReorderTol);

    for (int step = 0; step < n_decode; step++) {
        int32_t cu1[2] = {0, 1}, row = 0;
        b.cu_seqlens = cu1;
        b.token_ids = ids.data() + n_prefill + step;
        b.logit_rows = &row;
        ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();
        const size_t pos = (size_t)(n_prefill + step);
        EXPECT_LE(rel_error(logits.data(), full.data() + pos * vocab_, vocab_), kReorderTol)
            << "decode step " << step;
    }
    EXPECT_EQ(sf_kv_cache_length(kv), n);
    sf_kv_cache_free(kv);
}

// The path the Sysformer uses: caller-given embeddings. With the embedding rows themselves as
// input the computation is the same instruction for instruction, so the logits are identical.
TEST_F(LlmForward, InputEmbeddingsMatchTokenIdsExactly) {
    auto ids = tokens(11, 9);
    const int d = sf_llm_get_config(llm_)->hidden_size;
    std::vector<float> emb((size_t)ids.size() * d);
    ASSERT_EQ(sf_llm_embed(llm_, ids.data(), (int64_t)ids.size(), emb.data()), SF_OK);
    auto by_ids = run_alone(ids);

    int32_t cu[2] = {0, (int32_t)ids.size()};
    std::vector<int32_t> rows(ids.size());
    for (size_t i = 0; i < ids.size(); i++) rows[i] = (int32_t)i;
    sf_batch b = {};
    b.n_requests = 1;
    b.cu_seqlens = cu;
    b.input_embeds = emb.data();
    b.n_logit_rows = (int32_t)rows.size();
    b.logit_rows = rows.data();
    std::vector<float> by_emb(by_ids.size());
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, by_emb.data()), SF_OK) << sf_last_error();
    EXPECT_EQ(0, memcmp(by_emb.data(), by_ids.data(), by_ids.size() * sizeof(float)));
}

TEST_F(LlmForward, EmptyRequestsAndEmptyBatchAreFine) {
    int32_t cu0[1] = {0};
    sf_batch b = {};
    b.cu_seqlens = cu0;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, nullptr), SF_OK) << sf_last_error();

    // A zero-length request between two others changes nothing for them.
    auto a = tokens(4, 1), c = tokens(3, 2);
    std::vector<int32_t> packed = a;
    packed.insert(packed.end(), c.begin(), c.end());
    int32_t cu[4] = {0, 4, 4, 7};
    int32_t rows[2] = {3, 6};
    b.n_requests = 3;
    b.cu_seqlens = cu;
    b.token_ids = packed.data();
    b.n_logit_rows = 2;
    b.logit_rows = rows;
    std::vector<float> logits(2 * (size_t)vocab_);
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();
    auto alone = run_alone(c);
    EXPECT_LE(rel_error(logits.data() + vocab_, alone.data() + 2 * (size_t)vocab_, vocab_),
              kReorderTol);
}

TEST_F(LlmForward, RejectsMalformedBatches) {
    auto ids = tokens(5, 0);
    std::vector<float> logits(5 * (size_t)vocab_);
    int32_t rows[1] = {4};
    auto base = [&](const int32_t *cu) {
        sf_batch b = {};
        b.n_requests = 1;
        b.cu_seqlens = cu;
        b.token_ids = ids.data();
        b.n_logit_rows = 1;
        b.logit_rows = rows;
        return b;
    };
    int32_t cu_ok[2] = {0, 5}, cu_bad0[2] = {1, 5}, cu_dec[3] = {0, 5, 3};

    sf_batch b = base(cu_bad0);
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "cu_seqlens[0]"), nullptr) << sf_last_error();

    b = base(cu_dec);
    b.n_requests = 2;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "decreases"), nullptr) << sf_last_error();

    ids[2] = vocab_;  // one past the end of the vocabulary
    b = base(cu_ok);
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "packed row 2"), nullptr) << sf_last_error();
    ids[2] = -1;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    ids[2] = 3;

    std::vector<float> emb(5 * 32);
    b = base(cu_ok);
    b.input_embeds = emb.data();  // both inputs
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    b.input_embeds = nullptr;
    b.token_ids = nullptr;  // neither
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);

    b = base(cu_ok);
    rows[0] = 5;  // past the last packed row
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "logit_rows[0]"), nullptr) << sf_last_error();
    rows[0] = 4;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, nullptr), SF_ERR_INVALID_ARGUMENT);

    EXPECT_EQ(sf_llm_forward_cpu(nullptr, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_llm_forward_cpu(llm_, nullptr, logits.data()), SF_ERR_INVALID_ARGUMENT);
}

TEST_F(LlmForward, OverLongPromptsAreRefused) {
    const int max_pos = sf_llm_get_config(llm_)->max_position_embeddings;
    auto ids = tokens(max_pos + 1, 4);
    int32_t cu[2] = {0, max_pos + 1};
    int32_t row = 0;
    std::vector<float> logits(vocab_);
    sf_batch b = {};
    b.n_requests = 1;
    b.cu_seqlens = cu;
    b.token_ids = ids.data();
    b.n_logit_rows = 1;
    b.logit_rows = &row;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_OUT_OF_RANGE);
    EXPECT_NE(strstr(sf_last_error(), "max_position_embeddings"), nullptr) << sf_last_error();

    // Exactly max_pos tokens is allowed.
    cu[1] = max_pos;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();

    sf_kv_cache *kv = nullptr;
    EXPECT_EQ(sf_kv_cache_create(llm_, max_pos + 1, &kv), SF_ERR_OUT_OF_RANGE);
    EXPECT_EQ(kv, nullptr);
    EXPECT_EQ(sf_kv_cache_create(llm_, 0, &kv), SF_ERR_OUT_OF_RANGE);

    // A cache that would overflow refuses the call and keeps its length.
    ASSERT_EQ(sf_kv_cache_create(llm_, 8, &kv), SF_OK);
    sf_kv_cache *caches[1] = {kv};
    b.kv_caches = caches;
    cu[1] = 6;
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();
    cu[1] = 3;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_OUT_OF_RANGE);
    EXPECT_NE(strstr(sf_last_error(), "KV cache holds 8"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_kv_cache_length(kv), 6);
    sf_kv_cache_reset(kv);
    EXPECT_EQ(sf_kv_cache_length(kv), 0);
    EXPECT_EQ(sf_kv_cache_capacity(kv), 8);
    sf_kv_cache_free(kv);
}

TEST_F(LlmForward, CachesMustBeDistinctAndMatchTheModel) {
    sf_kv_cache *kv = nullptr;
    ASSERT_EQ(sf_kv_cache_create(llm_, 16, &kv), SF_OK);
    auto ids = tokens(4, 5);
    int32_t cu[3] = {0, 2, 4};
    int32_t row = 0;
    std::vector<float> logits(vocab_);
    sf_kv_cache *shared[2] = {kv, kv};
    sf_batch b = {};
    b.n_requests = 2;
    b.cu_seqlens = cu;
    b.token_ids = ids.data();
    b.kv_caches = shared;
    b.n_logit_rows = 1;
    b.logit_rows = &row;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "share a KV cache"), nullptr) << sf_last_error();
    sf_kv_cache *missing[2] = {kv, nullptr};
    b.kv_caches = missing;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);

    // A cache made for a model with another KV width.
    TempDir other_dir;
    sf_llm_config cfg = tiny_llama_config();
    cfg.num_kv_heads = 4;
    ASSERT_EQ(sf_random_llm_write(other_dir.path().c_str(), &cfg, 1), SF_OK) << sf_last_error();
    sf_llm *other = nullptr;
    ASSERT_EQ(sf_llm_load(other_dir.path().c_str(), &other), SF_OK) << sf_last_error();
    sf_kv_cache *foreign = nullptr;
    ASSERT_EQ(sf_kv_cache_create(other, 16, &foreign), SF_OK);
    sf_kv_cache *mixed[2] = {kv, foreign};
    b.kv_caches = mixed;
    EXPECT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "another model"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_kv_cache_length(kv), 0);
    sf_kv_cache_free(foreign);
    sf_llm_free(other);
    sf_kv_cache_free(kv);
}

TEST_F(LlmForward, EmbedRejectsOutOfRangeIds) {
    int32_t ids[3] = {0, vocab_ - 1, vocab_};
    std::vector<float> out(3 * 32);
    EXPECT_EQ(sf_llm_embed(llm_, ids, 3, out.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "index 2"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_llm_embed(llm_, ids, 2, out.data()), SF_OK);
}

}  // namespace
