// The attention backward on the GPU (sf_cuda_attention_backward_bf16) and the forward's
// log-sum-exp output, against the CPU twin sf_cpu_attention_backward (fp32 on the same
// bf16-rounded inputs) and a double-precision loop. Every mode the training needs: causal
// packed-varlen GQA prefill, bidirectional self-attention, cross-attention with per-request kv
// lengths in KV slots (NaN rows between them), plus sliding windows and q_pos0; every head dim,
// GQA groups 1, 3, 4; lengths 0, 1, 17, 63, 65, 200 mixed in one batch; dq by atomics (the
// default) and by the deterministic pass, bit-reproducible. The argument tests run
// without a GPU (the launcher checks everything before its first CUDA call); the others skip.
//
// Tolerance, derived per output element (a forward error bound, first order in the roundings):
//   u = 2^-8 (bf16), g(n) = n 2^-23 (fp32 sum of n products in any order and grouping, one ulp
//   lost per addition: the tensor cores' adders truncate), e_x = 2^-15 (every fp32 rounding in
//   the exponent path: the scaled score and lse in log2 units are below 2^7 here, since |q|,
//   |k| <= 2 give |s| <= 4 sqrt(d) <= 46, so each of the three roundings of the exponent costs
//   <= 2^-17 relative in exp2, and exp2f / log2f add a few ulps).
// With the exact (double) s_j = scale q.k_j, a_j = scale sum|q||k_j|, p_j = exp(s_j - lse),
// dp_j = dout.v_j, b_j = sum|dout||v_j|, D = sum_j p_j dp_j, W_e = sum_j p_j |v_je| for one
// (query, head) over its n visible keys:
//   lse:  the forward sums bf16-rounded P (u) in fp32 (g(n)) from scores off by g(d) a_j:
//           |dlse| <= u + g(n) + max_j g(d) a_j + e_x                       (checked directly)
//   P:    recomputed as exp(s~ - lse~):          dP_j = g(d) a_j + dlse + e_x   (relative)
//   out:  the forward's bf16 output, from weights off by dP_j + u, summed and rounded:
//           |dO_e| <= W_e (max_j dP_j + 2u + g(n))
//   D:    rowsum(dout * out~) in fp32:            |dD| <= sum_e |dout_e| (|dO_e| + g(d) W_e)
//   dS_j = P_j (dp_j - D), fp32, then rounded to bf16 for the products:
//           |d dS_j| <= p_j ((dP_j + u + 2 2^-24) |dp_j - D| + g(d) b_j + |dD|) =: E_j
//   dq_e = scale sum_j dS_j k_je     (mma within a key block, fp32 atomics across blocks; or,
//   deterministic, one mma accumulator over the blocks in order: a sum of 2n terms either way):
//           |d dq_e| <= scale sum_j (E_j + g(2n) |dS_j|) |k_je|
//   dk_je = scale sum_(i,h) dS q_ie, dv_je = sum_(i,h) bf16(P) dout_ie over the m (query, head)
//   rows of the group that see key j:
//           |d dk_je| <= scale sum (E + g(2m) |dS|) |q_ie|,
//           |d dv_je| <= sum p |dout_ie| (dP + u + g(2m)).
// The CPU twin has the same error terms without the bf16 ones (u = 0): the test allows
//   |gpu - cpu| <= (1 + 2^-4) (bound(u = 2^-8) + bound(u = 0))
// per element, the 2^-4 for the second-order terms (products of two relative errors, each below
// 4u = 2^-6). Where every term is zero (keys no query sees, queries that see no key) this asks
// for exact zeros. On top of that: no NaN in any output, and every element the backward must
// not write (stride padding, KV gap rows, rows past the last request) keeps its NaN poison.
#include <gtest/gtest.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "cpu/ops.h"
#include "cuda_test_util.h"
#include "sysformer.h"

