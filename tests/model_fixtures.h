// Helpers shared by the model-level tests: temporary directories and small random models.
#pragma once

#include <ftw.h>
#include <stdlib.h>
#include <unistd.h>

#include <string.h>

#include <cmath>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/random_llm.h"
#include "sysformer.h"

// A directory under /tmp removed with everything in it when the object goes away.
class TempDir {
  public:
    TempDir() {
        char tmpl[] = "/tmp/sf_test_XXXXXX";
        const char *p = mkdtemp(tmpl);
        path_ = p ? p : "";
    }
    ~TempDir() {
        if (!path_.empty()) {
            nftw(path_.c_str(), [](const char *f, const struct stat *, int, struct FTW *) {
                return remove(f);
            }, 16, FTW_DEPTH | FTW_PHYS);
        }
    }
    TempDir(const TempDir &) = delete;
    TempDir &operator=(const TempDir &) = delete;
    const std::string &path() const { return path_; }
    std::string file(const std::string &name) const { return path_ + "/" + name; }

  private:
    std::string path_;
};

// k points of [0, n) spread evenly, first and last included (fewer when n < k): where the
// fault tests (test_alloc_faults.cpp, the Faults sections of the CUDA tests) put their faults.
inline std::vector<long long> spread(long long n, long long k) {
    std::vector<long long> at;
    for (long long i = 0; i < k && n > 0; i++) {
        const long long c = k > 1 ? i * (n - 1) / (k - 1) : 0;
        if (at.empty() || at.back() != c) at.push_back(c);
    }
    return at;
}

// A Llama config small enough that a forward pass takes microseconds, with the awkward parts
// switched on: GQA, llama3 RoPE scaling, head_dim 8, intermediate size not a power of two.
inline sf_llm_config tiny_llama_config() {
    sf_llm_config c = sf_random_llm_default_config();
    c.vocab_size = 67;
    c.hidden_size = 32;
    c.intermediate_size = 56;
    c.num_layers = 2;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 8;
    c.max_position_embeddings = 64;
    c.rope.original_max_position_embeddings = 16;
    return c;
}

// ||a - b|| / ||b|| in double.
inline double rel_error(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return std::sqrt(num / (den > 0.0 ? den : 1.0));
}

// Deterministic values in [-2, 2) without zeros (so no -0.0 can appear), seeded.
inline std::vector<float> random_rows(size_t n, unsigned seed) {
    std::vector<float> v(n);
    uint64_t x = 0x9E3779B97F4A7C15ull * (seed + 1);
    for (auto &f : v) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f = (float)((double)(x >> 11) / 9007199254740992.0 * 4.0 - 2.0);
        if (f == 0.0f) f = 0.5f;
    }
    return v;
}

// Writes a Sysformer for llm to dir (which must exist) whose every weight is random and
// non-zero, as after training: attention and feed-forward branches all open, norms near 1.
// Failures are reported through gtest in the caller's test.
inline void write_trained_sysformer(const sf_llm *llm, const sf_sysformer_config &cfg,
                                    uint64_t seed, const std::string &dir) {
    sf_sysformer *sf = nullptr;
    ASSERT_EQ(sf_sysformer_init(llm, &cfg, seed, &sf), SF_OK) << sf_last_error();
    ASSERT_EQ(sf_sysformer_save(sf, dir.c_str()), SF_OK) << sf_last_error();
    sf_sysformer_free(sf);
    const std::string path = dir + "/sysformer.safetensors";
    sf_st_archive *ar = nullptr;
    ASSERT_EQ(sf_st_open(path.c_str(), &ar), SF_OK) << sf_last_error();
    const int64_t n = sf_st_count(ar);
    std::vector<std::string> names;
    std::vector<std::vector<float>> data;
    std::vector<sf_st_entry> entries((size_t)n);
    for (int64_t i = 0; i < n; i++) {
        const sf_st_tensor *t = sf_st_at(ar, i);
        names.push_back(t->name);
        data.push_back(random_rows((size_t)t->numel, (unsigned)(seed * 131 + i)));
        for (auto &f : data.back()) f *= 0.3f;
        if (strstr(t->name, "norm") && strstr(t->name, "weight")) {
            for (auto &f : data.back()) f += 1.0f;
        }
        entries[i].dtype = SF_DTYPE_F32;
        entries[i].ndim = t->ndim;
        for (int j = 0; j < t->ndim; j++) entries[i].shape[j] = t->shape[j];
    }
    sf_st_close(ar);
    for (int64_t i = 0; i < n; i++) {
        entries[i].name = names[i].c_str();
        entries[i].data = data[i].data();
    }
    ASSERT_EQ(sf_st_write(path.c_str(), entries.data(), n, nullptr), SF_OK) << sf_last_error();
}
