// sf_cpu_attention against a double loop: GQA, causal with offsets and windows, bidirectional.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace {

using sf_test::BoundCheck;
using sf_test::gamma32;
using sf_test::kU32;
using sf_test::kU64;
using sf_test::Rng;

struct Case {
    int64_t n_q, n_kv;
    int32_t n_heads, n_kv_heads, head_dim;
    bool causal;
    int64_t q_pos0;
    int32_t window;
};

std::string describe(const Case &c) {
    return "n_q=" + std::to_string(c.n_q) + " n_kv=" + std::to_string(c.n_kv) +
           " heads=" + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) +
           " hd=" + std::to_string(c.head_dim) + (c.causal ? " causal" : " full") +
           " pos0=" + std::to_string(c.q_pos0) + " window=" + std::to_string(c.window);
}

// The visibility rule of the contract in ops.h, restated independently of attention.c.
bool visible(const Case &c, int64_t i, int64_t j) {
    if (!c.causal) return true;
    int64_t pos = c.q_pos0 + i;
    if (j > pos) return false;
    return c.window <= 0 || pos - j < c.window;
}

// ---------------------------------------------------------------------------------------------
// Error bound for out[i, h, d], per element.
//
// Scores: s_j = fl(scale * fl(q . k_j)): |err| <= gamma_{D+1} A_j, A_j = |scale| sum|q||k_j|.
// Weights: w_j = exp(s_j - M) is reached through fp32 subtractions of the running maxima, which
// telescope to at most u (M - s_j) of exponent error, through expf (assumed within 1 ulp, 2u)
// at most once per chunk of keys for the rescale plus once for the key itself, and through one
// fp32 product per rescale. With C = chunks of 64 keys, every weight's exponent is off by at
// most  eta = 2 max_j gamma_{D+1} A_j + u max_j (M - s_j) + (3C + 2) 2u
// (the factor 2 on the scores: a weight depends on its own score and on the maximum's), so each
// weight is off relatively by at most e1 = expm1(eta), and a normalised weight by
// ep = 2 e1 / (1 - e1).
// Sums: the weighted value sum and the weight sum are fp32 sums of n terms, rescaled up to C
// times: relative gamma_{n+C} on the magnitudes; the final 1/sum and product add 2u.
// Altogether |out - ref| <= E_d ((1 + ep)(1 + g)/(1 - g)(1 + u)^2 - 1) + 2^-150, with
// E_d = sum_j p_j |v_jd| and g = gamma_{n+C}; the double reference's own error is below
// (n + D + 8) u_d E_d and is added.
// ---------------------------------------------------------------------------------------------
void run_case(BoundCheck &check, const Case &c, uint64_t seed, float value_scale = 1.0f) {
    Rng rng(seed);
    const int64_t qw = (int64_t)c.n_heads * c.head_dim, kvw = (int64_t)c.n_kv_heads * c.head_dim;
    std::vector<float> q = rng.normal_vec(c.n_q * qw);
    std::vector<float> k = rng.normal_vec(c.n_kv * kvw);
    std::vector<float> v = rng.normal_vec(c.n_kv * kvw);
    for (float &x : q) x *= value_scale;
    const float scale = 1.0f / std::sqrt((float)c.head_dim);
    std::vector<float> out(c.n_q * qw, NAN);
    sf_cpu_attention(out.data(), q.data(), k.data(), v.data(), c.n_q, c.n_kv, c.n_heads,
                     c.n_kv_heads, c.head_dim, c.causal, c.q_pos0, c.window, scale);

    const int32_t group = c.n_heads / c.n_kv_heads;
    const int D = c.head_dim;
    int64_t before = check.failures();
    std::vector<double> s(c.n_kv), p(c.n_kv);
    for (int64_t i = 0; i < c.n_q; i++) {
        for (int32_t h = 0; h < c.n_heads; h++) {
            const float *qh = q.data() + i * qw + (int64_t)h * D;
            const int32_t g = h / group;
            double m = -INFINITY, max_a = 0.0;
            int64_t n_vis = 0, first = -1, last = -1;
            for (int64_t j = 0; j < c.n_kv; j++) {
                if (!visible(c, i, j)) continue;
                const float *kj = k.data() + j * kvw + (int64_t)g * D;
                double dot = 0.0, a = 0.0;
                for (int d = 0; d < D; d++) {
                    dot += (double)qh[d] * kj[d];
                    a += std::fabs((double)qh[d] * kj[d]);
                }
                s[j] = scale * dot;
                max_a = std::max(max_a, std::fabs((double)scale) * a);
                m = std::max(m, s[j]);
                n_vis++;
                if (first < 0) first = j;
                last = j;
            }
            float *oh = out.data() + i * qw + (int64_t)h * D;
            if (n_vis == 0) {
                for (int d = 0; d < D; d++) check.add(oh[d], 0.0, 0.0, i * qw + h * D + d);
                continue;
            }
            double sum = 0.0, spread = 0.0;
            for (int64_t j = first; j <= last; j++) {
                if (!visible(c, i, j)) continue;
                p[j] = std::exp(s[j] - m);
                sum += p[j];
                spread = std::max(spread, m - s[j]);
            }
            double chunks = std::ceil((double)(last - first + 1) / 64.0);
            double eta = 2.0 * gamma32(D + 1.0) * max_a + kU32 * spread +
                         (3.0 * chunks + 2.0) * 2.0 * kU32;
            double e1 = std::expm1(eta);
            double ep = 2.0 * e1 / (1.0 - e1);
            double gs = gamma32((double)n_vis + chunks);
            double rel = (1.0 + ep) * (1.0 + gs) / (1.0 - gs) * (1.0 + kU32) * (1.0 + kU32) - 1.0 +
                         ((double)n_vis + D + 8.0) * kU64;
            for (int d = 0; d < D; d++) {
                double ref = 0.0, mag = 0.0;
                for (int64_t j = first; j <= last; j++) {
                    if (!visible(c, i, j)) continue;
                    double vj = v[j * kvw + (int64_t)g * D + d];
                    ref += p[j] / sum * vj;
                    mag += p[j] / sum * std::fabs(vj);
                }
                check.add(oh[d], ref, rel * mag + sf_test::kUnderflow, i * qw + h * D + d);
            }
        }
    }
    EXPECT_EQ(check.failures(), before) << check.ok().message() << " (" << describe(c) << ")";
}