namespace {

struct Request {
    int n_q, n_kv;
    int pos0;  // position of the first query (causal only)
};

struct Case {
    int head_dim, n_heads, n_kv_heads;
    bool causal;
    int window;
    bool pass_pos0;  // false: q_pos0 = NULL (every pos0 must then be 0)
    std::vector<Request> reqs;
    // > 0: each request's keys sit kv_gap NaN rows after the previous request's (KV slots), and
    // kv_len gives the lengths instead of cu_kv.
    int kv_gap = 0;
};

std::string describe(const Case &c) {
    char buf[160];
    snprintf(buf, sizeof buf, "d=%d heads=%d/%d %s window=%d pos0=%s gap=%d reqs:", c.head_dim,
             c.n_heads, c.n_kv_heads, c.causal ? "causal" : "bidirectional", c.window,
             c.pass_pos0 ? "given" : "NULL", c.kv_gap);
    std::string s = buf;
    for (const Request &r : c.reqs) {
        snprintf(buf, sizeof buf, " %dx%d@%d", r.n_q, r.n_kv, r.pos0);
        s += buf;
    }
    return s;
}

constexpr double kU = 1.0 / 256.0;          // bf16 unit roundoff, 2^-8
constexpr double kE32 = 1.0 / 16777216.0;   // fp32 unit roundoff, 2^-24
constexpr double kExp = 1.0 / 32768.0;      // e_x = 2^-15
double gam(int64_t n) { return (double)n * (2.0 * kE32); }

// One request's inputs as contiguous fp32 rows (the bf16 values).
struct ReqData {
    int nq, nkv, pos0;
    std::vector<float> q, k, v, dout;  // [nq, n_heads*d], [nkv, n_kv_heads*d] x2, [nq, n_heads*d]
};

// The keys [lo, hi) query i sees (sf_cpu_attention's rule).
void visible(const Case &c, const ReqData &r, int i, int *lo, int *hi) {
    int64_t l = 0, h = r.nkv;
    if (c.causal) {
        const int64_t pos = (int64_t)r.pos0 + i;
        h = std::min<int64_t>(h, pos + 1);
        if (c.window > 0) l = std::max<int64_t>(l, pos - c.window + 1);
    }
    h = std::max<int64_t>(h, 0);
    l = std::min(l, h);
    *lo = (int)l;
    *hi = (int)h;
}

// Adds the error bound of the header, for rounding model uu (kU: the GPU; 0: the CPU twin), to
// tq [nq, q_row], tk, tv [nkv, kv_row]. With lse != NULL also stores the exact lse and the
// bound on the GPU's lse error, [nq, n_heads].
void add_bounds(const Case &c, const ReqData &r, double scale, double uu, std::vector<double> &tq,
                std::vector<double> &tk, std::vector<double> &tv, std::vector<double> *lse,
                std::vector<double> *lse_tol) {
    const int d = c.head_dim, group = c.n_heads / c.n_kv_heads;
    const int64_t q_row = (int64_t)c.n_heads * d, kv_row = (int64_t)c.n_kv_heads * d;
    const int64_t m_rows = (int64_t)r.nq * group;  // at most this many rows add into a key
    std::vector<double> s(r.nkv + 1), a(r.nkv + 1), p(r.nkv + 1), dp(r.nkv + 1), b(r.nkv + 1),
        dpe(r.nkv + 1), w(d);
    for (int h = 0; h < c.n_heads; h++) {
        const int g = h / group;
        for (int i = 0; i < r.nq; i++) {
            const int64_t li = (int64_t)i * c.n_heads + h;
            int lo, hi;
            visible(c, r, i, &lo, &hi);
            if (lo >= hi) {
                if (lse) {
                    (*lse)[li] = -INFINITY;
                    (*lse_tol)[li] = 0.0;
                }
                continue;
            }
            const int n = hi - lo;
            const float *qi = &r.q[i * q_row + (int64_t)h * d];
            const float *oi = &r.dout[i * q_row + (int64_t)h * d];
            double mx = -INFINITY, ds_max = 0.0;
            for (int j = lo; j < hi; j++) {
                const float *kj = &r.k[j * kv_row + (int64_t)g * d];
                const float *vj = &r.v[j * kv_row + (int64_t)g * d];
                double dot = 0, adot = 0, dpp = 0, bb = 0;
                for (int e = 0; e < d; e++) {
                    dot += (double)qi[e] * kj[e];
                    adot += fabs((double)qi[e] * kj[e]);
                    dpp += (double)oi[e] * vj[e];
                    bb += fabs((double)oi[e] * vj[e]);
                }
                s[j] = scale * dot;
                a[j] = scale * adot;
                dp[j] = dpp;
                b[j] = bb;
                mx = std::max(mx, s[j]);
                ds_max = std::max(ds_max, gam(d) * a[j]);
            }
            double sum = 0.0;
            for (int j = lo; j < hi; j++) sum += exp(s[j] - mx);
            const double l = mx + log(sum);
            const double dlse = uu + gam(n) + ds_max + kExp;
            if (lse) {
                (*lse)[li] = l;
                (*lse_tol)[li] = dlse;
            }
            double big_d = 0.0, dp_max = 0.0;
            std::fill(w.begin(), w.end(), 0.0);
            for (int j = lo; j < hi; j++) {
                const float *vj = &r.v[j * kv_row + (int64_t)g * d];
                p[j] = exp(s[j] - l);
                dpe[j] = gam(d) * a[j] + dlse + kExp;
                dp_max = std::max(dp_max, dpe[j]);
                big_d += p[j] * dp[j];
                for (int e = 0; e < d; e++) w[e] += p[j] * fabs((double)vj[e]);
            }
            double dd = 0.0;
            for (int e = 0; e < d; e++)
                dd += fabs((double)oi[e]) * (w[e] * (dp_max + 2 * uu + gam(n)) + gam(d) * w[e]);
            for (int j = lo; j < hi; j++) {
                const float *kj = &r.k[j * kv_row + (int64_t)g * d];
                const double ds = fabs(p[j] * (dp[j] - big_d));
                const double big_e =
                    p[j] * ((dpe[j] + uu + 2 * kE32) * fabs(dp[j] - big_d) + gam(d) * b[j] + dd);
                const double cq = scale * (big_e + gam(2 * (int64_t)n) * ds);
                const double ck = scale * (big_e + gam(2 * m_rows) * ds);
                const double cv = p[j] * (dpe[j] + uu + gam(2 * m_rows));
                double *tqi = &tq[i * q_row + (int64_t)h * d];
                double *tkj = &tk[j * kv_row + (int64_t)g * d];
                double *tvj = &tv[j * kv_row + (int64_t)g * d];
                for (int e = 0; e < d; e++) {
                    tqi[e] += cq * fabs((double)kj[e]);
                    tkj[e] += ck * fabs((double)qi[e]);
                    tvj[e] += cv * fabs((double)oi[e]);
                }
            }
        }
    }
}

bool is_poison(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u == 0xffffffffu;
}

// Device state of one case: inputs, forward outputs, gradients.
struct Layout {
    int d, n_req, max_q, max_kv;
    int64_t q_row, kv_row, q_stride, kv_stride, dout_stride, dq_stride, dkv_stride;
    std::vector<int32_t> cu_q, cu_kv, kv_len, pos0;
    int64_t total_q, total_kv;
};

Layout make_layout(const Case &c) {
    Layout l;
    l.d = c.head_dim;
    l.n_req = (int)c.reqs.size();
    l.q_row = (int64_t)c.n_heads * l.d;
    l.kv_row = (int64_t)c.n_kv_heads * l.d;
    l.q_stride = l.q_row + 8;
    l.kv_stride = l.kv_row + 8;
    l.dout_stride = l.q_row + 24;
    l.dq_stride = l.q_row + 4;
    l.dkv_stride = l.kv_row + 12;
    l.cu_q.assign(l.n_req + 1, 0);
    l.cu_kv.assign(l.n_req + 1, 0);
    l.kv_len.assign(l.n_req, 0);
    l.pos0.assign(l.n_req, 0);
    l.max_q = l.max_kv = 0;
    for (int r = 0; r < l.n_req; r++) {
        l.cu_q[r + 1] = l.cu_q[r] + c.reqs[r].n_q;
        l.cu_kv[r + 1] = l.cu_kv[r] + c.reqs[r].n_kv + c.kv_gap;
        l.kv_len[r] = c.reqs[r].n_kv;
        l.pos0[r] = c.reqs[r].pos0;
        l.max_q = std::max(l.max_q, c.reqs[r].n_q);
        l.max_kv = std::max(l.max_kv, c.reqs[r].n_kv);
    }
    l.total_q = l.cu_q[l.n_req];
    l.total_kv = l.cu_kv[l.n_req];
    return l;
}

constexpr int64_t kExtraRows = 3;  // past the last request: must stay poisoned

// The bf16 inputs of a case in the layout's rows.
struct Inputs {
    std::vector<uint16_t> q, k, v, dout;
};

// q, k in [-2, 2], v and dout in [-1, 1]; stride padding and gap rows hold NaN.
Inputs make_inputs(const Layout &l, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u2(-2.0f, 2.0f), u1(-1.0f, 1.0f);
    const uint16_t nan_bits = 0x7fc0;
    Inputs in;
    in.q.assign(std::max<int64_t>(l.total_q, 1) * l.q_stride, nan_bits);
    in.dout.assign(std::max<int64_t>(l.total_q, 1) * l.dout_stride, nan_bits);
    in.k.assign(std::max<int64_t>(l.total_kv, 1) * l.kv_stride, nan_bits);
    in.v.assign(in.k.size(), nan_bits);
    for (int64_t i = 0; i < l.total_q; i++) {
        for (int64_t e = 0; e < l.q_row; e++) in.q[i * l.q_stride + e] = to_bf16(u2(rng));
        for (int64_t e = 0; e < l.q_row; e++) in.dout[i * l.dout_stride + e] = to_bf16(u1(rng));
    }
    for (int r = 0; r < l.n_req; r++) {
        for (int64_t j = l.cu_kv[r]; j < l.cu_kv[r] + l.kv_len[r]; j++) {
            for (int64_t e = 0; e < l.kv_row; e++) in.k[j * l.kv_stride + e] = to_bf16(u2(rng));
            for (int64_t e = 0; e < l.kv_row; e++) in.v[j * l.kv_stride + e] = to_bf16(u1(rng));
        }
    }
    return in;
}

// What the backward wrote (and the forward's lse), in the layout's rows plus kExtraRows.
struct Outputs {
    std::vector<float> lse, dq, dk, dv;
};

void check_outputs(const Case &c, const Layout &l, const Inputs &in, const Outputs &out);

// Runs the forward (with lse) and the backward of one case and checks everything the header says.
void run_case(const Case &c, uint32_t seed) {
    SCOPED_TRACE(describe(c));
    const Layout l = make_layout(c);
    const int d = l.d;
    const Inputs in = make_inputs(l, seed);
    const std::vector<uint16_t> &hq = in.q, &hk = in.k, &hv = in.v, &hdo = in.dout;
    const float scale = 1.0f / sqrtf((float)d);

    const size_t q_rows = (size_t)(l.total_q + kExtraRows), kv_rows = (size_t)(l.total_kv + kExtraRows);
    DeviceBuffer<uint16_t> bq(hq), bk(hk), bv(hv), bdo(hdo);
    DeviceBuffer<uint16_t> bout(q_rows * l.q_stride);  // forward output, stride q_stride
    DeviceBuffer<float> blse(q_rows * c.n_heads), bdelta(q_rows * c.n_heads);
    DeviceBuffer<float> bdq(q_rows * l.dq_stride), bdk(kv_rows * l.dkv_stride),
        bdv(kv_rows * l.dkv_stride);
    DeviceBuffer<int32_t> bcu_q(l.cu_q), bcu_kv(l.cu_kv), bpos0(l.pos0), bkv_len(l.kv_len);
    ASSERT_TRUE(bq.get() && bk.get() && bv.get() && bdo.get() && bout.get() && blse.get() &&
                bdelta.get() && bdq.get() && bdk.get() && bdv.get() && bcu_q.get() &&
                bcu_kv.get() && bpos0.get() && bkv_len.get());

    sf_attention_args a = {};
    a.out = bout.get();
    a.lse = blse.get();
    a.q = bq.get();
    a.k = bk.get();
    a.v = bv.get();
    a.cu_q = bcu_q.get();
    a.cu_kv = bcu_kv.get();
    a.kv_len = c.kv_gap > 0 ? bkv_len.get() : nullptr;
    a.q_pos0 = c.pass_pos0 ? bpos0.get() : nullptr;
    a.n_requests = l.n_req;
    a.max_q_len = l.max_q;
    a.n_heads = c.n_heads;
    a.n_kv_heads = c.n_kv_heads;
    a.head_dim = d;
    a.q_stride = l.q_stride;
    a.kv_stride = l.kv_stride;
    a.out_stride = l.q_stride;
    a.causal = c.causal;
    a.window = c.window;
    a.scale = scale;
    sf_attention_grads gr = {};
    gr.dout = bdo.get();
    gr.dq = bdq.get();
    gr.dk = bdk.get();
    gr.dv = bdv.get();
    gr.delta = bdelta.get();
    gr.dout_stride = l.dout_stride;
    gr.dq_stride = l.dq_stride;
    gr.dkv_stride = l.dkv_stride;
    gr.max_kv_len = l.max_kv;
    ASSERT_EQ(sf_cuda_attention_bf16(&a, 0), SF_OK) << sf_last_error();
    ASSERT_EQ(sf_cuda_attention_backward_bf16(&a, &gr, 0), SF_OK) << sf_last_error();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const Outputs atomic{blse.host(), bdq.host(), bdk.host(), bdv.host()};
    check_outputs(c, l, in, atomic);

    // The deterministic dq pass, twice, each time into freshly poisoned buffers: the same
    // checks; dk and dv the same bits as above (the main kernel computes them alike either
    // way); and the second run the same bits as the first. (The emulator runs the blocks of
    // successive launches in different orders, as a GPU may, so that the atomic dq above would
    // not pass the last check.)
    Outputs first;
    for (int rep = 0; rep < 2; rep++) {
        SCOPED_TRACE(rep == 0 ? "deterministic" : "deterministic, again");
        DeviceBuffer<float> ddq(q_rows * l.dq_stride), ddk(kv_rows * l.dkv_stride),
            ddv(kv_rows * l.dkv_stride);
        ASSERT_TRUE(ddq.get() && ddk.get() && ddv.get());
        sf_attention_grads gd = gr;
        gd.dq = ddq.get();
        gd.dk = ddk.get();
        gd.dv = ddv.get();
        gd.deterministic = true;
        ASSERT_EQ(sf_cuda_attention_backward_bf16(&a, &gd, 0), SF_OK) << sf_last_error();
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        Outputs got{atomic.lse, ddq.host(), ddk.host(), ddv.host()};
        auto same_bits = [](const std::vector<float> &x, const std::vector<float> &y) {
            return x.size() == y.size() && memcmp(x.data(), y.data(), x.size() * 4) == 0;
        };
        EXPECT_TRUE(same_bits(got.dk, atomic.dk)) << "dk differs from the atomic run's";
        EXPECT_TRUE(same_bits(got.dv, atomic.dv)) << "dv differs from the atomic run's";
        if (rep == 0) {
            check_outputs(c, l, in, got);
            first = std::move(got);
        } else {
            EXPECT_TRUE(same_bits(got.dq, first.dq)) << "dq differs from run to run";
        }
    }
}

void check_outputs(const Case &c, const Layout &l, const Inputs &in, const Outputs &out) {
    const int d = l.d;
    const float scale = 1.0f / sqrtf((float)d);
    const std::vector<uint16_t> &hq = in.q, &hk = in.k, &hv = in.v, &hdo = in.dout;
    const std::vector<float> &got_lse = out.lse, &got_dq = out.dq, &got_dk = out.dk,
                             &got_dv = out.dv;
    int64_t bad_values = 0, bad_padding = 0, bad_lse = 0, bad_dq = 0, bad_dk = 0, bad_dv = 0;
    double worst_lse = 0, worst_dq = 0, worst_dk = 0, worst_dv = 0;  // max |err| / tolerance
    auto check = [&](float gpu, float cpu, double tol, int64_t *bad, double *worst) {
        if (!std::isfinite(gpu)) {
            bad_values++;
            return;
        }
        const double err = fabs((double)gpu - cpu);
        if (err > tol) (*bad)++;
        if (err > 0) *worst = std::max(*worst, tol > 0 ? err / tol : INFINITY);
    };
    for (int r = 0; r < l.n_req; r++) {
        ReqData rd;
        rd.nq = c.reqs[r].n_q;
        rd.nkv = c.reqs[r].n_kv;
        rd.pos0 = c.reqs[r].pos0;
        rd.q.assign((size_t)rd.nq * l.q_row + 1, 0.0f);
        rd.dout.assign(rd.q.size(), 0.0f);
        rd.k.assign((size_t)rd.nkv * l.kv_row + 1, 0.0f);
        rd.v.assign(rd.k.size(), 0.0f);
        for (int i = 0; i < rd.nq; i++) {
            for (int64_t e = 0; e < l.q_row; e++) {
                rd.q[i * l.q_row + e] = from_bf16(hq[(l.cu_q[r] + i) * l.q_stride + e]);
                rd.dout[i * l.q_row + e] = from_bf16(hdo[(l.cu_q[r] + i) * l.dout_stride + e]);
            }
        }
        for (int j = 0; j < rd.nkv; j++) {
            for (int64_t e = 0; e < l.kv_row; e++) {
                rd.k[j * l.kv_row + e] = from_bf16(hk[(l.cu_kv[r] + j) * l.kv_stride + e]);
                rd.v[j * l.kv_row + e] = from_bf16(hv[(l.cu_kv[r] + j) * l.kv_stride + e]);
            }
        }
        std::vector<float> rq(rd.q.size()), rk(rd.k.size()), rv(rd.k.size());
        sf_cpu_attention_backward(rq.data(), rk.data(), rv.data(), rd.dout.data(), rd.q.data(),
                                  rd.k.data(), rd.v.data(), rd.nq, rd.nkv, c.n_heads,
                                  c.n_kv_heads, d, c.causal, rd.pos0, c.window, scale);
        std::vector<double> tq(rq.size(), 0.0), tk(rk.size(), 0.0), tv(rk.size(), 0.0);
        std::vector<double> lse((size_t)rd.nq * c.n_heads + 1), lse_tol(lse.size());
        add_bounds(c, rd, scale, kU, tq, tk, tv, &lse, &lse_tol);
        add_bounds(c, rd, scale, 0.0, tq, tk, tv, nullptr, nullptr);
        const double margin = 1.0 + 1.0 / 16.0;

        for (int i = 0; i < rd.nq; i++) {
            for (int h = 0; h < c.n_heads; h++) {
                const float g = got_lse[(int64_t)(l.cu_q[r] + i) * c.n_heads + h];
                const double want = lse[(int64_t)i * c.n_heads + h];
                if (want == -INFINITY) {
                    bad_lse += !(g == -INFINITY);
                } else if (!std::isfinite(g)) {
                    bad_values++;
                } else {
                    const double err = fabs(g - want), tol = lse_tol[(int64_t)i * c.n_heads + h];
                    bad_lse += err > tol;
                    worst_lse = std::max(worst_lse, err / tol);
                }
            }
            const float *row = &got_dq[(l.cu_q[r] + i) * l.dq_stride];
            for (int64_t e = 0; e < l.q_row; e++)
                check(row[e], rq[i * l.q_row + e], margin * tq[i * l.q_row + e], &bad_dq, &worst_dq);
            for (int64_t e = l.q_row; e < l.dq_stride; e++) bad_padding += !is_poison(row[e]);
        }
        for (int j = 0; j < rd.nkv; j++) {
            const float *rowk = &got_dk[(l.cu_kv[r] + j) * l.dkv_stride];
            const float *rowv = &got_dv[(l.cu_kv[r] + j) * l.dkv_stride];
            for (int64_t e = 0; e < l.kv_row; e++) {
                check(rowk[e], rk[j * l.kv_row + e], margin * tk[j * l.kv_row + e], &bad_dk,
                      &worst_dk);
                check(rowv[e], rv[j * l.kv_row + e], margin * tv[j * l.kv_row + e], &bad_dv,
                      &worst_dv);
            }
            for (int64_t e = l.kv_row; e < l.dkv_stride; e++)
                bad_padding += !is_poison(rowk[e]) + !is_poison(rowv[e]);
        }
        // the slot's rows past kv_len (the gap) and, for the last request, the rows after it
        const int64_t gap_end = r + 1 < l.n_req ? l.cu_kv[r + 1] : l.total_kv + kExtraRows;
        for (int64_t j = l.cu_kv[r] + rd.nkv; j < gap_end; j++)
            for (int64_t e = 0; e < l.dkv_stride; e++)
                bad_padding += !is_poison(got_dk[j * l.dkv_stride + e]) +
                               !is_poison(got_dv[j * l.dkv_stride + e]);
    }
    for (int64_t i = l.total_q * l.dq_stride; i < (int64_t)got_dq.size(); i++)
        bad_padding += !is_poison(got_dq[i]);
    for (int64_t i = l.total_q * c.n_heads; i < (int64_t)got_lse.size(); i++)
        bad_padding += !is_poison(got_lse[i]);
    if (l.n_req == 0) {
        for (size_t i = 0; i < got_dk.size(); i++) bad_padding += !is_poison(got_dk[i]);
    }

    EXPECT_EQ(bad_values, 0) << "NaN/Inf (or unwritten poison) in the outputs";
    EXPECT_EQ(bad_padding, 0) << "elements outside the outputs were written";
    EXPECT_EQ(bad_lse, 0) << "lse outside its bound; worst err/tol = " << worst_lse;
    EXPECT_EQ(bad_dq, 0) << "dq outside its bound; worst err/tol = " << worst_dq;
    EXPECT_EQ(bad_dk, 0) << "dk outside its bound; worst err/tol = " << worst_dk;
    EXPECT_EQ(bad_dv, 0) << "dv outside its bound; worst err/tol = " << worst_dv;
    printf("  [%s] worst err/tol: lse %.3g dq %.3g dk %.3g dv %.3g\n", describe(c).c_str(),
           worst_lse, worst_dq, worst_dk, worst_dv);
}

// Self- and causal attention: n_kv = n_q, pos0 = 0.
std::vector<Request> self(std::initializer_list<int> lens) {
    std::vector<Request> v;
    for (int n : lens) v.push_back({n, n, 0});
    return v;
}

const int kHeadDims[] = {64, 80, 96, 128};
const int kGroups[] = {1, 3, 4};

// ---------------------------------------------------------------------------------------------
// Argument checks: no GPU needed, nothing reaches CUDA.
// ---------------------------------------------------------------------------------------------

sf_attention_args valid_args() {
    // Fake, aligned device addresses: every case below fails (or finishes) before any use.
    sf_attention_args a = {};
    a.out = reinterpret_cast<sf_bf16 *>(0x10000);
    a.lse = reinterpret_cast<float *>(0x70000);
    a.q = reinterpret_cast<const sf_bf16 *>(0x20000);
    a.k = reinterpret_cast<const sf_bf16 *>(0x30000);
    a.v = reinterpret_cast<const sf_bf16 *>(0x40000);
    a.cu_q = reinterpret_cast<const int32_t *>(0x50000);
    a.cu_kv = reinterpret_cast<const int32_t *>(0x60000);
    a.n_requests = 2;
    a.max_q_len = 5;
    a.n_heads = 8;
    a.n_kv_heads = 2;
    a.head_dim = 64;
    a.q_stride = a.out_stride = 8 * 64;
    a.kv_stride = 2 * 64;
    a.causal = true;
    a.scale = 0.125f;
    return a;
}

sf_attention_grads valid_grads() {
    sf_attention_grads g = {};
    g.dout = reinterpret_cast<const sf_bf16 *>(0x80000);
    g.dq = reinterpret_cast<float *>(0x90000);
    g.dk = reinterpret_cast<float *>(0xa0000);
    g.dv = reinterpret_cast<float *>(0xb0000);
    g.delta = reinterpret_cast<float *>(0xc0000);
    g.dout_stride = g.dq_stride = 8 * 64;
    g.dkv_stride = 2 * 64;
    g.max_kv_len = 7;
    return g;
}

sf_status bwd(const sf_attention_args &a, const sf_attention_grads &g) {
    return sf_cuda_attention_backward_bf16(&a, &g, 0);
}

TEST(CudaAttentionBackwardArgs, RejectsNullPointers) {
    const sf_attention_args a0 = valid_args();
    const sf_attention_grads g0 = valid_grads();
    EXPECT_EQ(sf_cuda_attention_backward_bf16(nullptr, &g0, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_attention_backward_bf16(&a0, nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    for (int which = 0; which < 12; which++) {
        sf_attention_args a = a0;
        sf_attention_grads g = g0;
        switch (which) {
            case 0: a.out = nullptr; break;
            case 1: a.q = nullptr; break;
            case 2: a.k = nullptr; break;
            case 3: a.v = nullptr; break;
            case 4: a.cu_q = nullptr; break;
            case 5: a.cu_kv = nullptr; break;
            case 6: a.lse = nullptr; break;  // the forward must have saved it
            case 7: g.dout = nullptr; break;
            case 8: g.dq = nullptr; break;
            case 9: g.dk = nullptr; break;
            case 10: g.dv = nullptr; break;
            default: g.delta = nullptr; break;
        }
        EXPECT_EQ(bwd(a, g), SF_ERR_INVALID_ARGUMENT) << "pointer " << which;
        EXPECT_NE(std::string(sf_last_error()).find("sf_cuda_attention_backward_bf16"),
                  std::string::npos);
    }
}

TEST(CudaAttentionBackwardArgs, RejectsBadShapes) {
    const sf_attention_grads g0 = valid_grads();
    sf_attention_args a = valid_args();
    a.n_kv_heads = 3;  // does not divide 8
    EXPECT_EQ(bwd(a, g0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.n_requests = -1;
    EXPECT_EQ(bwd(a, g0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.scale = INFINITY;
    EXPECT_EQ(bwd(a, g0), SF_ERR_INVALID_ARGUMENT);
    sf_attention_grads g = g0;
    g.max_kv_len = -1;
    EXPECT_EQ(bwd(valid_args(), g), SF_ERR_INVALID_ARGUMENT);
    // unsupported head dims fail before anything else is looked at
    for (int d : {0, 32, 100, 112, 256}) {
        a = valid_args();
        a.head_dim = d;
        a.q_stride = a.out_stride = 8 * 256;
        a.kv_stride = 2 * 256;
        g = g0;
        g.dout_stride = g.dq_stride = 8 * 256;
        g.dkv_stride = 2 * 256;
        EXPECT_EQ(bwd(a, g), SF_ERR_UNSUPPORTED) << "head_dim " << d;
    }
}

TEST(CudaAttentionBackwardArgs, RejectsShortOrMisalignedGradients) {
    const sf_attention_args a = valid_args();
    sf_attention_grads g = valid_grads();
    g.dout_stride = 8 * 64 - 8;
    EXPECT_EQ(bwd(a, g), SF_ERR_INVALID_ARGUMENT);
    g = valid_grads();
    g.dq_stride = 8 * 64 - 4;
    EXPECT_EQ(bwd(a, g), SF_ERR_INVALID_ARGUMENT);
    g = valid_grads();
    g.dkv_stride = 2 * 64 - 1;
    EXPECT_EQ(bwd(a, g), SF_ERR_INVALID_ARGUMENT);
    g = valid_grads();
    g.dout_stride = 8 * 64 + 4;  // long enough, rows not 16-byte aligned
    EXPECT_EQ(bwd(a, g), SF_ERR_UNSUPPORTED);
    g = valid_grads();
    g.dq_stride = 8 * 64 + 2;
    EXPECT_EQ(bwd(a, g), SF_ERR_UNSUPPORTED);
    g = valid_grads();
    g.dkv_stride = 2 * 64 + 6;
    EXPECT_EQ(bwd(a, g), SF_ERR_UNSUPPORTED);
    g = valid_grads();
    g.dk = reinterpret_cast<float *>(0xa0008);
    EXPECT_EQ(bwd(a, g), SF_ERR_UNSUPPORTED);
    g = valid_grads();
    g.dout = reinterpret_cast<const sf_bf16 *>(0x80002);
    EXPECT_EQ(bwd(a, g), SF_ERR_UNSUPPORTED);
    sf_attention_args big = valid_args();
    big.max_q_len = 1 << 29;  // max_q_len * n_heads past the grid's range
    EXPECT_EQ(bwd(big, valid_grads()), SF_ERR_UNSUPPORTED);
    big = valid_args();
    big.n_requests = 70000;
    EXPECT_EQ(bwd(big, valid_grads()), SF_ERR_UNSUPPORTED);
}

TEST(CudaAttentionBackwardArgs, NothingToDoIsOk) {
    sf_attention_args a = valid_args();
    sf_attention_grads g = valid_grads();
    a.n_requests = 0;
    a.out = nullptr;  // never touched
    g.dq = nullptr;
    EXPECT_EQ(bwd(a, g), SF_OK);
    a = valid_args();
    g = valid_grads();
    a.max_q_len = 0;
    g.max_kv_len = 0;
    EXPECT_EQ(bwd(a, g), SF_OK);
}

// ---------------------------------------------------------------------------------------------
// Against the CPU twin and the double-precision lse.
// ---------------------------------------------------------------------------------------------

// Causal packed-varlen prefill (cu_kv == cu_q, q_pos0 NULL): lengths 1, 17, 0, 63, 65, 200 in
// one batch, so key blocks and query tiles are cut mid-request, mid-group, on the diagonal.
TEST(CudaAttentionBackward, CausalPackedPrefill) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 1;
    for (int d : kHeadDims)
        for (int group : kGroups) {
            Case c{d, 2 * group, 2, true, 0, false, self({1, 17, 0, 63, 65, 200})};
            run_case(c, seed++);
        }
}

// Bidirectional self-attention (the Sysformer's SA): every key of the request.
TEST(CudaAttentionBackward, BidirectionalSelfAttention) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 100;
    for (int d : kHeadDims)
        for (int group : kGroups) {
            Case c{d, 2 * group, 2, false, 0, false, self({17, 1, 200, 0, 65, 63})};
            run_case(c, seed++);
        }
}

// Cross-attention (the Sysformer's CA) with per-request kv_len in slots of kv_len + 16 rows
// (NaN gaps that must never be read or written): q x kv = 1x17, 33x200, 5x1, 0x10 (no
// queries: its keys get zero gradients), 3x0 (no keys: zero dq), 63x65, 200x63. q_pos0 and
// the window are passed and must be ignored.
TEST(CudaAttentionBackward, CrossAttentionWithKvLen) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 200;
    for (int d : kHeadDims)
        for (int group : kGroups) {
            Case c{d, 2 * group, 2, false, 9, true,
                   {{1, 17, 3}, {33, 200, 0}, {5, 1, 0}, {0, 10, 0}, {3, 0, 0}, {63, 65, 1},
                    {200, 63, 0}}};
            c.kv_gap = 16;
            run_case(c, seed++);
        }
}

// Causal against a cache (queries at pos0 .. pos0 + n_q - 1), with and without a sliding
// window; one request's first queries sit at negative positions and see nothing (lse -inf,
// zero dq), and with the window some keys are seen by no query (zero dk, dv).
TEST(CudaAttentionBackward, ChunkedCausalAndSlidingWindow) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 300;
    for (int d : {64, 128}) {
        for (int window : {0, 16, 100}) {
            Case c{d, 8, 2, true, window, true,
                   {{65, 265, 200}, {9, 6, -3}, {17, 17, 0}, {1, 300, 299}, {63, 130, 67}}};
            c.kv_gap = window == 100 ? 8 : 0;
            run_case(c, seed++);
        }
    }
}

// lse == NULL must leave the forward exactly as it was: the same output bits as the run that
// also writes lse (the two are different instantiations of one kernel).
TEST(CudaAttentionLse, NullLseLeavesOutputBitIdentical) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 400;
    for (int d : kHeadDims) {
        for (bool causal : {true, false}) {
            Case c{d, 12, 4, causal, 0, false, self({1, 17, 63, 65, 200})};
            SCOPED_TRACE(describe(c));
            const Layout l = make_layout(c);
            std::mt19937 rng(seed++);
            std::uniform_real_distribution<float> u2(-2.0f, 2.0f);
            std::vector<uint16_t> hq(l.total_q * l.q_stride), hk(l.total_kv * l.kv_stride);
            for (auto &x : hq) x = to_bf16(u2(rng));
            for (auto &x : hk) x = to_bf16(u2(rng));
            DeviceBuffer<uint16_t> bq(hq), bk(hk), out1(l.total_q * l.q_stride),
                out2(l.total_q * l.q_stride);
            DeviceBuffer<float> blse(l.total_q * c.n_heads);
            DeviceBuffer<int32_t> bcu(l.cu_q);
            ASSERT_TRUE(bq.get() && bk.get() && out1.get() && out2.get() && blse.get() &&
                        bcu.get());
            sf_attention_args a = {};
            a.q = bq.get();
            a.k = a.v = bk.get();
            a.cu_q = a.cu_kv = bcu.get();
            a.n_requests = l.n_req;
            a.max_q_len = l.max_q;
            a.n_heads = c.n_heads;
            a.n_kv_heads = c.n_kv_heads;
            a.head_dim = d;
            a.q_stride = a.out_stride = l.q_stride;
            a.kv_stride = l.kv_stride;
            a.causal = causal;
            a.scale = 1.0f / sqrtf((float)d);
            a.out = out1.get();
            ASSERT_EQ(sf_cuda_attention_bf16(&a, 0), SF_OK) << sf_last_error();
            a.out = out2.get();
            a.lse = blse.get();
            ASSERT_EQ(sf_cuda_attention_bf16(&a, 0), SF_OK) << sf_last_error();
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            const std::vector<uint16_t> o1 = out1.host(), o2 = out2.host();
            EXPECT_EQ(memcmp(o1.data(), o2.data(), o1.size() * sizeof(uint16_t)), 0);
        }
    }
}

}  // namespace
