// Tests for host/io/llm_config.c: parsing Hugging Face config.json files.
//
// The realistic configs below are written from the public config.json files of the checkpoints
// they are named after (inputs, not expected outputs); the expected values follow what
// transformers 5 makes of the same file. The "V5" literals were captured verbatim from
// transformers 5.24 save_pretrained output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <string>
#include <unistd.h>
#include <utility>

#include "io/llm_config.h"
#include "sysformer.h"

namespace {

const char kSource[] = "test/config.json";

// Owns a parsed config for the duration of a test.
struct Parsed {
    sf_status status;
    sf_llm_config cfg;
    std::string error;
    explicit Parsed(const std::string &text) {
        sf_clear_error();
        status = sf_llm_config_parse(text.data(), text.size(), kSource, &cfg);
        error = sf_last_error();
    }
    ~Parsed() { sf_llm_config_release(&cfg); }
    Parsed(const Parsed &) = delete;
    Parsed &operator=(const Parsed &) = delete;
};

bool is_all_zero(const sf_llm_config &c) {
    sf_llm_config zero;
    std::memset(&zero, 0, sizeof zero);
    return std::memcmp(&c, &zero, sizeof c) == 0;
}

// Parses text, expects failure with `want`, a message naming the file and every needle, and an
// output struct left with nothing to release.
void expect_error(const std::string &text, sf_status want,
                  std::initializer_list<const char *> needles) {
    sf_llm_config cfg;
    std::memset(&cfg, 0xAB, sizeof cfg); // garbage in: the parser must zero it
    sf_clear_error();
    sf_status st = sf_llm_config_parse(text.data(), text.size(), kSource, &cfg);
    std::string msg = sf_last_error();
    EXPECT_EQ(st, want) << "message: " << msg << "\ninput: " << text;
    EXPECT_NE(msg.find(kSource), std::string::npos) << msg;
    for (const char *n : needles)
        EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
    EXPECT_TRUE(is_all_zero(cfg));
    sf_llm_config_release(&cfg); // harmless on a zeroed struct
}

// A small valid config as key -> JSON text, so tests can override or drop single keys without
// writing duplicate keys (which the parser rejects).
using Keys = std::map<std::string, std::string>;

Keys small_llama() {
    return {
        {"model_type", "\"llama\""},
        {"vocab_size", "1000"},
        {"hidden_size", "64"},
        {"intermediate_size", "128"},
        {"num_hidden_layers", "2"},
        {"num_attention_heads", "4"},
        {"num_key_value_heads", "2"},
        {"max_position_embeddings", "4096"},
        {"rms_norm_eps", "1e-06"},
        {"hidden_act", "\"silu\""},
        {"tie_word_embeddings", "false"},
    };
}

// Applies edits: a value of nullptr removes the key.
std::string make(Keys keys,
                 std::initializer_list<std::pair<const char *, const char *>> edits = {}) {
    for (const auto &e : edits) {
        if (e.second)
            keys[e.first] = e.second;
        else
            keys.erase(e.first);
    }
    std::string s = "{";
    bool first = true;
    for (const auto &kv : keys) {
        if (!first) s += ", ";
        first = false;
        s += "\"" + kv.first + "\": " + kv.second;
    }
    return s + "}";
}

std::string make_arch(const char *model_type,
                      std::initializer_list<std::pair<const char *, const char *>> edits = {}) {
    Keys k = small_llama();
    k["model_type"] = std::string("\"") + model_type + "\"";
    return make(k, edits);
}

// "[v, v, ..., v]" with n entries.
std::string json_list(int n, const char *v) {
    std::string s = "[";
    for (int i = 0; i < n; i++) s += (i ? ", " : "") + std::string(v);
    return s + "]";
}

double longrope_attention(double factor, double original_max) {
    return factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(factor) / std::log(original_max));
}

// Every field that two equivalent configs must agree on, the factor arrays by content.
void expect_same_config(const sf_llm_config &a, const sf_llm_config &b) {
    EXPECT_EQ(a.arch, b.arch);
    EXPECT_EQ(a.vocab_size, b.vocab_size);
    EXPECT_EQ(a.hidden_size, b.hidden_size);
    EXPECT_EQ(a.intermediate_size, b.intermediate_size);
    EXPECT_EQ(a.num_layers, b.num_layers);
    EXPECT_EQ(a.num_heads, b.num_heads);
    EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
    EXPECT_EQ(a.head_dim, b.head_dim);
    EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
    EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
    EXPECT_EQ(a.rope_theta, b.rope_theta);
    EXPECT_EQ(a.rope.type, b.rope.type);
    EXPECT_EQ(a.rope.factor, b.rope.factor);
    EXPECT_EQ(a.rope.low_freq_factor, b.rope.low_freq_factor);
    EXPECT_EQ(a.rope.high_freq_factor, b.rope.high_freq_factor);
    EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
    EXPECT_EQ(a.rope.attention_factor, b.rope.attention_factor);
    ASSERT_EQ(a.rope.short_factor == nullptr, b.rope.short_factor == nullptr);
    ASSERT_EQ(a.rope.long_factor == nullptr, b.rope.long_factor == nullptr);
    for (int i = 0; a.rope.short_factor && i < a.head_dim / 2; i++) {
        EXPECT_EQ(a.rope.short_factor[i], b.rope.short_factor[i]) << i;
        EXPECT_EQ(a.rope.long_factor[i], b.rope.long_factor[i]) << i;
    }
    EXPECT_EQ(a.sliding_window, b.sliding_window);
    EXPECT_EQ(a.attention_bias, b.attention_bias);
    EXPECT_EQ(a.qkv_bias, b.qkv_bias);
    EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
    EXPECT_EQ(a.bos_token_id, b.bos_token_id);
    ASSERT_EQ(a.n_eos_token_ids, b.n_eos_token_ids);
    for (int i = 0; i < a.n_eos_token_ids; i++) EXPECT_EQ(a.eos_token_ids[i], b.eos_token_ids[i]);
}

// meta-llama/Llama-3.1-8B-Instruct: old format, llama3 rope_scaling, eos list.
const char kLlama31_8B_Instruct[] = R"json({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 128256
})json";

// mistralai/Mistral-7B-Instruct-v0.2: sliding_window null, rope_theta 1e6.
const char kMistral7B_Instruct_v02[] = R"json({
  "architectures": ["MistralForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0",
  "use_cache": true,
  "vocab_size": 32000
})json";

// Qwen/Qwen2-0.5B-Instruct: tied, use_sliding_window false, 14/2 heads.
const char kQwen2_05B_Instruct[] = R"json({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})json";

// microsoft/Phi-3.5-mini-instruct: longrope with 48-entry short/long factors.
const char kPhi35_Mini_Instruct[] = R"json({
  "_name_or_path": "Phi-3.5-mini-instruct",
  "architectures": ["Phi3ForCausalLM"],
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_phi3.Phi3Config",
    "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"
  },
  "bos_token_id": 1,
  "embd_pdrop": 0.0,
  "eos_token_id": 32000,
  "hidden_act": "silu",
  "hidden_size": 3072,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "model_type": "phi3",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 32,
  "original_max_position_embeddings": 4096,
  "pad_token_id": 32000,
  "resid_pdrop": 0.0,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "long_factor": [1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523, 32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688, 64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062],
    "short_factor": [1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328, 2.749999523162842, 2.8399994373321533],
    "type": "longrope"
  },
  "rope_theta": 10000.0,
  "sliding_window": 262144,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.3",
  "use_cache": true,
  "attention_bias": false,
  "vocab_size": 32064
})json";

