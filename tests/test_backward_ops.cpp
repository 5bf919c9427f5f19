// The CPU backward ops (the end of host/cpu/ops.h) against central finite differences.
//
// Method. Each op has a naive double-precision forward here, first checked against the
// library's fp32 forward (so that its derivative is the derivative of the right function).
// For a random cotangent R (the dy handed to the backward), the gradient of L = sum(R * out)
// with respect to every input element is taken by central differences of that double forward,
// with step h = 2^-17 (exact: x +- h is representable for |x| < 2^30) and again with 2h.
// FD error: truncation is h^2 L'''/6 and |g_h - g_2h| = 3 h^2 |L'''|/6 (to leading order), so
// 4 |g_h - g_2h| covers it; rounding is that of the outputs that moved (the others are computed
// bit-identically at x +- h and cancel exactly): each double output carries at most ~64 u64 of
// its magnitude for the sizes used here, so it adds <= 64 u64 / h * sum|R out| ~ 1e-9 sum|R out|
// over the moved outputs. That allowance (fd_allow) is added to the fp32 bound of each op,
// which is derived beside its test; the worst err/bound ratios go to the XML record.
#include "cpu/ops.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

// The scratch-free path of sf_cpu_attention_backward, taken only when its scratch allocation
// fails; attention.c exports it for this test.
extern "C" void sf_cpu_attention_backward_by_kv_head(
    float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
    const float *v, int64_t n_q, int64_t n_kv, int32_t n_heads, int32_t n_kv_heads,
    int32_t head_dim, bool causal, int64_t q_pos0, int32_t window, float scale);

namespace {

using sf_test::BoundCheck;
using sf_test::gamma32;
using sf_test::gamma64;
using sf_test::kU32;
using sf_test::kU64;
using sf_test::kUnderflow;
using sf_test::Rng;
using Vec = std::vector<double>;
using FVec = std::vector<float>;

Vec to_d(const FVec &v) { return Vec(v.begin(), v.end()); }

struct Fd {
    Vec grad;  // d/dx_i sum_e R_e f(x)_e
    Vec allow; // bound on |grad - exact|
};

// Central differences of x -> sum_e r_e f(x)_e, for every element of x (see the file comment).
template <class F> Fd fd_grad(const F &f, Vec x, const Vec &r) {
    const double h = 0x1p-17;
    Fd out{Vec(x.size()), Vec(x.size())};
    for (size_t i = 0; i < x.size(); i++) {
        const double xi = x[i];
        double moved = 0.0;
        auto diff = [&](double step) {
            x[i] = xi + step;
            Vec a = f(x);
            x[i] = xi - step;
            Vec b = f(x);
            x[i] = xi;
            double s = 0.0;
            for (size_t e = 0; e < a.size(); e++) {
                if (a[e] == b[e]) continue;
                s += r[e] * (a[e] - b[e]);
                moved += std::fabs(r[e]) * std::max(std::fabs(a[e]), std::fabs(b[e]));
            }
            return s / (2.0 * step);
        };
        double g1 = diff(h);
        double g2 = diff(2.0 * h);
        out.grad[i] = g1;
        out.allow[i] = 4.0 * std::fabs(g1 - g2) + 1e-9 * moved;
    }
    return out;
}

// sum_e |f_e| for the identity checks of the forwards.
void expect_forward_match(BoundCheck &check, const FVec &lib, const Vec &ref, const Vec &mag,
                          double rel) {
    for (size_t e = 0; e < ref.size(); e++)
        check.add(lib[e], ref[e], rel * mag[e] + kUnderflow, (int64_t)e);
}

// =============================================================================================
// Linear
// =============================================================================================

Vec linear_ref(const Vec &x, const Vec &w, const Vec &b, int64_t m, int64_t n, int64_t k) {
    Vec y(m * n);
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double s = b.empty() ? 0.0 : b[j];
            for (int64_t p = 0; p < k; p++) s += x[i * k + p] * w[j * k + p];
            y[i * n + j] = s;
        }
    return y;
}

// Bounds: dx[i,p] = (pre +) sum_j dy[i,j] w[j,p] is an fp32 sum of n products, in any order
// (BLAS, with or without FMA) within gamma_{n+1} of sum |dy w| + |pre| (the extra rounding for
// the prefill). dw likewise with m rows: gamma_{m+1}. db is summed in double and rounded once:
// u32 |db| plus the double sum's gamma64(m + 1) of the magnitudes.
void run_linear(BoundCheck &check, int64_t m, int64_t n, int64_t k, bool accumulate, bool want_dw,
                bool want_db, uint64_t seed) {
    SCOPED_TRACE("m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    Rng rng(seed);
    FVec x = rng.uniform_vec(m * k), w = rng.uniform_vec(n * k), b = rng.uniform_vec(n);
    FVec dy = rng.uniform_vec(m * n);
    FVec pre_dx = rng.uniform_vec(m * k), pre_dw = rng.uniform_vec(n * k);
    FVec pre_db = rng.uniform_vec(n);

    // The double forward is the library's forward.
    FVec y(m * n);
    sf_cpu_matmul(y.data(), x.data(), w.data(), b.data(), m, n, k);
    Vec xd = to_d(x), wd = to_d(w), bd = to_d(b), r = to_d(dy);
    Vec y_ref = linear_ref(xd, wd, bd, m, n, k), y_mag(m * n);
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double s = std::fabs(bd[j]);
            for (int64_t p = 0; p < k; p++) s += std::fabs(xd[i * k + p] * wd[j * k + p]);
            y_mag[i * n + j] = s;
        }
    BoundCheck fwd("linear_forward");
    expect_forward_match(fwd, y, y_ref, y_mag, gamma32(k + 2));
    EXPECT_TRUE(fwd.ok());

    FVec dx = accumulate ? pre_dx : FVec(m * k, NAN);
    FVec dw = pre_dw, db = pre_db;
    sf_cpu_linear_backward(dx.data(), accumulate, want_dw ? dw.data() : nullptr,
                           want_db ? db.data() : nullptr, dy.data(), x.data(), w.data(), m, n, k);

    Fd gx = fd_grad([&](const Vec &v) { return linear_ref(v, wd, bd, m, n, k); }, xd, r);
    for (int64_t i = 0; i < m; i++)
        for (int64_t p = 0; p < k; p++) {
            int64_t e = i * k + p;
            double pre = accumulate ? pre_dx[e] : 0.0, mag = std::fabs(pre);
            for (int64_t j = 0; j < n; j++) mag += std::fabs(r[i * n + j] * wd[j * k + p]);
            check.add(dx[e], pre + gx.grad[e], gamma32(n + 1) * mag + gx.allow[e] + kUnderflow,
                      e);
        }
    if (want_dw) {
        Fd gw = fd_grad([&](const Vec &v) { return linear_ref(xd, v, bd, m, n, k); }, wd, r);
        for (int64_t j = 0; j < n; j++)
            for (int64_t p = 0; p < k; p++) {
                int64_t e = j * k + p;
                double mag = std::fabs((double)pre_dw[e]);
                for (int64_t i = 0; i < m; i++) mag += std::fabs(r[i * n + j] * xd[i * k + p]);
                check.add(dw[e], pre_dw[e] + gw.grad[e],
                          gamma32(m + 1) * mag + gw.allow[e] + kUnderflow, e);
            }
    } else {
        EXPECT_EQ(0, std::memcmp(dw.data(), pre_dw.data(), dw.size() * sizeof(float)));
    }
    if (want_db) {
        Fd gb = fd_grad([&](const Vec &v) { return linear_ref(xd, wd, v, m, n, k); }, bd, r);
        for (int64_t j = 0; j < n; j++) {
            double mag = std::fabs((double)pre_db[j]);
            for (int64_t i = 0; i < m; i++) mag += std::fabs(r[i * n + j]);
            double want = pre_db[j] + gb.grad[j];
            check.add(db[j], want,
                      kU32 * std::fabs(want) + gamma64(m + 1) * mag + gb.allow[j] + kUnderflow,
                      j);
        }
    } else {
        EXPECT_EQ(0, std::memcmp(db.data(), pre_db.data(), db.size() * sizeof(float)));
    }
}

