// SmolLM2-135M-Instruct (the real Q4_1 GGUF) against transformers loading the same file in fp32.
//
// Needs the model: weights/fetch_smollm2.sh puts it in weights/smollm2/ (CI fetches it), or set
// SF_SMOLLM2_GGUF. Without it the tests skip and say so.
//
// Tolerance, derived: both sides dequantise the same Q4_1/Q8_0 blocks to fp32 (exactly: a
// block's value is d*q + m computed in fp32 on both sides) and then run fp32 math that differs
// in summation order only. Per layer that is ~sqrt(K)*u ~ 1e-6 relative (K <= 1536) for each
// of ~8 chained ops; over 30 layers, with RMSNorm re-scaling rather than amplifying, the
// errors add up to ~30 * 8 * 1e-6 ~ 2.5e-4 at the very worst and ~sqrt(240) * 1e-6 ~ 2e-5 as a
// random walk. We hold the last-position logits to 2e-4 normwise; the measured value is printed
// with SF_TEST_VERBOSE=1. A wrong q/k un-permutation or a mis-dequantised block moves them by
// >= 1e-1. Greedy decoding must agree on at least the first 32 tokens (the bar; a tie
// at the 1e-5 level could legitimately flip a later one, and the count is printed).
#include <gtest/gtest.h>

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model_fixtures.h"
#include "sysformer.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif
#ifndef SF_SOURCE_DIR
#define SF_SOURCE_DIR "."
#endif

namespace {

std::string smollm2_path() {
    const char *env = getenv("SF_SMOLLM2_GGUF");
    std::string p = env ? env : std::string(SF_SOURCE_DIR) + "/weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    struct stat st;
    return stat(p.c_str(), &st) == 0 ? p : std::string();
}

class SmolLM2 : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        path_ = smollm2_path();
        if (path_.empty()) return;
        if (sf_llm_load(path_.c_str(), &llm_) != SF_OK) {
            load_error_ = sf_last_error();
            llm_ = nullptr;
        }
    }
    static void TearDownTestSuite() {
        sf_llm_free(llm_);
        llm_ = nullptr;
    }
    void SetUp() override {
        if (path_.empty()) {
            GTEST_SKIP() << "SmolLM2-135M-Instruct GGUF not found: run weights/fetch_smollm2.sh "
                            "or set SF_SMOLLM2_GGUF";
        }
        ASSERT_NE(llm_, nullptr) << load_error_;
        sf_st_archive *ar = nullptr;
        const std::string golden = std::string(SF_TEST_DATA_DIR) + "/smollm2/golden.safetensors";
        ASSERT_EQ(sf_st_open(golden.c_str(), &ar), SF_OK) << sf_last_error();
        auto get = [&](const char *name, auto &vec) {
            const sf_st_tensor *t = sf_st_find(ar, name);
            ASSERT_NE(t, nullptr) << name;
            vec.resize((size_t)t->numel);
            memcpy(vec.data(), t->data, (size_t)t->nbytes);
            if (!strcmp(name, "greedy_ids")) n_new_ = t->shape[1];
        };
        get("cu_seqlens", cu_);
        get("prompt_ids", ids_);
        get("last_logits", logits_);
        get("greedy_ids", greedy_);
        sf_st_close(ar);
    }

    static std::string path_, load_error_;
    static sf_llm *llm_;
    std::vector<int32_t> cu_, ids_, greedy_;
    std::vector<float> logits_;
    int64_t n_new_ = 0;
};
std::string SmolLM2::path_, SmolLM2::load_error_;
sf_llm *SmolLM2::llm_ = nullptr;

TEST_F(SmolLM2, ConfigFromGgufMetadata) {
    const sf_llm_config *c = sf_llm_get_config(llm_);
    EXPECT_EQ(c->arch, SF_ARCH_LLAMA);
    EXPECT_EQ(c->hidden_size, 576);
    EXPECT_EQ(c->num_layers, 30);
    EXPECT_EQ(c->num_heads, 9);
    EXPECT_EQ(c->num_kv_heads, 3);
    EXPECT_EQ(c->head_dim, 64);
    EXPECT_EQ(c->vocab_size, 49152);
    EXPECT_TRUE(c->tie_word_embeddings);
}

