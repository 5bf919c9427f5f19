// sf_cuda_attention_bf16 (and the Hopper kernels sf_cuda_attention_sm90_bf16 and
// sf_cuda_attention_sm90_ws_bf16, every test run once for each) against its CPU twin
// sf_cpu_attention (fp32 math on the same bf16-rounded inputs), request by request, over every
// head dim, GQA ratios 1/2/4/8, causal packed prefill with mixed lengths, sliding windows,
// chunked prefill and decode against a cache, bidirectional self-attention and
// cross-attention. The argument tests run without a GPU (the launcher checks everything before
// its first CUDA call); the others skip when none is present. At the end, CudaWgmmaProducts: the
// Hopper kernels' two products alone, to say which operand a failing wgmma kernel misreads.
//
// Tolerance, derived (FlashAttention's rule): the kernel stores bf16 and rounds P to bf16 before
// the PV product, so it cannot match the fp32 reference to fp32 precision. The yardstick is the
// same attention done the naive bf16 way, computed here on the CPU:
//   S = bf16(Q K^T) (fp32 accumulation), S = bf16(S * scale), P = bf16(softmax_fp32(S)),
//   O = bf16(P V) (fp32 accumulation),
// i.e. what a bf16 framework's unfused softmax(Q K^T * scale) V produces. Then
//   max |gpu - ref| <= 2 * max |naive - ref| + 1e-5          (over every output of the batch)
// The factor 2 is FlashAttention's margin for a different (here: smaller) set of roundings; the
// 1e-5 floor only matters where the naive error is ~0, which happens when every row sees a
// single key (both are then exact) and otherwise leaves room for fp32 summation-order noise
// (|o| <= 1, a few thousand terms: ~1e-6 typical). On top of that: no NaN/Inf in any output, and
// every element the kernel must not write (row padding past n_heads * head_dim, rows past the
// last request) still holds its 0xFFFF poison.
#include <gtest/gtest.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <ostream>
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
    int extra_q_len = 0;  // max_q_len = longest request + this (it is only an upper bound)
    int q_pad = 8, kv_pad = 8, out_pad = 16;  // stride padding, in elements
    // > 0: each request's keys sit kv_gap NaN rows after the previous request's (KV-cache slots
    // with unused rows between them), and kv_len gives the lengths instead of cu_kv.
    int kv_gap = 0;
    // > 0: passed as max_kv_len with the workspace it asks for, so that decode (max_q_len 1)
    // runs in the split-KV kernel (attention_decode.cu); `splits` then says whether the keys
    // must be split over blocks (a workspace is needed) or not.
    int max_kv_len = 0;
    bool splits = false;
};

std::string describe(const Case &c) {
    char buf[160];
    snprintf(buf, sizeof buf, "d=%d heads=%d/%d %s window=%d pos0=%s reqs:", c.head_dim,
             c.n_heads, c.n_kv_heads, c.causal ? "causal" : "bidirectional", c.window,
             c.pass_pos0 ? "given" : "NULL");
    std::string s = buf;
    for (const Request &r : c.reqs) {
        snprintf(buf, sizeof buf, " %dx%d@%d", r.n_q, r.n_kv, r.pos0);
        s += buf;
    }
    return s;
}

inline float round_bf16(float x) { return from_bf16(to_bf16(x)); }

// The naive bf16 attention of the tolerance comment above, for one request, contiguous rows.
void naive_bf16_attention(float *out, const float *q, const float *k, const float *v, int n_q,
                          int n_kv, int n_heads, int n_kv_heads, int d, bool causal, int pos0,
                          int window, float scale) {
    const int group = n_heads / n_kv_heads;
    const int64_t qs = (int64_t)n_heads * d, kvs = (int64_t)n_kv_heads * d;
    std::vector<float> s(n_kv > 0 ? n_kv : 1);
    for (int i = 0; i < n_q; i++) {
        for (int h = 0; h < n_heads; h++) {
            const int g = h / group;
            float *o = out + i * qs + (int64_t)h * d;
            const float *qr = q + i * qs + (int64_t)h * d;
            int64_t lo = 0, hi = n_kv;
            if (causal) {
                const int64_t pos = (int64_t)pos0 + i;
                hi = std::min<int64_t>(hi, pos + 1);
                if (window > 0) lo = std::max<int64_t>(lo, pos - window + 1);
            }
            for (int e = 0; e < d; e++) o[e] = 0.0f;
            if (lo >= hi) continue;
            float mx = -INFINITY;
            for (int64_t j = lo; j < hi; j++) {
                const float *kr = k + j * kvs + (int64_t)g * d;
                float dot = 0.0f;
                for (int e = 0; e < d; e++) dot += qr[e] * kr[e];
                s[j] = round_bf16(round_bf16(dot) * scale);
                mx = std::max(mx, s[j]);
            }
            float sum = 0.0f;
            for (int64_t j = lo; j < hi; j++) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            for (int64_t j = lo; j < hi; j++) s[j] = round_bf16(s[j] / sum);
            for (int e = 0; e < d; e++) {
                float acc = 0.0f;
                for (int64_t j = lo; j < hi; j++) acc += s[j] * v[j * kvs + (int64_t)g * d + e];
                o[e] = round_bf16(acc);
            }
        }
    }
}

