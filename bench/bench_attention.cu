// Fused attention throughput: sf_cuda_attention_bf16 at the shapes DESIGN.md §9 names, beside
// cuDNN's fused attention on the same buffers; rows marked "(wgmma n128)" and "(wgmma n64)" run
// the pipelined Hopper kernel (attention_sm90.cu) instead, with tiles of 128 keys (its default)
// or 64, and rows marked "(wgmma ws ...)" its warp-specialized kernel ("n/a" with the reason
// where they cannot run), whose "vs cuDNN rel err" column is also their first check on a GPU
// beside the tests.
//
// usage: bench_attention [--repeats R] [--warmup W]
// (then the attention backward at three training shapes: dq by atomics against the deterministic
// pass, their times and two checks; see run_backward)
//   Sysformer self-attention   32 requests x n_s = 256 queries, bidirectional, 32/32 heads, d 128
//   Sysformer cross-attention  32 requests x 256 queries against n_u = 512 / 2048 keys
//   causal prefill             1 and 8 requests x 2048 tokens, GQA 32/8, d 128
//   decode                     32 and 1 requests x 1 query against 2048 cached rows, GQA 32/8,
//                              d 128, in the tiled kernel and split over blocks (split-KV)
// Decode is a stream of the cache: its GB/s is also given as a share of a device-to-device copy
// (cudaMemcpyAsync of 256 MiB, read + write, median of 10) measured at the start of the run.
// FLOPs count the two matrix products over the visible (query, key) pairs only:
// 4 * head_dim * n_heads * pairs (a causal prefill of n tokens has n (n + 1) / 2 pairs).
// Time: CUDA events around each launch, launches back to back (bench_cuda.cuh), after warm-up,
// median of R; successive launches read different copies of q, k and v when one set is smaller
// than 3x the L2 (InputSets), so that nothing is timed from L2. Inputs are random bf16 in
// [-1, 1] filled on the device; outputs are poisoned (NaN) before the runs. Exits 0 with a
// message when there is no GPU.
//
// The peer, in the last three columns: cuDNN's fused flash attention (inference, no dropout)
// built with cuDNN's backend API in bench/cudnn_attention.cu, on the same q, k, v, timed the same
// way into its own output (of the up to 4 plans cuDNN's heuristics offer, the fastest in a short
// timing, each plan's time on stderr): "cuDNN TFLOP/s" (same FLOP count), "ours / cuDNN" (speed
// ratio, cuDNN's time over ours) and "vs cuDNN rel err" (||ours - cuDNN|| / ||cuDNN|| over the
// whole output, in double on the host). Prefill is top-left causal; decode at the end of the cache sees
// every key and runs unmasked. A shape cuDNN refuses reads "n/a", with cuDNN's message on stderr;
// a build without cuDNN (CMake found none) reads "n/a (no cuDNN)". bench/peer_attention.py times
// torch SDPA (its cuDNN and flash backends) at the same shapes as a second peer. A last table
// names the fastest kernel at each prefill and Sysformer shape among those agreeing with cuDNN.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "attention.h"
#include "bench_cuda.cuh"
#include "sysformer.h"
#ifdef SF_BENCH_HAVE_CUDNN
#include "cudnn_attention.h"
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

struct Shape {
    const char *name;
    int n_requests, n_q, n_kv;  // every request alike
    int n_heads, n_kv_heads, head_dim;
    bool causal;
    int q_pos0;  // causal decode: position of the query
    // > 0: passed as max_kv_len with the workspace it asks for (decode: the split-KV kernel,
    // attention_decode.cu); 0: the tiled kernel
    int max_kv_len = 0;
    // > 0: sf_cuda_attention_sm90_tiles_bf16 (sm90_ws: sf_cuda_attention_sm90_ws_bf16) with
    // this many keys per tile instead of sf_cuda_attention_bf16
    int sm90_block_n = 0;
    bool sm90_ws = false;
};

double visible_pairs(const Shape &s) {
    double pairs = 0;
    for (int i = 0; i < s.n_q; i++) {
        int64_t n = s.n_kv;
        if (s.causal) n = std::min<int64_t>(n, (int64_t)s.q_pos0 + i + 1);
        pairs += (double)std::max<int64_t>(n, 0);
    }
    return pairs * s.n_requests;
}

double g_copy_gbs = 0;  // the measured copy bandwidth, read + write

// Copies of one shape's q, k and v, used in turn (call i reads set i % n): enough that the
// sets together span three times the L2, so that a set is evicted before it is read again
// and a small shape (one request's decode: 8 MB of cache) is timed from HBM, not L2, on both
// sides. One set for shapes already that large.
struct InputSets {
    std::vector<uint16_t *> q, k, v;
    int n() const { return (int)q.size(); }
    sf_attention_args at(const sf_attention_args &a, int i) const {
        sf_attention_args r = a;
        r.q = q[(size_t)(i % n())];
        r.k = k[(size_t)(i % n())];
        r.v = v[(size_t)(i % n())];
        return r;
    }
};