// Small shapes take the portable loops, shapes with every size >= 16 take sgemm in BLAS builds.
TEST(BackwardLinear, MatchesFiniteDifferencesAcrossShapesAndPaths) {
    BoundCheck check("linear_backward");
    uint64_t seed = 1000;
    const int64_t shapes[][3] = {{1, 1, 1}, {5, 7, 3}, {3, 1, 9}, {16, 16, 16}, {33, 17, 20},
                                 {17, 40, 19}};
    for (const auto &s : shapes)
        for (bool acc : {false, true}) run_linear(check, s[0], s[1], s[2], acc, true, true, seed++);
    EXPECT_TRUE(check.ok());
    check.record();
}

// dw and db are optional (frozen weights); dx "=" ignores what the buffer held (NaN here).
TEST(BackwardLinear, NullOptionalOutputs) {
    BoundCheck check("linear_backward_null");
    run_linear(check, 6, 5, 4, false, false, false, 1100);
    run_linear(check, 20, 18, 17, false, false, true, 1101);
    run_linear(check, 20, 18, 17, true, true, false, 1102);
    EXPECT_TRUE(check.ok());

    // dx NULL too: only the weight gradients.
    Rng rng(1103);
    FVec x = rng.uniform_vec(4 * 3), w = rng.uniform_vec(2 * 3), dy = rng.uniform_vec(4 * 2);
    FVec dw(2 * 3, 0.0f), db(2, 0.0f);
    sf_cpu_linear_backward(nullptr, false, dw.data(), db.data(), dy.data(), x.data(), w.data(), 4,
                           2, 3);
    for (int64_t j = 0; j < 2; j++) {
        double s = 0.0;
        for (int64_t i = 0; i < 4; i++) s += dy[i * 2 + j];
        EXPECT_NEAR(db[j], s, 4 * kU32 * 8);
    }
}

// n == 0: y has no columns, so dx = dy . w is an empty sum, zero.
TEST(BackwardLinear, EmptyInnerProductZeroesDx) {
    FVec dx(3 * 4, NAN);
    float dummy = 0.0f;
    FVec x(3 * 4, 1.0f);
    sf_cpu_linear_backward(dx.data(), false, nullptr, nullptr, &dummy, x.data(), &dummy, 3, 0, 4);
    for (float v : dx) EXPECT_EQ(v, 0.0f);
}

// =============================================================================================
// RMSNorm and LayerNorm
// =============================================================================================

Vec rmsnorm_ref(const Vec &x, const Vec &w, int64_t rows, int64_t dim, double eps) {
    Vec y(rows * dim);
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += x[r * dim + i] * x[r * dim + i];
        double inv = 1.0 / std::sqrt(ss / (double)dim + eps);
        for (int64_t i = 0; i < dim; i++) y[r * dim + i] = w[i] * x[r * dim + i] * inv;
    }
    return y;
}

Vec layernorm_ref(const Vec &x, const Vec &w, const Vec &b, int64_t rows, int64_t dim,
                  double eps) {
    Vec y(rows * dim);
    for (int64_t r = 0; r < rows; r++) {
        double mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < dim; i++) mean += x[r * dim + i];
        mean /= (double)dim;
        for (int64_t i = 0; i < dim; i++) var += (x[r * dim + i] - mean) * (x[r * dim + i] - mean);
        double rstd = 1.0 / std::sqrt(var / (double)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            y[r * dim + i] = (x[r * dim + i] - mean) * rstd * w[i] + b[i];
    }
    return y;
}

// Inputs with awkward rows: one of tiny values where eps dominates the mean square, one with a
// large offset (LayerNorm's mean >> spread), the rest random.
FVec norm_input(Rng &rng, int64_t rows, int64_t dim) {
    FVec x = rng.uniform_vec(rows * dim, -2.0f, 2.0f);
    if (rows > 1)
        for (int64_t i = 0; i < dim; i++) x[dim + i] *= 1e-3f;
    if (rows > 2)
        for (int64_t i = 0; i < dim; i++) x[2 * dim + i] += 3.0f;
    return x;
}

// Bounds. Both backwards form each value in double from fp32 inputs and round it once, so an
// element is within u32 |g| of the exact gradient plus the double arithmetic's error,
// gamma64(8 dim) of the magnitude of its terms: for RMSNorm dx_k the terms are r |w_k dy_k| and
// |x_k| r^3 / dim sum_i |dy_i w_i x_i|; for LayerNorm dx_k, rstd (|g_k| + mean|g| + |xh_k|
// mean|g xh|) with g = dy w; for dw, db the prefill plus sum_rows |dy xh| or |dy| (whose
// rounding into fp32 with the prefill is the one u32). The forwards are checked against the
// double versions at 16 u32 of |w x r| (+ |b|): transformers-style fp32 roundings, a few ulps.
void run_rmsnorm(BoundCheck &check, int64_t rows, int64_t dim, bool want_dw, bool alias,
                 uint64_t seed) {
    SCOPED_TRACE("rows=" + std::to_string(rows) + " dim=" + std::to_string(dim));
    const float eps = 1e-5f;
    Rng rng(seed);
    FVec x = norm_input(rng, rows, dim), w = rng.uniform_vec(dim, 0.5f, 1.5f);
    FVec dy = rng.uniform_vec(rows * dim), pre_dw = rng.uniform_vec(dim);
    Vec xd = to_d(x), wd = to_d(w), r = to_d(dy);

    FVec y(rows * dim);
    sf_cpu_rmsnorm(y.data(), x.data(), w.data(), rows, dim, eps);
    Vec y_ref = rmsnorm_ref(xd, wd, rows, dim, eps), y_mag(y_ref.size());
    for (size_t e = 0; e < y_ref.size(); e++) y_mag[e] = std::fabs(y_ref[e]);
    BoundCheck fwd("rmsnorm_forward");
    expect_forward_match(fwd, y, y_ref, y_mag, 16 * kU32);
    EXPECT_TRUE(fwd.ok());

    FVec dx(rows * dim, NAN), dw = pre_dw;
    FVec dyc = dy; // stays intact unless aliased
    float *dx_p = alias ? dyc.data() : dx.data();
    sf_cpu_rmsnorm_backward(dx_p, want_dw ? dw.data() : nullptr, dyc.data(), x.data(), w.data(),
                            rows, dim, eps);
    if (alias) dx = dyc;

    Fd gx = fd_grad([&](const Vec &v) { return rmsnorm_ref(v, wd, rows, dim, eps); }, xd, r);
    Fd gw = fd_grad([&](const Vec &v) { return rmsnorm_ref(xd, v, rows, dim, eps); }, wd, r);
    Vec dw_mag(dim);
    for (int64_t i = 0; i < dim; i++) dw_mag[i] = std::fabs((double)pre_dw[i]);
    for (int64_t row = 0; row < rows; row++) {
        const double *xr = xd.data() + row * dim, *dyr = r.data() + row * dim;
        double ss = 0.0, dot = 0.0;
        for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
        double inv = 1.0 / std::sqrt(ss / (double)dim + eps);
        for (int64_t i = 0; i < dim; i++) dot += std::fabs(dyr[i] * wd[i] * xr[i]);
        for (int64_t i = 0; i < dim; i++) {
            int64_t e = row * dim + i;
            double mag = inv * std::fabs(wd[i] * dyr[i]) +
                         std::fabs(xr[i]) * inv * inv * inv / (double)dim * dot;
            check.add(dx[e], gx.grad[e],
                      kU32 * std::fabs(gx.grad[e]) + gamma64(8 * dim) * mag + gx.allow[e] +
                          kUnderflow,
                      e);
            dw_mag[i] += std::fabs(dyr[i] * xr[i] * inv);
        }
    }
    for (int64_t i = 0; i < dim; i++) {
        if (!want_dw) {
            EXPECT_EQ(dw[i], pre_dw[i]);
            continue;
        }
        double want = pre_dw[i] + gw.grad[i];
        check.add(dw[i], want,
                  kU32 * std::fabs(want) + gamma64(8 * rows) * dw_mag[i] + gw.allow[i] +
                      kUnderflow,
                  i);
    }
}