// The forward under test: the tiled mma.sync kernel behind sf_cuda_attention_bf16 (with its
// split-KV decode), or one of the Hopper wgmma kernels (every case tiled): the pipelined one
// (sf_cuda_attention_sm90_bf16 with its default 128-key tiles, or 64-key ones through
// sf_cuda_attention_sm90_tiles_bf16) or the warp-specialized one (sf_cuda_attention_sm90_ws_bf16).
// The same cases, references and bounds serve both: the bound's terms are the bf16 roundings of
// P and the output and fp32 sums in any order, which both kernels have.
using AttentionFn = sf_status (*)(const sf_attention_args *, cudaStream_t);
AttentionFn g_attention = sf_cuda_attention_bf16;

// Runs one case on the GPU and checks it as the header comment says.
void run_case(const Case &c, uint32_t seed) {
    SCOPED_TRACE(describe(c));
    const int d = c.head_dim;
    const int64_t q_row = (int64_t)c.n_heads * d, kv_row = (int64_t)c.n_kv_heads * d;
    const int64_t q_stride = q_row + c.q_pad, kv_stride = kv_row + c.kv_pad,
                  out_stride = q_row + c.out_pad;
    const int n_req = (int)c.reqs.size();
    std::vector<int32_t> cu_q(n_req + 1, 0), cu_kv(n_req + 1, 0), pos0(n_req, 0), kv_len(n_req, 0);
    int max_q = 0;
    for (int r = 0; r < n_req; r++) {
        cu_q[r + 1] = cu_q[r] + c.reqs[r].n_q;
        cu_kv[r + 1] = cu_kv[r] + c.reqs[r].n_kv + c.kv_gap;
        kv_len[r] = c.reqs[r].n_kv;
        pos0[r] = c.reqs[r].pos0;
        max_q = std::max(max_q, c.reqs[r].n_q);
    }
    const int64_t total_q = cu_q[n_req], total_kv = cu_kv[n_req];
    const int64_t extra_rows = 3;  // past the last request: must stay poisoned

    // Inputs: q and k in [-2, 2] (scores of std ~1.3 at scale 1/sqrt(d): peaked softmaxes),
    // v in [-1, 1]; stride padding holds NaN, which must never reach an output.
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u2(-2.0f, 2.0f), u1(-1.0f, 1.0f);
    const uint16_t nan_bits = 0x7fc0;
    std::vector<uint16_t> hq(std::max<int64_t>(total_q, 1) * q_stride, nan_bits);
    std::vector<uint16_t> hk(std::max<int64_t>(total_kv, 1) * kv_stride, nan_bits);
    std::vector<uint16_t> hv(hk.size(), nan_bits);
    for (int64_t i = 0; i < total_q; i++)
        for (int64_t e = 0; e < q_row; e++) hq[i * q_stride + e] = to_bf16(u2(rng));
    for (int r = 0; r < n_req; r++) {
        for (int64_t j = cu_kv[r]; j < cu_kv[r] + kv_len[r]; j++) {  // gap rows stay NaN
            for (int64_t e = 0; e < kv_row; e++) hk[j * kv_stride + e] = to_bf16(u2(rng));
            for (int64_t e = 0; e < kv_row; e++) hv[j * kv_stride + e] = to_bf16(u1(rng));
        }
    }
    const float scale = 1.0f / sqrtf((float)d);

    DeviceBuffer<uint16_t> dq(hq), dk(hk), dv(hv);
    DeviceBuffer<uint16_t> dout((size_t)((total_q + extra_rows) * out_stride));  // 0xFFFF poison
    DeviceBuffer<int32_t> dcu_q(cu_q), dcu_kv(cu_kv), dpos0(pos0), dkv_len(kv_len);
    ASSERT_TRUE(dq.get() && dk.get() && dv.get() && dout.get() && dcu_q.get() && dcu_kv.get() &&
                dpos0.get() && dkv_len.get());

    sf_attention_args a = {};
    a.out = dout.get();
    a.q = dq.get();
    a.k = dk.get();
    a.v = dv.get();
    a.cu_q = dcu_q.get();
    a.cu_kv = dcu_kv.get();
    a.kv_len = c.kv_gap > 0 ? dkv_len.get() : nullptr;
    a.q_pos0 = c.pass_pos0 ? dpos0.get() : nullptr;
    a.n_requests = n_req;
    a.max_q_len = max_q + c.extra_q_len;
    a.n_heads = c.n_heads;
    a.n_kv_heads = c.n_kv_heads;
    a.head_dim = d;
    a.q_stride = q_stride;
    a.kv_stride = kv_stride;
    a.out_stride = out_stride;
    a.causal = c.causal;
    a.window = c.window;
    a.scale = scale;
    a.max_kv_len = c.max_kv_len;
    const size_t ws_bytes = sf_cuda_attention_workspace_bytes(&a);
    EXPECT_EQ(ws_bytes > 0, c.splits) << "workspace " << ws_bytes << " bytes";
    DeviceBuffer<float> dws(ws_bytes / sizeof(float) + 1);
    if (ws_bytes > 0) {
        a.workspace = dws.get();
        a.workspace_bytes = ws_bytes;
    }
    ASSERT_EQ(g_attention(&a, 0), SF_OK) << sf_last_error();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<uint16_t> got = dout.host();

    // References, request by request on contiguous copies of the bf16 inputs.
    double err_gpu = 0.0, err_naive = 0.0, num = 0.0, den = 0.0;
    int64_t bad_values = 0, bad_padding = 0;
    for (int r = 0; r < n_req; r++) {
        const int nq = c.reqs[r].n_q, nkv = c.reqs[r].n_kv;
        std::vector<float> q((size_t)nq * q_row + 1), k((size_t)nkv * kv_row + 1),
            v((size_t)nkv * kv_row + 1), ref((size_t)nq * q_row + 1), naive((size_t)nq * q_row + 1);
        for (int i = 0; i < nq; i++)
            for (int64_t e = 0; e < q_row; e++)
                q[i * q_row + e] = from_bf16(hq[(cu_q[r] + i) * q_stride + e]);
        for (int j = 0; j < nkv; j++) {
            for (int64_t e = 0; e < kv_row; e++) {
                k[j * kv_row + e] = from_bf16(hk[(cu_kv[r] + j) * kv_stride + e]);
                v[j * kv_row + e] = from_bf16(hv[(cu_kv[r] + j) * kv_stride + e]);
            }
        }
        sf_cpu_attention(ref.data(), q.data(), k.data(), v.data(), nq, nkv, c.n_heads,
                         c.n_kv_heads, d, c.causal, c.reqs[r].pos0, c.window, scale);
        naive_bf16_attention(naive.data(), q.data(), k.data(), v.data(), nq, nkv, c.n_heads,
                             c.n_kv_heads, d, c.causal, c.reqs[r].pos0, c.window, scale);
        for (int i = 0; i < nq; i++) {
            const uint16_t *row = &got[(cu_q[r] + i) * out_stride];
            for (int64_t e = 0; e < q_row; e++) {
                const float g = from_bf16(row[e]), want = ref[i * q_row + e];
                if (!std::isfinite(g)) {
                    bad_values++;
                    continue;
                }
                err_gpu = std::max(err_gpu, (double)fabsf(g - want));
                err_naive = std::max(err_naive, (double)fabsf(naive[i * q_row + e] - want));
                num += ((double)g - want) * ((double)g - want);
                den += (double)want * want;
            }
            for (int64_t e = q_row; e < out_stride; e++) bad_padding += row[e] != 0xffff;
        }
    }
    for (int64_t i = total_q * out_stride; i < (int64_t)got.size(); i++)
        bad_padding += got[i] != 0xffff;

    const double tol = 2.0 * err_naive + 1e-5;
    EXPECT_EQ(bad_values, 0) << "NaN/Inf (or unwritten poison) in the outputs";
    EXPECT_EQ(bad_padding, 0) << "elements outside the outputs were written";
    EXPECT_LE(err_gpu, tol) << "max |gpu - fp32 ref| = " << err_gpu
                            << ", naive bf16: " << err_naive
                            << ", rel l2 = " << sqrt(num / (den > 0 ? den : 1));
}