// ---------------------------------------------------------------------------------------------
// The cuDNN peer
// ---------------------------------------------------------------------------------------------

// What the peer gave for one shape.
struct PeerResult {
    bool built = false;  // the bench has the cuDNN peer
    bool ok = false;     // it ran: ms holds its median
    double ms = 0;
};

#ifdef SF_BENCH_HAVE_CUDNN
// Plans by cuDNN shape: the two decode kernels of ours share one. Freed by release_peer_plans.
struct PeerPlan {
    cudnn_sdpa_shape shape;
    cudnn_sdpa_plan *plan;
};
std::vector<PeerPlan> g_peer_plans;

bool same_shape(const cudnn_sdpa_shape &x, const cudnn_sdpa_shape &y) {
    return x.batch == y.batch && x.n_heads == y.n_heads && x.n_kv_heads == y.n_kv_heads &&
           x.s_q == y.s_q && x.s_kv == y.s_kv && x.head_dim == y.head_dim &&
           x.causal == y.causal && x.scale == y.scale;
}

// How cuDNN is asked for s: bidirectional; top-left causal when query i sees keys 0..i
// (prefill); unmasked when a causal shape's first query already sees every key (decode at the
// end of the cache). Other causal offsets are not expressed.
bool peer_shape(const Shape &s, float scale, cudnn_sdpa_shape *c, char *err, size_t err_len) {
    c->batch = s.n_requests;
    c->n_heads = s.n_heads;
    c->n_kv_heads = s.n_kv_heads;
    c->s_q = s.n_q;
    c->s_kv = s.n_kv;
    c->head_dim = s.head_dim;
    c->scale = scale;
    c->causal = false;
    if (!s.causal || (int64_t)s.q_pos0 + 1 >= s.n_kv) return true;
    if (s.q_pos0 == 0 && s.n_q == s.n_kv) {
        c->causal = true;
        return true;
    }
    snprintf(err, err_len, "causal with queries from position %d over %d keys: not expressed",
             s.q_pos0, s.n_kv);
    return false;
}
#endif

// cuDNN's attention over a's q, k, v into peer_out, timed as ours is: CUDA events around each
// call on the default stream, warmup + repeats calls, median of the repeats. Failures are
// reported on stderr and leave ok false.
PeerResult cudnn_peer(const Shape &s, const sf_attention_args &a, const InputSets &sets,
                      uint16_t *peer_out, int warmup, int repeats) {
    PeerResult r;
#ifdef SF_BENCH_HAVE_CUDNN
    r.built = true;
    char err[2048] = "";
    cudnn_sdpa_shape cs;
    if (!peer_shape(s, a.scale, &cs, err, sizeof err)) {
        fprintf(stderr, "bench_attention: %s: cuDNN peer: %s\n", s.name, err);
        return r;
    }
    cudnn_sdpa_plan *plan = nullptr;
    for (const PeerPlan &pp : g_peer_plans)
        if (same_shape(pp.shape, cs)) plan = pp.plan;
    if (!plan) {
        if (!cudnn_sdpa_create(&cs, &plan, err, sizeof err)) {
            fprintf(stderr, "bench_attention: %s: cuDNN peer: %s\n", s.name, err);
            return r;
        }
        g_peer_plans.push_back({cs, plan});
    }
    void *workspace = nullptr;
    const int64_t workspace_bytes = cudnn_sdpa_workspace_bytes(plan);
    if (workspace_bytes > 0) {
        const cudaError_t ce = cudaMalloc(&workspace, (size_t)workspace_bytes);
        if (ce != cudaSuccess) {
            cudaGetLastError();  // not sticky: clear it for the shapes after this one
            fprintf(stderr, "bench_attention: %s: cuDNN peer: workspace of %lld bytes: %s\n",
                    s.name, (long long)workspace_bytes, cudaGetErrorString(ce));
            return r;
        }
    }
    // the first call doubles as the check that cuDNN runs this plan at all
    bool ok = cudnn_sdpa_run(plan, peer_out, a.q, a.k, a.v, workspace, 0, err, sizeof err);
    const int n_plans = cudnn_sdpa_candidates(plan);
    if (ok && n_plans > 1) {
        // cuDNN at its best: each candidate that runs, timed briefly (median of 5 after 1);
        // the fastest is the peer
        int best = 0;
        double best_ms = INFINITY;
        char times[256] = "";
        for (int i = 0; i < n_plans; i++) {
            bool run_ok = cudnn_sdpa_select(plan, i) &&
                          cudnn_sdpa_run(plan, peer_out, a.q, a.k, a.v, workspace, 0, err,
                                         sizeof err);
            double t = NAN;
            if (run_ok) {
                t = bench_median_ms(1, 5, 0, [&](int j) {
                    const sf_attention_args x = sets.at(a, j);
                    if (run_ok) run_ok = cudnn_sdpa_run(plan, peer_out, x.q, x.k, x.v,
                                                        workspace, 0, err, sizeof err);
                });
            }
            BENCH_CUDA(cudaDeviceSynchronize());
            if (!run_ok) t = NAN;
            const size_t used = strlen(times);
            snprintf(times + used, sizeof times - used, "%s#%d %.4f", i ? ", " : "", i, t);
            if (run_ok && t < best_ms) {
                best = i;
                best_ms = t;
            }
        }
        cudnn_sdpa_select(plan, best);
        fprintf(stderr, "bench_attention: %s: cuDNN's %d plans (ms: %s): #%d is the peer\n",
                s.name, n_plans, times, best);
        // (the chosen one ran above, so the full timing below starts from a plan that runs)
        ok = cudnn_sdpa_run(plan, peer_out, a.q, a.k, a.v, workspace, 0, err, sizeof err);
    }
    double ms = 0;
    if (ok) {
        ms = bench_median_ms(warmup, repeats, 0, [&](int i) {
            const sf_attention_args x = sets.at(a, i);
            if (ok) ok = cudnn_sdpa_run(plan, peer_out, x.q, x.k, x.v, workspace, 0, err,
                                        sizeof err);
        });
        // the output compared below: from set 0, whose values every set holds
        if (ok) ok = cudnn_sdpa_run(plan, peer_out, a.q, a.k, a.v, workspace, 0, err, sizeof err);
    }
    BENCH_CUDA(cudaDeviceSynchronize());
    cudaFree(workspace);
    if (ok) {
        r.ok = true;
        r.ms = ms;
    } else {
        fprintf(stderr, "bench_attention: %s: cuDNN peer: %s\n", s.name, err);
    }
#else
    (void)s;
    (void)a;
    (void)sets;
    (void)peer_out;
    (void)warmup;
    (void)repeats;
#endif
    return r;
}

