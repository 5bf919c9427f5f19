// The CUDA backward kernels against their CPU twins: RMSNorm and LayerNorm (kernels/rmsnorm.cu,
// kernels/layernorm.cu vs sf_cpu_*norm_backward), RoPE (kernels/rope.cu vs
// sf_cpu_rope_backward), SwiGLU / GELU / ReLU and the bias gradient (kernels/activations.cu vs
// sf_cpu_*_backward and a double loop), the fused cross-entropy (kernels/loss.cu vs
// sf_cpu_cross_entropy and the CPU's argmax), and the cuBLASLt GEMM backward
// (host/cuda/gemm.c) against a double-precision loop. GPU tests skip without a device
// (bench/device_check.sh runs them on a lent GPU); the argument tests run everywhere and never
// touch CUDA.
//
// Tolerances are derived per element next to each test, from these facts:
// - u = 2^-24, the fp32 unit roundoff; one ulp is at most 2u relative. CUDA's expf, rsqrtf and
//   sincosf are within 2 ulp (4u), logf within 1 ulp (2u), erfcf within 4 ulp (8u) (CUDA C
//   Programming Guide, "Mathematical functions", default flags: no fast math).
// - The CPU twins compute in double and round to fp32 once: u |ref| (2u |ref| is charged, which
//   also covers the GPU's own last rounding where the derivation does not list it).
// - A bf16 output is the fp32 value rounded to nearest: at most 2^-8 of it (the worst case,
//   just above a power of two) plus 2^-134 in the subnormal range (kBf16Floor covers it).
// - bf16 activations and weights are exact in fp32; products of two bf16 values are exact.
// - Reductions: the norms' row kernels give each thread at most 16 values in sequence and join
//   at most 1024 threads in a tree of depth 10, so a term passes through at most 26 roundings.
//   The column sums (norm dw and db, the bias gradient) run each of 16 row lanes over every
//   16th row in order, then add the lanes in order and the old value: ceil(rows / 16) + 16
//   roundings (column_path).
// A first-order bound's coefficients are summed in each derivation and rounded up (to 96u, 32u,
// ...): the margin is for the second-order products of errors the first-order sum leaves out,
// never for a wrong element, a missing term, a wrong sign or a second bf16 rounding, each of
// which costs far more. NaN never passes (outputs start as NaN: DeviceBuffer poisons them).
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "activations.h"
#include "cpu/ops.h"
#include "cuda/gemm.h"
#include "cuda_test_util.h"
#include "loss.h"
#include "norms.h"
#include "rope.h"
#include "test_util.h"

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

constexpr double kU = 0x1p-24;           // fp32 unit roundoff
constexpr double kBf16Round = 0x1p-8;    // bf16 rounding to nearest, relative, worst case
constexpr double kBf16Floor = 0x1p-133;  // bf16 subnormal rounding and fp32 underflow
constexpr double kF32Floor = 0x1p-148;   // fp32 underflow on the GPU and on the CPU side

template <typename T>
std::vector<T> download(const T *d, size_t n) {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
}
template <typename T>
void upload(T *d, const std::vector<T> &v) {
    EXPECT_EQ(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
}
#define SF_EXPECT_SYNC() ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess)

uint32_t bits(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

std::vector<float> normal(Rng &rng, size_t n, float sigma) {
    std::vector<float> v = rng.normal_vec(n);
    for (float &x : v) x *= sigma;
    return v;
}

// An output of either type, read back as fp32 (bf16 values are exact in fp32).
std::vector<float> download_out(const void *d, size_t n, bool bf16) {
    if (bf16) return from_bf16(download(static_cast<const uint16_t *>(d), n));
    return download(static_cast<const float *>(d), n);
}

// The bound of an fp32 value within tol of ref, after the output's own rounding.
double out_tol(double ref, double tol, bool bf16) {
    return bf16 ? tol + kBf16Round * (std::fabs(ref) + tol) + kBf16Floor : tol;
}

// Roundings a term of a column sum passes through (see the top of the file).
double column_path(int64_t rows) { return (double)((rows + 15) / 16 + 16); }

// =============================================================================================
// RMSNorm and LayerNorm backward
// =============================================================================================

struct NormSpec {
    bool layer = false;
    int64_t rows = 1, dim = 64;
    int threads_per_row = 0;  // 0: the launcher's choice
    int shift = 0;            // elements every device pointer is moved by (0 keeps 16 bytes)
    bool want_dx = true, want_dw = true, want_db = true;  // db: LayerNorm only
    bool accumulate = false;                              // dx += instead of =
    bool in_place = false;                                // dx is dy
    float eps = 1e-5f;
};

std::string describe(const NormSpec &s) {
    std::ostringstream o;
    o << (s.layer ? "layernorm" : "rmsnorm") << " backward rows=" << s.rows << " dim=" << s.dim
      << " threads_per_row=" << s.threads_per_row << " shift=" << s.shift
      << (s.want_dx ? " dx" : "") << (s.want_dw ? " dw" : "") << (s.layer && s.want_db ? " db" : "")
      << (s.accumulate ? " accumulate" : "") << (s.in_place ? " in-place" : "");
    return o.str();
}

// bf16 x whose rows cycle through scales 1, 1/64, 24 and offsets 0, 3, 0, 256 scales (means
// large against the spread, as in test_cuda_norms.cpp); bf16 w around 1; fp32 dy, and fp32
// starting values for the accumulated gradients.
struct NormData {
    std::vector<float> x, w, dy, dx0, dw0, db0;
};

NormData make_norm_data(int64_t rows, int64_t dim, uint64_t seed) {
    Rng rng(seed);
    static const float kScales[3] = {1.0f, 1.0f / 64.0f, 24.0f};
    static const float kOffsets[4] = {0.0f, 3.0f, 0.0f, 256.0f};
    NormData d;
    d.x.resize(rows * dim);
    for (int64_t r = 0; r < rows; r++) {
        const float scale = kScales[r % 3], offset = kOffsets[r % 4] * scale;
        for (int64_t i = 0; i < dim; i++) d.x[r * dim + i] = offset + scale * rng.normal();
    }
    d.x = bf16_round(d.x);
    d.w = normal(rng, dim, 0.5f);
    for (float &v : d.w) v += 1.0f;
    d.w = bf16_round(d.w);
    d.dy = normal(rng, rows * dim, 1.0f);
    d.dx0 = normal(rng, rows * dim, 1.0f);
    d.dw0 = normal(rng, dim, 1.0f);
    d.db0 = normal(rng, dim, 1.0f);
    return d;
}

// Bounds for one case; grad_dx is the CPU twin's dx (the gradient alone), ref_dw and ref_db
// its dw and db (start values included).
//
// RMSNorm, per row, r = (mean(x^2) + eps)^-1/2, g = dy w, c = r^3 / dim * sum(g x):
//   r: the sum of squares (exact squares, non-negative) 26u, the division and eps 2u, halved by
//      the square root, rsqrtf 4u: 18u relative.
//   sum(g x): g rounded (u), then 26 roundings of a mixed-sign sum: 27u * A, A = sum |g x|.
//   c: r^3 (3 * 18u + 2u), the division and product (2u): 58u relative, plus r^3 / dim * 27u A.
//   dx = r g - x c: 18u + u (g) + u (product) on r g; 58u + u on x c; the difference u.
//     |dx - ref| <= 96u (|r g| + |x| (|c| + r^3 A / dim)) + 2u |ref|      (coefficients <= 60u)
//   dw[j] += sum_rows dy x r: r (18u) and the product (u) per term, then column_path roundings:
//     |dw - ref| <= (column_path + 32)u * sum_rows |dy x r| + 2u |ref|
//
// LayerNorm, per row, d = x - mean, rstd = (var + eps)^-1/2, g = dy w, k2 = rstd^2 sum(g d)/dim,
// m1 = mean |x|, G1 = sum |g|, GD = sum |g d|:
//   mean: 26u m1 (mixed-sign sum) + u (division): |dmean| <= 27u m1; d then also carries u |d|.
//   rstd: the variance's first-order error from dmean vanishes (sum d = 0); its own sum 26u,
//      the rounded d (2u on d^2), division and eps 2u, halved, rsqrtf 4u: 19u relative.
//   sum(g): 27u G1; sum(g d): dmean G1 + 28u GD.
//   k2: 2 * 19u + 3u = 41u relative, plus rstd^2 / dim (dmean G1 + 28u GD).
//   dx = rstd (g - sum(g)/dim - d k2): the three terms carry u + 2u, 27u G1 / dim + 3u and
//      43u + 2u; rstd adds 20u to all; d's own error adds dmean |k2|:
//     |dx - ref| <= 96u rstd (|g| + G1/dim + |d k2| + m1 |k2| + |d| rstd^2/dim (m1 G1 + GD))
//                   + 2u |ref|                                        (coefficients <= 65u)
//   dw[j] += sum_rows dy d rstd: per term dmean rstd |dy| (27u m1) and 21u |dy d rstd|, then
//     column_path:  |dw - ref| <= (column_path + 32)u sum_rows |dy| rstd (|d| + m1) + 2u |ref|
//   db[j] += sum_rows dy:  |db - ref| <= (column_path + 2)u sum_rows |dy| + 2u |ref|
struct NormBounds {
    std::vector<double> dx, dw, db;
};

NormBounds norm_bounds(const NormSpec &s, const NormData &d, const std::vector<float> &grad_dx,
                       const std::vector<float> &ref_dw, const std::vector<float> &ref_db) {
    const int64_t rows = s.rows, dim = s.dim;
    const double path = column_path(rows);
    NormBounds b;
    b.dx.assign(rows * dim, 0.0);
    std::vector<double> sw(dim, 0.0), sb(dim, 0.0);
    for (int64_t r = 0; r < rows; r++) {
        const float *x = &d.x[r * dim], *dy = &d.dy[r * dim];
        if (!s.layer) {
            double ss = 0, A = 0, dot = 0;
            for (int64_t i = 0; i < dim; i++) {
                const double g = (double)dy[i] * d.w[i];
                ss += (double)x[i] * x[i];
                A += std::fabs(g * x[i]);
                dot += g * x[i];
            }
            const double rr = 1.0 / std::sqrt(ss / dim + s.eps), r3 = rr * rr * rr;
            const double c = r3 * dot / dim;
            for (int64_t i = 0; i < dim; i++) {
                const double g = (double)dy[i] * d.w[i];
                b.dx[r * dim + i] =
                    96 * kU *
                        (std::fabs(rr * g) + std::fabs(x[i]) * (std::fabs(c) + r3 * A / dim)) +
                    2 * kU * std::fabs(grad_dx[r * dim + i]);
                sw[i] += std::fabs((double)dy[i] * x[i] * rr);
            }
            continue;
        }
        double mean = 0, m1 = 0, var = 0;
        for (int64_t i = 0; i < dim; i++) {
            mean += x[i];
            m1 += std::fabs((double)x[i]);
        }
        mean /= dim;
        m1 /= dim;
        for (int64_t i = 0; i < dim; i++) var += ((double)x[i] - mean) * ((double)x[i] - mean);
        const double rstd = 1.0 / std::sqrt(var / dim + s.eps);
        double G1 = 0, GD = 0, sgd = 0;
        for (int64_t i = 0; i < dim; i++) {
            const double g = (double)dy[i] * d.w[i], dd = (double)x[i] - mean;
            G1 += std::fabs(g);
            GD += std::fabs(g * dd);
            sgd += g * dd;
        }
        const double k2 = rstd * rstd * sgd / dim;
        for (int64_t i = 0; i < dim; i++) {
            const double g = (double)dy[i] * d.w[i], dd = (double)x[i] - mean;
            const double terms = std::fabs(g) + G1 / dim + std::fabs(dd * k2) + m1 * std::fabs(k2) +
                                 std::fabs(dd) * rstd * rstd / dim * (m1 * G1 + GD);
            b.dx[r * dim + i] = 96 * kU * rstd * terms + 2 * kU * std::fabs(grad_dx[r * dim + i]);
            sw[i] += std::fabs((double)dy[i]) * rstd * (std::fabs(dd) + m1);
            sb[i] += std::fabs((double)dy[i]);
        }
    }
    b.dw.resize(dim);
    b.db.resize(dim);
    for (int64_t i = 0; i < dim; i++) {
        b.dw[i] = (path + 32) * kU * sw[i] + 2 * kU * std::fabs(ref_dw[i]);
        b.db[i] = (path + 2) * kU * sb[i] + 2 * kU * std::fabs(ref_db[i]);
    }
    return b;
}

void expect_within(const char *what, const std::vector<float> &got, const std::vector<float> &ref,
                   const std::vector<double> &tol) {
    BoundCheck check(what);
    for (size_t i = 0; i < ref.size(); i++) check.add(got[i], ref[i], tol[i], (int64_t)i);
    EXPECT_TRUE(check.ok());
}

sf_status norm_launch(const NormSpec &s, float *dx, float *dw, float *db, const float *dy,
                      const sf_bf16 *x, const sf_bf16 *w, void *ws, size_t ws_bytes) {
    if (s.layer) {
        return sf_cuda_layernorm_backward_variant(dx, s.accumulate, dw, db, dy, x, w, s.rows, s.dim,
                                                  s.eps, ws, ws_bytes, s.threads_per_row, nullptr);
    }
    return sf_cuda_rmsnorm_backward_variant(dx, s.accumulate, dw, dy, x, w, s.rows, s.dim, s.eps,
                                            ws, ws_bytes, s.threads_per_row, nullptr);
}

// Runs one case on the GPU and checks dx, dw, db against the CPU twin; then runs it again and
// requires the same bits (the column sums have a fixed order).
void check_norm(const NormSpec &s, uint64_t seed) {
    SCOPED_TRACE(describe(s));
    const int64_t n = s.rows * s.dim, k = s.shift;
    const NormData d = make_norm_data(s.rows, s.dim, seed);
    const bool want_db = s.layer && s.want_db;

    std::vector<float> grad(n), ref_dw = d.dw0, ref_db = d.db0;
    if (s.layer) {
        sf_cpu_layernorm_backward(grad.data(), ref_dw.data(), ref_db.data(), d.dy.data(),
                                  d.x.data(), d.w.data(), s.rows, s.dim, s.eps);
    } else {
        sf_cpu_rmsnorm_backward(grad.data(), ref_dw.data(), d.dy.data(), d.x.data(), d.w.data(),
                                s.rows, s.dim, s.eps);
    }
    NormBounds b = norm_bounds(s, d, grad, ref_dw, ref_db);
    // Accumulating: dx = start + gradient, the start being dx0, or dy itself when dx is dy. The
    // GPU's addition and the reference's rounding of the double sum add u |ref| each.
    std::vector<float> ref_dx = grad;
    if (s.accumulate) {
        const std::vector<float> &start = s.in_place ? d.dy : d.dx0;
        for (int64_t i = 0; i < n; i++) {
            ref_dx[i] = (float)((double)start[i] + grad[i]);
            b.dx[i] += 2 * kU * std::fabs(ref_dx[i]);
        }
    }

    // Device buffers, each with k leading elements so that buffer + k sets the alignment.
    auto with_shift = [k](const std::vector<float> &v) {
        std::vector<float> out(k, 0.0f);
        out.insert(out.end(), v.begin(), v.end());
        return out;
    };
    auto bf16_with_shift = [k](const std::vector<float> &v) {
        std::vector<uint16_t> out(k, 0);
        const std::vector<uint16_t> bb = to_bf16(v);
        out.insert(out.end(), bb.begin(), bb.end());
        return out;
    };
    DeviceBuffer<uint16_t> d_x(bf16_with_shift(d.x)), d_w(bf16_with_shift(d.w));
    DeviceBuffer<float> d_dy(with_shift(d.dy)), d_dx(n + k), d_dw(with_shift(d.dw0)),
        d_db(with_shift(d.db0));
    const size_t ws_bytes = sf_cuda_norm_backward_workspace_bytes(s.rows);
    DeviceBuffer<double> d_ws(ws_bytes / 8 + 1);
    ASSERT_TRUE(d_x.get() && d_w.get() && d_dy.get() && d_dx.get() && d_dw.get() && d_db.get() &&
                d_ws.get());
    if (s.accumulate) upload(d_dx.get() + k, d.dx0);
    float *dx = !s.want_dx ? nullptr : s.in_place ? d_dy.get() + k : d_dx.get() + k;

    auto run = [&]() {
        return norm_launch(s, dx, s.want_dw ? d_dw.get() + k : nullptr,
                           want_db ? d_db.get() + k : nullptr, d_dy.get() + k, d_x.get() + k,
                           d_w.get() + k, d_ws.get(), ws_bytes);
    };
    ASSERT_EQ(run(), SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    std::vector<float> got_dx, got_dw, got_db;
    if (s.want_dx) {
        got_dx = download(dx, n);
        expect_within("dx", got_dx, ref_dx, b.dx);
    }
    if (s.want_dw) {
        got_dw = download(d_dw.get() + k, s.dim);
        expect_within("dw", got_dw, ref_dw, b.dw);
    }
    if (want_db) {
        got_db = download(d_db.get() + k, s.dim);
        expect_within("db", got_db, ref_db, b.db);
    }

    // Again from the same start: the same bits.
    if (s.want_dw) upload(d_dw.get() + k, d.dw0);
    if (want_db) upload(d_db.get() + k, d.db0);
    if (s.in_place) upload(d_dy.get() + k, d.dy);
    if (s.accumulate && !s.in_place) upload(d_dx.get() + k, d.dx0);
    ASSERT_EQ(run(), SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    if (s.want_dx) {
        EXPECT_TRUE(download(dx, n) == got_dx) << "dx differs on a second run";
    }
    if (s.want_dw) {
        EXPECT_TRUE(download(d_dw.get() + k, s.dim) == got_dw) << "dw differs";
    }
    if (want_db) {
        EXPECT_TRUE(download(d_db.get() + k, s.dim) == got_db) << "db differs";
    }
}

// Rows around the warp variant's 4 rows per block and the column kernel's 16 lanes; dims on
// the 128-bit path (64, 96, 576, 4096, 4104 = 513 chunks) and the scalar path (100, 1001).
const int64_t kNormRows[] = {1, 7, 65, 1000};
const int64_t kNormDims[] = {64, 96, 576, 4096, 4104, 100, 1001};

TEST(CudaBackward, RmsNorm) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 1;
    for (int64_t rows : kNormRows) {
        for (int64_t dim : kNormDims) {
            NormSpec s;
            s.rows = rows;
            s.dim = dim;
            s.accumulate = seed % 2 == 0;
            check_norm(s, seed++);
            if (HasFailure()) return;
        }
    }
}

TEST(CudaBackward, LayerNorm) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 101;
    for (int64_t rows : kNormRows) {
        for (int64_t dim : kNormDims) {
            NormSpec s;
            s.layer = true;
            s.rows = rows;
            s.dim = dim;
            s.accumulate = seed % 2 == 0;
            check_norm(s, seed++);
            if (HasFailure()) return;
        }
    }
}

// Every row-kernel instantiation: each threads_per_row on both paths, with the row filling
// every register chunk (16 values a thread), one access short of that, and mostly idle.
TEST(CudaBackward, NormEveryVariant) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 1001;
    for (bool layer : {false, true}) {
        for (int tpr : {32, 64, 128, 256, 512, 1024}) {
            const int64_t cap = 16 * (int64_t)tpr;
            std::vector<NormSpec> specs;
            for (int64_t dim : {cap, cap - 8, (int64_t)8}) {  // 128-bit path
                NormSpec s;
                s.dim = dim;
                specs.push_back(s);
            }
            for (int64_t dim : {cap, cap - 1, (int64_t)3}) {  // scalar path
                NormSpec s;
                s.dim = dim;
                if (dim % 8 == 0) s.shift = 1;  // misaligned: scalar all the same
                specs.push_back(s);
            }
            for (NormSpec s : specs) {
                if (s.dim > SF_CUDA_NORM_MAX_DIM) continue;
                s.layer = layer;
                s.rows = 5;
                s.threads_per_row = tpr;
                check_norm(s, seed++);
                if (HasFailure()) return;
            }
        }
    }
}

// The optional outputs one at a time, dx over dy (with and without weight gradients, and
// accumulating onto dy's old value), misaligned pointers, and the longest rows.
TEST(CudaBackward, NormOptionalOutputsInPlaceAndLongRows) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 2001;
    for (bool layer : {false, true}) {
        for (int64_t dim : {(int64_t)576, (int64_t)1001}) {
            NormSpec s;
            s.layer = layer;
            s.rows = 33;
            s.dim = dim;
            s.want_dw = s.want_db = false;  // dx only (the frozen LLM's norms)
            check_norm(s, seed++);
            s.want_dx = false;  // weight gradients only
            s.want_dw = s.want_db = true;
            check_norm(s, seed++);
            if (layer) {
                s.want_dw = false;  // db only
                check_norm(s, seed++);
                s.want_dw = true;
            }
            s.want_dx = true;
            s.in_place = true;  // dx over dy, column sums still from the original dy
            check_norm(s, seed++);
            s.want_dw = s.want_db = false;
            check_norm(s, seed++);
            s.accumulate = true;  // dx = dy + gradient
            check_norm(s, seed++);
        }
        NormSpec s;
        s.layer = layer;
        s.rows = 65;
        s.dim = 4096;
        s.shift = 1;  // 4-byte aligned fp32, 2-byte aligned bf16: the scalar path
        check_norm(s, seed++);
        for (int64_t dim : {(int64_t)SF_CUDA_NORM_MAX_DIM, (int64_t)SF_CUDA_NORM_MAX_DIM - 1}) {
            s.shift = 0;
            s.rows = 3;
            s.dim = dim;
            check_norm(s, seed++);
        }
        if (HasFailure()) return;
    }
}

