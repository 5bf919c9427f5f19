// Backward of the fused attention (attention.cu) on bf16 inputs with fp32 gradients, after the
// structure of FlashAttention-2's backward. CPU twin: sf_cpu_attention_backward in
// host/cpu/attention.c.
//
// With s_j = scale q . k_j, P_j = exp(s_j - lse) (lse saved by the forward), dP_j = dout . v_j
// and D = sum_j P_j dP_j = dout . out, per (query, head):
//   dS_j = P_j (dP_j - D),   dq = scale sum_j dS_j k_j,   dk_j += scale dS_j q,   dv_j += P_j dout.
//
// Two kernels (a third when deterministic, below):
//   1. preprocess, one half-warp per (query, head): D = rowsum(dout * out) in fp32 into the
//      caller's scratch, and the query's dq zeroed (kernel 2 adds into it).
//   2. main, one CTA per (key block of 64 keys, kv head, request); warp w owns keys
//      16w .. 16w + 15 of the block and keeps their dK and dV in fp32 registers for the whole
//      CTA. The block's K and V rows sit in shared memory; the CTA walks over the tiles of M
//      "packed rows" that can see the block (a packed row is a (query, head of the kv head's GQA
//      group) pair, query-major, as in the forward: so the group's heads all add into the same
//      dK, dV registers, with no atomics), Q and dout tiles double-buffered with cp.async. Per
//      tile, each warp, on tensor cores (mma.m16n8k16 bf16, fp32 accumulators):
//        S^T  = K_w Q^T            A: K from shared memory, B: Q (ldmatrix)
//        P^T  = exp2(S^T scale log2 e - lse log2 e), masked, rounded to bf16 for the products
//        dV  += P^T dO             A: P^T straight from the accumulators, B: dO (ldmatrix.trans)
//        dP^T = V_w dO^T           A: V from shared memory, B: dO (ldmatrix)
//        dS^T = P^T (dP^T - D)     fp32, then rounded to bf16, also stored to shared memory
//        dK  += dS^T Q             A: dS^T from the accumulators, B: Q (ldmatrix.trans)
//      then the CTA computes dQ_tile = dS K (A: dS by ldmatrix.trans of the stored dS^T, B: K by
//      ldmatrix.trans) and adds it to the fp32 dq with atomics.
//
// Why atomics for dq: every key block contributes to every query row that sees it, so dq needs
// a reduction across CTAs. fp32 atomic adds into L2 (vectorised float2 on sm_90) are cheap; the
// price is that dq's last bits depend on the order the CTAs finish in. dk and dv are summed by
// one CTA each in a fixed order and are bit-reproducible. With sf_attention_grads.deterministic
// the main kernel skips its dQ stage and
//   3. dq, one CTA per (tile of 64 packed rows, kv head, request), walks over the key blocks in
//      order, recomputing S, P and dP, and stores each dq element once: bit-reproducible, for 7
//      matrix products instead of 5.
//
// Tile shapes (the dispatch at the bottom): M = 64 packed rows for head dims 64, 80, 96, 16 for
// 128, whose 2 x 128 fp32 dK/dV accumulators per thread leave too little room (M = 32 spilled);
// all stay under 255 registers without spills.
//
// Rounding: P and dS are rounded to bf16 before the products that use them (as the forward
// does with P); S, dP, D, and every accumulation are fp32. The tolerance derived from this is in
// tests/test_cuda_attention_backward.cpp.
#include <math.h>
#include <stdint.h>

#include "attention.h"
#include "attention_mma.cuh"
#include "cuda_check.cuh"