TEST(BackwardRmsNorm, MatchesFiniteDifferences) {
    BoundCheck check("rmsnorm_backward");
    uint64_t seed = 2000;
    const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 33}, {4, 64}, {9, 65}, {2, 130}};
    for (const auto &s : shapes) run_rmsnorm(check, s[0], s[1], true, false, seed++);
    EXPECT_TRUE(check.ok());
    check.record();
}

// dx may be dy; dw NULL (a frozen weight) leaves the buffer alone. The aliased result must equal
// the unaliased one bit for bit, which the FD check above then covers.
TEST(BackwardRmsNorm, AliasAndNullWeightGradient) {
    BoundCheck check("rmsnorm_backward_alias");
    run_rmsnorm(check, 5, 33, true, true, 2100);
    run_rmsnorm(check, 5, 33, false, true, 2101);
    run_rmsnorm(check, 3, 10, false, false, 2102);
    EXPECT_TRUE(check.ok());
}

void run_layernorm(BoundCheck &check, int64_t rows, int64_t dim, bool want_dw, bool want_db,
                   bool alias, uint64_t seed) {
    SCOPED_TRACE("rows=" + std::to_string(rows) + " dim=" + std::to_string(dim));
    const float eps = 1e-5f;
    Rng rng(seed);
    FVec x = norm_input(rng, rows, dim), w = rng.uniform_vec(dim, 0.5f, 1.5f);
    FVec b = rng.uniform_vec(dim), dy = rng.uniform_vec(rows * dim);
    FVec pre_dw = rng.uniform_vec(dim), pre_db = rng.uniform_vec(dim);
    Vec xd = to_d(x), wd = to_d(w), bd = to_d(b), r = to_d(dy);

    FVec y(rows * dim);
    sf_cpu_layernorm(y.data(), x.data(), w.data(), b.data(), rows, dim, eps);
    Vec y_ref = layernorm_ref(xd, wd, bd, rows, dim, eps), y_mag(y_ref.size());
    for (size_t e = 0; e < y_ref.size(); e++)
        y_mag[e] = std::fabs(y_ref[e] - bd[e % dim]) + std::fabs(bd[e % dim]);
    BoundCheck fwd("layernorm_forward");
    expect_forward_match(fwd, y, y_ref, y_mag, 16 * kU32);
    EXPECT_TRUE(fwd.ok());

    FVec dx(rows * dim, NAN), dw = pre_dw, db = pre_db, dyc = dy;
    float *dx_p = alias ? dyc.data() : dx.data();
    sf_cpu_layernorm_backward(dx_p, want_dw ? dw.data() : nullptr, want_db ? db.data() : nullptr,
                              dyc.data(), x.data(), w.data(), rows, dim, eps);
    if (alias) dx = dyc;

    Fd gx = fd_grad([&](const Vec &v) { return layernorm_ref(v, wd, bd, rows, dim, eps); }, xd, r);
    Fd gw = fd_grad([&](const Vec &v) { return layernorm_ref(xd, v, bd, rows, dim, eps); }, wd, r);
    Fd gb = fd_grad([&](const Vec &v) { return layernorm_ref(xd, wd, v, rows, dim, eps); }, bd, r);
    Vec dw_mag(dim), db_mag(dim);
    for (int64_t i = 0; i < dim; i++) {
        dw_mag[i] = std::fabs((double)pre_dw[i]);
        db_mag[i] = std::fabs((double)pre_db[i]);
    }
    for (int64_t row = 0; row < rows; row++) {
        const double *xr = xd.data() + row * dim, *dyr = r.data() + row * dim;
        double mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < dim; i++) mean += xr[i];
        mean /= (double)dim;
        for (int64_t i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        double rstd = 1.0 / std::sqrt(var / (double)dim + eps);
        double mg = 0.0, mgx = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            mg += std::fabs(dyr[i] * wd[i]) / (double)dim;
            mgx += std::fabs(dyr[i] * wd[i] * (xr[i] - mean) * rstd) / (double)dim;
        }
        for (int64_t i = 0; i < dim; i++) {
            int64_t e = row * dim + i;
            double xh = (xr[i] - mean) * rstd;
            double mag = rstd * (std::fabs(dyr[i] * wd[i]) + mg + std::fabs(xh) * mgx);
            check.add(dx[e], gx.grad[e],
                      kU32 * std::fabs(gx.grad[e]) + gamma64(8 * dim) * mag + gx.allow[e] +
                          kUnderflow,
                      e);
            dw_mag[i] += std::fabs(dyr[i] * xh);
            db_mag[i] += std::fabs(dyr[i]);
        }
    }
    for (int64_t i = 0; i < dim; i++) {
        if (want_dw) {
            double want = pre_dw[i] + gw.grad[i];
            check.add(dw[i], want,
                      kU32 * std::fabs(want) + gamma64(8 * rows) * dw_mag[i] + gw.allow[i] +
                          kUnderflow,
                      i);
        } else {
            EXPECT_EQ(dw[i], pre_dw[i]);
        }
        if (want_db) {
            double want = pre_db[i] + gb.grad[i];
            check.add(db[i], want,
                      kU32 * std::fabs(want) + gamma64(8 * rows) * db_mag[i] + gb.allow[i] +
                          kUnderflow,
                      i);
        } else {
            EXPECT_EQ(db[i], pre_db[i]);
        }
    }
}

TEST(BackwardLayerNorm, MatchesFiniteDifferences) {
    BoundCheck check("layernorm_backward");
    uint64_t seed = 3000;
    const int64_t shapes[][2] = {{1, 2}, {3, 7}, {5, 33}, {4, 64}, {9, 65}, {2, 130}};
    for (const auto &s : shapes) run_layernorm(check, s[0], s[1], true, true, false, seed++);
    EXPECT_TRUE(check.ok());
    check.record();
}

TEST(BackwardLayerNorm, AliasAndNullOptionalOutputs) {
    BoundCheck check("layernorm_backward_alias");
    run_layernorm(check, 5, 33, true, true, true, 3100);
    run_layernorm(check, 5, 33, false, true, true, 3101);
    run_layernorm(check, 4, 10, true, false, false, 3102);
    run_layernorm(check, 4, 10, false, false, true, 3103);
    EXPECT_TRUE(check.ok());
}

