// Loading a model directory: the checks that tie config.json to the tensors, and what a user
// sees when a checkpoint is incomplete, misshapen, truncated or paired with an absurd config.
#include <gtest/gtest.h>

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "io/safetensors.h"
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