namespace {

using namespace sf_attn;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockN = kWarps * 16;  // keys per CTA: 16 per warp

constexpr int kPrepPairs = 16;  // (query, head) pairs per preprocess block: a half-warp each
constexpr int kPrepThreads = kPrepPairs * 16;

// D: head dim; M: packed rows per tile.
template <int D, int M>
struct BwdShape {
    static constexpr int kRow = D + kPad;    // bf16 per shared row of K, V, Q, dO
    static constexpr int kChunks = D / 8;    // 16-byte chunks per head row
    static constexpr int kDsRow = M + kPad;  // bf16 per shared row of dS^T (one key)
    // dQ tile [M, D]: M / 16 strips of 16 rows, each split by columns over kSplit warps
    static constexpr int kSplit = kWarps / (M / 16);
    static constexpr int kDqCols = D / kSplit;
    static constexpr size_t kSmemBytes =
        (size_t)(2 * kBlockN + 4 * M) * kRow * sizeof(uint16_t)  // K, V, 2x Q, 2x dO
        + (size_t)kBlockN * kDsRow * sizeof(uint16_t)            // dS^T
        + (size_t)4 * M * sizeof(float);                         // lse, D, lo, hi per row
    static_assert(D % 16 == 0 && M % 16 == 0 && M >= 16 && M <= 64 && kWarps % (M / 16) == 0 &&
                      kDqCols % 16 == 0 && (kBlockN * kChunks) % kThreads == 0,
                  "unsupported tile shape");
};

struct BwdParams {
    const uint16_t *q;
    const uint16_t *k;
    const uint16_t *v;
    const uint16_t *out;
    const uint16_t *dout;
    const float *lse;
    float *delta;
    float *dq;
    float *dk;
    float *dv;
    const int32_t *cu_q;
    const int32_t *cu_kv;
    const int32_t *kv_len;
    const int32_t *q_pos0;
    int64_t q_stride, kv_stride, out_stride, dout_stride, dq_stride, dkv_stride;
    int32_t n_heads;
    int32_t group;  // n_heads / n_kv_heads
    int32_t max_q_len;
    int32_t window;
    int32_t max_kv_len;  // keys past it get no gradient and give none
    float scale;
    float scale_log2;  // scale * log2(e): P is recomputed with exp2
    bool causal;
    bool dq_atomic;  // the main kernel adds dq (false: the dq kernel writes it)
};

// dst[0..1] += (x, y): one vector atomic where the hardware has it (sm_90), two otherwise.
__device__ __forceinline__ void atomic_add2(float *dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(x, y));
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Grid: x = tiles of kPrepPairs (query, head) pairs, query-major; y = request. Lane c of a
// half-warp takes the 16-byte chunk c of the head's dout and out rows.
template <int D>
__global__ void __launch_bounds__(kPrepThreads) attention_bwd_preprocess_kernel(const BwdParams p) {
    const int req = blockIdx.y;
    const int32_t q_begin = p.cu_q[req];
    const int32_t q_len = min(p.cu_q[req + 1] - q_begin, p.max_q_len);
    const int64_t n_pairs = (int64_t)q_len * p.n_heads;
    const int64_t pair = (int64_t)blockIdx.x * kPrepPairs + threadIdx.x / 16;
    if ((int64_t)blockIdx.x * kPrepPairs >= n_pairs) return;  // whole block
    const int c = threadIdx.x % 16;
    const bool active = pair < n_pairs;
    const int64_t i = active ? pair / p.n_heads : 0;
    const int32_t h = active ? (int32_t)(pair % p.n_heads) : 0;

    float acc = 0.0f;
    if (active && c < D / 8) {
        const uint4 a = *reinterpret_cast<const uint4 *>(
            p.dout + (q_begin + i) * p.dout_stride + (int64_t)h * D + c * 8);
        const uint4 b = *reinterpret_cast<const uint4 *>(
            p.out + (q_begin + i) * p.out_stride + (int64_t)h * D + c * 8);
        const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, bw[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int w = 0; w < 4; w++) {
            acc = fmaf(__uint_as_float(aw[w] << 16), __uint_as_float(bw[w] << 16), acc);
            acc = fmaf(__uint_as_float(aw[w] & 0xffff0000u), __uint_as_float(bw[w] & 0xffff0000u),
                       acc);
        }
    }
    if (active) {
        float4 *dq = reinterpret_cast<float4 *>(p.dq + (q_begin + i) * p.dq_stride +
                                                (int64_t)h * D);
        for (int cc = c; cc < D / 4; cc += 16) dq[cc] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    // the half-warp's sum (xor masks below 16 stay inside it)
#pragma unroll
    for (int off = 8; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (active && c == 0) p.delta[(q_begin + i) * p.n_heads + h] = acc;
}

// Grid: x = key blocks, y = kv head, z = request.
template <int D, int M>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(const BwdParams p) {
    using S = BwdShape<D, M>;
    constexpr int kRow = S::kRow;
    constexpr int kChunks = S::kChunks;
    constexpr int kDsRow = S::kDsRow;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    uint16_t *sK = reinterpret_cast<uint16_t *>(smem_raw);  // [kBlockN][kRow]
    uint16_t *sV = sK + kBlockN * kRow;                      // [kBlockN][kRow]
    uint16_t *sQ = sV + kBlockN * kRow;                      // [2][M][kRow]
    uint16_t *sdO = sQ + 2 * M * kRow;                       // [2][M][kRow]
    uint16_t *sdS = sdO + 2 * M * kRow;                      // [kBlockN][kDsRow]: dS^T
    float *sLse = reinterpret_cast<float *>(sdS + kBlockN * kDsRow);  // [M], log2 domain
    float *sDelta = sLse + M;                                          // [M]
    int32_t *sLo = reinterpret_cast<int32_t *>(sDelta + M);            // [M] visible keys
    int32_t *sHi = sLo + M;                                            // [M]

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int req = blockIdx.z;
    const int kv_head = blockIdx.y;
    const int32_t j0 = (int32_t)blockIdx.x * kBlockN;
    const int32_t group = p.group;

    const int32_t kv_begin = p.cu_kv[req];
    const int32_t kv_len = p.kv_len ? p.kv_len[req] : p.cu_kv[req + 1] - kv_begin;
    if (j0 >= kv_len) return;  // whole CTA: past this request's keys
    const int32_t j1 = min(j0 + kBlockN, min(kv_len, p.max_kv_len));  // keys past: no gradient
    const int32_t q_begin = p.cu_q[req];
    const int32_t q_len = max(min(p.cu_q[req + 1] - q_begin, p.max_q_len), 0);
    const int64_t pos0 = p.q_pos0 ? p.q_pos0[req] : 0;

    // Queries that can see a key of [j0, j1): causal, pos0 + i >= j0 and, with a window,
    // pos0 + i - (j1 - 1) < window. The per-element mask below is exact.
    int64_t i_begin = 0, i_end = q_len;
    if (p.causal) {
        i_begin = max((int64_t)0, (int64_t)j0 - pos0);
        if (p.window > 0) i_end = min(i_end, (int64_t)j1 - 1 - pos0 + p.window);
    }
    if (i_begin > q_len) i_begin = q_len;
    if (i_end < i_begin) i_end = i_begin;
    const int32_t prow_begin = (int32_t)i_begin * group, prow_end = (int32_t)i_end * group;
    const int32_t n_tiles = (prow_end - prow_begin + M - 1) / M;

    // K and V of the block; rows past the request's keys are zero-filled (never read).
    const uint16_t *k_base = p.k + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    const uint16_t *v_base = p.v + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
#pragma unroll
    for (int it = 0; it < kBlockN * kChunks / kThreads; it++) {
        const int c = tid + it * kThreads;
        const int r = c / kChunks, cc = c % kChunks;
        const bool ok = j0 + r < j1;
        const int64_t off = ok ? (int64_t)(j0 + r) * p.kv_stride + cc * 8 : 0;
        cp_async_16(smem_u32(sK + r * kRow + cc * 8), k_base + off, ok);
        cp_async_16(smem_u32(sV + r * kRow + cc * 8), v_base + off, ok);
    }
    cp_async_commit();

    // Q and dO rows of the tile starting at packed row row0 into buffer buf; rows past
    // prow_end are zero-filled.
    auto load_rows = [&](int buf, int32_t row0) {
        uint16_t *q_dst = sQ + buf * M * kRow;
        uint16_t *do_dst = sdO + buf * M * kRow;
        for (int c = tid; c < M * kChunks; c += kThreads) {
            const int r = c / kChunks, cc = c % kChunks;
            const int32_t prow = row0 + r;
            const bool ok = prow < prow_end;
            const int64_t i = ok ? prow / group : 0;
            const int64_t h = ok ? kv_head * group + prow % group : 0;
            const uint16_t *qs = p.q + (ok ? (q_begin + i) * p.q_stride + h * D + cc * 8 : 0);
            const uint16_t *ds = p.dout + (ok ? (q_begin + i) * p.dout_stride + h * D + cc * 8 : 0);
            cp_async_16(smem_u32(q_dst + r * kRow + cc * 8), qs, ok);
            cp_async_16(smem_u32(do_dst + r * kRow + cc * 8), ds, ok);
        }
    };
    if (n_tiles > 0) load_rows(0, prow_begin);
    cp_async_commit();

    // ldmatrix lane addressing inside a 16x16 block: row and column offsets (elements).
    // a_*: the four 8x8 matrices in A-fragment order (rows +0, +8 | columns +0; then +8), also
    // the B operand of .trans loads from a [k][n] row-major tile. k_*: the B operand of a
    // non-transposed [n][k] tile (rows +0..7 | k +0, +8; rows +8..15 | k +0, +8), also the A
    // operand of a .trans load from a [k][m] tile.
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;
    const int key_w = warp * 16;  // the warp's first key within the block

    float dk[D / 8][4], dv[D / 8][4];  // rows key_w + g (c[0..1]) and + 8 (c[2..3])
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.0f;
        dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.0f;
    }

    for (int32_t tile = 0; tile < n_tiles; tile++) {
        const int buf = tile & 1;
        const int32_t row0 = prow_begin + tile * M;

        // Per-row statistics of this tile (their previous readers are past the loop's last
        // barrier). Padding rows and rows that see no key get lse = +inf: P = exp2(-inf) = 0.
        if (tid < M) {
            const int32_t prow = row0 + tid;
            float lse2 = INFINITY, dlt = 0.0f;
            int32_t lo = 0, hi = 0;
            if (prow < prow_end) {
                const int64_t i = prow / group;
                const int64_t idx = (q_begin + i) * p.n_heads + kv_head * group + prow % group;
                const float l = p.lse[idx];
                if (l != -INFINITY) lse2 = l * 1.4426950408889634f;
                dlt = p.delta[idx];
                visible_keys(p.causal, p.window, pos0 + i, kv_len, &lo, &hi);
                hi = min(hi, p.max_kv_len);
            }
            sLse[tid] = lse2;
            sDelta[tid] = dlt;
            sLo[tid] = lo;
            sHi[tid] = hi;
        }
        if (tile + 1 < n_tiles) load_rows(buf ^ 1, row0 + M);
        cp_async_commit();
        cp_async_wait<1>();  // this tile's Q and dO (and K, V) have landed
        __syncthreads();

        // Does some row of the tile lose a key of the block to the mask? (First and last real
        // query of the tile bound everyone's visible range.)
        bool need_mask;
        {
            int32_t lo_f, hi_f, lo_l, hi_l;
            visible_keys(p.causal, p.window, pos0 + row0 / group, kv_len, &lo_f, &hi_f);
            visible_keys(p.causal, p.window, pos0 + (min(row0 + M, prow_end) - 1) / group, kv_len,
                         &lo_l, &hi_l);
            need_mask = j0 < lo_l || j0 + kBlockN > min(hi_f, p.max_kv_len);
        }

        const uint16_t *q_s = sQ + buf * M * kRow;
        const uint16_t *do_s = sdO + buf * M * kRow;

        // S^T = K_w Q^T: [16 keys, M rows]
        float acc[M / 8][4];
#pragma unroll
        for (int nt = 0; nt < M / 8; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t a[4];
            ldmatrix_x4(a, smem_u32(sK + (key_w + a_row) * kRow + kk * 16 + a_col));
#pragma unroll
            for (int np = 0; np < M / 16; np++) {
                uint32_t b[4];
                ldmatrix_x4(b, smem_u32(q_s + (np * 16 + k_row) * kRow + kk * 16 + k_col));
                mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
                mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
            }
        }

        // P^T = exp2(S^T scale log2 e - lse log2 e), masked; element e of n-tile nt is key
        // key_w + g + 8 (e / 2), packed row 8 nt + 2 t4 + e % 2.
#pragma unroll
        for (int nt = 0; nt < M / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = nt * 8 + 2 * t4 + (e & 1);
                float x = exp2_ftz(fmaf(acc[nt][e], p.scale_log2, -sLse[r]));
                if (need_mask) {
                    const int32_t j = j0 + key_w + g + 8 * (e >> 1);
                    if (j < sLo[r] || j >= sHi[r]) x = 0.0f;
                }
                acc[nt][e] = x;
            }
        }

        // dV += P^T dO
        {
            uint32_t pf[M / 16][4];
#pragma unroll
            for (int kc = 0; kc < M / 16; kc++) pack_c_as_a(pf[kc], acc[2 * kc], acc[2 * kc + 1]);
#pragma unroll
            for (int kc = 0; kc < M / 16; kc++) {
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, smem_u32(do_s + (kc * 16 + a_row) * kRow + dp * 16 + a_col));
                    mma_bf16_16816(dv[2 * dp], pf[kc], b[0], b[1]);
                    mma_bf16_16816(dv[2 * dp + 1], pf[kc], b[2], b[3]);
                }
            }
        }

