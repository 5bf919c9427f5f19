// The frozen LLM's losses and its backward to the input embeddings (host/model/backward_cpu.c),
// on the five tiny transformers fixtures of tests/golden/llm (GQA + llama3 RoPE, sliding
// window, q/k/v biases, longrope with fused projections and sharded weights, tied embeddings).
//
// The batch mixes a 7-token request, a 1-token one and a 19-token one: 19 passes mistral's
// window of 8 and phi3's original context of 16 (so one request uses longrope's long factors
// and another its short ones), and the 1-token request has no next token to predict.
//
// What is checked, and against what:
//   - the loss against log-softmax of sf_llm_forward_cpu's logits (the same forward);
//   - d_input_embeds against central differences of the loss along a random direction, the
//     gradient, a random direction within each row, and single coordinates; the classifier's
//     gradients likewise (the tolerances are derived where they are used);
//   - recompute = true against recompute = false, bit for bit;
//   - the model's weights untouched; the reported bytes against a formula; bad arguments.
#include <gtest/gtest.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "model/llm.h"
#include "sysformer.h"
#include "test_util.h"
#include "train/train.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif

namespace {

using sf_test::kU32;

bool verbose() { return getenv("SF_TEST_VERBOSE") != nullptr; }

struct Model {
    sf_llm *llm = nullptr;
    explicit Model(const std::string &name) {
        const std::string dir = std::string(SF_TEST_DATA_DIR) + "/llm/" + name;
        EXPECT_EQ(sf_llm_load(dir.c_str(), &llm), SF_OK) << sf_last_error();
    }
    ~Model() { sf_llm_free(llm); }
    Model(const Model &) = delete;
    Model &operator=(const Model &) = delete;
    const sf_llm_config &cfg() const { return *sf_llm_get_config(llm); }
};

// A packed batch with its losses: teacher-forced cross-entropy on every row that has a next
// token in its request (plus one row listed twice, so gradients must add, not overwrite), and
// the classifier on each non-empty request's last row.
struct Problem {
    std::vector<int32_t> cu, ids;
    std::vector<float> embeds;
    std::vector<int32_t> ce_rows, ce_targets, class_rows;
    std::vector<float> ce_weights, class_labels, class_weights, class_w;
    float class_b = 0.0f;
    int64_t T = 0, d = 0;

    Problem(const sf_llm *llm, const std::vector<int32_t> &lengths, uint64_t seed) {
        const sf_llm_config *c = sf_llm_get_config(llm);
        d = c->hidden_size;
        sf_test::Rng rng(seed);
        cu.push_back(0);
        for (int32_t n : lengths) cu.push_back(cu.back() + n);
        T = cu.back();
        for (int64_t t = 0; t < T; t++) ids.push_back((int32_t)rng.below(c->vocab_size));
        embeds.resize((size_t)(T * d));
        EXPECT_EQ(sf_llm_embed(llm, ids.data(), T, embeds.data()), SF_OK) << sf_last_error();
        for (size_t r = 0; r + 1 < cu.size(); r++) {
            for (int32_t t = cu[r]; t + 1 < cu[r + 1]; t++) {
                ce_rows.push_back(t);
                ce_targets.push_back(ids[t + 1]);
                ce_weights.push_back(rng.uniform(0.5f, 1.5f));
            }
            if (cu[r + 1] > cu[r]) {
                class_rows.push_back(cu[r + 1] - 1);
                class_labels.push_back((float)(r % 2 == 0));
                class_weights.push_back(rng.uniform(0.5f, 1.5f));
            }
        }
        if (!ce_rows.empty()) {
            ce_rows.push_back(ce_rows[0]);
            ce_targets.push_back((int32_t)rng.below(c->vocab_size));
            ce_weights.push_back(0.75f);
        }
        // |z| = |h . w| ~ 0.3 / sqrt(3) * sqrt(d) ~ 1.4 for d = 64 with |h_j| ~ 1: the sigmoid
        // is neither flat nor saturated, so the classifier's gradient is well exercised.
        class_w = rng.uniform_vec((size_t)d, -0.3f, 0.3f);
        class_b = 0.25f;
    }

    int32_t n_requests() const { return (int32_t)cu.size() - 1; }

