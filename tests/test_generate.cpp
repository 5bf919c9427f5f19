// Sampling and batched generation on a tiny random model (no tokenizer needed).
#include <gtest/gtest.h>

#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "cpu/ops.h"
#include "model_fixtures.h"
#include "sysformer.h"

namespace {

TEST(Sample, GreedyTakesTheFirstMaximum) {
    const float logits[5] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f};
    sf_sampling s = {};
    uint64_t rng = 0;
    int32_t t = -1;
    ASSERT_EQ(sf_sample(logits, 5, &s, &rng, &t), SF_OK);
    EXPECT_EQ(t, 1);
    s.temperature = 0.7f;
    s.top_k = 1;  // top-1 sampling is greedy whatever the draw
    for (int i = 0; i < 20; i++) {
        ASSERT_EQ(sf_sample(logits, 5, &s, &rng, &t), SF_OK);
        EXPECT_EQ(t, 1);
    }
    EXPECT_EQ(sf_sample(logits, 0, &s, &rng, &t), SF_ERR_INVALID_ARGUMENT);
    // An infinite temperature makes every logit 0 (a tie the CPU and device samplers would
    // break differently): refused. NaN stays greedy.
    s.temperature = INFINITY;
    EXPECT_EQ(sf_sample(logits, 5, &s, &rng, &t), SF_ERR_INVALID_ARGUMENT);
    s.temperature = NAN;
    ASSERT_EQ(sf_sample(logits, 5, &s, &rng, &t), SF_OK);
    EXPECT_EQ(t, 1);
}

// Frequencies of N draws from softmax([0, ln 2, ln 4]) = (1/7, 2/7, 4/7). Each count is
// binomial: its frequency has standard deviation sqrt(p(1-p)/N) <= 0.0035 for N = 20000, so a
// correct sampler lands within 5 sigma (0.018) except with probability < 1e-6 per check, and
// the draws are seeded, so the outcome is fixed anyway. A sampler ignoring temperature, top-k
// or top-p misses by >= 0.1.
TEST(Sample, FrequenciesFollowTheFilteredSoftmax) {
    const float logits[3] = {0.0f, logf(2.0f), logf(4.0f)};
    const int N = 20000;
    auto freqs = [&](sf_sampling s) {
        std::vector<int> count(3, 0);
        uint64_t rng = s.seed;
        for (int i = 0; i < N; i++) {
            int32_t t = -1;
            EXPECT_EQ(sf_sample(logits, 3, &s, &rng, &t), SF_OK);
            if (t >= 0 && t < 3) count[t]++;
        }
        return std::vector<double>{(double)count[0] / N, (double)count[1] / N, (double)count[2] / N};
    };
    const double tol = 5 * 0.0035;
    auto f = freqs({1.0f, 0, 1.0f, 7, false, 0});
    EXPECT_NEAR(f[0], 1.0 / 7, tol);
    EXPECT_NEAR(f[1], 2.0 / 7, tol);
    EXPECT_NEAR(f[2], 4.0 / 7, tol);
    f = freqs({1.0f, 2, 1.0f, 8, false, 0});  // top-2: (2/6, 4/6)
    EXPECT_EQ(f[0], 0.0);
    EXPECT_NEAR(f[1], 1.0 / 3, tol);
    EXPECT_NEAR(f[2], 2.0 / 3, tol);
    f = freqs({1.0f, 0, 0.5f, 9, false, 0});  // 4/7 >= 0.5 already: only the top token
    EXPECT_EQ(f[2], 1.0);
    f = freqs({1.0f, 0, 0.6f, 10, false, 0});  // 4/7 < 0.6: the top two
    EXPECT_EQ(f[0], 0.0);
    EXPECT_NEAR(f[1], 1.0 / 3, tol);
    f = freqs({0.5f, 0, 1.0f, 11, false, 0});  // T = 0.5 squares the odds: (1, 4, 16) / 21
    EXPECT_NEAR(f[2], 16.0 / 21, tol);
}

