// CUDA RMSNorm and LayerNorm (kernels/rmsnorm.cu, kernels/layernorm.cu) against their CPU twins
// (host/cpu/rmsnorm.c, host/cpu/layernorm.c, with sf_cpu_add for the residual), run in fp32 on
// the same bf16 inputs. Every GPU test skips without a device; the argument checks run anywhere.
//
// Tolerances, derived (u = 2^-24, the fp32 unit roundoff; bf16 keeps 8 significant bits, so
// rounding to nearest bf16 moves a value by at most 2^-8 of itself):
//
// residual_out: h = bf16(x + residual) is one fp32 addition of two bf16 values and one rounding
//   on both sides, so it must match the CPU's bf16(sf_cpu_add(x, residual)) bit for bit.
//
// Reductions: a sum of n terms in any order is off by at most (n - 1)u times the sum of their
//   magnitudes, i.e. dim * u here. The kernels' order is tighter and known: each thread adds at
//   most 32 values in sequence (4 chunks of 8, or 16 scalars) and at most 1024 threads meet in
//   a tree of depth 10, so no term passes through more than D = 42 roundings and the error is
//   at most D u sum|terms| whatever dim is. (Raise D if kernels/norms_common.cuh's max_chunks
//   or the largest block grows.) D u, not dim u, is what makes a one-pass E[h^2] - E[h]^2
//   variance fail the rows with a large mean below.
//
// RMSNorm: the GPU forms o = w * (h * rsqrt(ss / dim + eps)) in fp32 and rounds it once. The
//   squares are non-negative, so ss is within D u of itself relatively; the division and the
//   eps addition (non-negative: no cancellation) add 2u, the square root halves all that, and
//   rsqrtf (2 ulp = 4u) and the two products add 6u: |o - ref| <= (D / 2 + 7)u |ref|, plus the
//   CPU twin's own ~3.5u, about 32u in all. The bf16 rounding adds 2^-8 |o|. Every factor is a
//   product, so nothing cancels and no absolute term is needed (an exact zero stays zero):
//       |gpu - ref| <= (2^-8 + 64u) |ref|                      (64u: twice the 32u)
//
// LayerNorm: o = fma((h - mean) * rstd, w, b). The row sum is off by at most D u sum|h|, so the
//   mean by (D + 1)u m1 (m1 = mean |h| over the row), which reaches the output multiplied by
//   rstd |w| = |w| / sigma, sigma = sqrt(var + eps): that is the absolute term, and eps is what
//   bounds it for a (near-)constant row. The variance gathers (D + 2)u relative error (the
//   mean's error enters it only squared), rstd half of that plus rsqrtf's 4u, so the normalised
//   value n carries about (D / 2 + 7)u relative; the fma adds u |o|, the CPU twin (double,
//   rounded once) u |ref|. With the final bf16 rounding, and 64u covering both 28u and (D + 1)u:
//       |gpu - ref| <= 2^-8 |ref| + 64u (|n w| + |w| m1 / sigma + |ref|).
//
// So the bf16 rounding term dominates; a wrong element, a wrong statistic, an unrounded
// residual or a second bf16 rounding (up to 2 x 2^-8) does not fit under these. A NaN never
// passes (outputs start as NaN: DeviceBuffer poisons them).
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "cuda_test_util.h"
#include "norms.h"