void release_peer_plans() {
#ifdef SF_BENCH_HAVE_CUDNN
    for (const PeerPlan &pp : g_peer_plans) cudnn_sdpa_destroy(pp.plan);
    g_peer_plans.clear();
#endif
}

// ||x - ref|| / ||ref|| over two bf16 vectors of one size, in double; NaN when either holds one.
double rel_l2_error(const std::vector<uint16_t> &x, const std::vector<uint16_t> &ref) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < x.size(); i++) {
        const uint32_t ux = (uint32_t)x[i] << 16, ur = (uint32_t)ref[i] << 16;
        float fx, fr;
        memcpy(&fx, &ux, 4);
        memcpy(&fr, &ur, 4);
        const double d = (double)fx - (double)fr;
        diff += d * d;
        norm += (double)fr * fr;
    }
    return sqrt(diff) / sqrt(norm);
}

// Whether sf_cuda_attention_sm90_bf16 runs here (the build has sm_90a code, the device is 9.0);
// if not, why, in sf_last_error().
bool sm90_runs() {
    sf_attention_args a = {};  // nothing to do: only the device check can fail
    a.n_heads = a.n_kv_heads = 1;
    a.head_dim = 64;
    a.q_stride = a.kv_stride = a.out_stride = 64;
    a.scale = 0.125f;
    return sf_cuda_attention_sm90_bf16(&a, 0) == SF_OK;
}

// The arguments both the forward rows and the backward rows pass for s, every request alike:
// counts, heads, packed strides, mask, scale, and the request offsets, uploaded to *cu_q and
// *cu_kv (device, the caller frees them) and, for a causal shape, q_pos0 to *pos0 (NULL
// otherwise). The tensors and options are the caller's.
sf_attention_args packed_args(const Shape &s, int32_t **cu_q, int32_t **cu_kv, int32_t **pos0) {
    std::vector<int32_t> hcu_q(s.n_requests + 1), hcu_kv(s.n_requests + 1);
    for (int r = 0; r <= s.n_requests; r++) {
        hcu_q[r] = r * s.n_q;
        hcu_kv[r] = r * s.n_kv;
    }
    const std::vector<int32_t> hpos((size_t)s.n_requests, s.q_pos0);
    BENCH_CUDA(cudaMalloc(cu_q, hcu_q.size() * 4));
    BENCH_CUDA(cudaMalloc(cu_kv, hcu_kv.size() * 4));
    BENCH_CUDA(cudaMemcpy(*cu_q, hcu_q.data(), hcu_q.size() * 4, cudaMemcpyHostToDevice));
    BENCH_CUDA(cudaMemcpy(*cu_kv, hcu_kv.data(), hcu_kv.size() * 4, cudaMemcpyHostToDevice));
    *pos0 = nullptr;
    if (s.causal) {
        BENCH_CUDA(cudaMalloc(pos0, hpos.size() * 4));
        BENCH_CUDA(cudaMemcpy(*pos0, hpos.data(), hpos.size() * 4, cudaMemcpyHostToDevice));
    }
    sf_attention_args a = {};
    a.cu_q = *cu_q;
    a.cu_kv = *cu_kv;
    a.q_pos0 = *pos0;
    a.n_requests = s.n_requests;
    a.max_q_len = s.n_q;
    a.n_heads = s.n_heads;
    a.n_kv_heads = s.n_kv_heads;
    a.head_dim = s.head_dim;
    a.q_stride = a.out_stride = (int64_t)s.n_heads * s.head_dim;
    a.kv_stride = (int64_t)s.n_kv_heads * s.head_dim;
    a.causal = s.causal;
    a.window = 0;
    a.scale = 1.0f / sqrtf((float)s.head_dim);
    return a;
}