TEST_F(SmolLM2, PackedPromptLogitsMatchTransformers) {
    const int32_t n = (int32_t)cu_.size() - 1, vocab = 49152;
    std::vector<int32_t> last(n);
    for (int32_t r = 0; r < n; r++) last[r] = cu_[r + 1] - 1;
    std::vector<float> got((size_t)n * vocab);
    sf_batch b = {n, cu_.data(), ids_.data(), nullptr, nullptr, n, last.data()};
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &b, got.data()), SF_OK) << sf_last_error();
    for (int32_t r = 0; r < n; r++) {
        const double err = rel_error(&got[(size_t)r * vocab], &logits_[(size_t)r * vocab], vocab);
        EXPECT_LE(err, 2e-4) << "prompt " << r;
        if (getenv("SF_TEST_VERBOSE")) printf("  prompt %d: normwise %.2e\n", r, err);
    }
}

TEST_F(SmolLM2, GreedyContinuationMatchesTransformers) {
    const int32_t n = (int32_t)cu_.size() - 1;
    sf_generation g = {};
    g.n_requests = n;
    g.cu_seqlens = cu_.data();
    g.token_ids = ids_.data();
    g.max_new_tokens = (int32_t)n_new_;
    std::vector<sf_generation_result> res(n);
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, res.data()), SF_OK)
        << sf_last_error();
    for (int32_t r = 0; r < n; r++) {
        ASSERT_EQ(res[r].n_tokens, n_new_);
        int same = 0;
        while (same < n_new_ && res[r].tokens[same] == greedy_[(size_t)r * n_new_ + same]) same++;
        EXPECT_GE(same, 32) << "prompt " << r;
        if (getenv("SF_TEST_VERBOSE")) printf("  prompt %d: %d of %lld greedy tokens agree\n", r, same, (long long)n_new_);
        sf_generation_result_free(&res[r]);
    }
}

struct Streamed {
    std::string text;
    int calls = 0;
};

bool collect(void *user, int32_t, int32_t, const char *text, size_t len) {
    auto *s = static_cast<Streamed *>(user);
    s->text.append(text, len);
    s->calls++;
    return true;
}

// Text out: the streamed pieces add up to the reply, the reply is the decoded tokens, and a
// stop string ends the reply and is removed from it.
TEST_F(SmolLM2, StreamedTextAndStopStrings) {
    sf_tokenizer *tok = nullptr;
    ASSERT_EQ(sf_tokenizer_load(path_.c_str(), &tok), SF_OK) << sf_last_error();
    std::vector<int32_t> ids(256);
    int32_t n = 0;
    sf_prompt_spans spans;
    ASSERT_EQ(sf_chat_encode(tok, SF_TEMPLATE_CHATML, "You are a helpful assistant.", nullptr, 0,
                             "What is the capital of France?", ids.data(), 256, &n, &spans),
              SF_OK);
    int32_t cu[2] = {0, n};
    const int32_t eot = sf_tokenizer_token_id(tok, "<|im_end|>");
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu;
    g.token_ids = ids.data();
    g.max_new_tokens = 24;
    g.stop_ids = &eot;
    g.n_stop_ids = 1;
    Streamed streamed;
    sf_generation_result res;
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, collect, &streamed, &res), SF_OK) << sf_last_error();
    EXPECT_EQ(res.finish, SF_FINISH_STOP_TOKEN);
    ASSERT_NE(res.text, nullptr);
    EXPECT_EQ(streamed.text, res.text);
    EXPECT_EQ(streamed.calls, res.n_tokens);
    EXPECT_NE(strstr(res.text, "Paris"), nullptr) << res.text;
    char decoded[512];
    size_t len = 0;
    ASSERT_EQ(sf_tokenizer_decode(tok, res.tokens, res.n_tokens, true, decoded, sizeof decoded, &len), SF_OK);
    EXPECT_STREQ(decoded, res.text);
    sf_generation_result_free(&res);

    const char *stop = "Paris";
    g.stop_strings = &stop;
    g.n_stop_strings = 1;
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, tok, &g, nullptr, nullptr, &res), SF_OK) << sf_last_error();
    EXPECT_EQ(res.finish, SF_FINISH_STOP_STRING);
    EXPECT_EQ(strstr(res.text, "Paris"), nullptr) << res.text;
    EXPECT_NE(strstr(res.text, "capital of France is"), nullptr) << res.text;
    sf_generation_result_free(&res);
    sf_tokenizer_free(tok);
}

}  // namespace