// No rows: SF_OK and the accumulated weight gradients untouched.
TEST(CudaBackward, NormZeroRows) {
    SF_SKIP_WITHOUT_GPU();
    const std::vector<float> start = {1.0f, -2.0f, 3.0f, 0.5f, 7.0f, -1.0f, 2.0f, 4.0f};
    DeviceBuffer<float> d_dw(start), d_db(start), d_dy(8), d_dx(8);
    DeviceBuffer<uint16_t> d_x(8), d_w(8);
    DeviceBuffer<double> d_ws(1);
    ASSERT_TRUE(d_dw.get() && d_db.get() && d_dy.get() && d_dx.get() && d_x.get() && d_w.get());
    EXPECT_EQ(sf_cuda_rmsnorm_backward(d_dx.get(), false, d_dw.get(), d_dy.get(), d_x.get(),
                                       d_w.get(), 0, 8, 1e-5f, d_ws.get(), 8, nullptr),
              SF_OK);
    EXPECT_EQ(sf_cuda_layernorm_backward(d_dx.get(), false, d_dw.get(), d_db.get(), d_dy.get(),
                                         d_x.get(), d_w.get(), 0, 8, 1e-5f, d_ws.get(), 8, nullptr),
              SF_OK);
    SF_EXPECT_SYNC();
    EXPECT_EQ(d_dw.host(), start);
    EXPECT_EQ(d_db.host(), start);
}

// =============================================================================================
// RoPE backward
// =============================================================================================

using sf_test::rope_config;

// One output of a rotated pair (d0, d1) at position pos, frequency inv64 (the CPU's double
// table; the GPU's is its fp32 rounding):
//   angle: the GPU forms a = fl32(pos * fl32(inv)), so |da| <= |pos| |fl32(inv) - inv|
//          + u |a| (at pos 131071 and inv = 1 that is 7.8e-3 rad: the fp32 angle's own limit);
//   cos, sin: sincosf within 2 ulp (<= 2^-23 absolute, both <= 1); the scale product adds
//          2u, the rotation's product and sum 2u, each relative to s (|d0| + |d1|);
//   moving (c, s) by da along the circle and by e per component moves the output by at most
//          scale (|d0| + |d1|) (da + e):  B = scale (|d0| + |d1|) (da + 3 * 2^-23).
// fp32 output: |got - ref| <= B + 2u |ref| (the CPU's rounding); bf16: out_tol of that.
double rope_bound(double ref, double d0, double d1, double scale, double pos, double inv64,
                  bool bf16) {
    const float inv32 = (float)inv64;
    const float a32 = (float)pos * inv32;
    const double da = std::fabs(pos) * std::fabs((double)inv32 - inv64) + kU * std::fabs(a32);
    const double b = std::fabs(scale) * (std::fabs(d0) + std::fabs(d1)) * (da + 3 * 0x1p-23);
    return out_tol(ref, b + 2 * kU * std::fabs(ref) + kF32Floor, bf16);
}

struct RopeSpec {
    int32_t n_heads = 1;
    int64_t n = 1, pad = 0;  // pad: extra values per token, outside the rotated heads
    bool out_bf16 = false;
    bool in_place = false;    // fp32 only: dx is dy
    bool two_tables = false;  // sf_cuda_rope2_backward with longrope's short and long tables
};

void check_rope(const sf_llm_config &cfg, const RopeSpec &s, uint64_t seed) {
    SCOPED_TRACE(testing::Message()
                 << "head_dim " << cfg.head_dim << ", heads " << s.n_heads << ", n " << s.n
                 << ", pad " << s.pad << (s.out_bf16 ? ", bf16 dx" : ", fp32 dx")
                 << (s.in_place ? ", in place" : "") << (s.two_tables ? ", two tables" : ""));
    Rng rng(seed);
    const int32_t d = cfg.head_dim, half = d / 2;
    const int64_t n = s.n, packed = (int64_t)s.n_heads * d, stride = packed + s.pad;
    std::vector<int32_t> pos(n), table(n);
    for (int64_t t = 0; t < n; t++) {
        pos[t] = (int32_t)rng.below(8193);
        table[t] = s.two_tables ? (int32_t)rng.below(2) : 0;
    }
    pos[0] = 0;
    if (n > 1) pos[n - 1] = 8192;
    if (n > 5) pos[3] = 131071;  // sincosf's large-argument path
    // Table 0: the frequencies for short requests; table 1 (longrope only): for long ones.
    std::vector<double> inv64(2 * half);
    double scale[2] = {1.0, 1.0};
    sf_cpu_rope_freqs(&cfg, 8193, inv64.data(), &scale[0]);
    if (s.two_tables) {
        sf_cpu_rope_freqs(&cfg, 1, inv64.data(), &scale[0]);
        sf_cpu_rope_freqs(&cfg, cfg.rope.original_max_position_embeddings + 1, inv64.data() + half,
                          &scale[1]);
    }
    std::vector<float> inv32(2 * half);
    for (int32_t i = 0; i < 2 * half; i++) inv32[i] = (float)inv64[i];

    const std::vector<float> dy = normal(rng, (size_t)(n * stride), 1.0f);
    std::vector<float> want(n * packed);
    for (int64_t t = 0; t < n; t++) {
        std::copy(dy.begin() + t * stride, dy.begin() + t * stride + packed,
                  want.begin() + t * packed);
        const int tb = table[t];
        sf_cpu_rope_backward(want.data() + t * packed, &pos[t], 1, s.n_heads, d,
                             inv64.data() + tb * half, scale[tb]);
    }

    DeviceBuffer<float> d_dy(dy), d_dx((size_t)(n * stride));
    DeviceBuffer<int32_t> d_pos(pos), d_table(table);
    DeviceBuffer<float> d_inv(inv32);
    ASSERT_TRUE(d_dy.get() && d_dx.get() && d_pos.get() && d_table.get() && d_inv.get());
    void *dx = s.in_place ? (void *)d_dy.get() : (void *)d_dx.get();
    const sf_status st =
        s.two_tables ? sf_cuda_rope2_backward(dx, s.out_bf16, d_dy.get(), d_pos.get(),
                                              d_table.get(), n, s.n_heads, d, stride, d_inv.get(),
                                              (float)scale[0], (float)scale[1], nullptr)
                     : sf_cuda_rope_backward(dx, s.out_bf16, d_dy.get(), d_pos.get(), n, s.n_heads,
                                             d, stride, d_inv.get(), (float)scale[0], nullptr);
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> got = download_out(dx, (size_t)(n * stride), s.out_bf16);
    std::vector<uint32_t> raw(n * stride);  // the untouched values' bits
    if (s.out_bf16) {
        const std::vector<uint16_t> h = download((const uint16_t *)dx, (size_t)(n * stride));
        raw.assign(h.begin(), h.end());
    } else {
        for (size_t i = 0; i < raw.size(); i++) raw[i] = bits(got[i]);
    }

    BoundCheck check("rope backward");
    for (int64_t t = 0; t < n; t++) {
        const int tb = table[t];
        for (int32_t h = 0; h < s.n_heads; h++) {
            for (int32_t i = 0; i < d; i++) {
                const int64_t kp = t * packed + (int64_t)h * d, ks = t * stride + (int64_t)h * d;
                const int32_t j = i % half;
                const double b = rope_bound(want[kp + i], dy[ks + j], dy[ks + j + half], scale[tb],
                                            pos[t], inv64[tb * half + j], s.out_bf16);
                check.add(got[ks + i], want[kp + i], b, kp + i);
            }
        }
        // Values outside the heads: dy's when in place, else never written (poison bits).
        for (int64_t i = packed; i < stride; i++) {
            const uint32_t expect =
                s.in_place ? bits(dy[t * stride + i]) : (s.out_bf16 ? 0xffffu : 0xffffffffu);
            ASSERT_EQ(raw[t * stride + i], expect) << "pad of token " << t;
        }
    }
    EXPECT_TRUE(check.ok());
}

// Head dims 64 (default), 96 (longrope, with its attention factor and both tables), 128
// (Llama 3.1); 1, 7 and 65 tokens; packed rows (128-bit path) and rows inside a wider buffer
// (+ 4: the scalar path); fp32 out of place and in place, bf16 out of place.
TEST(CudaBackward, Rope) {
    SF_SKIP_WITHOUT_GPU();
    const sf_test::RopeConfigs rc;
    uint64_t seed = 300;
    for (const sf_llm_config *cfg : {&rc.c64, &rc.c96, &rc.c128}) {
        for (int32_t heads : {1, 8}) {
            for (int64_t n : {1, 7, 65}) {
                for (int64_t pad : {(int64_t)0, (int64_t)(4 * cfg->head_dim + 4)}) {
                    for (int mode = 0; mode < 3; mode++) {
                        RopeSpec s;
                        s.n_heads = heads;
                        s.n = n;
                        s.pad = pad;
                        s.out_bf16 = mode == 1;
                        s.in_place = mode == 2;
                        s.two_tables = cfg == &rc.c96 && n > 1;
                        check_rope(*cfg, s, seed++);
                        if (HasFailure()) return;
                    }
                }
            }
        }
    }
}

