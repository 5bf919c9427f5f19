// The Sysformer's training pass (host/sysformer/backward_cpu.c): the taped forward is the
// inference forward bit for bit, and the backward's weight gradients agree with finite
// differences of an independent double-precision forward written here, for every tensor, in
// pre-LN and post-LN, relu and gelu, with and without the final norm, over a packed batch that
// mixes lengths and holds requests with no system rows.
#include <gtest/gtest.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "sysformer.h"
#include "sysformer/module.h"
#include "train/train.h"

namespace {

sf_sysformer_config small_config(int d, int layers, int heads, bool norm_first,
                                 sf_activation act, bool final_norm) {
    sf_sysformer_config c;
    memset(&c, 0, sizeof c);
    c.d_model = d;
    c.num_layers = layers;
    c.num_heads = heads;
    c.dim_feedforward = 32;
    c.activation = act;
    c.norm_first = norm_first;
    c.layer_norm_eps = 1e-5f;
    c.final_norm = final_norm;
    c.has_classifier = true;
    c.llm_hidden_size = d;
    return c;
}

// A Sysformer whose every weight is random, as after training: matrices and biases
// U(+-1/sqrt(fan_in)) as nn.Linear draws them (out_proj and linear2 too, which a fresh one
// zeroes, so every branch is open), norms near (1, 0) but not at it. No LLM is needed: this
// is what sf_sysformer_init does after its checks.
sf_sysformer *random_sysformer(const sf_sysformer_config &c, uint64_t seed) {
    EXPECT_EQ(sf_sysformer_check_config(&c, nullptr, "test"), SF_OK) << sf_last_error();
    sf_sysformer *sf = static_cast<sf_sysformer *>(calloc(1, sizeof(sf_sysformer)));
    EXPECT_EQ(sf_sysformer_set_config(sf, &c), SF_OK);
    EXPECT_EQ(sf_sysformer_alloc(sf), SF_OK);
    int64_t n = 0;
    sf_sysformer_tensor *t = sf_sysformer_tensors(sf, &n);
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (int64_t i = 0; i < n; i++) {
        const int64_t numel = t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
        const bool norm = strstr(t[i].name, "norm") != nullptr;
        const bool weight = strstr(t[i].name, "weight") != nullptr;
        const double fan_in = strstr(t[i].name, "linear2") ? c.dim_feedforward : c.d_model;
        float *p = *t[i].slot;
        for (int64_t j = 0; j < numel; j++) {
            if (norm) p[j] = (float)((weight ? 1.0 : 0.0) + 0.3 * u(rng));
            else p[j] = (float)(u(rng) / sqrt(fan_in));
        }
    }
    free(t);
    return sf;
}

struct SfFree {
    void operator()(sf_sysformer *p) const { sf_sysformer_free(p); }
};
struct TapeFree {
    void operator()(sf_sysformer_tape *p) const { sf_sysformer_tape_free(p); }
};
using SfPtr = std::unique_ptr<sf_sysformer, SfFree>;
using TapePtr = std::unique_ptr<sf_sysformer_tape, TapeFree>;

std::vector<float> uniform_floats(size_t n, uint64_t seed, double lo, double hi) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<float> v(n);
    for (auto &f : v) f = (float)u(rng);
    return v;
}

// A packed batch: mixed lengths, two requests without system rows (one with user rows, whose
// keys and values must get no gradient, one empty), a one-row system span. With a learned
// system offset of offset_rows rows every system span has that length instead (it must).
struct Batch {
    std::vector<int32_t> cu_s{0}, cu_u{0};
    std::vector<float> sys, usr;
    Batch(int d, uint64_t seed, int offset_rows = 0) {
        const int o = offset_rows;
        const int ns[5] = {o ? o : 3, 0, o ? o : 6, 0, o ? o : 1}, nu[5] = {5, 4, 2, 0, 7};
        for (int r = 0; r < 5; r++) {
            cu_s.push_back(cu_s.back() + ns[r]);
            cu_u.push_back(cu_u.back() + nu[r]);
        }
        sys = uniform_floats((size_t)cu_s.back() * d, seed, -2.0, 2.0);
        usr = uniform_floats((size_t)cu_u.back() * d, seed + 1, -2.0, 2.0);
    }
    sf_rewrite_batch view() const {
        return sf_rewrite_batch{(int32_t)cu_s.size() - 1, cu_s.data(), cu_u.data(), sys.data(),
                                usr.data()};
    }
    int64_t ts() const { return cu_s.back(); }
};