    sf_llm_loss_spec spec(bool ce, bool cls) const {
        sf_llm_loss_spec s = {};
        if (ce) {
            s.n_ce = (int32_t)ce_rows.size();
            s.ce_rows = ce_rows.data();
            s.ce_targets = ce_targets.data();
            s.ce_weights = ce_weights.data();
        }
        if (cls) {
            s.n_class = (int32_t)class_rows.size();
            s.class_rows = class_rows.data();
            s.class_labels = class_labels.data();
            s.class_weights = class_weights.data();
        }
        s.class_w = class_w.data();
        s.class_b = class_b;
        return s;
    }
};

const std::vector<int32_t> kLengths = {7, 1, 19};

// The loss alone (no gradient) at the given embeddings.
double loss_at(const sf_llm *llm, const Problem &p, const float *embeds,
               const sf_llm_loss_spec &spec) {
    sf_llm_loss_result res = {};
    sf_status st = sf_llm_loss_backward_cpu(llm, p.n_requests(), p.cu.data(), embeds, &spec,
                                            nullptr, &res, nullptr, nullptr, nullptr);
    EXPECT_EQ(st, SF_OK) << sf_last_error();
    return res.total;
}

uint64_t fnv1a(const void *data, size_t n, uint64_t h = 1469598103934665603ull) {
    const unsigned char *b = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

class LlmBackward : public ::testing::TestWithParam<const char *> {};

// (1) The forward is sf_llm_forward_cpu's: the cross-entropy equals the one computed here in
// double from its logits. Both run the same op calls on the same shapes up to the last hidden
// state, so the hidden states agree bit for bit; only the LM head's GEMM may differ, since it
// runs here on chunks of at most 64 rows (98 rows take two, and the short chunk may take the
// portable loop rather than BLAS). A logit then moves by a few u times sum_j |h_j w_j| (a
// different summation order), which for these models is within ~10x of max |z|, so ~1e-6
// max |z|; a row's CE moves by at most twice its largest logit change. Hence the tolerance
// 2e-6 max|z| per unit of weight. A real bug (a wrong row, target or weight) moves a row by ~1.
TEST_P(LlmBackward, LossMatchesForwardLogits) {
    Model m(GetParam());
    ASSERT_NE(m.llm, nullptr);
    // 98 scored rows: the head runs in two chunks (64 + 34).
    Problem p(m.llm, {60, 1, 40}, 11);
    const sf_llm_loss_spec spec = p.spec(true, false);
    sf_llm_loss_result res = {};
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &spec, nullptr, &res, nullptr, nullptr, nullptr),
              SF_OK)
        << sf_last_error();

    const int64_t vocab = m.cfg().vocab_size;
    sf_batch b = {};
    b.n_requests = p.n_requests();
    b.cu_seqlens = p.cu.data();
    b.input_embeds = p.embeds.data();
    b.n_logit_rows = spec.n_ce;
    b.logit_rows = spec.ce_rows;
    std::vector<float> logits((size_t)(spec.n_ce * vocab));
    ASSERT_EQ(sf_llm_forward_cpu(m.llm, &b, logits.data()), SF_OK) << sf_last_error();

    double want = 0.0, sum_w = 0.0, max_z = 0.0;
    int32_t correct = 0;
    for (int32_t i = 0; i < spec.n_ce; i++) {
        const float *z = logits.data() + i * vocab;
        double mx = z[0];
        int64_t best = 0;
        for (int64_t v = 0; v < vocab; v++) {
            if (z[v] > mx) mx = z[v], best = v;
            max_z = std::max(max_z, fabs((double)z[v]));
        }
        double s = 0.0;
        for (int64_t v = 0; v < vocab; v++) s += exp((double)z[v] - mx);
        want += spec.ce_weights[i] * (mx + log(s) - z[spec.ce_targets[i]]);
        sum_w += spec.ce_weights[i];
        correct += best == spec.ce_targets[i];
    }
    const double tol = 2e-6 * sum_w * max_z;
    EXPECT_NEAR(res.ce, want, tol);
    EXPECT_EQ(res.cls, 0.0);
    EXPECT_EQ(res.total, res.ce);
    EXPECT_EQ(res.ce_correct, correct);
    if (verbose()) {
        printf("  %-18s CE %.9f  |err| %.2e  tol %.2e  correct %d/%d\n", GetParam(), res.ce,
               fabs(res.ce - want), tol, res.ce_correct, spec.n_ce);
    }
}

// Central differences along a direction v, with the step and the tolerance derived from the
// two errors of the estimate (L(x + t v) - L(x - t v)) / 2t of L'(x; v):
//   truncation  t^2 / 6 |L'''|;
//   rounding    dL / t, dL the loss's own rounding error at each end.
// dL: the forward is fp32, so each of the N roundings on a path from an embedding to the loss
// (per layer the q/k/v and gate/up dot products over d, attention over head_dim and up to
// T_max keys, the output projections over q_dim and ff, the two norms over d; then the head
// over d and the log-sum-exp over the vocabulary) perturbs the loss by about u |L|. Rounding
// errors of random sign add as a random walk, so dL ~ u |L| sqrt(N) (N ~ 1000 here, dL ~
// 2.5e-4; the loss's measured scatter under tiny input jitter is ~1e-5, 25x below that).
// L''' is measured along v by a third difference, (L(2s) - 2 L(s) + 2 L(-s) - L(-2s)) / 2 s^3,
// at a scale s near the step t; estimates at s and s / 3 agree within ~30%, so the truncation
// term counts it twice. The step balances the two terms, t = cbrt(3 dL / |L'''|): ~4e-3 of the
// embeddings' scale along a full-size random direction (L''' ~ 1e4), ~3e-4 along the gradient
// (L''' ~ 2e7-5e7). (The usual relative step of 1e-2 would leave 2-18% truncation errors on
// these random models, whose attention logits are large.)
struct FdCheck {
    double analytic = 0.0, fd = 0.0, tol = 0.0, t = 0.0;
};