// An odd half (head_dim 6) takes the scalar path; 32 heads of 128 is Llama-3.1-8B's q.
TEST(CudaBackward, RopeOddHalfAndManyHeads) {
    SF_SKIP_WITHOUT_GPU();
    RopeSpec s;
    s.n_heads = 3;
    s.n = 7;
    check_rope(rope_config(SF_ROPE_DEFAULT, 6, 10000.0), s, 401);
    s.n_heads = 32;
    s.n = 65;
    s.out_bf16 = true;
    check_rope(rope_config(SF_ROPE_DEFAULT, 128, 500000.0), s, 402);
}

// =============================================================================================
// SwiGLU, GELU, ReLU and bias backward
// =============================================================================================

// SwiGLU. With e = expf(-|g|) (4u), 1 / (1 + e) within 4u (e's error is damped by e / (1 + e)
// <= 1/2: 2u, the sum u, the division u), sig and 1 - sig are one of that or e times it: 9u.
//   silu'(g) = sig (1 + g (1 - sig)): g (1 - sig) 10u; 1 + that adds u (1 + |g| (1 - sig))
//   (the sum may cancel near g = -1.28: the bound is on the terms, not the result); times sig
//   9u + u. So |d silu'| <= 21u sig (1 + |g| (1 - sig)), and dgate = dout up silu' adds 2u:
//     |dgate - ref| <= 32u |dout up| sig (1 + |g| (1 - sig)) + 2u |ref|      (coefficient 23u)
//   dup = dout (g sig): 9u + 2u:  |dup - ref| <= 16u |ref| + 2u |ref|          (coefficient 11u)
// For g below -87, e and sig are fp32 subnormals and the relative bounds fail: expf is then
// within 2 ulp = 2^-148 absolute, which silu' carries times 1 + |g|, dgate times |dout up| and
// dup times |dout g|; each subnormal product (at most 6, the CPU's rounding included) adds
// 2^-150 <= 2^-148 / 4: floor = 2^-148 (2 + |dout| (|up| (1 + |g|) + |g|)). bf16: out_tol.
void swiglu_bounds(double dout, double g, double up, double ref_dg, double ref_du, bool bf16,
                   double *tol_dg, double *tol_du) {
    const double sig = 1.0 / (1.0 + std::exp(-g)), om = 1.0 - sig;
    const double floor =
        kF32Floor * (2.0 + std::fabs(dout) * (std::fabs(up) * (1.0 + std::fabs(g)) + std::fabs(g)));
    *tol_dg = out_tol(ref_dg,
                      32 * kU * std::fabs(dout * up) * sig * (1.0 + std::fabs(g) * om) +
                          2 * kU * std::fabs(ref_dg) + floor,
                      bf16);
    *tol_du = out_tol(ref_du, 18 * kU * std::fabs(ref_du) + floor, bf16);
}

// Every element of the kernel's (dgate, dup) against the CPU's within swiglu_bounds.
void expect_swiglu_grads(const std::vector<float> &got_dg, const std::vector<float> &got_du,
                         const std::vector<float> &dout, const std::vector<float> &g,
                         const std::vector<float> &u, const std::vector<float> &ref_dg,
                         const std::vector<float> &ref_du, bool bf16, const char *du_name) {
    BoundCheck cg("dgate"), cu(du_name);
    for (size_t i = 0; i < g.size(); i++) {
        double tg, tu;
        swiglu_bounds(dout[i], g[i], u[i], ref_dg[i], ref_du[i], bf16, &tg, &tu);
        cg.add(got_dg[i], ref_dg[i], tg, (int64_t)i);
        cu.add(got_du[i], ref_du[i], tu, (int64_t)i);
    }
    EXPECT_TRUE(cg.ok());
    EXPECT_TRUE(cu.ok());
}

std::vector<float> swiglu_gates(Rng &rng, size_t n) {
    std::vector<float> v = bf16_round(normal(rng, n, 3.0f));
    const float tails[] = {-90.0f, -95.0f, -100.0f, 40.0f, -0.0f, 0.0f, -1.28125f, -20.0f};
    for (size_t i = 0; i < n && i < 8; i++) v[(i * 131) % n] = tails[i];
    return v;
}

TEST(CudaBackward, Swiglu) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(501);
    for (size_t n : {1, 7, 65, 1000, 4096 * 3 + 5, 14336 * 7}) {
        for (size_t offset : {0, 1}) {
            for (int mode = 0; mode < 3; mode++) {  // fp32, bf16, fp32 with dgate over dout
                const bool bf16 = mode == 1, in_place = mode == 2;
                SCOPED_TRACE(testing::Message()
                             << "n " << n << ", offset " << offset << ", mode " << mode);
                const std::vector<float> g = swiglu_gates(rng, n);
                const std::vector<float> u = bf16_round(normal(rng, n, 2.0f));
                const std::vector<float> dout = normal(rng, n, 1.0f);
                std::vector<float> ref_dg(n), ref_du(n);
                sf_cpu_swiglu_backward(ref_dg.data(), ref_du.data(), dout.data(), g.data(),
                                       u.data(), (int64_t)n);
                DeviceBuffer<uint16_t> d_g(n + 1), d_u(n + 1);
                DeviceBuffer<float> d_dout(n + 1), d_dg(n + 1), d_du(n + 1);
                ASSERT_TRUE(d_g.get() && d_u.get() && d_dout.get() && d_dg.get() && d_du.get());
                upload(d_g.get() + offset, to_bf16(g));
                upload(d_u.get() + offset, to_bf16(u));
                upload(d_dout.get() + offset, dout);
                void *dg = in_place ? (void *)(d_dout.get() + offset)
                           : bf16   ? (void *)((uint16_t *)d_dg.get() + offset)
                                    : (void *)(d_dg.get() + offset);
                void *du = bf16 ? (void *)((uint16_t *)d_du.get() + offset)
                                : (void *)(d_du.get() + offset);
                ASSERT_EQ(
                    sf_cuda_swiglu_backward(dg, du, bf16, d_dout.get() + offset, d_g.get() + offset,
                                            d_u.get() + offset, (int64_t)n, nullptr),
                    SF_OK)
                    << sf_last_error();
                SF_EXPECT_SYNC();
                const std::vector<float> got_dg = download_out(dg, n, bf16);
                const std::vector<float> got_du = download_out(du, n, bf16);
                expect_swiglu_grads(got_dg, got_du, dout, g, u, ref_dg, ref_du, bf16, "dup");
                if (HasFailure()) return;
            }
        }
    }
}

// Phi-3's fused layout: dgate_up [rows, 2 ff] from dout [rows, ff] and gate_up [rows, 2 ff].
TEST(CudaBackward, SwigluFused) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(502);
    for (int64_t rows : {1, 7, 65}) {
        for (int64_t ff : {1, 7, 96, 1000, 8192 + 3}) {
            for (bool bf16 : {false, true}) {
                SCOPED_TRACE(testing::Message()
                             << "rows " << rows << ", ff " << ff << (bf16 ? ", bf16" : ", fp32"));
                const std::vector<float> gu = swiglu_gates(rng, (size_t)(rows * 2 * ff));
                const std::vector<float> dout = normal(rng, (size_t)(rows * ff), 1.0f);
                std::vector<float> gate(rows * ff), up(rows * ff), ref_dg(rows * ff),
                    ref_du(rows * ff);
                for (int64_t r = 0; r < rows; r++) {
                    for (int64_t j = 0; j < ff; j++) {
                        gate[r * ff + j] = gu[r * 2 * ff + j];
                        up[r * ff + j] = gu[r * 2 * ff + ff + j];
                    }
                }
                sf_cpu_swiglu_backward(ref_dg.data(), ref_du.data(), dout.data(), gate.data(),
                                       up.data(), rows * ff);
                DeviceBuffer<uint16_t> d_gu(to_bf16(gu));
                DeviceBuffer<float> d_dout(dout), d_out((size_t)(rows * 2 * ff));
                ASSERT_TRUE(d_gu.get() && d_dout.get() && d_out.get());
                ASSERT_EQ(sf_cuda_swiglu_fused_backward(d_out.get(), bf16, d_dout.get(), d_gu.get(),
                                                        rows, ff, nullptr),
                          SF_OK)
                    << sf_last_error();
                SF_EXPECT_SYNC();
                const std::vector<float> got =
                    download_out(d_out.get(), (size_t)(rows * 2 * ff), bf16);
                BoundCheck check("dgate_up");
                for (int64_t r = 0; r < rows; r++) {
                    for (int64_t j = 0; j < ff; j++) {
                        const int64_t i = r * ff + j;
                        double tg, tu;
                        swiglu_bounds(dout[i], gate[i], up[i], ref_dg[i], ref_du[i], bf16, &tg,
                                      &tu);
                        check.add(got[r * 2 * ff + j], ref_dg[i], tg, r * 2 * ff + j);
                        check.add(got[r * 2 * ff + ff + j], ref_du[i], tu, r * 2 * ff + ff + j);
                    }
                }
                EXPECT_TRUE(check.ok());
                if (HasFailure()) return;
            }
        }
    }
}

// GELU. grad = A + B, A = 0.5 erfc(-x / sqrt 2) = Phi(x), B = x phi(x).
//   A: the argument y = -x fl(1/sqrt 2) carries 2u; erfc's condition number is below
//      2 y^2 + 2 for y > 0 (the left tail of x) and below 1 otherwise (test_cuda_elementwise's
//      derivation), erfcf 8u, the halving exact: (2 (2y^2 + 2) + 8)u = (2x^2 + 12)u relative.
//   B: x^2 exact (bf16 x), expf 4u, the constant's rounding and two products 3u: 7u relative.
//   grad's sum u, times dy u:  |dx - ref| <= |dy| ((2x^2 + 16)u A + 8u |B|) + 2u |ref|
// (the sum may cancel near x = -0.75; the bound is on the terms). Inputs reach |x| = 12.
TEST(CudaBackward, Gelu) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(601);
    for (size_t n : {1, 7, 65, 1000, 4096 * 3 + 5, 16384 * 7}) {
        for (size_t offset : {0, 1}) {
            for (int mode = 0; mode < 3; mode++) {  // fp32, bf16, fp32 over dy
                const bool bf16 = mode == 1, in_place = mode == 2;
                SCOPED_TRACE(testing::Message()
                             << "n " << n << ", offset " << offset << ", mode " << mode);
                std::vector<float> x = rng.uniform_vec(n, -12.0f, 12.0f);
                const float special[] = {0.0f, -0.0f, -0.75f, -12.0f, 12.0f, 1e-30f};
                for (size_t i = 0; i < n && i < 6; i++) x[(i * 37) % n] = special[i];
                x = bf16_round(x);
                const std::vector<float> dy = normal(rng, n, 1.0f);
                std::vector<float> ref(n);
                sf_cpu_gelu_backward(ref.data(), dy.data(), x.data(), (int64_t)n);
                DeviceBuffer<uint16_t> d_x(n + 1);
                DeviceBuffer<float> d_dy(n + 1), d_dx(n + 1);
                ASSERT_TRUE(d_x.get() && d_dy.get() && d_dx.get());
                upload(d_x.get() + offset, to_bf16(x));
                upload(d_dy.get() + offset, dy);
                void *dx = in_place ? (void *)(d_dy.get() + offset)
                           : bf16   ? (void *)((uint16_t *)d_dx.get() + offset)
                                    : (void *)(d_dx.get() + offset);
                ASSERT_EQ(sf_cuda_gelu_backward(dx, bf16, d_dy.get() + offset, d_x.get() + offset,
                                                (int64_t)n, nullptr),
                          SF_OK)
                    << sf_last_error();
                SF_EXPECT_SYNC();
                const std::vector<float> got = download_out(dx, n, bf16);
                BoundCheck check("gelu backward");
                for (size_t i = 0; i < n; i++) {
                    const double v = x[i];
                    const double A = 0.5 * std::erfc(-v / std::sqrt(2.0));
                    const double B = v * std::exp(-0.5 * v * v) * 0.39894228040143267794;
                    const double t =
                        std::fabs(dy[i]) * ((2 * v * v + 16) * kU * A + 8 * kU * std::fabs(B)) +
                        2 * kU * std::fabs(ref[i]) + kF32Floor;
                    check.add(got[i], ref[i], out_tol(ref[i], t, bf16), (int64_t)i);
                }
                EXPECT_TRUE(check.ok());
                if (HasFailure()) return;
            }
        }
    }
}

// ReLU is a selection: bit-exact against the CPU twin (and its bf16 rounding), including the
// kink at +-0 (gradient 0), negative subnormals, -inf and NaN x (which passes dy).
TEST(CudaBackward, Relu) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(701);
    for (size_t n : {1, 7, 65, 1000, 4096 * 3 + 5}) {
        for (size_t offset : {0, 1}) {
            for (int mode = 0; mode < 3; mode++) {
                const bool bf16 = mode == 1, in_place = mode == 2;
                SCOPED_TRACE(testing::Message()
                             << "n " << n << ", offset " << offset << ", mode " << mode);
                std::vector<uint16_t> xb = to_bf16(normal(rng, n, 1.0f));
                const uint16_t special[] = {0x0000, 0x8000, 0x8001, 0x0001,
                                            0xff80, 0x7f80, 0x7fc0, 0xffc1};
                for (size_t i = 0; i < n && i < 8; i++) xb[(i * 53) % n] = special[i];
                const std::vector<float> x = from_bf16(xb);
                const std::vector<float> dy = normal(rng, n, 1.0f);
                std::vector<float> ref(n);
                sf_cpu_relu_backward(ref.data(), dy.data(), x.data(), (int64_t)n);
                DeviceBuffer<uint16_t> d_x(n + 1);
                DeviceBuffer<float> d_dy(n + 1), d_dx(n + 1);
                ASSERT_TRUE(d_x.get() && d_dy.get() && d_dx.get());
                upload(d_x.get() + offset, xb);
                upload(d_dy.get() + offset, dy);
                void *dx = in_place ? (void *)(d_dy.get() + offset)
                           : bf16   ? (void *)((uint16_t *)d_dx.get() + offset)
                                    : (void *)(d_dx.get() + offset);
                ASSERT_EQ(sf_cuda_relu_backward(dx, bf16, d_dy.get() + offset, d_x.get() + offset,
                                                (int64_t)n, nullptr),
                          SF_OK)
                    << sf_last_error();
                SF_EXPECT_SYNC();
                int64_t bad = 0;
                if (bf16) {
                    const std::vector<uint16_t> got = download((const uint16_t *)dx, n);
                    for (size_t i = 0; i < n; i++) bad += got[i] != to_bf16(ref[i]);
                } else {
                    const std::vector<float> got = download((const float *)dx, n);
                    for (size_t i = 0; i < n; i++) bad += bits(got[i]) != bits(ref[i]);
                }
                EXPECT_EQ(bad, 0);
            }
        }
    }
}

