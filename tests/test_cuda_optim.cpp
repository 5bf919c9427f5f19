// The optimizer kernels (kernels/optim.cu: sf_cuda_grad_norm, sf_cuda_adamw) against their CPU
// twins sf_clip_grad_norm and sf_adamw_step (host/train/trainer.c), on awkward sizes (1, 3, 4,
// 4097, a few million), unaligned pointers, several steps with weight decay, clipping active,
// inactive and off. GPU tests skip without a device; the argument tests run everywhere and
// never touch CUDA.
//
// What the comparison can demand (optim.h states the kernels' side):
// - The norm: both sides add the same n squares, each exact in double (24-bit significands
//   give 48-bit products), in different fixed orders. A sum of n non-negative terms in any
//   order is within gamma_{n-1} (double) of the exact sum, and each side's square root adds
//   one rounding and halves the relative error: |norm_gpu - norm_cpu| <= (gamma_{n-1} +
//   2^-52) norm_cpu.
// - The clip coefficient is two IEEE operations on the device's norm: the test repeats them on
//   the host and wants the same bits.
// - AdamW: given the same clipped gradient element, the device performs sf_adamw_step's double
//   operations in its order, each correctly rounded, and rounds to fp32 once: w, m and v must
//   come out bit for bit equal. Clipping scales g by the coefficient, and the two sides'
//   coefficients differ by the norm's bound; a scaled element then rounds to the CPU's fp32
//   value or to its neighbour (one ulp). For such elements (rare: the products must straddle
//   a rounding boundary) the test derives how far one ulp of the gradient can move m, v and w
//   (one_ulp_bounds below) and checks that; every other element must be exact.
// Several steps run from a common state: after each step the CPU state is re-based on the
// device's, so an element that moved by the one-ulp allowance is not compared against an
// exact expectation in later steps. Without clipping there is no allowance at all, and there
// the two trajectories run independently for many steps and must stay identical.
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "optim.h"
#include "test_util.h"
#include "train/trainer.h"

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

constexpr double kU = 0x1p-24;       // fp32 unit roundoff
constexpr double kUd = 0x1p-53;      // double unit roundoff
constexpr double kTiny = 0x1p-149;   // fp32 subnormal spacing: a rounding's absolute floor

bool mentions(const char *fn) { return strstr(sf_last_error(), fn) != nullptr; }

bool same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

struct State {
    std::vector<float> w, m, v;
};

// A gradient with the spread a real one has: mostly N(0, 1) scaled by 10^U(-4, 0), a few exact
// zeros, a few tiny values whose squares underflow fp32 (v's (1 - beta2) g^2 then does too, on
// both sides), a few large ones.
std::vector<float> gradient(size_t n, uint64_t seed) {
    Rng r(seed);
    std::vector<float> g(n);
    for (size_t i = 0; i < n; i++) {
        const int64_t kind = r.below(64);
        if (kind == 0) g[i] = 0.0f;
        else if (kind == 1) g[i] = r.uniform(-1.0f, 1.0f) * 1e-25f;
        else if (kind == 2) g[i] = r.uniform(-1.0f, 1.0f) * 1e3f;
        else g[i] = r.normal() * std::pow(10.0f, r.uniform(-4.0f, 0.0f));
    }
    return g;
}

State initial_state(size_t n, uint64_t seed) {
    Rng r(seed);
    State s;
    s.w = r.uniform_vec(n, -0.2f, 0.2f);
    s.m.assign(n, 0.0f);
    s.v.assign(n, 0.0f);
    return s;
}

double l2(const std::vector<float> &g) {
    double s = 0.0;
    for (float x : g) s += (double)x * x;
    return std::sqrt(s);
}

// The device's step: w, g, m, v in device buffers at off[0..3] floats past a 256-byte aligned
// base (so off 0 takes the float4 paths, anything else the scalar ones), the norm and
// coefficient read back. dev is the state before on entry and after on return.
struct DeviceOut {
    double norm = NAN, coef = NAN;
};

