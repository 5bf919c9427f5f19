// sf_cpu_rope_freqs against formulas written independently here and against transformers'
// own values (tests/golden/rope_freqs.json, made by make_rope_goldens.py); sf_cpu_rope_apply
// against a long double loop.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <jansson.h>

#include <cmath>
#include <string>
#include <vector>

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

using sf_test::rope_config;

// ---------------------------------------------------------------------------------------------
// Error bound for one inverse frequency computed with unit roundoff `unit`.
//
// inv = 1 / theta^e with e = 2i/d: rounding e (relative unit) moves theta^e by e ln(theta) unit;
// pow within 1 ulp (2 unit); the reciprocal 1 unit:  d0 = (e ln(theta) + 3) unit.
// linear and longrope add one more rounding (the division by factor, the product with the
// extension factor). llama3 keeps inv (high band), divides it (low band, + unit) or blends it:
//   wavelen = 2 pi / inv          (2 pi rounded, reciprocal, product: d0 + 3 unit)
//   t = L / wavelen               (reciprocal and product again:      d0 + 5 unit)
//   s = (t - low) / (high - low)  |ds| <= (t (d0 + 5 unit) + unit |t - low|) / (high - low)
//                                          + unit s
//   R = (1 - s) inv / f + s inv   dR/ds = inv (1 - 1/f) and R >= inv / f, so s's error enters
//                                 R relatively times (f - 1); R's own four roundings add 4 unit.
// Near a band boundary the two implementations may classify differently; the blend equals the
// neighbouring band's value there, so the blended bound covers both sides.
// ---------------------------------------------------------------------------------------------
double freq_rel_bound(const sf_llm_config &cfg, int32_t i, double unit) {
    double e = 2.0 * i / cfg.head_dim;
    double d0 = (e * std::log(cfg.rope_theta) + 3.0) * unit;
    switch (cfg.rope.type) {
    case SF_ROPE_DEFAULT: return d0;
    case SF_ROPE_LINEAR:
    case SF_ROPE_LONGROPE: return d0 + unit;
    case SF_ROPE_LLAMA3: break;
    }
    double inv = std::pow(cfg.rope_theta, -e);
    double two_pi = 2.0 * M_PI;
    double old_len = cfg.rope.original_max_position_embeddings;
    double low = cfg.rope.low_freq_factor, high = cfg.rope.high_freq_factor;
    double f = cfg.rope.factor;
    double wavelen = two_pi / inv;
    double low_wavelen = old_len / low, high_wavelen = old_len / high;
    // "Near" = within the relative error either side may have on wavelen.
    double slack = 4.0 * (d0 + 3.0 * unit);
    bool near_edge = std::fabs(wavelen / low_wavelen - 1.0) <= slack ||
                     std::fabs(wavelen / high_wavelen - 1.0) <= slack;
    bool medium = !(wavelen > low_wavelen) && !(wavelen < high_wavelen);
    if (!medium && !near_edge) return wavelen > low_wavelen ? d0 + unit : d0;
    double t = old_len / wavelen;
    double s = (t - low) / (high - low);
    double ds = (t * (d0 + 5.0 * unit) + unit * std::fabs(t - low)) / (high - low) +
                unit * std::fabs(s);
    return d0 + 4.0 * unit + (f - 1.0) * ds;
}

// The same frequencies as transformers defines them, written from the formulas in its
// docstrings rather than from rope.c: theta^-e as exp(-e ln theta), the llama3 bands by
// wavelength. The exp/log form rounds the exponent up to 4 times, so its error is within
// freq_rel_bound(..., 4 u_d).
double independent_inv_freq(const sf_llm_config &cfg, int64_t seq_len, int32_t i) {
    double e = 2.0 * i / cfg.head_dim;
    double inv = std::exp(-e * std::log(cfg.rope_theta));
    switch (cfg.rope.type) {
    case SF_ROPE_DEFAULT: return inv;
    case SF_ROPE_LINEAR: return inv / cfg.rope.factor;
    case SF_ROPE_LONGROPE: {
        bool use_long = seq_len > cfg.rope.original_max_position_embeddings;
        const float *ext = use_long ? cfg.rope.long_factor : cfg.rope.short_factor;
        return inv / (double)ext[i];
    }
    case SF_ROPE_LLAMA3: break;
    }
    double wavelen = 2.0 * M_PI / inv;
    double old_len = cfg.rope.original_max_position_embeddings;
    double low = cfg.rope.low_freq_factor, high = cfg.rope.high_freq_factor;
    if (wavelen < old_len / high) return inv;            // high frequencies: untouched
    if (wavelen > old_len / low) return inv / cfg.rope.factor; // low frequencies: interpolated
    double smooth = (old_len / wavelen - low) / (high - low);
    return inv * (smooth + (1.0 - smooth) / cfg.rope.factor);
}