// =============================================================================================
// RoPE
// =============================================================================================

Vec rope_ref(const Vec &x, const std::vector<int32_t> &pos, int64_t n, int32_t heads, int32_t hd,
             const Vec &inv_freq, double scale) {
    Vec y = x;
    int32_t half = hd / 2;
    for (int64_t t = 0; t < n; t++)
        for (int32_t h = 0; h < heads; h++)
            for (int32_t i = 0; i < half; i++) {
                int64_t e = (t * heads + h) * hd + i;
                double a = pos[t] * inv_freq[i];
                y[e] = (x[e] * std::cos(a) - x[e + half] * std::sin(a)) * scale;
                y[e + half] = (x[e + half] * std::cos(a) + x[e] * std::sin(a)) * scale;
            }
    return y;
}

// Bound: each output of the backward (and of the forward) is formed in double from two products
// and rounded once: u32 |g| + gamma64(8) (|d0 c| + |d1 s|) <= u32 |g| + gamma64(8) 2 scale
// max|d|. The unpaired last element of an odd head_dim passes through unchanged both ways.
TEST(BackwardRope, MatchesFiniteDifferences) {
    BoundCheck check("rope_backward");
    BoundCheck fwd("rope_forward");
    uint64_t seed = 4000;
    for (int32_t hd : {2, 6, 7, 10, 64})
        for (double att : {1.0, 1.19}) {
            SCOPED_TRACE("head_dim=" + std::to_string(hd));
            Rng rng(seed++);
            const int64_t n = 5;
            const int32_t heads = 3;
            std::vector<int32_t> pos = {0, 1, 17, 4095, 17};
            Vec inv(hd / 2);
            for (int32_t i = 0; i < hd / 2; i++)
                inv[i] = 1.0 / std::pow(10000.0, 2.0 * i / (double)hd);
            FVec x = rng.uniform_vec(n * heads * hd), dy = rng.uniform_vec(n * heads * hd);
            Vec xd = to_d(x), r = to_d(dy);

            FVec y = x;
            sf_cpu_rope_apply(y.data(), pos.data(), n, heads, hd, inv.data(), att);
            Vec y_ref = rope_ref(xd, pos, n, heads, hd, inv, att);
            Vec y_mag(y.size(), 2.0 * att);
            expect_forward_match(fwd, y, y_ref, y_mag, kU32 + gamma64(8));

            FVec d = dy;
            sf_cpu_rope_backward(d.data(), pos.data(), n, heads, hd, inv.data(), att);
            Fd g = fd_grad([&](const Vec &v) { return rope_ref(v, pos, n, heads, hd, inv, att); },
                           xd, r);
            for (size_t e = 0; e < d.size(); e++)
                check.add(d[e], g.grad[e],
                          kU32 * std::fabs(g.grad[e]) + gamma64(8) * 2.0 * att + g.allow[e],
                          (int64_t)e);
            if (hd % 2 == 1) {
                for (int64_t t = 0; t < n * heads; t++)
                    EXPECT_EQ(d[t * hd + hd - 1], dy[t * hd + hd - 1]);
            }
        }
    EXPECT_TRUE(fwd.ok());
    EXPECT_TRUE(check.ok());
    check.record();
}

// =============================================================================================
// Attention
// =============================================================================================

struct AttCase {
    int64_t n_q, n_kv;
    int32_t n_heads, n_kv_heads, head_dim;
    bool causal;
    int64_t q_pos0;
    int32_t window;
    float scale;
};

std::string describe(const AttCase &c) {
    return "n_q=" + std::to_string(c.n_q) + " n_kv=" + std::to_string(c.n_kv) +
           " heads=" + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) +
           " hd=" + std::to_string(c.head_dim) + (c.causal ? " causal" : " full") +
           " pos0=" + std::to_string(c.q_pos0) + " window=" + std::to_string(c.window);
}

// The visibility rule of ops.h, restated independently of attention.c.
bool visible(const AttCase &c, int64_t i, int64_t j) {
    if (!c.causal) return true;
    int64_t pos = c.q_pos0 + i;
    return j <= pos && (c.window <= 0 || pos - j < c.window);
}

Vec attention_ref(const AttCase &c, const Vec &q, const Vec &k, const Vec &v) {
    const int64_t qw = (int64_t)c.n_heads * c.head_dim, kvw = (int64_t)c.n_kv_heads * c.head_dim;
    const int32_t group = c.n_heads / c.n_kv_heads, D = c.head_dim;
    Vec out(c.n_q * qw, 0.0), s(c.n_kv);
    for (int64_t i = 0; i < c.n_q; i++)
        for (int32_t h = 0; h < c.n_heads; h++) {
            const int64_t qo = i * qw + (int64_t)h * D, go = (int64_t)(h / group) * D;
            double m = -INFINITY;
            for (int64_t j = 0; j < c.n_kv; j++) {
                if (!visible(c, i, j)) continue;
                double dot = 0.0;
                for (int d = 0; d < D; d++) dot += q[qo + d] * k[j * kvw + go + d];
                s[j] = (double)c.scale * dot;
                m = std::max(m, s[j]);
            }
            double sum = 0.0;
            for (int64_t j = 0; j < c.n_kv; j++)
                if (visible(c, i, j)) sum += std::exp(s[j] - m);
            for (int64_t j = 0; j < c.n_kv; j++) {
                if (!visible(c, i, j)) continue;
                double p = std::exp(s[j] - m) / sum;
                for (int d = 0; d < D; d++) out[qo + d] += p * v[j * kvw + go + d];
            }
        }
    return out;
}

// ---------------------------------------------------------------------------------------------
// fp32 error bound of the attention backward, per element, first order (then x1.1 for the
// second-order terms). For one (query i, head h) with n visible keys in C chunks of 64:
//   sigma_j = gamma_{D+1} |scale| sum|q||k_j|   (error of a recomputed score)
//   A_j     = sum|dout||v_j|,  dP_j's error gamma_D A_j
//   rho     = relative error of a recomputed P_j. Its exponent s_j - max is off by the two
//             scores' errors, u |max - s_j| for the subtraction and 2u per expf (within 1 ulp)
//             and per rescale (3C + 4 such steps over the statistics and the recomputation):
//             eta = 2 max sigma + u max|max - s| + (3C + 4) 2u; the normaliser, an fp32 sum of
//             n such terms rescaled C times, adds gamma_{n+C+2}: rho = expm1(2 eta) +
//             2 gamma_{n+C+2} (the 2 covering numerator and denominator).
//   dD      = (rho + gamma_{n+C+3}) sum_l P_l (|dP_l| + A_l) + gamma_D sum_l P_l A_l
//   e(dS_j) = |scale| P_j ((rho + 3u)(|dP_j| + |D|) + gamma_D A_j + dD)
// dq_d = sum_j dS_j k_jd: sum_j |k_jd| e(dS_j) + gamma_{n+1} sum_j |dS_j k_jd|.
// dk_jd, dv_jd sum over the cnt_j (query, head) pairs that see key j:
//   sum |q_d| e(dS) + gamma_{cnt+1} sum |dS q_d|,  sum (rho + u) P |dout_d| + gamma_{cnt+1}
//   sum P |dout_d|.
// ---------------------------------------------------------------------------------------------
struct AttBounds {
    Vec dq, dk, dv;
};