// Mixed lengths in one batch; for prefill n_kv = n_q.
std::vector<Request> prefill(std::initializer_list<int> lens) {
    std::vector<Request> v;
    for (int n : lens) v.push_back({n, n, 0});
    return v;
}

const int kHeadDims[] = {64, 80, 96, 128};

// ---------------------------------------------------------------------------------------------
// Argument checks: no GPU needed, nothing reaches CUDA.
// ---------------------------------------------------------------------------------------------

sf_attention_args valid_args() {
    // Fake, aligned device addresses: every case below fails (or finishes) before any use.
    sf_attention_args a = {};
    a.out = reinterpret_cast<sf_bf16 *>(0x10000);
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

TEST(CudaAttentionArgs, RejectsNullAndNegativeCounts) {
    EXPECT_EQ(sf_cuda_attention_bf16(nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    sf_attention_args a = valid_args();
    a.n_requests = -1;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.max_q_len = -3;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    for (int which = 0; which < 6; which++) {
        a = valid_args();
        switch (which) {
            case 0: a.out = nullptr; break;
            case 1: a.q = nullptr; break;
            case 2: a.k = nullptr; break;
            case 3: a.v = nullptr; break;
            case 4: a.cu_q = nullptr; break;
            default: a.cu_kv = nullptr; break;
        }
        EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT) << "pointer " << which;
        EXPECT_NE(std::string(sf_last_error()).find("sf_cuda_attention_bf16"), std::string::npos);
    }
}

TEST(CudaAttentionArgs, RejectsBadHeads) {
    sf_attention_args a = valid_args();
    a.n_kv_heads = 3;  // does not divide 8
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.n_heads = 0;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.n_kv_heads = -2;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    for (int d : {0, 32, 100, 112, 256}) {
        a = valid_args();
        a.head_dim = d;
        a.q_stride = a.out_stride = 8 * 256;
        a.kv_stride = 2 * 256;
        EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_UNSUPPORTED) << "head_dim " << d;
    }
}

TEST(CudaAttentionArgs, RejectsShortMisalignedStridesAndPointers) {
    sf_attention_args a = valid_args();
    a.q_stride = 8 * 64 - 8;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.kv_stride = 2 * 64 - 1;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.out_stride = 64;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.kv_stride = 2 * 64 + 4;  // long enough, but rows would not be 16-byte aligned
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_UNSUPPORTED);
    a = valid_args();
    a.q = reinterpret_cast<const sf_bf16 *>(0x20002);
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_UNSUPPORTED);
    a = valid_args();
    a.n_requests = 70000;  // over the grid's z limit
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_UNSUPPORTED);
    a = valid_args();
    a.scale = NAN;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    a = valid_args();
    a.kernel = static_cast<sf_attention_kernel>(4);  // not a kernel
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_ERR_INVALID_ARGUMENT);
    // the wgmma kernel's tiles are 64, 96 or 128 keys: 80 is refused before any CUDA call (by
    // a build without sm_90a code, as everything is)
    for (bool ws : {false, true}) {
        a = valid_args();
        const sf_status st = ws ? sf_cuda_attention_sm90_ws_bf16(&a, 80, 0)
                                : sf_cuda_attention_sm90_tiles_bf16(&a, 80, 0);
        EXPECT_TRUE(st == SF_ERR_INVALID_ARGUMENT || st == SF_ERR_UNSUPPORTED) << sf_last_error();
        EXPECT_NE(strstr(sf_last_error(), st == SF_ERR_INVALID_ARGUMENT ? "block_n" : "sm_90a"),
                  nullptr)
            << sf_last_error();
    }
}