namespace {

enum class Norm { kRms, kLayer };

struct Spec {
    Norm norm = Norm::kRms;
    int64_t rows = 1, dim = 64;
    bool residual = false;      // add a residual stream before the norm
    bool residual_out = false;  // write the updated stream back
    bool bias = true;           // LayerNorm only: b, or NULL for none
    int threads_per_row = 0;    // 0: the launcher's own choice
    int shift = 0;              // elements every device pointer is moved by (0 keeps 16 bytes)
    float eps = 1e-5f;
};

std::string describe(const Spec &s) {
    std::ostringstream o;
    o << (s.norm == Norm::kRms ? "rmsnorm" : "layernorm") << " rows=" << s.rows
      << " dim=" << s.dim << (s.residual ? " +residual" : "")
      << (s.residual_out ? " residual_out" : "")
      << (s.norm == Norm::kLayer && !s.bias ? " no-bias" : "")
      << " threads_per_row=" << s.threads_per_row << " shift=" << s.shift;
    return o.str();
}

// bf16-exact inputs. Rows cycle through scales 1, 1/64 and 24, and through offsets of 0, 3, 0
// and 256 scales, so LayerNorm sees means large against the spread (at 256 scales a one-pass
// E[h^2] - E[h]^2 variance falls outside the tolerance).
struct Inputs {
    std::vector<float> x, residual, w, b;
};

Inputs make_inputs(int64_t rows, int64_t dim, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    static const float kScales[3] = {1.0f, 1.0f / 64.0f, 24.0f};
    Inputs in;
    in.x.resize(rows * dim);
    in.residual.resize(rows * dim);
    for (int64_t r = 0; r < rows; r++) {
        const float scale = kScales[r % 3];
        static const float kOffsets[4] = {0.0f, 3.0f, 0.0f, 256.0f};
        const float offset = kOffsets[r % 4] * scale;
        for (int64_t i = 0; i < dim; i++) {
            in.x[r * dim + i] = offset + scale * normal(rng);
            in.residual[r * dim + i] = scale * normal(rng);
        }
    }
    in.w.resize(dim);
    in.b.resize(dim);
    for (int64_t i = 0; i < dim; i++) {
        in.w[i] = 1.0f + 0.5f * normal(rng);
        in.b[i] = 0.5f * normal(rng);
    }
    in.x = bf16_round(in.x);
    in.residual = bf16_round(in.residual);
    in.w = bf16_round(in.w);
    in.b = bf16_round(in.b);
    return in;
}

// bf16 bits with `shift` leading zeros, so that data + shift is where the values start.
std::vector<uint16_t> shifted(const std::vector<float> &v, int shift) {
    std::vector<uint16_t> out(shift, 0);
    const std::vector<uint16_t> bits = to_bf16(v);
    out.insert(out.end(), bits.begin(), bits.end());
    return out;
}

std::vector<uint16_t> unshifted(const std::vector<uint16_t> &v, int shift) {
    return std::vector<uint16_t>(v.begin() + shift, v.end());
}

// The CPU twins' answer for h (the bf16 residual stream): out in fp32, and the per-element
// tolerance derived at the top of this file.
void reference(const Spec &s, const std::vector<float> &h, const Inputs &in,
               std::vector<float> *ref, std::vector<double> *tol) {
    const int64_t rows = s.rows, dim = s.dim;
    const double u = std::ldexp(1.0, -24), rounding = std::ldexp(1.0, -8);
    const double stat = 64.0 * u;
    ref->assign(rows * dim, 0.0f);
    tol->assign(rows * dim, 0.0);
    if (s.norm == Norm::kRms) {
        sf_cpu_rmsnorm(ref->data(), h.data(), in.w.data(), rows, dim, s.eps);
        for (size_t i = 0; i < ref->size(); i++) {
            (*tol)[i] = (rounding + stat) * std::fabs((*ref)[i]);
        }
        return;
    }
    const std::vector<float> zeros(dim, 0.0f);
    const std::vector<float> &b = s.bias ? in.b : zeros;
    sf_cpu_layernorm(ref->data(), h.data(), in.w.data(), b.data(), rows, dim, s.eps);
    for (int64_t r = 0; r < rows; r++) {
        const float *hr = &h[r * dim];
        double mean = 0.0, m1 = 0.0, var = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            mean += hr[i];
            m1 += std::fabs((double)hr[i]);
        }
        mean /= (double)dim;
        m1 /= (double)dim;
        for (int64_t i = 0; i < dim; i++) var += ((double)hr[i] - mean) * ((double)hr[i] - mean);
        const double sigma = std::sqrt(var / (double)dim + (double)s.eps);
        for (int64_t i = 0; i < dim; i++) {
            const double n = ((double)hr[i] - mean) / sigma, w = in.w[i];
            const double ref_i = std::fabs((double)(*ref)[r * dim + i]);
            (*tol)[r * dim + i] =
                rounding * ref_i + stat * (std::fabs(n * w) + std::fabs(w) * m1 / sigma + ref_i);
        }
    }
}