AttBounds attention_bounds(const AttCase &c, const Vec &q, const Vec &k, const Vec &v,
                           const Vec &dout) {
    const int64_t qw = (int64_t)c.n_heads * c.head_dim, kvw = (int64_t)c.n_kv_heads * c.head_dim;
    const int32_t group = c.n_heads / c.n_kv_heads, D = c.head_dim;
    const double u = kU32, sc = std::fabs((double)c.scale);
    AttBounds b{Vec(c.n_q * qw, 0.0), Vec(c.n_kv * kvw, 0.0), Vec(c.n_kv * kvw, 0.0)};
    Vec dk_sum(c.n_kv * kvw, 0.0), dv_sum(c.n_kv * kvw, 0.0), cnt(c.n_kv * c.n_kv_heads, 0.0);
    Vec s(c.n_kv), sig(c.n_kv), A(c.n_kv), P(c.n_kv), dP(c.n_kv), e_ds(c.n_kv), ds(c.n_kv);
    for (int64_t i = 0; i < c.n_q; i++)
        for (int32_t h = 0; h < c.n_heads; h++) {
            const int32_t g = h / group;
            const int64_t qo = i * qw + (int64_t)h * D, go = (int64_t)g * D;
            double m = -INFINITY, max_sig = 0.0;
            int64_t n = 0, first = -1, last = -1;
            for (int64_t j = 0; j < c.n_kv; j++) {
                if (!visible(c, i, j)) continue;
                double dot = 0.0, a = 0.0, av = 0.0, dp = 0.0;
                for (int d = 0; d < D; d++) {
                    dot += q[qo + d] * k[j * kvw + go + d];
                    a += std::fabs(q[qo + d] * k[j * kvw + go + d]);
                    dp += dout[qo + d] * v[j * kvw + go + d];
                    av += std::fabs(dout[qo + d] * v[j * kvw + go + d]);
                }
                s[j] = c.scale * dot;
                sig[j] = gamma32(D + 1) * sc * a;
                A[j] = av;
                dP[j] = dp;
                max_sig = std::max(max_sig, sig[j]);
                m = std::max(m, s[j]);
                n++;
                if (first < 0) first = j;
                last = j;
            }
            if (n == 0) continue; // zero gradient, checked exactly
            double chunks = std::ceil((double)(last - first + 1) / 64.0);
            double sum = 0.0, spread = 0.0;
            for (int64_t j = first; j <= last; j++)
                if (visible(c, i, j)) {
                    sum += std::exp(s[j] - m);
                    spread = std::max(spread, m - s[j]);
                }
            double eta = 2.0 * max_sig + u * spread + (3.0 * chunks + 4.0) * 2.0 * u;
            double rho = std::expm1(2.0 * eta) + 2.0 * gamma32(n + chunks + 2.0);
            double Dv = 0.0, pdp = 0.0, pa = 0.0;
            for (int64_t j = first; j <= last; j++)
                if (visible(c, i, j)) {
                    P[j] = std::exp(s[j] - m) / sum;
                    Dv += P[j] * dP[j];
                    pdp += P[j] * std::fabs(dP[j]);
                    pa += P[j] * A[j];
                }
            double dD = (rho + gamma32(n + chunks + 3.0)) * (pdp + pa) + gamma32(D) * pa;
            for (int64_t j = first; j <= last; j++)
                if (visible(c, i, j)) {
                    ds[j] = P[j] * (dP[j] - Dv) * c.scale;
                    e_ds[j] = sc * P[j] *
                              ((rho + 3.0 * u) * (std::fabs(dP[j]) + std::fabs(Dv)) +
                               gamma32(D) * A[j] + dD);
                    cnt[j * c.n_kv_heads + g] += 1.0;
                }
            for (int d = 0; d < D; d++) {
                double e = 0.0, mag = 0.0;
                for (int64_t j = first; j <= last; j++)
                    if (visible(c, i, j)) {
                        double kjd = std::fabs(k[j * kvw + go + d]);
                        e += kjd * e_ds[j];
                        mag += std::fabs(ds[j]) * kjd;
                    }
                b.dq[qo + d] = e + gamma32(n + 1.0) * mag;
            }
            for (int64_t j = first; j <= last; j++)
                if (visible(c, i, j))
                    for (int d = 0; d < D; d++) {
                        int64_t ko = j * kvw + go + d;
                        double qd = std::fabs(q[qo + d]), od = std::fabs(dout[qo + d]);
                        b.dk[ko] += qd * e_ds[j];
                        dk_sum[ko] += std::fabs(ds[j]) * qd;
                        b.dv[ko] += (rho + u) * P[j] * od;
                        dv_sum[ko] += P[j] * od;
                    }
        }
    for (int64_t j = 0; j < c.n_kv; j++)
        for (int32_t g = 0; g < c.n_kv_heads; g++)
            for (int d = 0; d < D; d++) {
                int64_t ko = j * kvw + (int64_t)g * D + d;
                double gc = gamma32(cnt[j * c.n_kv_heads + g] + 1.0);
                b.dk[ko] += gc * dk_sum[ko];
                b.dv[ko] += gc * dv_sum[ko];
            }
    for (Vec *vv : {&b.dq, &b.dk, &b.dv})
        for (double &x : *vv) x = 1.1 * x + kUnderflow;
    return b;
}

using AttBackwardFn = void (*)(float *, float *, float *, const float *, const float *,
                               const float *, const float *, int64_t, int64_t, int32_t, int32_t,
                               int32_t, bool, int64_t, int32_t, float);

struct AttInputs {
    FVec q, k, v, dout;
};

AttInputs att_inputs(const AttCase &c, uint64_t seed) {
    Rng rng(seed);
    const int64_t qw = (int64_t)c.n_heads * c.head_dim, kvw = (int64_t)c.n_kv_heads * c.head_dim;
    return {rng.uniform_vec(c.n_q * qw, -2.0f, 2.0f), rng.uniform_vec(c.n_kv * kvw, -2.0f, 2.0f),
            rng.uniform_vec(c.n_kv * kvw), rng.uniform_vec(c.n_q * qw)};
}

// Forward identity check: sf_cpu_attention's own test bounds its error by a few tens of u32 of
// sum_j p_j |v_j|; 256 u32 of sum |v| over the visible keys is far looser and still far below
// any slip of the mask or the softmax.
void check_attention_forward(const AttCase &c, const AttInputs &in) {
    const int64_t qw = (int64_t)c.n_heads * c.head_dim;
    FVec out(c.n_q * qw, NAN);
    sf_cpu_attention(out.data(), in.q.data(), in.k.data(), in.v.data(), c.n_q, c.n_kv, c.n_heads,
                     c.n_kv_heads, c.head_dim, c.causal, c.q_pos0, c.window, c.scale);
    Vec ref = attention_ref(c, to_d(in.q), to_d(in.k), to_d(in.v));
    BoundCheck fwd("attention_forward");
    for (size_t e = 0; e < ref.size(); e++) fwd.add(out[e], ref[e], 256 * kU32 * 1.0, (int64_t)e);
    EXPECT_TRUE(fwd.ok()) << describe(c);
}

