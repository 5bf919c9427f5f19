// Shared helpers for the CPU op tests: seeded inputs and fp32 error-bound arithmetic.
//
// The tests compare each op with a naive double-precision loop and accept an element when its
// error is within a bound derived from the op's operation count in the standard rounding model
// fl(a op b) = (a op b)(1 + d), |d| <= u, u = 2^-24 for fp32 (Higham, "Accuracy and Stability
// of Numerical Algorithms", ch. 2-3). Each test states its bound where it is computed.
#ifndef SF_TEST_UTIL_H
#define SF_TEST_UTIL_H

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "sysformer.h"

namespace sf_test {

// Unit roundoff of fp32 and of double.
constexpr double kU32 = 5.9604644775390625e-08;   // 2^-24
constexpr double kU64 = 1.1102230246251565e-16;   // 2^-53
// Half the spacing of fp32 subnormals: the absolute error a rounding into the subnormal range
// can add on top of the relative one (fl(x) = x(1 + d) + e, |e| <= 2^-150).
constexpr double kUnderflow = 7.0064923216240862e-46; // 2^-150

// gamma_n = n u / (1 - n u): the relative error bound of n chained roundings.
inline double gamma32(double n) { return n * kU32 / (1.0 - n * kU32); }
inline double gamma64(double n) { return n * kU64 / (1.0 - n * kU64); }

// Inputs come from a fixed seed per test so that failures reproduce.
class Rng {
  public:
    explicit Rng(uint64_t seed) : gen_(seed) {}
    float uniform(float lo, float hi) {
        return std::uniform_real_distribution<float>(lo, hi)(gen_);
    }
    float normal() { return std::normal_distribution<float>(0.0f, 1.0f)(gen_); }
    int64_t below(int64_t n) { return std::uniform_int_distribution<int64_t>(0, n - 1)(gen_); }
    std::vector<float> uniform_vec(size_t n, float lo = -1.0f, float hi = 1.0f) {
        std::vector<float> v(n);
        for (float &x : v) x = uniform(lo, hi);
        return v;
    }
    std::vector<float> normal_vec(size_t n) {
        std::vector<float> v(n);
        for (float &x : v) x = normal();
        return v;
    }

  private:
    std::mt19937_64 gen_;
};

// Tracks the worst err/bound ratio over many elements so that a failure reports the element
// that broke the bound and a pass can report how close it came.
class BoundCheck {
  public:
    explicit BoundCheck(std::string what) : what_(std::move(what)) {}
    void add(double got, double want, double bound, int64_t index) {
        double err = std::fabs(got - want);
        double ratio = bound > 0.0 ? err / bound : (err == 0.0 ? 0.0 : INFINITY);
        // NaN in got fails through the negated comparison.
        if (!(err <= bound)) {
            if (failures_ == 0) {
                char buf[256];
                std::snprintf(buf, sizeof buf, "[%lld] got %.9g want %.17g err %.3g bound %.3g",
                              (long long)index, got, want, err, bound);
                first_failure_ = buf;
            }
            failures_++;
        }
        if (ratio > worst_ratio_ || std::isnan(ratio)) worst_ratio_ = ratio;
        if (err > max_err_) max_err_ = err;
        count_++;
    }
    int64_t failures() const { return failures_; }
    double worst_ratio() const { return worst_ratio_; }
    double max_err() const { return max_err_; }
    ::testing::AssertionResult ok() const {
        if (failures_ == 0) return ::testing::AssertionSuccess();
        return ::testing::AssertionFailure()
               << what_ << ": " << failures_ << " of " << count_
               << " elements beyond their bound; first " << first_failure_;
    }
    // Puts the worst error and ratio into the test's XML record (--gtest_output=xml); call once
    // per check, since a repeated key overwrites the earlier value.
    void record() const {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.3g", max_err_);
        ::testing::Test::RecordProperty(what_ + "_max_err", buf);
        std::snprintf(buf, sizeof buf, "%.3g", worst_ratio_);
        ::testing::Test::RecordProperty(what_ + "_err_over_bound", buf);
    }

  private:
    std::string what_;
    int64_t failures_ = 0;
    int64_t count_ = 0;
    double worst_ratio_ = 0.0;
    double max_err_ = 0.0;
    std::string first_failure_;
};

// A config holding only what RoPE reads: head_dim, theta and the scaling type (factors 1).
inline sf_llm_config rope_config(sf_rope_type type, int32_t head_dim, double theta) {
    sf_llm_config cfg = {};
    cfg.head_dim = head_dim;
    cfg.rope_theta = theta;
    cfg.rope.type = type;
    cfg.rope.factor = 1.0;
    cfg.rope.attention_factor = 1.0;
    return cfg;
}

// The three RoPE configurations the CUDA RoPE tests (forward and backward) sweep: head dim 64
// (default, theta 1e4), 96 (longrope with its attention factor and both factor tables) and 128
// (Llama 3.1's scaling). The tables live here, so the configs stay valid with the object.
struct RopeConfigs {
    std::vector<float> short_f = std::vector<float>(48), long_f = std::vector<float>(48);
    sf_llm_config c64, c96, c128;
    RopeConfigs() {
        for (int i = 0; i < 48; i++) {
            short_f[i] = 1.0f + 0.01f * i;
            long_f[i] = 1.0f + 0.5f * i;
        }
        c64 = rope_config(SF_ROPE_DEFAULT, 64, 10000.0);
        c96 = rope_config(SF_ROPE_LONGROPE, 96, 10000.0);
        c96.rope.original_max_position_embeddings = 4096;
        c96.rope.attention_factor = 1.1902380714238083;
        c96.rope.short_factor = short_f.data();
        c96.rope.long_factor = long_f.data();
        c128 = rope_config(SF_ROPE_LLAMA3, 128, 500000.0);
        c128.rope.factor = 8.0;
        c128.rope.low_freq_factor = 1.0;
        c128.rope.high_freq_factor = 4.0;
        c128.rope.original_max_position_embeddings = 8192;
    }
    RopeConfigs(const RopeConfigs &) = delete;
    RopeConfigs &operator=(const RopeConfigs &) = delete;
};

} // namespace sf_test

#endif