// One row's outcome, for the summary.
struct Result {
    bool ran = false;
    bool checked = false;  // cuDNN ran at this shape: err is ours against it (NaN: ours has NaN)
    double ms = 0.0, peer_ms = 0.0, err = NAN;
};

Result run_shape(const Shape &s, int warmup, int repeats) {
    Result res;
    if (s.sm90_block_n > 0 && !sm90_runs()) {
        printf("%-32s n/a: %s\n", s.name, sf_last_error());
        return res;
    }
    const int64_t q_rows = (int64_t)s.n_requests * s.n_q, kv_rows = (int64_t)s.n_requests * s.n_kv;
    const int64_t q_row = (int64_t)s.n_heads * s.head_dim;
    const int64_t kv_row = (int64_t)s.n_kv_heads * s.head_dim;
    uint16_t *q, *k, *v, *out, *peer_out;
    int32_t *cu_q, *cu_kv, *pos0;
    BENCH_CUDA(cudaMalloc(&q, q_rows * q_row * 2));
    BENCH_CUDA(cudaMalloc(&out, q_rows * q_row * 2));
    BENCH_CUDA(cudaMalloc(&peer_out, q_rows * q_row * 2));
    // Poisoned: a row either side leaves unwritten shows as NaN in the comparison.
    BENCH_CUDA(cudaMemset(out, 0xff, q_rows * q_row * 2));
    BENCH_CUDA(cudaMemset(peer_out, 0xff, q_rows * q_row * 2));
    BENCH_CUDA(cudaMalloc(&k, kv_rows * kv_row * 2));
    BENCH_CUDA(cudaMalloc(&v, kv_rows * kv_row * 2));
    bench_fill_bf16(q, q_rows * q_row, 1u, -1.0f, 1.0f);
    bench_fill_bf16(k, kv_rows * kv_row, 2u, -1.0f, 1.0f);
    bench_fill_bf16(v, kv_rows * kv_row, 3u, -1.0f, 1.0f);
    InputSets sets;
    {
        int dev = 0, l2 = 0;
        BENCH_CUDA(cudaGetDevice(&dev));
        BENCH_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
        const int64_t set_bytes = 2 * (q_rows * q_row + 2 * kv_rows * kv_row);
        const int64_t n_sets = std::min<int64_t>(32, std::max<int64_t>(
                                                         1, (3 * (int64_t)l2 + set_bytes - 1) /
                                                                set_bytes));
        sets.q.push_back(q);
        sets.k.push_back(k);
        sets.v.push_back(v);
        for (int64_t c = 1; c < n_sets; c++) {
            uint16_t *cq, *ck, *cv;
            BENCH_CUDA(cudaMalloc(&cq, q_rows * q_row * 2));
            BENCH_CUDA(cudaMalloc(&ck, kv_rows * kv_row * 2));
            BENCH_CUDA(cudaMalloc(&cv, kv_rows * kv_row * 2));
            BENCH_CUDA(cudaMemcpy(cq, q, q_rows * q_row * 2, cudaMemcpyDeviceToDevice));
            BENCH_CUDA(cudaMemcpy(ck, k, kv_rows * kv_row * 2, cudaMemcpyDeviceToDevice));
            BENCH_CUDA(cudaMemcpy(cv, v, kv_rows * kv_row * 2, cudaMemcpyDeviceToDevice));
            sets.q.push_back(cq);
            sets.k.push_back(ck);
            sets.v.push_back(cv);
        }
    }
    sf_attention_args a = packed_args(s, &cu_q, &cu_kv, &pos0);
    a.out = out;
    a.q = q;
    a.k = k;
    a.v = v;
    a.max_kv_len = s.max_kv_len;
    a.workspace_bytes = sf_cuda_attention_workspace_bytes(&a);
    if (a.workspace_bytes > 0) BENCH_CUDA(cudaMalloc(&a.workspace, a.workspace_bytes));

    auto attention = [&s](const sf_attention_args *args, cudaStream_t stream) {
        if (s.sm90_block_n == 0) return sf_cuda_attention_bf16(args, stream);
        return s.sm90_ws ? sf_cuda_attention_sm90_ws_bf16(args, s.sm90_block_n, stream)
                         : sf_cuda_attention_sm90_tiles_bf16(args, s.sm90_block_n, stream);
    };
    const double med = bench_median_ms(warmup, repeats, 0, [&](int i) {
        const sf_attention_args x = sets.at(a, i);
        if (attention(&x, 0) != SF_OK) {
            fprintf(stderr, "bench_attention: %s: %s\n", s.name, sf_last_error());
            exit(1);
        }
    });
    // the output compared with cuDNN's: from set 0, whose values every set holds
    if (attention(&a, 0) != SF_OK) {
        fprintf(stderr, "bench_attention: %s: %s\n", s.name, sf_last_error());
        exit(1);
    }
    const double flops = 4.0 * s.head_dim * s.n_heads * visible_pairs(s);
    // bytes each launch must move at least once: q, k, v in, out back
    const double bytes = 2.0 * (2.0 * q_rows * q_row + 2.0 * kv_rows * kv_row);
    const double gbs = bytes / (med * 1e6);
    char copy_col[16] = "";
    if (s.n_q == 1 && g_copy_gbs > 0)  // decode: bound by streaming the cache
        snprintf(copy_col, sizeof copy_col, "%.1f%%", 100.0 * gbs / g_copy_gbs);

    const PeerResult peer = cudnn_peer(s, a, sets, peer_out, warmup, repeats);
    char peer_col[32] = "n/a (no cuDNN)", ratio_col[16] = "n/a", err_col[16] = "n/a";
    if (peer.built) snprintf(peer_col, sizeof peer_col, "n/a");
    if (peer.ok) {
        snprintf(peer_col, sizeof peer_col, "%.1f", flops / (peer.ms * 1e9));
        snprintf(ratio_col, sizeof ratio_col, "%.2f", peer.ms / med);
        std::vector<uint16_t> ours((size_t)(q_rows * q_row)), theirs(ours.size());
        BENCH_CUDA(cudaMemcpy(ours.data(), out, ours.size() * 2, cudaMemcpyDeviceToHost));
        BENCH_CUDA(cudaMemcpy(theirs.data(), peer_out, theirs.size() * 2,
                              cudaMemcpyDeviceToHost));
        res.checked = true;
        res.err = rel_l2_error(ours, theirs);
        res.peer_ms = peer.ms;
        snprintf(err_col, sizeof err_col, "%.1e", res.err);
    }
    res.ran = true;
    res.ms = med;
    printf("%-32s %4d x %4d q x %5d kv  %2d/%-2d  %3d  %s  %9.4f  %8.1f  %8.0f  %7s  %14s  %12s  "
           "%s\n",
           s.name, s.n_requests, s.n_q, s.n_kv, s.n_heads, s.n_kv_heads, s.head_dim,
           s.causal ? "causal" : "bidir ", med, flops / (med * 1e9), gbs, copy_col, peer_col,
           ratio_col, err_col);
    fflush(stdout);

    for (int c = 0; c < sets.n(); c++) {  // set 0 is q, k, v
        cudaFree(sets.q[(size_t)c]);
        cudaFree(sets.k[(size_t)c]);
        cudaFree(sets.v[(size_t)c]);
    }
    cudaFree(out);
    cudaFree(peer_out);
    cudaFree(cu_q);
    cudaFree(cu_kv);
    cudaFree(pos0);
    cudaFree(a.workspace);
    return res;
}