FdCheck central_difference(const std::function<double(const std::vector<float> &)> &loss,
                           const std::vector<float> &x0, const std::vector<float> &grad,
                           const std::vector<float> &v, double dL) {
    const size_t n = x0.size();
    auto shifted = [&](double t) {
        std::vector<float> x(n);
        for (size_t i = 0; i < n; i++) x[i] = (float)(x0[i] + t * v[i]);
        return x;
    };
    auto L = [&](double t) { return loss(shifted(t)); };
    // L''' at the scale of the step that it sets: start at s = 1e-2, and while the balanced
    // step t comes out much smaller than s, measure again at s = 2t (along the gradient, a
    // sharply curved direction, L''' read at s = 1e-2 is 15x below its value at 1e-3).
    FdCheck c;
    double s = 1e-2, l3 = 0.0;
    for (int iter = 0; iter < 4; iter++) {
        l3 = fabs(L(2 * s) - 2 * L(s) + 2 * L(-s) - L(-2 * s)) / (2 * s * s * s);
        c.t = std::min(1e-2, std::cbrt(3.0 * dL / std::max(l3, 1e-30)));
        if (s <= 3 * c.t) break;
        s = 2 * c.t;
    }
    // The steps actually taken are the fp32 differences x+ - x-, so the analytic derivative is
    // taken along those rather than along v.
    const std::vector<float> xp = shifted(c.t), xm = shifted(-c.t);
    for (size_t i = 0; i < n; i++) c.analytic += (double)grad[i] * ((double)xp[i] - xm[i]);
    c.analytic /= 2 * c.t;
    c.fd = (loss(xp) - loss(xm)) / (2 * c.t);
    c.tol = 2.0 * c.t * c.t / 6.0 * l3 + dL / c.t;
    return c;
}

// The roundings on one path from an input embedding to the loss (see above).
double path_roundings(const sf_llm_config &c, int64_t max_len) {
    const double per_layer = 3.0 * c.hidden_size + (double)c.num_heads * c.head_dim +
                             c.intermediate_size + c.head_dim + (double)max_len;
    return c.num_layers * per_layer + c.hidden_size + c.vocab_size;
}

std::vector<float> scaled(std::vector<float> v, double norm) {
    double s = 0.0;
    for (float x : v) s += (double)x * x;
    for (float &x : v) x = (float)(x * norm / sqrt(s));
    return v;
}

// (2) d_input_embeds against central differences of the loss (both terms on): along a random
// direction over every coordinate, along the gradient itself (the largest derivative, so the
// sharpest relative check), along a random direction within each single row (so that a wrong
// gradient on one row -- the 1-token request, a row past the window -- cannot hide in a sum),
// and along single coordinates: the three of largest |gradient| and two random ones.
TEST_P(LlmBackward, InputGradientMatchesFiniteDifferences) {
    Model m(GetParam());
    ASSERT_NE(m.llm, nullptr);
    Problem p(m.llm, kLengths, 23);
    const sf_llm_loss_spec spec = p.spec(true, true);
    const size_t n = p.embeds.size();

    sf_llm_loss_result res = {};
    std::vector<float> grad(n, NAN);
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &spec, nullptr, &res, grad.data(), nullptr, nullptr),
              SF_OK)
        << sf_last_error();
    for (float g : grad) ASSERT_TRUE(std::isfinite(g));
    EXPECT_GT(res.ce, 0.0);
    EXPECT_GT(res.cls, 0.0);
    EXPECT_DOUBLE_EQ(res.total, res.ce + res.cls);

    const int64_t max_len = *std::max_element(kLengths.begin(), kLengths.end());
    const double dL = kU32 * fabs(res.total) * sqrt(path_roundings(m.cfg(), max_len));
    auto loss = [&](const std::vector<float> &x) { return loss_at(m.llm, p, x.data(), spec); };
    double worst = 0.0;
    auto check = [&](const std::vector<float> &v, const std::string &what) {
        FdCheck c = central_difference(loss, p.embeds, grad, v, dL);
        EXPECT_NEAR(c.fd, c.analytic, c.tol) << what;
        worst = std::max(worst, fabs(c.fd - c.analytic) / c.tol);
        if (verbose()) {
            printf("  %-18s %-10s step %.1e  dL/dv %+.6e  fd %+.6e  err %.1e  tol %.1e\n",
                   GetParam(), what.c_str(), c.t, c.analytic, c.fd, fabs(c.fd - c.analytic),
                   c.tol);
        }
    };
    double x_norm = 0.0;
    for (float x : p.embeds) x_norm += (double)x * x;
    x_norm = sqrt(x_norm);

    sf_test::Rng rng(99);
    check(scaled(rng.normal_vec(n), x_norm), "random");
    check(scaled(grad, x_norm), "gradient");
    for (int64_t r = 0; r < p.T; r++) {
        const float *xr = p.embeds.data() + r * p.d;
        double row_norm = 0.0;
        for (int64_t j = 0; j < p.d; j++) row_norm += (double)xr[j] * xr[j];
        const std::vector<float> row = scaled(rng.normal_vec((size_t)p.d), sqrt(row_norm));
        std::vector<float> v(n, 0.0f);
        std::copy(row.begin(), row.end(), v.begin() + r * p.d);
        check(v, "row " + std::to_string(r));
    }
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; i++) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + 3, order.end(),
                      [&](size_t a, size_t b) { return fabs(grad[a]) > fabs(grad[b]); });
    const std::vector<size_t> coords = {order[0], order[1], order[2],
                                        (size_t)rng.below((int64_t)n),
                                        (size_t)rng.below((int64_t)n)};
    for (size_t i : coords) {
        std::vector<float> e(n, 0.0f);
        e[i] = (float)(x_norm / sqrt((double)n));
        check(e, "coord " + std::to_string(i));
    }
    if (verbose()) printf("  %-18s worst err/tol %.3f\n", GetParam(), worst);
}