// ---- the double-precision reference forward ---------------------------------------------------

// Where each tensor lives in the flat weight array.
struct Layout {
    struct Mha {
        int64_t in_w, in_b, out_w, out_b;
    };
    struct Layer {
        Mha sa, ca;
        int64_t l1w, l1b, l2w, l2b, nw[3], nb[3];
    };
    std::vector<Layer> layers;
    int64_t fnw = -1, fnb = -1, offset = -1;
    explicit Layout(const sf_sysformer *sf) {
        auto off = [&](const float *p) { return (int64_t)(p - sf->weights); };
        for (int i = 0; i < sf->cfg.num_layers; i++) {
            const sf_sysformer_layer &L = sf->layers[i];
            Layer l;
            l.sa = {off(L.self_attn.in_proj_weight), off(L.self_attn.in_proj_bias),
                    off(L.self_attn.out_proj_weight), off(L.self_attn.out_proj_bias)};
            l.ca = {off(L.cross_attn.in_proj_weight), off(L.cross_attn.in_proj_bias),
                    off(L.cross_attn.out_proj_weight), off(L.cross_attn.out_proj_bias)};
            l.l1w = off(L.linear1_weight);
            l.l1b = off(L.linear1_bias);
            l.l2w = off(L.linear2_weight);
            l.l2b = off(L.linear2_bias);
            for (int j = 0; j < 3; j++) {
                l.nw[j] = off(L.norm_weight[j]);
                l.nb[j] = off(L.norm_bias[j]);
            }
            layers.push_back(l);
        }
        if (sf->cfg.final_norm) {
            fnw = off(sf->final_norm_weight);
            fnb = off(sf->final_norm_bias);
        }
        if (sf->cfg.system_offset_rows > 0) offset = off(sf->system_offset);
    }
};

using Vec = std::vector<double>;

// out[r, o] = b[o] + sum_i x[r, i] w[o, i]
void ref_linear(Vec &out, const Vec &x, int64_t rows, const double *w, const double *b,
                int64_t n, int64_t k) {
    out.assign((size_t)(rows * n), 0.0);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t o = 0; o < n; o++) {
            double s = b[o];
            for (int64_t i = 0; i < k; i++) s += x[r * k + i] * w[o * k + i];
            out[r * n + o] = s;
        }
}

void ref_layernorm(Vec &x, int64_t rows, int64_t d, const double *w, const double *b,
                   double eps) {
    for (int64_t r = 0; r < rows; r++) {
        double *xr = &x[r * d], mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < d; i++) mean += xr[i];
        mean /= (double)d;
        for (int64_t i = 0; i < d; i++) var += (xr[i] - mean) * (xr[i] - mean);
        const double rstd = 1.0 / sqrt(var / (double)d + eps);
        for (int64_t i = 0; i < d; i++) xr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
    }
}

// Multi-head attention of queries xq (request r: rows cu_q[r]..) over keys/values xkv.
void ref_mha(Vec &y, const Vec &xq, const Vec &xkv, const std::vector<int32_t> &cu_q,
             const std::vector<int32_t> &cu_kv, const double *W, const Layout::Mha &m, int d,
             int heads) {
    const int64_t tq = cu_q.back(), tkv = cu_kv.back(), dd = (int64_t)d * d;
    Vec q, k, v;
    ref_linear(q, xq, tq, W + m.in_w, W + m.in_b, d, d);
    ref_linear(k, xkv, tkv, W + m.in_w + dd, W + m.in_b + d, d, d);
    ref_linear(v, xkv, tkv, W + m.in_w + 2 * dd, W + m.in_b + 2 * d, d, d);
    const int hd = d / heads;
    Vec a((size_t)(tq * d), 0.0), p;
    for (size_t r = 0; r + 1 < cu_q.size(); r++) {
        for (int64_t i = cu_q[r]; i < cu_q[r + 1]; i++)
            for (int h = 0; h < heads; h++) {
                const int64_t k0 = cu_kv[r], nk = cu_kv[r + 1] - k0;
                p.assign((size_t)nk, 0.0);
                double mx = -1e300, sum = 0.0;
                for (int64_t j = 0; j < nk; j++) {
                    double s = 0.0;
                    for (int e = 0; e < hd; e++)
                        s += q[i * d + h * hd + e] * k[(k0 + j) * d + h * hd + e];
                    p[j] = s / sqrt((double)hd);
                    mx = std::max(mx, p[j]);
                }
                for (int64_t j = 0; j < nk; j++) sum += (p[j] = exp(p[j] - mx));
                for (int64_t j = 0; j < nk; j++)
                    for (int e = 0; e < hd; e++)
                        a[i * d + h * hd + e] += p[j] / sum * v[(k0 + j) * d + h * hd + e];
            }
    }
    ref_linear(y, a, tq, W + m.out_w, W + m.out_b, d, d);
}