// Column sums of dy [rows, ldy] over its first dim columns. Each term is an exact fp32 (or
// bf16) value, so the only error is the order: column_path roundings (one more to add to the
// old value):  |db - ref| <= (column_path + 1)u sum_rows |dy| + u |ref|.
void check_bias_backward(int64_t rows, int64_t dim, int64_t ldy, bool dy_bf16, bool accumulate,
                         uint64_t seed) {
    SCOPED_TRACE(testing::Message()
                 << "rows " << rows << ", dim " << dim << ", ldy " << ldy
                 << (dy_bf16 ? ", bf16 dy" : ", fp32 dy") << (accumulate ? ", accumulate" : ""));
    Rng rng(seed);
    std::vector<float> dy = normal(rng, (size_t)(rows * ldy), 1.0f);
    if (dy_bf16) dy = bf16_round(dy);
    const std::vector<float> db0 = normal(rng, (size_t)dim, 1.0f);
    std::vector<float> ref(dim);
    std::vector<double> tol(dim);
    for (int64_t j = 0; j < dim; j++) {
        double s = accumulate ? db0[j] : 0.0, a = 0.0;
        for (int64_t r = 0; r < rows; r++) {
            s += dy[r * ldy + j];
            a += std::fabs(dy[r * ldy + j]);
        }
        ref[j] = (float)s;
        tol[j] = (column_path(rows) + 1) * kU * (a + (accumulate ? std::fabs(db0[j]) : 0.0)) +
                 kU * std::fabs(s);
    }
    DeviceBuffer<float> d_db(db0), d_dy32(dy_bf16 ? 1 : dy.size() + 1);
    DeviceBuffer<uint16_t> d_dy16(dy_bf16 ? dy.size() + 1 : 1);
    ASSERT_TRUE(d_db.get() && d_dy32.get() && d_dy16.get());
    const void *d_dy = dy_bf16 ? (const void *)d_dy16.get() : (const void *)d_dy32.get();
    if (dy_bf16) {
        upload(d_dy16.get(), to_bf16(dy));
    } else {
        upload(d_dy32.get(), dy);
    }
    ASSERT_EQ(sf_cuda_bias_backward(d_db.get(), accumulate, d_dy, dy_bf16, ldy, rows, dim, nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> got = d_db.host();
    expect_within("db", got, ref, tol);
    // A fixed order: the same bits again.
    upload(d_db.get(), db0);
    ASSERT_EQ(sf_cuda_bias_backward(d_db.get(), accumulate, d_dy, dy_bf16, ldy, rows, dim, nullptr),
              SF_OK);
    SF_EXPECT_SYNC();
    EXPECT_TRUE(d_db.host() == got) << "db differs on a second run";
}

TEST(CudaBackward, BiasGradient) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 801;
    for (int64_t rows : {0, 1, 7, 65, 1000}) {
        for (int64_t dim : {1, 31, 33, 576, 4099}) {
            for (bool bf16 : {false, true}) {
                check_bias_backward(rows, dim, dim + (seed % 3 == 0 ? 5 : 0), bf16, seed % 2 == 0,
                                    seed);
                seed++;
                if (HasFailure()) return;
            }
        }
    }
}

// =============================================================================================
// Cross-entropy
// =============================================================================================

// Per row, with M the maximum, S = sum_i e^(z_i - M) and n_t = ceil(vocab / VEC / 512) the
// chunks a thread reads (VEC = 8 on the 128-bit path, else 1; 512 threads):
//   S: each term is expf of z_i - M (4u, plus u |z_i - M| from the rounded argument); a thread
//      adds its n_t VEC terms in sequence and rescales at most n_t times (expf and a product:
//      5u each); 9 butterfly levels each rescale both sides and add (6u). So
//        dS / S <= sum_i e^(z_i - M) (P + |z_i - M|) u / S,  P = n_t (VEC + 5) + 54 + 4.
//   loss = w ((M - z_t) + log S): M - z_t rounded (u |M - z_t|), logf 2u |log S|, dS / S, the
//      sum and the weight 2u |loss|:
//        |loss - ref| <= |w| (u |M - z_t| + 2u log S + dS / S) + 2u |ref|
//   dlogits_i = w (p_i - [i = t]), p_i = expf(z_i - M) * fl(1 / S): (4 + |z_i - M|)u, dS / S
//      and 2u for the reciprocal and product; the one-hot difference and the weight 2u:
//        |d - ref| <= |w| p_i ((6 + |z_i - M|)u + dS / S) + 2u |ref| + (2 |w| + 1) kF32Floor
//      where p is an fp32 subnormal (below 2^-126) the relative bounds fail: expf is then within
//      2 ulp = 2^-148 absolute, the product by 1 / S and by w round by 2^-150 each, and so does
//      the CPU's result; (2 |w| + 1) 2^-148 covers them. Then out_tol for a bf16 dlogits.
// A masked row (w = 0) is exactly 0 in both; correct[] is exact (the first maximum).
struct CeSpec {
    int64_t rows = 1;
    int32_t vocab = 8;
    bool logits_bf16 = false, dlogits_bf16 = false;
    bool in_place = false;
    int shift = 0;  // elements the logits and dlogits start into their buffers
};

// The bounds above for one unmasked row z [V] with target t and weight w: the loss's, and
// each dlogits entry's (into tol_d) for an fp32 or bf16 gradient. vec: the path the launcher
// takes (8 when V % 8 == 0 and the arrays are 16-byte aligned, else 1). -inf logits have
// p = 0 exactly on both sides: bound 0.
double ce_row_bounds(const float *z, int64_t V, int32_t t, double w, double ref_loss,
                     const float *ref_d, int vec, bool d_bf16, double *tol_d) {
    const double n_t = std::ceil((double)V / vec / 512.0);
    const double P = n_t * (vec + 5) + 58;
    double M = -INFINITY;
    for (int64_t i = 0; i < V; i++) M = std::max(M, (double)z[i]);
    double S = 0.0, E = 0.0;
    for (int64_t i = 0; i < V; i++) {
        if (z[i] == -INFINITY) continue;
        const double e = std::exp(z[i] - M);
        S += e;
        E += e * (P + (M - z[i]));
    }
    const double dS = E * kU / S;
    for (int64_t i = 0; tol_d && i < V; i++) {
        if (z[i] == -INFINITY) {
            tol_d[i] = 0.0;
            continue;
        }
        const double p = std::exp(z[i] - M) / S;
        const double b = std::fabs(w) * p * ((6 + (M - z[i])) * kU + dS) +
                         (2 * std::fabs(w) + 1) * kF32Floor + 2 * kU * std::fabs(ref_d[i]);
        tol_d[i] = out_tol(ref_d[i], b, d_bf16);
    }
    return std::fabs(w) * (kU * std::fabs(M - z[t]) + 2 * kU * std::log(S) + dS) +
           2 * kU * std::fabs(ref_loss);
}

void check_ce(const CeSpec &s, uint64_t seed) {
    SCOPED_TRACE(testing::Message() << "rows " << s.rows << ", vocab " << s.vocab
                                    << (s.logits_bf16 ? ", bf16 logits" : ", fp32 logits")
                                    << (s.dlogits_bf16 ? ", bf16 dlogits" : ", fp32 dlogits")
                                    << (s.in_place ? ", in place" : "") << ", shift " << s.shift);
    Rng rng(seed);
    const int64_t rows = s.rows, V = s.vocab, n = rows * V, k = s.shift;
    std::vector<float> z(n);
    static const float kSigma[3] = {1.0f, 4.0f, 10.0f};
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < V; i++) z[r * V + i] = kSigma[r % 3] * rng.normal();
    }
    if (rows > 2 && V > 3) {  // a tie for the maximum (the first wins) and two masked entries
        z[2 * V + 1] = z[2 * V + V - 1] = 40.0f;
        z[2 * V + 2] = -INFINITY;
        z[2 * V + 0] = -INFINITY;
    }
    if (s.logits_bf16) z = bf16_round(z);
    std::vector<int32_t> targets(rows);
    std::vector<float> weights(rows);
    for (int64_t r = 0; r < rows; r++) {
        targets[r] = (int32_t)rng.below(V);
        weights[r] = rng.uniform(0.1f, 2.0f);
        if (r % 5 == 4) {  // masked: weight 0 and an ignore index
            weights[r] = 0.0f;
            targets[r] = -100;
        }
    }
    if (rows > 2 && V > 3) targets[2] = 1;  // the tied maximum's first index: correct

    // References, one row at a time so that each row's loss stands alone.
    std::vector<float> ref_d(n);
    std::vector<double> ref_loss(rows), tol_loss(rows), tol_d(n);
    std::vector<int32_t> ref_correct(rows);
    const int vec = (V % 8 == 0 && k == 0) ? 8 : 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = &z[r * V];
        int64_t best = 0;
        for (int64_t i = 1; i < V; i++) {
            if (zr[i] > zr[best]) best = i;
        }
        ref_correct[r] = best == targets[r];
        const double w = weights[r];
        if (w == 0.0) {
            ref_loss[r] = 0.0;
            continue;  // ref_d stays 0; tolerances 0
        }
        ref_loss[r] =
            sf_cpu_cross_entropy(&ref_d[r * V], zr, &targets[r], &weights[r], 1, (int32_t)V);
        tol_loss[r] = ce_row_bounds(zr, V, targets[r], w, ref_loss[r], &ref_d[r * V], vec,
                                    s.dlogits_bf16, &tol_d[r * V]);
    }

    // Logits and dlogits k elements into their buffers; dlogits may be the logits.
    const size_t in_size = s.logits_bf16 ? 2 : 4, out_size = s.dlogits_bf16 ? 2 : 4;
    DeviceBuffer<uint8_t> d_in((n + k) * in_size), d_out((n + k) * out_size);
    DeviceBuffer<int32_t> d_t(targets), d_correct(rows);
    DeviceBuffer<float> d_w(weights), d_loss(rows);
    ASSERT_TRUE(d_in.get() && d_out.get() && d_t.get() && d_correct.get() && d_w.get() &&
                d_loss.get());
    void *in = d_in.get() + k * in_size;
    if (s.logits_bf16) {
        const std::vector<uint16_t> zb = to_bf16(z);
        ASSERT_EQ(cudaMemcpy(in, zb.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
    } else {
        ASSERT_EQ(cudaMemcpy(in, z.data(), n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
    void *out = s.in_place ? in : (void *)(d_out.get() + k * out_size);
    ASSERT_EQ(sf_cuda_cross_entropy(d_loss.get(), d_correct.get(), out, s.dlogits_bf16, in,
                                    s.logits_bf16, d_t.get(), d_w.get(), rows, (int32_t)V, nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> got_loss = d_loss.host();
    const std::vector<int32_t> got_correct = d_correct.host();
    const std::vector<float> got_d = download_out(out, (size_t)n, s.dlogits_bf16);
    BoundCheck cl("loss"), cd("dlogits");
    for (int64_t r = 0; r < rows; r++) {
        cl.add(got_loss[r], ref_loss[r], tol_loss[r], r);
        EXPECT_EQ(got_correct[r], ref_correct[r]) << "row " << r;
    }
    for (int64_t i = 0; i < n; i++) cd.add(got_d[i], ref_d[i], tol_d[i], i);
    EXPECT_TRUE(cl.ok());
    EXPECT_TRUE(cd.ok());
}

// Vocabularies: tiny, odd (scalar path), SmolLM2's 49152, Llama 3's 128256, Llama 2's 32000 and
// an odd 32003; fp32 and bf16 logits and gradients; in place; a shifted (misaligned) buffer.
TEST(CudaBackward, CrossEntropy) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 901;
    const struct {
        int64_t rows;
        int32_t vocab;
    } shapes[] = {{1, 1}, {7, 7}, {65, 1000}, {13, 32000}, {7, 32003}, {11, 49152}, {5, 128256}};
    for (const auto &sh : shapes) {
        for (int mode = 0; mode < 6; mode++) {
            CeSpec s;
            s.rows = sh.rows;
            s.vocab = sh.vocab;
            s.logits_bf16 = mode == 1 || mode == 3 || mode == 4;
            s.dlogits_bf16 = mode == 2 || mode == 3 || mode == 4;
            s.in_place = mode == 4 || mode == 5;  // bf16 over bf16, fp32 over fp32
            check_ce(s, seed++);
            if (HasFailure()) return;
        }
        CeSpec s;
        s.rows = sh.rows;
        s.vocab = sh.vocab;
        s.shift = 1;
        check_ce(s, seed++);
    }
}

// sf_cuda_logprobs against its CPU twins (sf_token_logprob, sf_top_logprobs: double, rounded
// once). The top n ids are exact (comparisons of the same fp32 logits): equal. Each
// log-probability is formed as the cross-entropy's loss with weight 1, by the same pass and
// combination, so the loss's bound above holds for it (ce_row_bounds with that token as the
// target), plus the twin's own rounding (half an ulp of the result). Rows: normal logits at
// three scales; one with a tie for the maximum (the lower id first), NaN and -inf entries
// (NaN never ranks; -inf ranks last, at log p = -inf); and, where the vocabulary is smaller
// than n, ids -1 with NaN past it. A NaN logit makes every log-probability of its row NaN on
// both sides (the sum of exponentials is NaN), while the ranking still leaves it out.
// Vocabularies on both paths (the 128-bit loads need V % 8 == 0 and an aligned row), and a
// shifted (misaligned) buffer.
void check_logprobs(int64_t rows, int32_t V, int n_top, int shift, uint64_t seed) {
    SCOPED_TRACE(testing::Message() << "rows " << rows << ", vocab " << V << ", n_top " << n_top
                                    << ", shift " << shift);
    Rng rng(seed);
    const int64_t n = rows * V;
    std::vector<float> z(n);
    static const float kSigma[3] = {1.0f, 4.0f, 10.0f};
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < V; i++) z[r * V + i] = kSigma[r % 3] * rng.normal();
    }
    if (rows > 1 && V > 6) {
        float *x = &z[1 * V];
        x[V - 1] = x[2] = 30.0f;  // a tie: id 2 first
        x[1] = -INFINITY;
        x[4] = -INFINITY;
    }
    if (rows > 2 && V > 6) z[2 * V + 3] = NAN;
    std::vector<int32_t> targets(rows);
    for (int64_t r = 0; r < rows; r++) targets[r] = (int32_t)rng.below(V);
    if (rows > 1 && V > 6) targets[1] = 4;  // a -inf logit: -log p = inf

    DeviceBuffer<float> d_z((size_t)(n + shift)), d_nll(rows);
    DeviceBuffer<int32_t> d_t(targets), d_ids((size_t)rows * std::max(n_top, 1));
    DeviceBuffer<float> d_lp((size_t)rows * std::max(n_top, 1));
    ASSERT_TRUE(d_z.get() && d_nll.get() && d_t.get() && d_ids.get() && d_lp.get());
    ASSERT_EQ(cudaMemcpy(d_z.get() + shift, z.data(), n * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(sf_cuda_logprobs(d_nll.get(), d_ids.get(), d_lp.get(), d_z.get() + shift,
                               d_t.get(), rows, V, n_top, nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> nll = d_nll.host(), lp = d_lp.host();
    const std::vector<int32_t> ids = d_ids.host();
    const int vec = (V % 8 == 0 && shift == 0) ? 8 : 1;
    auto bound = [&](const float *zr, int32_t t, double ref) {
        return ce_row_bounds(zr, V, t, 1.0, -ref, nullptr, vec, false, nullptr) +
               std::ldexp(std::fabs(ref), -24);
    };
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = &z[r * V];
        float want = 0.0f;
        ASSERT_EQ(sf_token_logprob(zr, V, targets[r], &want), SF_OK);
        if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(nll[r])) << "row " << r << ": " << nll[r];
        } else if (std::isinf(want)) {
            EXPECT_EQ(nll[r], INFINITY) << "row " << r;
        } else {
            EXPECT_NEAR(-nll[r], want, bound(zr, targets[r], want)) << "row " << r;
        }
        if (n_top == 0) continue;
        std::vector<int32_t> want_ids(n_top);
        std::vector<float> want_lp(n_top);
        ASSERT_EQ(sf_top_logprobs(zr, V, n_top, want_ids.data(), want_lp.data()), SF_OK);
        for (int j = 0; j < n_top; j++) {
            const size_t at = (size_t)r * n_top + j;
            ASSERT_EQ(ids[at], want_ids[j]) << "row " << r << ", rank " << j;
            if (want_ids[j] < 0 || std::isinf(want_lp[j]) || std::isnan(want_lp[j])) {
                EXPECT_TRUE(std::isnan(want_lp[j]) ? std::isnan(lp[at]) : lp[at] == want_lp[j])
                    << "row " << r << ", rank " << j << ": " << lp[at];
                continue;
            }
            EXPECT_NEAR(lp[at], want_lp[j], bound(zr, want_ids[j], want_lp[j]))
                << "row " << r << ", rank " << j;
        }
    }
}

TEST(CudaBackward, Logprobs) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 971;
    const struct {
        int64_t rows;
        int32_t vocab;
    } shapes[] = {{2, 7}, {3, 1000}, {2, 32003}, {3, 49152}, {2, 128256}};
    for (const auto &sh : shapes) {
        for (int n_top : {0, 1, 5, SF_MAX_TOP_LOGPROBS}) {
            check_logprobs(sh.rows, sh.vocab, n_top, 0, seed++);
            if (HasFailure()) return;
        }
        check_logprobs(sh.rows, sh.vocab, 3, 1, seed++);
    }
    // No nll wanted (targets not read); no rows.
    const std::vector<float> z = {0.0f, 1.0f, 2.0f, 3.0f};
    DeviceBuffer<float> d_z(z), d_lp(2);
    DeviceBuffer<int32_t> d_ids(2);
    ASSERT_EQ(sf_cuda_logprobs(nullptr, d_ids.get(), d_lp.get(), d_z.get(), nullptr, 1, 4, 2,
                               nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    EXPECT_EQ(d_ids.host(), (std::vector<int32_t>{3, 2}));
    EXPECT_EQ(sf_cuda_logprobs(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, 2, nullptr),
              SF_OK);
    // -0 and +0 are equal logits, so the lower id ranks first, as sf_top_logprobs ranks them
    // (their bits differ: a key made of the raw bits put +0 first). V = 8, an aligned row: the
    // 128-bit path; the rest of the row is below both.
    const std::vector<float> zeros = {-1.0f, -0.0f, 0.0f, -2.0f, -3.0f, -4.0f, -5.0f, -6.0f};
    std::vector<int32_t> want_ids(2);
    std::vector<float> want_lp(2);
    ASSERT_EQ(sf_top_logprobs(zeros.data(), 8, 2, want_ids.data(), want_lp.data()), SF_OK);
    ASSERT_EQ(want_ids, (std::vector<int32_t>{1, 2}));
    DeviceBuffer<float> d_zeros(zeros);
    ASSERT_EQ(sf_cuda_logprobs(nullptr, d_ids.get(), d_lp.get(), d_zeros.get(), nullptr, 1, 8, 2,
                               nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    EXPECT_EQ(d_ids.host(), want_ids);
}

// A NaN logit makes the row's loss and every gradient entry NaN, as on the CPU (its sum of
// exponentials is NaN), on both load paths, wherever the NaN sits: alone in the first chunk a
// thread reads (which the running statistics alone would drop), or beside finite values.
TEST(CudaBackward, CrossEntropyOfARowWithANaN) {
    SF_SKIP_WITHOUT_GPU();
    const int32_t V = 1000;
    Rng rng(961);
    for (int shift : {0, 1}) {
        for (int32_t at : {3, 517, 999}) {
            SCOPED_TRACE(testing::Message() << "shift " << shift << ", NaN at " << at);
            std::vector<float> z = normal(rng, V, 3.0f);
            z[at] = NAN;
            const int32_t target = 7;
            DeviceBuffer<float> d_z((size_t)V + shift), d_loss(1), d_d(V);
            DeviceBuffer<int32_t> d_t(std::vector<int32_t>{target});
            ASSERT_EQ(cudaMemcpy(d_z.get() + shift, z.data(), V * 4, cudaMemcpyHostToDevice),
                      cudaSuccess);
            ASSERT_EQ(sf_cuda_cross_entropy(d_loss.get(), nullptr, d_d.get(), false,
                                            d_z.get() + shift, false, d_t.get(), nullptr, 1, V,
                                            nullptr),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            std::vector<float> ref_d(V);
            EXPECT_TRUE(std::isnan(sf_cpu_cross_entropy(ref_d.data(), z.data(), &target, nullptr,
                                                        1, V)));
            EXPECT_TRUE(std::isnan(d_loss.host()[0]));
            const std::vector<float> d = d_d.host();
            EXPECT_EQ(std::count_if(d.begin(), d.end(), [](float x) { return std::isnan(x); }),
                      V);
            EXPECT_EQ(std::count_if(ref_d.begin(), ref_d.end(),
                                    [](float x) { return std::isnan(x); }),
                      V);
        }
    }
}

// Only some outputs wanted; a masked row's outputs are exact zeros; no rows is a no-op.
TEST(CudaBackward, CrossEntropyOptionalOutputs) {
    SF_SKIP_WITHOUT_GPU();
    const int64_t rows = 3;
    const int32_t V = 64;
    Rng rng(951);
    const std::vector<float> z = normal(rng, rows * V, 3.0f);
    const std::vector<int32_t> targets = {5, -100, 63};
    const std::vector<float> weights = {1.0f, 0.0f, 0.5f};
    DeviceBuffer<float> d_z(z), d_w(weights), d_loss(rows), d_d(rows * V);
    DeviceBuffer<int32_t> d_t(targets), d_c(rows);
    ASSERT_TRUE(d_z.get() && d_w.get() && d_loss.get() && d_d.get() && d_t.get() && d_c.get());
    // Loss only, without weights (all 1): row 1's target is out of range, so its loss is NaN.
    ASSERT_EQ(sf_cuda_cross_entropy(d_loss.get(), nullptr, nullptr, false, d_z.get(), false,
                                    d_t.get(), nullptr, rows, V, nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    std::vector<float> loss = d_loss.host();
    EXPECT_TRUE(std::isnan(loss[1]));
    for (int64_t r : {0, 2}) {
        const double ref = sf_cpu_cross_entropy(nullptr, &z[r * V], &targets[r], nullptr, 1, V);
        const double tol =
            ce_row_bounds(&z[r * V], V, targets[r], 1.0, ref, nullptr, 8, false, nullptr);
        EXPECT_LE(std::fabs(loss[r] - ref), tol) << "row " << r;
    }
    // Gradient only, with the weights: row 1 is exactly zero.
    ASSERT_EQ(sf_cuda_cross_entropy(nullptr, nullptr, d_d.get(), false, d_z.get(), false, d_t.get(),
                                    d_w.get(), rows, V, nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> d = d_d.host();
    for (int32_t i = 0; i < V; i++) EXPECT_EQ(bits(d[V + i]), 0u) << "masked row, col " << i;
    // Nothing to do.
    EXPECT_EQ(sf_cuda_cross_entropy(d_loss.get(), d_c.get(), d_d.get(), false, d_z.get(), false,
                                    d_t.get(), d_w.get(), 0, V, nullptr),
              SF_OK);
}

// =============================================================================================
// GEMM backward (cuBLASLt)
// =============================================================================================

// Against a double loop over the same bf16 values, with test_cuda_gemm.cpp's bound: for an
// output that sums K products (K = n for dx, m for dw), S = sum |products| (+ |old value| when
// accumulating), tensor-core sums charged 4u per term and per addition with two extra
// roundings (the beta = 1 add, a split-K combine): E = gamma_(4(K+2)) S; an fp32 output is
// within E, a bf16 one within E + 2^-8 (|ref| + E).
double gemm_bound(double ref, double S, int64_t K, bool bf16) {
    const double e = sf_test::gamma32(4.0 * (double)(K + 2)) * S;
    return bf16 ? e + kBf16Round * (std::fabs(ref) + e) : e;
}

class CudaBackwardGemm : public ::testing::Test {
  protected:
    void SetUp() override {
        SF_SKIP_WITHOUT_GPU();
        ASSERT_EQ(cudaMalloc(&ws_, SF_GEMM_WORKSPACE_BYTES), cudaSuccess);
        ASSERT_EQ(sf_gemm_cache_create(ws_, SF_GEMM_WORKSPACE_BYTES, &cache_), SF_OK)
            << sf_last_error();
    }
    void TearDown() override {
        sf_gemm_cache_free(cache_);
        cudaFree(ws_);
    }
    void *ws_ = nullptr;
    sf_gemm_cache *cache_ = nullptr;
};

struct GemmSpec {
    int64_t m = 1, n = 8, k = 8;
    int64_t dy_pad = 0;  // lddy = n + dy_pad
    int64_t x_pad = 0;   // ldx = k + x_pad
    int64_t dx_pad = 0;  // lddx = k + dx_pad
    int64_t shift = 0;   // elements dy, x, w and the outputs start into their buffers
    bool dx_f32 = true, accumulate = false, want_db = true;
};

std::string describe(const GemmSpec &s) {
    std::ostringstream o;
    o << "m=" << s.m << " n=" << s.n << " k=" << s.k << " lddy=" << s.n + s.dy_pad
      << " ldx=" << s.k + s.x_pad << " lddx=" << s.k + s.dx_pad << " shift=" << s.shift
      << (s.dx_f32 ? " fp32 dx" : " bf16 dx") << (s.accumulate ? " accumulate" : "")
      << (s.want_db ? " db" : "");
    return o.str();
}

// Host data: bf16-exact dy, x, w (uniform in [-1, 1]) in their strided layouts, and fp32 start
// values for the accumulated outputs.
struct GemmData {
    std::vector<float> dy, x, w, dx0, dw0, db0;
};

GemmData make_gemm_data(const GemmSpec &s, uint64_t seed) {
    Rng rng(seed);
    GemmData d;
    d.dy = bf16_round(rng.uniform_vec((size_t)(s.m * (s.n + s.dy_pad))));
    d.x = bf16_round(rng.uniform_vec((size_t)(s.m * (s.k + s.x_pad))));
    d.w = bf16_round(rng.uniform_vec((size_t)(s.n * s.k)));
    d.dx0 = bf16_round(rng.uniform_vec((size_t)(s.m * (s.k + s.dx_pad))));
    d.dw0 = rng.uniform_vec((size_t)(s.n * s.k));
    d.db0 = rng.uniform_vec((size_t)s.n);
    return d;
}

// A device copy of v (as bf16 or fp32) starting `shift` elements into its buffer.
struct Dev {
    Dev(const std::vector<float> &v, bool bf16, int64_t shift)
        : buf((v.size() + shift) * (bf16 ? 2 : 4) + 16), bf16_(bf16), shift_(shift) {
        if (!buf.get()) return;
        if (bf16) {
            const std::vector<uint16_t> b = to_bf16(v);
            cudaMemcpy(ptr(), b.data(), b.size() * 2, cudaMemcpyHostToDevice);
        } else {
            cudaMemcpy(ptr(), v.data(), v.size() * 4, cudaMemcpyHostToDevice);
        }
    }
    void *ptr() const { return buf.get() + shift_ * (bf16_ ? 2 : 4); }
    DeviceBuffer<uint8_t> buf;
    bool bf16_;
    int64_t shift_;
};

void check_gemm_dx(sf_gemm_cache *cache, const GemmSpec &s, uint64_t seed) {
    SCOPED_TRACE("dx " + describe(s));
    const GemmData d = make_gemm_data(s, seed);
    const int64_t lddy = s.n + s.dy_pad, lddx = s.k + s.dx_pad;
    const bool bf16 = !s.dx_f32;
    // Start: dx0 when accumulating, else NaN everywhere (the padding must keep its bits).
    std::vector<float> start = d.dx0;
    if (!s.accumulate) std::fill(start.begin(), start.end(), NAN);
    Dev dy(d.dy, true, s.shift), w(d.w, true, s.shift), dx(start, bf16, s.shift);
    ASSERT_TRUE(dy.buf.get() && w.buf.get() && dx.buf.get());
    sf_gemm_dx_args a;
    memset(&a, 0, sizeof a);
    a.dx = dx.ptr();
    a.lddx = lddx;
    a.dx_f32 = s.dx_f32;
    a.accumulate = s.accumulate;
    a.dy = (const sf_bf16 *)dy.ptr();
    a.lddy = lddy;
    a.w = (const sf_bf16 *)w.ptr();
    a.m = s.m;
    a.n = s.n;
    a.k = s.k;
    const sf_status st = sf_cuda_gemm_dx(cache, &a, nullptr);
    if (st == SF_ERR_UNSUPPORTED && s.shift % 8 != 0) {
        // As in test_cuda_gemm.cpp: cuBLASLt may offer nothing for 2-byte alignment.
        ::testing::Test::RecordProperty("gemm_dx_unaligned", sf_last_error());
        return;
    }
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> got = download_out(dx.ptr(), start.size(), bf16);
    BoundCheck check("dx");
    for (int64_t i = 0; i < s.m; i++) {
        for (int64_t l = 0; l < s.k; l++) {
            double ref = s.accumulate ? (double)start[i * lddx + l] : 0.0, S = std::fabs(ref);
            for (int64_t j = 0; j < s.n; j++) {
                const double p = (double)d.dy[i * lddy + j] * d.w[j * s.k + l];
                ref += p;
                S += std::fabs(p);
            }
            check.add(got[i * lddx + l], ref, gemm_bound(ref, S, s.n, bf16), i * lddx + l);
        }
        for (int64_t l = s.k; l < lddx; l++) {  // padding: never written
            ASSERT_TRUE(std::isnan(got[i * lddx + l]) || s.accumulate) << "padding written";
            if (s.accumulate) {
                ASSERT_EQ(bits(got[i * lddx + l]), bits(start[i * lddx + l]));
            }
        }
    }
    EXPECT_TRUE(check.ok());
}

void check_gemm_dw(sf_gemm_cache *cache, const GemmSpec &s, uint64_t seed) {
    SCOPED_TRACE("dw " + describe(s));
    const GemmData d = make_gemm_data(s, seed);
    const int64_t lddy = s.n + s.dy_pad, ldx = s.k + s.x_pad;
    std::vector<float> start_w = d.dw0, start_b = d.db0;
    if (!s.accumulate) {
        std::fill(start_w.begin(), start_w.end(), NAN);
        std::fill(start_b.begin(), start_b.end(), NAN);
    }
    Dev dy(d.dy, true, s.shift), x(d.x, true, s.shift), dw(start_w, false, s.shift),
        db(start_b, false, s.shift);
    ASSERT_TRUE(dy.buf.get() && x.buf.get() && dw.buf.get() && db.buf.get());
    sf_gemm_dw_args a;
    memset(&a, 0, sizeof a);
    a.dw = (float *)dw.ptr();
    a.db = s.want_db ? (float *)db.ptr() : nullptr;
    a.accumulate = s.accumulate;
    a.dy = (const sf_bf16 *)dy.ptr();
    a.lddy = lddy;
    a.x = (const sf_bf16 *)x.ptr();
    a.ldx = ldx;
    a.m = s.m;
    a.n = s.n;
    a.k = s.k;
    const sf_status st = sf_cuda_gemm_dw(cache, &a, nullptr);
    if (st == SF_ERR_UNSUPPORTED && s.shift % 8 != 0) {
        ::testing::Test::RecordProperty("gemm_dw_unaligned", sf_last_error());
        return;
    }
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> got_w = download((const float *)dw.ptr(), (size_t)(s.n * s.k));
    BoundCheck check("dw");
    for (int64_t j = 0; j < s.n; j++) {
        for (int64_t l = 0; l < s.k; l++) {
            double ref = s.accumulate ? (double)start_w[j * s.k + l] : 0.0, S = std::fabs(ref);
            for (int64_t i = 0; i < s.m; i++) {
                const double p = (double)d.dy[i * lddy + j] * d.x[i * ldx + l];
                ref += p;
                S += std::fabs(p);
            }
            check.add(got_w[j * s.k + l], ref, gemm_bound(ref, S, s.m, false), j * s.k + l);
        }
    }
    EXPECT_TRUE(check.ok());
    if (s.want_db) {
        // Column sums of exact values in a fixed order: (column_path + 1)u sum |dy| + u |ref|.
        const std::vector<float> got_b = download((const float *)db.ptr(), (size_t)s.n);
        BoundCheck cb("db");
        for (int64_t j = 0; j < s.n; j++) {
            double ref = s.accumulate ? (double)start_b[j] : 0.0, S = std::fabs(ref);
            for (int64_t i = 0; i < s.m; i++) {
                ref += d.dy[i * lddy + j];
                S += std::fabs(d.dy[i * lddy + j]);
            }
            cb.add(got_b[j], ref, (column_path(s.m) + 1) * kU * S + kU * std::fabs(ref), j);
        }
        EXPECT_TRUE(cb.ok());
    }
}

// Shapes: a single row, Sysformer-like (576 = SmolLM2's d), odd sizes on every side, k = 1.
const int64_t kGemmShapes[][3] = {{1, 8, 8},        {7, 96, 64},  {65, 576, 100},
                                  {257, 1000, 576}, {3, 1, 4099}, {33, 31, 1}};

TEST_F(CudaBackwardGemm, DxMatchesDoubleLoop) {
    uint64_t seed = 1101;
    for (const auto &sh : kGemmShapes) {
        for (int mode = 0; mode < 4; mode++) {
            GemmSpec s;
            s.m = sh[0];
            s.n = sh[1];
            s.k = sh[2];
            s.dx_f32 = mode % 2 == 0;
            s.accumulate = mode >= 2;
            check_gemm_dx(cache_, s, seed++);
            if (HasFailure()) return;
        }
    }
}

TEST_F(CudaBackwardGemm, DwAndDbMatchDoubleLoop) {
    uint64_t seed = 1201;
    for (const auto &sh : kGemmShapes) {
        for (int mode = 0; mode < 3; mode++) {
            GemmSpec s;
            s.m = sh[0];
            s.n = sh[1];
            s.k = sh[2];
            s.accumulate = mode >= 1;
            s.want_db = mode != 2;
            check_gemm_dw(cache_, s, seed++);
            if (HasFailure()) return;
        }
    }
}

// Row strides wider than the rows (column blocks of fused buffers) and pointers at 16-, 4- and
// 2-byte alignment (shift 8, 2, 1 elements).
TEST_F(CudaBackwardGemm, StridedAndMisaligned) {
    uint64_t seed = 1301;
    for (int64_t shift : {0, 8, 2, 1}) {
        GemmSpec s;
        s.m = 65;
        s.n = 576;
        s.k = 192;
        s.dy_pad = 3 * 576;  // dy as the q block of a [m, 4n] buffer
        s.x_pad = 8;
        s.dx_pad = 5;
        s.shift = shift;
        for (bool f32 : {true, false}) {
            s.dx_f32 = f32;
            check_gemm_dx(cache_, s, seed++);
        }
        check_gemm_dw(cache_, s, seed++);
        if (HasFailure()) return;
    }
}

// The forward, dx and dw products of one (m, n, k) share every size but not their layouts: the
// cache must keep them apart (its key has the operation and the transposes), including when
// they alternate, and a repeated call gives the same bits.
TEST_F(CudaBackwardGemm, CacheKeepsOperationsApart) {
    const int64_t m = 64, n = 64, k = 64;  // square: every layout has the same dimensions
    GemmSpec s;
    s.m = m;
    s.n = n;
    s.k = k;
    for (int round = 0; round < 2; round++) {
        // A forward product at the same shape in between.
        Rng rng(1401 + round);
        const std::vector<float> x = bf16_round(rng.uniform_vec(m * k));
        const std::vector<float> w = bf16_round(rng.uniform_vec(n * k));
        DeviceBuffer<uint16_t> d_x(to_bf16(x)), d_w(to_bf16(w));
        DeviceBuffer<float> d_y(m * n);
        ASSERT_TRUE(d_x.get() && d_w.get() && d_y.get());
        sf_gemm_args f;
        memset(&f, 0, sizeof f);
        f.y = d_y.get();
        f.ldy = n;
        f.y_f32 = true;
        f.x = d_x.get();
        f.ldx = k;
        f.w = d_w.get();
        f.m = m;
        f.n = n;
        f.k = k;
        ASSERT_EQ(sf_cuda_gemm(cache_, &f, nullptr), SF_OK) << sf_last_error();
        SF_EXPECT_SYNC();
        const std::vector<float> y = d_y.host();
        BoundCheck check("forward");
        for (int64_t i = 0; i < m; i++) {
            for (int64_t j = 0; j < n; j++) {
                double ref = 0, S = 0;
                for (int64_t l = 0; l < k; l++) {
                    ref += (double)x[i * k + l] * w[j * k + l];
                    S += std::fabs((double)x[i * k + l] * w[j * k + l]);
                }
                check.add(y[i * n + j], ref, gemm_bound(ref, S, k, false), i * n + j);
            }
        }
        EXPECT_TRUE(check.ok());
        check_gemm_dx(cache_, s, 1410 + round);
        check_gemm_dw(cache_, s, 1420 + round);
    }
}

TEST_F(CudaBackwardGemm, RepeatedCallsAreBitIdentical) {
    GemmSpec s;
    s.m = 257;
    s.n = 1000;
    s.k = 576;
    const GemmData d = make_gemm_data(s, 1501);
    DeviceBuffer<uint16_t> d_dy(to_bf16(d.dy)), d_x(to_bf16(d.x)), d_w(to_bf16(d.w));
    DeviceBuffer<float> d_dx(s.m * s.k), d_dw(s.n * s.k), d_db(s.n);
    ASSERT_TRUE(d_dy.get() && d_x.get() && d_w.get() && d_dx.get() && d_dw.get() && d_db.get());
    sf_gemm_dx_args a = {d_dx.get(), s.k, true, false, d_dy.get(), s.n, d_w.get(), s.m, s.n, s.k};
    sf_gemm_dw_args b = {d_dw.get(), d_db.get(), false, d_dy.get(), s.n,
                         d_x.get(),  s.k,        s.m,   s.n,        s.k};
    std::vector<float> first_dx, first_dw, first_db;
    for (int rep = 0; rep < 3; rep++) {
        ASSERT_EQ(sf_cuda_gemm_dx(cache_, &a, nullptr), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_cuda_gemm_dw(cache_, &b, nullptr), SF_OK) << sf_last_error();
        SF_EXPECT_SYNC();
        if (rep == 0) {
            first_dx = d_dx.host();
            first_dw = d_dw.host();
            first_db = d_db.host();
        } else {
            EXPECT_TRUE(d_dx.host() == first_dx) << "dx differs on call " << rep + 1;
            EXPECT_TRUE(d_dw.host() == first_dw) << "dw differs on call " << rep + 1;
            EXPECT_TRUE(d_db.host() == first_db) << "db differs on call " << rep + 1;
        }
    }
}

// Empty inner dimensions: dx = dy w with n = 0 is zeros (unchanged when accumulating); dw and
// db with m = 0 likewise; empty outputs are no-ops.
TEST_F(CudaBackwardGemm, EmptyInnerDimensions) {
    const int64_t m = 5, k = 7, n = 3;
    DeviceBuffer<float> d_dx(m * k), d_dw(n * k), d_db(n);
    DeviceBuffer<uint16_t> d_dy(8), d_w(8), d_x(8);
    ASSERT_TRUE(d_dx.get() && d_dw.get() && d_db.get() && d_dy.get() && d_w.get() && d_x.get());
    sf_gemm_dx_args a = {d_dx.get(), k, true, false, d_dy.get(), 1, d_w.get(), m, 0, k};
    ASSERT_EQ(sf_cuda_gemm_dx(cache_, &a, nullptr), SF_OK) << sf_last_error();
    sf_gemm_dw_args b = {d_dw.get(), d_db.get(), false, d_dy.get(), n, d_x.get(), k, 0, n, k};
    ASSERT_EQ(sf_cuda_gemm_dw(cache_, &b, nullptr), SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    for (float v : d_dx.host()) EXPECT_EQ(bits(v), 0u);
    for (float v : d_dw.host()) EXPECT_EQ(bits(v), 0u);
    for (float v : d_db.host()) EXPECT_EQ(bits(v), 0u);
    // Accumulating onto nothing leaves the values.
    const std::vector<float> ones(m * k, 1.0f);
    upload(d_dx.get(), ones);
    a.accumulate = true;
    ASSERT_EQ(sf_cuda_gemm_dx(cache_, &a, nullptr), SF_OK) << sf_last_error();
    SF_EXPECT_SYNC();
    EXPECT_EQ(d_dx.host(), ones);
}

// =============================================================================================
// Edge paths: inputs and paths the tests above do not reach (found by running these kernels on a
// CPU emulation of the SIMT model, where bugs planted in these paths went unnoticed by the
// tests above): dx over dy with accumulate and parameter gradients, degenerate norm rows,
// masked cross-entropy rows without `correct`, NaN / tied / -inf logits for the argmax, targets
// out of range, RoPE heads wider than a block, SwiGLU's dup over dout, more bias shapes. The
// bounds are the tests' own.
// =============================================================================================

// Norms: dx over dy with accumulate AND weight gradients (the 3-launch path accumulating onto
// dy's old value), on every threads_per_row and both paths, and rows around 4 and 16.
TEST(CudaBackwardEdges, NormInPlaceAccumulateWithParams) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 7001;
    for (bool layer : {false, true}) {
        for (int tpr : {0, 32, 64, 256, 1024}) {
            for (int64_t dim : {(int64_t)8, (int64_t)64, (int64_t)100, (int64_t)512, (int64_t)1001}) {
                if (dim > 16 * (tpr ? tpr : 1024)) continue;
                for (int64_t rows : {1, 5, 17}) {
                    NormSpec s;
                    s.layer = layer;
                    s.rows = rows;
                    s.dim = dim;
                    s.threads_per_row = tpr;
                    s.in_place = true;
                    s.accumulate = true;
                    check_norm(s, seed++);
                    if (HasFailure()) return;
                }
            }
        }
    }
}

// LayerNorm rows with no spread (var = 0: rstd = eps^-1/2) and huge offsets, and RMSNorm rows
// of tiny values: the statistics' extremes, against the CPU twin with the test's bounds.
TEST(CudaBackwardEdges, NormDegenerateRows) {
    SF_SKIP_WITHOUT_GPU();
    for (bool layer : {false, true}) {
        for (int64_t dim : {(int64_t)64, (int64_t)100}) {
            const int64_t rows = 4;
            NormSpec s;
            s.layer = layer;
            s.rows = rows;
            s.dim = dim;
            s.eps = 1e-5f;
            NormData d = make_norm_data(rows, dim, 88);
            for (int64_t i = 0; i < dim; i++) {
                d.x[0 * dim + i] = 3.0f;                                      // constant
                d.x[1 * dim + i] = 4096.0f + 32.0f * (float)(i % 3);  // offset, exact in bf16
                d.x[2 * dim + i] = from_bf16(to_bf16(1e-6f * (float)((i % 5) - 2)));
            }
            std::vector<float> grad(rows * dim), ref_dw = d.dw0, ref_db = d.db0;
            if (layer) {
                sf_cpu_layernorm_backward(grad.data(), ref_dw.data(), ref_db.data(), d.dy.data(),
                                          d.x.data(), d.w.data(), rows, dim, s.eps);
            } else {
                sf_cpu_rmsnorm_backward(grad.data(), ref_dw.data(), d.dy.data(), d.x.data(),
                                        d.w.data(), rows, dim, s.eps);
            }
            const NormBounds b = norm_bounds(s, d, grad, ref_dw, ref_db);
            DeviceBuffer<uint16_t> d_x(to_bf16(d.x)), d_w(to_bf16(d.w));
            DeviceBuffer<float> d_dy(d.dy), d_dx(rows * dim), d_dw(d.dw0), d_db(d.db0);
            const size_t ws_bytes = sf_cuda_norm_backward_workspace_bytes(rows);
            DeviceBuffer<double> d_ws(ws_bytes / 8 + 1);
            ASSERT_EQ(norm_launch(s, d_dx.get(), d_dw.get(), layer ? d_db.get() : nullptr,
                                  d_dy.get(), d_x.get(), d_w.get(), d_ws.get(), ws_bytes),
                      SF_OK);
            SF_EXPECT_SYNC();
            SCOPED_TRACE(describe(s) + " (degenerate rows)");
            expect_within("dx", d_dx.host(), grad, b.dx);
            expect_within("dw", d_dw.host(), ref_dw, b.dw);
            if (layer) expect_within("db", d_db.host(), ref_db, b.db);
        }
    }
}

// Cross-entropy paths the GPU test does not take. Reference: the CPU twin per row (weights
// != 0, target in range), else a double loop; the CPU's argmax loop for correct.
struct CeExtra {
    const char *name;
    int64_t rows;
    int32_t vocab;
    bool want_loss = true, want_correct = true, want_d = true, weights = true;
    bool in_bf16 = false, d_bf16 = false, in_place = false;
    int d_shift = 0;  // dlogits only moved (logits stay aligned)
};

void check_ce_extra(const CeExtra &c, std::vector<float> z, const std::vector<int32_t> &targets,
                    const std::vector<float> &weights) {
    SCOPED_TRACE(c.name);
    const int64_t rows = c.rows, V = c.vocab, n = rows * V;
    if (c.in_bf16) z = bf16_round(z);
    std::vector<float> ref_d(n, 0.0f);
    std::vector<double> ref_loss(rows, 0.0), tol_loss(rows, 0.0), tol_d(n, 0.0);
    std::vector<int32_t> ref_correct(rows);
    std::vector<char> loss_nan(rows, 0);
    const int vec = (V % 8 == 0 && c.d_shift == 0) ? 8 : 1;
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = &z[r * V];
        int64_t best = 0;
        for (int64_t i = 1; i < V; i++)
            if (zr[i] > zr[best]) best = i;
        ref_correct[r] = best == targets[r];
        const double w = c.weights ? weights[r] : 1.0;
        if (w == 0.0) continue;
        const int32_t t = targets[r];
        if (t >= 0 && t < V) {
            const float wf = (float)w;
            ref_loss[r] = sf_cpu_cross_entropy(&ref_d[r * V], zr, &t, &wf, 1, (int32_t)V);
            tol_loss[r] = ce_row_bounds(zr, V, t, w, ref_loss[r], &ref_d[r * V], vec, c.d_bf16,
                                        &tol_d[r * V]);
        } else {  // NaN loss; dlogits = w softmax, no one-hot term
            loss_nan[r] = 1;
            double M = -INFINITY, S = 0.0;
            for (int64_t i = 0; i < V; i++) M = std::max(M, (double)zr[i]);
            for (int64_t i = 0; i < V; i++) S += std::exp((double)zr[i] - M);
            for (int64_t i = 0; i < V; i++)
                ref_d[r * V + i] = (float)(w * std::exp((double)zr[i] - M) / S);
            ce_row_bounds(zr, V, 0, w, 0.0, &ref_d[r * V], vec, c.d_bf16, &tol_d[r * V]);
        }
    }
    const size_t in_size = c.in_bf16 ? 2 : 4, out_size = c.d_bf16 ? 2 : 4;
    DeviceBuffer<uint8_t> d_in(n * in_size), d_out((n + c.d_shift) * out_size);
    DeviceBuffer<int32_t> d_t(targets), d_correct(rows);
    DeviceBuffer<float> d_w(weights), d_loss(rows);
    if (c.in_bf16) {
        const std::vector<uint16_t> zb = to_bf16(z);
        upload((uint16_t *)d_in.get(), zb);
    } else {
        upload((float *)d_in.get(), z);
    }
    void *out = c.in_place ? (void *)d_in.get() : (void *)(d_out.get() + c.d_shift * out_size);
    ASSERT_EQ(sf_cuda_cross_entropy(c.want_loss ? d_loss.get() : nullptr,
                                    c.want_correct ? d_correct.get() : nullptr,
                                    c.want_d ? out : nullptr, c.d_bf16, d_in.get(), c.in_bf16,
                                    d_t.get(), c.weights ? d_w.get() : nullptr, rows, (int32_t)V,
                                    nullptr),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    if (c.want_loss) {
        const std::vector<float> got = d_loss.host();
        BoundCheck cl("loss");
        for (int64_t r = 0; r < rows; r++) {
            if (loss_nan[r]) {
                EXPECT_TRUE(std::isnan(got[r])) << "row " << r << ": target out of range, loss "
                                                << got[r];
            } else {
                cl.add(got[r], ref_loss[r], tol_loss[r], r);
            }
        }
        EXPECT_TRUE(cl.ok());
    } else {
        EXPECT_EQ(bits(d_loss.host()[0]), 0xffffffffu) << "loss written although not wanted";
    }
    if (c.want_correct) {
        const std::vector<int32_t> got = d_correct.host();
        for (int64_t r = 0; r < rows; r++) EXPECT_EQ(got[r], ref_correct[r]) << "correct, row " << r;
    } else {
        EXPECT_EQ(d_correct.host()[0], -1) << "correct written although not wanted";
    }
    if (c.want_d) {
        const std::vector<float> got = download_out(out, (size_t)n, c.d_bf16);
        BoundCheck cd("dlogits");
        for (int64_t i = 0; i < n; i++) {
            const int64_t r = i / V;
            const double w = c.weights ? weights[r] : 1.0;
            if (w == 0.0) {  // exactly +0
                const uint32_t b = c.d_bf16 ? (uint32_t)to_bf16(got[i]) : bits(got[i]);
                if (b != 0u) {
                    ADD_FAILURE() << "masked row " << r << " col " << i % V << ": " << got[i];
                    break;
                }
                continue;
            }
            cd.add(got[i], ref_d[i], tol_d[i], i);
        }
        EXPECT_TRUE(cd.ok());
    }
}

TEST(CudaBackwardEdges, CrossEntropyPaths) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(9101);
    auto make = [&](int64_t rows, int32_t V, float sigma) {
        std::vector<float> z(rows * V);
        for (float &v : z) v = sigma * rng.normal();
        return z;
    };
    // 1. Masked rows with correct NOT wanted: the early exit (zeros, no read of the logits).
    for (int32_t V : {64, 1000, 4099}) {
        for (bool d_bf16 : {false, true}) {
            const int64_t rows = 6;
            std::vector<float> z = make(rows, V, 3.0f);
            std::vector<int32_t> t(rows);
            std::vector<float> w(rows);
            for (int64_t r = 0; r < rows; r++) {
                t[r] = (int32_t)rng.below(V);
                w[r] = r % 2 ? 0.0f : 0.5f + (float)r;
            }
            t[1] = -100;
            t[3] = V + 5;
            CeExtra c{"masked rows, correct NULL", rows, V};
            c.want_correct = false;
            c.d_bf16 = d_bf16;
            check_ce_extra(c, z, t, w);
            c.name = "masked rows, correct NULL, in place";
            c.in_place = true;
            c.in_bf16 = d_bf16;
            check_ce_extra(c, z, t, w);
            c.name = "masked rows, correct NULL, loss NULL";
            c.in_place = false;
            c.want_loss = false;
            check_ce_extra(c, z, t, w);
        }
    }
    // 2. Targets out of range on rows with weight != 0: NaN loss, correct 0, w softmax.
    for (int32_t V : {8, 1000, 1001}) {
        const int64_t rows = 4;
        std::vector<float> z = make(rows, V, 2.0f);
        std::vector<int32_t> t = {-1, V, (int32_t)rng.below(V), INT32_MIN};
        std::vector<float> w = {1.0f, 0.25f, 2.0f, 1.5f};
        CeExtra c{"targets out of range", rows, V};
        check_ce_extra(c, z, t, w);
        c.name = "targets out of range, no weights";
        c.weights = false;
        check_ce_extra(c, z, t, w);
    }
    // 3. Argmax: NaN at index 0 (the CPU keeps 0), NaN elsewhere (ignored), all NaN (0), ties
    //    across warps and across lanes of the scalar path, a maximum at the very end.
    for (int32_t V : {40, 4096, 4097}) {
        const int64_t rows = 7;
        std::vector<float> z = make(rows, V, 1.0f);
        std::vector<int32_t> t(rows, 0);
        std::vector<float> w(rows, 1.0f);
        z[0 * V + 0] = NAN;                        // row 0: NaN first -> argmax 0
        z[1 * V + 5] = NAN;                        // row 1: NaN inside, max elsewhere
        z[1 * V + 9] = 50.0f;
        t[1] = 9;
        for (int32_t i = 0; i < V; i++) z[2 * V + i] = NAN;  // row 2: all NaN -> 0
        z[3 * V + V - 1] = 30.0f;                  // row 3: tie, first wins
        z[3 * V + V / 2 + 1] = 30.0f;
        t[3] = V / 2 + 1;
        z[4 * V + V - 1] = 30.0f;                  // row 4: tie, target the later one
        z[4 * V + 3] = 30.0f;
        t[4] = V - 1;
        z[5 * V + V - 1] = 99.0f;                  // row 5: max at the end
        t[5] = V - 1;
        for (int32_t i = 0; i < V; i++) z[6 * V + i] = -INFINITY;  // row 6: -inf but one
        z[6 * V + 17] = 1.0f;
        t[6] = 17;
        CeExtra c{"argmax cases, correct only", rows, V};
        c.want_loss = false;
        c.want_d = false;
        check_ce_extra(c, z, t, w);
        c.name = "argmax cases, correct only, bf16 logits";
        c.in_bf16 = true;
        check_ce_extra(c, z, t, w);
        // The rows without NaN, all outputs (row 6: the -inf entries' gradient is exactly 0).
        std::vector<float> z2(z.begin() + 3 * V, z.end());
        std::vector<int32_t> t2(t.begin() + 3, t.end());
        std::vector<float> w2(w.begin() + 3, w.end());
        CeExtra c2{"ties, max at the end, -inf rows: all outputs", rows - 3, V};
        check_ce_extra(c2, z2, t2, w2);
    }
    // 4. Only dlogits misaligned (logits aligned): the scalar path; bf16 and fp32.
    for (bool d_bf16 : {false, true}) {
        const int64_t rows = 3;
        const int32_t V = 1024;
        std::vector<float> z = make(rows, V, 4.0f);
        std::vector<int32_t> t = {1, 1023, 512};
        std::vector<float> w = {1.0f, 0.5f, 3.0f};
        CeExtra c{"dlogits misaligned", rows, V};
        c.d_shift = 1;
        c.d_bf16 = d_bf16;
        check_ce_extra(c, z, t, w);
    }
    // 5. Large logits (|z| ~ 1e4: exp(z - M) underflows for most of the row).
    {
        const int64_t rows = 2;
        const int32_t V = 2048;
        std::vector<float> z = make(rows, V, 1e4f);
        std::vector<int32_t> t = {3, 2047};
        std::vector<float> w = {1.0f, 1.0f};
        CeExtra c{"large logits", rows, V};
        check_ce_extra(c, z, t, w);
    }
}

// RoPE: head dims whose half exceeds the block (the cos/sin table loop strides), an odd half
// above the block, head_dim 2, and every token on the second table.
TEST(CudaBackwardEdges, RopeWideHeads) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 9301;
    for (int32_t hd : {2, 258, 384, 512}) {
        for (int mode = 0; mode < 3; mode++) {
            RopeSpec s;
            s.n_heads = hd > 256 ? 2 : 5;
            s.n = 9;
            s.out_bf16 = mode == 1;
            s.in_place = mode == 2;
            s.pad = mode == 0 ? 8 : 0;
            check_rope(rope_config(SF_ROPE_DEFAULT, hd, 10000.0), s, seed++);
            if (HasFailure()) return;
        }
    }
}

// SwiGLU with dup over dout (the test puts dgate there), and the fused layout with ff below a
// block and rows past gridDim.y's cap would be too slow: rows 3, ff 8 * 256 + 8 (2 x-blocks).
TEST(CudaBackwardEdges, SwigluDupInPlace) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(9401);
    for (size_t n : {(size_t)9, (size_t)4096, (size_t)4099}) {
        const std::vector<float> g = swiglu_gates(rng, n);
        const std::vector<float> u = bf16_round(normal(rng, n, 2.0f));
        const std::vector<float> dout = normal(rng, n, 1.0f);
        std::vector<float> ref_dg(n), ref_du(n);
        sf_cpu_swiglu_backward(ref_dg.data(), ref_du.data(), dout.data(), g.data(), u.data(),
                               (int64_t)n);
        DeviceBuffer<uint16_t> d_g(to_bf16(g)), d_u(to_bf16(u));
        DeviceBuffer<float> d_dout(dout), d_dg(n);
        ASSERT_EQ(sf_cuda_swiglu_backward(d_dg.get(), d_dout.get(), false, d_dout.get(), d_g.get(),
                                          d_u.get(), (int64_t)n, nullptr),
                  SF_OK);
        SF_EXPECT_SYNC();
        const std::vector<float> got_dg = d_dg.host(), got_du = d_dout.host();
        expect_swiglu_grads(got_dg, got_du, dout, g, u, ref_dg, ref_du, false, "dup over dout");
    }
}

// Bias gradient: a column range over several x-blocks with every row lane busy, bf16 dy with
// a row stride, rows = 0 without accumulate (zeros).
TEST(CudaBackwardEdges, BiasGradientShapes) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 9501;
    check_bias_backward(33, 100, 104, true, false, seed++);
    check_bias_backward(33, 100, 100, false, true, seed++);
    check_bias_backward(0, 40, 40, false, false, seed++);
    check_bias_backward(16, 64, 64, true, true, seed++);
    check_bias_backward(17, 65, 70, false, false, seed++);
}

// =============================================================================================
// Argument checks: before any CUDA call, so these run without a GPU. Pointers are host arrays
// (or odd addresses) that no check dereferences; a call that passed every check would launch,
// which on a machine without a GPU fails with SF_ERR_CUDA, not SF_ERR_INVALID_ARGUMENT.
// =============================================================================================

bool mentions(const char *fn) { return strstr(sf_last_error(), fn) != nullptr; }

TEST(CudaBackwardArgs, NormsRejectBadArguments) {
    alignas(16) static float f[4][64];
    alignas(16) static uint16_t h[2][64];
    alignas(16) static double ws[64];
    float *dx = f[0], *dw = f[1], *db = f[2];
    const float *dy = f[3];
    const sf_bf16 *x = h[0], *w = h[1];
    const float *dy_odd = (const float *)((uintptr_t)dy + 2);
    const sf_bf16 *x_odd = (const sf_bf16 *)((uintptr_t)x + 1);
    struct Bad {
        const char *why;
        float *dx, *dw;
        const float *dy;
        const sf_bf16 *x, *w;
        int64_t rows, dim;
        float eps;
        void *ws;
        size_t ws_bytes;
        int tpr;
    };
    const Bad bad[] = {
        {"NULL dy", dx, dw, nullptr, x, w, 4, 64, 1e-5f, ws, sizeof ws, 0},
        {"NULL x", dx, dw, dy, nullptr, w, 4, 64, 1e-5f, ws, sizeof ws, 0},
        {"NULL w", dx, dw, dy, x, nullptr, 4, 64, 1e-5f, ws, sizeof ws, 0},
        {"rows < 0", dx, dw, dy, x, w, -1, 64, 1e-5f, ws, sizeof ws, 0},
        {"rows > INT32_MAX", dx, dw, dy, x, w, (int64_t)INT32_MAX + 1, 64, 1e-5f, ws, sizeof ws, 0},
        {"dim < 0", dx, dw, dy, x, w, 4, -1, 1e-5f, ws, sizeof ws, 0},
        {"dim too long", dx, dw, dy, x, w, 4, SF_CUDA_NORM_MAX_DIM + 1, 1e-5f, ws, sizeof ws, 0},
        {"eps < 0", dx, dw, dy, x, w, 4, 64, -1e-5f, ws, sizeof ws, 0},
        {"eps NaN", dx, dw, dy, x, w, 4, 64, NAN, ws, sizeof ws, 0},
        {"threads_per_row 48", dx, dw, dy, x, w, 4, 64, 1e-5f, ws, sizeof ws, 48},
        {"a warp holds 512 values", dx, dw, dy, x, w, 4, 520, 1e-5f, ws, sizeof ws, 32},
        {"misaligned dy", dx, dw, dy_odd, x, w, 4, 64, 1e-5f, ws, sizeof ws, 0},
        {"misaligned dx", (float *)((uintptr_t)dx + 1), dw, dy, x, w, 4, 64, 1e-5f, ws, sizeof ws,
         0},
        {"misaligned x", dx, dw, dy, x_odd, w, 4, 64, 1e-5f, ws, sizeof ws, 0},
        {"dw without workspace", dx, dw, dy, x, w, 4, 64, 1e-5f, nullptr, 0, 0},
        {"short workspace", dx, dw, dy, x, w, 4, 64, 1e-5f, ws, 31, 0},
        {"misaligned workspace", dx, dw, dy, x, w, 4, 64, 1e-5f, (char *)ws + 4, 256, 0},
        {"NULL dy, no rows", dx, dw, nullptr, x, w, 0, 64, 1e-5f, ws, sizeof ws, 0},
    };
    for (const Bad &c : bad) {
        SCOPED_TRACE(c.why);
        sf_clear_error();
        EXPECT_EQ(sf_cuda_rmsnorm_backward_variant(c.dx, false, c.dw, c.dy, c.x, c.w, c.rows, c.dim,
                                                   c.eps, c.ws, c.ws_bytes, c.tpr, nullptr),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(mentions("sf_cuda_rmsnorm_backward")) << sf_last_error();
        sf_clear_error();
        EXPECT_EQ(
            sf_cuda_layernorm_backward_variant(c.dx, false, c.dw, db, c.dy, c.x, c.w, c.rows, c.dim,
                                               c.eps, c.ws, c.ws_bytes, c.tpr, nullptr),
            SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(mentions("sf_cuda_layernorm_backward")) << sf_last_error();
    }
    // LayerNorm's db alone also needs the workspace.
    EXPECT_EQ(sf_cuda_layernorm_backward(dx, false, nullptr, db, dy, x, w, 4, 64, 1e-5f, nullptr, 0,
                                         nullptr),
              SF_ERR_INVALID_ARGUMENT);
    // Nothing wanted, no rows, no columns: SF_OK without a launch (host pointers untouched).
    EXPECT_EQ(sf_cuda_rmsnorm_backward(nullptr, false, nullptr, dy, x, w, 4, 64, 1e-5f, nullptr, 0,
                                       nullptr),
              SF_OK);
    EXPECT_EQ(sf_cuda_rmsnorm_backward(dx, false, dw, dy, x, w, 0, 64, 1e-5f, ws, 0, nullptr),
              SF_OK);
    EXPECT_EQ(sf_cuda_layernorm_backward(dx, false, dw, db, dy, x, w, 4, 0, 1e-5f, ws, sizeof ws,
                                         nullptr),
              SF_OK);
    EXPECT_EQ(sf_cuda_norm_backward_workspace_bytes(0), 0u);
    EXPECT_EQ(sf_cuda_norm_backward_workspace_bytes(-5), 0u);
    EXPECT_EQ(sf_cuda_norm_backward_workspace_bytes(1000), 8000u);
}

TEST(CudaBackwardArgs, RopeRejectsBadArguments) {
    alignas(16) static float f[1024];
    alignas(16) static int32_t pos[16];
    void *dx = f;
    const float *dy = f, *inv = f;
    sf_clear_error();
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, dy, pos, -1, 8, 64, 512, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("sf_cuda_rope_backward")) << sf_last_error();
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, dy, pos, 4, 8, 63, 504, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // odd head_dim
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, dy, pos, 4, 1, 514, 514, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // head_dim > 512
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, dy, pos, 4, 8, 64, 511, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // row_stride < n_heads * head_dim
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, dy, pos, 4, -1, 64, 64, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, nullptr, pos, 4, 8, 64, 512, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_backward(nullptr, false, dy, pos, 4, 8, 64, 512, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, dy, pos, 4, 8, 64, 512, nullptr, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_backward(dx, true, dy, pos, 4, 8, 64, 512, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // a bf16 dx over the fp32 dy
    EXPECT_EQ(
        sf_cuda_rope_backward((char *)dx + 2, false, dy, pos, 4, 8, 64, 512, inv, 1.0f, nullptr),
        SF_ERR_INVALID_ARGUMENT);  // misaligned fp32 dx
    EXPECT_EQ(sf_cuda_rope_backward(dx, false, (const float *)((uintptr_t)dy + 1), pos, 4, 8, 64,
                                    512, inv, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // misaligned dy
    EXPECT_EQ(sf_cuda_rope2_backward(dx, false, dy, pos, (const int32_t *)((uintptr_t)pos + 2), 4,
                                     8, 64, 512, inv, 1.0f, 1.0f, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // misaligned table
    EXPECT_TRUE(mentions("sf_cuda_rope2_backward")) << sf_last_error();
    // No tokens or no heads: nothing to do, even with NULL pointers.
    EXPECT_EQ(sf_cuda_rope_backward(nullptr, false, nullptr, nullptr, 0, 8, 64, 512, nullptr, 1.0f,
                                    nullptr),
              SF_OK);
}

TEST(CudaBackwardArgs, ActivationsRejectBadArguments) {
    alignas(16) static float f[3][64];
    alignas(16) static uint16_t h[2][128];
    void *o1 = f[0], *o2 = f[1];
    const float *dy = f[2];
    const sf_bf16 *g = h[0], *u = h[1];
    const float *dy_odd = (const float *)((uintptr_t)dy + 2);
    void *o_odd = (void *)((uintptr_t)o1 + 2);

    sf_clear_error();
    EXPECT_EQ(sf_cuda_swiglu_backward(o1, o2, false, dy, g, u, -1, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("sf_cuda_swiglu_backward")) << sf_last_error();
    EXPECT_EQ(sf_cuda_swiglu_backward(nullptr, o2, false, dy, g, u, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_backward(o1, o1, false, dy, g, u, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // dgate == dup
    EXPECT_EQ(sf_cuda_swiglu_backward((void *)dy, o2, true, dy, g, u, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // bf16 over fp32 dout
    EXPECT_EQ(sf_cuda_swiglu_backward(o_odd, o2, false, dy, g, u, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // misaligned fp32 output
    EXPECT_EQ(sf_cuda_swiglu_backward(o1, o2, false, dy_odd, g, u, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_backward(o1, o2, false, dy, (const sf_bf16 *)((uintptr_t)g + 1), u, 8,
                                      nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_backward(o1, false, dy, g, -1, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_backward(o1, false, dy, g, 4, -8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_backward(o1, false, nullptr, g, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_backward(o_odd, false, dy, g, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    for (auto fn : {sf_cuda_gelu_backward, sf_cuda_relu_backward}) {
        sf_clear_error();
        EXPECT_EQ(fn(o1, false, dy, g, -1, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(mentions("_backward")) << sf_last_error();
        EXPECT_EQ(fn(nullptr, false, dy, g, 8, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(fn(o1, false, nullptr, g, 8, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(fn(o1, false, dy, nullptr, 8, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(fn(o_odd, false, dy, g, 8, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(fn(o1, false, dy_odd, g, 8, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(fn((void *)dy, true, dy, g, 8, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(fn(nullptr, false, nullptr, nullptr, 0, nullptr), SF_OK);  // n == 0
    }
    float *db = f[0];
    sf_clear_error();
    EXPECT_EQ(sf_cuda_bias_backward(db, false, dy, false, 8, -1, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("sf_cuda_bias_backward")) << sf_last_error();
    EXPECT_EQ(sf_cuda_bias_backward(db, false, dy, false, 8, 4, -8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_backward(db, false, dy, false, 7, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // ldy < dim
    EXPECT_EQ(sf_cuda_bias_backward(nullptr, false, dy, false, 8, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_backward(db, false, nullptr, false, 8, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_backward(db, false, dy_odd, false, 8, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_backward((float *)o_odd, false, dy, false, 8, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_backward(db, true, nullptr, false, 8, 0, 8, nullptr), SF_OK);
}

TEST(CudaBackwardArgs, LogprobsRejectBadArguments) {
    alignas(16) static float f[2][64];
    alignas(16) static int32_t t[64];
    float *nll = f[0];
    const float *z = f[1];
    sf_clear_error();
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, z, t, -1, 8, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("sf_cuda_logprobs")) << sf_last_error();
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, z, t, 4, 0, 1, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, z, t, 4, 8, -1, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, z, t, 4, 8, SF_MAX_TOP_LOGPROBS + 1, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, nullptr, t, 4, 8, 1, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, z, nullptr, 4, 8, 1, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // nll wanted without targets
    EXPECT_EQ(sf_cuda_logprobs(nll, nullptr, nll, z, t, 4, 8, 1, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // top wanted without its arrays
    EXPECT_EQ(sf_cuda_logprobs(nll, t, nll, (const float *)((const char *)z + 2), t, 4, 8, 1,
                               nullptr),
              SF_ERR_INVALID_ARGUMENT);  // misaligned logits
}

TEST(CudaBackwardArgs, CrossEntropyRejectsBadArguments) {
    alignas(16) static float f[3][64];
    alignas(16) static int32_t t[8];
    float *loss = f[0];
    void *d = f[1];
    const float *z = f[2];
    sf_clear_error();
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, d, false, z, false, t, nullptr, -1, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("sf_cuda_cross_entropy")) << sf_last_error();
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, d, false, z, false, t, nullptr, (int64_t)INT32_MAX + 1,
                                    8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, d, false, z, false, t, nullptr, 4, 0, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // vocab 0
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, d, false, nullptr, false, t, nullptr, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, d, false, z, false, nullptr, nullptr, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, (void *)z, true, z, false, t, nullptr, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // bf16 dlogits over fp32 logits
    EXPECT_EQ(sf_cuda_cross_entropy(loss, t, d, false, (const char *)z + 2, false, t, nullptr, 4, 8,
                                    nullptr),
              SF_ERR_INVALID_ARGUMENT);  // misaligned fp32 logits
    EXPECT_EQ(
        sf_cuda_cross_entropy(loss, t, (char *)d + 1, true, z, true, t, nullptr, 4, 8, nullptr),
        SF_ERR_INVALID_ARGUMENT);  // misaligned bf16 dlogits
    EXPECT_EQ(sf_cuda_cross_entropy((float *)((uintptr_t)loss + 2), t, d, false, z, false, t,
                                    nullptr, 4, 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_cross_entropy(nullptr, nullptr, nullptr, false, nullptr, false, nullptr,
                                    nullptr, 0, 0, nullptr),
              SF_OK);  // no rows
}

TEST(CudaBackwardArgs, GemmBackwardRejectsBadArgumentsBeforeTheCache) {
    alignas(256) static uint16_t h[4][256];
    alignas(256) static float f[2][256];
    const sf_gemm_dx_args good_dx = {f[0], 8, true, false, h[0], 8, h[1], 4, 8, 8};
    const sf_gemm_dw_args good_dw = {f[1], f[0], false, h[0], 8, h[2], 8, 4, 8, 8};

    struct BadDx {
        const char *why, *named;
        sf_gemm_dx_args a;
    };
    std::vector<BadDx> bad_dx;
    auto add_dx = [&](const char *why, const char *named, auto edit) {
        BadDx b = {why, named, good_dx};
        edit(b.a);
        bad_dx.push_back(b);
    };
    add_dx("NULL dx", "NULL dx", [](sf_gemm_dx_args &a) { a.dx = nullptr; });
    add_dx("NULL dy", "NULL dy", [](sf_gemm_dx_args &a) { a.dy = nullptr; });
    add_dx("NULL w", "NULL w", [](sf_gemm_dx_args &a) { a.w = nullptr; });
    add_dx("m < 0", "negative", [](sf_gemm_dx_args &a) { a.m = -1; });
    add_dx("n < 0", "negative", [](sf_gemm_dx_args &a) { a.n = -1; });
    add_dx("k < 0", "negative", [](sf_gemm_dx_args &a) { a.k = -1; });
    add_dx("lddx < k", "lddx", [](sf_gemm_dx_args &a) { a.lddx = 7; });
    add_dx("lddy < n", "lddy", [](sf_gemm_dx_args &a) { a.lddy = 7; });
    add_dx("overflow", "overflow", [](sf_gemm_dx_args &a) {
        a.m = (int64_t)1 << 40;
        a.lddx = (int64_t)1 << 40;
    });
    add_dx("misaligned fp32 dx", "aligned", [](sf_gemm_dx_args &a) { a.dx = (char *)a.dx + 2; });
    add_dx("misaligned dy", "aligned",
           [](sf_gemm_dx_args &a) { a.dy = (const sf_bf16 *)((uintptr_t)a.dy + 1); });
    add_dx("misaligned w, m == 0", "aligned", [](sf_gemm_dx_args &a) {
        a.w = (const sf_bf16 *)((uintptr_t)a.w + 1);
        a.m = 0;
    });
    for (const BadDx &c : bad_dx) {
        SCOPED_TRACE(c.why);
        sf_clear_error();
        EXPECT_EQ(sf_cuda_gemm_dx(nullptr, &c.a, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(mentions("sf_cuda_gemm_dx")) << sf_last_error();
        EXPECT_TRUE(mentions(c.named)) << sf_last_error();
        EXPECT_FALSE(mentions("cache")) << sf_last_error();
    }

    struct BadDw {
        const char *why, *named;
        sf_gemm_dw_args a;
    };
    std::vector<BadDw> bad_dw;
    auto add_dw = [&](const char *why, const char *named, auto edit) {
        BadDw b = {why, named, good_dw};
        edit(b.a);
        bad_dw.push_back(b);
    };
    add_dw("NULL dw and db", "NULL dw and db", [](sf_gemm_dw_args &a) { a.dw = a.db = nullptr; });
    add_dw("NULL dy", "NULL dy", [](sf_gemm_dw_args &a) { a.dy = nullptr; });
    add_dw("NULL x", "NULL x", [](sf_gemm_dw_args &a) { a.x = nullptr; });
    add_dw("m < 0", "negative", [](sf_gemm_dw_args &a) { a.m = -1; });
    add_dw("k < 0", "negative", [](sf_gemm_dw_args &a) { a.k = -1; });
    add_dw("ldx < k", "ldx", [](sf_gemm_dw_args &a) { a.ldx = 7; });
    add_dw("lddy < n", "lddy", [](sf_gemm_dw_args &a) { a.lddy = 7; });
    add_dw("overflow", "overflow", [](sf_gemm_dw_args &a) {
        a.m = (int64_t)1 << 40;
        a.ldx = (int64_t)1 << 40;
    });
    add_dw("misaligned dw", "aligned",
           [](sf_gemm_dw_args &a) { a.dw = (float *)((uintptr_t)a.dw + 2); });
    add_dw("misaligned db", "aligned",
           [](sf_gemm_dw_args &a) { a.db = (float *)((uintptr_t)a.db + 1); });
    add_dw("misaligned x", "aligned",
           [](sf_gemm_dw_args &a) { a.x = (const sf_bf16 *)((uintptr_t)a.x + 1); });
    for (const BadDw &c : bad_dw) {
        SCOPED_TRACE(c.why);
        sf_clear_error();
        EXPECT_EQ(sf_cuda_gemm_dw(nullptr, &c.a, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(mentions("sf_cuda_gemm_dw")) << sf_last_error();
        EXPECT_TRUE(mentions(c.named)) << sf_last_error();
        EXPECT_FALSE(mentions("cache")) << sf_last_error();
    }

    // NULL args, and good arguments with only the cache missing.
    EXPECT_EQ(sf_cuda_gemm_dx(nullptr, nullptr, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("NULL args"));
    EXPECT_EQ(sf_cuda_gemm_dw(nullptr, nullptr, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("NULL args"));
    EXPECT_EQ(sf_cuda_gemm_dx(nullptr, &good_dx, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("NULL cache")) << sf_last_error();
    EXPECT_EQ(sf_cuda_gemm_dw(nullptr, &good_dw, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("NULL cache")) << sf_last_error();
}

}  // namespace
