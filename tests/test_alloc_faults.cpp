// What the library does when host memory runs out: each public operation that allocates
// (loading a model from safetensors and from GGUF, a tokenizer, a Sysformer; encoding a chat;
// a guarded generation; a training run; the evaluation's reports and jailbreak wrappers) is
// run once to count its allocations, then again with each of them failing in turn (every one,
// or 1000 spread over them when there are more). The contract (sysformer.h, DESIGN.md §10):
// SF_ERR_OUT_OF_MEMORY and a message, *out NULL, no crash. Under the sanitizer build
// (scripts/test.sh) AddressSanitizer also sees every error path's reads and writes, and
// LeakSanitizer what an error path forgot to free.
//
// The binary is linked with the linker's --wrap for malloc, calloc, realloc and strdup
// (alloc_fail.c): allocations inside shared libraries (jansson parsing a tokenizer's JSON, libc)
// cannot be failed this way, so a JSON document that does not fit is not covered.
#include <gtest/gtest.h>

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "alloc_faults.h"
#include "eval_fixture.h"
#include "model_fixtures.h"
#include "sysformer.h"
#include "train/train.h"
#include "train/trainer.h"

namespace {

const std::string kData = SF_TEST_DATA_DIR;

TEST(HostAllocFaults, LlmLoad) {
    for (const char *name : {"llama_gqa_llama3", "phi3_longrope", "qwen2_bias"}) {
        const std::string dir = kData + "/llm/" + name;
        fail_each_allocation(std::string("sf_llm_load ") + name, [&](std::vector<float> *) {
            sf_llm *llm = nullptr;
            const sf_status st = sf_llm_load(dir.c_str(), &llm);
            if (st != SF_OK) {
                EXPECT_EQ(llm, nullptr);
            }
            sf_llm_free(llm);
            return st;
        });
    }
}

TEST(HostAllocFaults, GgufLoad) {
    for (const char *name : {"tiny_llama.gguf", "tiny_qwen2_q8.gguf"}) {
        const std::string path = kData + "/gguf/" + name;
        fail_each_allocation(std::string("sf_llm_load ") + name, [&](std::vector<float> *) {
            sf_llm *llm = nullptr;
            const sf_status st = sf_llm_load(path.c_str(), &llm);
            sf_llm_free(llm);
            return st;
        });
    }
}

TEST(HostAllocFaults, TokenizerLoad) {
    for (const char *name : {"synth-bytelevel-nfc", "synth-sp-first"}) {
        const std::string dir = kData + "/tokenizer/synthetic/" + name;
        fail_each_allocation(std::string("sf_tokenizer_load ") + name, [&](std::vector<float> *) {
            sf_tokenizer *tok = nullptr;
            const sf_status st = sf_tokenizer_load(dir.c_str(), &tok);
            if (st != SF_OK) {
                EXPECT_EQ(tok, nullptr);
            }
            sf_tokenizer_free(tok);
            return st;
        });
    }
}

TEST(HostAllocFaults, EmbeddingsLoad) {
    for (const std::string &path :
         {kData + "/llm/llama_tied_linear", kData + "/gguf/tiny_llama.gguf"}) {
        fail_each_allocation("sf_llm_load_embeddings " + path, [&](std::vector<float> *) {
            sf_llm *llm = nullptr;
            const sf_status st = sf_llm_load_embeddings(path.c_str(), &llm);
            sf_llm_free(llm);
            return st;
        });
    }
}

// Encoding text with special tokens and decoding it, and a chat prompt with a history, on a
// byte-level BPE tokenizer and a SentencePiece one. Each run loads the tokenizer afresh: its
// BPE cache fills as it encodes, so a warm one would allocate less. That cache is optional (an
// entry it cannot store is recomputed next time), so a failure there may carry on; the ids and
// text must then be exactly the clean run's.
TEST(HostAllocFaults, TokenizerAndChatEncoding) {
    const char *text = "Hello <|im_start|> w\u00f6rld \xe2\x82\xac 12345\n\ttabs  and  spaces";
    const sf_chat_turn history[1] = {{"What is 2 + 2?", "4, of course."}};
    for (const char *name : {"synth-bytelevel-nfc", "synth-sp-first"}) {
        const std::string dir = kData + "/tokenizer/synthetic/" + name;
        auto with_tokenizer = [&](const std::function<sf_status(sf_tokenizer *)> &f) {
            sf_tokenizer *tok = nullptr;
            sf_status st = sf_tokenizer_load(dir.c_str(), &tok);
            if (st == SF_OK) st = f(tok);
            sf_tokenizer_free(tok);
            return st;
        };
        fail_each_allocation(
            std::string("encode and decode, ") + name,
            [&](std::vector<float> *out) {
                return with_tokenizer([&](sf_tokenizer *tok) {
                    std::vector<int32_t> ids(512);
                    std::vector<char> txt(4096);
                    int32_t n = 0;
                    size_t len = 0;
                    sf_status st = sf_tokenizer_encode(tok, text, strlen(text), true, true,
                                                       ids.data(), (int32_t)ids.size(), &n);
                    if (st == SF_OK) {
                        st = sf_tokenizer_decode(tok, ids.data(), n, false, txt.data(),
                                                 txt.size(), &len);
                    }
                    if (st == SF_OK) {
                        out->assign(ids.begin(), ids.begin() + n);
                        out->insert(out->end(), txt.begin(), txt.begin() + (ptrdiff_t)len);
                    }
                    return st;
                });
            },
            1e-30);
        fail_each_allocation(
            std::string("sf_chat_encode, ") + name,
            [&](std::vector<float> *out) {
                return with_tokenizer([&](sf_tokenizer *tok) {
                    std::vector<int32_t> ids(512);
                    int32_t n = 0;
                    sf_prompt_spans sp;
                    const sf_status st =
                        sf_chat_encode(tok, SF_TEMPLATE_CHATML, "Be careful.", history, 1,
                                       "And 3 + 3?", ids.data(), (int32_t)ids.size(), &n, &sp);
                    if (st == SF_OK) {
                        out->assign(ids.begin(), ids.begin() + n);
                        out->insert(out->end(), {(float)sp.prefix, (float)sp.system,
                                                 (float)sp.middle, (float)sp.user,
                                                 (float)sp.suffix});
                    }
                    return st;
                });
            },
            1e-30);
    }
}

// The evaluation's reports (the table and the SVG chart; not the JSON summary, whose document
// jansson builds out of the wrap's reach), and the jailbreak wrappers shipped with the
// benchmarks, read and applied.
TEST(HostAllocFaults, EvalReportsAndJailbreaks) {
    EvalFixture f;
    fail_each_allocation("sf_eval_table and sf_eval_svg", [&](std::vector<float> *out) {
        char *table = nullptr, *svg = nullptr;
        sf_status st = sf_eval_table(&f.s, &table);
        if (st == SF_OK) st = sf_eval_svg(&f.s, &svg);
        if (st == SF_OK) out->assign(table, table + strlen(table));
        free(table);
        free(svg);
        return st;
    });
    const std::string wrappers = std::string(SF_SOURCE_DIR) + "/bench/jailbreaks.json";
    fail_each_allocation("sf_jailbreak_set_read and _apply", [&](std::vector<float> *) {
        sf_jailbreak_set set = {};
        sf_status st = sf_jailbreak_set_read(wrappers.c_str(), &set);
        for (int32_t i = 0; st == SF_OK && i < set.n; i++) {
            char *text = nullptr;
            st = sf_jailbreak_apply(&set.w[i], "Explain how locks work, step by step.", &text);
            free(text);
        }
        sf_jailbreak_set_free(&set);
        return st;
    });
}

// A tiny random LLM (tests/model_fixtures.h) for the operations that need one.
class HostAllocFaultsModel : public ::testing::Test {
  protected:
    void SetUp() override {
        cfg_ = tiny_llama_config();
        ASSERT_EQ(sf_random_llm_write(dir_.path().c_str(), &cfg_, 3), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        sf_sysformer_config c = sf_sysformer_default_config(llm_);
        c.num_layers = 1;
        c.dim_feedforward = 48;
        c.has_classifier = true;
        ASSERT_EQ(sf_sysformer_init(llm_, &c, 7, &sf_), SF_OK) << sf_last_error();
    }
    void TearDown() override {
        sf_sysformer_free(sf_);
        sf_llm_free(llm_);
    }
    TempDir dir_;
    sf_llm_config cfg_;
    sf_llm *llm_ = nullptr;
    sf_sysformer *sf_ = nullptr;
};

TEST_F(HostAllocFaultsModel, SysformerLoad) {
    const std::string dir = kData + "/sysformer/preln_relu_1layer_8heads";
    fail_each_allocation("sf_sysformer_load", [&](std::vector<float> *) {
        sf_sysformer *sf = nullptr;
        const sf_status st = sf_sysformer_load(dir.c_str(), llm_, &sf);
        sf_sysformer_free(sf);
        return st;
    });
}

TEST_F(HostAllocFaultsModel, SysformerSave) {
    TempDir out;
    fail_each_allocation("sf_sysformer_save", [&](std::vector<float> *) {
        return sf_sysformer_save(sf_, out.path().c_str());
    });
}

// Three guarded prompts, sampled, with stop ids: prefill, decode, sampling, results.
TEST_F(HostAllocFaultsModel, GuardedGeneration) {
    // prefix 2 | system | middle 1 | user | suffix 2, ids in [3, 60)
    std::vector<int32_t> ids, cu = {0};
    std::vector<sf_prompt_spans> spans;
    const int shape[3][2] = {{4, 3}, {1, 6}, {7, 2}};
    for (int r = 0; r < 3; r++) {
        ids.insert(ids.end(), {1, 2});
        for (int i = 0; i < shape[r][0]; i++) ids.push_back(3 + (r * 7 + i * 5) % 57);
        ids.push_back(60);
        for (int i = 0; i < shape[r][1]; i++) ids.push_back(3 + (r * 11 + i * 3) % 57);
        ids.insert(ids.end(), {61, 62});
        cu.push_back((int32_t)ids.size());
        spans.push_back({2, shape[r][0], 1, shape[r][1], 2});
    }
    const int32_t stop = 66;
    sf_generation g = {};
    g.n_requests = 3;
    g.cu_seqlens = cu.data();
    g.token_ids = ids.data();
    g.spans = spans.data();
    g.max_new_tokens = 5;
    g.sampling = {0.8f, 10, 0.9f, 11, true, 0};  // with log-probabilities: their buffers too
    g.stop_ids = &stop;
    g.n_stop_ids = 1;
    fail_each_allocation("sf_generate_cpu", [&](std::vector<float> *) {
        std::vector<sf_generation_result> res(3);
        const sf_status st = sf_generate_cpu(llm_, sf_, nullptr, &g, nullptr, nullptr, res.data());
        for (sf_generation_result &r : res) {
            if (st != SF_OK) {
                EXPECT_EQ(r.tokens, nullptr) << "a failed generation's result";
                EXPECT_EQ(r.logprobs, nullptr) << "a failed generation's result";
            } else {
                EXPECT_NE(r.logprobs, nullptr);
            }
            sf_generation_result_free(&r);
        }
        return st;
    });
}

// "No limit" (max_new_tokens = INT32_MAX) ends with the context window, and asks for no more
// memory than the window allows: a request's token buffer holds window - prompt + 1 ids (the
// token accepted as the context fills is its last), not max_new_tokens of them (8 GiB here).
// The model's window is 64 positions, so every allocation of the run is small: the largest
// (the weights were loaded before) is well under 1 MiB.
TEST_F(HostAllocFaultsModel, NoLimitAsksOnlyForTheWindow) {
    const std::vector<int32_t> ids = {1, 5, 9, 13, 17, 21, 25, 29, 33, 37};
    const std::vector<int32_t> cu = {0, (int32_t)ids.size()};
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu.data();
    g.token_ids = ids.data();
    g.max_new_tokens = INT32_MAX;
    sf_generation_result res = {};
    sf_test_alloc_reset_largest();
    ASSERT_EQ(sf_generate_cpu(llm_, nullptr, nullptr, &g, nullptr, nullptr, &res), SF_OK)
        << sf_last_error();
    EXPECT_LT(sf_test_alloc_largest(), 1u << 20);
    EXPECT_EQ(res.finish, SF_FINISH_CONTEXT);
    EXPECT_EQ(res.n_tokens, cfg_.max_position_embeddings - (int32_t)ids.size() + 1);
    sf_generation_result_free(&res);
}

// A training run of two steps and a validation, on the CPU.
TEST_F(HostAllocFaultsModel, Training) {
    sf_train_set set = {};
    for (int i = 0; i < 4; i++) {
        std::vector<int32_t> prompt = {1, 2};
        for (int k = 0; k < 2 + i; k++) prompt.push_back(3 + (i * 5 + k * 3) % 57);
        prompt.push_back(60);
        for (int k = 0; k < 3; k++) prompt.push_back(3 + (i * 7 + k) % 57);
        prompt.insert(prompt.end(), {61, 62});
        const int32_t reply[2] = {5 + i, 9};
        const sf_prompt_spans sp = {2, 2 + i, 1, 3, 2};
        ASSERT_EQ(sf_train_set_add(&set, prompt.data(), (int32_t)prompt.size(), &sp, reply, 2,
                                   i % 2 == 0),
                  SF_OK)
            << sf_last_error();
    }
    sf_train_options o = sf_train_default_options();
    o.epochs = 1;
    o.batch_tokens = 40;
    o.w_recon = 1.0;
    o.validate_first = false;
    // Every run starts from the same weights; what it trained is compared. Carrying on, the
    // backward kernels' fallbacks (attention by kv head, norms on one thread) add the same
    // terms in another order: each gradient entry moves by a few fp32 roundings of its terms'
    // size (at most 64 terms here: 64 u = 4e-6 of it), and two AdamW steps move a weight by
    // about lr times a gradient's relative change, so 1e-6 of the weights' norm is far above
    // what reordering can do (measured: 3e-10) and far below one wrong or skipped term.
    int64_t nw = 0;
    float *w = sf_sysformer_flat(sf_, &nw);
    const std::vector<float> w0(w, w + nw);
    fail_each_allocation(
        "sf_trainer_create and run",
        [&](std::vector<float> *out) {
            std::copy(w0.begin(), w0.end(), w);
            sf_trainer *t = nullptr;
            sf_status st = sf_trainer_create(llm_, sf_, nullptr, nullptr, 0, &set, &set, &o, &t);
            if (st == SF_OK) st = sf_trainer_run(t, 2, nullptr);
            sf_trainer_free(t);
            out->assign(w, w + nw);
            return st;
        },
        1e-6);
    sf_train_set_free(&set);
}

}  // namespace
