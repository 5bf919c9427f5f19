// sf_cpu_softmax and sf_cpu_log_softmax against double loops.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

// Both ops take the maximum, exponentials and sum in double and round each output to fp32
// once. Softmax: p_i = exp(x_i - m) / sum, the subtraction exact in double, exp within 1 ulp
// (2 u_d), an n-term sum of positive terms (gamma64(n)), a reciprocal and a product:
//   |out - ref| <= (u + 2 (n + 4) 2 u_d) |ref| + 2^-150,
// the outer 2 for the op and this reference.
// log-softmax: y_i = (x_i - m) - log(sum): the sum's relative error gamma64(n) + 2 u_d becomes
// an absolute error of log(sum), log adds 1 ulp of |log sum|, the final subtraction adds
// magnitudes (x_i - m <= 0 <= log sum), so
//   |out - ref| <= u |ref| + 2^-150 + 2 ((n + 2) 2 u_d + 2 u_d (|ref| + 1)).
double softmax_bound(double ref, int64_t n) {
    return (sf_test::kU32 + 2.0 * (n + 4.0) * 2.0 * sf_test::kU64) * std::fabs(ref) +
           sf_test::kUnderflow;
}
double log_softmax_bound(double ref, int64_t n) {
    return sf_test::kU32 * std::fabs(ref) + sf_test::kUnderflow +
           2.0 * ((n + 2.0) * 2.0 * sf_test::kU64 + 2.0 * sf_test::kU64 * (std::fabs(ref) + 1.0));
}

void reference(const float *x, int64_t n, std::vector<double> &p, std::vector<double> &logp) {
    double m = *std::max_element(x, x + n);
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += std::exp((double)x[i] - m);
    p.resize(n);
    logp.resize(n);
    for (int64_t i = 0; i < n; i++) {
        p[i] = std::exp((double)x[i] - m) / sum;
        logp[i] = (double)x[i] - m - std::log(sum);
    }
}

void check_rows(BoundCheck &sm, BoundCheck &lsm, int64_t rows, int64_t n, float spread,
                uint64_t seed) {
    Rng rng(seed);
    std::vector<float> x = rng.uniform_vec(rows * n, -spread, spread);
    std::vector<float> out(x.size(), NAN), lout(x.size(), NAN);
    sf_cpu_softmax(out.data(), x.data(), rows, n);
    sf_cpu_log_softmax(lout.data(), x.data(), rows, n);
    int64_t before = sm.failures() + lsm.failures();
    std::vector<double> p, logp;
    for (int64_t r = 0; r < rows; r++) {
        reference(x.data() + r * n, n, p, logp);
        for (int64_t i = 0; i < n; i++) {
            sm.add(out[r * n + i], p[i], softmax_bound(p[i], n), r * n + i);
            lsm.add(lout[r * n + i], logp[i], log_softmax_bound(logp[i], n), r * n + i);
        }
    }
    EXPECT_EQ(sm.failures() + lsm.failures(), before)
        << sm.ok().message() << " / " << lsm.ok().message() << " (rows=" << rows << " n=" << n
        << " spread=" << spread << ")";
}

TEST(Softmax, MatchesDoubleLoop) {
    BoundCheck sm("softmax"), lsm("log_softmax");
    uint64_t seed = 800;
    for (int64_t rows : {1, 7, 65, 1000})
        for (int64_t n : {1, 7, 65, 1000})
            if (rows * n <= 100000) check_rows(sm, lsm, rows, n, 1.0f, seed++);
    // Logits spread over +-40: probabilities down to e^-80 ~ 1e-35, still normal in fp32.
    check_rows(sm, lsm, 3, 49152, 40.0f, seed++);
    // Spread over +-60: the smallest probabilities are subnormal (the 2^-150 term).
    check_rows(sm, lsm, 2, 1000, 60.0f, seed++);
    sm.record();
    lsm.record();
}

// Values whose exponentials overflow float and double without the maximum subtracted.
TEST(Softmax, HugeLogitsDoNotOverflow) {
    float x[] = {1e30f, 1e30f, -1e30f, 3e38f, 3e38f};
    float out[5], lout[5];
    sf_cpu_softmax(out, x, 1, 5);
    sf_cpu_log_softmax(lout, x, 1, 5);
    EXPECT_EQ(out[0], 0.0f);
    EXPECT_EQ(out[2], 0.0f);
    EXPECT_EQ(out[3], 0.5f);
    EXPECT_EQ(out[4], 0.5f);
    // log-softmax never forms the probability, so it stays finite where softmax underflows.
    EXPECT_EQ(lout[3], (float)-std::log(2.0));
    EXPECT_EQ(lout[0], (float)((double)1e30f - (double)3e38f - std::log(2.0)));
}

TEST(Softmax, InPlaceEqualsOutOfPlace) {
    Rng rng(810);
    const int64_t rows = 7, n = 65;
    std::vector<float> x = rng.normal_vec(rows * n), y = x, out(x.size()), lout(x.size());
    sf_cpu_softmax(out.data(), x.data(), rows, n);
    sf_cpu_log_softmax(lout.data(), x.data(), rows, n);
    sf_cpu_softmax(x.data(), x.data(), rows, n);
    sf_cpu_log_softmax(y.data(), y.data(), rows, n);
    EXPECT_EQ(x, out);
    EXPECT_EQ(y, lout);
}

} // namespace