// The split decode's workspace: only for decode (one query) with max_kv_len, no lse and at most
// 8 query heads per kv head; n_requests * n_heads * splits * (head_dim + 2) floats.
TEST(CudaAttentionArgs, SplitDecodeWorkspace) {
    sf_attention_args a = valid_args();  // 2 requests, 8 / 2 heads, d 64
    a.max_q_len = 1;
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)0);  // no max_kv_len
    a.max_kv_len = 4096;
    // 4 (request, kv head) pairs: 256 splits wanted, 16 of >= 256 keys allowed
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)2 * 8 * 16 * 66 * 4);
    a.max_kv_len = 300;  // 2 splits
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)2 * 8 * 2 * 66 * 4);
    a.max_kv_len = 200;  // one split: the decode kernel without a workspace
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)0);
    a.max_kv_len = 4096;
    a.max_q_len = 2;  // not decode
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)0);
    a.max_q_len = 1;
    a.lse = reinterpret_cast<float *>(0x70000);  // training's forward: the tiled kernel
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)0);
    a.lse = nullptr;
    a.n_heads = 32;  // 16 query heads per kv head
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(&a), (size_t)0);
    EXPECT_EQ(sf_cuda_attention_workspace_bytes(nullptr), (size_t)0);
}

// The wgmma products' test entry point checks its arguments before touching the device (the
// pointers below are never dereferenced).
TEST(CudaAttentionArgs, WgmmaProductsRejectsBadArguments) {
    alignas(16) uint16_t in[8] = {};
    float out[1] = {};
    EXPECT_EQ(sf_cuda_wgmma_products_bf16(72, 64, in, in, in, in, out, out, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "head_dim = 72"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_cuda_wgmma_products_bf16(64, 32, in, in, in, in, out, out, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "block_n = 32"), nullptr) << sf_last_error();
    EXPECT_EQ(sf_cuda_wgmma_products_bf16(64, 64, in, in, nullptr, in, out, out, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_wgmma_products_bf16(64, 64, in, in + 1, in, in, out, out, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "16-byte aligned"), nullptr) << sf_last_error();
}

TEST(CudaAttentionArgs, NothingToDoIsOk) {
    sf_attention_args a = valid_args();
    a.n_requests = 0;
    a.out = nullptr;  // never touched
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_OK);
    a = valid_args();
    a.max_q_len = 0;
    EXPECT_EQ(sf_cuda_attention_bf16(&a, 0), SF_OK);
}

// ---------------------------------------------------------------------------------------------
// Against the CPU twin.
// ---------------------------------------------------------------------------------------------

// Every test below runs once per kernel: CudaAttention/CudaAttention.Name/tiled; /sm90,
// /sm90_n96 and /sm90_n64, the pipelined wgmma kernel with 128-, 96- and 64-key tiles;
// /sm90_ws, /sm90_ws_n96 and /sm90_ws_n64, the warp-specialized one. The sm90 instances skip
// where those kernels cannot run (no sm_90a code in the build, or a device other than compute
// capability 9.0), saying why.
enum class AttnKernel { kTiled, kSm90, kSm90N96, kSm90N64, kSm90Ws, kSm90WsN96, kSm90WsN64 };
std::string kernel_name(AttnKernel k) {
    switch (k) {
        case AttnKernel::kSm90: return "sm90";
        case AttnKernel::kSm90N96: return "sm90_n96";
        case AttnKernel::kSm90N64: return "sm90_n64";
        case AttnKernel::kSm90Ws: return "sm90_ws";
        case AttnKernel::kSm90WsN96: return "sm90_ws_n96";
        case AttnKernel::kSm90WsN64: return "sm90_ws_n64";
        default: return "tiled";
    }
}
void PrintTo(AttnKernel k, std::ostream *os) { *os << kernel_name(k); }

sf_status sm90_n96(const sf_attention_args *a, cudaStream_t stream) {
    return sf_cuda_attention_sm90_tiles_bf16(a, 96, stream);
}
sf_status sm90_n64(const sf_attention_args *a, cudaStream_t stream) {
    return sf_cuda_attention_sm90_tiles_bf16(a, 64, stream);
}
sf_status sm90_ws(const sf_attention_args *a, cudaStream_t stream) {
    return sf_cuda_attention_sm90_ws_bf16(a, 128, stream);
}
sf_status sm90_ws_n96(const sf_attention_args *a, cudaStream_t stream) {
    return sf_cuda_attention_sm90_ws_bf16(a, 96, stream);
}
sf_status sm90_ws_n64(const sf_attention_args *a, cudaStream_t stream) {
    return sf_cuda_attention_sm90_ws_bf16(a, 64, stream);
}

class CudaAttention : public ::testing::TestWithParam<AttnKernel> {
  protected:
    void SetUp() override {
        const AttnKernel k = GetParam();
        g_attention = k == AttnKernel::kSm90        ? sf_cuda_attention_sm90_bf16
                      : k == AttnKernel::kSm90N96   ? sm90_n96
                      : k == AttnKernel::kSm90N64   ? sm90_n64
                      : k == AttnKernel::kSm90Ws    ? sm90_ws
                      : k == AttnKernel::kSm90WsN96 ? sm90_ws_n96
                      : k == AttnKernel::kSm90WsN64 ? sm90_ws_n64
                                                    : sf_cuda_attention_bf16;
        int devices = 0;
        if (k != AttnKernel::kTiled && sf_cuda_device_count(&devices) == SF_OK &&
            devices > 0 && sf_cuda_attention_sm90_check() == SF_ERR_UNSUPPORTED) {
            GTEST_SKIP() << sf_last_error();
        }
    }
    void TearDown() override { g_attention = sf_cuda_attention_bf16; }
};

// Causal packed-varlen prefill, lengths 1, 7, 65 and 300 in one batch (tiles cut mid-request,
// mid-group and on the diagonal), every head dim and GQA ratio, q_pos0 NULL.
TEST_P(CudaAttention, CausalPackedPrefillEveryHeadDimAndGroup) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 1;
    for (int d : kHeadDims) {
        for (int group : {1, 2, 4, 8}) {
            Case c{d, 2 * group, 2, true, 0, false, prefill({1, 7, 65, 300})};
            run_case(c, seed++);
        }
    }
}

