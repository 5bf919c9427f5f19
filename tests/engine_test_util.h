// Helpers for tests/test_cuda_engine.cpp: small LLMs shaped like the golden fixtures but with a
// head dimension the fused attention has (64), a Sysformer whose every branch is open, packed
// guarded prompts, and the CPU references the engine is held to.
//
// Why not the golden checkpoints themselves: tests/golden/llm/* have head_dim 16 or 32, and the
// engine refuses any head dimension but 64, 80, 96 and 128 (SF_ERR_UNSUPPORTED, sysformer.h).
// So each golden configuration is rebuilt here with the same features (architecture, RoPE type
// and scaling, GQA ratio, biases, sliding window, tied head) at head_dim 64, with random weights
// scaled like nn.Linear's (std 1/sqrt(fan_in)) so that no layer amplifies rounding errors.
#pragma once

#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "io/llm_config.h"
#include "io/safetensors.h"
#include "model_fixtures.h"
#include "sysformer.h"
#include "sysformer/module.h"

#ifndef SF_SOURCE_DIR
#define SF_SOURCE_DIR "."
#endif

namespace sf_engine_test {

// bfloat16 keeps 8 significant bits: rounding to nearest moves x by at most 2^-9 |x|.
constexpr double kUbf16 = 1.0 / 512.0;

inline bool have_gpu() {
    int count = 0;
    return sf_cuda_built() && sf_cuda_device_count(&count) == SF_OK && count > 0;
}

// Portable seeded uniforms (splitmix64), so a model is the same on every machine and libc++.
class Uniform {
  public:
    explicit Uniform(uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
    uint64_t next_u64() {
        uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double unit() { return (double)(next_u64() >> 11) / 9007199254740992.0; }  // [0, 1)
    float sym(double a) { return (float)((2.0 * unit() - 1.0) * a); }           // U(-a, a)
    int32_t below(int32_t lo, int32_t hi) {  // [lo, hi)
        return lo + (int32_t)(next_u64() % (uint64_t)(hi - lo));
    }

  private:
    uint64_t s_;
};

// ------------------------------------------------------------------------------------------
// The golden configurations at head_dim 64
// ------------------------------------------------------------------------------------------

inline const std::vector<std::string> &variant_names() {
    static const std::vector<std::string> names = {"llama_gqa_llama3", "mistral_window",
                                                   "qwen2_bias", "phi3_longrope",
                                                   "llama_tied_linear"};
    return names;
}

// config.json of a variant ("" for an unknown name). Every one: vocab 96, 2 layers,
// max_position_embeddings 128, head_dim 64.
//   llama_gqa_llama3   Llama, hidden 256, GQA 4q/2kv, rope llama3 (factor 8, low/high 1/4,
//                      original_max 48: with head_dim 64 and theta 1e4 the wavelengths run from
//                      6.3 to 4.6e4, so the kept (< 12), interpolated and divided (> 48) bands
//                      are all hit)
//   mistral_window     Mistral, hidden 128, 2q/1kv, sliding_window 8
//   qwen2_bias         Qwen2, hidden 256, GQA 4q/2kv, q/k/v biases, rope_theta 1e6, eps 1e-6
//   phi3_longrope      Phi-3, fused qkv_proj / gate_up_proj, hidden 256, 4q/2kv, longrope with
//                      original_max 16 (short factors while a request's length is <= 16, long
//                      factors and attention factor sqrt(1 + ln 8 / ln 16) beyond)
//   llama_tied_linear  Llama, hidden 256, MHA 4/4, q/k/v/o biases, tied embeddings, rope linear 2
inline std::string variant_config(const std::string &name) {
    const std::string common =
        "\"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": \"silu\", "
        "\"max_position_embeddings\": 128, \"num_hidden_layers\": 2, \"vocab_size\": 96, "
        "\"torch_dtype\": \"float32\"";
    if (name == "llama_gqa_llama3") {
        return "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", " + common +
               ", \"attention_bias\": false, \"head_dim\": 64, \"hidden_size\": 256, "
               "\"intermediate_size\": 344, \"num_attention_heads\": 4, "
               "\"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-05, \"rope_parameters\": "
               "{\"factor\": 8.0, \"high_freq_factor\": 4.0, \"low_freq_factor\": 1.0, "
               "\"original_max_position_embeddings\": 48, \"rope_theta\": 10000.0, "
               "\"rope_type\": \"llama3\"}, \"tie_word_embeddings\": false}";
    }
    if (name == "mistral_window") {
        return "{\"architectures\": [\"MistralForCausalLM\"], \"model_type\": \"mistral\", " +
               common +
               ", \"head_dim\": 64, \"hidden_size\": 128, \"intermediate_size\": 232, "
               "\"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"rms_norm_eps\": 1e-05, "
               "\"rope_parameters\": {\"rope_theta\": 10000.0, \"rope_type\": \"default\"}, "
               "\"sliding_window\": 8, \"tie_word_embeddings\": false}";
    }
    if (name == "qwen2_bias") {
        return "{\"architectures\": [\"Qwen2ForCausalLM\"], \"model_type\": \"qwen2\", " + common +
               ", \"hidden_size\": 256, \"intermediate_size\": 344, \"max_window_layers\": 28, "
               "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-06, "
               "\"rope_parameters\": {\"rope_theta\": 1000000.0, \"rope_type\": \"default\"}, "
               "\"sliding_window\": null, \"use_sliding_window\": false, "
               "\"tie_word_embeddings\": false}";
    }
    if (name == "phi3_longrope") {
        std::string shorts, longs;
        char buf[32];
        for (int i = 0; i < 32; i++) {  // head_dim / 2 factors each
            snprintf(buf, sizeof buf, "%s%.4f", i ? ", " : "", 1.0 + 0.03 * i);
            shorts += buf;
            snprintf(buf, sizeof buf, "%s%.4f", i ? ", " : "", 1.5 + 0.08 * i);
            longs += buf;
        }
        return "{\"architectures\": [\"Phi3ForCausalLM\"], \"model_type\": \"phi3\", " + common +
               ", \"hidden_size\": 256, \"intermediate_size\": 344, \"num_attention_heads\": 4, "
               "\"num_key_value_heads\": 2, \"original_max_position_embeddings\": 16, "
               "\"rms_norm_eps\": 1e-05, \"rope_parameters\": {\"long_factor\": [" +
               longs + "], \"short_factor\": [" + shorts +
               "], \"original_max_position_embeddings\": 16, \"partial_rotary_factor\": 1.0, "
               "\"rope_theta\": 10000.0, \"rope_type\": \"longrope\"}, \"sliding_window\": null, "
               "\"tie_word_embeddings\": false}";
    }
    if (name == "llama_tied_linear") {
        return "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", " + common +
               ", \"attention_bias\": true, \"head_dim\": 64, \"hidden_size\": 256, "
               "\"intermediate_size\": 344, \"num_attention_heads\": 4, "
               "\"num_key_value_heads\": 4, \"rms_norm_eps\": 1e-05, \"rope_parameters\": "
               "{\"factor\": 2.0, \"rope_theta\": 10000.0, \"rope_type\": \"linear\"}, "
               "\"tie_word_embeddings\": true}";
    }
    return "";
}

// Writes dir/config.json and dir/model.safetensors (F32) for a variant: the tensors the loader
// expects for that architecture (host/model/llm.c), drawn from seed. Embeddings U with std 1,
// linear weights U(+-sqrt(3 / fan_in)) (std 1/sqrt(fan_in)), the LM head likewise, norm weights
// 1 + U(+-0.2), biases U(+-0.3) (large enough that dropping one moves the logits visibly).
// f16_embedding: the embedding table is stored as F16 (rounded to nearest), as in a checkpoint
// published in fp16 (Llama 2's): the model an fp16 serving stack runs.
inline ::testing::AssertionResult write_llm_variant(const std::string &name,
                                                    const std::string &dir, uint64_t seed,
                                                    bool f16_embedding = false) {
    const std::string json = variant_config(name);
    if (json.empty()) return ::testing::AssertionFailure() << "unknown variant " << name;
    {
        FILE *f = fopen((dir + "/config.json").c_str(), "wb");
        if (!f) return ::testing::AssertionFailure() << "cannot write " << dir << "/config.json";
        fwrite(json.data(), 1, json.size(), f);
        fclose(f);
    }
    sf_llm_config c;
    if (sf_llm_config_parse(json.data(), json.size(), name.c_str(), &c) != SF_OK) {
        return ::testing::AssertionFailure() << name << ": " << sf_last_error();
    }
    const int64_t d = c.hidden_size, ff = c.intermediate_size, v = c.vocab_size;
    const int64_t q_dim = (int64_t)c.num_heads * c.head_dim;
    const int64_t kv_dim = (int64_t)c.num_kv_heads * c.head_dim;
    struct T {
        std::string name;
        int64_t rows, cols;  // cols == 0: a vector
    };
    std::vector<T> ts;
    ts.push_back({"model.embed_tokens.weight", v, d});
    ts.push_back({"model.norm.weight", d, 0});
    if (!c.tie_word_embeddings) ts.push_back({"lm_head.weight", v, d});
    for (int i = 0; i < c.num_layers; i++) {
        const std::string p = "model.layers." + std::to_string(i) + ".";
        ts.push_back({p + "input_layernorm.weight", d, 0});
        ts.push_back({p + "post_attention_layernorm.weight", d, 0});
        if (c.arch == SF_ARCH_PHI3) {
            ts.push_back({p + "self_attn.qkv_proj.weight", q_dim + 2 * kv_dim, d});
            ts.push_back({p + "mlp.gate_up_proj.weight", 2 * ff, d});
        } else {
            ts.push_back({p + "self_attn.q_proj.weight", q_dim, d});
            ts.push_back({p + "self_attn.k_proj.weight", kv_dim, d});
            ts.push_back({p + "self_attn.v_proj.weight", kv_dim, d});
            ts.push_back({p + "mlp.gate_proj.weight", ff, d});
            ts.push_back({p + "mlp.up_proj.weight", ff, d});
        }
        if (c.attention_bias || c.qkv_bias) {
            ts.push_back({p + "self_attn.q_proj.bias", q_dim, 0});
            ts.push_back({p + "self_attn.k_proj.bias", kv_dim, 0});
            ts.push_back({p + "self_attn.v_proj.bias", kv_dim, 0});
        }
        ts.push_back({p + "self_attn.o_proj.weight", d, q_dim});
        if (c.attention_bias) ts.push_back({p + "self_attn.o_proj.bias", d, 0});
        ts.push_back({p + "mlp.down_proj.weight", d, ff});
    }
    sf_llm_config_release(&c);

    Uniform rng(seed);
    std::vector<std::vector<float>> data(ts.size());
    std::vector<sf_st_entry> entries(ts.size());
    std::vector<uint16_t> f16;
    for (size_t i = 0; i < ts.size(); i++) {
        const T &t = ts[i];
        data[i].resize((size_t)(t.rows * (t.cols ? t.cols : 1)));
        const bool norm = t.name.find("norm") != std::string::npos;
        const bool bias = t.name.find("bias") != std::string::npos;
        const bool embed = t.name.find("embed_tokens") != std::string::npos;
        for (float &x : data[i]) {
            if (norm) x = 1.0f + rng.sym(0.2);
            else if (bias) x = rng.sym(0.3);
            else if (embed) x = rng.sym(std::sqrt(3.0));
            else x = rng.sym(std::sqrt(3.0 / (double)t.cols));
        }
        entries[i].name = t.name.c_str();
        entries[i].dtype = SF_DTYPE_F32;
        entries[i].ndim = t.cols ? 2 : 1;
        entries[i].shape[0] = t.rows;
        entries[i].shape[1] = t.cols;
        entries[i].data = data[i].data();
        if (embed && f16_embedding) {
            f16 = to_f16(data[i]);
            entries[i].dtype = SF_DTYPE_F16;
            entries[i].data = f16.data();
        }
    }
    const std::string path = dir + "/model.safetensors";
    if (sf_st_write(path.c_str(), entries.data(), (int64_t)entries.size(), nullptr) != SF_OK) {
        return ::testing::AssertionFailure() << sf_last_error();
    }
    return ::testing::AssertionSuccess();
}

// A Sysformer with every branch open: sf_sysformer_init (PyTorch's default init for in_proj and
// linear1, which is what a trained module starts from), then the tensors init leaves at zero or
// one filled in place: out_proj and linear2 weights U(+-1/sqrt(fan_in)) (nn.Linear's bound), all
// biases U(+-0.2), LayerNorm weights 1 + U(+-0.2). Scaled like this no sub-layer amplifies its
// input, so the bf16 bound below applies (a module with weights several times larger than
// 1/sqrt(fan_in) makes the attention softmax near one-hot and ill-conditioned).
// This one has the configuration cfg; a learned system offset (cfg.system_offset_rows > 0) is
// U(+-sqrt 3) like the embedding rows it is added to (num_layers 0 with an offset: the
// SystemEmbedder baseline).
inline ::testing::AssertionResult make_open_sysformer_with(const sf_llm *llm,
                                                           const sf_sysformer_config &cfg,
                                                           uint64_t seed, sf_sysformer **out) {
    *out = nullptr;
    sf_sysformer *sf = nullptr;
    if (sf_sysformer_init(llm, &cfg, seed, &sf) != SF_OK) {
        return ::testing::AssertionFailure() << sf_last_error();
    }
    int64_t n = 0;
    sf_sysformer_tensor *t = sf_sysformer_tensors(sf, &n);
    if (!t) {
        sf_sysformer_free(sf);
        return ::testing::AssertionFailure() << "sf_sysformer_tensors: out of memory";
    }
    Uniform rng(seed ^ 0x5157u);
    for (int64_t i = 0; i < n; i++) {
        float *p = *t[i].slot;
        if (!p) continue;
        const std::string name = t[i].name;
        const int64_t numel = t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
        const bool norm = name.find("norm") != std::string::npos;
        const bool bias = name.find("bias") != std::string::npos;
        const bool zero_init = name.find("out_proj.weight") != std::string::npos ||
                               name.find("linear2.weight") != std::string::npos;
        const bool offset = name == "system_offset";
        if (name.find("classifier") != std::string::npos) continue;
        for (int64_t j = 0; j < numel; j++) {
            if (offset) p[j] = rng.sym(std::sqrt(3.0));
            else if (norm && !bias) p[j] = 1.0f + rng.sym(0.2);
            else if (bias) p[j] = rng.sym(0.2);
            else if (zero_init) p[j] = rng.sym(1.0 / std::sqrt((double)t[i].shape[1]));
        }
    }
    free(t);
    *out = sf;
    return ::testing::AssertionSuccess();
}

// The default configuration for llm; num_layers >= 0 replaces the default 2; offset_rows > 0
// adds a learned system offset of that many rows.
inline ::testing::AssertionResult make_open_sysformer(const sf_llm *llm, uint64_t seed,
                                                      sf_sysformer **out, int num_layers = -1,
                                                      int32_t offset_rows = 0) {
    sf_sysformer_config cfg = sf_sysformer_default_config(llm);
    if (num_layers >= 0) cfg.num_layers = num_layers;
    cfg.system_offset_rows = offset_rows;
    return make_open_sysformer_with(llm, cfg, seed, out);
}

// ------------------------------------------------------------------------------------------
// Packed guarded prompts
// ------------------------------------------------------------------------------------------

struct Prompts {
    std::vector<int32_t> ids;
    std::vector<int32_t> cu{0};
    std::vector<sf_prompt_spans> spans;
    int32_t n() const { return (int32_t)spans.size(); }
    int32_t total() const { return cu.back(); }
    int32_t len(int32_t r) const { return cu[r + 1] - cu[r]; }
    std::vector<int32_t> request(int32_t r) const {
        return std::vector<int32_t>(ids.begin() + cu[r], ids.begin() + cu[r + 1]);
    }
    void add(const std::vector<int32_t> &tokens, const sf_prompt_spans &s) {
        ids.insert(ids.end(), tokens.begin(), tokens.end());
        cu.push_back(cu.back() + (int32_t)tokens.size());
        spans.push_back(s);
    }
    // Request r alone.
    Prompts only(int32_t r) const {
        Prompts p;
        p.add(request(r), spans[r]);
        return p;
    }
    // Every request continued by extra[r] (generated tokens land after the suffix: the spans
    // grow by their count in the suffix, so S' is unchanged).
    Prompts extended(const std::vector<std::vector<int32_t>> &extra) const {
        Prompts p;
        for (int32_t r = 0; r < n(); r++) {
            std::vector<int32_t> t = request(r);
            t.insert(t.end(), extra[r].begin(), extra[r].end());
            sf_prompt_spans s = spans[r];
            s.suffix += (int32_t)extra[r].size();
            p.add(t, s);
        }
        return p;
    }
};

// Spans as the device reads them (sf_prompt_spans is five int32: prefix, system, middle, user,
// suffix), back to back, for a DeviceBuffer.
inline std::vector<int32_t> flat_spans(const std::vector<sf_prompt_spans> &spans) {
    std::vector<int32_t> v;
    for (const sf_prompt_spans &s : spans)
        v.insert(v.end(), {s.prefix, s.system, s.middle, s.user, s.suffix});
    return v;
}

// Chat prompts for the 96-token variants: prefix {1, 90, 91} | system | middle {92, 93} | user |
// suffix {94, 95, 89}, contents random ids in [3, 89). (system, user) lengths per request.
inline Prompts tiny_prompts(const std::vector<std::pair<int, int>> &shape, uint64_t seed) {
    Uniform rng(seed);
    Prompts p;
    for (const auto &su : shape) {
        std::vector<int32_t> t = {1, 90, 91};
        for (int i = 0; i < su.first; i++) t.push_back(rng.below(3, 89));
        t.push_back(92);
        t.push_back(93);
        for (int i = 0; i < su.second; i++) t.push_back(rng.below(3, 89));
        t.push_back(94);
        t.push_back(95);
        t.push_back(89);
        p.add(t, sf_prompt_spans{3, su.first, 2, su.second, 3});
    }
    return p;
}

// ------------------------------------------------------------------------------------------
// CPU references and logit helpers
// ------------------------------------------------------------------------------------------

// sf_guarded_forward_cpu's logits for the given packed rows; without caches (kv NULL) the
// positions start at 0, with them (one per request) the requests continue or fill them.
inline std::vector<float> cpu_guarded_logits(const sf_llm *llm, const sf_sysformer *sf,
                                             const Prompts &p, const std::vector<int32_t> &rows,
                                             sf_kv_cache *const *kv = nullptr) {
    const int64_t vocab = sf_llm_get_config(llm)->vocab_size;
    std::vector<float> out(rows.size() * (size_t)vocab);
    sf_guarded_batch b = {p.n(), p.cu.data(), p.ids.data(), p.spans.data(), kv,
                          (int32_t)rows.size(), rows.data()};
    const sf_status st = sf_guarded_forward_cpu(llm, sf, &b, out.data());
    EXPECT_EQ(st, SF_OK) << sf_last_error();
    if (st != SF_OK) out.assign(out.size(), NAN);
    return out;
}

inline std::vector<int32_t> last_rows(const Prompts &p) {
    std::vector<int32_t> rows;
    for (int32_t r = 0; r < p.n(); r++) rows.push_back(p.cu[r + 1] - 1);
    return rows;
}

inline double norm2(const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return std::sqrt(s);
}

inline double max_abs_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = std::fabs((double)a[i] - (double)b[i]);
        if (std::isnan(e)) return NAN;
        if (e > m) m = e;
    }
    return m;
}

inline bool all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!std::isfinite(x[i])) return false;
    return true;
}