// Elementwise |got - ref| <= tol; reports the first few offenders and the count.
void expect_within(const std::vector<float> &got, const std::vector<float> &ref,
                   const std::vector<double> &tol, int64_t dim, const char *what) {
    int64_t bad = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        const double err = std::fabs((double)got[i] - (double)ref[i]);
        if (!(err <= tol[i])) {  // NaN fails here
            if (bad < 5) {
                ADD_FAILURE() << what << " [row " << (int64_t)i / dim << ", col "
                              << (int64_t)i % dim << "]: got " << got[i] << ", want " << ref[i]
                              << " +- " << tol[i];
            }
            bad++;
        }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size() << " outside tolerance";
}

void expect_bits_equal(const std::vector<uint16_t> &got, const std::vector<uint16_t> &want,
                       int64_t dim, const char *what) {
    int64_t bad = 0;
    for (size_t i = 0; i < want.size(); i++) {
        if (got[i] != want[i]) {
            if (bad < 5) {
                ADD_FAILURE() << what << " [row " << (int64_t)i / dim << ", col "
                              << (int64_t)i % dim << "]: got bf16 0x" << std::hex << got[i]
                              << ", want 0x" << want[i] << std::dec;
            }
            bad++;
        }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " differ";
}

sf_status launch(const Spec &s, sf_bf16 *out, sf_bf16 *residual_out, const sf_bf16 *x,
                 const sf_bf16 *residual, const sf_bf16 *w, const sf_bf16 *b) {
    if (s.norm == Norm::kRms) {
        return sf_cuda_rmsnorm_bf16_variant(out, residual_out, x, residual, w, s.rows, s.dim,
                                            s.eps, s.threads_per_row, nullptr);
    }
    return sf_cuda_layernorm_bf16_variant(out, residual_out, x, residual, w, b, s.rows, s.dim,
                                          s.eps, s.threads_per_row, nullptr);
}

// Runs one case on the GPU (outputs poisoned with NaN first) and checks it against the twins.
void check(const Spec &s, uint64_t seed) {
    SCOPED_TRACE(describe(s));
    const Inputs in = make_inputs(s.rows, s.dim, seed);
    const int64_t n = s.rows * s.dim;

    // The stream the GPU must produce: bf16(x + residual), or x itself.
    std::vector<float> h = in.x;
    if (s.residual) {
        sf_cpu_add(h.data(), in.x.data(), in.residual.data(), n);
        h = bf16_round(h);
    }
    std::vector<float> ref;
    std::vector<double> tol;
    reference(s, h, in, &ref, &tol);

    DeviceBuffer<uint16_t> d_x(shifted(in.x, s.shift)), d_r(shifted(in.residual, s.shift));
    DeviceBuffer<uint16_t> d_w(shifted(in.w, s.shift)), d_b(shifted(in.b, s.shift));
    DeviceBuffer<uint16_t> d_out(n + s.shift), d_res_out(n + s.shift);
    ASSERT_TRUE(d_x.get() && d_r.get() && d_w.get() && d_b.get() && d_out.get() &&
                d_res_out.get());
    const int k = s.shift;
    ASSERT_EQ(launch(s, d_out.get() + k, s.residual_out ? d_res_out.get() + k : nullptr,
                     d_x.get() + k, s.residual ? d_r.get() + k : nullptr, d_w.get() + k,
                     s.bias ? d_b.get() + k : nullptr),
              SF_OK)
        << sf_last_error();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

    expect_within(from_bf16(unshifted(d_out.host(), k)), ref, tol, s.dim, "out");
    if (s.residual_out) {
        expect_bits_equal(unshifted(d_res_out.host(), k), to_bf16(h), s.dim, "residual_out");
    }
}

// ---------------------------------------------------------------------------------------------
// Against the CPU twins
// ---------------------------------------------------------------------------------------------

// Row counts around the warp variant's 4 rows per block; dims on the 128-bit path (64, 96, 576,
// 4096, 4104 = 513 chunks) and on the scalar path (100, 1001: not multiples of 8).
const int64_t kRows[] = {1, 7, 65, 1000};
const int64_t kDims[] = {64, 96, 576, 4096, 4104, 100, 1001};

TEST(CudaNorms, RmsNormMatchesCpuOnAwkwardShapes) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 1;
    for (int64_t rows : kRows) {
        for (int64_t dim : kDims) {
            for (bool residual : {false, true}) {
                Spec s;
                s.rows = rows;
                s.dim = dim;
                s.residual = s.residual_out = residual;
                check(s, seed++);
            }
        }
    }
}

