// sf_cpu_layernorm against a double loop.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

// The op computes mean and biased variance with two double passes and each output
// y = (x - mean) * rstd * w + b in double, rounded to fp32 once:
//   |out - ref| <= u |ref| + 2^-150 + D,
// where D bounds the double-precision difference between the op and this reference (both
// two-pass in double). The mean carries <= d u_d mean|x| absolute error, which (x - mean) turns
// into an absolute error, not a relative one, so D is written on magnitudes:
//   D = 2 (2d + 8) u_d ((|x| + mean|x|) rstd |w| + |b|),
// a factor 2 for the two implementations, 2d + 8 for the sums, sqrt, divisions and products.
struct Stats {
    double mean, rstd, mean_abs;
};

Stats row_stats(const float *x, int64_t dim, float eps) {
    double sum = 0.0, abs_sum = 0.0;
    for (int64_t i = 0; i < dim; i++) {
        sum += x[i];
        abs_sum += std::fabs((double)x[i]);
    }
    double mean = sum / (double)dim;
    double sq = 0.0;
    for (int64_t i = 0; i < dim; i++) sq += ((double)x[i] - mean) * ((double)x[i] - mean);
    return {mean, 1.0 / std::sqrt(sq / (double)dim + (double)eps), abs_sum / (double)dim};
}

void check_layernorm(BoundCheck &check, int64_t rows, int64_t dim, float offset, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> x = rng.normal_vec(rows * dim);
    for (float &v : x) v += offset;
    std::vector<float> w = rng.uniform_vec(dim, -2.0f, 2.0f), b = rng.uniform_vec(dim);
    const float eps = 1e-5f;
    std::vector<float> out(x.size(), NAN);
    sf_cpu_layernorm(out.data(), x.data(), w.data(), b.data(), rows, dim, eps);
    int64_t before = check.failures();
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x.data() + r * dim;
        Stats s = row_stats(xr, dim, eps);
        for (int64_t i = 0; i < dim; i++) {
            double ref = ((double)xr[i] - s.mean) * s.rstd * w[i] + b[i];
            double mag = (std::fabs((double)xr[i]) + s.mean_abs) * s.rstd * std::fabs((double)w[i]) +
                         std::fabs((double)b[i]);
            double bound = sf_test::kU32 * std::fabs(ref) + sf_test::kUnderflow +
                           2.0 * (2.0 * dim + 8.0) * sf_test::kU64 * mag;
            check.add(out[r * dim + i], ref, bound, r * dim + i);
        }
    }
    EXPECT_EQ(check.failures(), before)
        << check.ok().message() << " (rows=" << rows << " dim=" << dim << " offset=" << offset
        << ")";
}

TEST(LayerNorm, MatchesDoubleLoopWithinRoundingBound) {
    BoundCheck check("layernorm");
    uint64_t seed = 20;
    for (int64_t rows : {1, 7, 65, 1000})
        for (int64_t dim : {1, 7, 65, 96, 1000})
            if (rows * dim <= 100 * 1000) check_layernorm(check, rows, dim, 0.0f, seed++);
    check.record();
}

// A mean far from zero against unit spread: a one-pass E[x^2] - E[x]^2 in fp32 would lose
// every digit here; two passes keep the fp32 rounding bound.
TEST(LayerNorm, LargeMeanKeepsAccuracy) {
    BoundCheck check("layernorm_offset");
    check_layernorm(check, 7, 1000, 1000.0f, 30);
    check.record();
}

TEST(LayerNorm, InPlaceEqualsOutOfPlace) {
    Rng rng(5);
    const int64_t rows = 7, dim = 65;
    std::vector<float> x = rng.normal_vec(rows * dim), w = rng.uniform_vec(dim),
                       b = rng.uniform_vec(dim);
    std::vector<float> out(x.size());
    sf_cpu_layernorm(out.data(), x.data(), w.data(), b.data(), rows, dim, 1e-5f);
    sf_cpu_layernorm(x.data(), x.data(), w.data(), b.data(), rows, dim, 1e-5f);
    EXPECT_EQ(x, out);
}

} // namespace