// (3) The classifier's gradients against central differences. The hidden states do not depend
// on class_w or class_b, so every evaluation sees the same fp32 h, and the loss is then
// computed in double (z = b + sum_j h_j w_j of exact fp32 products, softplus in double): its
// rounding, ~1e-15 |L|, is negligible. What remains:
//   truncation  t^2 / 6 |d^3 L / dw_j^3| with the third derivative measured by a third
//               difference at s = 1e-2 (noise ~1e-15 |L| / s^3 ~ 1e-9, nothing), counted twice;
//   the gradient's own fp32 rounding: dw_j = sum_i dz_i h_ij with dz_i rounded to fp32, each
//               product rounded and n_class sums: <= gamma_(n+2) sum_i |dz_i| |h_ij|, where
//               |dz_i| <= |weight_i| and |h_ij| <= sqrt(d) max|final_norm| (a normalised row has
//               sum_j xhat_j^2 <= d).
// Also: the gradients are ADDED to what the buffers hold.
TEST_P(LlmBackward, ClassifierGradientsMatchFiniteDifferences) {
    Model m(GetParam());
    ASSERT_NE(m.llm, nullptr);
    Problem p(m.llm, kLengths, 31);
    const sf_llm_loss_spec spec0 = p.spec(false, true);
    const int64_t d = p.d;

    std::vector<float> dw(d, 0.0f);
    float db = 0.0f;
    sf_llm_loss_result res = {};
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &spec0, nullptr, &res, nullptr, dw.data(), &db),
              SF_OK)
        << sf_last_error();
    EXPECT_EQ(res.ce, 0.0);
    EXPECT_GT(res.cls, 0.0);

    auto loss = [&](const std::vector<float> &w, float b) {
        sf_llm_loss_spec s = spec0;
        s.class_w = w.data();
        s.class_b = b;
        return loss_at(m.llm, p, p.embeds.data(), s);
    };
    double max_gamma = 0.0;
    for (int64_t j = 0; j < d; j++) {
        max_gamma = std::max(max_gamma, fabs((double)m.llm->final_norm[j]));
    }
    double sum_c = 0.0;
    for (float c : p.class_weights) sum_c += fabs((double)c);
    const double n_cls = (double)p.class_rows.size();
    const double grad_round = sf_test::gamma32(n_cls + 2) * sum_c * sqrt((double)d) * max_gamma;

    // Central difference in one parameter: f(x) is the loss with that parameter at x.
    double worst = 0.0;
    auto check = [&](const std::function<double(float)> &f, float x0, double analytic,
                     const std::string &what) {
        const double s = 1e-2, t = 1e-3;
        auto at = [&](double dx) { return f((float)(x0 + dx)); };
        const double l3 = fabs(at(2 * s) - 2 * at(s) + 2 * at(-s) - at(-2 * s)) / (2 * s * s * s);
        const float xp = (float)(x0 + t), xm = (float)(x0 - t);
        const double step = (double)xp - (double)xm;  // as rounded to fp32
        const double fd = (f(xp) - f(xm)) / step;
        const double tol = 2.0 * (step / 2) * (step / 2) / 6.0 * l3 + grad_round +
                           1e-13 * fabs(res.cls) / step;
        EXPECT_NEAR(fd, analytic, tol) << what;
        worst = std::max(worst, fabs(fd - analytic) / tol);
        if (verbose() && (what == "b" || what == "w[0]" || what == "w[1]")) {
            printf("  %-18s %-5s grad %+.9e  fd %+.9e  err %.1e  tol %.1e\n", GetParam(),
                   what.c_str(), analytic, fd, fabs(fd - analytic), tol);
        }
    };
    // Every 8th weight (every one costs 6 passes of the LLM).
    for (int64_t j = 0; j < d; j += 8) {
        check(
            [&](float x) {
                std::vector<float> w = p.class_w;
                w[j] = x;
                return loss(w, p.class_b);
            },
            p.class_w[j], dw[j], "w[" + std::to_string(j) + "]");
    }
    check([&](float x) { return loss(p.class_w, x); }, p.class_b, db, "b");
    if (verbose()) printf("  %-18s worst err/tol %.3f\n", GetParam(), worst);

    // Added, not overwritten: from buffers holding 1, the result is 1 + the gradient, up to
    // the n_class roundings of the running sums (each <= u (1 + sum of the terms)).
    std::vector<float> dw1(d, 1.0f);
    float db1 = 1.0f;
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &spec0, nullptr, &res, nullptr, dw1.data(), &db1),
              SF_OK);
    const double add_tol = 2 * (n_cls + 2) * kU32 * (1.0 + sum_c * sqrt((double)d) * max_gamma);
    for (int64_t j = 0; j < d; j++) EXPECT_NEAR(dw1[j] - 1.0, dw[j], add_tol) << j;
    EXPECT_NEAR(db1 - 1.0, db, add_tol);
}