        // dP^T = V_w dO^T, then dS^T = P^T (dP^T - D) in place
        float dsa[M / 8][4];
#pragma unroll
        for (int nt = 0; nt < M / 8; nt++) dsa[nt][0] = dsa[nt][1] = dsa[nt][2] = dsa[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t a[4];
            ldmatrix_x4(a, smem_u32(sV + (key_w + a_row) * kRow + kk * 16 + a_col));
#pragma unroll
            for (int np = 0; np < M / 16; np++) {
                uint32_t b[4];
                ldmatrix_x4(b, smem_u32(do_s + (np * 16 + k_row) * kRow + kk * 16 + k_col));
                mma_bf16_16816(dsa[2 * np], a, b[0], b[1]);
                mma_bf16_16816(dsa[2 * np + 1], a, b[2], b[3]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < M / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++)
                dsa[nt][e] = acc[nt][e] * (dsa[nt][e] - sDelta[nt * 8 + 2 * t4 + (e & 1)]);
        }

        // dS^T in bf16: to shared memory (rows = keys) for dQ, and dK += dS^T Q from registers
        {
            uint32_t dsf[M / 16][4];
#pragma unroll
            for (int kc = 0; kc < M / 16; kc++) {
                pack_c_as_a(dsf[kc], dsa[2 * kc], dsa[2 * kc + 1]);
                if (!p.dq_atomic) continue;
                uint16_t *row = sdS + (key_w + g) * kDsRow + kc * 16 + 2 * t4;
                *reinterpret_cast<uint32_t *>(row) = dsf[kc][0];
                *reinterpret_cast<uint32_t *>(row + 8 * kDsRow) = dsf[kc][1];
                *reinterpret_cast<uint32_t *>(row + 8) = dsf[kc][2];
                *reinterpret_cast<uint32_t *>(row + 8 * kDsRow + 8) = dsf[kc][3];
            }
#pragma unroll
            for (int kc = 0; kc < M / 16; kc++) {
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, smem_u32(q_s + (kc * 16 + a_row) * kRow + dp * 16 + a_col));
                    mma_bf16_16816(dk[2 * dp], dsf[kc], b[0], b[1]);
                    mma_bf16_16816(dk[2 * dp + 1], dsf[kc], b[2], b[3]);
                }
            }
        }
        // dQ = dS K for the tile: warp -> rows 16 strip .. +15, columns col0 .. col0 + kDqCols;
        // scaled and added to dq (p.dq_atomic is uniform: every thread takes the barrier or
        // none does).
        if (p.dq_atomic) {
            __syncthreads();  // all of dS^T is in shared memory
            constexpr int kCols = S::kDqCols;
            const int strip = warp / S::kSplit;
            const int col0 = (warp % S::kSplit) * kCols;
            float dqa[kCols / 8][4];
#pragma unroll
            for (int dt = 0; dt < kCols / 8; dt++)
                dqa[dt][0] = dqa[dt][1] = dqa[dt][2] = dqa[dt][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; kc++) {
                uint32_t a[4];  // dS rows strip * 16 .., keys 16 kc .. (transposed from dS^T)
                ldmatrix_x4_trans(a, smem_u32(sdS + (kc * 16 + k_row) * kDsRow + strip * 16 + k_col));
#pragma unroll
                for (int dp = 0; dp < kCols / 16; dp++) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(
                        b, smem_u32(sK + (kc * 16 + a_row) * kRow + col0 + dp * 16 + a_col));
                    mma_bf16_16816(dqa[2 * dp], a, b[0], b[1]);
                    mma_bf16_16816(dqa[2 * dp + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int32_t prow = row0 + strip * 16 + g + 8 * hh;
                if (prow < prow_end) {
                    const int64_t i = prow / group;
                    float *dst = p.dq + (q_begin + i) * p.dq_stride +
                                 (int64_t)(kv_head * group + prow % group) * D + col0 + 2 * t4;
#pragma unroll
                    for (int dt = 0; dt < kCols / 8; dt++) {
                        atomic_add2(dst + dt * 8, dqa[dt][2 * hh] * p.scale,
                                    dqa[dt][2 * hh + 1] * p.scale);
                    }
                }
            }
        }
        __syncthreads();  // Q, dO of this tile, dS^T and the row statistics are free again
    }
    cp_async_wait<0>();  // nothing may still be landing when the CTA exits (n_tiles == 0)

    // dK (scaled) and dV of the warp's keys; keys past the request's are not written.
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int32_t j = j0 + key_w + g + 8 * hh;
        if (j < j1) {
            const int64_t off = (int64_t)(kv_begin + j) * p.dkv_stride + (int64_t)kv_head * D + 2 * t4;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                *reinterpret_cast<float2 *>(p.dk + off + dt * 8) =
                    make_float2(dk[dt][2 * hh] * p.scale, dk[dt][2 * hh + 1] * p.scale);
                *reinterpret_cast<float2 *>(p.dv + off + dt * 8) =
                    make_float2(dv[dt][2 * hh], dv[dt][2 * hh + 1]);
            }
        }
    }
}