void run_attention_fd(BoundCheck &check, const AttCase &c, AttBackwardFn fn, uint64_t seed) {
    SCOPED_TRACE(describe(c));
    AttInputs in = att_inputs(c, seed);
    check_attention_forward(c, in);
    Vec qd = to_d(in.q), kd = to_d(in.k), vd = to_d(in.v), r = to_d(in.dout);

    // "=" outputs: NaN beforehand must not survive.
    FVec dq(in.q.size(), NAN), dk(in.k.size(), NAN), dv(in.v.size(), NAN);
    fn(dq.data(), dk.data(), dv.data(), in.dout.data(), in.q.data(), in.k.data(), in.v.data(),
       c.n_q, c.n_kv, c.n_heads, c.n_kv_heads, c.head_dim, c.causal, c.q_pos0, c.window, c.scale);

    AttBounds b = attention_bounds(c, qd, kd, vd, r);
    Fd gq = fd_grad([&](const Vec &x) { return attention_ref(c, x, kd, vd); }, qd, r);
    Fd gk = fd_grad([&](const Vec &x) { return attention_ref(c, qd, x, vd); }, kd, r);
    Fd gv = fd_grad([&](const Vec &x) { return attention_ref(c, qd, kd, x); }, vd, r);
    for (size_t e = 0; e < dq.size(); e++)
        check.add(dq[e], gq.grad[e], b.dq[e] + gq.allow[e], (int64_t)e);
    for (size_t e = 0; e < dk.size(); e++)
        check.add(dk[e], gk.grad[e], b.dk[e] + gk.allow[e], (int64_t)e);
    for (size_t e = 0; e < dv.size(); e++)
        check.add(dv[e], gv.grad[e], b.dv[e] + gv.allow[e], (int64_t)e);
}

std::vector<AttCase> small_attention_cases() {
    return {
        // n_q, n_kv, heads, kv_heads, hd, causal, q_pos0, window, scale
        {5, 5, 2, 2, 6, true, 0, 0, 0.4f},      // GQA group 1, plain causal
        {4, 9, 4, 2, 10, true, 5, 0, 0.3f},     // group 2, queries continuing a cache
        {6, 11, 4, 1, 6, true, 5, 3, 0.5f},     // group 4, sliding window
        {3, 7, 2, 1, 5, false, 0, 0, 0.45f},    // bidirectional cross attention, n_q != n_kv
        {7, 3, 4, 4, 3, false, 9, 2, 1.0f},     // bidirectional ignores q_pos0 and window
        {4, 4, 2, 1, 6, true, 3, 2, 0.4f},      // queries 2, 3 see no key: zero gradient
        {3, 6, 4, 2, 7, true, 2, 1, 0.4f},      // window 1: one key each
        {2, 5, 2, 1, 10, true, 3, 0, 2.5f},     // peaked softmax (large scores)
        {1, 1, 1, 1, 1, true, 0, 0, 0.7f},      // one key, P = 1: dq = dk = 0
    };
}

TEST(BackwardAttention, MatchesFiniteDifferences) {
    BoundCheck check("attention_backward");
    uint64_t seed = 5000;
    for (const AttCase &c : small_attention_cases())
        run_attention_fd(check, c, sf_cpu_attention_backward, seed++);
    EXPECT_TRUE(check.ok());
    check.record();
}

TEST(BackwardAttention, ScratchFreeFallbackMatchesFiniteDifferences) {
    BoundCheck check("attention_backward_fallback");
    uint64_t seed = 5000;
    for (const AttCase &c : small_attention_cases())
        run_attention_fd(check, c, sf_cpu_attention_backward_by_kv_head, seed++);
    EXPECT_TRUE(check.ok());
    check.record();
}

// Directional derivative on shapes too big for full FD: more than one 64-key chunk, several
// 16-key blocks, windows cutting through blocks. For a random direction (Q, K, V),
// d/dt L(q + tQ, k + tK, v + tV) at t = 0 by central differences must equal
// <dq, Q> + <dk, K> + <dv, V>, within sum |Q| bound_dq + ... (the elementwise bounds above).
void run_attention_directional(BoundCheck &check, const AttCase &c, AttBackwardFn fn,
                               uint64_t seed) {
    SCOPED_TRACE(describe(c));
    AttInputs in = att_inputs(c, seed);
    check_attention_forward(c, in);
    Rng rng(seed + 77);
    Vec qd = to_d(in.q), kd = to_d(in.k), vd = to_d(in.v), r = to_d(in.dout);
    Vec Q = to_d(rng.uniform_vec(qd.size())), K = to_d(rng.uniform_vec(kd.size()));
    Vec V = to_d(rng.uniform_vec(vd.size()));

    FVec dq(in.q.size(), NAN), dk(in.k.size(), NAN), dv(in.v.size(), NAN);
    fn(dq.data(), dk.data(), dv.data(), in.dout.data(), in.q.data(), in.k.data(), in.v.data(),
       c.n_q, c.n_kv, c.n_heads, c.n_kv_heads, c.head_dim, c.causal, c.q_pos0, c.window, c.scale);

    auto along = [&](const Vec &t) {
        Vec a = qd, bk = kd, bv = vd;
        for (size_t e = 0; e < a.size(); e++) a[e] += t[0] * Q[e];
        for (size_t e = 0; e < bk.size(); e++) bk[e] += t[0] * K[e];
        for (size_t e = 0; e < bv.size(); e++) bv[e] += t[0] * V[e];
        return attention_ref(c, a, bk, bv);
    };
    Fd g = fd_grad(along, Vec{0.0}, r);

    AttBounds b = attention_bounds(c, qd, kd, vd, r);
    double got = 0.0, bound = g.allow[0];
    for (size_t e = 0; e < dq.size(); e++) {
        got += dq[e] * Q[e];
        bound += b.dq[e] * std::fabs(Q[e]);
    }
    for (size_t e = 0; e < dk.size(); e++) {
        got += dk[e] * K[e] + dv[e] * V[e];
        bound += b.dk[e] * std::fabs(K[e]) + b.dv[e] * std::fabs(V[e]);
    }
    check.add(got, g.grad[0], bound, 0);
}

TEST(BackwardAttention, DirectionalDerivativeOnLargerShapes) {
    BoundCheck check("attention_backward_directional");
    const AttCase cases[] = {
        {70, 150, 4, 2, 10, true, 80, 0, 0.3f},   // causal, keys across three chunks
        {70, 150, 4, 1, 6, true, 80, 37, 0.4f},   // window not aligned to the 16-key blocks
        {20, 130, 4, 4, 8, false, 0, 0, 0.35f},   // bidirectional cross attention
        {33, 33, 9, 3, 16, true, 0, 0, 0.25f},    // SmolLM2's 9/3 head ratio, prefill
    };
    uint64_t seed = 6000;
    for (const AttCase &c : cases) {
        run_attention_directional(check, c, sf_cpu_attention_backward, seed);
        run_attention_directional(check, c, sf_cpu_attention_backward_by_kv_head, seed++);
    }
    EXPECT_TRUE(check.ok());
    check.record();
}

// Both paths agree to within the bound on a larger case too (elementwise, against each other:
// each is within its bound of the truth, so they are within twice of each other).
TEST(BackwardAttention, PathsAgreeElementwise) {
    const AttCase c{50, 90, 8, 2, 12, true, 40, 60, 0.3f};
    AttInputs in = att_inputs(c, 7000);
    FVec a[3], b[3];
    for (FVec *set : {a, b}) {
        set[0].assign(in.q.size(), NAN);
        set[1].assign(in.k.size(), NAN);
        set[2].assign(in.v.size(), NAN);
    }
    sf_cpu_attention_backward(a[0].data(), a[1].data(), a[2].data(), in.dout.data(), in.q.data(),
                              in.k.data(), in.v.data(), c.n_q, c.n_kv, c.n_heads, c.n_kv_heads,
                              c.head_dim, c.causal, c.q_pos0, c.window, c.scale);
    sf_cpu_attention_backward_by_kv_head(b[0].data(), b[1].data(), b[2].data(), in.dout.data(),
                                         in.q.data(), in.k.data(), in.v.data(), c.n_q, c.n_kv,
                                         c.n_heads, c.n_kv_heads, c.head_dim, c.causal, c.q_pos0,
                                         c.window, c.scale);
    AttBounds bd = attention_bounds(c, to_d(in.q), to_d(in.k), to_d(in.v), to_d(in.dout));
    const Vec *bounds[3] = {&bd.dq, &bd.dk, &bd.dv};
    BoundCheck check("attention_paths");
    for (int t = 0; t < 3; t++)
        for (size_t e = 0; e < a[t].size(); e++)
            check.add(a[t][e], b[t][e], 2.0 * (*bounds[t])[e], (int64_t)e);
    EXPECT_TRUE(check.ok());
}

