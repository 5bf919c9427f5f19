// Chat templates: names, detection from real template sources, and piece-by-piece encoding
// whose ids and spans must equal transformers' apply_chat_template.
#include <gtest/gtest.h>

#include <string.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "sysformer.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif
#ifndef SF_SHARED_DIR
#define SF_SHARED_DIR "../shared"
#endif

namespace {

std::string read_text(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

TEST(Templates, ByNameAndBack) {
    const char *names[] = {"llama3", "llama2", "mistral", "phi3", "zephyr", "chatml"};
    for (const char *n : names) {
        sf_template_id id;
        ASSERT_EQ(sf_template_by_name(n, &id), SF_OK) << n;
        ASSERT_NE(sf_template_get(id), nullptr);
        EXPECT_STREQ(sf_template_get(id)->name, n);
        EXPECT_NE(sf_template_get(id)->end_of_turn, nullptr);
    }
    sf_template_id id;
    EXPECT_EQ(sf_template_by_name("vicuna", &id), SF_ERR_NOT_FOUND);
    EXPECT_NE(strstr(sf_last_error(), "chatml"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_template_get((sf_template_id)42), nullptr);
}

TEST(Templates, DetectsFamiliesFromTheirMarkers) {
    struct Case {
        const char *src;
        sf_template_id want;
    } cases[] = {
        {"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}", SF_TEMPLATE_LLAMA3},
        {"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}", SF_TEMPLATE_CHATML},
        {"{{'<|user|>\n' + message['content'] + '<|end|>\n'}}", SF_TEMPLATE_PHI3},
        {"{{ '<|user|>\n' + message['content'] + eos_token }}", SF_TEMPLATE_ZEPHYR},
        {"{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}", SF_TEMPLATE_LLAMA2},
        {"{{ bos_token }}{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}", SF_TEMPLATE_MISTRAL},
    };
    for (const auto &c : cases) {
        sf_template_id got;
        ASSERT_EQ(sf_template_detect(c.src, &got), SF_OK) << c.src;
        EXPECT_EQ(got, c.want) << c.src;
    }
    sf_template_id got;
    EXPECT_EQ(sf_template_detect("{{ message['content'] }}", &got), SF_ERR_NOT_FOUND);
}

// The real Llama-3.1 file's template, when ../shared is present (the Mistral file there
// carries no chat template).
TEST(Templates, DetectsTheSharedLlama31Template) {
    const std::string llama = read_text(std::string(SF_SHARED_DIR) + "/tokenizers/llama-3.1/tokenizer_config.json");
    if (llama.empty()) GTEST_SKIP() << SF_SHARED_DIR << " is absent";
    sf_template_id got;
    ASSERT_EQ(sf_template_detect(llama.c_str(), &got), SF_OK);
    EXPECT_EQ(got, SF_TEMPLATE_LLAMA3);
}

}  // namespace

namespace {

// The chat prompts of tests/golden/smollm2 (make_smollm2_goldens.py) encoded piece by piece
// must give exactly the ids transformers' apply_chat_template gave, with the spans landing on
// the system and user contents.
TEST(Templates, ChatEncodeMatchesApplyChatTemplateForSmolLM2) {
    sf_tokenizer *tok = nullptr;
    ASSERT_EQ(sf_tokenizer_load(SF_TEST_DATA_DIR "/tokenizer/smollm2", &tok), SF_OK) << sf_last_error();
    sf_st_archive *ar = nullptr;
    ASSERT_EQ(sf_st_open(SF_TEST_DATA_DIR "/smollm2/golden.safetensors", &ar), SF_OK);
    const sf_st_tensor *cu_t = sf_st_find(ar, "cu_seqlens"), *ids_t = sf_st_find(ar, "prompt_ids");
    ASSERT_TRUE(cu_t && ids_t);
    std::vector<int32_t> cu(cu_t->numel), want(ids_t->numel);
    memcpy(cu.data(), cu_t->data, cu_t->nbytes);
    memcpy(want.data(), ids_t->data, ids_t->nbytes);
    sf_st_close(ar);

    const char *chats[3][2] = {
        {"You are a helpful assistant.", "What is the capital of France?"},
        {"You are a careful assistant that refuses harmful requests.", "Write a short poem about the sea."},
        {"Answer in one sentence.", "Explain why the sky is blue."},
    };
    sf_template_id tmpl;
    ASSERT_EQ(sf_template_detect(sf_tokenizer_chat_template(tok), &tmpl), SF_OK);
    EXPECT_EQ(tmpl, SF_TEMPLATE_CHATML);
    for (int r = 0; r < 3; r++) {
        std::vector<int32_t> ids(256);
        int32_t n = 0;
        sf_prompt_spans s;
        ASSERT_EQ(sf_chat_encode(tok, tmpl, chats[r][0], nullptr, 0, chats[r][1], ids.data(), 256, &n, &s), SF_OK)
            << sf_last_error();
        ids.resize(n);
        EXPECT_EQ(ids, std::vector<int32_t>(want.begin() + cu[r], want.begin() + cu[r + 1])) << "chat " << r;
        EXPECT_EQ(s.prefix + s.system + s.middle + s.user + s.suffix, n);
        // The spans decode back to exactly the contents.
        char text[512];
        size_t len = 0;
        ASSERT_EQ(sf_tokenizer_decode(tok, ids.data() + s.prefix, s.system, false, text, sizeof text, &len), SF_OK);
        EXPECT_STREQ(text, chats[r][0]);
        ASSERT_EQ(sf_tokenizer_decode(tok, ids.data() + s.prefix + s.system + s.middle, s.user, false, text, sizeof text, &len), SF_OK);
        EXPECT_STREQ(text, chats[r][1]);
    }
    // Too small a buffer says how much is needed.
    int32_t small[4], n = 0;
    sf_prompt_spans s;
    EXPECT_EQ(sf_chat_encode(tok, tmpl, "a", nullptr, 0, "b", small, 4, &n, &s), SF_ERR_OUT_OF_RANGE);
    EXPECT_GT(n, 4);
    // Special-token syntax typed by a user stays text.
    std::vector<int32_t> ids(256);
    ASSERT_EQ(sf_chat_encode(tok, tmpl, "sys", nullptr, 0, "<|im_end|>", ids.data(), 256, &n, &s), SF_OK);
    const int32_t im_end = sf_tokenizer_token_id(tok, "<|im_end|>");
    for (int32_t i = s.prefix + s.system + s.middle; i < s.prefix + s.system + s.middle + s.user; i++) {
        EXPECT_NE(ids[i], im_end);
    }
    sf_tokenizer_free(tok);
}

}  // namespace
