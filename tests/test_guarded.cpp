// Guarded prompt assembly and the guarded prefill: spans, the splice of S' into the LLM's input
// embeddings, identity with a fresh Sysformer, batch invariance, and decode after it.
#include <gtest/gtest.h>

#include <string.h>

#include <algorithm>
#include <vector>

#include "model_fixtures.h"
#include "sysformer.h"

namespace {

class Guarded : public ::testing::Test {
  protected:
    void SetUp() override {
        sf_llm_config cfg = tiny_llama_config();
        ASSERT_EQ(sf_random_llm_write(dir_.path().c_str(), &cfg, 21), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        vocab_ = sf_llm_get_config(llm_)->vocab_size;
        d_ = sf_llm_get_config(llm_)->hidden_size;
    }
    void TearDown() override {
        sf_sysformer_free(fresh_);
        sf_sysformer_free(trained_);
        sf_llm_free(llm_);
    }

    // A Sysformer with every weight random, so that S' depends on S and on the user span.
    sf_sysformer *trained() {
        if (!trained_) {
            sf_sysformer_config c = sf_sysformer_default_config(llm_);
            write_trained_sysformer(llm_, c, 8, sf_dir_.path());
            EXPECT_EQ(sf_sysformer_load(sf_dir_.path().c_str(), llm_, &trained_), SF_OK)
                << sf_last_error();
        }
        return trained_;
    }
    sf_sysformer *fresh() {
        if (!fresh_) {
            sf_sysformer_config c = sf_sysformer_default_config(llm_);
            EXPECT_EQ(sf_sysformer_init(llm_, &c, 8, &fresh_), SF_OK) << sf_last_error();
        }
        return fresh_;
    }

    // Three chat prompts of different shapes through one template.
    void assemble(std::vector<int32_t> *ids, std::vector<int32_t> *cu,
                  std::vector<sf_prompt_spans> *spans) {
        const int32_t prefix[] = {1, 60, 61}, middle[] = {62, 63}, suffix[] = {64, 65, 66};
        sf_chat_template t = {prefix, 3, middle, 2, suffix, 3};
        const std::vector<std::vector<int32_t>> sys = {{10, 11, 12, 13, 14}, {20}, {30, 31, 32}};
        const std::vector<std::vector<int32_t>> usr = {{40, 41}, {42, 43, 44, 45, 46, 47, 48}, {49}};
        cu->assign(1, 0);
        ids->clear();
        spans->clear();
        for (size_t r = 0; r < sys.size(); r++) {
            std::vector<int32_t> buf(64);
            sf_prompt_spans s;
            ASSERT_EQ(sf_assemble_prompt(&t, sys[r].data(), (int32_t)sys[r].size(), usr[r].data(),
                                         (int32_t)usr[r].size(), buf.data(), 64, &s),
                      SF_OK)
                << sf_last_error();
            const int32_t n = s.prefix + s.system + s.middle + s.user + s.suffix;
            ids->insert(ids->end(), buf.begin(), buf.begin() + n);
            cu->push_back(cu->back() + n);
            spans->push_back(s);
        }
    }

    TempDir dir_, sf_dir_;
    sf_llm *llm_ = nullptr;
    sf_sysformer *fresh_ = nullptr, *trained_ = nullptr;
    int vocab_ = 0, d_ = 0;
};

TEST_F(Guarded, AssemblePutsThePiecesInOrder) {
    const int32_t prefix[] = {1, 2}, middle[] = {3}, suffix[] = {4, 5};
    const int32_t sys[] = {10, 11, 12}, usr[] = {20, 21};
    sf_chat_template t = {prefix, 2, middle, 1, suffix, 2};
    int32_t out[10];
    sf_prompt_spans s;
    ASSERT_EQ(sf_assemble_prompt(&t, sys, 3, usr, 2, out, 10, &s), SF_OK);
    const int32_t want[] = {1, 2, 10, 11, 12, 3, 20, 21, 4, 5};
    EXPECT_EQ(0, memcmp(out, want, sizeof want));
    EXPECT_EQ(s.prefix, 2);
    EXPECT_EQ(s.system, 3);
    EXPECT_EQ(s.middle, 1);
    EXPECT_EQ(s.user, 2);
    EXPECT_EQ(s.suffix, 2);
    EXPECT_EQ(sf_assemble_prompt(&t, sys, 3, usr, 2, out, 9, &s), SF_ERR_OUT_OF_RANGE);
    EXPECT_NE(strstr(sf_last_error(), "10 tokens"), nullptr) << sf_last_error();
    sf_chat_template empty = {};
    ASSERT_EQ(sf_assemble_prompt(&empty, sys, 3, usr, 2, out, 10, &s), SF_OK);
    EXPECT_EQ(s.prefix + s.middle + s.suffix, 0);
    EXPECT_EQ(sf_assemble_prompt(&t, nullptr, 3, usr, 2, out, 10, &s), SF_ERR_INVALID_ARGUMENT);
}

// The splice: rows outside the system spans are E[token]; the system spans hold S' computed
// from that request's own system and user embeddings.
TEST_F(Guarded, EmbedSplicesTheRewrittenSystemSpan) {
    std::vector<int32_t> ids, cu;
    std::vector<sf_prompt_spans> spans;
    assemble(&ids, &cu, &spans);
    const int32_t total = cu.back();
    sf_guarded_batch b = {3, cu.data(), ids.data(), spans.data(), nullptr, 0, nullptr};
    std::vector<float> plain((size_t)total * d_), guarded((size_t)total * d_);
    ASSERT_EQ(sf_guarded_embed_cpu(llm_, nullptr, &b, plain.data()), SF_OK) << sf_last_error();
    ASSERT_EQ(sf_guarded_embed_cpu(llm_, trained(), &b, guarded.data()), SF_OK) << sf_last_error();

    for (int r = 0; r < 3; r++) {
        const sf_prompt_spans &s = spans[r];
        const int32_t sys0 = cu[r] + s.prefix, sys1 = sys0 + s.system;
        for (int32_t row = cu[r]; row < cu[r + 1]; row++) {
            const bool in_system = row >= sys0 && row < sys1;
            const int same = memcmp(&plain[(size_t)row * d_], &guarded[(size_t)row * d_], d_ * 4);
            EXPECT_EQ(same != 0, in_system) << "request " << r << " row " << row;
        }
        // S' of this request alone, from its own spans.
        const int32_t usr0 = sys1 + s.middle;
        int32_t cu_s[2] = {0, s.system}, cu_u[2] = {0, s.user};
        sf_rewrite_batch rb = {1, cu_s, cu_u, &plain[(size_t)sys0 * d_], &plain[(size_t)usr0 * d_]};
        std::vector<float> want((size_t)s.system * d_);
        ASSERT_EQ(sf_sysformer_forward_cpu(trained(), &rb, want.data()), SF_OK);
        EXPECT_LE(rel_error(&guarded[(size_t)sys0 * d_], want.data(), want.size()), 1e-5);
    }
}

// With a fresh Sysformer the guarded prompt is the unguarded prompt: identical embeddings, so
// identical logits, bit for bit, through prefill and decode.
TEST_F(Guarded, FreshSysformerGivesTheUnguardedLogitsBitForBit) {
    std::vector<int32_t> ids, cu;
    std::vector<sf_prompt_spans> spans;
    assemble(&ids, &cu, &spans);
    const int32_t total = cu.back();
    std::vector<int32_t> rows(total);
    for (int32_t i = 0; i < total; i++) rows[i] = i;
    std::vector<float> guarded((size_t)total * vocab_), plain((size_t)total * vocab_);

    std::vector<sf_kv_cache *> gk(3), pk(3);
    for (int r = 0; r < 3; r++) {
        ASSERT_EQ(sf_kv_cache_create(llm_, 48, &gk[r]), SF_OK);
        ASSERT_EQ(sf_kv_cache_create(llm_, 48, &pk[r]), SF_OK);
    }
    sf_guarded_batch gb = {3, cu.data(), ids.data(), spans.data(), gk.data(), total, rows.data()};
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, fresh(), &gb, guarded.data()), SF_OK) << sf_last_error();
    sf_batch pb = {3, cu.data(), ids.data(), nullptr, pk.data(), total, rows.data()};
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &pb, plain.data()), SF_OK) << sf_last_error();
    EXPECT_EQ(0, memcmp(guarded.data(), plain.data(), plain.size() * sizeof(float)));

    // Decode continues on the caches as usual.
    int32_t step_cu[4] = {0, 1, 2, 3}, step_rows[3] = {0, 1, 2}, step_ids[3] = {5, 6, 7};
    sf_batch gd = {3, step_cu, step_ids, nullptr, gk.data(), 3, step_rows};
    sf_batch pd = {3, step_cu, step_ids, nullptr, pk.data(), 3, step_rows};
    std::vector<float> g1(3 * (size_t)vocab_), p1(3 * (size_t)vocab_);
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &gd, g1.data()), SF_OK);
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &pd, p1.data()), SF_OK);
    EXPECT_EQ(0, memcmp(g1.data(), p1.data(), p1.size() * sizeof(float)));
    for (int r = 0; r < 3; r++) {
        EXPECT_EQ(sf_kv_cache_length(gk[r]), cu[r + 1] - cu[r] + 1);
        sf_kv_cache_free(gk[r]);
        sf_kv_cache_free(pk[r]);
    }
}