// The deterministic dq (sf_attention_grads.deterministic): one CTA per (tile of kDqRows packed
// rows, kv head, request), warp w owning rows 16w .. 16w + 15 of the tile, walks over the
// 64-key blocks its rows can see, as the forward does, and recomputes per block, on tensor
// cores:
//   S  = Q K^T                  A: Q (ldmatrix), B: K (ldmatrix)
//   P  = exp2(S scale log2 e - lse log2 e), masked (fp32, as the main kernel's)
//   dP = dO V^T                 A: dO (ldmatrix), B: V (ldmatrix)
//   dS = P (dP - D), rounded to bf16 as the A operand straight from the accumulators
//   dQ += dS K                  B: K (ldmatrix.trans)
// Each dq element is then one fp32 accumulator summed in key order and stored once: the same
// bits on every run. K and V blocks are double-buffered with cp.async (kBuffers = 2: the next
// block streams in during this one's products), or single-buffered (kBuffers = 1, head dim 128
// only) where the device's shared memory per block cannot hold two: 104 KB at head dim 128
// against the 99 KB an sm_86 / sm_89 block may opt in to (80 KB at most below 128).
constexpr int kDqRows = kWarps * 16;

template <int D, int kBuffers>
struct DqShape {
    static constexpr int kRow = D + kPad;
    static constexpr int kChunks = D / 8;
    static constexpr size_t kSmemBytes =  // Q, dO, kBuffers x (K, V)
        (size_t)(2 * kDqRows + 2 * kBuffers * kBlockN) * kRow * sizeof(uint16_t);
    static_assert(D % 16 == 0 && (kDqRows * kChunks) % kThreads == 0 &&
                      (kBlockN * kChunks) % kThreads == 0 && (kBuffers == 1 || kBuffers == 2),
                  "unsupported head dim");
};