TEST(Sample, SameSeedSameDraws) {
    const float logits[4] = {0.1f, 0.2f, 0.3f, 0.4f};
    sf_sampling s = {1.0f, 0, 1.0f, 42, false, 0};
    uint64_t a = s.seed, b = s.seed, c = 43;
    int diff = 0;
    for (int i = 0; i < 50; i++) {
        int32_t ta, tb, tc;
        sf_sample(logits, 4, &s, &a, &ta);
        sf_sample(logits, 4, &s, &b, &tb);
        sf_sample(logits, 4, &s, &c, &tc);
        EXPECT_EQ(ta, tb);
        diff += ta != tc;
    }
    EXPECT_GT(diff, 0);
}

// log softmax(x)[t] in long double, the plain way: log(exp(x_t - m) / sum_i exp(x_i - m)),
// with m the row's maximum so that nothing overflows.
double reference_logprob(const std::vector<float> &x, int32_t t) {
    long double m = x[0], sum = 0.0L;
    for (float v : x) m = v > m ? v : m;
    for (float v : x) sum += expl((long double)v - m);
    return (double)logl(expl((long double)x[t] - m) / sum);
}

// sf_token_logprob computes in double and rounds once, so it is within a float's half ulp of
// the exact value, plus the double sum's error: at most V terms of relative error ~2^-52 each,
// 1e-12 absolute for these rows (V <= 4096) — the slack for results near 0, where the half ulp
// is tiny. Rows: awkward magnitudes (a maximum of 80, far past where exp overflows in float
// without the shift), a near-certain token, a uniform row (exactly -log V), a one-token
// vocabulary (0), and -inf entries (zero probability: -inf for them, nothing for the rest).
TEST(TokenLogprob, MatchesLogSoftmaxInLongDouble) {
    std::vector<std::vector<float>> rows;
    std::vector<float> r;
    for (int i = 0; i < 4096; i++) r.push_back(80.0f - 0.37f * (float)(i % 97) + 1e-3f * i);
    rows.push_back(r);
    rows.push_back({30.0f, -5.0f, 0.0f, -30.0f});
    rows.push_back(std::vector<float>(1000, 3.25f));
    rows.push_back({-7.0f});
    rows.push_back({1.0f, -INFINITY, 2.0f, -INFINITY});
    for (size_t k = 0; k < rows.size(); k++) {
        const auto &x = rows[k];
        const int32_t v = (int32_t)x.size();
        for (int32_t t : {0, v / 3, v - 1}) {
            float lp = 1.0f;
            ASSERT_EQ(sf_token_logprob(x.data(), v, t, &lp), SF_OK) << sf_last_error();
            const double want = reference_logprob(x, t);
            if (std::isinf(want)) {
                EXPECT_EQ(lp, -INFINITY) << "row " << k << " token " << t;
                continue;
            }
            EXPECT_LE(lp, 0.0f);
            EXPECT_NEAR(lp, want, 0.5 * ldexp(1.0, -23) * fabs(want) + 1e-12)
                << "row " << k << " token " << t;
        }
    }
    float lp = 0.0f;
    ASSERT_EQ(sf_token_logprob(rows[2].data(), 1000, 7, &lp), SF_OK);
    EXPECT_FLOAT_EQ(lp, -logf(1000.0f));
    ASSERT_EQ(sf_token_logprob(rows[3].data(), 1, 0, &lp), SF_OK);
    EXPECT_EQ(lp, 0.0f);
    const float *x = rows[1].data();
    EXPECT_EQ(sf_token_logprob(x, 4, 4, &lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_token_logprob(x, 4, -1, &lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_token_logprob(x, 0, 0, &lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_token_logprob(nullptr, 4, 0, &lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_token_logprob(x, 4, 0, nullptr), SF_ERR_INVALID_ARGUMENT);
}

// sf_top_logprobs: the n best of a row in order (larger logit first, the lower id of equal
// ones; NaN never ranks), each log-probability as sf_token_logprob's (the same rounding), and
// ids -1 with NaN past the row's rankable values. The reference: a full sort of the row.
TEST(TopLogprobs, AreTheBestOfASortWithTheirLogprobs) {
    std::vector<std::vector<float>> rows;
    std::vector<float> r;
    for (int i = 0; i < 3000; i++) r.push_back((float)((i * 7919) % 1013) * 0.01f - 5.0f);
    rows.push_back(r);  // many ties: values repeat every 1013 ids
    rows.push_back({1.0f, NAN, 3.0f, -INFINITY, 3.0f, 2.0f});
    rows.push_back({0.5f, NAN, -INFINITY});
    for (size_t k = 0; k < rows.size(); k++) {
        const auto &x = rows[k];
        const int32_t v = (int32_t)x.size();
        std::vector<int32_t> order;
        for (int32_t i = 0; i < v; i++) {
            if (x[i] == x[i]) order.push_back(i);
        }
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t a, int32_t b) { return x[a] > x[b]; });
        for (int32_t n : {1, 4, SF_MAX_TOP_LOGPROBS}) {
            std::vector<int32_t> ids(n, 99);
            std::vector<float> lp(n, 1.0f);
            ASSERT_EQ(sf_top_logprobs(x.data(), v, n, ids.data(), lp.data()), SF_OK)
                << sf_last_error();
            for (int32_t j = 0; j < n; j++) {
                SCOPED_TRACE("row " + std::to_string(k) + ", n " + std::to_string(n) +
                             ", rank " + std::to_string(j));
                if (j >= (int32_t)order.size()) {
                    EXPECT_EQ(ids[j], -1);
                    EXPECT_TRUE(std::isnan(lp[j]));
                    continue;
                }
                EXPECT_EQ(ids[j], order[j]);
                float want = 0.0f;
                ASSERT_EQ(sf_token_logprob(x.data(), v, order[j], &want), SF_OK);
                if (std::isnan(want)) {
                    EXPECT_TRUE(std::isnan(lp[j]));
                } else {
                    EXPECT_EQ(lp[j], want);
                }
            }
        }
    }
    // Not vacuous: the tied row's first ranks are equal logits in id order.
    std::vector<int32_t> ids(4);
    std::vector<float> lp(4);
    ASSERT_EQ(sf_top_logprobs(rows[0].data(), 3000, 4, ids.data(), lp.data()), SF_OK);
    EXPECT_EQ(rows[0][ids[0]], rows[0][ids[1]]);
    EXPECT_LT(ids[0], ids[1]);
    EXPECT_EQ(sf_top_logprobs(rows[1].data(), 6, 0, ids.data(), lp.data()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_top_logprobs(rows[1].data(), 6, SF_MAX_TOP_LOGPROBS + 1, ids.data(), lp.data()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_top_logprobs(rows[1].data(), 0, 1, ids.data(), lp.data()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_top_logprobs(nullptr, 6, 1, ids.data(), lp.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_top_logprobs(rows[1].data(), 6, 1, nullptr, lp.data()), SF_ERR_INVALID_ARGUMENT);
}

// sf_cpu_token_scores, what CPU generation calls for a token that asks for both: one pass of the
// log-sum-exp for the token's log-probability and the top n, equal bit for bit to the two
// public calls (each its own pass over the same row, in the same order), and its argument checks.
TEST(TokenScores, OnePassEqualsTheTwoPublicCalls) {
    std::vector<float> x;
    for (int i = 0; i < 777; i++) x.push_back((float)((i * 104729) % 811) * 0.013f - 4.0f);
    const int32_t v = (int32_t)x.size();
    for (int32_t token : {0, 6, 776}) {
        for (int32_t n : {0, 1, 7, SF_MAX_TOP_LOGPROBS}) {
            SCOPED_TRACE("token " + std::to_string(token) + ", n " + std::to_string(n));
            std::vector<int32_t> ids(SF_MAX_TOP_LOGPROBS, 99), want_ids(SF_MAX_TOP_LOGPROBS, 99);
            std::vector<float> lp(SF_MAX_TOP_LOGPROBS, 1.0f), want_lp(SF_MAX_TOP_LOGPROBS, 1.0f);
            float got = 1.0f, want = 2.0f;
            ASSERT_EQ(sf_cpu_token_scores(x.data(), v, token, n, &got, ids.data(), lp.data()),
                      SF_OK) << sf_last_error();
            ASSERT_EQ(sf_token_logprob(x.data(), v, token, &want), SF_OK);
            EXPECT_EQ(memcmp(&got, &want, sizeof got), 0) << got << " vs " << want;
            if (n > 0) {
                ASSERT_EQ(sf_top_logprobs(x.data(), v, n, want_ids.data(), want_lp.data()), SF_OK);
            }
            EXPECT_EQ(ids, want_ids);  // untouched past n, as the public call leaves them
            EXPECT_EQ(memcmp(lp.data(), want_lp.data(), lp.size() * sizeof(float)), 0);
        }
    }
    int32_t ids[SF_MAX_TOP_LOGPROBS];
    float lp[SF_MAX_TOP_LOGPROBS], one;
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, v, 0, &one, ids, lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, -1, 0, &one, ids, lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, 0, -1, &one, ids, lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, 0, SF_MAX_TOP_LOGPROBS + 1, &one, ids, lp),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, 0, 2, &one, nullptr, lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, 0, 2, &one, ids, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, 0, 0, nullptr, ids, lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(nullptr, v, 0, 0, &one, ids, lp), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cpu_token_scores(x.data(), v, 0, 0, &one, nullptr, nullptr), SF_OK);
}

class Generate : public ::testing::Test {
  protected:
    void SetUp() override {
        sf_llm_config cfg = tiny_llama_config();
        ASSERT_EQ(sf_random_llm_write(dir_.path().c_str(), &cfg, 31), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        prompts_ = {{1, 5, 9, 13, 2}, {1, 40}, {1, 7, 7, 7, 7, 7, 7, 3}};
    }
    void TearDown() override { sf_llm_free(llm_); }

    // Generates for the given prompts; returns the token lists.
    std::vector<std::vector<int32_t>> run(const std::vector<std::vector<int32_t>> &prompts,
                                          sf_generation g, std::vector<sf_finish_reason> *why = nullptr,
                                          sf_status want = SF_OK) {
        std::vector<int32_t> cu = {0}, ids;
        for (auto &p : prompts) {
            ids.insert(ids.end(), p.begin(), p.end());
            cu.push_back((int32_t)ids.size());
        }
        g.n_requests = (int32_t)prompts.size();
        g.cu_seqlens = cu.data();
        g.token_ids = ids.data();
        std::vector<sf_generation_result> res(prompts.size());
        EXPECT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, res.data()), want)
            << sf_last_error();
        std::vector<std::vector<int32_t>> out;
        if (want != SF_OK) return out;
        for (auto &r : res) {
            out.emplace_back(r.tokens, r.tokens + r.n_tokens);
            EXPECT_EQ(r.text, nullptr);
            if (why) why->push_back(r.finish);
            sf_generation_result_free(&r);
        }
        return out;
    }

    TempDir dir_;
    sf_llm *llm_ = nullptr;
    std::vector<std::vector<int32_t>> prompts_;
};

TEST_F(Generate, BatchedGreedyEqualsEachRequestAlone) {
    sf_generation g = {};
    g.max_new_tokens = 12;
    std::vector<sf_finish_reason> why;
    auto batched = run(prompts_, g, &why);
    ASSERT_EQ(batched.size(), 3u);
    for (size_t r = 0; r < prompts_.size(); r++) {
        EXPECT_EQ(batched[r].size(), 12u);
        EXPECT_EQ(why[r], SF_FINISH_LENGTH);
        auto alone = run({prompts_[r]}, g);
        EXPECT_EQ(alone[0], batched[r]) << "request " << r;
    }
}

// A stop id ends one request early while the others run on (and is not emitted).
TEST_F(Generate, RequestsFinishAtDifferentTimes) {
    sf_generation g = {};
    g.max_new_tokens = 10;
    auto free_run = run(prompts_, g);
    const int32_t stop = free_run[1][3];
    size_t first_in_1 = 0;
    while (free_run[1][first_in_1] != stop) first_in_1++;
    g.stop_ids = &stop;
    g.n_stop_ids = 1;
    std::vector<sf_finish_reason> why;
    auto stopped = run(prompts_, g, &why);
    EXPECT_EQ(why[1], SF_FINISH_STOP_TOKEN);
    EXPECT_EQ(stopped[1], std::vector<int32_t>(free_run[1].begin(), free_run[1].begin() + first_in_1));
    for (int r : {0, 2}) {
        auto it = std::find(free_run[r].begin(), free_run[r].end(), stop);
        EXPECT_EQ(stopped[r], std::vector<int32_t>(free_run[r].begin(), it)) << "request " << r;
    }
}

TEST_F(Generate, ContextWindowLimits) {
    const int32_t max_pos = sf_llm_get_config(llm_)->max_position_embeddings;
    sf_generation g = {};
    g.max_new_tokens = 10;
    std::vector<int32_t> too_long(max_pos, 3);
    run({too_long}, g, nullptr, SF_ERR_OUT_OF_RANGE);
    EXPECT_NE(strstr(sf_last_error(), "context window"), nullptr) << sf_last_error();
    // Two positions left: the reply fills them, plus the token sampled at the last position.
    std::vector<sf_finish_reason> why;
    auto out = run({std::vector<int32_t>(max_pos - 2, 3)}, g, &why);
    EXPECT_EQ(why[0], SF_FINISH_CONTEXT);
    EXPECT_EQ(out[0].size(), 3u);
    g.max_new_tokens = 0;
    run({prompts_[0]}, g, nullptr, SF_ERR_INVALID_ARGUMENT);
    g.max_new_tokens = 4;
    run({std::vector<int32_t>{}}, g, nullptr, SF_ERR_INVALID_ARGUMENT);
}

// A request's sampled output depends on its seed, not on the rest of the batch.
TEST_F(Generate, SamplingIsRepeatableAndBatchIndependent) {
    sf_generation g = {};
    g.max_new_tokens = 8;
    g.sampling = {1.0f, 20, 0.95f, 1234, false, 0};
    auto a = run(prompts_, g);
    auto b = run(prompts_, g);
    EXPECT_EQ(a, b);
    auto alone = run({prompts_[2]}, g);
    EXPECT_EQ(alone[0], a[2]);
    g.sampling.seed = 99;
    auto c = run(prompts_, g);
    EXPECT_NE(a, c);
}

// request_sampling gives each request its own setting and stream: each request's tokens are
// those it gets alone with that setting as the batch's sampling, whatever g.sampling says.
// Settings: greedy, top-k with top-p, plain sampling at a low temperature, and the first
// sampled setting again on another prompt (same seed, its own stream).
TEST_F(Generate, PerRequestSamplingEqualsEachRequestAlone) {
    const std::vector<sf_sampling> set = {
        {0.0f, 0, 1.0f, 0, false, 0},
        {1.0f, 20, 0.95f, 1234, false, 0},
        {0.7f, 0, 1.0f, 99, false, 0},
        {1.0f, 20, 0.95f, 1234, false, 0}};
    const std::vector<std::vector<int32_t>> prompts = {prompts_[0], prompts_[1], prompts_[2],
                                                       prompts_[0]};
    sf_generation g = {};
    g.max_new_tokens = 12;
    g.sampling = {1.5f, 3, 0.5f, 7, false, 0};  // overridden
    g.request_sampling = set.data();
    const auto batched = run(prompts, g);
    ASSERT_EQ(batched.size(), 4u);
    g.request_sampling = nullptr;
    for (size_t r = 0; r < prompts.size(); r++) {
        g.sampling = set[r];
        EXPECT_EQ(run({prompts[r]}, g)[0], batched[r]) << "request " << r;
    }
    // Not vacuous: the sampled requests leave the greedy path, and one setting for the whole
    // batch gives other tokens.
    g.sampling = set[0];
    EXPECT_NE(run({prompts[1]}, g)[0], batched[1]);
    EXPECT_NE(run({prompts[2]}, g)[0], batched[2]);
    g.sampling = set[1];
    EXPECT_NE(run(prompts, g), batched);
}

// request_max_new_tokens: each request stops at its own length (finish: length), its tokens
// the first ones of an unlimited run; a limit below 1 is refused.
TEST_F(Generate, PerRequestLimitsStopEachRequestAtItsOwnLength) {
    sf_generation g = {};
    g.max_new_tokens = 10;
    const auto full = run(prompts_, g);
    const std::vector<int32_t> limit = {3, 10, 1};
    g.max_new_tokens = 0;  // unused with request_max_new_tokens
    g.request_max_new_tokens = limit.data();
    std::vector<sf_finish_reason> why;
    const auto got = run(prompts_, g, &why);
    ASSERT_EQ(got.size(), 3u);
    for (size_t r = 0; r < 3; r++) {
        EXPECT_EQ(got[r], std::vector<int32_t>(full[r].begin(), full[r].begin() + limit[r]))
            << "request " << r;
        EXPECT_EQ(why[r], SF_FINISH_LENGTH) << "request " << r;
    }
    const std::vector<int32_t> bad = {3, 0, 1};
    g.request_max_new_tokens = bad.data();
    run(prompts_, g, nullptr, SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "request_max_new_tokens[1] = 0"), nullptr) << sf_last_error();
}

// Each generated token's log-probability is the one of its row in a full forward of the prompt
// and the reply (no KV cache: every row recomputed), for greedy and sampled requests mixed in one
// batch; a request that did not ask gets none, and its tokens are unchanged by the others
// asking. Bound: the cached decode's logits and the recomputed ones differ only in reduction
// order, normwise within kReorderTol = 1e-5 (tests/test_llm_forward.cpp derives it), so each
// entry within 1e-5 ||row||; log-sum-exp moves by at most the largest change, so a
// log-probability within 2e-5 ||row||, plus the two roundings of the results (a float ulp of
// |lp| covers both).
TEST_F(Generate, LogprobsAreThoseOfAFullRecomputation) {
    // requests 1 and 3 also ask for the most likely tokens at each step (3 implies logprobs)
    const std::vector<sf_sampling> set = {{0.0f, 0, 1.0f, 0, true, 0},
                                          {0.9f, 0, 1.0f, 5, true, 4},
                                          {1.0f, 8, 0.9f, 6, false, 0},
                                          {1.2f, 0, 1.0f, 7, false, SF_MAX_TOP_LOGPROBS}};
    const std::vector<std::vector<int32_t>> prompts = {prompts_[0], prompts_[1], prompts_[2],
                                                       prompts_[2]};
    std::vector<int32_t> cu = {0}, ids;
    for (auto &p : prompts) {
        ids.insert(ids.end(), p.begin(), p.end());
        cu.push_back((int32_t)ids.size());
    }
    sf_generation g = {};
    g.n_requests = 4;
    g.cu_seqlens = cu.data();
    g.token_ids = ids.data();
    g.max_new_tokens = 9;
    g.request_sampling = set.data();
    std::vector<sf_generation_result> res(4);
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, res.data()), SF_OK)
        << sf_last_error();
    const int32_t vocab = sf_llm_get_config(llm_)->vocab_size;
    for (int r = 0; r < 4; r++) {
        SCOPED_TRACE("request " + std::to_string(r));
        const sf_generation_result &q = res[r];
        ASSERT_EQ(q.n_tokens, 9);
        EXPECT_EQ(q.n_top, set[r].top_logprobs);
        EXPECT_EQ(q.top_ids != nullptr, set[r].top_logprobs > 0);
        EXPECT_EQ(q.top_logprobs != nullptr, set[r].top_logprobs > 0);
        if (!set[r].logprobs && set[r].top_logprobs == 0) {
            EXPECT_EQ(q.logprobs, nullptr);
            continue;
        }
        ASSERT_NE(q.logprobs, nullptr);
        // the prompt and the reply but its last token, every row's logits
        std::vector<int32_t> seq = prompts[r];
        seq.insert(seq.end(), q.tokens, q.tokens + q.n_tokens - 1);
        const int32_t n = (int32_t)seq.size(), first = (int32_t)prompts[r].size() - 1;
        std::vector<int32_t> rows(n), seq_cu = {0, n};
        for (int32_t i = 0; i < n; i++) rows[i] = i;
        sf_batch b = {};
        b.n_requests = 1;
        b.cu_seqlens = seq_cu.data();
        b.token_ids = seq.data();
        b.n_logit_rows = n;
        b.logit_rows = rows.data();
        std::vector<float> logits((size_t)n * vocab);
        ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, logits.data()), SF_OK) << sf_last_error();
        for (int32_t i = 0; i < q.n_tokens; i++) {
            const float *row = logits.data() + (size_t)(first + i) * vocab;
            const std::vector<float> x(row, row + vocab);
            double norm = 0.0;
            for (float v : x) norm += (double)v * v;
            const double want = reference_logprob(x, q.tokens[i]);
            EXPECT_NEAR(q.logprobs[i], want, 2e-5 * sqrt(norm) + ldexp(fabs(want), -23))
                << "token " << i;
            EXPECT_LE(q.logprobs[i], 0.0f);
            if (set[r].temperature <= 0.0f) {  // greedy: the pick is the most likely token
                EXPECT_EQ(q.tokens[i], (int32_t)(std::max_element(x.begin(), x.end()) -
                                                 x.begin()));
            }
            // The most likely tokens: each log-probability that of its id in the recomputed
            // row within the bound; in order, and above every token left out, up to twice it
            // (two near-equal logits may swap places across the two computations).
            const double tol = 2e-5 * sqrt(norm);
            for (int32_t j = 0; j < q.n_top; j++) {
                const int32_t id = q.top_ids[(size_t)i * q.n_top + j];
                const float lp = q.top_logprobs[(size_t)i * q.n_top + j];
                ASSERT_GE(id, 0);
                ASSERT_LT(id, vocab);
                const double ref = reference_logprob(x, id);
                EXPECT_NEAR(lp, ref, tol + ldexp(fabs(ref), -23))
                    << "token " << i << " rank " << j;
                if (j > 0) {
                    EXPECT_LE(lp, q.top_logprobs[(size_t)i * q.n_top + j - 1] + 2 * tol);
                }
            }
            if (q.n_top > 0) {
                const float last = q.top_logprobs[(size_t)i * q.n_top + q.n_top - 1];
                const int32_t *top = q.top_ids + (size_t)i * q.n_top;
                for (int32_t id = 0; id < vocab; id++) {
                    if (std::find(top, top + q.n_top, id) != top + q.n_top) continue;
                    EXPECT_LE(reference_logprob(x, id), last + 2 * tol) << "token " << i;
                }
                // the picked token's log-probability is its own, and at most the best
                EXPECT_LE(q.logprobs[i], q.top_logprobs[(size_t)i * q.n_top]);
            }
        }
    }
    // Not vacuous: sampling at these temperatures leaves the most likely token at least once,
    // with a log-probability below the greedy ones' maximum.
    bool below = false;
    for (int r : {1, 3}) {
        for (int32_t i = 0; i < res[r].n_tokens; i++) below = below || res[r].logprobs[i] < -1.0f;
    }
    EXPECT_TRUE(below);
    // Asking changes no token: the same batch without any.
    std::vector<sf_sampling> plain = set;
    for (auto &p : plain) {
        p.logprobs = false;
        p.top_logprobs = 0;
    }
    g.request_sampling = plain.data();
    std::vector<sf_generation_result> again(4);
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, again.data()), SF_OK);
    std::vector<sf_sampling> bad = set;
    bad[2].top_logprobs = SF_MAX_TOP_LOGPROBS + 1;
    g.request_sampling = bad.data();
    std::vector<sf_generation_result> refused(4);
    EXPECT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, refused.data()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "request_sampling[2].top_logprobs"), nullptr)
        << sf_last_error();
    for (int r = 0; r < 4; r++) {
        EXPECT_EQ(std::vector<int32_t>(again[r].tokens, again[r].tokens + again[r].n_tokens),
                  std::vector<int32_t>(res[r].tokens, res[r].tokens + res[r].n_tokens));
        EXPECT_EQ(again[r].logprobs, nullptr);
        sf_generation_result_free(&again[r]);
        sf_generation_result_free(&res[r]);
    }
}