// The greedy pick (first maximum, as sf_sample) and the gap to the best other logit.
struct Top2 {
    int32_t id;
    double margin;
};
inline Top2 top2(const float *x, int64_t n) {
    int32_t a = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[a]) a = (int32_t)i;
    double second = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (i != a && x[i] > second) second = x[i];
    return {a, (double)x[a] - second};
}

// SmolLM2-135M-Instruct (Q4_1 GGUF), present only when fetched; "" when absent.
inline std::string smollm2_path() {
    const char *env = getenv("SF_SMOLLM2_GGUF");
    std::string p = env ? env
                        : std::string(SF_SOURCE_DIR) +
                              "/weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    struct stat st;
    return stat(p.c_str(), &st) == 0 ? p : std::string();
}

// s holds part (an error message names what it should).
inline bool contains(const std::string &s, const char *part) {
    return s.find(part) != std::string::npos;
}

#ifdef SIMT_FAULT_INJECTION
// tools/simt's emulated device: what the process holds of it (simt::resources), for the fault
// tests of test_cuda_engine.cpp and test_cuda_train.cpp.
inline std::string describe(const simt::Resources &r) {
    char b[256];
    snprintf(b, sizeof b,
             "%zu device bytes in %zu allocations, %zu pinned, %zu streams, %zu events, "
             "%zu graphs, %zu cuBLASLt objects, %d NVTX ranges open",
             r.device_bytes, r.device_allocs, r.pinned_allocs, r.streams, r.events, r.graphs,
             r.blaslt_objects, r.nvtx_depth);
    return b;
}

inline ::testing::AssertionResult holds(const simt::Resources &want) {
    const simt::Resources now = simt::resources();
    if (now == want) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "the process holds " << describe(now) << "; before: " << describe(want);
}
#endif

}  // namespace sf_engine_test