// HuggingFaceTB/SmolLM2-135M-Instruct: tied, 9/3 heads, d=576, integer rope_theta.
const char kSmolLM2_135M_Instruct[] = R"json({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536,
  "is_llama_config": true,
  "max_position_embeddings": 8192,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pad_token_id": 2,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_interleaved": false,
  "rope_scaling": null,
  "rope_theta": 100000,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers.js_config": {
    "kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}
  },
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 49152
})json";

// Captured: transformers 5.24 save_pretrained of kLlama31_8B_Instruct (rope_parameters).
const char kV5Llama31[] = R"json({
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "dtype": "bfloat16",
  "eos_token_id": [
    128001,
    128008,
    128009
  ],
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pad_token_id": null,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": false,
  "transformers_version": "5.24.0",
  "use_cache": true,
  "vocab_size": 128256
})json";

// Captured: transformers 5.24 save_pretrained of a small Phi3Config with longrope.
const char kV5Phi3LongropeSmall[] = R"json({
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "embd_pdrop": 0.0,
  "eos_token_id": 32000,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 128,
  "max_position_embeddings": 131072,
  "model_type": "phi3",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "original_max_position_embeddings": 4096,
  "pad_token_id": 32000,
  "resid_pdrop": 0.0,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "long_factor": [
      2.0,
      2.0,
      2.0,
      2.0,
      2.0,
      2.0,
      2.0,
      2.0
    ],
    "original_max_position_embeddings": 4096,
    "partial_rotary_factor": 1.0,
    "rope_theta": 10000.0,
    "rope_type": "longrope",
    "short_factor": [
      1.0,
      1.0,
      1.0,
      1.0,
      1.0,
      1.0,
      1.0,
      1.0
    ],
    "type": "longrope"
  },
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.24.0",
  "use_cache": true,
  "vocab_size": 1000
})json";

// Captured: transformers 5.24 save_pretrained of a small tied Qwen2Config (writes layer_types).
const char kV5Qwen2Small[] = R"json({
  "attention_dropout": 0.0,
  "bos_token_id": null,
  "eos_token_id": null,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 128,
  "layer_types": [
    "full_attention",
    "full_attention"
  ],
  "max_position_embeddings": 32768,
  "max_window_layers": 28,
  "model_type": "qwen2",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "rope_theta": 10000.0,
    "rope_type": "default"
  },
  "sliding_window": null,
  "tie_word_embeddings": true,
  "transformers_version": "5.24.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 1000
})json";

} // namespace

// ------------------------------------------------------------------------------------------------
// Real checkpoints (old format)
// ------------------------------------------------------------------------------------------------

TEST(LlmConfig, Llama31_8B_Instruct) {
    Parsed p(kLlama31_8B_Instruct);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_LLAMA);
    EXPECT_EQ(c.vocab_size, 128256);
    EXPECT_EQ(c.hidden_size, 4096);
    EXPECT_EQ(c.intermediate_size, 14336);
    EXPECT_EQ(c.num_layers, 32);
    EXPECT_EQ(c.num_heads, 32);
    EXPECT_EQ(c.num_kv_heads, 8);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.max_position_embeddings, 131072);
    EXPECT_EQ(c.rms_norm_eps, 1e-5f);
    EXPECT_EQ(c.rope_theta, 500000.0);
    EXPECT_EQ(c.rope.type, SF_ROPE_LLAMA3);
    EXPECT_EQ(c.rope.factor, 8.0);
    EXPECT_EQ(c.rope.low_freq_factor, 1.0);
    EXPECT_EQ(c.rope.high_freq_factor, 4.0);
    EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
    EXPECT_EQ(c.rope.attention_factor, 1.0);
    EXPECT_EQ(c.rope.short_factor, nullptr);
    EXPECT_EQ(c.rope.long_factor, nullptr);
    EXPECT_EQ(c.sliding_window, 0);
    EXPECT_FALSE(c.attention_bias);
    EXPECT_FALSE(c.qkv_bias);
    EXPECT_FALSE(c.tie_word_embeddings);
    EXPECT_EQ(c.bos_token_id, 128000);
    ASSERT_EQ(c.n_eos_token_ids, 3);
    EXPECT_EQ(c.eos_token_ids[0], 128001);
    EXPECT_EQ(c.eos_token_ids[1], 128008);
    EXPECT_EQ(c.eos_token_ids[2], 128009);
}

TEST(LlmConfig, Mistral7B_Instruct_v02) {
    Parsed p(kMistral7B_Instruct_v02);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_MISTRAL);
    EXPECT_EQ(c.vocab_size, 32000);
    EXPECT_EQ(c.hidden_size, 4096);
    EXPECT_EQ(c.intermediate_size, 14336);
    EXPECT_EQ(c.num_layers, 32);
    EXPECT_EQ(c.num_heads, 32);
    EXPECT_EQ(c.num_kv_heads, 8);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.max_position_embeddings, 32768);
    EXPECT_EQ(c.rms_norm_eps, 1e-5f);
    EXPECT_EQ(c.rope_theta, 1e6);
    EXPECT_EQ(c.rope.type, SF_ROPE_DEFAULT);
    EXPECT_EQ(c.rope.attention_factor, 1.0);
    EXPECT_EQ(c.sliding_window, 0); // null: no window
    EXPECT_FALSE(c.attention_bias);
    EXPECT_FALSE(c.qkv_bias);
    EXPECT_FALSE(c.tie_word_embeddings);
    EXPECT_EQ(c.bos_token_id, 1);
    ASSERT_EQ(c.n_eos_token_ids, 1);
    EXPECT_EQ(c.eos_token_ids[0], 2);
}

TEST(LlmConfig, Qwen2_05B_Instruct) {
    Parsed p(kQwen2_05B_Instruct);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_QWEN2);
    EXPECT_EQ(c.vocab_size, 151936);
    EXPECT_EQ(c.hidden_size, 896);
    EXPECT_EQ(c.intermediate_size, 4864);
    EXPECT_EQ(c.num_layers, 24);
    EXPECT_EQ(c.num_heads, 14);
    EXPECT_EQ(c.num_kv_heads, 2);
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_EQ(c.max_position_embeddings, 32768);
    EXPECT_EQ(c.rms_norm_eps, 1e-6f);
    EXPECT_EQ(c.rope_theta, 1e6);
    EXPECT_EQ(c.rope.type, SF_ROPE_DEFAULT);
    EXPECT_EQ(c.sliding_window, 0); // use_sliding_window is false
    EXPECT_FALSE(c.attention_bias);
    EXPECT_TRUE(c.qkv_bias);
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_EQ(c.bos_token_id, 151643);
    ASSERT_EQ(c.n_eos_token_ids, 1);
    EXPECT_EQ(c.eos_token_ids[0], 151645);
}