struct StreamLog {
    std::vector<std::pair<int32_t, int32_t>> calls;
    int stop_after = -1;
};

bool record(void *user, int32_t request, int32_t token, const char *text, size_t len) {
    auto *log = static_cast<StreamLog *>(user);
    EXPECT_EQ(text, nullptr);  // no tokenizer, no text
    EXPECT_EQ(len, 0u);
    log->calls.emplace_back(request, token);
    return !(log->stop_after >= 0 && (int)log->calls.size() >= log->stop_after);
}

TEST_F(Generate, StreamingSeesEveryTokenAndCanStop) {
    std::vector<int32_t> cu = {0, 5}, ids = prompts_[0];
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu.data();
    g.token_ids = ids.data();
    g.max_new_tokens = 6;
    StreamLog log;
    sf_generation_result res;
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, record, &log, &res), SF_OK);
    ASSERT_EQ(log.calls.size(), 6u);
    for (int i = 0; i < 6; i++) EXPECT_EQ(log.calls[i].second, res.tokens[i]);
    sf_generation_result_free(&res);
    log = StreamLog{};
    log.stop_after = 2;
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, record, &log, &res), SF_OK);
    EXPECT_EQ(res.finish, SF_FINISH_CALLBACK);
    EXPECT_EQ(res.n_tokens, 2);
    sf_generation_result_free(&res);
}