// Sliding windows (1: only itself; 16 and 100: cut inside and across key tiles).
TEST_P(CudaAttention, CausalSlidingWindow) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 100;
    for (int d : {64, 80, 128}) {
        for (int window : {1, 16, 100}) {
            Case c{d, 8, 2, true, window, false, prefill({7, 300, 1, 65})};
            run_case(c, seed++);
        }
    }
}

// Chunked prefill against a cache: the queries are the cache's last rows (pos0 = n_kv - n_q),
// with and without a window; one request's first queries sit at negative positions and see
// nothing (zeros).
TEST_P(CudaAttention, ChunkedPrefillAgainstCache) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 200;
    for (int d : {96, 128}) {
        for (int window : {0, 64}) {
            Case c{d, 16, 4, true, window, true,
                   {{65, 265, 200}, {7, 137, 130}, {1, 1000, 999}, {9, 6, -3}, {33, 33, 0}}};
            c.extra_q_len = 5;
            run_case(c, seed++);
        }
    }
}

// The engine's layout: each request's cache in a fixed slot of rows, lengths from kv_len, NaN
// rows between the slots that no query may read. Chunked prefill and decode.
TEST_P(CudaAttention, SlottedCacheWithGaps) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 250;
    for (int d : kHeadDims) {
        Case c{d, 8, 2, true, 0, true, {{5, 40, 35}, {1, 1, 0}, {17, 17, 0}, {1, 300, 299}}};
        c.kv_gap = 29;
        run_case(c, seed++);
        Case w{d, 8, 8, false, 0, true, {{12, 30, 0}, {3, 0, 0}, {64, 7, 0}}};  // Sysformer CA
        w.kv_gap = 16;
        run_case(w, seed++);
    }
}