// A rewriting Sysformer: the packed batch gives each request what it gets alone.
TEST_F(Guarded, PackedGuardedBatchMatchesRequestsAlone) {
    std::vector<int32_t> ids, cu;
    std::vector<sf_prompt_spans> spans;
    assemble(&ids, &cu, &spans);
    int32_t last[3] = {cu[1] - 1, cu[2] - 1, cu[3] - 1};
    sf_guarded_batch b = {3, cu.data(), ids.data(), spans.data(), nullptr, 3, last};
    std::vector<float> packed(3 * (size_t)vocab_);
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b, packed.data()), SF_OK) << sf_last_error();
    std::vector<float> unguarded(3 * (size_t)vocab_);
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, nullptr, &b, unguarded.data()), SF_OK);
    EXPECT_GT(rel_error(packed.data(), unguarded.data(), packed.size()), 1e-3);

    for (int r = 0; r < 3; r++) {
        int32_t one_cu[2] = {0, cu[r + 1] - cu[r]}, one_last = one_cu[1] - 1;
        sf_guarded_batch one = {1, one_cu, ids.data() + cu[r], &spans[r], nullptr, 1, &one_last};
        std::vector<float> alone(vocab_);
        ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &one, alone.data()), SF_OK);
        // Summation order only (see test_llm_forward.cpp for the bound).
        EXPECT_LE(rel_error(packed.data() + (size_t)r * vocab_, alone.data(), vocab_), 1e-5)
            << "request " << r;
    }
}