bool same_geometry(const Shape &a, const Shape &b) {
    return a.n_requests == b.n_requests && a.n_q == b.n_q && a.n_kv == b.n_kv &&
           a.n_heads == b.n_heads && a.n_kv_heads == b.n_kv_heads &&
           a.head_dim == b.head_dim && a.causal == b.causal && a.q_pos0 == b.q_pos0 &&
           a.max_kv_len == b.max_kv_len;
}

// The fastest kernel at each geometry among the rows that agree with cuDNN (relative error
// under kAgree; a row cuDNN gave no result for is taken unchecked, and says so): what
// SF_ATTENTION_AUTO and the tile width should pick on this GPU. kAgree: two correct bf16 attentions differ by a few bf16
// roundings of their output (2^-9 relative each, ~2e-3); ten times more flags a kernel that
// is wrong, not one that rounds differently.
constexpr double kAgree = 2e-2;

void print_best(const Shape *shapes, const Result *results, int n) {
    printf("\nfastest kernel per shape (rows within %.0e of cuDNN; unchecked where cuDNN gave "
           "none):\n",
           kAgree);
    std::vector<bool> done((size_t)n, false);
    for (int i = 0; i < n; i++) {
        if (done[i] || shapes[i].n_q == 1) continue;  // decode: one kernel per row above
        int best = -1, plain = -1;
        for (int j = i; j < n; j++) {
            if (!same_geometry(shapes[i], shapes[j])) continue;
            done[j] = true;
            const Result &r = results[j];
            if (shapes[j].sm90_block_n == 0) plain = j;
            const bool agrees = r.ran && (!r.checked || r.err < kAgree);
            if (agrees && (best < 0 || r.ms < results[best].ms)) best = j;
        }
        const Shape &s = shapes[i];
        printf("  %4d x %4d q x %5d kv  %2d/%-2d  d %3d  %s: ", s.n_requests, s.n_q, s.n_kv,
               s.n_heads, s.n_kv_heads, s.head_dim, s.causal ? "causal" : "bidir ");
        if (best < 0) {
            printf("none agrees with cuDNN\n");
            continue;
        }
        printf("%s, %.4f ms", shapes[best].name, results[best].ms);
        if (results[best].checked) {
            printf(" (%.2fx cuDNN)", results[best].peer_ms / results[best].ms);
        } else {
            printf(" (not checked: no cuDNN result)");
        }
        if (plain >= 0 && plain != best && results[plain].ran) {
            printf("; mma.sync %.4f ms", results[plain].ms);
        }
        printf("\n");
    }
}