TEST(LlmConfig, Phi35_Mini_Instruct) {
    Parsed p(kPhi35_Mini_Instruct);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_PHI3);
    EXPECT_EQ(c.vocab_size, 32064);
    EXPECT_EQ(c.hidden_size, 3072);
    EXPECT_EQ(c.intermediate_size, 8192);
    EXPECT_EQ(c.num_layers, 32);
    EXPECT_EQ(c.num_heads, 32);
    EXPECT_EQ(c.num_kv_heads, 32);
    EXPECT_EQ(c.head_dim, 96);
    EXPECT_EQ(c.max_position_embeddings, 131072);
    EXPECT_EQ(c.rms_norm_eps, 1e-5f);
    EXPECT_EQ(c.rope_theta, 10000.0);
    EXPECT_EQ(c.rope.type, SF_ROPE_LONGROPE);
    EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
    EXPECT_EQ(c.rope.factor, 131072.0 / 4096.0);
    EXPECT_DOUBLE_EQ(c.rope.attention_factor, std::sqrt(1.0 + std::log(32.0) / std::log(4096.0)));
    ASSERT_NE(c.rope.short_factor, nullptr);
    ASSERT_NE(c.rope.long_factor, nullptr);
    EXPECT_EQ(c.rope.short_factor[0], 1.0f);
    EXPECT_EQ(c.rope.short_factor[1], (float)1.0199999809265137);
    EXPECT_EQ(c.rope.short_factor[47], (float)2.8399994373321533);
    EXPECT_EQ(c.rope.long_factor[0], (float)1.0800000429153442);
    EXPECT_EQ(c.rope.long_factor[46], (float)64.52999877929688);
    EXPECT_EQ(c.rope.long_factor[47], (float)64.83999633789062);
    EXPECT_EQ(c.sliding_window, 262144);
    EXPECT_FALSE(c.attention_bias);
    EXPECT_FALSE(c.qkv_bias);
    EXPECT_FALSE(c.tie_word_embeddings);
    EXPECT_EQ(c.bos_token_id, 1);
    ASSERT_EQ(c.n_eos_token_ids, 1);
    EXPECT_EQ(c.eos_token_ids[0], 32000);
}

TEST(LlmConfig, SmolLM2_135M_Instruct) {
    Parsed p(kSmolLM2_135M_Instruct);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_LLAMA);
    EXPECT_EQ(c.vocab_size, 49152);
    EXPECT_EQ(c.hidden_size, 576);
    EXPECT_EQ(c.intermediate_size, 1536);
    EXPECT_EQ(c.num_layers, 30);
    EXPECT_EQ(c.num_heads, 9);
    EXPECT_EQ(c.num_kv_heads, 3);
    EXPECT_EQ(c.head_dim, 64);
    EXPECT_EQ(c.max_position_embeddings, 8192);
    EXPECT_EQ(c.rms_norm_eps, 1e-5f);
    EXPECT_EQ(c.rope_theta, 100000.0); // written as a JSON integer
    EXPECT_EQ(c.rope.type, SF_ROPE_DEFAULT);
    EXPECT_EQ(c.rope.factor, 1.0);
    EXPECT_EQ(c.rope.attention_factor, 1.0);
    EXPECT_EQ(c.sliding_window, 0);
    EXPECT_FALSE(c.attention_bias);
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_EQ(c.bos_token_id, 1);
    ASSERT_EQ(c.n_eos_token_ids, 1);
    EXPECT_EQ(c.eos_token_ids[0], 2);
}

// ------------------------------------------------------------------------------------------------
// The transformers 5 format (rope_parameters)
// ------------------------------------------------------------------------------------------------

TEST(LlmConfigV5, CapturedLlama31MatchesOldFormat) {
    Parsed v5(kV5Llama31);
    Parsed old(kLlama31_8B_Instruct);
    ASSERT_EQ(v5.status, SF_OK) << v5.error;
    ASSERT_EQ(old.status, SF_OK) << old.error;
    expect_same_config(v5.cfg, old.cfg);
}

TEST(LlmConfigV5, CapturedPhi3Longrope) {
    Parsed p(kV5Phi3LongropeSmall);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_PHI3);
    EXPECT_EQ(c.head_dim, 64 / 4);
    EXPECT_EQ(c.num_kv_heads, 2);
    EXPECT_EQ(c.rope.type, SF_ROPE_LONGROPE);
    EXPECT_EQ(c.rope_theta, 10000.0);
    EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
    EXPECT_EQ(c.rope.factor, 131072.0 / 4096.0);
    EXPECT_DOUBLE_EQ(c.rope.attention_factor, longrope_attention(131072.0 / 4096.0, 4096.0));
    for (int i = 0; i < c.head_dim / 2; i++) {
        EXPECT_EQ(c.rope.short_factor[i], 1.0f);
        EXPECT_EQ(c.rope.long_factor[i], 2.0f);
    }
    EXPECT_EQ(c.sliding_window, 0);
    EXPECT_EQ(c.rms_norm_eps, 1e-5f);
    EXPECT_EQ(c.bos_token_id, 1);
    ASSERT_EQ(c.n_eos_token_ids, 1);
    EXPECT_EQ(c.eos_token_ids[0], 32000);
}

TEST(LlmConfigV5, CapturedQwen2) {
    Parsed p(kV5Qwen2Small);
    ASSERT_EQ(p.status, SF_OK) << p.error;
    const sf_llm_config &c = p.cfg;
    EXPECT_EQ(c.arch, SF_ARCH_QWEN2);
    EXPECT_EQ(c.head_dim, 16);
    EXPECT_EQ(c.rope.type, SF_ROPE_DEFAULT);
    EXPECT_EQ(c.rope_theta, 10000.0);
    EXPECT_EQ(c.max_position_embeddings, 32768);
    EXPECT_TRUE(c.tie_word_embeddings);
    EXPECT_TRUE(c.qkv_bias);
    EXPECT_EQ(c.sliding_window, 0);
    EXPECT_EQ(c.bos_token_id, -1);
    EXPECT_EQ(c.n_eos_token_ids, 0);
}