// Grid: x = packed-row tiles, y = kv head, z = request.
template <int D, int kBuffers>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const BwdParams p) {
    using S = DqShape<D, kBuffers>;
    constexpr int kRow = S::kRow;
    constexpr int kChunks = S::kChunks;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    uint16_t *sQ = reinterpret_cast<uint16_t *>(smem_raw);  // [kDqRows][kRow]
    uint16_t *sdO = sQ + kDqRows * kRow;                     // [kDqRows][kRow]
    uint16_t *sK = sdO + kDqRows * kRow;                     // [kBuffers][kBlockN][kRow]
    uint16_t *sV = sK + kBuffers * kBlockN * kRow;           // [kBuffers][kBlockN][kRow]

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int req = blockIdx.z;
    const int kv_head = blockIdx.y;
    const int32_t row0 = (int32_t)blockIdx.x * kDqRows;
    const int32_t group = p.group;

    const int32_t q_begin = p.cu_q[req];
    const int32_t q_len = max(min(p.cu_q[req + 1] - q_begin, p.max_q_len), 0);
    const int32_t prow_end = q_len * group;
    if (row0 >= prow_end) return;  // whole CTA: past this request's queries
    const int32_t kv_begin = p.cu_kv[req];
    const int32_t kv_len = p.kv_len ? p.kv_len[req] : p.cu_kv[req + 1] - kv_begin;
    const int64_t pos0 = p.q_pos0 ? p.q_pos0[req] : 0;

    // Keys any row of the CTA sees: [lo, hi), the first query's lo and the last one's hi (both
    // monotone in the position), capped at max_kv_len as the main kernel's grid is; a block
    // inside [lo_last, hi_first) is visible to every row.
    int32_t lo, hi_first, lo_last, hi;
    visible_keys(p.causal, p.window, pos0 + row0 / group, kv_len, &lo, &hi_first);
    visible_keys(p.causal, p.window, pos0 + (min(row0 + kDqRows, prow_end) - 1) / group, kv_len,
                 &lo_last, &hi);
    hi = min(hi, p.max_kv_len);
    hi_first = min(hi_first, p.max_kv_len);
    const int32_t n_blocks = hi > lo ? (hi - lo + kBlockN - 1) / kBlockN : 0;

    // Q and dO rows of the tile (rows past prow_end zero-filled), with the first K, V block.
    for (int c = tid; c < kDqRows * kChunks; c += kThreads) {
        const int r = c / kChunks, cc = c % kChunks;
        const int32_t prow = row0 + r;
        const bool ok = prow < prow_end;
        const int64_t i = ok ? prow / group : 0;
        const int64_t h = ok ? kv_head * group + prow % group : 0;
        const uint16_t *qs = p.q + (ok ? (q_begin + i) * p.q_stride + h * D + cc * 8 : 0);
        const uint16_t *ds = p.dout + (ok ? (q_begin + i) * p.dout_stride + h * D + cc * 8 : 0);
        cp_async_16(smem_u32(sQ + r * kRow + cc * 8), qs, ok);
        cp_async_16(smem_u32(sdO + r * kRow + cc * 8), ds, ok);
    }
    const uint16_t *k_base = p.k + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    const uint16_t *v_base = p.v + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    // keys j0 .. j0 + kBlockN - 1 into buffer buf; keys past hi zero-filled (masked anyway)
    auto load_block = [&](int buf, int32_t j0) {
#pragma unroll
        for (int it = 0; it < kBlockN * kChunks / kThreads; it++) {
            const int c = tid + it * kThreads;
            const int r = c / kChunks, cc = c % kChunks;
            const bool ok = j0 + r < hi;
            const int64_t off = ok ? (int64_t)(j0 + r) * p.kv_stride + cc * 8 : 0;
            cp_async_16(smem_u32(sK + (buf * kBlockN + r) * kRow + cc * 8), k_base + off, ok);
            cp_async_16(smem_u32(sV + (buf * kBlockN + r) * kRow + cc * 8), v_base + off, ok);
        }
    };
    if (n_blocks > 0) load_block(0, lo);
    cp_async_commit();

    // This thread's rows g (h = 0) and g + 8 (h = 1) of the warp's 16: lse in log2 units
    // (+inf for padding rows and rows that see no key: P = exp2(-inf) = 0), D, visible keys.
    const int32_t warp_row0 = row0 + warp * 16;
    const bool warp_active = warp_row0 < prow_end;  // warp-uniform
    float lse2[2], dlt[2];
    int32_t row_lo[2], row_hi[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int32_t prow = warp_row0 + g + 8 * h;
        lse2[h] = INFINITY;
        dlt[h] = 0.0f;
        row_lo[h] = row_hi[h] = 0;
        if (prow < prow_end) {
            const int64_t i = prow / group;
            const int64_t idx = (q_begin + i) * p.n_heads + kv_head * group + prow % group;
            const float l = p.lse[idx];
            if (l != -INFINITY) lse2[h] = l * 1.4426950408889634f;
            dlt[h] = p.delta[idx];
            visible_keys(p.causal, p.window, pos0 + i, kv_len, &row_lo[h], &row_hi[h]);
            row_hi[h] = min(row_hi[h], p.max_kv_len);  // as the CTA's range
        }
    }

    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;
    const uint16_t *q_w = sQ + warp * 16 * kRow;
    const uint16_t *do_w = sdO + warp * 16 * kRow;

    float dq[D / 8][4];  // rows g (c[0..1]) and g + 8 (c[2..3]), columns 8 dt + 2 t4, + 1
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;

    for (int32_t blk = 0; blk < n_blocks; blk++) {
        const int buf = kBuffers == 2 ? blk & 1 : 0;
        const int32_t j0 = lo + blk * kBlockN;
        if (kBuffers == 2) {
            if (blk + 1 < n_blocks) load_block(buf ^ 1, j0 + kBlockN);
            cp_async_commit();
            cp_async_wait<1>();  // this block (and Q, dO) have landed
        } else {
            // the one buffer is free: the loop's closing barrier follows its last reader
            if (blk > 0) load_block(0, j0);
            cp_async_commit();
            cp_async_wait<0>();
        }
        __syncthreads();

        if (warp_active) {
            const uint16_t *k_s = sK + buf * kBlockN * kRow;
            const uint16_t *v_s = sV + buf * kBlockN * kRow;
            // S = Q K^T and dP = dO V^T: [16 rows, kBlockN keys] each
            float s[kBlockN / 8][4], dp[kBlockN / 8][4];
#pragma unroll
            for (int nt = 0; nt < kBlockN / 8; nt++) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
                dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t qf[4], of[4];
                ldmatrix_x4(qf, smem_u32(q_w + a_row * kRow + kk * 16 + a_col));
                ldmatrix_x4(of, smem_u32(do_w + a_row * kRow + kk * 16 + a_col));
#pragma unroll
                for (int np = 0; np < kBlockN / 16; np++) {
                    uint32_t b[4];
                    ldmatrix_x4(b, smem_u32(k_s + (np * 16 + k_row) * kRow + kk * 16 + k_col));
                    mma_bf16_16816(s[2 * np], qf, b[0], b[1]);
                    mma_bf16_16816(s[2 * np + 1], qf, b[2], b[3]);
                    ldmatrix_x4(b, smem_u32(v_s + (np * 16 + k_row) * kRow + kk * 16 + k_col));
                    mma_bf16_16816(dp[2 * np], of, b[0], b[1]);
                    mma_bf16_16816(dp[2 * np + 1], of, b[2], b[3]);
                }
            }
            // dS = P (dP - D); element e of n-tile nt: row g + 8 (e / 2), key j0 + 8 nt + 2 t4
            // + e % 2
            const bool need_mask = j0 < lo_last || j0 + kBlockN > hi_first;
#pragma unroll
            for (int nt = 0; nt < kBlockN / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int h = e >> 1;
                    float x = exp2_ftz(fmaf(s[nt][e], p.scale_log2, -lse2[h]));
                    if (need_mask) {
                        const int32_t j = j0 + nt * 8 + 2 * t4 + (e & 1);
                        if (j < row_lo[h] || j >= row_hi[h]) x = 0.0f;
                    }
                    s[nt][e] = x * (dp[nt][e] - dlt[h]);
                }
            }
            // dQ += dS K
#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; kc++) {
                uint32_t dsf[4];
                pack_c_as_a(dsf, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
                for (int dpp = 0; dpp < D / 16; dpp++) {
                    uint32_t b[4];
                    ldmatrix_x4_trans(
                        b, smem_u32(k_s + (kc * 16 + a_row) * kRow + dpp * 16 + a_col));
                    mma_bf16_16816(dq[2 * dpp], dsf, b[0], b[1]);
                    mma_bf16_16816(dq[2 * dpp + 1], dsf, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this buffer before the next load into it
    }
    cp_async_wait<0>();  // nothing may still be landing when the CTA exits

    // dq (scaled) of the warp's real rows, every head value: rows that see no key get zeros.
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int32_t prow = warp_row0 + g + 8 * h;
        if (prow < prow_end) {
            const int64_t i = prow / group;
            float *dst = p.dq + (q_begin + i) * p.dq_stride +
                         (int64_t)(kv_head * group + prow % group) * D + 2 * t4;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                *reinterpret_cast<float2 *>(dst + dt * 8) =
                    make_float2(dq[dt][2 * h] * p.scale, dq[dt][2 * h + 1] * p.scale);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <int D, int M>
sf_status launch_attention_backward(const BwdParams &p, const sf_attention_args *a,
                                    const sf_attention_grads *gr, cudaStream_t stream) {
    // The deterministic dq kernel's K/V buffers (0: dq by atomics, or nothing to compute: with
    // no keys the preprocess's zeros are dq): two where the device's shared memory per block
    // holds them, else, at head dim 128 (the only one whose two buffers pass an sm_86's 99 KB),
    // one; decided before anything is enqueued.
    constexpr bool kSingle = D == 128;  // (a single-buffered D = 64 spills a register on sm_80)
    int dq_buffers = 0;
    if (!p.dq_atomic && a->max_q_len > 0 && gr->max_kv_len > 0) {
        int dev = 0, optin = 0;
        SF_CUDA_TRY(cudaGetDevice(&dev));
        SF_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        const size_t least = kSingle ? DqShape<D, 1>::kSmemBytes : DqShape<D, 2>::kSmemBytes;
        dq_buffers = (size_t)optin >= DqShape<D, 2>::kSmemBytes ? 2
                     : (size_t)optin >= least                   ? 1
                                                                : 0;
        if (dq_buffers == 0) {
            return sf_fail(SF_ERR_UNSUPPORTED,
                           "sf_cuda_attention_backward_bf16: the deterministic dq pass needs "
                           "%zu bytes of shared memory per block at head dim %d; this device "
                           "allows %d",
                           least, D, optin);
        }
    }
    if (a->max_q_len > 0) {
        const dim3 grid((unsigned)sf_ceil_div((int64_t)a->max_q_len * a->n_heads, kPrepPairs),
                        (unsigned)a->n_requests);
        attention_bwd_preprocess_kernel<D><<<grid, kPrepThreads, 0, stream>>>(p);
        SF_CUDA_TRY(cudaGetLastError());
    }
    if (gr->max_kv_len > 0) {
        using S = BwdShape<D, M>;
        constexpr size_t smem = S::kSmemBytes;
        if (smem > 48 * 1024) {
            // above the default 48 KB a kernel must opt in (per device; cheap to repeat)
            SF_CUDA_TRY(cudaFuncSetAttribute(attention_bwd_kernel<D, M>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem));
        }
        const dim3 grid((unsigned)sf_ceil_div(gr->max_kv_len, kBlockN), (unsigned)a->n_kv_heads,
                        (unsigned)a->n_requests);
        attention_bwd_kernel<D, M><<<grid, kThreads, smem, stream>>>(p);
        SF_CUDA_TRY(cudaGetLastError());
    }
    if (dq_buffers > 0) {
        const dim3 grid((unsigned)sf_ceil_div((int64_t)a->max_q_len * p.group, kDqRows),
                        (unsigned)a->n_kv_heads, (unsigned)a->n_requests);
        if (dq_buffers == 2) {
            constexpr size_t smem = DqShape<D, 2>::kSmemBytes;
            SF_CUDA_TRY(cudaFuncSetAttribute(attention_bwd_dq_kernel<D, 2>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem));
            attention_bwd_dq_kernel<D, 2><<<grid, kThreads, smem, stream>>>(p);
        } else if constexpr (kSingle) {
            constexpr size_t smem = DqShape<D, 1>::kSmemBytes;
            SF_CUDA_TRY(cudaFuncSetAttribute(attention_bwd_dq_kernel<D, 1>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem));
            attention_bwd_dq_kernel<D, 1><<<grid, kThreads, smem, stream>>>(p);
        }
        SF_CUDA_TRY(cudaGetLastError());
    }
    return SF_OK;
}

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15u) == 0; }

}  // namespace

extern "C" sf_status sf_cuda_attention_backward_bf16(const sf_attention_args *a,
                                                     const sf_attention_grads *gr,
                                                     cudaStream_t stream) {
    static const char *fn = "sf_cuda_attention_backward_bf16";
    sf_status st = sf_attention_check_shapes(a, fn);
    if (st != SF_OK) return st;
    if (!gr) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL grads", fn);
    const int32_t d = a->head_dim;
    const int64_t q_row = (int64_t)a->n_heads * d, kv_row = (int64_t)a->n_kv_heads * d;
    if (gr->max_kv_len < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: max_kv_len = %d", fn, (int)gr->max_kv_len);
    }
    if (gr->dout_stride < q_row || gr->dq_stride < q_row || gr->dkv_stride < kv_row) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: strides dout %lld, dq %lld, dk/dv %lld "
                       "shorter than a row of heads (%lld, %lld, %lld)", fn,
                       (long long)gr->dout_stride, (long long)gr->dq_stride,
                       (long long)gr->dkv_stride, (long long)q_row, (long long)q_row,
                       (long long)kv_row);
    }
    if (a->n_requests == 0 || (a->max_q_len == 0 && gr->max_kv_len == 0)) return SF_OK;
    st = sf_attention_check_tensors(a, fn);
    if (st != SF_OK) return st;
    if (!a->lse || !gr->dout || !gr->dq || !gr->dk || !gr->dv || !gr->delta) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL lse, dout, dq, dk, dv or delta", fn);
    }
    if (!aligned16(gr->dout) || gr->dout_stride % 8 != 0 || !aligned16(gr->dq) ||
        !aligned16(gr->dk) || !aligned16(gr->dv) || gr->dq_stride % 4 != 0 ||
        gr->dkv_stride % 4 != 0) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: dout must be 16-byte aligned with a stride a "
                       "multiple of 8 elements, dq, dk, dv 16-byte aligned with strides a "
                       "multiple of 4", fn);
    }
    if ((int64_t)a->max_q_len * a->n_heads > (int64_t)INT32_MAX - 256) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: grid too large (max_q_len * n_heads = %lld)", fn,
                       (long long)a->max_q_len * a->n_heads);
    }

    sf_nvtx_range range("sf_cuda_attention_backward_bf16");
    BwdParams p;
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.out = a->out;
    p.dout = gr->dout;
    p.lse = a->lse;
    p.delta = gr->delta;
    p.dq = gr->dq;
    p.dk = gr->dk;
    p.dv = gr->dv;
    p.cu_q = a->cu_q;
    p.cu_kv = a->cu_kv;
    p.kv_len = a->kv_len;
    p.q_pos0 = a->q_pos0;
    p.q_stride = a->q_stride;
    p.kv_stride = a->kv_stride;
    p.out_stride = a->out_stride;
    p.dout_stride = gr->dout_stride;
    p.dq_stride = gr->dq_stride;
    p.dkv_stride = gr->dkv_stride;
    p.n_heads = a->n_heads;
    p.group = a->n_heads / a->n_kv_heads;
    p.max_q_len = a->max_q_len;
    p.window = a->window;
    p.max_kv_len = gr->max_kv_len;
    p.scale = a->scale;
    p.scale_log2 = a->scale * 1.4426950408889634f;
    p.causal = a->causal;
    p.dq_atomic = !gr->deterministic;
    switch (d) {
        case 64: return launch_attention_backward<64, 64>(p, a, gr, stream);
        case 80: return launch_attention_backward<80, 64>(p, a, gr, stream);
        case 96: return launch_attention_backward<96, 64>(p, a, gr, stream);
        default: return launch_attention_backward<128, 16>(p, a, gr, stream);
    }
}