// =============================================================================================
// Activations
// =============================================================================================

// Inputs spanning the saturated tails, the origin and values near it; relu's FD needs |x|
// well above the step, so its inputs avoid (-1e-3, 1e-3) and the kink is checked on its own.
FVec activation_input(Rng &rng, int64_t n) {
    FVec x = rng.uniform_vec(n, -4.0f, 4.0f);
    const float special[] = {-800.0f, -50.0f, -12.0f, -6.0f, -1e-3f, 0.0f, 1e-3f, 6.0f, 50.0f};
    for (size_t i = 0; i < sizeof special / sizeof *special && i < (size_t)n; i++)
        x[i] = special[i];
    return x;
}

Vec swiglu_ref(const Vec &g, const Vec &u) {
    Vec y(g.size());
    for (size_t i = 0; i < g.size(); i++) y[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    return y;
}
Vec gelu_ref(const Vec &x) {
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = 0.5 * x[i] * std::erfc(-x[i] / std::sqrt(2.0));
    return y;
}
Vec relu_ref(const Vec &x) {
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); i++) y[i] = x[i] < 0.0 ? 0.0 : x[i];
    return y;
}

// Bounds: each derivative is formed in double (exp, erfc within a few ulps, a handful of
// products) and rounded once: u32 |g| + gamma64(16) times the magnitude of its terms
// (swiglu: |d u| (sig + sig |g| (1 - sig)) and |d g sig|; gelu: |d| (Phi + |x| phi)). The
// forwards likewise are double rounded once: u32 + gamma64(16) of |out|.
TEST(BackwardActivations, SwigluMatchesFiniteDifferences) {
    BoundCheck check("swiglu_backward");
    BoundCheck fwd("swiglu_forward");
    const int64_t n = 41;
    Rng rng(8000);
    FVec g = activation_input(rng, n), u = rng.uniform_vec(n, -2.0f, 2.0f);
    FVec d = rng.uniform_vec(n);
    Vec gd = to_d(g), ud = to_d(u), r = to_d(d);
    FVec y(n);
    sf_cpu_swiglu(y.data(), g.data(), u.data(), n);
    Vec y_ref = swiglu_ref(gd, ud), y_mag(n);
    for (int64_t i = 0; i < n; i++) y_mag[i] = std::fabs(y_ref[i]);
    expect_forward_match(fwd, y, y_ref, y_mag, kU32 + gamma64(16));

    Fd fg = fd_grad([&](const Vec &x) { return swiglu_ref(x, ud); }, gd, r);
    Fd fu = fd_grad([&](const Vec &x) { return swiglu_ref(gd, x); }, ud, r);
    // Plain, then dgate aliasing dout, then dup aliasing dout: all must agree bit for bit.
    FVec dg(n, NAN), du(n, NAN);
    sf_cpu_swiglu_backward(dg.data(), du.data(), d.data(), g.data(), u.data(), n);
    FVec a1 = d, du1(n, NAN);
    sf_cpu_swiglu_backward(a1.data(), du1.data(), a1.data(), g.data(), u.data(), n);
    FVec a2 = d, dg2(n, NAN);
    sf_cpu_swiglu_backward(dg2.data(), a2.data(), a2.data(), g.data(), u.data(), n);
    EXPECT_EQ(0, std::memcmp(a1.data(), dg.data(), n * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(du1.data(), du.data(), n * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(dg2.data(), dg.data(), n * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(a2.data(), du.data(), n * sizeof(float)));
    for (int64_t i = 0; i < n; i++) {
        double sig = 1.0 / (1.0 + std::exp(-gd[i]));
        double mg = std::fabs(r[i] * ud[i]) * (sig + sig * std::fabs(gd[i]) * (1.0 - sig));
        double mu = std::fabs(r[i] * gd[i] * sig);
        check.add(dg[i], fg.grad[i],
                  kU32 * std::fabs(fg.grad[i]) + gamma64(16) * mg + fg.allow[i] + kUnderflow, i);
        check.add(du[i], fu.grad[i],
                  kU32 * std::fabs(fu.grad[i]) + gamma64(16) * mu + fu.allow[i] + kUnderflow, i);
    }
    EXPECT_TRUE(fwd.ok());
    EXPECT_TRUE(check.ok());
    check.record();
}

TEST(BackwardActivations, GeluMatchesFiniteDifferences) {
    BoundCheck check("gelu_backward");
    BoundCheck fwd("gelu_forward");
    const int64_t n = 41;
    Rng rng(8100);
    FVec x = activation_input(rng, n), d = rng.uniform_vec(n);
    Vec xd = to_d(x), r = to_d(d);
    FVec y(n);
    sf_cpu_gelu(y.data(), x.data(), n);
    Vec y_ref = gelu_ref(xd), y_mag(n);
    for (int64_t i = 0; i < n; i++) y_mag[i] = std::fabs(y_ref[i]);
    expect_forward_match(fwd, y, y_ref, y_mag, kU32 + gamma64(16));

    Fd fx = fd_grad(gelu_ref, xd, r);
    FVec dx(n, NAN);
    sf_cpu_gelu_backward(dx.data(), d.data(), x.data(), n);
    FVec al = d;
    sf_cpu_gelu_backward(al.data(), al.data(), x.data(), n);
    EXPECT_EQ(0, std::memcmp(al.data(), dx.data(), n * sizeof(float)));
    for (int64_t i = 0; i < n; i++) {
        double Phi = 0.5 * std::erfc(-xd[i] / std::sqrt(2.0));
        double phi = std::exp(-0.5 * xd[i] * xd[i]) / std::sqrt(2.0 * M_PI);
        double mag = std::fabs(r[i]) * (Phi + std::fabs(xd[i]) * phi);
        check.add(dx[i], fx.grad[i],
                  kU32 * std::fabs(fx.grad[i]) + gamma64(16) * mag + fx.allow[i] + kUnderflow, i);
    }
    EXPECT_TRUE(fwd.ok());
    EXPECT_TRUE(check.ok());
    check.record();
}

// relu's gradient is exact (dy or 0), away from the kink; at it, torch's convention: x <= 0
// gives 0 (x = 0 and -0 included), NaN passes dy through.
TEST(BackwardActivations, ReluMatchesFiniteDifferencesAndTorchAtTheKink) {
    const int64_t n = 41;
    Rng rng(8200);
    FVec x = activation_input(rng, n), d = rng.uniform_vec(n);
    for (float &v : x)
        if (std::fabs(v) < 1e-3f) v = v < 0.0f ? -2e-3f : 2e-3f;
    Vec xd = to_d(x), r = to_d(d);
    FVec y(n);
    sf_cpu_relu(y.data(), x.data(), n);
    Vec y_ref = relu_ref(xd);
    for (int64_t i = 0; i < n; i++) EXPECT_EQ((double)y[i], y_ref[i]);
    Fd fx = fd_grad(relu_ref, xd, r);
    FVec dx(n, NAN), al = d;
    sf_cpu_relu_backward(dx.data(), d.data(), x.data(), n);
    sf_cpu_relu_backward(al.data(), al.data(), x.data(), n);
    EXPECT_EQ(0, std::memcmp(al.data(), dx.data(), n * sizeof(float)));
    for (int64_t i = 0; i < n; i++) EXPECT_NEAR(dx[i], fx.grad[i], fx.allow[i]) << i;

    const float kink_x[] = {0.0f, -0.0f, NAN, -1e-30f, 1e-30f};
    const float kink_dy[] = {2.0f, 2.0f, 3.0f, 4.0f, 5.0f};
    FVec kd(5);
    sf_cpu_relu_backward(kd.data(), kink_dy, kink_x, 5);
    EXPECT_EQ(kd[0], 0.0f);
    EXPECT_EQ(kd[1], 0.0f);
    EXPECT_EQ(kd[2], 3.0f);
    EXPECT_EQ(kd[3], 0.0f);
    EXPECT_EQ(kd[4], 5.0f);
}

// =============================================================================================
// Cross-entropy
// =============================================================================================

// The weighted loss of every row; their sum is the op's return value.
Vec ce_rows_ref(const Vec &logits, const std::vector<int32_t> &t, const Vec &w, int64_t rows,
                int32_t vocab) {
    Vec loss(rows, 0.0);
    for (int64_t r = 0; r < rows; r++) {
        if (w[r] == 0.0) continue;
        const double *x = logits.data() + r * vocab;
        double m = *std::max_element(x, x + vocab), s = 0.0;
        for (int32_t i = 0; i < vocab; i++) s += std::exp(x[i] - m);
        loss[r] = w[r] * (m + std::log(s) - x[t[r]]);
    }
    return loss;
}

// Bounds. The loss: double sums of vocab exponentials and rows terms, gamma64(2 vocab + rows +
// 8) of sum_r |w_r| (|max| + log sum + |x_t|). dlogits: each p - onehot formed in double and
// rounded once: u32 |g| + gamma64(vocab + 8) |w_r| (p + onehot).
// FD of a row's loss moves it by ~p h, below its double ulp for the tiny probabilities of a row
// offset by 1000: the FD then reads 0 and only bounds such elements by its rounding allowance,
// 64 u64 / h of the row loss's magnitude. So dlogits is also held against the analytic double
// gradient w_r (p - onehot) with the tight bound alone, which resolves those tiny values.
void run_cross_entropy(BoundCheck &check, BoundCheck &exact, int64_t rows, int32_t vocab,
                       bool weighted, bool alias, uint64_t seed) {
    SCOPED_TRACE("rows=" + std::to_string(rows) + " vocab=" + std::to_string(vocab));
    Rng rng(seed);
    FVec logits = rng.uniform_vec(rows * vocab, -6.0f, 6.0f);
    // A row offset far from 0 (the maximum must be subtracted) and a peaked row.
    if (rows > 1)
        for (int32_t i = 0; i < vocab; i++) logits[vocab + i] += 1000.0f;
    if (rows > 2) logits[2 * vocab + 1] = 40.0f;
    std::vector<int32_t> t(rows);
    for (int64_t r = 0; r < rows; r++) t[r] = (int32_t)rng.below(vocab);
    FVec w(rows, 1.0f);
    if (weighted) {
        w = rng.uniform_vec(rows, 0.1f, 2.0f);
        w[rows - 1] = 0.0f; // masked row
    }
    Vec ld = to_d(logits), wd = to_d(w);

    FVec dl(rows * vocab, NAN);
    FVec buf = logits;
    float *dl_p = alias ? buf.data() : dl.data();
    double loss = sf_cpu_cross_entropy(dl_p, buf.data(), t.data(), weighted ? w.data() : nullptr,
                                       rows, vocab);
    if (alias) dl = buf;
    double loss_none = sf_cpu_cross_entropy(nullptr, logits.data(), t.data(),
                                            weighted ? w.data() : nullptr, rows, vocab);
    EXPECT_EQ(loss, loss_none);

    Vec row_loss = ce_rows_ref(ld, t, wd, rows, vocab), row_mag(rows);
    double want = 0.0, lmag = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const double *x = ld.data() + r * vocab;
        double m = *std::max_element(x, x + vocab);
        want += row_loss[r];
        row_mag[r] =
            std::fabs(wd[r]) * (std::fabs(m) + std::log((double)vocab) + std::fabs(x[t[r]]));
        lmag += row_mag[r];
    }
    check.add(loss, want, gamma64(2.0 * vocab + rows + 8) * lmag, -1);

    Fd g = fd_grad([&](const Vec &x) { return ce_rows_ref(x, t, wd, rows, vocab); }, ld,
                   Vec(rows, 1.0));
    for (int64_t r = 0; r < rows; r++) {
        const double *x = ld.data() + r * vocab;
        double m = *std::max_element(x, x + vocab), s = 0.0;
        for (int32_t i = 0; i < vocab; i++) s += std::exp(x[i] - m);
        for (int32_t i = 0; i < vocab; i++) {
            int64_t e = r * vocab + i;
            double onehot = i == t[r] ? 1.0 : 0.0, p = std::exp(x[i] - m) / s;
            double tight = gamma64(vocab + 8) * std::fabs(wd[r]) * (p + onehot) + kUnderflow;
            double analytic = wd[r] * (p - onehot);
            check.add(dl[e], g.grad[e],
                      kU32 * std::fabs(g.grad[e]) + tight + g.allow[e] +
                          64.0 * kU64 / 0x1p-17 * row_mag[r],
                      e);
            exact.add(dl[e], analytic, kU32 * std::fabs(analytic) + tight, e);
        }
    }
}

TEST(BackwardCrossEntropy, MatchesFiniteDifferences) {
    BoundCheck check("cross_entropy");
    BoundCheck exact("cross_entropy_analytic");
    run_cross_entropy(check, exact, 1, 1, false, false, 9000); // one class: loss 0, gradient 0
    run_cross_entropy(check, exact, 4, 37, false, false, 9001);
    run_cross_entropy(check, exact, 5, 64, true, false, 9002);
    run_cross_entropy(check, exact, 3, 129, true, true, 9003);  // dlogits written over logits
    run_cross_entropy(check, exact, 6, 11, false, true, 9004);
    EXPECT_TRUE(check.ok());
    EXPECT_TRUE(exact.ok());
    check.record();
    exact.record();
}

// A masked row (weight 0) contributes nothing even when its loss would be infinite.
TEST(BackwardCrossEntropy, ZeroWeightMasksAnInfiniteLoss) {
    const float logits[] = {0.0f, -INFINITY, 1.0f, 2.0f};
    const int32_t targets[] = {1, 0};
    const float weights[] = {0.0f, 1.0f};
    float dl[4];
    double loss = sf_cpu_cross_entropy(dl, logits, targets, weights, 2, 2);
    double want = std::log(std::exp(1.0) + std::exp(2.0)) - 1.0;
    EXPECT_NEAR(loss, want, 1e-15);
    EXPECT_EQ(dl[0], 0.0f);
    EXPECT_EQ(dl[1], 0.0f);
    EXPECT_NEAR(dl[2], 1.0 / (1.0 + std::exp(1.0)) - 1.0, 2 * kU32);
}

} // namespace