// Guarded generation with a fresh Sysformer is unguarded generation; stop strings need a
// tokenizer, and a Sysformer needs spans.
TEST_F(Generate, GuardedWithAFreshSysformerAndArgumentChecks) {
    sf_sysformer_config c = sf_sysformer_default_config(llm_);
    sf_sysformer *sf = nullptr;
    ASSERT_EQ(sf_sysformer_init(llm_, &c, 3, &sf), SF_OK);
    std::vector<int32_t> ids = {1, 5, 6, 7, 2, 9, 10, 3}, cu = {0, 8};
    sf_prompt_spans spans = {1, 3, 1, 2, 1};
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu.data();
    g.token_ids = ids.data();
    g.spans = &spans;
    g.max_new_tokens = 6;
    sf_generation_result guarded, plain;
    ASSERT_EQ(sf_generate_cpu(llm_, sf, nullptr, &g, nullptr, nullptr, &guarded), SF_OK)
        << sf_last_error();
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, &plain), SF_OK);
    ASSERT_EQ(guarded.n_tokens, plain.n_tokens);
    EXPECT_EQ(0, memcmp(guarded.tokens, plain.tokens, plain.n_tokens * sizeof(int32_t)));
    sf_generation_result_free(&guarded);
    sf_generation_result_free(&plain);

    g.spans = nullptr;
    EXPECT_EQ(sf_generate_cpu(llm_, sf, nullptr, &g, nullptr, nullptr, &plain), SF_ERR_INVALID_ARGUMENT);
    g.spans = &spans;
    const char *stop = "x";
    g.stop_strings = &stop;
    g.n_stop_strings = 1;
    EXPECT_EQ(sf_generate_cpu(llm_, sf, nullptr, &g, nullptr, nullptr, &plain), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "tokenizer"), nullptr);
    sf_sysformer_free(sf);
}