TEST(Attention, CausalPrefillAcrossGqaRatiosAndHeadDims) {
    BoundCheck check("attention_causal");
    uint64_t seed = 100;
    for (int32_t hd : {16, 32, 64, 96, 128})
        for (int32_t kv_heads : {8, 4, 2, 1}) // GQA ratios 1, 2, 4, 8
            for (int64_t n : {1, 7, 65})
                run_case(check, {n, n, 8, kv_heads, hd, true, 0, 0}, seed++);
    check.record();
}

// Decode and chunked prefill: queries continue a cache, query i at q_pos0 + i.
TEST(Attention, CausalWithCacheOffset) {
    BoundCheck check("attention_decode");
    uint64_t seed = 200;
    for (int32_t hd : {64, 96, 128}) {
        run_case(check, {1, 1000, 8, 1, hd, true, 999, 0}, seed++);  // decode, long cache
        run_case(check, {1, 130, 9, 3, hd, true, 129, 0}, seed++);   // SmolLM2's 9/3 heads
        run_case(check, {5, 305, 4, 2, hd, true, 300, 0}, seed++);   // a chunk after 300
        run_case(check, {7, 65, 4, 4, hd, true, 58, 0}, seed++);     // chunk ending the cache
    }
    check.record();
}

TEST(Attention, SlidingWindow) {
    BoundCheck check("attention_window");
    uint64_t seed = 300;
    for (int32_t window : {1, 3, 64, 65, 1000}) {
        run_case(check, {65, 65, 4, 2, 64, true, 0, window}, seed++);
        run_case(check, {1, 200, 8, 2, 128, true, 199, window}, seed++);
        run_case(check, {7, 107, 4, 1, 96, true, 100, window}, seed++);
    }
    check.record();
}