::testing::AssertionResult device_step(State *dev, const std::vector<float> &g, int64_t t,
                                       double lr, const sf_adamw &hp, double max_norm,
                                       const int off[4], DeviceOut *out) {
    const size_t n = g.size();
    DeviceBuffer<float> bw(n + 4), bg(n + 4), bm(n + 4), bv(n + 4);
    DeviceBuffer<double> stats(2);
    const size_t ws_bytes = sf_cuda_grad_norm_workspace_bytes((int64_t)n);
    DeviceBuffer<double> ws(ws_bytes / sizeof(double));
    if (!bw.get() || !bg.get() || !bm.get() || !bv.get() || !stats.get() || !ws.get()) {
        return ::testing::AssertionFailure() << "cudaMalloc failed";
    }
    float *w = bw.get() + off[0], *dg = bg.get() + off[1], *m = bm.get() + off[2],
          *v = bv.get() + off[3];
    cudaMemcpy(w, dev->w.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemcpy(dg, g.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemcpy(m, dev->m.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemcpy(v, dev->v.data(), n * sizeof(float), cudaMemcpyHostToDevice);
    if (sf_cuda_grad_norm(stats.get(), dg, (int64_t)n, max_norm, ws.get(), ws_bytes, nullptr) !=
        SF_OK) {
        return ::testing::AssertionFailure() << "sf_cuda_grad_norm: " << sf_last_error();
    }
    if (sf_cuda_adamw(w, dg, m, v, (int64_t)n, lr, &hp, t, stats.get() + 1, nullptr) != SF_OK) {
        return ::testing::AssertionFailure() << "sf_cuda_adamw: " << sf_last_error();
    }
    if (cudaDeviceSynchronize() != cudaSuccess) {
        return ::testing::AssertionFailure() << "the kernels failed";
    }
    cudaMemcpy(dev->w.data(), w, n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(dev->m.data(), m, n * sizeof(float), cudaMemcpyDeviceToHost);
    cudaMemcpy(dev->v.data(), v, n * sizeof(float), cudaMemcpyDeviceToHost);
    std::vector<double> s = stats.host();
    out->norm = s[0];
    out->coef = s[1];
    // g is only read
    std::vector<float> g_after(n);
    cudaMemcpy(g_after.data(), dg, n * sizeof(float), cudaMemcpyDeviceToHost);
    if (memcmp(g_after.data(), g.data(), n * sizeof(float)) != 0) {
        return ::testing::AssertionFailure() << "the kernels wrote g";
    }
    return ::testing::AssertionSuccess();
}

// The CPU trainer's step: sf_clip_grad_norm, then sf_adamw_step. g_clipped receives the
// gradient AdamW saw; returns the norm before clipping.
double cpu_step(State *s, const std::vector<float> &g, int64_t t, double lr, const sf_adamw &hp,
                double max_norm, std::vector<float> *g_clipped) {
    *g_clipped = g;
    const double norm = sf_clip_grad_norm(g_clipped->data(), (int64_t)g.size(), max_norm);
    sf_adamw_step(s->w.data(), g_clipped->data(), s->m.data(), s->v.data(), (int64_t)g.size(), lr,
                  &hp, t);
    return norm;
}

// How far w, m and v can move when the clipped gradient element moves from gc to gd (one ulp
// apart), from the common state (w0, m0, v0). Exact-value differences first:
//   m: (1 - b1) |gd - gc|;   v: (1 - b2) |gd^2 - gc^2| = (1 - b2) |gd - gc| (|gd| + |gc|);
//   w: through U = step m / (sqrt(v) c2 + eps) (step = lr / bc1, c2 = 1 / sqrt(bc2)):
//      |dU| <= step (|dm| / den + |m|max c2 |d sqrt(v)| / den^2), den = sqrt(v_lo) c2 + eps,
//      v_lo the smaller exact v, |d sqrt(v)| <= |dv| / (2 sqrt(v_lo)) (or sqrt(|dv|) if 0).
// Then each side rounds its result to fp32 (u of the value, each) and its double operations
// add a few 2^-53 of the magnitudes involved (16 charged); w0 decay is the same bits on both.
struct OneUlp {
    double w, m, v;
};
OneUlp one_ulp_bounds(float w0, float m0, float v0, float gc, float gd, const State &cpu,
                      size_t i, double lr, const sf_adamw &hp, int64_t t) {
    const double b1 = hp.beta1, b2 = hp.beta2;
    const double bc1 = 1.0 - std::pow(b1, (double)t), bc2 = 1.0 - std::pow(b2, (double)t);
    const double step = lr / bc1, c2 = 1.0 / std::sqrt(bc2);
    const double dg = std::fabs((double)gd - (double)gc);
    const double dm = (1.0 - b1) * dg;
    const double dv = (1.0 - b2) * dg * (std::fabs((double)gd) + std::fabs((double)gc));
    const double gmin = std::min(std::fabs((double)gd), std::fabs((double)gc));
    const double v_lo = b2 * (double)v0 + (1.0 - b2) * gmin * gmin;
    const double dsq = v_lo > 0.0 ? dv / (2.0 * std::sqrt(v_lo)) : std::sqrt(dv);
    const double den = std::sqrt(v_lo) * c2 + hp.eps;
    const double m_max = std::fabs(b1 * (double)m0 + (1.0 - b1) * (double)gc) + dm;
    const double du = step * (dm / den + m_max * c2 * dsq / (den * den));
    const double u_max = step * m_max / den;
    auto rounded = [](double d, double ref, double mag) {
        return d + 2.0 * kU * (1.0 + 2.0 * kU) * (std::fabs(ref) + d) + 16.0 * kUd * mag +
               2.0 * kTiny;
    };
    OneUlp b;
    b.m = rounded(dm, cpu.m[i], std::fabs((double)m0) + std::fabs((double)gc) + dm);
    b.v = rounded(dv, cpu.v[i], std::fabs((double)v0) + (double)gc * gc + dv);
    b.w = rounded(du, cpu.w[i], std::fabs((double)w0) + u_max);
    return b;
}

// Compares w, m and v of one step from the common state `before`, the device having scaled
// g by d.coef. Returns the number of elements whose clipped gradient differed by one ulp (they
// got the derived allowance); every other element must be exact.
int64_t compare_elements(const State &before, const std::vector<float> &g, const State &dev,
                         const DeviceOut &d, const State &cpu, const std::vector<float> &g_cpu,
                         double lr, const sf_adamw &hp, int64_t t, const std::string &what) {
    const size_t n = g.size();
    BoundCheck bw(what + " w"), bm(what + " m"), bv(what + " v");
    int64_t inexact = 0, shifted = 0;
    for (size_t i = 0; i < n; i++) {
        // the element AdamW saw on the device: sf_clip_grad_norm's expression, its coefficient
        const float gd = d.coef < 1.0 ? (float)((double)g[i] * d.coef) : g[i];
        const float gc = g_cpu[i];
        if (same_bits(gd, gc)) {
            // the same operations on the same values: the same bits
            if (!same_bits(dev.w[i], cpu.w[i]) || !same_bits(dev.m[i], cpu.m[i]) ||
                !same_bits(dev.v[i], cpu.v[i])) {
                if (inexact++ == 0) {
                    ADD_FAILURE() << what << ": element " << i << " (same clipped gradient "
                                  << gc << ") differs: w " << dev.w[i] << " vs " << cpu.w[i]
                                  << ", m " << dev.m[i] << " vs " << cpu.m[i] << ", v "
                                  << dev.v[i] << " vs " << cpu.v[i];
                }
            }
            continue;
        }
        // one ulp apart, and only then
        shifted++;
        EXPECT_TRUE(gd == std::nextafter(gc, INFINITY) || gd == std::nextafter(gc, -INFINITY))
            << what << ": clipped gradient " << i << ": " << gd << " vs " << gc;
        const OneUlp b =
            one_ulp_bounds(before.w[i], before.m[i], before.v[i], gc, gd, cpu, i, lr, hp, t);
        bw.add(dev.w[i], cpu.w[i], b.w, (int64_t)i);
        bm.add(dev.m[i], cpu.m[i], b.m, (int64_t)i);
        bv.add(dev.v[i], cpu.v[i], b.v, (int64_t)i);
    }
    EXPECT_EQ(inexact, 0) << what << ": elements with the CPU's clipped gradient but other bits";
    EXPECT_TRUE(bw.ok());
    EXPECT_TRUE(bm.ok());
    EXPECT_TRUE(bv.ok());
    if (d.coef >= 1.0) {
        EXPECT_EQ(shifted, 0) << what;  // nothing clipped: nothing may move
    }
    return shifted;
}

// The whole step: the norm, the coefficient, then the elements.
int64_t compare_step(const State &before, const std::vector<float> &g, const State &dev,
                     const DeviceOut &d, const State &cpu, const std::vector<float> &g_cpu,
                     double cpu_norm, double lr, const sf_adamw &hp, int64_t t, double max_norm,
                     const std::string &what) {
    // the norm: (gamma_{n-1} + 2^-52) relative, derived at the top of the file
    const double norm_bound = (sf_test::gamma64((double)g.size() - 1.0) + 2.0 * kUd) * cpu_norm;
    EXPECT_NEAR(d.norm, cpu_norm, norm_bound) << what;
    // the coefficient: the CPU's expression on the device's norm, to the bit
    const double c = max_norm / (d.norm + 1e-6);
    const double want_coef = max_norm > 0.0 && c < 1.0 ? c : 1.0;
    EXPECT_EQ(d.coef, want_coef) << what;
    // the clipping decision agrees (the cases keep the coefficient far from 1)
    const double cpu_c = max_norm / (cpu_norm + 1e-6);
    EXPECT_EQ(d.coef < 1.0, max_norm > 0.0 && cpu_c < 1.0) << what;
    return compare_elements(before, g, dev, d, cpu, g_cpu, lr, hp, t, what);
}

std::string label(size_t n, const int off[4], int step) {
    return "n " + std::to_string(n) + " offsets (" + std::to_string(off[0]) + "," +
           std::to_string(off[1]) + "," + std::to_string(off[2]) + "," + std::to_string(off[3]) +
           ") step " + std::to_string(step);
}

// The sizes: one element, fewer than a float4, exactly one, one past a power of two (the
// tail), and a few million (many strides of the grid, 1024 norm blocks).
constexpr size_t kSizes[] = {1, 3, 4, 4097, 3000001};

// Pointer offsets (floats): all aligned (float4 paths), all off by one, each array off
// differently (the scalar AdamW path with an aligned g).
constexpr int kOffsets[][4] = {{0, 0, 0, 0}, {1, 1, 1, 1}, {0, 1, 2, 3}};

// ------------------------------------------------------------------------------------------
// GPU against CPU
// ------------------------------------------------------------------------------------------

// The norm and coefficient alone, with clipping off, active and inactive; and the same bits
// on a second run (a fixed summation tree).
TEST(CudaOptim, NormAndClipCoefficient) {
    SF_SKIP_WITHOUT_GPU();
    for (size_t n : kSizes) {
        for (int o : {0, 1, 3}) {
            const std::vector<float> g = gradient(n, 100 + n + o);
            const double exact = l2(g);
            for (double max_norm : {0.0, 0.37 * exact, 2.3 * exact, -1.0}) {
                const std::string what = "n " + std::to_string(n) + " offset " +
                                         std::to_string(o) + " max_norm " +
                                         std::to_string(max_norm);
                DeviceBuffer<float> bg(n + 4);
                DeviceBuffer<double> stats(2);
                const size_t ws_bytes = sf_cuda_grad_norm_workspace_bytes((int64_t)n);
                DeviceBuffer<double> ws(ws_bytes / sizeof(double));
                float *dg = bg.get() + o;
                cudaMemcpy(dg, g.data(), n * sizeof(float), cudaMemcpyHostToDevice);
                std::vector<double> runs[2];
                for (auto &r : runs) {
                    ASSERT_EQ(sf_cuda_grad_norm(stats.get(), dg, (int64_t)n, max_norm, ws.get(),
                                                ws_bytes, nullptr),
                              SF_OK)
                        << sf_last_error();
                    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
                    r = stats.host();
                }
                EXPECT_EQ(memcmp(runs[0].data(), runs[1].data(), 2 * sizeof(double)), 0) << what;
                std::vector<float> gc = g;
                const double cpu_norm = sf_clip_grad_norm(gc.data(), (int64_t)n, max_norm);
                // (gamma_{n-1} + 2^-52) relative: derived at the top of the file
                EXPECT_NEAR(runs[0][0], cpu_norm,
                            (sf_test::gamma64((double)n - 1.0) + 2.0 * kUd) * cpu_norm)
                    << what;
                const double c = max_norm / (runs[0][0] + 1e-6);
                EXPECT_EQ(runs[0][1], max_norm > 0.0 && c < 1.0 ? c : 1.0) << what;
            }
        }
    }
}

// n == 0: a norm of 0, and a coefficient from it (the CPU's too).
TEST(CudaOptim, NormOfNothing) {
    SF_SKIP_WITHOUT_GPU();
    DeviceBuffer<double> stats(2), ws(sf_cuda_grad_norm_workspace_bytes(0) / sizeof(double));
    ASSERT_EQ(sf_cuda_grad_norm(stats.get(), nullptr, 0, 1.0, ws.get(),
                                sf_cuda_grad_norm_workspace_bytes(0), nullptr),
              SF_OK);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<double> s = stats.host();
    EXPECT_EQ(s[0], sf_clip_grad_norm(nullptr, 0, 1.0));
    EXPECT_EQ(s[1], 1.0);
    ASSERT_EQ(sf_cuda_grad_norm(stats.get(), nullptr, 0, 1e-7, ws.get(),
                                sf_cuda_grad_norm_workspace_bytes(0), nullptr),
              SF_OK);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(stats.host()[1], 1e-7 / 1e-6);  // a tiny max_norm clips even nothing, as the CPU
}

// Several steps, weight decay on, clipping active (half the norm), inactive (twice it), off,
// active again, and a late step count (bias corrections near 1), each from the common state.
TEST(CudaOptim, AdamwStepsMatchTheCpu) {
    SF_SKIP_WITHOUT_GPU();
    sf_adamw hp = {0.9, 0.999, 1e-8, 0.1};
    const double lrs[] = {1e-3, 3e-4, 1e-3, 5e-5, 2e-3};
    const int64_t ts[] = {1, 2, 3, 4, 1000};
    // x the exact norm; 0: off. Not powers of two: a coefficient near 1/2 scales every element
    // almost exactly, and the rounding the comparison must allow for would never happen.
    const double clip_scale[] = {0.37, 2.3, 0.0, 0.61, 0.37};
    for (size_t n : kSizes) {
        for (const auto &off : kOffsets) {
            State cpu = initial_state(n, 7 + n), dev = cpu;
            int64_t shifted = 0;
            for (int s = 0; s < 5; s++) {
                const std::vector<float> g = gradient(n, 1000 * (uint64_t)s + n + off[1]);
                const double max_norm = clip_scale[s] * l2(g);
                const State before = cpu;
                DeviceOut d;
                ASSERT_TRUE(device_step(&dev, g, ts[s], lrs[s], hp, max_norm, off, &d))
                    << label(n, off, s);
                std::vector<float> gc;
                const double cpu_norm = cpu_step(&cpu, g, ts[s], lrs[s], hp, max_norm, &gc);
                shifted += compare_step(before, g, dev, d, cpu, gc, cpu_norm, lrs[s], hp, ts[s],
                                        max_norm, label(n, off, s));
                if (HasFailure()) return;
                cpu = dev;  // re-base: the next step starts from one state (see the top)
            }
            // How often the one-ulp allowance was used (a boundary straddle needs the two
            // products, about 1e-13 apart relative, to enclose an fp32 rounding boundary):
            // recorded, not bounded, since no count follows from the derivation.
            RecordProperty("one_ulp_elements_n" + std::to_string(n) + "_off" +
                               std::to_string(off[1]) + std::to_string(off[2]),
                           std::to_string(shifted));
        }
    }
}

// Without clipping nothing may differ: the two trajectories run on their own for 12 steps,
// with and without weight decay, through every size and alignment, and stay bit-identical.
TEST(CudaOptim, AdamwWithoutClippingIsTheCpuBitForBit) {
    SF_SKIP_WITHOUT_GPU();
    for (double wd : {0.0, 0.01}) {
        const sf_adamw hp = {0.9, 0.95, 1e-6, wd};
        for (size_t n : kSizes) {
            if (n > 100000) continue;  // the large size is covered above; 12 steps of it are slow
            for (const auto &off : kOffsets) {
                State cpu = initial_state(n, 3 + n), dev = cpu;
                for (int s = 0; s < 12; s++) {
                    const std::vector<float> g = gradient(n, 77 * (uint64_t)s + n);
                    const double max_norm = s % 2 ? 0.0 : 10.0 * l2(g);  // off, or never reached
                    DeviceOut d;
                    ASSERT_TRUE(device_step(&dev, g, s + 1, 1e-3, hp, max_norm, off, &d));
                    std::vector<float> gc;
                    cpu_step(&cpu, g, s + 1, 1e-3, hp, max_norm, &gc);
                    EXPECT_EQ(d.coef, 1.0);
                    // the same IEEE operations in the same order on the same values
                    ASSERT_EQ(memcmp(dev.w.data(), cpu.w.data(), n * sizeof(float)), 0)
                        << label(n, off, s) << " wd " << wd;
                    ASSERT_EQ(memcmp(dev.m.data(), cpu.m.data(), n * sizeof(float)), 0);
                    ASSERT_EQ(memcmp(dev.v.data(), cpu.v.data(), n * sizeof(float)), 0);
                }
            }
        }
    }
}

// A NaN in the gradient: the norm is NaN, nothing is clipped (the CPU's comparison fails the
// same way), and only that element's w, m and v become NaN, as on the CPU.
TEST(CudaOptim, NanGradientStaysInItsElement) {
    SF_SKIP_WITHOUT_GPU();
    const size_t n = 37;
    std::vector<float> g = gradient(n, 5);
    g[9] = NAN;
    const sf_adamw hp = {0.9, 0.999, 1e-8, 0.01};
    State cpu = initial_state(n, 6), dev = cpu;
    const int off[4] = {0, 0, 0, 0};
    DeviceOut d;
    ASSERT_TRUE(device_step(&dev, g, 1, 1e-3, hp, 1.0, off, &d));
    std::vector<float> gc;
    const double cpu_norm = cpu_step(&cpu, g, 1, 1e-3, hp, 1.0, &gc);
    EXPECT_TRUE(std::isnan(d.norm) && std::isnan(cpu_norm));
    EXPECT_EQ(d.coef, 1.0);
    for (size_t i = 0; i < n; i++) {
        if (i == 9) {
            EXPECT_TRUE(std::isnan(dev.w[i]) && std::isnan(dev.m[i]) && std::isnan(dev.v[i]));
            continue;
        }
        EXPECT_TRUE(same_bits(dev.w[i], cpu.w[i]) && same_bits(dev.m[i], cpu.m[i]) &&
                    same_bits(dev.v[i], cpu.v[i]))
            << i;
    }
}

// ------------------------------------------------------------------------------------------
// The allowance itself, on the CPU (no device): a real GPU run rarely, and the emulator never,
// moves a clipped element, so the one-ulp path of compare_elements is exercised here. The
// "device" is the CPU twin clipping with a coefficient moved by 2^-30 relative (far more than
// the norms can differ, so that many elements round one ulp away, and far less than an ulp,
// so that none moves further): compare_elements must accept each of them within the derived
// allowance, and still demand exactness of the rest.
// ------------------------------------------------------------------------------------------

TEST(CudaOptimBounds, OneUlpAllowanceCoversAMovedCoefficient) {
    const size_t n = 200000;
    const sf_adamw hp = {0.9, 0.999, 1e-8, 0.1};
    State cpu = initial_state(n, 91);
    std::vector<float> scratch;
    for (int64_t t = 1; t <= 3; t++) {  // moments from a few steps, not zeros
        cpu_step(&cpu, gradient(n, 300 + (uint64_t)t), t, 1e-3, hp, 0.0, &scratch);
    }
    const std::vector<float> g = gradient(n, 400);
    const double max_norm = 0.37 * l2(g);
    const State before = cpu;
    std::vector<float> gc;
    const double cpu_norm = cpu_step(&cpu, g, 4, 1e-3, hp, max_norm, &gc);
    DeviceOut d;
    d.norm = cpu_norm;
    d.coef = max_norm / (cpu_norm + 1e-6) * (1.0 + 0x1p-30);
    State dev = before;
    std::vector<float> gd(n);
    for (size_t i = 0; i < n; i++) gd[i] = (float)((double)g[i] * d.coef);
    sf_adamw_step(dev.w.data(), gd.data(), dev.m.data(), dev.v.data(), (int64_t)n, 1e-3, &hp, 4);
    const int64_t shifted =
        compare_elements(before, g, dev, d, cpu, gc, 1e-3, hp, 4, "moved coefficient");
    EXPECT_GT(shifted, 0) << "no element straddled: the allowance went untested";
    RecordProperty("one_ulp_elements", std::to_string(shifted));
}

// ------------------------------------------------------------------------------------------
// Argument checks: before any CUDA call (the pointers below are host memory)
// ------------------------------------------------------------------------------------------

TEST(CudaOptimArgs, WorkspaceSize) {
    EXPECT_EQ(sf_cuda_grad_norm_workspace_bytes(0), sizeof(double));
    EXPECT_EQ(sf_cuda_grad_norm_workspace_bytes(1), sizeof(double));
    EXPECT_EQ(sf_cuda_grad_norm_workspace_bytes(4096), sizeof(double));
    EXPECT_EQ(sf_cuda_grad_norm_workspace_bytes(4097), 2 * sizeof(double));
    EXPECT_EQ(sf_cuda_grad_norm_workspace_bytes((int64_t)1 << 40), 1024 * sizeof(double));
    EXPECT_EQ(sf_cuda_grad_norm_workspace_bytes(-5), sizeof(double));
}

TEST(CudaOptimArgs, GradNormRejectsBadArguments) {
    alignas(16) static float g[64];
    alignas(16) static double out[2], ws[4];
    const size_t wsb = sizeof ws;
    sf_clear_error();
    EXPECT_EQ(sf_cuda_grad_norm(out, g, -1, 1.0, ws, wsb, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(mentions("sf_cuda_grad_norm")) << sf_last_error();
    EXPECT_EQ(sf_cuda_grad_norm(nullptr, g, 8, 1.0, ws, wsb, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_grad_norm(out, nullptr, 8, 1.0, ws, wsb, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_grad_norm(out, g, 8, 1.0, nullptr, wsb, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_grad_norm((double *)((char *)out + 4), g, 8, 1.0, ws, wsb, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // out not aligned to a double
    EXPECT_EQ(sf_cuda_grad_norm(out, (const float *)((const char *)g + 2), 8, 1.0, ws, wsb,
                                nullptr),
              SF_ERR_INVALID_ARGUMENT);  // g not aligned to a float
    EXPECT_EQ(sf_cuda_grad_norm(out, g, 8, 1.0, (char *)ws + 4, wsb - 8, nullptr),
              SF_ERR_INVALID_ARGUMENT);  // workspace not aligned to a double
    EXPECT_EQ(sf_cuda_grad_norm(out, g, 5000, 1.0, ws, sizeof(double), nullptr),
              SF_ERR_INVALID_ARGUMENT);  // 5000 elements need two partials
    EXPECT_TRUE(mentions("workspace")) << sf_last_error();
    EXPECT_EQ(sf_cuda_grad_norm(out, g, 8, NAN, ws, wsb, nullptr), SF_ERR_INVALID_ARGUMENT);
}

TEST(CudaOptimArgs, AdamwRejectsBadArguments) {
    alignas(16) static float a[4][64];
    alignas(16) static double clip[2];
    float *w = a[0], *m = a[2], *v = a[3];
    const float *g = a[1];
    const sf_adamw hp = {0.9, 0.999, 1e-8, 0.01};
    auto bad = [&](const char *what, float *w_, const float *g_, float *m_, float *v_, int64_t n,
                   double lr, const sf_adamw *h, int64_t t, const double *c) {
        sf_clear_error();
        EXPECT_EQ(sf_cuda_adamw(w_, g_, m_, v_, n, lr, h, t, c, nullptr), SF_ERR_INVALID_ARGUMENT)
            << what;
        EXPECT_TRUE(mentions("sf_cuda_adamw")) << what << ": " << sf_last_error();
    };
    bad("n < 0", w, g, m, v, -1, 1e-3, &hp, 1, clip);
    bad("NULL hp", w, g, m, v, 8, 1e-3, nullptr, 1, clip);
    bad("t = 0", w, g, m, v, 8, 1e-3, &hp, 0, clip);
    bad("negative lr", w, g, m, v, 8, -1e-3, &hp, 1, clip);
    bad("NaN lr", w, g, m, v, 8, NAN, &hp, 1, clip);
    bad("infinite lr", w, g, m, v, 8, INFINITY, &hp, 1, clip);
    for (const sf_adamw &h : {sf_adamw{1.0, 0.999, 1e-8, 0.0}, sf_adamw{-0.1, 0.999, 1e-8, 0.0},
                              sf_adamw{0.9, 1.0, 1e-8, 0.0}, sf_adamw{0.9, NAN, 1e-8, 0.0},
                              sf_adamw{0.9, 0.999, 0.0, 0.0}, sf_adamw{0.9, 0.999, INFINITY, 0.0},
                              sf_adamw{0.9, 0.999, 1e-8, -0.1},
                              sf_adamw{0.9, 0.999, 1e-8, INFINITY}}) {
        bad("hyper-parameters", w, g, m, v, 8, 1e-3, &h, 1, clip);
    }
    bad("NULL w", nullptr, g, m, v, 8, 1e-3, &hp, 1, clip);
    bad("NULL g", w, nullptr, m, v, 8, 1e-3, &hp, 1, clip);
    bad("NULL m", w, g, nullptr, v, 8, 1e-3, &hp, 1, clip);
    bad("NULL v", w, g, m, nullptr, 8, 1e-3, &hp, 1, clip);
    bad("misaligned w", (float *)((char *)w + 2), g, m, v, 8, 1e-3, &hp, 1, clip);
    bad("misaligned v", w, g, m, (float *)((char *)v + 1), 8, 1e-3, &hp, 1, clip);
    bad("misaligned clip", w, g, m, v, 8, 1e-3, &hp, 1, (const double *)((char *)clip + 4));
    bad("m is w", w, g, w, v, 8, 1e-3, &hp, 1, clip);
    bad("v overlaps g", w, g, m, (float *)(g + 4), 8, 1e-3, &hp, 1, clip);
    bad("g overlaps w's end", w, w + 7, m, v, 8, 1e-3, &hp, 1, clip);
    // nothing to do is no error (nothing is launched)
    EXPECT_EQ(sf_cuda_adamw(nullptr, nullptr, nullptr, nullptr, 0, 1e-3, &hp, 1, nullptr,
                            nullptr),
              SF_OK);
    // lr 0 is legal (a cosine schedule may end there); not launched here: n == 0
    EXPECT_EQ(sf_cuda_adamw(w, g, m, v, 0, 0.0, &hp, 1, clip, nullptr), SF_OK);
}

}  // namespace
