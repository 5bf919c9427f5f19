// sf_cpu_swiglu, sf_cpu_gelu, sf_cpu_relu and sf_cpu_add against double / long double loops.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

// swiglu and gelu form each value in double and round it to fp32 once:
//   |out - ref| <= u |ref| + 2^-150 + c u_d |ref|,
// c counting the double-precision error of both the op and this reference: for swiglu exp
// (1 ulp = 2 u_d), the sum, the division and the product, 5 u_d per side; for gelu erfc (glibc
// documents at most 5 ulp on x86-64, 10 u_d), two products and the halving, 13 u_d for the op
// and at most that for the long double reference. c = 10 and c = 26 respectively.
const int64_t kLengths[] = {1, 7, 65, 1000, 4099};

TEST(Activations, SwigluMatchesDouble) {
    BoundCheck check("swiglu");
    uint64_t seed = 700;
    for (int64_t n : kLengths) {
        Rng rng(seed++);
        // Gates from deep in the negative tail (silu -> -0, subnormal products) to large.
        std::vector<float> g = rng.uniform_vec(n, -30.0f, 30.0f), u = rng.normal_vec(n);
        std::vector<float> out(n, NAN);
        sf_cpu_swiglu(out.data(), g.data(), u.data(), n);
        for (int64_t i = 0; i < n; i++) {
            double gd = g[i];
            double ref = gd / (1.0 + std::exp(-gd)) * (double)u[i];
            double bound = (sf_test::kU32 + 10.0 * sf_test::kU64) * std::fabs(ref) +
                           sf_test::kUnderflow;
            check.add(out[i], ref, bound, i);
        }
    }
    // Extreme gates: exp(-g) overflows to inf for g = -1000; the result must be -0, not NaN.
    float g[] = {-1000.0f, -100.0f, 0.0f, 100.0f, 1e30f}, u[] = {1.0f, 2.0f, 3.0f, 0.5f, 2.0f};
    float out[5];
    sf_cpu_swiglu(out, g, u, 5);
    EXPECT_EQ(out[0], 0.0f);
    EXPECT_TRUE(std::isfinite(out[1]));
    EXPECT_EQ(out[2], 0.0f);
    EXPECT_EQ(out[3], 50.0f);
    EXPECT_EQ(out[4], 2e30f);
    EXPECT_TRUE(check.ok());
    check.record();
}

TEST(Activations, GeluExactMatchesLongDouble) {
    BoundCheck check("gelu");
    uint64_t seed = 710;
    for (int64_t n : kLengths) {
        Rng rng(seed++);
        // Includes the far left tail, where 1 + erf would cancel to nothing.
        std::vector<float> x = rng.uniform_vec(n, -12.0f, 8.0f);
        std::vector<float> out(n, NAN);
        sf_cpu_gelu(out.data(), x.data(), n);
        for (int64_t i = 0; i < n; i++) {
            long double xl = x[i];
            double ref = (double)(0.5L * xl * erfcl(-xl / sqrtl(2.0L)));
            double bound = (sf_test::kU32 + 26.0 * sf_test::kU64) * std::fabs(ref) +
                           sf_test::kUnderflow;
            check.add(out[i], ref, bound, i);
        }
    }
    EXPECT_TRUE(check.ok());
    check.record();
}

// relu and add are exact in fp32 (a sum of two floats rounded once is what the double sum
// rounded to float gives: double has more than 2 * 24 + 2 bits, so the double rounding is
// innocuous), so compare for equality.
TEST(Activations, ReluIsExact) {
    Rng rng(720);
    std::vector<float> x = rng.normal_vec(1000);
    x[0] = 0.0f;
    x[1] = NAN;
    std::vector<float> out(x.size());
    sf_cpu_relu(out.data(), x.data(), (int64_t)x.size());
    EXPECT_TRUE(std::isnan(out[1])); // NaN propagates, as in torch
    for (size_t i = 0; i < x.size(); i++) {
        if (i == 1) continue;
        EXPECT_EQ(out[i], x[i] > 0.0f ? x[i] : 0.0f) << i;
    }
    sf_cpu_relu(x.data(), x.data(), (int64_t)x.size()); // in place
    for (size_t i = 2; i < x.size(); i++) EXPECT_EQ(x[i], out[i]);
}

TEST(Activations, AddIsExactAndMayAlias) {
    for (int64_t n : kLengths) {
        Rng rng(730 + n);
        std::vector<float> a = rng.normal_vec(n), b = rng.uniform_vec(n, -1e3f, 1e3f);
        std::vector<float> out(n);
        sf_cpu_add(out.data(), a.data(), b.data(), n);
        for (int64_t i = 0; i < n; i++) EXPECT_EQ(out[i], (float)((double)a[i] + (double)b[i]));
        sf_cpu_add(a.data(), a.data(), b.data(), n); // residual add in place
        EXPECT_EQ(a, out);
    }
}

TEST(Activations, SwigluAndGeluMayAlias) {
    Rng rng(740);
    std::vector<float> g = rng.normal_vec(65), u = rng.normal_vec(65), out(65);
    sf_cpu_swiglu(out.data(), g.data(), u.data(), 65);
    std::vector<float> g2 = g;
    sf_cpu_swiglu(g2.data(), g2.data(), u.data(), 65);
    EXPECT_EQ(g2, out);
    sf_cpu_gelu(out.data(), g.data(), 65);
    sf_cpu_gelu(g.data(), g.data(), 65);
    EXPECT_EQ(g, out);
}

} // namespace
