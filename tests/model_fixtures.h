// Helpers shared by the model-level tests: temporary directories and small random models.
#pragma once

#include <ftw.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <string>
#include <vector>

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