// S' for weights W; relu_signs (when not NULL) receives every relu input's sign, so that a
// finite difference can tell whether its two points straddle a kink.
Vec ref_forward(const sf_sysformer_config &c, const Layout &lay, const Vec &Wv, const Batch &b,
                std::vector<char> *relu_signs) {
    const double *W = Wv.data();
    const int d = c.d_model, ff = c.dim_feedforward;
    const int64_t ts = b.ts();
    Vec x(b.sys.begin(), b.sys.end()), m(b.usr.begin(), b.usr.end()), h, y, f;
    if (relu_signs) relu_signs->clear();
    if (lay.offset >= 0) { // X = S + offset, the same rows for every request with a span
        const int64_t rows = c.system_offset_rows;
        for (size_t r = 0; r + 1 < b.cu_s.size(); r++)
            for (int64_t i = 0; b.cu_s[r + 1] > b.cu_s[r] && i < rows * d; i++)
                x[b.cu_s[r] * d + i] += W[lay.offset + i];
    }
    auto block = [&](int j, const Layout::Layer &L, const Vec &in, Vec &out) {
        if (j == 0) ref_mha(out, in, in, b.cu_s, b.cu_s, W, L.sa, d, c.num_heads);
        if (j == 1) ref_mha(out, in, m, b.cu_s, b.cu_u, W, L.ca, d, c.num_heads);
        if (j == 2) {
            ref_linear(f, in, ts, W + L.l1w, W + L.l1b, ff, d);
            for (double &z : f) {
                if (c.activation == SF_ACT_GELU) {
                    z = 0.5 * z * (1.0 + erf(z / sqrt(2.0)));
                } else {
                    if (relu_signs) relu_signs->push_back(z > 0.0);
                    z = z > 0.0 ? z : 0.0;
                }
            }
            ref_linear(out, f, ts, W + L.l2w, W + L.l2b, d, ff);
        }
    };
    for (const auto &L : lay.layers) {
        for (int j = 0; j < 3; j++) {
            if (c.norm_first) {
                h = x;
                ref_layernorm(h, ts, d, W + L.nw[j], W + L.nb[j], c.layer_norm_eps);
                block(j, L, h, y);
                for (size_t i = 0; i < x.size(); i++) x[i] += y[i];
            } else {
                block(j, L, x, y);
                for (size_t i = 0; i < x.size(); i++) x[i] += y[i];
                ref_layernorm(x, ts, d, W + L.nw[j], W + L.nb[j], c.layer_norm_eps);
            }
        }
    }
    if (c.final_norm) ref_layernorm(x, ts, d, W + lay.fnw, W + lay.fnb, c.layer_norm_eps);
    return x;
}

double dot(const Vec &a, const std::vector<float> &r) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * (double)r[i];
    return s;
}

// ---- the parameterised checks -----------------------------------------------------------------

struct Case {
    int d, layers, heads;
    bool norm_first;
    sf_activation act;
    bool final_norm;
    int offset_rows; // a learned system offset; with 0 layers the SystemEmbedder
};