TEST(CudaNorms, LayerNormMatchesCpuOnAwkwardShapes) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 101;
    for (int64_t rows : kRows) {
        for (int64_t dim : kDims) {
            for (bool residual : {false, true}) {
                Spec s;
                s.norm = Norm::kLayer;
                s.rows = rows;
                s.dim = dim;
                s.residual = s.residual_out = residual;
                check(s, seed++);
            }
        }
    }
}

// Every kernel instantiation: each threads_per_row on both paths, with the row filling every
// register chunk, stopping one access short of that, and leaving most threads idle.
TEST(CudaNorms, EveryVariantMatchesCpu) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 1001;
    for (Norm norm : {Norm::kRms, Norm::kLayer}) {
        for (int tpr : {32, 64, 128, 256, 512, 1024}) {
            const int64_t vec_cap = 32 * (int64_t)tpr, scalar_cap = 16 * (int64_t)tpr;
            const std::vector<Spec> specs = [&] {
                std::vector<Spec> v;
                for (int64_t dim : {vec_cap, vec_cap - 8, (int64_t)8}) {
                    Spec s;
                    s.dim = dim;
                    v.push_back(s);
                }
                for (int64_t dim : {scalar_cap, scalar_cap - 1, (int64_t)3}) {
                    Spec s;
                    s.dim = dim;
                    if (dim % 8 == 0) s.shift = 1;  // misaligned: the scalar path all the same
                    v.push_back(s);
                }
                return v;
            }();
            for (Spec s : specs) {
                if (s.dim > SF_CUDA_NORM_MAX_DIM) continue;
                s.norm = norm;
                s.rows = 5;
                s.threads_per_row = tpr;
                s.residual = s.residual_out = true;
                check(s, seed++);
            }
        }
    }
}

// Pointers that are not 16-byte aligned take the scalar path even when dim % 8 == 0.
TEST(CudaNorms, MisalignedPointersMatchCpu) {
    SF_SKIP_WITHOUT_GPU();
    for (Norm norm : {Norm::kRms, Norm::kLayer}) {
        Spec s;
        s.norm = norm;
        s.rows = 65;
        s.dim = 4096;
        s.shift = 1;
        s.residual = s.residual_out = true;
        check(s, norm == Norm::kRms ? 2001 : 2002);
    }
}

// The longest rows the kernels hold, on both paths.
TEST(CudaNorms, LongestRowsMatchCpu) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 3001;
    for (Norm norm : {Norm::kRms, Norm::kLayer}) {
        for (int64_t dim : {(int64_t)SF_CUDA_NORM_MAX_DIM, (int64_t)SF_CUDA_NORM_MAX_DIM - 1}) {
            Spec s;
            s.norm = norm;
            s.rows = 3;
            s.dim = dim;
            s.residual = s.residual_out = true;
            check(s, seed++);
        }
    }
}

// The optional pieces one at a time: the residual stream written without a residual (a copy of
// x), a residual added but not written back, LayerNorm without bias.
TEST(CudaNorms, OptionalArgumentsMatchCpu) {
    SF_SKIP_WITHOUT_GPU();
    uint64_t seed = 4001;
    for (Norm norm : {Norm::kRms, Norm::kLayer}) {
        for (int64_t dim : {(int64_t)576, (int64_t)1001}) {
            Spec s;
            s.norm = norm;
            s.rows = 7;
            s.dim = dim;
            s.residual_out = true;
            check(s, seed++);
            s.residual_out = false;
            s.residual = true;
            check(s, seed++);
            if (norm == Norm::kLayer) {
                s.bias = false;
                check(s, seed++);
            }
        }
    }
}