// (4) recompute = true gives the same bits as recompute = false: the recomputed layer runs the
// same op calls on the same shapes from the same saved input. Also, the classifier's gradients
// and the loss do not depend on whether d_input_embeds is asked for. (The loss is compared to
// 1e-13, not bitwise: the cross-entropy's row sum is an OpenMP reduction whose combination
// order may vary between runs.)
TEST_P(LlmBackward, RecomputeIsBitIdentical) {
    Model m(GetParam());
    ASSERT_NE(m.llm, nullptr);
    Problem p(m.llm, kLengths, 41);
    const sf_llm_loss_spec spec = p.spec(true, true);
    struct Out {
        sf_llm_loss_result res = {};
        std::vector<float> dx, dw;
        float db = 0.0f;
    };
    auto run = [&](bool recompute, bool want_dx) {
        Out o;
        o.dx.assign(p.embeds.size(), NAN);
        o.dw.assign((size_t)p.d, 0.0f);
        sf_llm_backward_options opt = {};
        opt.recompute = recompute;
        EXPECT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                           &spec, &opt, &o.res, want_dx ? o.dx.data() : nullptr,
                                           o.dw.data(), &o.db),
                  SF_OK)
            << sf_last_error();
        return o;
    };
    const Out a = run(false, true), b = run(true, true), c = run(false, false);
    EXPECT_EQ(memcmp(a.dx.data(), b.dx.data(), a.dx.size() * sizeof(float)), 0);
    EXPECT_EQ(memcmp(a.dw.data(), b.dw.data(), a.dw.size() * sizeof(float)), 0);
    EXPECT_EQ(memcmp(&a.db, &b.db, sizeof(float)), 0);
    EXPECT_EQ(memcmp(a.dw.data(), c.dw.data(), a.dw.size() * sizeof(float)), 0);
    EXPECT_EQ(memcmp(&a.db, &c.db, sizeof(float)), 0);
    for (const Out *o : {&b, &c}) {
        EXPECT_NEAR(o->res.total, a.res.total, 1e-13 * a.res.total);
        EXPECT_NEAR(o->res.ce, a.res.ce, 1e-13 * a.res.ce);
        EXPECT_EQ(o->res.cls, a.res.cls);
        EXPECT_EQ(o->res.ce_correct, a.res.ce_correct);
    }
    for (float g : c.dx) EXPECT_TRUE(std::isnan(g));  // not asked for: not touched
    double norm = 0.0;
    for (float g : a.dx) norm += (double)g * g;
    EXPECT_GT(norm, 0.0);
}