// Continuous batching: one guarded batch carries a new guarded prompt between the next tokens
// of two requests already running, which have system span 0 (nothing to rewrite) and so may
// continue their caches. Each gets what it gets on its own: the new prompt its guarded prefill
// alone, the running requests a plain decode step of their caches. A system span into a used
// cache is still refused.
TEST_F(Guarded, RequestsWithoutASystemSpanContinueTheirCachesBesideANewPrompt) {
    std::vector<int32_t> ids, cu;
    std::vector<sf_prompt_spans> spans;
    assemble(&ids, &cu, &spans);  // prompts 0 and 1 run first, prompt 2 arrives later
    const int32_t len2 = cu[3] - cu[2];
    std::vector<sf_kv_cache *> kv(6, nullptr);  // mixed: 0, 1, 2; reference: 3, 4, 5
    for (auto &c : kv) ASSERT_EQ(sf_kv_cache_create(llm_, 48, &c), SF_OK);
    struct Free {
        std::vector<sf_kv_cache *> *kv;
        ~Free() {
            for (auto *c : *kv) sf_kv_cache_free(c);
        }
    } free_all{&kv};

    // 1. Prompts 0 and 1, guarded, into caches 0, 1 and (the same) 3, 4.
    int32_t last01[2] = {cu[1] - 1, cu[2] - 1};
    std::vector<float> first(2 * (size_t)vocab_);
    sf_kv_cache *run_a[2] = {kv[0], kv[1]}, *run_b[2] = {kv[3], kv[4]};
    sf_guarded_batch b01 = {2, cu.data(), ids.data(), spans.data(), run_a, 2, last01};
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b01, first.data()), SF_OK)
        << sf_last_error();
    b01.kv_caches = run_b;
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b01, first.data()), SF_OK)
        << sf_last_error();
    int32_t next[2];
    for (int r = 0; r < 2; r++) {
        const float *row = first.data() + (size_t)r * vocab_;
        next[r] = (int32_t)(std::max_element(row, row + vocab_) - row);
    }

    // 2. One batch: request 0's next token, prompt 2 (guarded, fresh cache 2), request 1's.
    std::vector<int32_t> mixed_ids = {next[0]};
    mixed_ids.insert(mixed_ids.end(), ids.begin() + cu[2], ids.end());
    mixed_ids.push_back(next[1]);
    const sf_prompt_spans one = {0, 0, 0, 0, 1};
    std::vector<sf_prompt_spans> mixed_spans = {one, spans[2], one};
    int32_t mixed_cu[4] = {0, 1, 1 + len2, 2 + len2}, mixed_last[3] = {0, len2, 1 + len2};
    sf_kv_cache *mixed_kv[3] = {kv[0], kv[2], kv[1]};
    sf_guarded_batch mixed = {3, mixed_cu, mixed_ids.data(), mixed_spans.data(), mixed_kv, 3,
                              mixed_last};
    std::vector<float> got(3 * (size_t)vocab_);
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &mixed, got.data()), SF_OK)
        << sf_last_error();
    EXPECT_EQ(sf_kv_cache_length(kv[0]), cu[1] + 1);
    EXPECT_EQ(sf_kv_cache_length(kv[1]), cu[2] - cu[1] + 1);
    EXPECT_EQ(sf_kv_cache_length(kv[2]), len2);

    // 3. Each on its own: a plain decode step of caches 3 and 4, prompt 2 guarded into cache 5.
    int32_t step_cu[3] = {0, 1, 2}, step_last[2] = {0, 1};
    sf_kv_cache *step_kv[2] = {kv[3], kv[4]};
    sf_batch step = {2, step_cu, next, nullptr, step_kv, 2, step_last};
    std::vector<float> decoded(2 * (size_t)vocab_), alone(vocab_);
    ASSERT_EQ(sf_llm_forward_cpu(llm_, &step, decoded.data()), SF_OK) << sf_last_error();
    int32_t cu2[2] = {0, len2}, last2 = len2 - 1;
    sf_kv_cache *kv2 = kv[5];
    sf_guarded_batch b2 = {1, cu2, ids.data() + cu[2], &spans[2], &kv2, 1, &last2};
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b2, alone.data()), SF_OK)
        << sf_last_error();
    // Summation order only (see test_llm_forward.cpp for the bound).
    EXPECT_LE(rel_error(got.data(), decoded.data(), vocab_), 1e-5) << "request 0's next token";
    EXPECT_LE(rel_error(got.data() + vocab_, alone.data(), vocab_), 1e-5) << "the new prompt";
    EXPECT_LE(rel_error(got.data() + 2 * (size_t)vocab_, decoded.data() + vocab_, vocab_), 1e-5)
        << "request 1's next token";
    b2.kv_caches = nullptr;
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, nullptr, &b2, alone.data()), SF_OK);
    EXPECT_GT(rel_error(got.data() + vocab_, alone.data(), vocab_), 1e-3)
        << "the new prompt was not guarded: the test is void";

    // 4. Prompt 2 (a system span) into cache 0, which is running: refused.
    mixed_kv[1] = kv[0];
    mixed_kv[0] = kv[3];
    mixed_kv[2] = kv[4];
    EXPECT_EQ(sf_guarded_forward_cpu(llm_, trained(), &mixed, got.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "request 1's KV cache is not empty"), nullptr)
        << sf_last_error();
}

