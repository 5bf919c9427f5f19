// Loading a model directory: the checks that tie config.json to the tensors, and what a user
// sees when a checkpoint is incomplete, misshapen, truncated or paired with an absurd config.
#include <gtest/gtest.h>

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/llm.h"
#include "model_fixtures.h"
#include "sysformer.h"

namespace {

std::string read_text(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void write_text(const std::string &path, const std::string &text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
}

class LlmLoad : public ::testing::Test {
  protected:
    void SetUp() override {
        ASSERT_FALSE(good_.path().empty());
        sf_llm_config cfg = tiny_llama_config();
        ASSERT_EQ(sf_random_llm_write(good_.path().c_str(), &cfg, 7), SF_OK) << sf_last_error();
    }

    // Copies the good model into bad_, passing each tensor through edit (which may change it or
    // return false to drop it), and the config through edit_config.
    void write_variant(const std::function<bool(sf_st_entry &)> &edit,
                       const std::function<std::string(std::string)> &edit_config =
                           [](std::string s) { return s; }) {
        sf_st_archive *ar = nullptr;
        ASSERT_EQ(sf_st_open(good_.path().c_str(), &ar), SF_OK) << sf_last_error();
        std::vector<sf_st_entry> entries;
        for (int64_t i = 0; i < sf_st_count(ar); i++) {
            const sf_st_tensor *t = sf_st_at(ar, i);
            sf_st_entry e = {};
            e.name = t->name;
            e.dtype = t->dtype;
            e.ndim = t->ndim;
            for (int j = 0; j < t->ndim; j++) e.shape[j] = t->shape[j];
            e.data = t->data;
            if (edit(e)) entries.push_back(e);
        }
        ASSERT_EQ(sf_st_write(bad_.file("model.safetensors").c_str(), entries.data(),
                              (int64_t)entries.size(), nullptr),
                  SF_OK)
            << sf_last_error();
        sf_st_close(ar);
        write_text(bad_.file("config.json"), edit_config(read_text(good_.file("config.json"))));
    }

    sf_status load_bad() {
        sf_llm *llm = reinterpret_cast<sf_llm *>(0x1);  // must be reset to NULL on failure
        sf_status st = sf_llm_load(bad_.path().c_str(), &llm);
        EXPECT_EQ(llm == nullptr, st != SF_OK);
        sf_llm_free(llm);
        return st;
    }

    TempDir good_, bad_;
};

TEST_F(LlmLoad, LoadsTheRandomModelWithItsConfig) {
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(good_.path().c_str(), &llm), SF_OK) << sf_last_error();
    const sf_llm_config *c = sf_llm_get_config(llm);
    const sf_llm_config want = tiny_llama_config();
    EXPECT_EQ(c->arch, SF_ARCH_LLAMA);
    EXPECT_EQ(c->vocab_size, want.vocab_size);
    EXPECT_EQ(c->hidden_size, want.hidden_size);
    EXPECT_EQ(c->num_kv_heads, want.num_kv_heads);
    EXPECT_EQ(c->head_dim, want.head_dim);
    EXPECT_EQ(c->rope.type, SF_ROPE_LLAMA3);
    EXPECT_FALSE(c->tie_word_embeddings);
    sf_llm_free(llm);
    sf_llm_free(nullptr);
}

TEST_F(LlmLoad, MissingTensorIsNamed) {
    write_variant([](sf_st_entry &e) { return strcmp(e.name, "model.layers.1.mlp.up_proj.weight"); });
    EXPECT_EQ(load_bad(), SF_ERR_NOT_FOUND);
    EXPECT_NE(strstr(sf_last_error(), "model.layers.1.mlp.up_proj.weight"), nullptr)
        << sf_last_error();
}

TEST_F(LlmLoad, WrongShapeIsNamed) {
    // Same number of elements, transposed: only a shape check can catch it.
    write_variant([](sf_st_entry &e) {
        if (!strcmp(e.name, "model.layers.0.mlp.down_proj.weight")) std::swap(e.shape[0], e.shape[1]);
        return true;
    });
    EXPECT_EQ(load_bad(), SF_ERR_SHAPE);
    EXPECT_NE(strstr(sf_last_error(), "model.layers.0.mlp.down_proj.weight"), nullptr)
        << sf_last_error();
}

TEST_F(LlmLoad, IntegerTensorIsRefused) {
    write_variant([](sf_st_entry &e) {
        if (!strcmp(e.name, "model.norm.weight")) e.dtype = SF_DTYPE_I32;
        return true;
    });
    EXPECT_EQ(load_bad(), SF_ERR_SHAPE);
    EXPECT_NE(strstr(sf_last_error(), "model.norm.weight"), nullptr) << sf_last_error();
}

TEST_F(LlmLoad, ConfigDisagreeingWithTheTensors) {
    // hidden_size 32 -> 64 with head_dim unchanged: every projection's shape is now wrong.
    write_variant([](sf_st_entry &) { return true; },
                  [](std::string s) {
                      const std::string from = "\"hidden_size\": 32", to = "\"hidden_size\": 64";
                      size_t at = s.find(from);
                      EXPECT_NE(at, std::string::npos) << s;
                      if (at != std::string::npos) s.replace(at, from.size(), to);
                      return s;
                  });
    EXPECT_EQ(load_bad(), SF_ERR_SHAPE);
}

TEST_F(LlmLoad, AbsurdConfigValues) {
    write_variant([](sf_st_entry &) { return true; },
                  [](std::string s) {
                      const std::string from = "\"num_hidden_layers\": 2";
                      size_t at = s.find(from);
                      EXPECT_NE(at, std::string::npos) << s;
                      if (at != std::string::npos) s.replace(at, from.size(), "\"num_hidden_layers\": 0");
                      return s;
                  });
    EXPECT_EQ(load_bad(), SF_ERR_CONFIG);
    EXPECT_NE(strstr(sf_last_error(), "num_hidden_layers"), nullptr) << sf_last_error();
}

TEST_F(LlmLoad, MalformedConfigJson) {
    write_variant([](sf_st_entry &) { return true; },
                  [](std::string s) { return s.substr(0, s.size() / 2); });
    EXPECT_EQ(load_bad(), SF_ERR_FORMAT);
    EXPECT_NE(strstr(sf_last_error(), "config.json"), nullptr) << sf_last_error();
}

TEST_F(LlmLoad, TruncatedWeights) {
    write_variant([](sf_st_entry &) { return true; });
    const std::string path = bad_.file("model.safetensors");
    struct stat st;
    ASSERT_EQ(stat(path.c_str(), &st), 0);
    ASSERT_EQ(truncate(path.c_str(), st.st_size - 100), 0);
    EXPECT_EQ(load_bad(), SF_ERR_FORMAT);
    EXPECT_NE(strstr(sf_last_error(), "model.safetensors"), nullptr) << sf_last_error();
}

TEST_F(LlmLoad, MissingFiles) {
    // No config.json at all.
    sf_llm *llm = nullptr;
    EXPECT_EQ(sf_llm_load(bad_.path().c_str(), &llm), SF_ERR_IO);
    EXPECT_NE(strstr(sf_last_error(), "config.json"), nullptr) << sf_last_error();
    // A config but no weights.
    write_text(bad_.file("config.json"), read_text(good_.file("config.json")));
    EXPECT_EQ(sf_llm_load(bad_.path().c_str(), &llm), SF_ERR_NOT_FOUND);
    EXPECT_EQ(llm, nullptr);
    EXPECT_EQ(sf_llm_load(nullptr, &llm), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_llm_load(good_.path().c_str(), nullptr), SF_ERR_INVALID_ARGUMENT);
}

// sf_llm_load_embeddings: the configuration and the embedding table alone, with the values of
// a whole load; a checkpoint holding nothing else loads that way (nothing else is read) and not
// whole; sf_llm_embed, a Sysformer and sf_guarded_embed_cpu work on it, giving what they give
// on the whole model; every function that runs the LLM refuses it with SF_ERR_UNSUPPORTED.
TEST_F(LlmLoad, EmbeddingsOnly) {
    sf_llm *whole = nullptr, *emb = nullptr;
    ASSERT_EQ(sf_llm_load(good_.path().c_str(), &whole), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> whole_guard(whole, sf_llm_free);
    write_variant([](sf_st_entry &e) { return !strcmp(e.name, "model.embed_tokens.weight"); });
    EXPECT_EQ(load_bad(), SF_ERR_NOT_FOUND);
    ASSERT_EQ(sf_llm_load_embeddings(bad_.path().c_str(), &emb), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> emb_guard(emb, sf_llm_free);
    const sf_llm_config &c = *sf_llm_get_config(whole), &ce = *sf_llm_get_config(emb);
    EXPECT_EQ(ce.vocab_size, c.vocab_size);
    EXPECT_EQ(ce.hidden_size, c.hidden_size);
    EXPECT_EQ(ce.num_layers, c.num_layers);
    const int64_t d = c.hidden_size;
    std::vector<int32_t> ids((size_t)c.vocab_size);
    for (int32_t i = 0; i < c.vocab_size; i++) ids[i] = i;
    std::vector<float> ew(ids.size() * d), ee(ids.size() * d);
    ASSERT_EQ(sf_llm_embed(whole, ids.data(), (int64_t)ids.size(), ew.data()), SF_OK);
    ASSERT_EQ(sf_llm_embed(emb, ids.data(), (int64_t)ids.size(), ee.data()), SF_OK);
    EXPECT_EQ(ew, ee);
    char hw[32], he[32];
    ASSERT_EQ(sf_llm_embedding_hash(whole, hw, sizeof hw), SF_OK);
    ASSERT_EQ(sf_llm_embedding_hash(emb, he, sizeof he), SF_OK);
    EXPECT_STREQ(hw, he);

    // A Sysformer made for either model, the same guarded embeddings.
    sf_sysformer_config sc = sf_sysformer_default_config(emb);
    sc.num_heads = 4;
    sf_sysformer *sf = nullptr;
    ASSERT_EQ(sf_sysformer_init(emb, &sc, 3, &sf), SF_OK) << sf_last_error();
    std::unique_ptr<sf_sysformer, void (*)(sf_sysformer *)> sf_guard(sf, sf_sysformer_free);
    const std::vector<int32_t> tokens = {1, 5, 6, 7, 2, 9, 10, 11, 12, 3};
    const std::vector<int32_t> cu = {0, (int32_t)tokens.size()};
    const sf_prompt_spans spans = {1, 3, 1, 4, 1};
    sf_guarded_batch gb = {1, cu.data(), tokens.data(), &spans, nullptr, 0, nullptr};
    std::vector<float> gw(tokens.size() * d), ge(tokens.size() * d);
    ASSERT_EQ(sf_guarded_embed_cpu(whole, sf, &gb, gw.data()), SF_OK) << sf_last_error();
    ASSERT_EQ(sf_guarded_embed_cpu(emb, sf, &gb, ge.data()), SF_OK) << sf_last_error();
    EXPECT_EQ(gw, ge);

    // Running the LLM is refused, saying why.
    const int32_t last = cu[1] - 1;
    std::vector<float> logits((size_t)c.vocab_size);
    sf_batch b = {1, cu.data(), tokens.data(), nullptr, nullptr, 1, &last};
    EXPECT_EQ(sf_llm_forward_cpu(emb, &b, logits.data()), SF_ERR_UNSUPPORTED);
    EXPECT_NE(strstr(sf_last_error(), "sf_llm_load_embeddings"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_llm_forward_cpu(whole, &b, logits.data()), SF_OK) << sf_last_error();
    gb.n_logit_rows = 1;
    gb.logit_rows = &last;
    EXPECT_EQ(sf_guarded_forward_cpu(emb, sf, &gb, logits.data()), SF_ERR_UNSUPPORTED);
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu.data();
    g.token_ids = tokens.data();
    g.spans = &spans;
    g.max_new_tokens = 2;
    sf_generation_result res = {};
    EXPECT_EQ(sf_generate_cpu(emb, sf, nullptr, &g, nullptr, nullptr, &res), SF_ERR_UNSUPPORTED);
    sf_cuda_engine *engine = nullptr;
    const sf_status st = sf_cuda_engine_create(emb, sf, nullptr, &engine);
    EXPECT_TRUE(st == SF_ERR_UNSUPPORTED || (st == SF_ERR_NO_DEVICE && !sf_cuda_built()))
        << sf_status_string(st) << ": " << sf_last_error();
    EXPECT_EQ(engine, nullptr);
}

// sf_set_progress: a load reports "loading weights" from 0 to the bytes of fp32 weights (every
// tensor of the checkpoint, or the embedding table alone), rising, once per tensor; only to
// the thread that set it; not at all once it is cleared; and a failed load never reports
// completion.
struct ProgressLog {
    struct Event {
        std::string what;
        uint64_t done, total;
    };
    std::vector<Event> events;
    static void record(void *user, const char *what, uint64_t done, uint64_t total) {
        static_cast<ProgressLog *>(user)->events.push_back({what, done, total});
    }
};

TEST_F(LlmLoad, ReportsProgressToTheCallingThread) {
    sf_st_archive *ar = nullptr;
    ASSERT_EQ(sf_st_open(good_.path().c_str(), &ar), SF_OK) << sf_last_error();
    uint64_t elements = 0;
    for (int64_t i = 0; i < sf_st_count(ar); i++) {
        const sf_st_tensor *t = sf_st_at(ar, i);
        uint64_t n = 1;
        for (int j = 0; j < t->ndim; j++) n *= (uint64_t)t->shape[j];
        elements += n;
    }
    const int64_t n_tensors = sf_st_count(ar);
    sf_st_close(ar);
    const sf_llm_config cfg = tiny_llama_config();

    ProgressLog log;
    sf_set_progress(ProgressLog::record, &log);
    auto check = [&](const char *what_load, uint64_t want_total, size_t want_events) {
        ASSERT_EQ(log.events.size(), want_events) << what_load << ": one event per tensor + 1";
        for (size_t i = 0; i < log.events.size(); i++) {
            const ProgressLog::Event &e = log.events[i];
            EXPECT_EQ(e.what, "loading weights") << what_load;
            EXPECT_EQ(e.total, want_total) << what_load;
            if (i > 0) {
                EXPECT_GE(e.done, log.events[i - 1].done) << what_load;
            }
        }
        EXPECT_EQ(log.events.front().done, 0u) << what_load;
        EXPECT_EQ(log.events.back().done, want_total) << what_load;
    };
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(good_.path().c_str(), &llm), SF_OK) << sf_last_error();
    sf_llm_free(llm);
    check("whole", 4 * elements, (size_t)n_tensors + 1);
    log.events.clear();
    ASSERT_EQ(sf_llm_load_embeddings(good_.path().c_str(), &llm), SF_OK) << sf_last_error();
    sf_llm_free(llm);
    check("embeddings only", 4 * (uint64_t)cfg.vocab_size * (uint64_t)cfg.hidden_size, 2);

    // another thread's load is not reported here
    log.events.clear();
    std::thread other([&] {
        sf_llm *l = nullptr;
        EXPECT_EQ(sf_llm_load(good_.path().c_str(), &l), SF_OK) << sf_last_error();
        sf_llm_free(l);
    });
    other.join();
    EXPECT_TRUE(log.events.empty()) << "another thread's load reached this thread's function";

    // A read that fails on the third tensor (files are checked whole when opened, so no file
    // fails this late): the load started and reported the first two, and never completed.
    struct FailingSource {
        int reads = 0;
        static sf_status check(void *, const char *, int32_t, const int64_t *) { return SF_OK; }
        static sf_status read(void *ctx, const char *name, float *) {
            return ++static_cast<FailingSource *>(ctx)->reads == 3
                       ? sf_fail(SF_ERR_IO, "%s: planted read failure", name)
                       : SF_OK;
        }
    } failing;
    const sf_weight_source src = {&failing, FailingSource::check, FailingSource::read};
    sf_llm_config failing_cfg = tiny_llama_config();
    sf_llm *failed = nullptr;
    EXPECT_EQ(sf_llm_build(&failing_cfg, &src, false, &failed), SF_ERR_IO);
    EXPECT_EQ(failed, nullptr);
    ASSERT_EQ(log.events.size(), 3u) << "the start and two tensors";
    for (const ProgressLog::Event &e : log.events) EXPECT_LT(e.done, e.total) << "a failed load";

    // cleared: nothing
    log.events.clear();
    sf_set_progress(nullptr, &log);
    ASSERT_EQ(sf_llm_load(good_.path().c_str(), &llm), SF_OK) << sf_last_error();
    sf_llm_free(llm);
    EXPECT_TRUE(log.events.empty());
}

TEST(Status, EveryStatusHasAName) {
    for (int s = SF_OK; s <= SF_ERR_NO_DEVICE; s++) {
        const char *name = sf_status_string((sf_status)s);
        ASSERT_NE(name, nullptr);
        EXPECT_STRNE(name, "unknown status") << s;
    }
    EXPECT_STREQ(sf_status_string((sf_status)999), "unknown status");
    sf_clear_error();
    EXPECT_STREQ(sf_last_error(), "");
}

}  // namespace