std::string case_name(const ::testing::TestParamInfo<Case> &info) {
    const Case &c = info.param;
    return std::string(c.norm_first ? "PreLN" : "PostLN") +
           (c.act == SF_ACT_GELU ? "Gelu" : "Relu") + (c.final_norm ? "FinalNorm" : "") + "D" +
           std::to_string(c.d) + "L" + std::to_string(c.layers) + "H" + std::to_string(c.heads) +
           (c.offset_rows ? "Offset" + std::to_string(c.offset_rows) : "");
}

class SysformerBackwardConfigs : public ::testing::TestWithParam<Case> {
  protected:
    void SetUp() override {
        const Case &p = GetParam();
        cfg_ = small_config(p.d, p.layers, p.heads, p.norm_first, p.act, p.final_norm);
        cfg_.system_offset_rows = p.offset_rows;
        sf_.reset(random_sysformer(cfg_, 100 + p.d + 7 * p.layers + p.norm_first));
    }
    sf_sysformer_config cfg_;
    SfPtr sf_;
};

// (1) The taped forward computes what the inference forward computes, bit for bit; also in
// place (system_out == system), which the inference forward allows.
TEST_P(SysformerBackwardConfigs, ForwardTrainIsBitIdenticalToForward) {
    Batch b(cfg_.d_model, 1, cfg_.system_offset_rows);
    const sf_rewrite_batch bv = b.view();
    const size_t n = b.sys.size();
    std::vector<float> want(n), got(n, NAN);
    ASSERT_EQ(sf_sysformer_forward_cpu(sf_.get(), &bv, want.data()), SF_OK) << sf_last_error();
    sf_sysformer_tape *t = nullptr;
    ASSERT_EQ(sf_sysformer_forward_train(sf_.get(), &bv, got.data(), &t), SF_OK)
        << sf_last_error();
    TapePtr tape(t);
    EXPECT_EQ(0, memcmp(want.data(), got.data(), n * sizeof(float)));

    std::vector<float> inplace = b.sys;
    sf_rewrite_batch bi = bv;
    bi.system = inplace.data();
    ASSERT_EQ(sf_sysformer_forward_train(sf_.get(), &bi, inplace.data(), &t), SF_OK);
    sf_sysformer_tape_free(t);
    EXPECT_EQ(0, memcmp(want.data(), inplace.data(), n * sizeof(float)));
}