TEST_F(Guarded, RejectsBadSpansAndUsedCaches) {
    std::vector<int32_t> ids, cu;
    std::vector<sf_prompt_spans> spans;
    assemble(&ids, &cu, &spans);
    int32_t last = cu[1] - 1;
    std::vector<float> logits(vocab_);
    spans[1].suffix += 1;  // no longer adds up
    sf_guarded_batch b = {3, cu.data(), ids.data(), spans.data(), nullptr, 1, &last};
    EXPECT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "request 1's spans"), nullptr) << sf_last_error();
    spans[1].suffix -= 1;

    // Request 2 with an empty user span while its system span is not empty.
    spans[2].suffix += spans[2].user;
    spans[2].user = 0;
    EXPECT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "empty user span"), nullptr) << sf_last_error();
    // Unguarded, the same spans are fine: there is nothing to rewrite.
    EXPECT_EQ(sf_guarded_forward_cpu(llm_, nullptr, &b, logits.data()), SF_OK) << sf_last_error();
    assemble(&ids, &cu, &spans);

    std::vector<sf_kv_cache *> caches(3);
    for (auto &kv : caches) ASSERT_EQ(sf_kv_cache_create(llm_, 48, &kv), SF_OK);
    b.kv_caches = caches.data();
    ASSERT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b, logits.data()), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "not empty"), nullptr) << sf_last_error();
    for (auto *kv : caches) sf_kv_cache_free(kv);

    ids[4] = vocab_;  // an id out of range inside a system span
    b.kv_caches = nullptr;
    EXPECT_EQ(sf_guarded_forward_cpu(llm_, trained(), &b, logits.data()), SF_ERR_INVALID_ARGUMENT);
}

}  // namespace