void check_freqs(BoundCheck &check, const sf_llm_config &cfg, int64_t seq_len,
                 const std::vector<double> &want, double want_unit, double want_scale,
                 const std::string &label) {
    int32_t half = cfg.head_dim / 2;
    std::vector<double> got(half, NAN);
    double scale = NAN;
    sf_cpu_rope_freqs(&cfg, seq_len, got.data(), &scale);
    int64_t before = check.failures();
    for (int32_t i = 0; i < half; i++) {
        double rel = freq_rel_bound(cfg, i, 4.0 * sf_test::kU64) +
                     freq_rel_bound(cfg, i, want_unit);
        check.add(got[i], want[i], rel * std::fabs(want[i]), i);
    }
    EXPECT_EQ(check.failures(), before) << check.ok().message() << " (" << label << ")";
    // The attention factor is copied from the config or is 1: either way a double computed
    // the same way on both sides, so allow a few double ulps only.
    EXPECT_NEAR(scale, want_scale, 4.0 * sf_test::kU64 * std::fabs(want_scale)) << label;
}

void check_against_independent(BoundCheck &check, const sf_llm_config &cfg, int64_t seq_len,
                               const std::string &label) {
    std::vector<double> want(cfg.head_dim / 2);
    for (int32_t i = 0; i < cfg.head_dim / 2; i++) want[i] = independent_inv_freq(cfg, seq_len, i);
    double scale = cfg.rope.type == SF_ROPE_LONGROPE ? cfg.rope.attention_factor : 1.0;
    check_freqs(check, cfg, seq_len, want, 4.0 * sf_test::kU64, scale, label);
}

TEST(RopeFreqs, DefaultAndLinearMatchFormula) {
    BoundCheck check("rope_freqs_formula");
    for (int32_t hd : {16, 32, 64, 96, 128}) {
        for (double theta : {10000.0, 500000.0, 1e6}) {
            sf_llm_config cfg = rope_config(SF_ROPE_DEFAULT, hd, theta);
            check_against_independent(check, cfg, 10, "default hd=" + std::to_string(hd));
            cfg.rope.type = SF_ROPE_LINEAR;
            cfg.rope.factor = 4.0;
            check_against_independent(check, cfg, 10, "linear hd=" + std::to_string(hd));
        }
    }    check.record();
}

TEST(RopeFreqs, Llama3BandsMatchFormula) {
    BoundCheck check("rope_freqs_llama3");
    // Llama 3.1's parameters, and small tables whose wavelengths straddle both band edges.
    struct Case {
        int32_t hd;
        double theta, factor, low, high;
        int32_t orig;
    } cases[] = {{128, 500000.0, 8.0, 1.0, 4.0, 8192},
                 {16, 10000.0, 4.0, 1.0, 4.0, 64},
                 {64, 10000.0, 32.0, 2.0, 8.0, 256},
                 {96, 10000.0, 8.0, 1.0, 4.0, 512}};
    for (const Case &c : cases) {
        sf_llm_config cfg = rope_config(SF_ROPE_LLAMA3, c.hd, c.theta);
        cfg.rope.factor = c.factor;
        cfg.rope.low_freq_factor = c.low;
        cfg.rope.high_freq_factor = c.high;
        cfg.rope.original_max_position_embeddings = c.orig;
        check_against_independent(check, cfg, 1, "llama3 hd=" + std::to_string(c.hd));

        // Each case is chosen so that its wavelengths fall in all three bands.
        int bands[3] = {0, 0, 0};
        for (int32_t i = 0; i < c.hd / 2; i++) {
            double wl = 2.0 * M_PI * std::pow(c.theta, 2.0 * i / c.hd);
            bands[wl < c.orig / c.high ? 0 : wl > c.orig / c.low ? 2 : 1]++;
        }
        for (int b = 0; b < 3; b++) EXPECT_GT(bands[b], 0) << "hd=" << c.hd << " band " << b;
    }    check.record();
}

