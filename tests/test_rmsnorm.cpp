// sf_cpu_rmsnorm against a double loop.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

// Relative bound per element. The op forms var = fl32(ss / d) from a double sum of squares
// (relative error <= u plus (d + 1) double roundings), r = fl32(1 / sqrt(var + eps)) in double
// (var's error enters halved through the square root; then one fp32 rounding), and two fp32
// products x * r and w * (x * r). Every factor multiplies, nothing cancels, so
//   |out - ref| <= ((1 + u)^3.5 (1 + u_d)^(2d + 8) - 1) |ref| + 2^-150,
// the double term covering the op's and this reference's sums, sqrt and divisions, the last
// term an underflow to subnormal.
double rmsnorm_rel_bound(int64_t dim) {
    return std::pow(1.0 + sf_test::kU32, 3.5) * std::pow(1.0 + sf_test::kU64, 2.0 * dim + 8.0) -
           1.0;
}

void reference(std::vector<double> &ref, const std::vector<float> &x, const std::vector<float> &w,
               int64_t rows, int64_t dim, float eps) {
    ref.resize(x.size());
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
        double inv = 1.0 / std::sqrt(ss / (double)dim + (double)eps);
        for (int64_t i = 0; i < dim; i++) ref[r * dim + i] = x[r * dim + i] * inv * w[i];
    }
}

TEST(RmsNorm, MatchesDoubleLoopWithinRoundingBound) {
    const int64_t sizes[] = {1, 7, 65, 1000};
    BoundCheck check("rmsnorm");
    uint64_t seed = 10;
    for (int64_t rows : sizes) {
        for (int64_t dim : {1, 7, 65, 96, 1000, 4099}) {
            if (rows * dim > 1000 * 1000) continue;
            Rng rng(seed++);
            std::vector<float> x = rng.normal_vec(rows * dim);
            std::vector<float> w = rng.uniform_vec(dim, -2.0f, 2.0f);
            const float eps = 1e-5f;
            std::vector<float> out(x.size(), NAN);
            sf_cpu_rmsnorm(out.data(), x.data(), w.data(), rows, dim, eps);
            std::vector<double> ref;
            reference(ref, x, w, rows, dim, eps);
            double rel = rmsnorm_rel_bound(dim);
            int64_t before = check.failures();
            for (size_t i = 0; i < out.size(); i++)
                check.add(out[i], ref[i], rel * std::fabs(ref[i]) + sf_test::kUnderflow,
                          (int64_t)i);
            EXPECT_EQ(check.failures(), before)
                << check.ok().message() << " (rows=" << rows << " dim=" << dim << ")";
        }
    }
    check.record();
}

// eps dominates a row of tiny values: the result is x / sqrt(eps) * w, not x / |x|.
TEST(RmsNorm, EpsDominatesTinyRows) {
    Rng rng(3);
    const int64_t dim = 65;
    std::vector<float> x = rng.uniform_vec(dim, -1e-6f, 1e-6f);
    std::vector<float> w = rng.uniform_vec(dim);
    std::vector<float> out(dim);
    const float eps = 1e-2f;
    sf_cpu_rmsnorm(out.data(), x.data(), w.data(), 1, dim, eps);
    std::vector<double> ref;
    reference(ref, x, w, 1, dim, eps);
    BoundCheck check("rmsnorm_eps");
    for (int64_t i = 0; i < dim; i++)
        check.add(out[i], ref[i], rmsnorm_rel_bound(dim) * std::fabs(ref[i]) + sf_test::kUnderflow,
                  i);
    EXPECT_TRUE(check.ok());
}

// out == x is allowed: in place must give exactly the out-of-place result.
TEST(RmsNorm, InPlaceEqualsOutOfPlace) {
    Rng rng(4);
    const int64_t rows = 7, dim = 1000;
    std::vector<float> x = rng.normal_vec(rows * dim), w = rng.uniform_vec(dim);
    std::vector<float> out(x.size());
    sf_cpu_rmsnorm(out.data(), x.data(), w.data(), rows, dim, 1e-6f);
    sf_cpu_rmsnorm(x.data(), x.data(), w.data(), rows, dim, 1e-6f);
    EXPECT_EQ(x, out);
}

} // namespace