// (5) The LLM is only read: every weight's bytes, and the inputs, are the same afterwards.
TEST_P(LlmBackward, LeavesModelAndInputsUnchanged) {
    Model m(GetParam());
    ASSERT_NE(m.llm, nullptr);
    Problem p(m.llm, kLengths, 53);
    const sf_llm_loss_spec spec = p.spec(true, true);
    const size_t weight_bytes = (size_t)m.llm->n_weights * sizeof(float);
    const uint64_t before = fnv1a(m.llm->weights, weight_bytes);
    char hash_before[32], hash_after[32];
    ASSERT_EQ(sf_llm_embedding_hash(m.llm, hash_before, sizeof hash_before), SF_OK);
    const Problem copy = p;

    for (bool recompute : {false, true}) {
        sf_llm_backward_options opt = {};
        opt.recompute = recompute;
        std::vector<float> dx(p.embeds.size()), dw((size_t)p.d, 0.0f);
        float db = 0.0f;
        sf_llm_loss_result res = {};
        ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                           &spec, &opt, &res, dx.data(), dw.data(), &db),
                  SF_OK)
            << sf_last_error();
    }
    EXPECT_EQ(fnv1a(m.llm->weights, weight_bytes), before);
    ASSERT_EQ(sf_llm_embedding_hash(m.llm, hash_after, sizeof hash_after), SF_OK);
    EXPECT_STREQ(hash_after, hash_before);
    EXPECT_EQ(p.embeds, copy.embeds);
    EXPECT_EQ(p.cu, copy.cu);
    EXPECT_EQ(p.ce_rows, copy.ce_rows);
    EXPECT_EQ(p.ce_targets, copy.ce_targets);
    EXPECT_EQ(p.ce_weights, copy.ce_weights);
    EXPECT_EQ(p.class_rows, copy.class_rows);
    EXPECT_EQ(p.class_labels, copy.class_labels);
    EXPECT_EQ(p.class_w, copy.class_w);
}

INSTANTIATE_TEST_SUITE_P(LlmBackwardFixtures, LlmBackward,
                         ::testing::Values("llama_gqa_llama3", "mistral_window", "qwen2_bias",
                                           "phi3_longrope", "llama_tied_linear"),
                         [](const ::testing::TestParamInfo<const char *> &info) {
                             return std::string(info.param);
                         });