// Stop strings are cut from the end of a reply, which is valid UTF-8: a NULL one or one that is
// not valid UTF-8 (which could cut a character in two) is refused before anything runs, and
// so are negative list lengths and an infinite temperature.
TEST_F(Generate, RefusesBadStopStringsAndSettings) {
    sf_tokenizer *tok = nullptr;
    const std::string dir =
        std::string(SF_TEST_DATA_DIR) + "/tokenizer/synthetic/synth-bytelevel-nfc";
    ASSERT_EQ(sf_tokenizer_load(dir.c_str(), &tok), SF_OK) << sf_last_error();
    std::vector<int32_t> ids = {1, 5, 6, 7}, cu = {0, 4};
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu.data();
    g.token_ids = ids.data();
    g.max_new_tokens = 2;
    const char *stops[2] = {"\xc3\xa9", nullptr}; // "é", then each bad string in turn
    g.stop_strings = stops;
    g.n_stop_strings = 2;
    sf_generation_result res[1];
    const struct {
        const char *stop, *message;
    } bad[] = {{nullptr, "stop string 1 is NULL"},
               {"ab\xc3", "stop string 1 is not valid UTF-8 (at byte 2)"},   // cut short
               {"\xa9", "stop string 1 is not valid UTF-8 (at byte 0)"},     // a continuation
               {"\xed\xa0\x80", "stop string 1 is not valid UTF-8 (at byte 0)"}}; // a surrogate
    for (const auto &b : bad) {
        stops[1] = b.stop;
        EXPECT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, res),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(strstr(sf_last_error(), b.message), nullptr) << sf_last_error();
    }
    stops[1] = "\xe2\x82\xac"; // "€": both valid
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, res), SF_OK)
        << sf_last_error();
    sf_generation_result_free(res);
    g.n_stop_strings = -1;
    EXPECT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, res),
              SF_ERR_INVALID_ARGUMENT);
    g.n_stop_strings = 0;
    g.n_stop_ids = -1;
    EXPECT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, res),
              SF_ERR_INVALID_ARGUMENT);
    g.n_stop_ids = 0;
    // and an infinite temperature (sf_sample's rule), for the batch or one request
    g.sampling.temperature = INFINITY;
    EXPECT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, res),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "sampling.temperature is infinite"), nullptr)
        << sf_last_error();
    g.sampling.temperature = 0.0f;
    sf_sampling own = {};
    own.temperature = INFINITY;
    g.request_sampling = &own;
    EXPECT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, res),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "request_sampling[0].temperature"), nullptr)
        << sf_last_error();
    sf_tokenizer_free(tok);
}

}  // namespace