// Decode: one query per request at the cache's last position, caches from 1 to 2048 rows;
// with minimal strides, and with a window.
TEST_P(CudaAttention, DecodeAgainstLongCache) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 300;
    for (int d : kHeadDims) {
        for (int group : {4, 8}) {
            for (int window : {0, 256}) {
                Case c{d, 4 * group, 4, true, window, true,
                       {{1, 1, 0}, {1, 100, 99}, {1, 2048, 2047}, {1, 777, 776}, {1, 65, 65}}};
                c.q_pad = c.kv_pad = c.out_pad = 0;
                run_case(c, seed++);
            }
        }
    }
}

// Decode through the split-KV kernel (max_kv_len and its workspace given), against the same
// references and bound: the kernel keeps P in fp32, so it rounds less than the naive bf16
// yardstick. Groups 1 to 8 (3 is SmolLM2's), windows, caches in slots with NaN gaps, a cache
// of 4100 rows cut into splits (some past the shorter caches: empty parts), an empty cache, a
// request with no query; one request alone (many splits of a long cache); and a batch large
// enough that the keys are not split (one block per request and kv head).
TEST_P(CudaAttention, DecodeSplitOverBlocks) {
    SF_SKIP_WITHOUT_GPU();
    // the split-KV path is sf_cuda_attention_bf16's; the sm90 kernel's decode (tiled, like every
    // case there) is DecodeAgainstLongCache's
    if (GetParam() != AttnKernel::kTiled) GTEST_SKIP() << "split-KV decode: tiled kernel only";
    uint32_t seed = 350;
    for (int d : kHeadDims) {
        for (int group : {1, 3, 4, 8}) {
            for (int window : {0, 300}) {
                Case c{d, 2 * group, 2, true, window, true,
                       {{1, 1, 0}, {1, 4100, 4099}, {1, 777, 776}, {0, 5, 0}, {1, 0, 0},
                        {1, 300, 299}}};
                c.kv_gap = 13;
                c.max_kv_len = 4100;
                c.splits = true;
                run_case(c, seed++);
            }
        }
        Case one{d, 8, 2, true, 0, true, {{1, 3000, 2999}}};
        one.max_kv_len = 4096;
        one.splits = true;
        one.q_pad = one.kv_pad = one.out_pad = 0;
        run_case(one, seed++);
        Case many{d, 4, 4, true, 0, true, {}};
        for (int r = 0; r < 300; r++) {
            const int n_kv = 1 + (r * 37) % 200;
            many.reqs.push_back({1, n_kv, n_kv - 1});
        }
        many.max_kv_len = 256;  // 1200 (request, kv head) blocks: no split
        run_case(many, seed++);
    }
}

// Bidirectional self-attention (the Sysformer's SA): every key of the request. Group 3 does not
// divide the kernel's row tiles, so a query's heads straddle two of them.
TEST_P(CudaAttention, BidirectionalSelfAttention) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 400;
    for (int d : kHeadDims) {
        for (int group : {1, 3, 4}) {
            Case c{d, 4 * group, 4, false, 0, false, prefill({1, 7, 65, 300})};
            run_case(c, seed++);
        }
    }
}