// Bidirectional self-attention and cross-attention with n_q != n_kv; q_pos0 and window must
// be ignored.
TEST(Attention, NonCausal) {
    BoundCheck check("attention_full");
    uint64_t seed = 400;
    const int64_t shapes[][2] = {{1, 17}, {33, 100}, {5, 1}, {65, 65}};
    for (const auto &sh : shapes)
        for (int32_t hd : {32, 64, 128}) {
            run_case(check, {sh[0], sh[1], 8, 2, hd, false, 0, 0}, seed++);
            run_case(check, {sh[0], sh[1], 8, 8, hd, false, 17, 2}, seed++);
        }
    check.record();
}

// Large scores (up to ~hundreds) and keys ordered so that the running maximum grows in every
// chunk: exercises the rescaling of the online softmax where exp without the maximum would
// overflow.
TEST(Attention, LargeScoresAndGrowingMaximum) {
    BoundCheck check("attention_large");
    const int64_t n_kv = 300;
    const int32_t hd = 64;
    std::vector<float> q(hd, 0.0f), k(n_kv * hd), v(n_kv * hd);
    Rng rng(500);
    for (int32_t d = 0; d < hd; d++) q[d] = 1.0f + 0.1f * rng.normal();
    for (int64_t j = 0; j < n_kv; j++)
        for (int32_t d = 0; d < hd; d++) {
            // Score of key j grows roughly like j: 300 keys span ~ 0 .. 600 after scaling.
            k[j * hd + d] = (float)j * 0.15f + 0.05f * rng.normal();
            v[j * hd + d] = rng.normal();
        }
    std::vector<float> out(hd, NAN);
    sf_cpu_attention(out.data(), q.data(), k.data(), v.data(), 1, n_kv, 1, 1, hd, false, 0, 0,
                     0.125f);
    // Reference and bound exactly as run_case, inlined for these hand-built inputs.
    std::vector<double> s(n_kv);
    double m = -INFINITY, max_a = 0.0;
    for (int64_t j = 0; j < n_kv; j++) {
        double dot = 0.0, a = 0.0;
        for (int32_t d = 0; d < hd; d++) {
            dot += (double)q[d] * k[j * hd + d];
            a += std::fabs((double)q[d] * k[j * hd + d]);
        }
        s[j] = 0.125 * dot;
        max_a = std::max(max_a, 0.125 * a);
        m = std::max(m, s[j]);
    }
    ASSERT_GT(m, 200.0); // exp(m) would overflow fp32
    double sum = 0.0, spread = 0.0;
    for (int64_t j = 0; j < n_kv; j++) {
        sum += std::exp(s[j] - m);
        spread = std::max(spread, m - s[j]);
    }
    double chunks = std::ceil(n_kv / 64.0);
    double eta = 2.0 * gamma32(hd + 1.0) * max_a + kU32 * spread + (3.0 * chunks + 2.0) * 2.0 * kU32;
    double e1 = std::expm1(eta), ep = 2.0 * e1 / (1.0 - e1), gs = gamma32(n_kv + chunks);
    double rel = (1.0 + ep) * (1.0 + gs) / (1.0 - gs) * (1.0 + kU32) * (1.0 + kU32) - 1.0 +
                 (n_kv + hd + 8.0) * kU64;
    for (int32_t d = 0; d < hd; d++) {
        double ref = 0.0, mag = 0.0;
        for (int64_t j = 0; j < n_kv; j++) {
            double pj = std::exp(s[j] - m) / sum;
            ref += pj * v[j * hd + d];
            mag += pj * std::fabs((double)v[j * hd + d]);
        }
        check.add(out[d], ref, rel * mag + sf_test::kUnderflow, d);
    }
    EXPECT_TRUE(check.ok());
    check.record();
}

// A query that sees no key (its window lies past the end of the keys) gets zeros, not NaN.
TEST(Attention, NoVisibleKeyGivesZeros) {
    BoundCheck check("attention_empty");
    run_case(check, {2, 3, 2, 1, 16, true, 10, 2}, 600);
    EXPECT_TRUE(check.ok());
}

} // namespace