TEST(RopeFreqs, LongropeSwitchesFactorsPastOriginalLength) {
    BoundCheck check("rope_freqs_longrope");
    const int32_t hd = 96, orig = 4096;
    Rng rng(40);
    std::vector<float> shortf = rng.uniform_vec(hd / 2, 1.0f, 1.1f);
    std::vector<float> longf = rng.uniform_vec(hd / 2, 1.0f, 60.0f);
    sf_llm_config cfg = rope_config(SF_ROPE_LONGROPE, hd, 10000.0);
    cfg.rope.original_max_position_embeddings = orig;
    cfg.rope.factor = 32.0;
    cfg.rope.attention_factor = std::sqrt(1.0 + std::log(32.0) / std::log((double)orig));
    cfg.rope.short_factor = shortf.data();
    cfg.rope.long_factor = longf.data();
    for (int64_t seq_len : {1, orig - 1, orig, orig + 1, 100000})
        check_against_independent(check, cfg, seq_len, "longrope seq=" + std::to_string(seq_len));

    // The switch is exactly at seq_len > orig: compare the two tables directly.
    std::vector<double> at(hd / 2), past(hd / 2);
    double s1 = 0, s2 = 0;
    sf_cpu_rope_freqs(&cfg, orig, at.data(), &s1);
    sf_cpu_rope_freqs(&cfg, orig + 1, past.data(), &s2);
    for (int32_t i = 0; i < hd / 2; i++)
        EXPECT_NEAR(at[i] / past[i], (double)longf[i] / shortf[i], 1e-12 * longf[i] / shortf[i]);
    EXPECT_EQ(s1, cfg.rope.attention_factor);
    EXPECT_EQ(s2, cfg.rope.attention_factor);    check.record();
}

// ---------------------------------------------------------------------------------------------
// transformers' own values. It computes inv_freq in fp32: freq_rel_bound(..., u) for its side,
// freq_rel_bound(..., 4 u_d) for ours.
// ---------------------------------------------------------------------------------------------

std::vector<float> float_array(json_t *arr) {
    std::vector<float> v;
    size_t i;
    json_t *x;
    json_array_foreach(arr, i, x) v.push_back((float)json_number_value(x));
    return v;
}

TEST(RopeFreqs, MatchTransformersGoldens) {
    std::string path = std::string(SF_TEST_DATA_DIR) + "/rope_freqs.json";
    json_error_t err;
    json_t *root = json_load_file(path.c_str(), 0, &err);
    ASSERT_NE(root, nullptr) << path << ": " << err.text;
    json_t *cases = json_object_get(root, "cases");
    ASSERT_TRUE(json_is_array(cases));
    BoundCheck check("rope_freqs_transformers");
    size_t idx;
    json_t *c;
    int seen[4] = {0, 0, 0, 0};
    json_array_foreach(cases, idx, c) {
        std::string name = json_string_value(json_object_get(c, "name"));
        std::string type = json_string_value(json_object_get(c, "rope_type"));
        int32_t hd = (int32_t)json_integer_value(json_object_get(c, "head_dim"));
        double theta = json_number_value(json_object_get(c, "rope_theta"));
        json_t *seq = json_object_get(c, "seq_len");
        int64_t seq_len = json_is_integer(seq) ? json_integer_value(seq) : 0;

        sf_llm_config cfg = rope_config(SF_ROPE_DEFAULT, hd, theta);
        cfg.max_position_embeddings =
            (int32_t)json_integer_value(json_object_get(c, "max_position_embeddings"));
        std::vector<float> shortf, longf;
        if (type == "linear") {
            cfg.rope.type = SF_ROPE_LINEAR;
            cfg.rope.factor = json_number_value(json_object_get(c, "factor"));
        } else if (type == "llama3") {
            cfg.rope.type = SF_ROPE_LLAMA3;
            cfg.rope.factor = json_number_value(json_object_get(c, "factor"));
            cfg.rope.low_freq_factor = json_number_value(json_object_get(c, "low_freq_factor"));
            cfg.rope.high_freq_factor = json_number_value(json_object_get(c, "high_freq_factor"));
            cfg.rope.original_max_position_embeddings = (int32_t)json_integer_value(
                json_object_get(c, "original_max_position_embeddings"));
        } else if (type == "longrope") {
            cfg.rope.type = SF_ROPE_LONGROPE;
            cfg.rope.factor = json_number_value(json_object_get(c, "factor"));
            cfg.rope.original_max_position_embeddings = (int32_t)json_integer_value(
                json_object_get(c, "original_max_position_embeddings"));
            // What the config parser derives when config.json gives no attention_factor, as
            // Phi-3's do; the fixture holds transformers' value to check it against.
            cfg.rope.attention_factor =
                std::sqrt(1.0 + std::log(cfg.rope.factor) /
                                    std::log((double)cfg.rope.original_max_position_embeddings));
            shortf = float_array(json_object_get(c, "short_factor"));
            longf = float_array(json_object_get(c, "long_factor"));
            ASSERT_EQ(shortf.size(), (size_t)hd / 2);
            ASSERT_EQ(longf.size(), (size_t)hd / 2);
            cfg.rope.short_factor = shortf.data();
            cfg.rope.long_factor = longf.data();
        } else {
            ASSERT_EQ(type, "default");
        }
        seen[cfg.rope.type]++;

        json_t *inv = json_object_get(c, "inv_freq");
        ASSERT_EQ(json_array_size(inv), (size_t)hd / 2) << name;
        std::vector<double> want(hd / 2);
        for (int32_t i = 0; i < hd / 2; i++)
            want[i] = json_number_value(json_array_get(inv, (size_t)i));
        double want_scale = json_number_value(json_object_get(c, "attention_factor"));
        check_freqs(check, cfg, seq_len, want, sf_test::kU32, want_scale, name);
    }
    for (int t = 0; t < 4; t++) EXPECT_GT(seen[t], 0) << "no golden case of rope type " << t;
    check.record();
    json_decref(root);
}