// (2) Gradients of L = sum(S' * R) against central differences of the double reference.
//
// Finite differences in double with h = 1e-5 are exact far below what is checked: truncation
// is h^2/6 |L'''| ~ 1e-11 |L'''|, and rounding is 2^-53 sum|terms of L| / h ~ 1e-16 * 1e3 /
// 1e-5 = 1e-8 absolute (|S'| ~ 1, |R| <= 1, ~ 300 terms). The relu kinks are the one hazard
// (a difference across a kink measures neither side's slope): a coordinate whose +-h points
// change any relu input's sign is retried with a 10x smaller h, then skipped (at most a few).
//
// So the error measured is the fp32 backward's own. Each gradient entry is a sum over <= 18
// rows (and d, ff <= 32 features) of products of fp32 activations that each carry a relative
// error of ~ 2^-24 = 6e-8, through ~ 10 op stages per layer (LayerNorm and softmax Jacobians,
// GEMMs); a priori each stage adds a few 2^-24 relative to the terms it sums, and cancellation
// makes those terms up to ~ 10x the entry: ~ 10 x 4 x 6e-8 x 10 = 2.4e-5 at worst, far less
// typically. Per coordinate the bound is
//   |analytic - fd| <= 5e-5 * (|fd| + rms of that tensor's gradient),
// (the rms term: an entry near zero inherits its neighbours' absolute error). Measured over the
// eight configurations: at most 1.3e-6, so ~ 40x margin, while a dropped or misrouted Jacobian
// term misses it by orders of magnitude (checked by mutating the backward).
TEST_P(SysformerBackwardConfigs, GradientsMatchFiniteDifferences) {
    Batch b(cfg_.d_model, 2, cfg_.system_offset_rows);
    const sf_rewrite_batch bv = b.view();
    const size_t n = b.sys.size();
    std::vector<float> out(n);
    sf_sysformer_tape *t = nullptr;
    ASSERT_EQ(sf_sysformer_forward_train(sf_.get(), &bv, out.data(), &t), SF_OK)
        << sf_last_error();
    TapePtr tape(t);
    const std::vector<float> R = uniform_floats(n, 3, -1.0, 1.0);
    sf_sysformer *g = nullptr;
    ASSERT_EQ(sf_sysformer_clone_zero(sf_.get(), &g), SF_OK) << sf_last_error();
    SfPtr grads(g);
    ASSERT_EQ(sf_sysformer_backward(sf_.get(), tape.get(), R.data(), grads.get()), SF_OK)
        << sf_last_error();
    int64_t nw = 0, ng = 0;
    const float *W = sf_sysformer_flat(sf_.get(), &nw);
    const float *G = sf_sysformer_flat(grads.get(), &ng);
    ASSERT_EQ(nw, ng);

    // The reference is the same function: it agrees with the fp32 forward to fp32 accuracy.
    const Layout lay(sf_.get());
    const Vec W0(W, W + nw);
    const Vec ref = ref_forward(cfg_, lay, W0, b, nullptr);
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        worst = std::max(worst, fabs(ref[i] - (double)out[i]));
        scale = std::max(scale, fabs(ref[i]));
    }
    EXPECT_LE(worst, 1e-5 * scale) << "the double reference disagrees with the forward";
    printf("    reference vs forward: max |diff| / max |S'| = %.2e\n", worst / scale);

    // Central difference of L along dir (a unit vector or a coordinate), kinks avoided.
    auto fd = [&](const std::vector<std::pair<int64_t, double>> &dir, double *value) {
        std::vector<char> s0, sp, sm;
        ref_forward(cfg_, lay, W0, b, &s0);
        for (double h = 1e-5; h >= 1e-6; h /= 10.0) {
            Vec wp = W0, wm = W0;
            for (const auto &e : dir) {
                wp[e.first] += h * e.second;
                wm[e.first] -= h * e.second;
            }
            const double lp = dot(ref_forward(cfg_, lay, wp, b, &sp), R);
            const double lm = dot(ref_forward(cfg_, lay, wm, b, &sm), R);
            if (sp == s0 && sm == s0) {
                *value = (lp - lm) / (2.0 * h);
                return true;
            }
        }
        return false;
    };

    // Directional derivative along a random unit direction through all of weight space.
    {
        std::mt19937_64 rng(5);
        std::normal_distribution<double> nd;
        std::vector<std::pair<int64_t, double>> dir((size_t)nw);
        double norm = 0.0;
        for (int64_t i = 0; i < nw; i++) {
            dir[i] = {i, nd(rng)};
            norm += dir[i].second * dir[i].second;
        }
        double analytic = 0.0, gnorm = 0.0;
        for (auto &e : dir) {
            e.second /= sqrt(norm);
            analytic += e.second * (double)G[e.first];
            gnorm += (double)G[e.first] * (double)G[e.first];
        }
        double numeric = 0.0;
        ASSERT_TRUE(fd(dir, &numeric)) << "the random direction straddles relu kinks";
        // For a random unit u, E[(e . u)^2] = |e|^2 / nw: an error vector e as large as the
        // per-coordinate bound below allows (5e-5 of the entries) projects to ~ 5e-5 |G| /
        // sqrt(nw); five times that is the bound.
        const double tol = 2.5e-4 * (fabs(numeric) + sqrt(gnorm / (double)nw));
        EXPECT_NEAR(analytic, numeric, tol) << "directional derivative";
        printf("    directional: |err| / (|fd| + rms G) = %.2e\n",
               fabs(analytic - numeric) / (fabs(numeric) + sqrt(gnorm / (double)nw)));
    }

    // Per-coordinate differences on a sample from every tensor (first, last, random).
    int64_t nt = 0;
    sf_sysformer_tensor *tensors = sf_sysformer_tensors(sf_.get(), &nt);
    ASSERT_NE(tensors, nullptr);
    std::mt19937_64 rng(7);
    double max_ratio = 0.0;
    int skipped = 0, checked = 0;
    for (int64_t ti = 0; ti < nt; ti++) {
        const sf_sysformer_tensor &T = tensors[ti];
        const int64_t numel = T.shape[0] * (T.ndim == 2 ? T.shape[1] : 1);
        const int64_t base = *T.slot - sf_->weights;
        if (strncmp(T.name, "classifier", 10) == 0) {
            for (int64_t i = 0; i < numel; i++) EXPECT_EQ(G[base + i], 0.0f) << T.name;
            continue;
        }
        double rms = 0.0;
        for (int64_t i = 0; i < numel; i++) rms += (double)G[base + i] * G[base + i];
        rms = sqrt(rms / (double)numel);
        EXPECT_GT(rms, 0.0) << T.name << " has no gradient at all";
        std::vector<int64_t> idx = {0, numel - 1};
        for (int s = 0; s < 4; s++) idx.push_back((int64_t)(rng() % (uint64_t)numel));
        for (int64_t i : idx) {
            double numeric = 0.0;
            if (!fd({{base + i, 1.0}}, &numeric)) {
                skipped++;
                continue;
            }
            checked++;
            const double analytic = G[base + i];
            const double ratio = fabs(analytic - numeric) / (fabs(numeric) + rms);
            max_ratio = std::max(max_ratio, ratio);
            EXPECT_LE(ratio, 5e-5) << T.name << "[" << i << "]: analytic " << analytic
                                   << ", finite difference " << numeric;
        }
    }
    free(tensors);
    EXPECT_LE(skipped, 3);
    RecordProperty("max_relative_error", std::to_string(max_ratio));
    printf("    %d coordinates, %d skipped at kinks, max |err| / (|fd| + rms) = %.2e\n", checked,
           skipped, max_ratio);
}