// The same rope settings written the new way and the old way give the same config, for every
// architecture and every rope type it accepts.
TEST(LlmConfigV5, NewAndOldFormatsAgree) {
    struct Case {
        const char *arch;
        const char *v5_rope;
        const char *old_theta;
        const char *old_scaling;
        sf_rope_type type;
    };
    const std::string lr8s = json_list(8, "1.5"), lr8l = json_list(8, "4");
    const std::string v5_longrope = "{\"rope_type\": \"longrope\", \"rope_theta\": 20000.0, "
                                    "\"short_factor\": " +
                                    lr8s + ", \"long_factor\": " + lr8l +
                                    ", \"original_max_position_embeddings\": 1024}";
    const std::string old_longrope = "{\"type\": \"longrope\", \"short_factor\": " + lr8s +
                                     ", \"long_factor\": " + lr8l +
                                     ", \"original_max_position_embeddings\": 1024}";
    const std::string v5_phi_longrope = "{\"rope_type\": \"longrope\", \"rope_theta\": 20000.0, "
                                        "\"partial_rotary_factor\": 1.0, \"short_factor\": " +
                                        lr8s + ", \"long_factor\": " + lr8l +
                                        ", \"original_max_position_embeddings\": 1024}";
    const std::string old_phi_su =
        "{\"type\": \"su\", \"short_factor\": " + lr8s + ", \"long_factor\": " + lr8l + "}";
    const Case cases[] = {
        {"llama", "{\"rope_theta\": 20000.0, \"rope_type\": \"default\"}", "20000.0", "null",
         SF_ROPE_DEFAULT},
        {"llama", "{\"factor\": 2.0, \"rope_theta\": 20000.0, \"rope_type\": \"linear\"}", "20000",
         "{\"type\": \"linear\", \"factor\": 2.0}", SF_ROPE_LINEAR},
        {"mistral",
         "{\"factor\": 8.0, \"high_freq_factor\": 4.0, \"low_freq_factor\": 1.0, "
         "\"original_max_position_embeddings\": 1024, \"rope_theta\": 500000.0, \"rope_type\": "
         "\"llama3\"}",
         "500000.0",
         "{\"rope_type\": \"llama3\", \"factor\": 8.0, \"high_freq_factor\": 4.0, "
         "\"low_freq_factor\": 1.0, \"original_max_position_embeddings\": 1024}",
         SF_ROPE_LLAMA3},
        {"qwen2", "{\"rope_theta\": 1000000.0, \"rope_type\": \"default\"}", "1000000.0", "null",
         SF_ROPE_DEFAULT},
        {"qwen2", v5_longrope.c_str(), "20000.0", old_longrope.c_str(), SF_ROPE_LONGROPE},
        {"phi3",
         "{\"partial_rotary_factor\": 1.0, \"rope_theta\": 10000.0, \"rope_type\": \"default\"}",
         "10000.0", "null", SF_ROPE_DEFAULT},
        // Phi3 always has a top-level original_max_position_embeddings (class default 4096),
        // which both texts set explicitly here.
        {"phi3", v5_phi_longrope.c_str(), "20000.0", old_phi_su.c_str(), SF_ROPE_LONGROPE},
    };
    for (const Case &k : cases) {
        SCOPED_TRACE(std::string(k.arch) + " " + k.v5_rope);
        bool phi = !std::strcmp(k.arch, "phi3");
        std::string v5 =
            make_arch(k.arch, {{"rope_parameters", k.v5_rope},
                               {"original_max_position_embeddings", phi ? "1024" : nullptr}});
        std::string old =
            make_arch(k.arch, {{"rope_theta", k.old_theta},
                               {"rope_scaling", k.old_scaling},
                               {"original_max_position_embeddings", phi ? "1024" : nullptr}});
        Parsed a(v5), b(old);
        ASSERT_EQ(a.status, SF_OK) << a.error;
        ASSERT_EQ(b.status, SF_OK) << b.error;
        EXPECT_EQ(a.cfg.rope.type, k.type);
        expect_same_config(a.cfg, b.cfg);
        // Expected values derived from the fields written above.
        const sf_llm_config &c = a.cfg;
        switch (k.type) {
        case SF_ROPE_DEFAULT: EXPECT_EQ(c.rope.factor, 1.0); break;
        case SF_ROPE_LINEAR:
            EXPECT_EQ(c.rope_theta, 20000.0);
            EXPECT_EQ(c.rope.factor, 2.0);
            break;
        case SF_ROPE_LLAMA3:
            EXPECT_EQ(c.rope_theta, 500000.0);
            EXPECT_EQ(c.rope.factor, 8.0);
            EXPECT_EQ(c.rope.low_freq_factor, 1.0);
            EXPECT_EQ(c.rope.high_freq_factor, 4.0);
            EXPECT_EQ(c.rope.original_max_position_embeddings, 1024);
            break;
        case SF_ROPE_LONGROPE:
            EXPECT_EQ(c.rope_theta, 20000.0);
            EXPECT_EQ(c.rope.original_max_position_embeddings, 1024);
            EXPECT_EQ(c.rope.factor, 4096.0 / 1024.0);
            EXPECT_DOUBLE_EQ(c.rope.attention_factor, longrope_attention(4.0, 1024.0));
            EXPECT_EQ(c.rope.short_factor[7], 1.5f);
            EXPECT_EQ(c.rope.long_factor[0], 4.0f);
            break;
        }
        if (k.type != SF_ROPE_LONGROPE) {
            EXPECT_EQ(c.rope.attention_factor, 1.0);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Defaults and the finer points of transformers' semantics
// ------------------------------------------------------------------------------------------------

TEST(LlmConfigDefaults, AbsentKeysTakeEachClassDefault) {
    {
        Parsed p("{\"model_type\": \"llama\"}");
        ASSERT_EQ(p.status, SF_OK) << p.error;
        const sf_llm_config &c = p.cfg;
        EXPECT_EQ(c.vocab_size, 32000);
        EXPECT_EQ(c.hidden_size, 4096);
        EXPECT_EQ(c.intermediate_size, 11008);
        EXPECT_EQ(c.num_layers, 32);
        EXPECT_EQ(c.num_heads, 32);
        EXPECT_EQ(c.num_kv_heads, 32);
        EXPECT_EQ(c.head_dim, 128);
        EXPECT_EQ(c.max_position_embeddings, 2048);
        EXPECT_EQ(c.rms_norm_eps, 1e-6f);
        EXPECT_EQ(c.rope_theta, 10000.0);
        EXPECT_EQ(c.rope.type, SF_ROPE_DEFAULT);
        EXPECT_FALSE(c.tie_word_embeddings);
        EXPECT_EQ(c.bos_token_id, 1);
        ASSERT_EQ(c.n_eos_token_ids, 1);
        EXPECT_EQ(c.eos_token_ids[0], 2);
        EXPECT_EQ(c.sliding_window, 0);
    }
    {
        Parsed p("{\"model_type\": \"mistral\"}");
        ASSERT_EQ(p.status, SF_OK) << p.error;
        const sf_llm_config &c = p.cfg;
        EXPECT_EQ(c.intermediate_size, 14336);
        EXPECT_EQ(c.num_kv_heads, 8); // MistralConfig's default is 8, not "as many as heads"
        EXPECT_EQ(c.max_position_embeddings, 131072);
        EXPECT_EQ(c.sliding_window, 4096);
        EXPECT_EQ(c.rms_norm_eps, 1e-6f);
        EXPECT_EQ(c.bos_token_id, 1);
        EXPECT_EQ(c.eos_token_ids[0], 2);
    }
    {
        Parsed p("{\"model_type\": \"qwen2\"}");
        ASSERT_EQ(p.status, SF_OK) << p.error;
        const sf_llm_config &c = p.cfg;
        EXPECT_EQ(c.vocab_size, 151936);
        EXPECT_EQ(c.intermediate_size, 22016);
        EXPECT_EQ(c.num_kv_heads, 32);
        EXPECT_EQ(c.max_position_embeddings, 32768);
        EXPECT_EQ(c.sliding_window, 0);
        EXPECT_TRUE(c.qkv_bias);
        EXPECT_EQ(c.bos_token_id, -1);
        EXPECT_EQ(c.n_eos_token_ids, 0);
    }
    {
        Parsed p("{\"model_type\": \"phi3\"}");
        ASSERT_EQ(p.status, SF_OK) << p.error;
        const sf_llm_config &c = p.cfg;
        EXPECT_EQ(c.vocab_size, 32064);
        EXPECT_EQ(c.hidden_size, 3072);
        EXPECT_EQ(c.intermediate_size, 8192);
        EXPECT_EQ(c.head_dim, 96);
        EXPECT_EQ(c.num_kv_heads, 32);
        EXPECT_EQ(c.max_position_embeddings, 4096);
        EXPECT_EQ(c.rms_norm_eps, 1e-5f);
        EXPECT_EQ(c.sliding_window, 0);
        EXPECT_EQ(c.bos_token_id, 1);
        EXPECT_EQ(c.eos_token_ids[0], 32000);
    }
}

TEST(LlmConfigDefaults, NullsMeanWhatTransformersMakesOfThem) {
    // num_key_value_heads: null means no GQA, even where the class default is something else;
    // absent means that default (32 for Qwen2, 8 for Mistral, which 4 heads cannot share).
    for (const char *arch : {"llama", "qwen2", "phi3"}) {
        Parsed p(make_arch(arch, {{"num_key_value_heads", "null"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.num_kv_heads, 4) << arch;
    }
    {
        Parsed p(make_arch("qwen2", {{"num_key_value_heads", nullptr},
                                     {"num_attention_heads", "32"},
                                     {"hidden_size", "1024"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.num_kv_heads, 32);
    }
    expect_error(make_arch("qwen2", {{"num_key_value_heads", nullptr}}), SF_ERR_CONFIG,
                 {"num_key_value_heads = 32"});
    expect_error(make_arch("mistral", {{"num_key_value_heads", nullptr}}), SF_ERR_CONFIG,
                 {"num_key_value_heads = 8"});
    // MistralConfig declares a plain int: transformers 5 refuses null there.
    expect_error(make_arch("mistral", {{"num_key_value_heads", "null"}}), SF_ERR_CONFIG,
                 {"num_key_value_heads", "null"});
    {
        Parsed p(make(small_llama(), {{"head_dim", "null"},
                                      {"bos_token_id", "null"},
                                      {"eos_token_id", "null"},
                                      {"rope_scaling", "null"},
                                      {"rope_parameters", "null"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.head_dim, 16);
        EXPECT_EQ(p.cfg.bos_token_id, -1);
        EXPECT_EQ(p.cfg.n_eos_token_ids, 0);
        EXPECT_EQ(p.cfg.rope.type, SF_ROPE_DEFAULT);
        EXPECT_EQ(p.cfg.rope_theta, 10000.0);
    }
    {
        Parsed p(make_arch("phi3", {{"sliding_window", "null"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.sliding_window, 0);
    }
    {
        Parsed p(make_arch("phi3", {{"sliding_window", "2047"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.sliding_window, 2047);
    }
}

TEST(LlmConfigDefaults, ExplicitHeadDimAndBiases) {
    // Mistral-Nemo style: head_dim given and not hidden_size / heads.
    {
        Parsed p(make_arch(
            "mistral",
            {{"head_dim", "32"}, {"num_attention_heads", "5"}, {"num_key_value_heads", "5"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.head_dim, 32);
        EXPECT_EQ(p.cfg.num_heads, 5);
    }
    // LlamaConfig checks divisibility even with head_dim given.
    expect_error(
        make(small_llama(),
             {{"head_dim", "32"}, {"num_attention_heads", "5"}, {"num_key_value_heads", "5"}}),
        SF_ERR_CONFIG, {"num_attention_heads = 5", "hidden_size = 64"});
    {
        Parsed p(make(small_llama(), {{"attention_bias", "true"}, {"mlp_bias", "false"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_TRUE(p.cfg.attention_bias);
        EXPECT_FALSE(p.cfg.qkv_bias);
    }
    // The Mistral, Qwen2 and Phi3 classes have no attention_bias key: it is ignored there.
    for (const char *arch : {"mistral", "qwen2", "phi3"}) {
        Parsed p(make_arch(arch, {{"attention_bias", "true"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_FALSE(p.cfg.attention_bias) << arch;
        EXPECT_EQ(p.cfg.qkv_bias, !std::strcmp(arch, "qwen2")) << arch;
    }
    // transformers maps "swish" to the same SiLU.
    Parsed sw(make(small_llama(), {{"hidden_act", "\"swish\""}}));
    EXPECT_EQ(sw.status, SF_OK) << sw.error;
}

TEST(LlmConfigDefaults, EosForms) {
    {
        Parsed p(make(small_llama(), {{"eos_token_id", "[]"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.n_eos_token_ids, 0);
    }
    {
        Parsed p(make(small_llama(), {{"eos_token_id", "[5, 6, 7, 8, 9, 10, 11, 12]"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        ASSERT_EQ(p.cfg.n_eos_token_ids, SF_MAX_EOS_IDS);
        EXPECT_EQ(p.cfg.eos_token_ids[7], 12);
    }
    {
        // Ids beyond the vocabulary only draw a warning from transformers.
        Parsed p(make(small_llama(), {{"eos_token_id", "128009"}, {"bos_token_id", "128000"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.eos_token_ids[0], 128009);
        EXPECT_EQ(p.cfg.bos_token_id, 128000);
    }
    expect_error(make(small_llama(), {{"eos_token_id", "[1, 2, 3, 4, 5, 6, 7, 8, 9]"}}),
                 SF_ERR_UNSUPPORTED, {"eos_token_id", "9"});
    expect_error(make(small_llama(), {{"eos_token_id", "[1, \"2\"]"}}), SF_ERR_CONFIG,
                 {"eos_token_id[1]", "string"});
    expect_error(make(small_llama(), {{"eos_token_id", "[1, -3]"}}), SF_ERR_CONFIG,
                 {"eos_token_id[1] = -3"});
    expect_error(make(small_llama(), {{"eos_token_id", "\"</s>\""}}), SF_ERR_CONFIG,
                 {"eos_token_id"});
    expect_error(make(small_llama(), {{"bos_token_id", "-1"}}), SF_ERR_CONFIG,
                 {"bos_token_id = -1"});
}

TEST(LlmConfigRope, PrecedenceBetweenOldAndNewKeys) {
    // A non-empty rope_scaling wins over rope_parameters (convert_rope_params_to_dict).
    {
        Parsed p(make(small_llama(),
                      {{"rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}"},
                       {"rope_parameters", "{\"rope_type\": \"linear\", \"factor\": 4.0}"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.factor, 2.0);
    }
    // An empty rope_scaling is falsy in Python and falls through to rope_parameters.
    {
        Parsed p(make(small_llama(),
                      {{"rope_scaling", "{}"},
                       {"rope_parameters", "{\"rope_type\": \"linear\", \"factor\": 4.0}"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.type, SF_ROPE_LINEAR);
        EXPECT_EQ(p.cfg.rope.factor, 4.0);
    }
    // rope_theta inside the dict wins over the top-level one; otherwise the top-level one counts.
    {
        Parsed p(make(small_llama(),
                      {{"rope_theta", "3.0"},
                       {"rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": 7.0}"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope_theta, 7.0);
    }
    {
        Parsed p(make(small_llama(),
                      {{"rope_theta", "3"}, {"rope_parameters", "{\"rope_type\": \"default\"}"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope_theta, 3.0);
    }
    // "rope_type" wins over its old alias "type".
    {
        Parsed p(make(small_llama(),
                      {{"rope_scaling",
                        "{\"rope_type\": \"linear\", \"type\": \"dynamic\", \"factor\": 2}"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.type, SF_ROPE_LINEAR);
        EXPECT_EQ(p.cfg.rope.factor, 2.0);
    }
}

TEST(LlmConfigRope, OriginalMaxPositionEmbeddings) {
    const std::string lists =
        "\"short_factor\": " + json_list(8, "1") + ", \"long_factor\": " + json_list(8, "2");
    // llama3 without it in the dict: max_position_embeddings.
    {
        Parsed p(make(small_llama(),
                      {{"rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8, "
                                        "\"low_freq_factor\": 1, \"high_freq_factor\": 4}"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.original_max_position_embeddings, 4096);
    }
    // A top-level value wins over the dict's (transformers re-standardises with the attribute).
    {
        std::string rope =
            "{\"type\": \"longrope\", " + lists + ", \"original_max_position_embeddings\": 2048}";
        Parsed p(make(small_llama(), {{"rope_scaling", rope.c_str()},
                                      {"original_max_position_embeddings", "512"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.original_max_position_embeddings, 512);
        EXPECT_EQ(p.cfg.rope.factor, 8.0);
        EXPECT_DOUBLE_EQ(p.cfg.rope.attention_factor, longrope_attention(8.0, 512.0));
    }
    // Only the dict: its value.
    {
        std::string rope =
            "{\"type\": \"longrope\", " + lists + ", \"original_max_position_embeddings\": 2048}";
        Parsed p(make(small_llama(), {{"rope_scaling", rope.c_str()}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.original_max_position_embeddings, 2048);
        EXPECT_EQ(p.cfg.rope.factor, 2.0);
        EXPECT_DOUBLE_EQ(p.cfg.rope.attention_factor, longrope_attention(2.0, 2048.0));
    }
    // Neither: max_position_embeddings, so factor 1 and no attention scaling.
    {
        std::string rope = "{\"type\": \"longrope\", " + lists + "}";
        Parsed p(make(small_llama(), {{"rope_scaling", rope.c_str()}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.original_max_position_embeddings, 4096);
        EXPECT_EQ(p.cfg.rope.factor, 1.0);
        EXPECT_EQ(p.cfg.rope.attention_factor, 1.0);
    }
    // Phi3Config always has the attribute (default 4096), so for phi3 it beats the dict.
    {
        std::string rope =
            "{\"type\": \"su\", " + lists + ", \"original_max_position_embeddings\": 8192}";
        Parsed p(make_arch(
            "phi3", {{"rope_scaling", rope.c_str()}, {"max_position_embeddings", "131072"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.type, SF_ROPE_LONGROPE);
        EXPECT_EQ(p.cfg.rope.original_max_position_embeddings, 4096);
        EXPECT_DOUBLE_EQ(p.cfg.rope.attention_factor, longrope_attention(32.0, 4096.0));
    }
    // Explicit factor and attention_factor are used as given.
    {
        std::string rope = "{\"type\": \"longrope\", " + lists + ", \"factor\": 4.0}";
        Parsed p(make_arch(
            "phi3", {{"rope_scaling", rope.c_str()}, {"max_position_embeddings", "131072"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.factor, 4.0);
        EXPECT_DOUBLE_EQ(p.cfg.rope.attention_factor, longrope_attention(4.0, 4096.0));
    }
    {
        std::string rope =
            "{\"type\": \"longrope\", " + lists + ", \"factor\": 4.0, \"attention_factor\": 1.5}";
        Parsed p(make_arch(
            "phi3", {{"rope_scaling", rope.c_str()}, {"max_position_embeddings", "131072"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.rope.attention_factor, 1.5);
    }
}

TEST(LlmConfigRope, Qwen2SlidingWindowOnlyWhenSomeLayerSlides) {
    // use_sliding_window with max_window_layers >= num_hidden_layers slides no layer.
    {
        Parsed p(make_arch("qwen2", {{"use_sliding_window", "true"},
                                     {"sliding_window", "16"},
                                     {"max_window_layers", "2"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.sliding_window, 0);
    }
    {
        Parsed p(make_arch("qwen2", {{"use_sliding_window", "true"}, {"sliding_window", "null"}}));
        ASSERT_EQ(p.status, SF_OK) << p.error;
        EXPECT_EQ(p.cfg.sliding_window, 0);
    }
    expect_error(make_arch("qwen2", {{"use_sliding_window", "true"},
                                     {"sliding_window", "16"},
                                     {"max_window_layers", "1"}}),
                 SF_ERR_UNSUPPORTED, {"use_sliding_window"});
    // Defaults: window 4096 from layer max_window_layers = 28 on.
    expect_error(make_arch("qwen2", {{"use_sliding_window", "true"}, {"num_hidden_layers", "30"}}),
                 SF_ERR_UNSUPPORTED, {"use_sliding_window", "layers 28..29"});
    expect_error(
        make_arch("qwen2", {{"layer_types", "[\"full_attention\", \"sliding_attention\"]"}}),
        SF_ERR_UNSUPPORTED, {"layer_types[1]", "sliding_attention"});
    expect_error(make_arch("qwen2", {{"use_sliding_window", "1"}}), SF_ERR_CONFIG,
                 {"use_sliding_window"});
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

TEST(LlmConfigErrors, MalformedJson) {
    expect_error("{\"model_type\": \"llama\",\n \"hidden_size\": 64,,}", SF_ERR_FORMAT,
                 {"line 2", "column"});
    expect_error("", SF_ERR_FORMAT, {"line"});
    expect_error("[{\"model_type\": \"llama\"}]", SF_ERR_FORMAT, {"object", "array"});
    expect_error("{\"model_type\": \"llama\", \"model_type\": \"llama\"}", SF_ERR_FORMAT,
                 {"duplicate", "model_type"});
    expect_error("{\"model_type\": \"llama\", \"rope_theta\": NaN}", SF_ERR_FORMAT, {"line 1"});
    // An integer beyond 64 bits is a JSON-level error in jansson.
    expect_error(make(small_llama(), {{"vocab_size", "123456789012345678901234567890"}}),
                 SF_ERR_FORMAT, {"line 1"});
}

TEST(LlmConfigErrors, ModelTypeAndUnsupportedFeatures) {
    expect_error(make(small_llama(), {{"model_type", "\"gemma\""}}), SF_ERR_UNSUPPORTED,
                 {"model_type", "gemma"});
    expect_error(make(small_llama(), {{"model_type", nullptr}}), SF_ERR_NOT_FOUND, {"model_type"});
    expect_error(make(small_llama(), {{"model_type", "7"}}), SF_ERR_CONFIG,
                 {"model_type", "integer"});
    expect_error(make(small_llama(), {{"hidden_act", "\"gelu\""}}), SF_ERR_UNSUPPORTED,
                 {"hidden_act", "gelu"});
    expect_error(make(small_llama(), {{"mlp_bias", "true"}}), SF_ERR_UNSUPPORTED, {"mlp_bias"});
    expect_error(make_arch("phi3", {{"partial_rotary_factor", "0.5"}}), SF_ERR_UNSUPPORTED,
                 {"partial_rotary_factor", "0.5"});
    expect_error(
        make_arch("phi3", {{"rope_parameters",
                            "{\"rope_type\": \"default\", \"partial_rotary_factor\": 0.75}"}}),
        SF_ERR_UNSUPPORTED, {"partial_rotary_factor", "0.75"});
    for (const char *type : {"dynamic", "yarn", "ntk"}) {
        std::string rope = std::string("{\"rope_type\": \"") + type + "\", \"factor\": 2.0}";
        expect_error(make(small_llama(), {{"rope_scaling", rope.c_str()}}), SF_ERR_UNSUPPORTED,
                     {"rope_scaling.rope_type", type});
    }
    // Phi3Config accepts only default and longrope.
    expect_error(make_arch("phi3", {{"rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}"}}),
                 SF_ERR_UNSUPPORTED, {"rope_scaling.type", "linear"});
    expect_error(make(small_llama(),
                      {{"rope_parameters", "{\"full_attention\": {\"rope_type\": \"default\"}}"}}),
                 SF_ERR_UNSUPPORTED, {"rope_parameters"});
}

TEST(LlmConfigErrors, AbsurdSizes) {
    expect_error(make(small_llama(), {{"num_hidden_layers", "0"}}), SF_ERR_CONFIG,
                 {"num_hidden_layers = 0"});
    expect_error(make(small_llama(), {{"num_hidden_layers", "5000"}}), SF_ERR_CONFIG,
                 {"num_hidden_layers = 5000"});
    expect_error(make(small_llama(), {{"vocab_size", "-1"}}), SF_ERR_CONFIG, {"vocab_size = -1"});
    expect_error(make(small_llama(), {{"vocab_size", "100000000"}}), SF_ERR_CONFIG,
                 {"vocab_size = 100000000"});
    expect_error(make(small_llama(), {{"hidden_size", "4294967360"}}), SF_ERR_CONFIG,
                 {"hidden_size = 4294967360"});
    expect_error(make(small_llama(), {{"hidden_size", "2097152"}}), SF_ERR_CONFIG,
                 {"hidden_size = 2097152"});
    expect_error(make(small_llama(), {{"intermediate_size", "0"}}), SF_ERR_CONFIG,
                 {"intermediate_size = 0"});
    expect_error(make(small_llama(), {{"max_position_embeddings", "0"}}), SF_ERR_CONFIG,
                 {"max_position_embeddings = 0"});
    expect_error(make(small_llama(), {{"num_attention_heads", "0"}}), SF_ERR_CONFIG,
                 {"num_attention_heads = 0"});
    expect_error(make(small_llama(), {{"num_attention_heads", "5"}, {"num_key_value_heads", "5"}}),
                 SF_ERR_CONFIG, {"num_attention_heads = 5", "hidden_size = 64"});
    expect_error(make(small_llama(), {{"num_key_value_heads", "3"}}), SF_ERR_CONFIG,
                 {"num_key_value_heads = 3", "num_attention_heads = 4"});
    expect_error(make(small_llama(), {{"num_key_value_heads", "8"}}), SF_ERR_CONFIG,
                 {"num_key_value_heads = 8"});
    expect_error(make(small_llama(), {{"num_key_value_heads", "0"}}), SF_ERR_CONFIG,
                 {"num_key_value_heads = 0"});
    expect_error(make_arch("mistral", {{"head_dim", "15"}}), SF_ERR_CONFIG, {"head_dim = 15"});
    expect_error(make_arch("mistral", {{"head_dim", "1024"}}), SF_ERR_CONFIG, {"head_dim = 1024"});
    expect_error(make_arch("mistral", {{"head_dim", "0"}}), SF_ERR_CONFIG, {"head_dim = 0"});
    // Derived head dims: 60 / 4 = 15 is odd; 4096 / 4 = 1024 is too large.
    expect_error(make(small_llama(), {{"hidden_size", "60"}}), SF_ERR_CONFIG, {"head_dim = 15"});
    expect_error(make(small_llama(), {{"hidden_size", "4096"}}), SF_ERR_CONFIG,
                 {"head_dim", "1024"});
    expect_error(make_arch("mistral", {{"sliding_window", "0"}}), SF_ERR_CONFIG,
                 {"sliding_window = 0"});
}

TEST(LlmConfigErrors, AbsurdReals) {
    expect_error(make(small_llama(), {{"rms_norm_eps", "-1e-06"}}), SF_ERR_CONFIG,
                 {"rms_norm_eps = -1e-06"});
    expect_error(make(small_llama(), {{"rms_norm_eps", "0"}}), SF_ERR_CONFIG, {"rms_norm_eps = 0"});
    expect_error(make(small_llama(), {{"rms_norm_eps", "1e-300"}}), SF_ERR_CONFIG,
                 {"rms_norm_eps", "float"});
    expect_error(make(small_llama(), {{"rope_theta", "0.0"}}), SF_ERR_CONFIG, {"rope_theta = 0"});
    expect_error(make(small_llama(), {{"rope_theta", "-10000"}}), SF_ERR_CONFIG,
                 {"rope_theta = -10000"});
    expect_error(make(small_llama(),
                      {{"rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": 0}"}}),
                 SF_ERR_CONFIG, {"rope_parameters.rope_theta = 0"});
    expect_error(make(small_llama(), {{"rope_scaling", "{\"type\": \"linear\", \"factor\": 0}"}}),
                 SF_ERR_CONFIG, {"rope_scaling.factor = 0"});
    expect_error(
        make(small_llama(), {{"rope_scaling", "{\"type\": \"linear\", \"factor\": -2.0}"}}),
        SF_ERR_CONFIG, {"rope_scaling.factor = -2"});
    expect_error(
        make(small_llama(), {{"rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8, "
                                              "\"low_freq_factor\": 4, \"high_freq_factor\": 4}"}}),
        SF_ERR_CONFIG, {"high_freq_factor = 4", "low_freq_factor = 4"});
    expect_error(
        make(small_llama(), {{"rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8, "
                                              "\"low_freq_factor\": 0, \"high_freq_factor\": 4}"}}),
        SF_ERR_CONFIG, {"low_freq_factor = 0"});
    const std::string lists =
        "\"short_factor\": " + json_list(8, "1") + ", \"long_factor\": " + json_list(8, "2");
    std::string rope = "{\"type\": \"longrope\", " + lists + ", \"attention_factor\": -1}";
    expect_error(make(small_llama(), {{"rope_scaling", rope.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.attention_factor = -1"});
    rope = "{\"type\": \"longrope\", " + lists + ", \"original_max_position_embeddings\": 0}";
    expect_error(make(small_llama(), {{"rope_scaling", rope.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.original_max_position_embeddings = 0"});
    // ln(1) = 0 would make the default attention factor infinite.
    rope = "{\"type\": \"longrope\", " + lists + ", \"original_max_position_embeddings\": 1}";
    expect_error(make(small_llama(), {{"rope_scaling", rope.c_str()}}), SF_ERR_CONFIG,
                 {"original_max_position_embeddings = 1"});
}

TEST(LlmConfigErrors, WrongJsonTypes) {
    expect_error(make(small_llama(), {{"hidden_size", "\"64\""}}), SF_ERR_CONFIG,
                 {"hidden_size", "string"});
    expect_error(make(small_llama(), {{"hidden_size", "64.5"}}), SF_ERR_CONFIG,
                 {"hidden_size", "real"});
    // transformers' strict dataclasses refuse a float for an int even when it is integral.
    expect_error(make(small_llama(), {{"hidden_size", "64.0"}}), SF_ERR_CONFIG,
                 {"hidden_size", "real"});
    expect_error(make(small_llama(), {{"hidden_size", "null"}}), SF_ERR_CONFIG,
                 {"hidden_size", "null"});
    expect_error(make(small_llama(), {{"num_hidden_layers", "true"}}), SF_ERR_CONFIG,
                 {"num_hidden_layers", "boolean"});
    expect_error(make(small_llama(), {{"rms_norm_eps", "\"1e-6\""}}), SF_ERR_CONFIG,
                 {"rms_norm_eps", "string"});
    expect_error(make(small_llama(), {{"rope_theta", "null"}}), SF_ERR_CONFIG,
                 {"rope_theta", "null"});
    expect_error(make(small_llama(), {{"tie_word_embeddings", "1"}}), SF_ERR_CONFIG,
                 {"tie_word_embeddings", "integer"});
    expect_error(make(small_llama(), {{"attention_bias", "\"false\""}}), SF_ERR_CONFIG,
                 {"attention_bias", "string"});
    expect_error(make(small_llama(), {{"hidden_act", "null"}}), SF_ERR_CONFIG,
                 {"hidden_act", "null"});
    expect_error(make(small_llama(), {{"rope_scaling", "\"linear\""}}), SF_ERR_CONFIG,
                 {"rope_scaling", "string"});
    expect_error(make(small_llama(), {{"rope_parameters", "[1]"}}), SF_ERR_CONFIG,
                 {"rope_parameters", "array"});
    expect_error(make(small_llama(), {{"rope_scaling", "{\"type\": 3, \"factor\": 2}"}}),
                 SF_ERR_CONFIG, {"rope_scaling.type", "integer"});
    expect_error(
        make(small_llama(), {{"rope_scaling", "{\"type\": \"linear\", \"factor\": \"2\"}"}}),
        SF_ERR_CONFIG, {"rope_scaling.factor", "string"});
    expect_error(make(small_llama(), {{"num_key_value_heads", "2.0"}}), SF_ERR_CONFIG,
                 {"num_key_value_heads", "real"});
    expect_error(make(small_llama(), {{"max_position_embeddings", "[4096]"}}), SF_ERR_CONFIG,
                 {"max_position_embeddings", "array"});
}

TEST(LlmConfigErrors, MissingRopeKeys) {
    expect_error(make(small_llama(), {{"rope_scaling", "{\"type\": \"linear\"}"}}),
                 SF_ERR_NOT_FOUND, {"rope_scaling.factor"});
    expect_error(make(small_llama(),
                      {{"rope_parameters",
                        "{\"rope_type\": \"llama3\", \"factor\": 8, \"low_freq_factor\": 1}"}}),
                 SF_ERR_NOT_FOUND, {"rope_parameters.high_freq_factor"});
    expect_error(
        make_arch("phi3",
                  {{"rope_scaling",
                    "{\"type\": \"longrope\", \"long_factor\": [1, 1, 1, 1, 1, 1, 1, 1]}"}}),
        SF_ERR_NOT_FOUND, {"rope_scaling.short_factor"});
}

TEST(LlmConfigErrors, LongropeFactorLists) {
    auto rope = [](const std::string &s, const std::string &l) {
        return "{\"type\": \"longrope\", \"short_factor\": " + s + ", \"long_factor\": " + l + "}";
    };
    const std::string ok = json_list(8, "1.0");
    std::string r = rope(json_list(7, "1.0"), ok);
    expect_error(make_arch("phi3", {{"rope_scaling", r.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.short_factor", "7", "8"});
    r = rope(ok, json_list(9, "1.0"));
    expect_error(make_arch("phi3", {{"rope_scaling", r.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.long_factor", "9", "8"});
    r = rope(ok, "[1, 1, 1, 1, 1, 1, 1, \"x\"]");
    expect_error(make_arch("phi3", {{"rope_scaling", r.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.long_factor[7]", "string"});
    r = rope("[1, 1, 0, 1, 1, 1, 1, 1]", ok);
    expect_error(make_arch("phi3", {{"rope_scaling", r.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.short_factor[2] = 0"});
    r = rope("[1, 1, 1, 1, 1, 1, 1, 1e39]", ok);
    expect_error(make_arch("phi3", {{"rope_scaling", r.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.short_factor[7]"});
    r = rope("{\"0\": 1}", ok);
    expect_error(make_arch("phi3", {{"rope_scaling", r.c_str()}}), SF_ERR_CONFIG,
                 {"rope_scaling.short_factor", "object"});
    // Integers are numbers too.
    r = rope("[1, 2, 3, 4, 5, 6, 7, 8]", ok);
    Parsed p(make_arch("phi3", {{"rope_scaling", r.c_str()}}));
    ASSERT_EQ(p.status, SF_OK) << p.error;
    EXPECT_EQ(p.cfg.rope.short_factor[7], 8.0f);
}

TEST(LlmConfigErrors, InvalidArguments) {
    sf_llm_config cfg;
    EXPECT_EQ(sf_llm_config_parse("{}", 2, kSource, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_llm_config_parse(nullptr, 5, kSource, &cfg), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(is_all_zero(cfg));
    EXPECT_EQ(sf_llm_config_load(nullptr, &cfg), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_llm_config_load("x", nullptr), SF_ERR_INVALID_ARGUMENT);
    // Without a source name, messages still say where.
    EXPECT_EQ(sf_llm_config_parse("{}", 2, nullptr, &cfg), SF_ERR_NOT_FOUND);
    EXPECT_NE(std::string(sf_last_error()).find("config.json"), std::string::npos);
    // Text that is not NUL-terminated is read only up to len.
    const char text[] = "{\"model_type\": \"llama\"}GARBAGE";
    EXPECT_EQ(sf_llm_config_parse(text, sizeof text - 1 - 7, kSource, &cfg), SF_OK)
        << sf_last_error();
    sf_llm_config_release(&cfg);
}

// ------------------------------------------------------------------------------------------------
// Files and ownership
// ------------------------------------------------------------------------------------------------

TEST(LlmConfigFile, LoadFromFileAndRelease) {
    char path[] = "/tmp/sf_test_llm_config_XXXXXX";
    int fd = mkstemp(path);
    ASSERT_GE(fd, 0);
    const size_t n = std::strlen(kPhi35_Mini_Instruct);
    ASSERT_EQ(write(fd, kPhi35_Mini_Instruct, n), (ssize_t)n);
    close(fd);

    sf_llm_config cfg;
    sf_status st = sf_llm_config_load(path, &cfg);
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    EXPECT_EQ(cfg.arch, SF_ARCH_PHI3);
    EXPECT_EQ(cfg.head_dim, 96);
    ASSERT_NE(cfg.rope.long_factor, nullptr);
    EXPECT_EQ(cfg.rope.long_factor[47], (float)64.83999633789062);
    sf_llm_config_release(&cfg);
    EXPECT_EQ(cfg.rope.short_factor, nullptr);
    EXPECT_EQ(cfg.rope.long_factor, nullptr);
    sf_llm_config_release(&cfg); // twice is safe
    sf_llm_config_release(nullptr);

    // Errors from a file name the path.
    FILE *f = std::fopen(path, "w");
    ASSERT_NE(f, nullptr);
    std::fputs("{\"model_type\": \"llama\", \"num_hidden_layers\": 0}", f);
    std::fclose(f);
    std::memset(&cfg, 0xAB, sizeof cfg);
    EXPECT_EQ(sf_llm_config_load(path, &cfg), SF_ERR_CONFIG);
    EXPECT_NE(std::string(sf_last_error()).find(path), std::string::npos) << sf_last_error();
    EXPECT_NE(std::string(sf_last_error()).find("num_hidden_layers"), std::string::npos);
    EXPECT_TRUE(is_all_zero(cfg));
    unlink(path);
}

TEST(LlmConfigFile, FileNotFound) {
    sf_llm_config cfg;
    std::memset(&cfg, 0xAB, sizeof cfg);
    const char *path = "/nonexistent/dir/config.json";
    EXPECT_EQ(sf_llm_config_load(path, &cfg), SF_ERR_IO);
    EXPECT_NE(std::string(sf_last_error()).find(path), std::string::npos) << sf_last_error();
    EXPECT_TRUE(is_all_zero(cfg));
}