// The usual call in a transformer block: the residual stream updated in place
// (residual_out == residual) and the norm written over x.
TEST(CudaNorms, InPlaceResidualStreamMatchesCpu) {
    SF_SKIP_WITHOUT_GPU();
    for (Norm norm : {Norm::kRms, Norm::kLayer}) {
        for (int64_t dim : {(int64_t)4096, (int64_t)100}) {
            Spec s;
            s.norm = norm;
            s.rows = 65;
            s.dim = dim;
            SCOPED_TRACE(describe(s) + " in place");
            const Inputs in = make_inputs(s.rows, dim, 5001 + dim);
            const int64_t n = s.rows * dim;
            std::vector<float> h(n);
            sf_cpu_add(h.data(), in.x.data(), in.residual.data(), n);
            h = bf16_round(h);
            std::vector<float> ref;
            std::vector<double> tol;
            reference(s, h, in, &ref, &tol);

            DeviceBuffer<uint16_t> d_x(to_bf16(in.x)), d_r(to_bf16(in.residual));
            DeviceBuffer<uint16_t> d_w(to_bf16(in.w)), d_b(to_bf16(in.b));
            ASSERT_TRUE(d_x.get() && d_r.get() && d_w.get() && d_b.get());
            ASSERT_EQ(launch(s, d_x.get(), d_r.get(), d_x.get(), d_r.get(), d_w.get(), d_b.get()),
                      SF_OK)
                << sf_last_error();
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            expect_within(from_bf16(d_x.host()), ref, tol, dim, "out (over x)");
            expect_bits_equal(d_r.host(), to_bf16(h), dim, "residual_out (over residual)");
        }
    }
}