// ---------------------------------------------------------------------------------------------
// The backward (training): atomic dq against the deterministic pass
// ---------------------------------------------------------------------------------------------

// ||x - ref|| / ||ref|| over two fp32 vectors, in double.
double rel_l2_error_f32(const std::vector<float> &x, const std::vector<float> &ref) {
    double diff = 0, norm = 0;
    for (size_t i = 0; i < x.size(); i++) {
        const double d = (double)x[i] - (double)ref[i];
        diff += d * d;
        norm += (double)ref[i] * ref[i];
    }
    return sqrt(diff) / sqrt(norm);
}

// sf_cuda_attention_backward_bf16 at shape s, dq by atomics (the default) and by the
// deterministic pass: the median time of each, model TFLOP/s (the backward's 5 matrix products
// over the visible pairs: 10 head_dim n_heads pairs, the same count for both, so the ratio is
// the time's), and two checks: dk and dv the same bits either way, dq within rounding.
void run_backward(const Shape &s, int warmup, int repeats) {
    const int64_t q_rows = (int64_t)s.n_requests * s.n_q, kv_rows = (int64_t)s.n_requests * s.n_kv;
    const int64_t q_row = (int64_t)s.n_heads * s.head_dim;
    const int64_t kv_row = (int64_t)s.n_kv_heads * s.head_dim;
    uint16_t *q, *k, *v, *out, *dout;
    float *lse, *delta, *dq, *dk, *dv;
    int32_t *cu_q, *cu_kv, *pos0;
    BENCH_CUDA(cudaMalloc(&q, q_rows * q_row * 2));
    BENCH_CUDA(cudaMalloc(&out, q_rows * q_row * 2));
    BENCH_CUDA(cudaMalloc(&dout, q_rows * q_row * 2));
    BENCH_CUDA(cudaMalloc(&k, kv_rows * kv_row * 2));
    BENCH_CUDA(cudaMalloc(&v, kv_rows * kv_row * 2));
    BENCH_CUDA(cudaMalloc(&lse, q_rows * s.n_heads * sizeof(float)));
    BENCH_CUDA(cudaMalloc(&delta, q_rows * s.n_heads * sizeof(float)));
    BENCH_CUDA(cudaMalloc(&dq, q_rows * q_row * sizeof(float)));
    BENCH_CUDA(cudaMalloc(&dk, kv_rows * kv_row * sizeof(float)));
    BENCH_CUDA(cudaMalloc(&dv, kv_rows * kv_row * sizeof(float)));
    bench_fill_bf16(q, q_rows * q_row, 11u, -1.0f, 1.0f);
    bench_fill_bf16(k, kv_rows * kv_row, 12u, -1.0f, 1.0f);
    bench_fill_bf16(v, kv_rows * kv_row, 13u, -1.0f, 1.0f);
    bench_fill_bf16(dout, q_rows * q_row, 14u, -1.0f, 1.0f);
    sf_attention_args a = packed_args(s, &cu_q, &cu_kv, &pos0);
    a.out = out;
    a.lse = lse;
    a.q = q;
    a.k = k;
    a.v = v;
    BENCH_SF(sf_cuda_attention_bf16(&a, 0));
    sf_attention_grads g = {};
    g.dout = dout;
    g.dq = dq;
    g.dk = dk;
    g.dv = dv;
    g.delta = delta;
    g.dout_stride = q_row;
    g.dq_stride = q_row;
    g.dkv_stride = kv_row;
    g.max_kv_len = s.n_kv;

    double ms[2];
    std::vector<float> got[2][3];
    for (int det = 0; det < 2; det++) {
        g.deterministic = det == 1;
        ms[det] = bench_median_ms(warmup, repeats, 0, [&](int) {
            if (sf_cuda_attention_backward_bf16(&a, &g, 0) != SF_OK) {
                fprintf(stderr, "bench_attention: %s backward: %s\n", s.name, sf_last_error());
                exit(1);
            }
        });
        BENCH_CUDA(cudaDeviceSynchronize());
        float *bufs[3] = {dq, dk, dv};
        const int64_t sizes[3] = {q_rows * q_row, kv_rows * kv_row, kv_rows * kv_row};
        for (int b = 0; b < 3; b++) {
            got[det][b].resize((size_t)sizes[b]);
            BENCH_CUDA(cudaMemcpy(got[det][b].data(), bufs[b], sizes[b] * sizeof(float),
                                  cudaMemcpyDeviceToHost));
        }
    }
    const double flops = 10.0 * s.head_dim * s.n_heads * visible_pairs(s);
    const bool same_kv = got[0][1] == got[1][1] && got[0][2] == got[1][2];
    printf("%-26s %4d x %4d q x %5d kv  %2d/%-2d  %3d  %s  %9.4f  %8.1f  %9.4f  %8.1f  %6.2f  "
           "%9.1e  %s\n",
           s.name, s.n_requests, s.n_q, s.n_kv, s.n_heads, s.n_kv_heads, s.head_dim,
           s.causal ? "causal" : "bidir ", ms[0], flops / (ms[0] * 1e9), ms[1],
           flops / (ms[1] * 1e9), ms[1] / ms[0], rel_l2_error_f32(got[1][0], got[0][0]),
           same_kv ? "yes" : "NO");
    fflush(stdout);
    cudaFree(q);
    cudaFree(k);
    cudaFree(v);
    cudaFree(out);
    cudaFree(dout);
    cudaFree(lse);
    cudaFree(delta);
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(cu_q);
    cudaFree(cu_kv);
    cudaFree(pos0);
}

}  // namespace