// Cross-attention (the Sysformer's CA): other q and kv lengths, 1x17, 33x100, 5x1, plus a request
// with no queries and one with no keys (zeros); window and q_pos0 are ignored when !causal.
TEST_P(CudaAttention, CrossAttentionOtherLengths) {
    SF_SKIP_WITHOUT_GPU();
    uint32_t seed = 500;
    for (int d : kHeadDims) {
        for (int group : {1, 2}) {
            Case c{d, 4 * group, 4, false, 7, true,
                   {{1, 17, 3}, {33, 100, 0}, {5, 1, 0}, {0, 10, 0}, {3, 0, 0}, {130, 70, 9}}};
            run_case(c, seed++);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(CudaAttention, CudaAttention,
                         ::testing::Values(AttnKernel::kTiled, AttnKernel::kSm90,
                                           AttnKernel::kSm90N96, AttnKernel::kSm90N64,
                                           AttnKernel::kSm90Ws, AttnKernel::kSm90WsN96,
                                           AttnKernel::kSm90WsN64),
                         [](const ::testing::TestParamInfo<AttnKernel> &i) {
                             return kernel_name(i.param);
                         });

// ---------------------------------------------------------------------------------------------
// The Hopper kernels' two products alone (sf_cuda_wgmma_products_bf16): S = Q K^T and O = P V
// through the kernels' own operand placement, descriptors, P fragments and accumulator layouts.
// Where the attention tests above fail on a GPU, these say which operand the tensor cores read
// otherwise than the kernels assume, and how.
// ---------------------------------------------------------------------------------------------

// The products' row-major bf16 operands (zeros until set): q [64 x d], k and v [n x d], p [64 x n].
struct Operands {
    int d, n;
    std::vector<uint16_t> q, k, v, p;
    Operands(int d_, int n_)
        : d(d_), n(n_), q(64 * d_), k((size_t)n_ * d_), v((size_t)n_ * d_), p(64 * n_) {}
};

class CudaWgmmaProducts : public ::testing::Test {
  protected:
    void SetUp() override {
        SF_SKIP_WITHOUT_GPU();
        if (sf_cuda_attention_sm90_check() == SF_ERR_UNSUPPORTED) GTEST_SKIP() << sf_last_error();
    }

    // S [64 x n] and O [64 x d] (fp32) of x
    static void run(const Operands &x, std::vector<float> *s, std::vector<float> *o) {
        DeviceBuffer<uint16_t> q(x.q), k(x.k), v(x.v), p(x.p);
        DeviceBuffer<float> ds(64 * x.n), dout(64 * x.d);
        ASSERT_EQ(sf_cuda_wgmma_products_bf16(x.d, x.n, q.get(), k.get(), v.get(), p.get(),
                                              ds.get(), dout.get(), 0),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        *s = ds.host();
        *o = dout.host();
    }
};

// Random operands against double precision, element by element. Tolerance, derived: each
// product of two bf16 values is exact in fp32 (8-bit significands), so only the sums round.
// Tensor cores add a few products at a time after aligning them to the largest, truncating
// the bits shifted out (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021), then
// add that to the fp32 accumulator: each of the K terms loses at most one unit of 2^-23
// relative to the largest, and each addition to the accumulator at most one more, so
//   |gpu - exact| <= 2 K 2^-23 sum_i |a_i b_i|       (K = d for S, n for O).
// A misplaced operand moves whole 8 x 8 blocks: errors of the order of the values themselves.
TEST_F(CudaWgmmaProducts, RandomOperandsMatchDoublePrecision) {
    uint32_t seed = 900;
    for (int d : kHeadDims) {
        for (int n : {64, 96, 128}) {
            std::mt19937 rng(seed++);
            std::uniform_real_distribution<float> u1(-1.0f, 1.0f), p01(0.0f, 1.0f);
            Operands x(d, n);
            for (auto &e : x.q) e = to_bf16(u1(rng));
            for (auto &e : x.k) e = to_bf16(u1(rng));
            for (auto &e : x.v) e = to_bf16(u1(rng));
            for (auto &e : x.p) e = to_bf16(p01(rng));  // probabilities, as P is
            std::vector<float> s, o;
            run(x, &s, &o);
            if (HasFatalFailure()) return;
            // out[i][j] = sum over kk < len of a(i, kk) b(j, kk), against its bound: how many
            // elements lie outside, said with the first
            auto check = [](const char *name, const std::vector<float> &out, int rows, int cols,
                            int len, auto a, auto b, std::string *said) {
                int bad = 0;
                char first[160] = "";
                for (int i = 0; i < rows; i++) {
                    for (int j = 0; j < cols; j++) {
                        double exact = 0, mag = 0;
                        for (int kk = 0; kk < len; kk++) {
                            const double t = (double)a(i, kk) * b(j, kk);
                            exact += t;
                            mag += fabs(t);
                        }
                        const double got = out[i * cols + j], bound = 2.0 * len * ldexp(mag, -23);
                        if (!(fabs(got - exact) <= bound) && bad++ == 0) {
                            snprintf(first, sizeof first, " (first: %s[%d][%d] = %.9g, exact %.9g, "
                                     "bound %.3g)", name, i, j, got, exact, bound);
                        }
                    }
                }
                *said = std::to_string(bad) + " of " + std::to_string(rows * cols) + first;
                return bad;
            };
            std::string s_said, o_said;
            const int s_bad = check(
                "S", s, 64, n, d, [&](int i, int c) { return from_bf16(x.q[i * d + c]); },
                [&](int j, int c) { return from_bf16(x.k[j * d + c]); }, &s_said);
            const int o_bad = check(
                "O", o, 64, d, n, [&](int i, int j) { return from_bf16(x.p[i * n + j]); },
                [&](int c, int j) { return from_bf16(x.v[j * d + c]); }, &o_said);
            EXPECT_TRUE(s_bad == 0 && o_bad == 0)
                << "head_dim " << d << ", block_n " << n << ": outside the bound: S = Q K^T "
                << s_said << "; O = P V " << o_said;
        }
    }
}

// Where the tensor cores find each element of one operand X, the other chosen as a selector
// (a 0/1 matrix) so that every output element should hold exactly one element of X:
//   Q: K[j][c] = (c == j + off)   so S[i][j] = Q[i][j + off]
//   K: Q[i][c] = (c == i + off)   so S[i][j] = K[j][i + off]
//   V: P[i][k] = (k == i + off)   so O[i][c] = V[i + off][c]
//   P: V[k][c] = (k == c + off)   so O[i][c] = P[i][c + off]
// with off stepping until every element of X is seen. Three runs per off decode what an output
// element holds: X set to all ones (how many elements of X it sums), to each element's row + 1,
// then to its column + 1 (integers up to 128: exact in bf16 and in the sums).
struct Probe {
    enum Which { kQ, kK, kV, kP } which;
    int d, n;

    const char *name() const {
        static const char *const names[] = {"Q", "K", "V", "P"};
        return names[which];
    }
    bool in_s() const { return which == kQ || which == kK; }  // read through S, else O
    int out_cols() const { return in_s() ? n : d; }
    int x_rows() const { return which == kQ || which == kP ? 64 : n; }
    int x_cols() const { return which == kP ? n : d; }
    int step() const { return which == kQ ? n : which == kP ? d : 64; }
    int span() const { return in_s() ? d : n; }
    // the element of X that out[i][j] should hold at off
    void expected(int i, int j, int off, int *r, int *c) const {
        switch (which) {
            case kQ: *r = i, *c = j + off; return;
            case kK: *r = j, *c = i + off; return;
            case kV: *r = i + off, *c = j; return;
            case kP: *r = i, *c = j + off; return;
        }
    }
    // the operands at off: X's elements value(r, c), the selector, zeros elsewhere
    template <typename F>
    Operands operands(int off, F value) const {
        Operands x(d, n);
        std::vector<uint16_t> &xs = which == kQ ? x.q : which == kK ? x.k : which == kV ? x.v : x.p;
        for (int r = 0; r < x_rows(); r++) {
            for (int c = 0; c < x_cols(); c++) xs[r * x_cols() + c] = to_bf16(value(r, c));
        }
        const uint16_t one = to_bf16(1.0f);
        for (int i = 0; i < 128; i++) {
            if (which == kQ && i < n && i + off < d) x.k[i * d + i + off] = one;
            if (which == kK && i < 64 && i + off < d) x.q[i * d + i + off] = one;
            if (which == kV && i < 64 && i + off < n) x.p[i * n + i + off] = one;
            if (which == kP && i < d && i + off < n) x.v[(i + off) * d + i] = one;
        }
        return x;
    }
};

TEST_F(CudaWgmmaProducts, OperandPlacement) {
    for (int d : kHeadDims) {
        for (int n : {64, 96, 128}) {
            for (Probe::Which which : {Probe::kQ, Probe::kK, Probe::kV, Probe::kP}) {
                const Probe pr{which, d, n};
                int wrong = 0, places = 0, shown_corner = 0, shown_inside = 0;
                std::string corners, insides;
                for (int off = 0; off < pr.span(); off += pr.step()) {
                    std::vector<float> out[3], s, o;  // all ones, row codes, column codes
                    for (int pass = 0; pass < 3; pass++) {
                        run(pr.operands(off, [&](int r, int c) {
                                return pass == 0 ? 1.0f : (float)((pass == 1 ? r : c) + 1);
                            }), &s, &o);
                        if (HasFatalFailure()) return;
                        out[pass] = pr.in_s() ? s : o;
                    }
                    for (int i = 0; i < 64; i++) {
                        for (int j = 0; j < pr.out_cols(); j++) {
                            int r = 0, c = 0;
                            pr.expected(i, j, off, &r, &c);
                            if (r >= pr.x_rows() || c >= pr.x_cols()) continue;  // past X
                            places++;
                            const int e = i * pr.out_cols() + j;
                            const float count = out[0][e], got_r = out[1][e] - 1,
                                        got_c = out[2][e] - 1;
                            if (count == 1.0f && got_r == r && got_c == c) continue;
                            wrong++;
                            // the first few at corners of 8 x 8 output blocks (where blocks
                            // moved), then inside blocks (rows or columns permuted in one)
                            const bool corner = i % 8 == 0 && j % 8 == 0;
                            int &shown = corner ? shown_corner : shown_inside;
                            if (shown >= (corner ? 10 : 4)) continue;
                            shown++;
                            char buf[192];
                            if (count == 1.0f) {
                                snprintf(buf, sizeof buf, "\n  %s[%d][%d] should hold %s[%d][%d], "
                                         "holds %s[%g][%g]", pr.in_s() ? "S" : "O", i, j,
                                         pr.name(), r, c, pr.name(), got_r, got_c);
                            } else {
                                snprintf(buf, sizeof buf, "\n  %s[%d][%d] should hold %s[%d][%d], "
                                         "holds a sum of %g elements of %s",
                                         pr.in_s() ? "S" : "O", i, j, pr.name(), r, c, count,
                                         pr.name());
                            }
                            (corner ? corners : insides) += buf;
                        }
                    }
                }
                EXPECT_EQ(wrong, 0) << pr.name() << " at head_dim " << d << ", block_n " << n
                                    << ": " << wrong << " of " << places
                                    << " elements read from elsewhere, assuming the selector "
                                       "operand is read right:"
                                    << corners << insides;
            }
        }
    }
}

}  // namespace