// (6) Bad arguments fail with a status and a message, before anything is written: the
// outputs keep their sentinels.
TEST(LlmBackwardApi, RejectsBadArguments) {
    Model m("llama_gqa_llama3");
    ASSERT_NE(m.llm, nullptr);
    Problem p(m.llm, kLengths, 61);
    const int32_t vocab = m.cfg().vocab_size;
    const sf_llm *llm = m.llm;
    const int32_t n = p.n_requests();
    const int32_t *cu = p.cu.data();
    const float *x = p.embeds.data();

    std::vector<float> dx(p.embeds.size(), 7.0f), dw((size_t)p.d, 7.0f);
    float db = 7.0f;
    sf_llm_loss_result res = {};
    res.total = 7.0;
    auto untouched = [&]() {
        for (float g : dx) {
            if (g != 7.0f) return false;
        }
        for (float g : dw) {
            if (g != 7.0f) return false;
        }
        return db == 7.0f && res.total == 7.0;
    };

    // The broken inputs, one fault each.
    const sf_llm_loss_spec good = p.spec(true, true);
    auto with = [&](const std::function<void(sf_llm_loss_spec &)> &edit) {
        sf_llm_loss_spec s = good;
        edit(s);
        return s;
    };
    const std::vector<int32_t> cu_from_1 = {1, 7, 8, 27}, cu_decreasing = {0, 7, 6, 27};
    std::vector<int32_t> rows_hi = p.ce_rows, rows_lo = p.ce_rows, targets = p.ce_targets;
    rows_hi[3] = (int32_t)p.T;
    rows_lo[0] = -1;
    targets[2] = vocab;
    std::vector<float> weights_nan = p.ce_weights, labels_2 = p.class_labels;
    std::vector<float> labels_nan = p.class_labels;
    weights_nan[1] = NAN;
    labels_2[0] = 2.0f;
    labels_nan[1] = NAN;
    std::vector<int32_t> class_rows_hi = p.class_rows;
    class_rows_hi[2] = (int32_t)p.T;
    // A request one token longer than max_position_embeddings.
    const int32_t too_long = m.cfg().max_position_embeddings + 1;
    std::vector<int32_t> long_cu = {0, too_long};
    std::vector<float> long_x((size_t)too_long * p.d, 0.5f);
    const sf_llm_loss_spec none = with([](sf_llm_loss_spec &s) { s.n_ce = 0, s.n_class = 0; });

    const sf_llm_loss_spec n_ce_neg = with([](sf_llm_loss_spec &s) { s.n_ce = -1; });
    const sf_llm_loss_spec no_rows = with([](sf_llm_loss_spec &s) { s.ce_rows = nullptr; });
    const sf_llm_loss_spec no_targets = with([](sf_llm_loss_spec &s) { s.ce_targets = nullptr; });
    const sf_llm_loss_spec row_hi = with([&](sf_llm_loss_spec &s) { s.ce_rows = rows_hi.data(); });
    const sf_llm_loss_spec row_lo = with([&](sf_llm_loss_spec &s) { s.ce_rows = rows_lo.data(); });
    const sf_llm_loss_spec tgt = with([&](sf_llm_loss_spec &s) { s.ce_targets = targets.data(); });
    const sf_llm_loss_spec w_nan =
        with([&](sf_llm_loss_spec &s) { s.ce_weights = weights_nan.data(); });
    const sf_llm_loss_spec n_cls_neg = with([](sf_llm_loss_spec &s) { s.n_class = -1; });
    const sf_llm_loss_spec no_w = with([](sf_llm_loss_spec &s) { s.class_w = nullptr; });
    const sf_llm_loss_spec no_lab = with([](sf_llm_loss_spec &s) { s.class_labels = nullptr; });
    const sf_llm_loss_spec cls_hi =
        with([&](sf_llm_loss_spec &s) { s.class_rows = class_rows_hi.data(); });
    const sf_llm_loss_spec lab_2 =
        with([&](sf_llm_loss_spec &s) { s.class_labels = labels_2.data(); });
    const sf_llm_loss_spec lab_nan =
        with([&](sf_llm_loss_spec &s) { s.class_labels = labels_nan.data(); });

    struct Case {
        const char *what;
        sf_status want;
        const sf_llm *llm;
        int32_t n;
        const int32_t *cu;
        const float *x;
        const sf_llm_loss_spec *spec;
        sf_llm_loss_result *res;
    };
    const sf_status inval = SF_ERR_INVALID_ARGUMENT;
    const Case cases[] = {
        {"NULL model", inval, nullptr, n, cu, x, &good, &res},
        {"NULL spec", inval, llm, n, cu, x, nullptr, &res},
        {"NULL result", inval, llm, n, cu, x, &good, nullptr},
        {"n_requests < 0", inval, llm, -1, cu, x, &good, &res},
        {"NULL cu_seqlens", inval, llm, n, nullptr, x, &good, &res},
        {"cu_seqlens[0] != 0", inval, llm, n, cu_from_1.data(), x, &good, &res},
        {"decreasing cu_seqlens", inval, llm, n, cu_decreasing.data(), x, &good, &res},
        {"request too long", SF_ERR_OUT_OF_RANGE, llm, 1, long_cu.data(), long_x.data(), &none,
         &res},
        {"NULL input_embeds", inval, llm, n, cu, nullptr, &good, &res},
        {"n_ce < 0", inval, llm, n, cu, x, &n_ce_neg, &res},
        {"NULL ce_rows", inval, llm, n, cu, x, &no_rows, &res},
        {"NULL ce_targets", inval, llm, n, cu, x, &no_targets, &res},
        {"ce row = T", inval, llm, n, cu, x, &row_hi, &res},
        {"ce row < 0", inval, llm, n, cu, x, &row_lo, &res},
        {"target = vocab", inval, llm, n, cu, x, &tgt, &res},
        {"NaN ce weight", inval, llm, n, cu, x, &w_nan, &res},
        {"n_class < 0", inval, llm, n, cu, x, &n_cls_neg, &res},
        {"NULL class_w", inval, llm, n, cu, x, &no_w, &res},
        {"NULL class_labels", inval, llm, n, cu, x, &no_lab, &res},
        {"class row = T", inval, llm, n, cu, x, &cls_hi, &res},
        {"label 2", inval, llm, n, cu, x, &lab_2, &res},
        {"NaN label", inval, llm, n, cu, x, &lab_nan, &res},
    };
    for (const Case &c : cases) {
        EXPECT_EQ(sf_llm_loss_backward_cpu(c.llm, c.n, c.cu, c.x, c.spec, nullptr, c.res,
                                           dx.data(), dw.data(), &db),
                  c.want)
            << c.what;
        EXPECT_STRNE(sf_last_error(), "") << c.what;
        EXPECT_TRUE(untouched()) << c.what;
        if (verbose()) printf("  %-22s %s\n", c.what, sf_last_error());
    }
    // The longest allowed request passes.
    long_cu[1] = too_long - 1;
    std::vector<float> long_dx(long_x.size());
    EXPECT_EQ(sf_llm_loss_backward_cpu(m.llm, 1, long_cu.data(), long_x.data(), &none, nullptr,
                                       &res, long_dx.data(), nullptr, nullptr),
              SF_OK)
        << sf_last_error();
}