int main(int argc, char **argv) {
    int repeats = 20, warmup = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--repeats")) repeats = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench_attention: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (repeats < 1 || warmup < 0) {
        fprintf(stderr, "bench_attention: bad --repeats / --warmup\n");
        return 2;
    }
    int count = 0;
    if (sf_cuda_device_count(&count) != SF_OK || count == 0) {
        printf("bench_attention: no CUDA device; nothing to measure\n");
        return 0;
    }
    cudaDeviceProp prop;
    BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("bench_attention: %s (sm_%d%d, %d SMs), median of %d after %d warm-up\n", prop.name,
           prop.major, prop.minor, prop.multiProcessorCount, repeats, warmup);
    {  // the copy reference for the GB/s-bound rows
        const size_t bytes = (size_t)256 << 20;
        void *a = nullptr, *b = nullptr;
        BENCH_CUDA(cudaMalloc(&a, bytes));
        BENCH_CUDA(cudaMalloc(&b, bytes));
        BENCH_CUDA(cudaMemset(a, 0, bytes));
        const double ms = bench_median_ms(2, 10, 0, [&](int) {
            BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
        });
        g_copy_gbs = 2.0 * (double)bytes / (ms * 1e6);
        printf("copy reference: cudaMemcpyAsync D2D 256 MiB: %.1f GB/s (read + write)\n",
               g_copy_gbs);
        cudaFree(a);
        cudaFree(b);
    }
#ifdef SF_BENCH_HAVE_CUDNN
    char cudnn_version[96];
    cudnn_sdpa_version_string(cudnn_version, sizeof cudnn_version);
    printf("cuDNN peer: fused flash attention through the backend API, %s\n", cudnn_version);
#else
    printf("cuDNN peer: not built (CMake found no cuDNN); see bench/peer_attention.py\n");