// ---------------------------------------------------------------------------------------------
// sf_cpu_rope_apply against a long double loop.
//
// The op forms angle = pos * inv (rel. u_d), cos and sin within 1 ulp, scales them (u_d),
// y0 = x0 c - x1 s and y1 = x1 c + x0 s in double (two products and a sum, 3 u_d), then rounds
// to fp32 once. Because y can cancel, the double part is bounded on magnitudes:
//   |out - ref| <= u |ref| + 2^-150 + 2 (|x0| + |x1|) scale (|angle| + 8) u_d
// (the factor 2 leaves the same room for the long double reference).
// ---------------------------------------------------------------------------------------------
void check_apply(BoundCheck &check, int64_t n, int32_t n_heads, int32_t hd,
                 const std::vector<int32_t> &positions, const std::vector<double> &inv_freq,
                 double scale, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> x = rng.normal_vec((size_t)(n * n_heads * hd));
    std::vector<float> out = x;
    sf_cpu_rope_apply(out.data(), positions.data(), n, n_heads, hd, inv_freq.data(), scale);
    int32_t half = hd / 2;
    int64_t before = check.failures();
    for (int64_t t = 0; t < n; t++) {
        for (int32_t h = 0; h < n_heads; h++) {
            const float *xh = x.data() + (t * n_heads + h) * hd;
            const float *oh = out.data() + (t * n_heads + h) * hd;
            for (int32_t i = 0; i < half; i++) {
                long double angle = (long double)positions[t] * (long double)inv_freq[i];
                long double c = cosl(angle) * scale, s = sinl(angle) * scale;
                long double x0 = xh[i], x1 = xh[i + half];
                double y0 = (double)(x0 * c - x1 * s);
                double y1 = (double)(x1 * c + x0 * s);
                double slack = 2.0 * (std::fabs((double)x0) + std::fabs((double)x1)) * scale *
                               ((double)fabsl(angle) + 8.0) * sf_test::kU64;
                check.add(oh[i], y0, sf_test::kU32 * std::fabs(y0) + sf_test::kUnderflow + slack,
                          (t * n_heads + h) * hd + i);
                check.add(oh[i + half], y1,
                          sf_test::kU32 * std::fabs(y1) + sf_test::kUnderflow + slack,
                          (t * n_heads + h) * hd + i + half);
            }
        }
    }
    EXPECT_EQ(check.failures(), before) << check.ok().message() << " (n=" << n
                                        << " heads=" << n_heads << " hd=" << hd << ")";
}

TEST(RopeApply, MatchesLongDoubleRotation) {
    BoundCheck check("rope_apply");
    uint64_t seed = 50;
    for (int32_t hd : {16, 32, 64, 96, 128}) {
        for (int64_t n : {1, 7, 65}) {
            for (int32_t heads : {1, 3, 9}) {
                sf_llm_config cfg = rope_config(SF_ROPE_LLAMA3, hd, 500000.0);
                cfg.rope.factor = 8.0;
                cfg.rope.low_freq_factor = 1.0;
                cfg.rope.high_freq_factor = 4.0;
                cfg.rope.original_max_position_embeddings = 8192;
                std::vector<double> inv(hd / 2);
                double unused;
                sf_cpu_rope_freqs(&cfg, n, inv.data(), &unused);
                Rng rng(seed);
                // Packed rows continue a cache (pos0 + t) or come from anywhere up to 128k.
                std::vector<int32_t> pos(n);
                int32_t pos0 = (int32_t)rng.below(5000);
                for (int64_t t = 0; t < n; t++)
                    pos[t] = (heads == 3) ? (int32_t)rng.below(131072) : pos0 + (int32_t)t;
                double scale = heads == 9 ? 1.1902380714238083 : 1.0;
                check_apply(check, n, heads, hd, pos, inv, scale, seed++);
            }
        }
    }
    check.record();
}

// Position 0 is the identity (times the attention factor).
TEST(RopeApply, PositionZeroIsIdentity) {
    Rng rng(60);
    const int32_t hd = 64, heads = 2;
    std::vector<float> x = rng.normal_vec(heads * hd), out = x;
    std::vector<double> inv(hd / 2, 0.5);
    int32_t pos = 0;
    sf_cpu_rope_apply(out.data(), &pos, 1, heads, hd, inv.data(), 1.0);
    EXPECT_EQ(out, x);
}

} // namespace