// (3) Gradients are added, never overwritten; the classifier's are left alone.
TEST_P(SysformerBackwardConfigs, GradientsAccumulate) {
    Batch b(cfg_.d_model, 4, cfg_.system_offset_rows);
    const sf_rewrite_batch bv = b.view();
    std::vector<float> out(b.sys.size());
    sf_sysformer_tape *t = nullptr;
    ASSERT_EQ(sf_sysformer_forward_train(sf_.get(), &bv, out.data(), &t), SF_OK);
    TapePtr tape(t);
    const std::vector<float> R = uniform_floats(out.size(), 9, -1.0, 1.0);
    sf_sysformer *g1 = nullptr, *g2 = nullptr;
    ASSERT_EQ(sf_sysformer_clone_zero(sf_.get(), &g1), SF_OK);
    ASSERT_EQ(sf_sysformer_clone_zero(sf_.get(), &g2), SF_OK);
    SfPtr once(g1), twice(g2);
    int64_t n = 0;
    float *a = sf_sysformer_flat(once.get(), &n);
    float *c = sf_sysformer_flat(twice.get(), &n);
    for (int64_t i = 0; i < n; i++) ASSERT_EQ(c[i], 0.0f) << "clone_zero left " << i;
    twice->classifier_weight[0] = 7.0f;
    twice->classifier_bias[0] = -3.0f;
    ASSERT_EQ(sf_sysformer_backward(sf_.get(), tape.get(), R.data(), once.get()), SF_OK);
    ASSERT_EQ(sf_sysformer_backward(sf_.get(), tape.get(), R.data(), twice.get()), SF_OK);
    ASSERT_EQ(sf_sysformer_backward(sf_.get(), tape.get(), R.data(), twice.get()), SF_OK);
    EXPECT_EQ(twice->classifier_weight[0], 7.0f);
    EXPECT_EQ(twice->classifier_bias[0], -3.0f);
    twice->classifier_weight[0] = 0.0f;
    twice->classifier_bias[0] = 0.0f;
    // g + g is exact in fp32; only an op that folds the old value into its own running sum
    // (rather than adding its finished sum) can differ, by a rounding of that sum.
    double worst = 0.0, scale = 0.0;
    for (int64_t i = 0; i < n; i++) {
        worst = std::max(worst, fabs((double)c[i] - 2.0 * (double)a[i]));
        scale = std::max(scale, fabs((double)a[i]));
    }
    EXPECT_GT(scale, 0.0);
    EXPECT_LE(worst, 1e-5 * scale);
}