#endif
    printf("%-32s %-27s %-5s  %-3s  %-6s  %9s  %8s  %8s  %7s  %14s  %12s  %s\n", "case", "shape",
           "heads", "d", "mask", "ms", "TFLOP/s", "GB/s", "of copy", "cuDNN TFLOP/s",
           "ours / cuDNN", "vs cuDNN rel err");

    const Shape shapes[] = {
        {"sysformer SA", 32, 256, 256, 32, 32, 128, false, 0},
        {"sysformer CA", 32, 256, 512, 32, 32, 128, false, 0},
        {"sysformer CA", 32, 256, 2048, 32, 32, 128, false, 0},
        {"causal prefill", 1, 2048, 2048, 32, 8, 128, true, 0},
        {"causal prefill", 8, 2048, 2048, 32, 8, 128, true, 0},
        {"decode tiled", 32, 1, 2048, 32, 8, 128, true, 2047},
        {"decode split-KV", 32, 1, 2048, 32, 8, 128, true, 2047, 2048},
        {"decode tiled", 1, 1, 2048, 32, 8, 128, true, 2047},
        {"decode split-KV", 1, 1, 2048, 32, 8, 128, true, 2047, 2048},
        {"sysformer SA (wgmma n128)", 32, 256, 256, 32, 32, 128, false, 0, 0, 128},
        {"sysformer CA (wgmma n128)", 32, 256, 512, 32, 32, 128, false, 0, 0, 128},
        {"sysformer CA (wgmma n128)", 32, 256, 2048, 32, 32, 128, false, 0, 0, 128},
        {"prefill (wgmma n128)", 1, 2048, 2048, 32, 8, 128, true, 0, 0, 128},
        {"prefill (wgmma n128)", 8, 2048, 2048, 32, 8, 128, true, 0, 0, 128},
        {"sysformer SA (wgmma n64)", 32, 256, 256, 32, 32, 128, false, 0, 0, 64},
        {"sysformer CA (wgmma n64)", 32, 256, 512, 32, 32, 128, false, 0, 0, 64},
        {"sysformer CA (wgmma n64)", 32, 256, 2048, 32, 32, 128, false, 0, 0, 64},
        {"prefill (wgmma n64)", 1, 2048, 2048, 32, 8, 128, true, 0, 0, 64},
        {"prefill (wgmma n64)", 8, 2048, 2048, 32, 8, 128, true, 0, 0, 64},
        {"sysformer SA (wgmma ws n128)", 32, 256, 256, 32, 32, 128, false, 0, 0, 128, true},
        {"sysformer CA (wgmma ws n128)", 32, 256, 512, 32, 32, 128, false, 0, 0, 128, true},
        {"sysformer CA (wgmma ws n128)", 32, 256, 2048, 32, 32, 128, false, 0, 0, 128, true},
        {"prefill (wgmma ws n128)", 1, 2048, 2048, 32, 8, 128, true, 0, 0, 128, true},
        {"prefill (wgmma ws n128)", 8, 2048, 2048, 32, 8, 128, true, 0, 0, 128, true},
        // 96-key tiles: at head dim 128 the widest where the ws kernel's P V runs on into the
        // next round (kOverlapPv)
        {"sysformer SA (wgmma ws n96)", 32, 256, 256, 32, 32, 128, false, 0, 0, 96, true},
        {"sysformer CA (wgmma ws n96)", 32, 256, 512, 32, 32, 128, false, 0, 0, 96, true},
        {"sysformer CA (wgmma ws n96)", 32, 256, 2048, 32, 32, 128, false, 0, 0, 96, true},
        {"prefill (wgmma ws n96)", 1, 2048, 2048, 32, 8, 128, true, 0, 0, 96, true},
        {"prefill (wgmma ws n96)", 8, 2048, 2048, 32, 8, 128, true, 0, 0, 96, true},
        {"sysformer SA (wgmma ws n64)", 32, 256, 256, 32, 32, 128, false, 0, 0, 64, true},
        {"sysformer CA (wgmma ws n64)", 32, 256, 512, 32, 32, 128, false, 0, 0, 64, true},
        {"sysformer CA (wgmma ws n64)", 32, 256, 2048, 32, 32, 128, false, 0, 0, 64, true},
        {"prefill (wgmma ws n64)", 1, 2048, 2048, 32, 8, 128, true, 0, 0, 64, true},
        {"prefill (wgmma ws n64)", 8, 2048, 2048, 32, 8, 128, true, 0, 0, 64, true},
        // head dim 64 (a SmolLM2 Sysformer: d 576, 9 heads), where the ws kernel's P V runs on
        // into the next round (kOverlapPv in attention_sm90.cu) at every tile width; at head
        // dim 128 (the rows above) only with 64- and 96-key tiles
        {"sysformer CA d64", 32, 256, 2048, 9, 9, 64, false, 0},
        {"sysformer CA d64 (wgmma n128)", 32, 256, 2048, 9, 9, 64, false, 0, 0, 128},
        {"sysformer CA d64 (wgmma ws n128)", 32, 256, 2048, 9, 9, 64, false, 0, 0, 128, true},
        {"sysformer CA d64 (wgmma ws n64)", 32, 256, 2048, 9, 9, 64, false, 0, 0, 64, true},
        // head dim 96 (a Phi-3.5-mini Sysformer: d 3072, 32 heads), where the overlap needs the
        // 64-key tiles: ws n64 against ws n128 is what it is worth at this head dim
        {"sysformer CA d96", 32, 256, 2048, 32, 32, 96, false, 0},
        {"sysformer CA d96 (wgmma n128)", 32, 256, 2048, 32, 32, 96, false, 0, 0, 128},
        {"sysformer CA d96 (wgmma ws n128)", 32, 256, 2048, 32, 32, 96, false, 0, 0, 128, true},
        {"sysformer CA d96 (wgmma ws n64)", 32, 256, 2048, 32, 32, 96, false, 0, 0, 64, true},
    };
    constexpr int kShapes = (int)(sizeof shapes / sizeof shapes[0]);
    Result results[kShapes];
    for (int i = 0; i < kShapes; i++) results[i] = run_shape(shapes[i], warmup, repeats);
    print_best(shapes, results, kShapes);
    release_peer_plans();

    // The training shapes of the backward: a SmolLM2-135M layer at bench_train's step (7 x 144
    // tokens), a Llama-3.1-8B-shaped layer at long context, and the Sysformer's CA.
    printf("\nattention backward (sf_cuda_attention_backward_bf16): dq by atomics against the "
           "deterministic pass\n");
    printf("%-26s %-27s %-5s  %-3s  %-6s  %9s  %8s  %9s  %8s  %6s  %9s  %s\n", "case", "shape",
           "heads", "d", "mask", "atomic ms", "TFLOP/s", "determ ms", "TFLOP/s", "ratio",
           "dq rel", "dk, dv same bits");
    const Shape backward_shapes[] = {
        {"smollm2 layer (train)", 7, 144, 144, 9, 3, 64, true, 0},
        {"llama-8b layer, 2K", 4, 2048, 2048, 32, 8, 128, true, 0},
        {"sysformer CA d128", 32, 256, 2048, 32, 32, 128, false, 0},
    };
    for (const Shape &s : backward_shapes) run_backward(s, warmup, repeats);
    return 0;
}