// Batches without rows, empty requests among others, and NULL weights (meaning 1).
TEST(LlmBackwardApi, EdgeCases) {
    Model m("mistral_window");
    ASSERT_NE(m.llm, nullptr);
    Problem p(m.llm, {0, 7, 0, 19, 0}, 71);
    sf_llm_loss_spec spec = p.spec(true, true);

    // No requests, or only empty ones: zero losses, nothing written.
    sf_llm_loss_result res = {};
    res.total = 7.0;
    const int32_t zeros[3] = {0, 0, 0};
    const sf_llm_loss_spec none = {};
    float db = 7.0f;
    EXPECT_EQ(sf_llm_loss_backward_cpu(m.llm, 0, zeros, nullptr, &none, nullptr, &res, nullptr,
                                       nullptr, &db),
              SF_OK)
        << sf_last_error();
    EXPECT_EQ(res.total, 0.0);
    res.total = 7.0;
    EXPECT_EQ(sf_llm_loss_backward_cpu(m.llm, 2, zeros, nullptr, &none, nullptr, &res, nullptr,
                                       nullptr, &db),
              SF_OK);
    EXPECT_EQ(res.total, 0.0);
    EXPECT_EQ(db, 7.0f);

    // Empty requests do not disturb the others: the result equals the batch without them.
    Problem q(m.llm, {7, 19}, 71);
    q.embeds = p.embeds;
    sf_llm_loss_result ra = {}, rb = {};
    std::vector<float> ga(p.embeds.size()), gb(p.embeds.size());
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &spec, nullptr, &ra, ga.data(), nullptr, nullptr),
              SF_OK)
        << sf_last_error();
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, q.n_requests(), q.cu.data(), q.embeds.data(),
                                       &spec, nullptr, &rb, gb.data(), nullptr, nullptr),
              SF_OK)
        << sf_last_error();
    EXPECT_NEAR(ra.total, rb.total, 1e-13 * rb.total);
    EXPECT_EQ(memcmp(ga.data(), gb.data(), ga.size() * sizeof(float)), 0);

    // NULL weights weigh every term 1.
    std::vector<float> ones_ce(p.ce_rows.size(), 1.0f), ones_cls(p.class_rows.size(), 1.0f);
    sf_llm_loss_spec explicit_ones = spec;
    explicit_ones.ce_weights = ones_ce.data();
    explicit_ones.class_weights = ones_cls.data();
    spec.ce_weights = nullptr;
    spec.class_weights = nullptr;
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &spec, nullptr, &ra, ga.data(), nullptr, nullptr),
              SF_OK);
    ASSERT_EQ(sf_llm_loss_backward_cpu(m.llm, p.n_requests(), p.cu.data(), p.embeds.data(),
                                       &explicit_ones, nullptr, &rb, gb.data(), nullptr, nullptr),
              SF_OK);
    EXPECT_NEAR(ra.total, rb.total, 1e-13 * rb.total);
    EXPECT_EQ(memcmp(ga.data(), gb.data(), ga.size() * sizeof(float)), 0);
}

// (7) The reported bytes are what a call allocates, by the formula (floats unless noted):
//   layer inputs and last output   (L + 1) T d
//   saved sets                     S T (d + q + 2 kv + 2 ff), S = L, or 1 with recompute
//                                  (x_mid, q and k after RoPE, v, gate and up before SwiGLU)
//   work                           T (d + 2 q + 2 kv + 2 ff)  (xn, attn, act, dq, dk, dv, dup)
//   head chunk                     C (2 d + vocab), C = min(T, 64)
//   plus T int32 positions and head_dim / 2 doubles of RoPE frequencies; 0 for T <= 0.
TEST(LlmBackwardApi, BytesMatchFormula) {
    Model m("phi3_longrope");
    ASSERT_NE(m.llm, nullptr);
    const sf_llm_config &c = m.cfg();
    const int64_t d = c.hidden_size, ff = c.intermediate_size, L = c.num_layers;
    const int64_t q = (int64_t)c.num_heads * c.head_dim, kv = (int64_t)c.num_kv_heads * c.head_dim;
    auto formula = [&](int64_t T, bool recompute) -> size_t {
        if (T <= 0) return 0;
        const int64_t S = recompute ? 1 : L, C = std::min<int64_t>(T, 64);
        const int64_t floats = (L + 1) * T * d + S * T * (d + q + 2 * kv + 2 * ff) +
                               T * (d + 2 * q + 2 * kv + 2 * ff) + C * (2 * d + c.vocab_size);
        return (size_t)floats * 4 + (size_t)T * 4 + (size_t)(c.head_dim / 2) * 8;
    };
    sf_llm_backward_options plain = {}, rec = {};
    rec.recompute = true;
    for (int64_t T : {1, 7, 64, 65, 1000, 100000}) {
        EXPECT_EQ(sf_llm_backward_bytes(m.llm, T, &plain), formula(T, false)) << T;
        EXPECT_EQ(sf_llm_backward_bytes(m.llm, T, nullptr), formula(T, false)) << T;
        EXPECT_EQ(sf_llm_backward_bytes(m.llm, T, &rec), formula(T, true)) << T;
    }
    EXPECT_EQ(sf_llm_backward_bytes(m.llm, 0, &plain), 0u);
    EXPECT_EQ(sf_llm_backward_bytes(m.llm, -5, &plain), 0u);
    EXPECT_EQ(sf_llm_backward_bytes(nullptr, 10, &plain), 0u);
    // With 2 layers the saving is one set of the two; it grows with the depth.
    EXPECT_LT(sf_llm_backward_bytes(m.llm, 1000, &rec), sf_llm_backward_bytes(m.llm, 1000, &plain));
    if (verbose()) {
        printf("  T = 1000: %zu bytes, %zu with recompute\n",
               sf_llm_backward_bytes(m.llm, 1000, &plain),
               sf_llm_backward_bytes(m.llm, 1000, &rec));
    }
}

}  // namespace