const Case kCases[] = {
    {16, 2, 2, true, SF_ACT_RELU, false, 0},  {16, 2, 4, true, SF_ACT_GELU, true, 0},
    {24, 1, 4, true, SF_ACT_RELU, true, 0},   {24, 1, 2, true, SF_ACT_GELU, false, 0},
    {16, 2, 2, false, SF_ACT_RELU, false, 0}, {16, 2, 4, false, SF_ACT_GELU, true, 0},
    {24, 1, 4, false, SF_ACT_RELU, true, 0},  {24, 1, 2, false, SF_ACT_GELU, false, 0},
    // the SystemEmbedder (no layers), and a learned offset in front of layers
    {16, 0, 2, true, SF_ACT_RELU, false, 3}, {16, 1, 2, true, SF_ACT_GELU, false, 4},
    {24, 1, 4, false, SF_ACT_RELU, true, 2},
};

INSTANTIATE_TEST_SUITE_P(SysformerBackward, SysformerBackwardConfigs,
                         ::testing::ValuesIn(kCases), case_name);

// (4) Arguments and tapes.
TEST(SysformerBackward, RefusesBadArgumentsAndForeignTapes) {
    const sf_sysformer_config c = small_config(16, 2, 2, true, SF_ACT_RELU, false);
    SfPtr sf(random_sysformer(c, 1));
    Batch b(16, 5);
    sf_rewrite_batch bv = b.view();
    std::vector<float> out(b.sys.size());
    sf_sysformer_tape *t = reinterpret_cast<sf_sysformer_tape *>(0x1);

    EXPECT_EQ(sf_sysformer_forward_train(nullptr, &bv, out.data(), &t), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(t, nullptr);
    EXPECT_EQ(sf_sysformer_forward_train(sf.get(), nullptr, out.data(), &t),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_sysformer_forward_train(sf.get(), &bv, out.data(), nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_sysformer_forward_train(sf.get(), &bv, nullptr, &t), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(t, nullptr);

    // The inference forward's batch rules, each refused with a message and no tape.
    auto refused = [&](const sf_rewrite_batch &bad, const char *what) {
        sf_sysformer_tape *tt = reinterpret_cast<sf_sysformer_tape *>(0x1);
        EXPECT_EQ(sf_sysformer_forward_train(sf.get(), &bad, out.data(), &tt),
                  SF_ERR_INVALID_ARGUMENT)
            << what;
        EXPECT_EQ(tt, nullptr) << what;
        EXPECT_NE(strstr(sf_last_error(), "sf_sysformer_forward_train"), nullptr) << what;
    };
    {
        std::vector<int32_t> cu_u = b.cu_u;
        cu_u[1] = 0;  // request 0 keeps 3 system rows but loses its user rows
        sf_rewrite_batch bad = bv;
        bad.cu_user = cu_u.data();
        refused(bad, "system rows without user rows");
        std::vector<int32_t> cu_s = b.cu_s;
        cu_s[0] = 1;
        bad = bv;
        bad.cu_system = cu_s.data();
        refused(bad, "cu_system[0] != 0");
        cu_s = b.cu_s;
        cu_s[2] = 2;  // decreasing
        bad.cu_system = cu_s.data();
        refused(bad, "offsets decrease");
        bad = bv;
        bad.user = nullptr;
        refused(bad, "NULL user");
        bad = bv;
        bad.n_requests = -1;
        refused(bad, "negative count");
    }

    ASSERT_EQ(sf_sysformer_forward_train(sf.get(), &bv, out.data(), &t), SF_OK);
    TapePtr tape(t);
    std::vector<float> dout(out.size(), 1.0f);
    sf_sysformer *g = nullptr;
    ASSERT_EQ(sf_sysformer_clone_zero(sf.get(), &g), SF_OK);
    SfPtr grads(g);
    EXPECT_EQ(sf_sysformer_backward(nullptr, tape.get(), dout.data(), grads.get()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_sysformer_backward(sf.get(), nullptr, dout.data(), grads.get()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_sysformer_backward(sf.get(), tape.get(), nullptr, grads.get()),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_sysformer_backward(sf.get(), tape.get(), dout.data(), nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_sysformer_backward(sf.get(), tape.get(), dout.data(), sf.get()),
              SF_ERR_INVALID_ARGUMENT);

    // A tape or gradient store of another configuration.
    sf_sysformer_config other = c;
    other.num_layers = 1;
    SfPtr sf1(random_sysformer(other, 2));
    sf_sysformer *g1 = nullptr;
    ASSERT_EQ(sf_sysformer_clone_zero(sf1.get(), &g1), SF_OK);
    SfPtr grads1(g1);
    EXPECT_EQ(sf_sysformer_backward(sf1.get(), tape.get(), dout.data(), grads1.get()),
              SF_ERR_SHAPE);
    EXPECT_EQ(sf_sysformer_backward(sf.get(), tape.get(), dout.data(), grads1.get()),
              SF_ERR_SHAPE);
    other = c;
    other.norm_first = false;
    SfPtr sf2(random_sysformer(other, 3));
    EXPECT_EQ(sf_sysformer_backward(sf2.get(), tape.get(), dout.data(), grads.get()),
              SF_ERR_SHAPE);
    // Every failure above left the gradients untouched.
    int64_t n = 0;
    const float *gw = sf_sysformer_flat(grads.get(), &n);
    EXPECT_EQ(n, sf->n_weights);
    for (int64_t i = 0; i < n; i++) ASSERT_EQ(gw[i], 0.0f) << i;

    // A batch with nothing to rewrite: a tape all the same, and a backward that adds nothing.
    int32_t cu0[3] = {0, 0, 0}, cu_u0[3] = {0, 2, 2};
    sf_rewrite_batch empty = {2, cu0, cu_u0, nullptr, b.usr.data()};
    ASSERT_EQ(sf_sysformer_forward_train(sf.get(), &empty, nullptr, &t), SF_OK)
        << sf_last_error();
    EXPECT_EQ(sf_sysformer_backward(sf.get(), t, nullptr, grads.get()), SF_OK);
    sf_sysformer_tape_free(t);
    for (int64_t i = 0; i < n; i++) ASSERT_EQ(gw[i], 0.0f) << i;

    sf_sysformer_tape_free(nullptr);
    sf_sysformer *z = reinterpret_cast<sf_sysformer *>(0x1);
    EXPECT_EQ(sf_sysformer_clone_zero(nullptr, &z), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(z, nullptr);
    EXPECT_EQ(sf_sysformer_clone_zero(sf.get(), nullptr), SF_ERR_INVALID_ARGUMENT);
    int64_t m = 5;
    EXPECT_EQ(sf_sysformer_flat(nullptr, &m), nullptr);
    EXPECT_EQ(m, 0);
}

// The flat array is every tensor, classifier included, and clone_zero copies the configuration
// (provenance strings included) into storage of its own.
TEST(SysformerBackward, FlatAndCloneZero) {
    sf_sysformer_config c = small_config(24, 2, 4, false, SF_ACT_GELU, true);
    c.llm_name = "tiny";
    c.system_prompt = "Be safe.";
    SfPtr sf(random_sysformer(c, 4));
    int64_t n = 0, count = 0;
    float *w = sf_sysformer_flat(sf.get(), &n);
    EXPECT_EQ(w, sf->weights);
    sf_sysformer_tensor *t = sf_sysformer_tensors(sf.get(), &count);
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++)
        total += t[i].shape[0] * (t[i].ndim == 2 ? t[i].shape[1] : 1);
    free(t);
    EXPECT_EQ(n, total);
    EXPECT_EQ(sf->classifier_bias + 1, w + n);  // the classifier closes the block
    sf_sysformer *z = nullptr;
    ASSERT_EQ(sf_sysformer_clone_zero(sf.get(), &z), SF_OK);
    SfPtr zero(z);
    EXPECT_NE(zero->weights, sf->weights);
    EXPECT_EQ(zero->n_weights, n);
    EXPECT_STREQ(sf_sysformer_get_config(zero.get())->llm_name, "tiny");
    EXPECT_NE(sf_sysformer_get_config(zero.get())->llm_name, c.llm_name);
    EXPECT_STREQ(sf_sysformer_get_config(zero.get())->system_prompt, "Be safe.");
    EXPECT_TRUE(zero->cfg.final_norm);
    EXPECT_EQ(zero->final_norm_bias - zero->weights, sf->final_norm_bias - sf->weights);
    for (int64_t i = 0; i < n; i++) ASSERT_EQ(zero->weights[i], 0.0f) << i;
}

}  // namespace
