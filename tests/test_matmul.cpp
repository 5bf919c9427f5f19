// sf_cpu_matmul (BLAS when built with it) and sf_cpu_matmul_portable against a double loop.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

typedef void (*MatmulFn)(float *, const float *, const float *, const float *, int64_t, int64_t,
                         int64_t);

struct Shape {
    int64_t m, n, k;
};

// Bound for out[i, j] = fl(sum_p x[i,p] w[j,p] + b[j]):
// in fp32, a sum of K + 1 terms of which K are rounded products (the bias is one more term)
// carries |err| <= gamma_{K+1} * (sum_p |x_ip||w_jp| + |b_j|), whatever the summation order
// and whether products are fused (BLAS kernels, the portable lanes and k-slices all qualify);
// Higham Th. 3.1/3.5 with one extra rounding for the bias. The double reference itself is off
// by at most gamma64(K + 1) times the same sum.
void check_matmul(MatmulFn fn, BoundCheck &check, Shape s, bool with_bias, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> x = rng.uniform_vec((size_t)(s.m * s.k));
    std::vector<float> w = rng.uniform_vec((size_t)(s.n * s.k));
    std::vector<float> bias = rng.uniform_vec((size_t)s.n);
    std::vector<float> out((size_t)(s.m * s.n), NAN);
    fn(out.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, s.m, s.n, s.k);

    int64_t failures_before = check.failures();
    double g = sf_test::gamma32((double)s.k + 1) + sf_test::gamma64((double)s.k + 1);
    for (int64_t i = 0; i < s.m; i++) {
        for (int64_t j = 0; j < s.n; j++) {
            double ref = 0.0, mag = 0.0;
            for (int64_t p = 0; p < s.k; p++) {
                double prod = (double)x[i * s.k + p] * (double)w[j * s.k + p];
                ref += prod;
                mag += std::fabs(prod);
            }
            if (with_bias) {
                ref += bias[j];
                mag += std::fabs((double)bias[j]);
            }
            check.add(out[i * s.n + j], ref, g * mag, i * s.n + j);
        }
    }
    EXPECT_EQ(check.failures(), failures_before)
        << check.ok().message() << " (m=" << s.m << " n=" << s.n << " k=" << s.k
        << " bias=" << with_bias << ")";
}

const Shape kShapes[] = {
    {1, 1, 1},    {7, 65, 33},  {65, 96, 128}, {1000, 7, 3}, {1, 257, 1031}, // k past one slice
    {33, 130, 64}, {17, 3, 1000}, {2, 4096 + 3, 9},
};

TEST(Matmul, MatchesDoubleLoopWithinGammaBound) {
    BoundCheck dispatch("sf_cpu_matmul"), portable("sf_cpu_matmul_portable");
    uint64_t seed = 1;
    for (const Shape &s : kShapes) {
        for (bool bias : {false, true}) {
            check_matmul(sf_cpu_matmul, dispatch, s, bias, seed);
            check_matmul(sf_cpu_matmul_portable, portable, s, bias, seed);
            seed++;
        }
    }
    dispatch.record();
    portable.record();
}

// k == 0 is an empty sum: out is the bias exactly, or zero, and nothing reads x or w.
TEST(Matmul, EmptyInnerDimensionGivesBiasOrZero) {
    for (MatmulFn fn : {sf_cpu_matmul, sf_cpu_matmul_portable}) {
        const int64_t m = 5, n = 9;
        std::vector<float> bias = Rng(7).uniform_vec(n);
        std::vector<float> out(m * n, NAN);
        fn(out.data(), nullptr, nullptr, bias.data(), m, n, 0);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) EXPECT_EQ(out[i * n + j], bias[j]);
        fn(out.data(), nullptr, nullptr, nullptr, m, n, 0);
        for (float v : out) EXPECT_EQ(v, 0.0f);
    }
}

// m == 0 or n == 0: nothing to write; the buffer is left alone.
TEST(Matmul, EmptyOutputWritesNothing) {
    for (MatmulFn fn : {sf_cpu_matmul, sf_cpu_matmul_portable}) {
        float sentinel[4] = {1.0f, 2.0f, 3.0f, 4.0f};
        float x[4] = {1, 1, 1, 1}, w[4] = {1, 1, 1, 1};
        fn(sentinel, x, w, nullptr, 0, 4, 1);
        fn(sentinel, x, w, nullptr, 4, 0, 1);
        EXPECT_EQ(sentinel[0], 1.0f);
        EXPECT_EQ(sentinel[3], 4.0f);
    }
}

// The portable path must give the same answer whatever the thread count: each output element is
// reduced by one thread in a fixed order, so repeated calls agree bit for bit.
TEST(Matmul, PortableIsDeterministic) {
    Rng rng(99);
    const int64_t m = 37, n = 150, k = 700;
    std::vector<float> x = rng.uniform_vec(m * k), w = rng.uniform_vec(n * k);
    std::vector<float> a(m * n), b(m * n);
    sf_cpu_matmul_portable(a.data(), x.data(), w.data(), nullptr, m, n, k);
    sf_cpu_matmul_portable(b.data(), x.data(), w.data(), nullptr, m, n, k);
    EXPECT_EQ(a, b);
}


// OpenBLAS falls back to its generic "Prescott" kernels for a CPU model it does not know: the
// hint names the widest kernels the CPU's features run, and keeps any other choice OpenBLAS
// made for itself (a known CPU, or a CPU that really is that old).
TEST(BlasHint, ReplacesOnlyTheGenericFallback) {
    EXPECT_STREQ(sf_cpu_blas_hint_for("Prescott", true, true, true), "SkylakeX");
    EXPECT_STREQ(sf_cpu_blas_hint_for("prescott", true, true, true), "SkylakeX");
    EXPECT_STREQ(sf_cpu_blas_hint_for("Prescott", false, true, true), "Haswell");
    EXPECT_STREQ(sf_cpu_blas_hint_for("Prescott", false, false, true), "Sandybridge");
    EXPECT_EQ(sf_cpu_blas_hint_for("Prescott", false, false, false), nullptr);
    EXPECT_EQ(sf_cpu_blas_hint_for("Haswell", true, true, true), nullptr);
    EXPECT_EQ(sf_cpu_blas_hint_for("Zen", true, true, true), nullptr);
    EXPECT_EQ(sf_cpu_blas_hint_for("SkylakeX", true, true, true), nullptr);
    EXPECT_EQ(sf_cpu_blas_hint_for(nullptr, true, true, true), nullptr);
}

// This binary's main (test_main.cpp) takes the CLI's first step: when OpenBLAS loaded its
// generic kernels on a CPU that runs wider ones, it starts again with OPENBLAS_CORETYPE set.
// So here, in the second start, nothing is left to hint; if OpenBLAS had refused the name (or
// the restart had not happened), the hint would still be there. On a machine whose OpenBLAS
// knows its CPU, or in a build without BLAS, there is nothing to hint in the first place.
TEST(BlasHint, TestsRunWithTheKernelsTheCpuRuns) {
    const char *hint = sf_cpu_blas_coretype_hint();
    const char *env = getenv("OPENBLAS_CORETYPE");
    EXPECT_STREQ(hint, nullptr) << "OpenBLAS: " << sf_cpu_matmul_backend()
                                << "; OPENBLAS_CORETYPE=" << (env ? env : "(unset)");
    EXPECT_GT(strlen(sf_cpu_matmul_backend()), 0u);
}

} // namespace