// Zero-variance rows: LayerNorm must give exactly the bias (a constant bf16 row sums exactly in
// fp32, so the two-pass mean is exact and h - mean is 0), RMSNorm exactly 0 for a zero row.
TEST(CudaNorms, ConstantRowsAreExact) {
    SF_SKIP_WITHOUT_GPU();
    const int64_t rows = 2;
    for (int64_t dim : {(int64_t)4104, (int64_t)1001}) {
        SCOPED_TRACE("dim " + std::to_string(dim));
        Inputs in = make_inputs(rows, dim, 6001 + dim);
        const float c = from_bf16(to_bf16(0.1f));
        for (int64_t i = 0; i < dim; i++) {
            in.x[i] = c;           // row 0: constant
            in.x[dim + i] = 0.0f;  // row 1: zeros
        }
        DeviceBuffer<uint16_t> d_x(to_bf16(in.x)), d_w(to_bf16(in.w)), d_b(to_bf16(in.b));
        DeviceBuffer<uint16_t> d_out(rows * dim);
        ASSERT_TRUE(d_x.get() && d_w.get() && d_b.get() && d_out.get());

        ASSERT_EQ(sf_cuda_layernorm_bf16(d_out.get(), nullptr, d_x.get(), nullptr, d_w.get(),
                                         d_b.get(), rows, dim, 1e-5f, nullptr),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        std::vector<uint16_t> got = d_out.host();
        const std::vector<uint16_t> b_bits = to_bf16(in.b);
        std::vector<uint16_t> want(b_bits);
        want.insert(want.end(), b_bits.begin(), b_bits.end());
        expect_bits_equal(got, want, dim, "layernorm of constant rows");

        ASSERT_EQ(sf_cuda_rmsnorm_bf16(d_out.get(), nullptr, d_x.get(), nullptr, d_w.get(), rows,
                                       dim, 1e-5f, nullptr),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        got = d_out.host();
        for (int64_t i = 0; i < dim; i++) {
            EXPECT_EQ(from_bf16(got[dim + i]), 0.0f) << "rmsnorm of a zero row, col " << i;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks: they come before any CUDA call, so this runs without a GPU. The pointers are
// host arrays that no check dereferences; rows == 0 and dim == 0 return SF_OK without a launch
// (on a machine with no GPU a launch would fail with SF_ERR_CUDA).
// ---------------------------------------------------------------------------------------------

TEST(CudaNormsArgs, RejectsBadArgumentsBeforeAnyCudaCall) {
    alignas(16) static uint16_t buf[6][64];
    sf_bf16 *out = buf[0], *res_out = buf[1];
    const sf_bf16 *x = buf[2], *res = buf[3], *w = buf[4], *b = buf[5];
    const float nan = std::nanf(""), inf = INFINITY;

    struct Bad {
        const char *why;
        sf_bf16 *out, *res_out;
        const sf_bf16 *x, *w;
        int64_t rows, dim;
        float eps;
        int tpr;
    };
    const Bad bad[] = {
        {"NULL out", nullptr, res_out, x, w, 4, 64, 1e-5f, 0},
        {"NULL x", out, res_out, nullptr, w, 4, 64, 1e-5f, 0},
        {"NULL w", out, res_out, x, nullptr, 4, 64, 1e-5f, 0},
        {"out == residual_out", out, out, x, w, 4, 64, 1e-5f, 0},
        {"rows < 0", out, res_out, x, w, -1, 64, 1e-5f, 0},
        {"rows > INT32_MAX", out, res_out, x, w, (int64_t)INT32_MAX + 1, 64, 1e-5f, 0},
        {"dim < 0", out, res_out, x, w, 4, -1, 1e-5f, 0},
        {"dim too long", out, res_out, x, w, 4, SF_CUDA_NORM_MAX_DIM + 1, 1e-5f, 0},
        {"eps < 0", out, res_out, x, w, 4, 64, -1e-5f, 0},
        {"eps NaN", out, res_out, x, w, 4, 64, nan, 0},
        {"eps inf", out, res_out, x, w, 4, 64, inf, 0},
        {"threads_per_row 48", out, res_out, x, w, 4, 64, 1e-5f, 48},
        {"threads_per_row 2048", out, res_out, x, w, 4, 64, 1e-5f, 2048},
        {"threads_per_row -32", out, res_out, x, w, 4, 64, 1e-5f, -32},
        // A warp holds 1024 values on the 128-bit path and 512 on the scalar one.
        {"warp, 128-bit path too long", out, res_out, x, w, 4, 1032, 1e-5f, 32},
        {"warp, scalar path too long", out, res_out, x, w, 4, 513, 1e-5f, 32},
        // rows == 0 and dim == 0 are still checked.
        {"NULL x, no rows", out, res_out, nullptr, w, 0, 64, 1e-5f, 0},
        // A pointer off its element (on a GPU: a misaligned-address fault).
        {"w off its element", out, res_out, x, reinterpret_cast<const sf_bf16 *>(
             reinterpret_cast<const char *>(w) + 1), 4, 64, 1e-5f, 0},
        {"out off its element", reinterpret_cast<sf_bf16 *>(reinterpret_cast<char *>(out) + 1),
         res_out, x, w, 4, 64, 1e-5f, 0},
        {"eps < 0, no columns", out, res_out, x, w, 4, 0, -1.0f, 0},
    };
    for (const Bad &c : bad) {
        SCOPED_TRACE(c.why);
        sf_clear_error();
        EXPECT_EQ(sf_cuda_rmsnorm_bf16_variant(c.out, c.res_out, c.x, res, c.w, c.rows, c.dim,
                                               c.eps, c.tpr, nullptr),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(strstr(sf_last_error(), "sf_cuda_rmsnorm_bf16"), nullptr) << sf_last_error();
        sf_clear_error();
        EXPECT_EQ(sf_cuda_layernorm_bf16_variant(c.out, c.res_out, c.x, res, c.w, b, c.rows,
                                                 c.dim, c.eps, c.tpr, nullptr),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(strstr(sf_last_error(), "sf_cuda_layernorm_bf16"), nullptr) << sf_last_error();
    }

    // Nothing to do is not an error, and launches nothing.
    EXPECT_EQ(sf_cuda_rmsnorm_bf16(out, res_out, x, res, w, 0, 64, 1e-5f, nullptr), SF_OK)
        << sf_last_error();
    EXPECT_EQ(sf_cuda_rmsnorm_bf16(out, nullptr, x, nullptr, w, 5, 0, 1e-5f, nullptr), SF_OK)
        << sf_last_error();
    EXPECT_EQ(sf_cuda_layernorm_bf16(out, res_out, x, res, w, nullptr, 0, 64, 0.0f, nullptr),
              SF_OK)
        << sf_last_error();
    EXPECT_EQ(sf_cuda_layernorm_bf16(out, nullptr, x, nullptr, w, b, 5, 0, 1e-5f, nullptr), SF_OK)
        << sf_last_error();
}

}  // namespace
