// Fused scaled-dot-product attention on bf16 for Hopper (sm_90a): the forward of attention.cu
// (same arguments, masks, packing and results up to rounding) with its two products on wgmma,
// the warpgroup-wide tensor-core instruction that reads its operands from shared memory, in two
// schedules. CPU twin: host/cpu/attention.c. NOT YET RUN ON A GPU: sf_cuda_attention_bf16 runs
// them only when asked (args.kernel = SF_ATTENTION_WGMMA or SF_ATTENTION_WGMMA_WS, which the
// engine passes for its option attention); tests and bench_attention also call
// sf_cuda_attention_sm90_bf16 / _tiles_bf16 / _ws_bf16 directly, and tests run the two
// products alone through sf_cuda_wgmma_products_bf16 (wgmma_products_kernel).
//
// One CTA owns one (request, kv head, tile of kBlockM = 128 packed rows), as in attention.cu
// (packed row p = query p / group of query head kv_head * group + p % group). Two warpgroups of
// four warps multiply: warpgroup w owns rows 64 w .. 64 w + 63, warp v of it rows 16 v ..
// 16 v + 15 of those, so each thread holds the same two rows (g, g + 8) as in attention.cu. Per
// tile of kBlockN = 128 keys (or 64) each warpgroup computes (WgTile)
//   S = Q K^T     wgmma m64nKk16 (K = kBlockN), A = Q and B = K from shared memory (D / 16 of
//                 them);
//   the mask and online softmax in registers (attention_mma.cuh's, as attention.cu), P rounded
//                 to bf16;
//   O = O alpha + P V   wgmma m64nDk16 (one per 16 keys, all D columns) with A = P straight
//                 from the S accumulators (their layout is the A fragment layout) and B = V
//                 from shared memory, transposed;
// and the epilogue divides by l. Each round issues S(t) = Q K(t)^T and then O = O alpha +
// P(t-1) V(t-1), waits for S(t) only and runs the softmax of tile t while the second product
// runs (FlashAttention-3's intra-warpgroup overlap; how much of the softmax ptxas leaves before
// the wait for that product, and how the warp-specialized kernel moves that wait a round later
// where the registers allow: see the two kernels' loops).
//
// The two schedules (predicted, not yet measured, to keep the tensor cores busy):
//   - attention_sm90_kernel, pipelined: the same 256 threads copy and multiply. K and V are
//     double-buffered: the copies of K(t+1) and V(t) are issued at the start of iteration t,
//     into the buffers iteration t-1 finished reading, and land during its products; one
//     __syncthreads per tile.
//   - attention_sm90_ws_kernel, warp-specialized (FlashAttention-3's design, with cp.async in
//     place of TMA): a third warpgroup only copies, through kStages buffers each of K and V
//     whose fill and release mbarriers replace the __syncthreads, and gives its registers to
//     the other two (setmaxnreg); those take turns issuing their products (ping-pong on named
//     barriers), so one's softmax runs while the other's products occupy the tensor cores.
// Copies into shared memory go 8 rows of one 16-byte column at a time, i.e. one whole 128-byte
// core matrix per 8 threads, so they are free of bank conflicts (row-major order would put 8
// threads' stores 1 KB apart, on the same banks). Tiles are stored as 8-row core matrices
// (wgmma_layout.cuh's tile_offset), the layout wgmma's descriptors describe, so no swizzle is
// involved.
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

#include "attention.h"
#include "attention_mma.cuh"
#include "cuda_check.cuh"
#include "ptx_sm90.cuh"

// The key tile widths both kernels and the products entry point take (kBlockN).
static sf_status check_block_n(int32_t block_n, const char *fn) {
    if (block_n == 64 || block_n == 96 || block_n == 128) return SF_OK;
    return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: block_n = %d (64, 96 or 128)", fn, (int)block_n);
}

#if SF_SM90A

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "with SF_SM90A, attention_sm90.cu is for sm_90a only (CMakeLists.txt builds it so)"
#endif

namespace {

using namespace sf_attn;

constexpr int kWarpgroups = 2;
constexpr int kThreads = kWarpgroups * 128;
constexpr int kBlockM = kWarpgroups * 64;
// Keys per tile unless the caller asks (sf_cuda_attention_sm90_tiles_bf16): 128 as in
// FlashAttention-3 for these head dims; which of 64, 96 and 128 is faster here is for the first
// GPU run's bench_attention to say.
constexpr int kDefaultBlockN = 128;

// Buffers each of K and V (the pipelined kernel's double buffering; the warp-specialized
// kernel's stages).
constexpr int kStages = 2;

// D: head dim; kBlockN: keys per tile (64, 96 or 128, sf_cuda_attention_sm90_tiles_bf16's
// block_n).
template <int D, int kBlockN>
struct Sm90Shape {
    static constexpr int kChunks = D / 8;  // 16-byte chunks per head row
    static constexpr uint32_t kKvTileBytes = kBlockN * D * 2;
    // Q, then kStages buffers each of K and V
    static constexpr uint32_t kTilesBytes = (kBlockM + 2 * kStages * kBlockN) * D * 2;
    static constexpr size_t kSmemBytes = kTilesBytes;
    // the warp-specialized kernel's mbarriers after the tiles: Q landed; per stage, K landed,
    // V landed, K free, V free
    static constexpr size_t kWsSmemBytes = kTilesBytes + (1 + 4 * kStages) * 8;
    static_assert(D == 64 || D == 80 || D == 96 || D == 128, "unsupported head dim");
    static_assert(kBlockN == 64 || kBlockN == 96 || kBlockN == 128,
                  "wgmma_ss has n64, n96 and n128");
    static_assert((16 * kChunks) % 32 == 0, "the store loop gives every lane the same count");
};

// Shared-state-space addresses of Sm90Shape's layout: Q; tile t of K and V in buffer
// t % kStages; the warp-specialized kernel's mbarriers.
template <int D, int kBlockN>
struct Tiles {
    using S = Sm90Shape<D, kBlockN>;
    uint32_t q;
    __device__ __forceinline__ uint32_t k(int32_t t) const {
        return q + kBlockM * D * 2 + (uint32_t)(t % kStages) * S::kKvTileBytes;
    }
    __device__ __forceinline__ uint32_t v(int32_t t) const {
        return q + kBlockM * D * 2 + (uint32_t)(kStages + t % kStages) * S::kKvTileBytes;
    }
    // mbarrier i: 0 Q landed; 1 + s K landed, 1 + kStages + s V landed, 1 + 2 kStages + s K
    // free, 1 + 3 kStages + s V free (buffer s)
    __device__ __forceinline__ uint32_t bar(int i) const { return q + S::kTilesBytes + 8 * i; }
};

struct Sm90Params {
    uint16_t *out;
    const uint16_t *q;
    const uint16_t *k;
    const uint16_t *v;
    const int32_t *cu_q;
    const int32_t *cu_kv;
    const int32_t *kv_len;
    const int32_t *q_pos0;
    float *lse;  // or NULL
    int64_t q_stride, kv_stride, out_stride;
    int32_t group;  // n_heads / n_kv_heads
    int32_t n_heads;
    int32_t window;
    float scale_log2;  // scale * log2(e): the softmax runs on exp2
    bool causal;
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

// Chunk c of a tile's 16-byte chunks (row r, column cc of kChunks) in copy order: 8
// consecutive chunks are the 8 rows of one core matrix (one 128-byte shared-memory store, free
// of bank conflicts), and a warp's 32 chunks are 64 contiguous bytes of each of 8 rows.
template <int kChunks>
__device__ __forceinline__ void copy_order(int c, int *r, int *cc) {
    const int rest = c / 8;
    *r = rest / kChunks * 8 + c % 8;
    *cc = rest % kChunks;
}

// Online softmax of one tile of scores in place: s (this thread's S accumulators of rows g and
// g + 8, keys j0 + 8 nt + 2 t4 + e % 2) becomes exp2(s * scale_log2 - m_new), unrounded; m
// moves to the new running maximum; alpha = exp2(m_old - m_new) is what O and l must be scaled
// by before this tile's P is added.
template <int kBlockN>
__device__ __forceinline__ void softmax_tile(float (&s)[kBlockN / 2], float (&m)[2],
                                             float (&alpha)[2], float scale_log2, bool need_mask,
                                             int32_t j0, int t4, const int32_t (&row_lo)[2],
                                             const int32_t (&row_hi)[2]) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; nt++)
        scale_mask_max(s + 4 * nt, scale_log2, need_mask, j0 + nt * 8 + 2 * t4, row_lo, row_hi, mx);
    float base[2];
    online_max_step(mx, m, base, alpha);
#pragma unroll
    for (int i = 0; i < kBlockN / 2; i++) s[i] = exp2_ftz(s[i] - base[(i >> 1) & 1]);
}

// What one CTA computes (request blockIdx.z, kv head blockIdx.y, packed rows row0 .. row0 +
// kBlockM - 1), the same in both kernels.
struct CtaWork {
    int32_t row0;  // first packed row
    int32_t q_begin, q_len;
    int64_t pos0;
    int32_t kv_len;
    // Keys any row of the CTA sees: [lo, hi); a tile inside [lo_last, hi_first) is visible to
    // every row (attention.cu).
    int32_t lo, hi_first, lo_last, hi;
    int32_t n_tiles;
    const uint16_t *k_base, *v_base;  // key and value row 0 of this request and kv head

    // false: the whole CTA lies past its request's queries
    template <int D, int kBlockN>
    __device__ __forceinline__ bool init(const Sm90Params &p) {
        const int req = blockIdx.z, kv_head = blockIdx.y;
        row0 = (int32_t)(gridDim.x - 1 - blockIdx.x) * kBlockM;  // heaviest causal tiles first
        q_begin = p.cu_q[req];
        q_len = p.cu_q[req + 1] - q_begin;
        if (row0 >= q_len * p.group) return false;
        const int32_t kv_begin = p.cu_kv[req];
        kv_len = p.kv_len ? p.kv_len[req] : p.cu_kv[req + 1] - kv_begin;
        pos0 = p.q_pos0 ? p.q_pos0[req] : 0;
        const int32_t i_first = row0 / p.group;
        const int32_t i_last = min((row0 + kBlockM - 1) / p.group, q_len - 1);
        visible_keys(p.causal, p.window, pos0 + i_first, kv_len, &lo, &hi_first);
        visible_keys(p.causal, p.window, pos0 + i_last, kv_len, &lo_last, &hi);
        n_tiles = hi > lo ? (hi - lo + kBlockN - 1) / kBlockN : 0;
        k_base = p.k + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
        v_base = p.v + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
        return true;
    }
    // whether warpgroup w's 64 rows hold a real query (warpgroup-uniform)
    __device__ __forceinline__ bool wg_active(int w, int32_t group) const {
        return (row0 + w * 64) / group < q_len;
    }
};

// Copies the CTA's kBlockM rows of Q into shared memory at q_addr, rows past the request's
// queries zero-filled; thread tid of kCopiers does its share.
template <int D, int kCopiers>
__device__ __forceinline__ void load_q_tile(const Sm90Params &p, const CtaWork &w, uint32_t q_addr,
                                            int tid) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int c = tid; c < kBlockM * kChunks; c += kCopiers) {
        int r, cc;
        copy_order<kChunks>(c, &r, &cc);
        const int32_t prow = w.row0 + r;
        const int32_t i = prow / p.group;
        const bool ok = i < w.q_len;
        const uint16_t *src =
            ok ? p.q + (int64_t)(w.q_begin + i) * p.q_stride +
                     (int64_t)(blockIdx.y * p.group + prow % p.group) * D + cc * 8
               : p.q;
        cp_async_16(q_addr + tile_offset(r, cc, kBlockM), src, ok);
    }
}

// Copies tile t of K or V (base: CtaWork's k_base or v_base) into the buffer at dst; rows past
// the visible keys are zero-filled, never read. Thread tid of kCopiers does its share.
template <int D, int kBlockN, int kCopiers>
__device__ __forceinline__ void load_kv_tile(const Sm90Params &p, const CtaWork &w, uint32_t dst,
                                             const uint16_t *base, int32_t t, int tid) {
    constexpr int kChunks = D / 8;
    const int32_t j0 = w.lo + t * kBlockN;
#pragma unroll
    for (int c = tid; c < kBlockN * kChunks; c += kCopiers) {
        int r, cc;
        copy_order<kChunks>(c, &r, &cc);
        const int32_t j = j0 + r;
        const bool ok = j < w.hi;
        const uint16_t *src = ok ? base + (int64_t)j * p.kv_stride + cc * 8 : base;
        cp_async_16(dst + tile_offset(r, cc, kBlockN), src, ok);
    }
}

// One multiplying warpgroup's 64 rows (a consumer, in the warp-specialized kernel): the running
// softmax state, the accumulators, and the two products on them. This thread holds rows g and
// g + 8 of its warp's 16 and columns 2 t4, +1 of every 8-column accumulator block; per-row
// state is indexed [h]. kPSets sets of P's bf16 registers: with two, P(t) is rounded into one
// while P(t-1) V(t-1) still reads the other (the warp-specialized kernel).
template <int D, int kBlockN, int kPSets = 1>
struct WgTile {
    // Descriptors (tile_offset's placement): Q rows of this warpgroup; K as B, K-major; V as B,
    // MN-major: keys are K (core matrices 128 bytes apart), head dims are N (kBlockN * 16
    // bytes apart).
    static constexpr uint32_t kQLbo = kBlockM * 16, kKvLbo = kBlockN * 16;

    float s[kBlockN / 2];          // S(t), then P(t) unrounded
    // O's accumulators, all D columns of one product: column block j (8 columns), element e
    // at o[4 j + e]. (One m64nDk16 per 16 keys, not an n64 and an n(D - 64) reading the same
    // P registers: with two, ptxas could not keep P V running into the next round at head
    // dim 128 (kOverlapPv) without serializing it.)
    float o[D / 2];
    uint32_t pf[kPSets][kBlockN / 16][4];  // P rounded to bf16, as A fragments, per 16 keys
    float m[2], l[2];
    float o_scale[2];              // what O must be scaled by before the next P V is added
    int32_t row_lo[2], row_hi[2];  // the keys row h sees
    int t4;

    // warp_row0: the first packed row of this thread's warp
    __device__ __forceinline__ void init(const Sm90Params &p, const CtaWork &w, int32_t warp_row0,
                                         int lane) {
        const int g = lane / 4;
        t4 = lane % 4;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int32_t i = (warp_row0 + g + 8 * h) / p.group;
            if (i < w.q_len) {
                visible_keys(p.causal, p.window, w.pos0 + i, w.kv_len, &row_lo[h], &row_hi[h]);
            } else {
                row_lo[h] = row_hi[h] = 0;  // padding row: sees nothing, written nowhere
            }
            m[h] = -INFINITY;
            l[h] = 0.0f;
            o_scale[h] = 1.0f;
        }
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] = 0.0f;
#pragma unroll
        for (int b = 0; b < kPSets; b++) {
#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; kc++) {
                pf[b][kc][0] = pf[b][kc][1] = pf[b][kc][2] = pf[b][kc][3] = 0;
            }
        }
    }

    // Every register a wgmma reads or writes, pinned (ptx_sm90.cuh's reg_fence) before each
    // wgmma_fence and after each wgmma_wait; pin_pv: those of P V only, while S is in flight.
    __device__ __forceinline__ void pin() {
        reg_fence(s);
        pin_pv();
    }
    __device__ __forceinline__ void pin_pv() {
        reg_fence(o);
#pragma unroll
        for (int b = 0; b < kPSets; b++) {
#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; kc++) reg_fence(pf[b][kc]);
        }
    }

    // S = Q K^T (q_wg: this warpgroup's rows of Q; k_t: the tile of K), one commit group
    __device__ __forceinline__ void issue_qk(uint32_t q_wg, uint32_t k_t) {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wgmma_ss<kBlockN>(s, wgmma_desc(q_wg + kk * 2 * kQLbo, kQLbo, 128),
                              wgmma_desc(k_t + kk * 2 * kKvLbo, kKvLbo, 128), kk > 0);
        }
        wgmma_commit();
    }
    // O = O alpha + P V (v_t: the tile of V; P: set b of pf; alpha: o_scale), one commit group.
    // The rescale comes first, with its own fence: issued right after S, it runs while S is in
    // flight.
    template <int b = 0>
    __device__ __forceinline__ void issue_pv(uint32_t v_t) {
        rescale_o();
        pin_pv();
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; kc++) {
            const uint32_t v_kc = v_t + tile_offset(16 * kc, 0, kBlockN);
            wgmma_rs_bt<D>(o, pf[b % kPSets][kc], wgmma_desc(v_kc, 128, kKvLbo), 1);
        }
        wgmma_commit();
    }

    // The online softmax of tile t, once S(t) has landed: P(t) unrounded in s, l scaled by
    // alpha, and alpha kept in o_scale for rescale_o.
    __device__ __forceinline__ void softmax(const Sm90Params &p, const CtaWork &w, int32_t t) {
        // a tile needs the mask only where some row of the CTA loses part of it
        const int32_t j0 = w.lo + t * kBlockN;
        const bool need_mask = j0 < w.lo_last || j0 + kBlockN > w.hi_first;
        softmax_tile<kBlockN>(s, m, o_scale, p.scale_log2, need_mask, j0, t4, row_lo, row_hi);
        l[0] *= o_scale[0];
        l[1] *= o_scale[1];
    }

    // O scaled by the last softmax's alpha, right before the P V that adds to it is issued
    // (FlashAttention-3's place for it): where P V runs on into the next round (the
    // warp-specialized kernel's kOverlapPv), the only time no product writes O.
    __device__ __forceinline__ void rescale_o() {
#pragma unroll
        for (int h = 0; h < 2; h++) {
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                o[4 * j + 2 * h] *= o_scale[h];
                o[4 * j + 2 * h + 1] *= o_scale[h];
            }
        }
    }

    // Once the product that last read set b of pf has landed: P(t) rounded to bf16 into it, l
    // summing the rounded values (attention.cu).
    template <int b = 0>
    __device__ __forceinline__ void round_p() {
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; kc++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const float *sv = s + 4 * (2 * kc + half);
                const uint32_t top = pack_bf16x2(sv[0], sv[1]);
                const uint32_t bot = pack_bf16x2(sv[2], sv[3]);
                pf[b % kPSets][kc][2 * half] = top;      // row g,     keys 16kc + 8half + 2t, +1
                pf[b % kPSets][kc][2 * half + 1] = bot;  // row g + 8, same keys
                l[0] += sum_bf16x2(top);
                l[1] += sum_bf16x2(bot);
            }
        }
    }

    // The epilogue, once the last product has landed: normalise, stage the warp's 16 rows
    // (warp_m: which 16 of the CTA's kBlockM) in its own rows of sQ, which no pending product
    // reads any more, then store whole 16-byte chunks of the rows that are real queries.
    __device__ __forceinline__ void store(const Sm90Params &p, const CtaWork &w,
                                          unsigned char *sQ, int warp_m, int lane) {
        constexpr int kChunks = D / 8;
        const int g = lane / 4, kv_head = blockIdx.y;
        const int32_t warp_row0 = w.row0 + warp_m * 16;
        float inv[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float sum = l[h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            inv[h] = sum > 0.0f ? 1.0f / sum : 0.0f;  // 0: no visible key, zeros
            const int32_t prow = warp_row0 + g + 8 * h;
            const int32_t i = prow / p.group;
            if (p.lse && t4 == 0 && i < w.q_len) {
                // the sum of the rounded P the output was divided by (attention.cu)
                p.lse[(int64_t)(w.q_begin + i) * p.n_heads + kv_head * p.group + prow % p.group] =
                    sum > 0.0f ? (m[h] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
            }
        }
        const int r_warp = warp_m * 16;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                *reinterpret_cast<uint32_t *>(sQ + tile_offset(r_warp + g + 8 * h, j, kBlockM) +
                                              4 * t4) =
                    pack_bf16x2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
            }
        }
        __syncwarp();
#pragma unroll
        for (int it = 0; it < 16 * kChunks / 32; it++) {
            int r, cc;
            copy_order<kChunks>(lane + it * 32, &r, &cc);
            r += r_warp;
            const int32_t prow = w.row0 + r;
            const int32_t i = prow / p.group;
            if (i < w.q_len) {
                uint16_t *dst = p.out + (int64_t)(w.q_begin + i) * p.out_stride +
                                (int64_t)(kv_head * p.group + prow % p.group) * D + cc * 8;
                *reinterpret_cast<uint4 *>(dst) =
                    *reinterpret_cast<const uint4 *>(sQ + tile_offset(r, cc, kBlockM));
            }
        }
    }
};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// The pipelined kernel: two warpgroups that each copy, multiply and run the softmax.
// Grid: x = packed-row tiles (heaviest causal tiles first), y = kv head, z = request.
template <int D, int kBlockN>
__global__ void __launch_bounds__(kThreads) attention_sm90_kernel(const Sm90Params p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char *sQ = smem_raw;  // [kBlockM x D], later: output
    const Tiles<D, kBlockN> tiles{smem_u32(sQ)};

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wg = warp / 4;
    CtaWork w = {};
    if (!w.init<D, kBlockN>(p)) return;  // whole CTA
    const int32_t n_tiles = w.n_tiles;

    // Copy groups: {Q, K(0)}, then {V(0), K(1)}; iteration t >= 1 issues {V(t), K(t + 1)}.
    load_q_tile<D, kThreads>(p, w, tiles.q, tid);
    if (n_tiles > 0) load_kv_tile<D, kBlockN, kThreads>(p, w, tiles.k(0), w.k_base, 0, tid);
    cp_async_commit();
    if (n_tiles > 0) load_kv_tile<D, kBlockN, kThreads>(p, w, tiles.v(0), w.v_base, 0, tid);
    if (n_tiles > 1) load_kv_tile<D, kBlockN, kThreads>(p, w, tiles.k(1), w.k_base, 1, tid);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K(0) have landed
    fence_proxy_async();
    __syncthreads();

    const bool wg_active = w.wg_active(wg, p.group);
    WgTile<D, kBlockN> st;
    st.init(p, w, w.row0 + warp * 16, lane);
    const uint32_t q_wg = tiles.q + tile_offset(wg * 64, 0, kBlockM);

    if (wg_active && n_tiles > 0) {
        st.pin();
        wgmma_fence();
        st.issue_qk(q_wg, tiles.k(0));
        wgmma_wait<0>();
        st.pin();
        st.softmax(p, w, 0);
        st.round_p();
    }
    for (int32_t t = 1; t < n_tiles; t++) {
        // K(t) and V(t-1) have landed, and both warpgroups are done with iteration t-1, whose
        // products read K(t-1) and V(t-2): their buffers take K(t+1) and V(t).
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        load_kv_tile<D, kBlockN, kThreads>(p, w, tiles.v(t), w.v_base, t, tid);
        if (t + 1 < n_tiles) {
            load_kv_tile<D, kBlockN, kThreads>(p, w, tiles.k(t + 1), w.k_base, t + 1, tid);
        }
        cp_async_commit();

        if (wg_active) {
            st.pin();
            wgmma_fence();  // s and pf were written by this thread since the last products
            st.issue_qk(q_wg, tiles.k(t));
            st.issue_pv(tiles.v(t - 1));
            wgmma_wait<1>();  // S(t) has landed; P(t-1) V(t-1) may still be running
            reg_fence(st.s);  // (o and pf stay untouched until the next wait)
            st.softmax(p, w, t);
            // (The SASS of ptxas 13.0 has this wait among the row maxima's shuffles, before
            // the exponentials, so within a warpgroup only the masking and the maxima overlap
            // P V; the exponentials overlap the other warpgroup's products. The
            // warp-specialized kernel avoids it by waiting for P V a round later (kOverlapPv),
            // which this kernel's buffers do not allow: V(t) is copied over V(t-2) right after
            // the __syncthreads above.)
            wgmma_wait<0>();
            st.pin();
            st.round_p();
        }
    }
    cp_async_wait<0>();  // V(last) has landed (and nothing is still landing when the CTA exits)
    fence_proxy_async();
    __syncthreads();
    if (!wg_active) return;  // no barrier follows: the rest is per warpgroup and per warp
    if (n_tiles > 0) {
        st.issue_pv(tiles.v(n_tiles - 1));
        wgmma_wait<0>();
        st.pin();
    }
    // every product that read Q was waited for before the last barrier
    st.store(p, w, sQ, warp, lane);
}

// The warp-specialized kernel: a producer warpgroup copies, two consumer warpgroups multiply.
constexpr int kWsThreads = 3 * 128;
// Registers per thread after the hand-over (setmaxnreg): launched at kWsLaunchRegs = 168
// (65536 / 384, in steps of 8; __launch_bounds__(kWsThreads, 1) lets ptxas use them all), the
// producer gives up 128 x 128, which lets the consumers grow by 64 each. The increase can only
// take registers the launch reserved: were ptxas to allocate fewer than 168, the consumers'
// setmaxnreg would wait forever, so tests/check_ptxas.sh requires exactly 168.
constexpr int kWsLaunchRegs = 168;
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kWsLaunchRegs * kWsThreads <= 65536, "the SM's register file");
static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= kWsLaunchRegs * kWsThreads,
              "the hand-over moves registers the launch reserved, no more");
// Named barriers (0 is __syncthreads'): kBarTurn + c, consumer c's turn to issue its products
// (both consumers, 256 threads); kBarRows + c, consumer c's four warps (128).
constexpr int kBarTurn = 1, kBarRows = 3;

// Grid as attention_sm90_kernel's; block: warpgroup 0 the producer, 1 and 2 the consumers
// (consumer c = rows 64 c .. 64 c + 63).
//   producer: Q, then for each tile t, once both consumers have freed stage t % kStages (tile
//     t - kStages): K(t), then V(t), each announced by its own mbarrier when it lands
//     (cp.async's mbarrier arrival), so that S(t) need not wait for V(t);
//   consumers: the pipelined kernel's loop (issue S(t) and P(t-1) V(t-1), softmax of t beside
//     the second product; where the registers allow, kOverlapPv, that product runs on into
//     the next round), waiting on the mbarriers instead of __syncthreads and freeing K(t) as
//     soon as S(t) has landed, V(t-1) once P V has; and taking turns to issue (ping-pong,
//     FlashAttention-3): a consumer issues a round's products only once the other has issued
//     its own, so one's softmax runs while the other's products occupy the tensor cores.
template <int D, int kBlockN>
__global__ void __launch_bounds__(kWsThreads, 1) attention_sm90_ws_kernel(const Sm90Params p) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char *sQ = smem_raw;  // [kBlockM x D], later: output
    const Tiles<D, kBlockN> tiles{smem_u32(sQ)};
    // the mbarriers (Tiles::bar): Q landed; per buffer s, K landed, V landed, K free, V free
    const uint32_t q_full = tiles.bar(0);
    auto k_full = [&](int s) { return tiles.bar(1 + s); };
    auto v_full = [&](int s) { return tiles.bar(1 + kStages + s); };
    auto k_empty = [&](int s) { return tiles.bar(1 + 2 * kStages + s); };
    auto v_empty = [&](int s) { return tiles.bar(1 + 3 * kStages + s); };

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wg = warp / 4;
    CtaWork w = {};
    if (!w.init<D, kBlockN>(p)) return;  // whole CTA
    const int32_t n_tiles = w.n_tiles;
    // consumer 1 only where its rows hold real queries (consumer 0's always do)
    const int n_consumers = 1 + w.wg_active(1, p.group);
    if (tid == 0) {
        mbar_init(q_full, 128);
#pragma unroll
        for (int s = 0; s < kStages; s++) {
            mbar_init(k_full(s), 128);  // each producer thread's arrival when its copies land
            mbar_init(v_full(s), 128);
            mbar_init(k_empty(s), 128 * n_consumers);  // each consumer thread's
            mbar_init(v_empty(s), 128 * n_consumers);
        }
    }
    __syncthreads();  // the mbarriers are initialised; no block-wide barrier follows

    if (wg == 0) {
        setmaxnreg_dec<kProducerRegs>();
        load_q_tile<D, 128>(p, w, tiles.q, tid);
        cp_async_mbar_arrive(q_full);
        // K(t + 1) before V(t): the consumers free V(t - 2), whose buffer V(t) takes, only in
        // round t where P V runs on into the next round (kOverlapPv), and K(t - 1) earlier
        // (free_parity passes at once on a buffer's first use)
        auto free_parity = [](int32_t t) { return (uint32_t)((t / kStages) & 1) ^ 1u; };
        auto load_k = [&](int32_t t) {
            mbar_wait(k_empty(t % kStages), free_parity(t));
            load_kv_tile<D, kBlockN, 128>(p, w, tiles.k(t), w.k_base, t, tid);
            cp_async_mbar_arrive(k_full(t % kStages));
        };
        if (n_tiles > 0) load_k(0);
        for (int32_t t = 0; t < n_tiles; t++) {
            if (t + 1 < n_tiles) load_k(t + 1);
            mbar_wait(v_empty(t % kStages), free_parity(t));
            load_kv_tile<D, kBlockN, 128>(p, w, tiles.v(t), w.v_base, t, tid);
            cp_async_mbar_arrive(v_full(t % kStages));
        }
        cp_async_commit();
        cp_async_wait<0>();  // nothing is still landing when this thread exits
        return;
    }

    setmaxnreg_inc<kConsumerRegs>();
    const int c = wg - 1;
    if (!w.wg_active(c, p.group)) return;  // consumer 1 past the queries: nothing to do
    const bool pingpong = n_consumers == 2;
    const int warp_m = warp - 4;  // the warp's 16 rows among the CTA's kBlockM
    // Whether P(t-1) V(t-1) runs on into round t + 1 (see the rounds): where the registers
    // allow it, without spills or serialized wgmma (tests/check_ptxas.sh), i.e. where o, the P
    // that product reads, S(t) and P(t) fit at once. Found with ptxas 13.0, tile by tile:
    //   64-key tiles: every head dim;  96: head dims 64, 80 and 128;  128: head dims 64, 80.
    // (Otherwise ptxas serializes the products (C7512), at 96 keys even for head dim 96, or,
    // at 128 keys and head dim 128, spills.)
    constexpr bool kOverlapPv = kBlockN == 64 || D <= 80 || (kBlockN == 96 && D == 128);
    WgTile<D, kBlockN, kOverlapPv ? 2 : 1> st;  // P(t) in set t % 2 (of 2)
    st.init(p, w, w.row0 + warp_m * 16, lane);
    const uint32_t q_wg = tiles.q + tile_offset(c * 64, 0, kBlockM);

    // The turn to issue products (ping-pong): taken before issuing, handed to the other
    // consumer after. Consumer 1 hands it over first, and not after its last round, so that
    // every sync of one is matched by an arrival of the other: each issues n_tiles + 1 rounds.
    auto take_turn = [&]() {
        if (pingpong) named_bar_sync(kBarTurn + c, 256);
    };
    auto hand_over = [&]() {
        if (pingpong) named_bar_arrive(kBarTurn + 1 - c, 256);
    };
    mbar_wait(q_full, 0);
    if (pingpong && c == 1) hand_over();

    // Round 0: S(0), its softmax, P(0) rounded into set 0. Rounds are unrolled so that each
    // issues its products unconditionally: ptxas serializes a wgmma on a path it sees as
    // divergent (its notes C7518 / C7520), and where two paths meet with different products
    // running.
    if (n_tiles > 0) {
        mbar_wait(k_full(0), 0);
        // The copies' bytes, seen through the mbarrier, for wgmma's reads. The fence is on the
        // reading side: the producer's cp.async writes land asynchronously, so it has nothing
        // to fence when it arrives. (Should a GPU show stale K or V in this kernel alone, the
        // other order is: cp.async.wait_group, fence.proxy.async, then a plain arrive.)
        fence_proxy_async();
        take_turn();
        st.pin();
        wgmma_fence();
        st.issue_qk(q_wg, tiles.k(0));
        hand_over();
        wgmma_wait<0>();
        st.pin();
        mbar_arrive(k_empty(0));  // K(0) is read
        st.softmax(p, w, 0);
        st.template round_p<0>();
    }
    // Round t >= 1: S(t) and P(t-1) V(t-1) (from set 1 - b), then S(t)'s softmax and P(t)
    // rounded into set b while P(t-1) V(t-1) runs. kOverlapPv: P(t-1) V(t-1) is waited for
    // only in round t + 1, after S(t + 1) is issued. Waited for at the end of round t instead,
    // ptxas 13.0 hoists that wait above the exponentials (its SASS; moving the rescale of O
    // or the set P is rounded into does not change it), and a consumer's softmax then
    // overlaps only the other consumer's products. (set: a std::integral_constant, so that b
    // indexes pf at compile time.)
    auto steady_round = [&](int32_t t, auto set) {
        constexpr int b = decltype(set)::value;
        const int sk = t % kStages, sv = (t - 1) % kStages;
        mbar_wait(k_full(sk), (t / kStages) & 1);
        mbar_wait(v_full(sv), ((t - 1) / kStages) & 1);
        fence_proxy_async();
        take_turn();
        reg_fence(st.s);  // (with kOverlapPv, P(t-2) V(t-2) may still be running on o and pf)
        wgmma_fence();
        st.issue_qk(q_wg, tiles.k(t));
        if constexpr (kOverlapPv) {
            wgmma_wait<1>();  // P(t-2) V(t-2) has landed; S(t) may still be running
            st.pin_pv();
            if (t >= 2) mbar_arrive(v_empty((t - 2) % kStages));  // V(t-2) is read
        }
        st.template issue_pv<1 - b>(tiles.v(t - 1));
        hand_over();
        wgmma_wait<1>();  // S(t) has landed; P(t-1) V(t-1) may still be running
        reg_fence(st.s);
        mbar_arrive(k_empty(sk));  // K(t) is read
        st.softmax(p, w, t);
        if constexpr (!kOverlapPv) {  // one set of P: P(t-1) V(t-1) must land before round_p
            wgmma_wait<0>();
            st.pin();
            mbar_arrive(v_empty(sv));  // V(t-1) is read
        }
        st.template round_p<b>();
    };
    // Round n_tiles: P(last) V(last), from set b. Consumer 0 hands the turn over before
    // issuing: after, it would sit on a path ptxas sees as divergent between the product and
    // its wait (C7518); the two last products may then overlap. (With kOverlapPv the last two
    // tiles of V are not freed: no copy waits for them.)
    auto last_round = [&](auto set) {
        constexpr int b = decltype(set)::value;
        const int s_last = (n_tiles - 1) % kStages;
        mbar_wait(v_full(s_last), ((n_tiles - 1) / kStages) & 1);
        fence_proxy_async();
        take_turn();
        if (c == 0) hand_over();
        wgmma_wait<0>();  // P(last - 1) V(last - 1) has landed (kOverlapPv)
        st.pin_pv();
        st.template issue_pv<b>(tiles.v(n_tiles - 1));
        wgmma_wait<0>();
        st.pin();
    };
    using Set0 = std::integral_constant<int, 0>;
    using Set1 = std::integral_constant<int, 1>;
    if (n_tiles == 0) {
        take_turn();  // the n_tiles + 1 = 1 turn, nothing to multiply
        if (c == 0) hand_over();
    }
    if constexpr (kOverlapPv) {
        // Rounds in pairs from t = 2, so that every pair starts with P(t-2) V(t-2) of set 0
        // running, and each path ends with its own last round.
        if (n_tiles == 1) {
            last_round(Set0{});
        } else if (n_tiles > 1) {
            steady_round(1, Set1{});
            int32_t t = 2;
            for (; t + 1 < n_tiles; t += 2) {
                steady_round(t, Set0{});
                steady_round(t + 1, Set1{});
            }
            if (t < n_tiles) {
                steady_round(t, Set0{});
                last_round(Set0{});
            } else {
                last_round(Set1{});
            }
        }
    } else {
        for (int32_t t = 1; t < n_tiles; t++) steady_round(t, Set0{});  // (one set of P)
        if (n_tiles > 0) last_round(Set0{});
    }
    // every product that read this warpgroup's rows of Q has landed, in all four warps
    named_bar_sync(kBarRows + c, 128);
    st.store(p, w, sQ, warp_m, lane);
}

// Test support, not used by the attention kernels (sf_cuda_wgmma_products_bf16): one warpgroup's
// two products alone, S = Q K^T and O = P V, through WgTile's own code (placement, descriptors,
// fences, issue_qk, round_p, issue_pv) and read out in the accumulator layouts the softmax and
// the epilogue assume. A test that feeds it structured operands learns how the tensor cores read
// each one, which the attention tests, mixing both products with the softmax, cannot say.
// 128 threads, one CTA; inputs row-major: q [64 x D], k and v [kBlockN x D], p [64 x kBlockN].
template <int D, int kBlockN>
__global__ void __launch_bounds__(128)
    wgmma_products_kernel(const uint16_t *__restrict__ q, const uint16_t *__restrict__ k,
                          const uint16_t *__restrict__ v, const uint16_t *__restrict__ p_in,
                          float *__restrict__ s_out, float *__restrict__ o_out) {
    constexpr int kChunks = D / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const Tiles<D, kBlockN> tiles{smem_u32(smem_raw)};
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // Q as warpgroup 0's rows of the CTA's Q tile, K and V as tile 0 of their buffers, each
    // 16-byte chunk where the kernels' copies put it
    for (int c = tid; c < kBlockM * kChunks; c += 128) {
        const int r = c / kChunks, cc = c % kChunks;
        uint4 x = make_uint4(0, 0, 0, 0);  // rows 64..127: warpgroup 1's, read by nothing
        if (r < 64) x = *reinterpret_cast<const uint4 *>(q + r * D + cc * 8);
        *reinterpret_cast<uint4 *>(smem_raw + tile_offset(r, cc, kBlockM)) = x;
    }
    for (int c = tid; c < kBlockN * kChunks; c += 128) {
        const int r = c / kChunks, cc = c % kChunks;
        const uint32_t off = tile_offset(r, cc, kBlockN);
        *reinterpret_cast<uint4 *>(smem_raw + (tiles.k(0) - tiles.q) + off) =
            *reinterpret_cast<const uint4 *>(k + r * D + cc * 8);
        *reinterpret_cast<uint4 *>(smem_raw + (tiles.v(0) - tiles.q) + off) =
            *reinterpret_cast<const uint4 *>(v + r * D + cc * 8);
    }
    fence_proxy_async();  // the stores, for wgmma's reads
    __syncthreads();

    // the state of 64 query rows that each see all kBlockN keys (init's masks stay unused)
    Sm90Params prm = {};
    prm.group = 1;
    CtaWork w = {};
    w.q_len = 64;
    w.kv_len = kBlockN;
    WgTile<D, kBlockN> st;
    st.init(prm, w, warp * 16, lane);
    const int g = lane / 4, t4 = lane % 4;
    const int row[2] = {warp * 16 + g, warp * 16 + g + 8};  // this thread's rows (index h)

    st.pin();
    wgmma_fence();
    st.issue_qk(tiles.q, tiles.k(0));
    wgmma_wait<0>();
    st.pin();
    // s[4 nt + e] is row row[e / 2], key 8 nt + 2 t4 + e % 2 (softmax_tile's reading); S goes
    // out, and P comes in through the same places to be rounded into pf by round_p
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int i = row[e / 2], j = 8 * nt + 2 * t4 + e % 2;
            s_out[i * kBlockN + j] = st.s[4 * nt + e];
            const uint32_t bits = (uint32_t)p_in[i * kBlockN + j] << 16;
            st.s[4 * nt + e] = __uint_as_float(bits);
        }
    }
    st.round_p();
    st.issue_pv(tiles.v(0));  // o_scale is 1 after init: O = 0 * 1 + P V
    wgmma_wait<0>();
    st.pin();
    // o[4 j + e] is row row[e / 2], column 8 j + 2 t4 + e % 2 (the epilogue's reading)
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) o_out[row[e / 2] * D + 8 * j + 2 * t4 + e % 2] = st.o[4 * j + e];
    }
}

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------

template <int D, int kBlockN, bool kWarpSpecialized>
sf_status launch_sm90(const Sm90Params &p, const sf_attention_args *a, cudaStream_t stream) {
    auto kernel = kWarpSpecialized ? attention_sm90_ws_kernel<D, kBlockN>
                                   : attention_sm90_kernel<D, kBlockN>;
    constexpr size_t smem = kWarpSpecialized ? Sm90Shape<D, kBlockN>::kWsSmemBytes
                                             : Sm90Shape<D, kBlockN>::kSmemBytes;
    constexpr int threads = kWarpSpecialized ? kWsThreads : kThreads;
    if (smem > 48 * 1024) {
        SF_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem));
    }
    const int64_t tiles = sf_ceil_div((int64_t)a->max_q_len * p.group, kBlockM);
    const dim3 grid((unsigned)tiles, (unsigned)a->n_kv_heads, (unsigned)a->n_requests);
    kernel<<<grid, threads, smem, stream>>>(p);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

// f(D, kBlockN) with head dim and tile width as std::integral_constant, for the runtime values
// (checked by the caller: head dims 64, 80, 96, 128; widths 64, 96, 128).
template <typename F>
sf_status with_shape(int32_t head_dim, int32_t block_n, F &&f) {
    auto widths = [&](auto d) {
        switch (block_n) {
            case 64: return f(d, std::integral_constant<int, 64>{});
            case 96: return f(d, std::integral_constant<int, 96>{});
            default: return f(d, std::integral_constant<int, 128>{});
        }
    };
    switch (head_dim) {
        case 64: return widths(std::integral_constant<int, 64>{});
        case 80: return widths(std::integral_constant<int, 80>{});
        case 96: return widths(std::integral_constant<int, 96>{});
        default: return widths(std::integral_constant<int, 128>{});
    }
}

// Both kernels' launcher: the checks, then the kernel for head dim, tile width and schedule.
sf_status sm90_attention(const sf_attention_args *a, int32_t block_n, bool warp_specialized,
                         const char *fn, cudaStream_t stream) {
    sf_status st = sf_attention_check_shapes(a, fn);
    if (st != SF_OK) return st;
    if (block_n == 0) block_n = kDefaultBlockN;
    st = check_block_n(block_n, fn);
    if (st != SF_OK) return st;
    st = sf_cuda_attention_sm90_check();
    if (st != SF_OK) return st;
    if (a->n_requests == 0 || a->max_q_len == 0) return SF_OK;  // nothing to compute
    st = sf_attention_check_tensors(a, fn);
    if (st != SF_OK) return st;

    sf_nvtx_range range(fn);
    Sm90Params p;
    p.out = a->out;
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.cu_q = a->cu_q;
    p.cu_kv = a->cu_kv;
    p.kv_len = a->kv_len;
    p.q_pos0 = a->q_pos0;
    p.lse = a->lse;
    p.q_stride = a->q_stride;
    p.kv_stride = a->kv_stride;
    p.out_stride = a->out_stride;
    p.group = a->n_heads / a->n_kv_heads;
    p.n_heads = a->n_heads;
    p.window = a->window;
    p.scale_log2 = a->scale * 1.4426950408889634f;
    p.causal = a->causal;
    return with_shape(a->head_dim, block_n, [&](auto d, auto n) {
        constexpr int D = decltype(d)::value, kBlockN = decltype(n)::value;
        return warp_specialized ? launch_sm90<D, kBlockN, true>(p, a, stream)
                                : launch_sm90<D, kBlockN, false>(p, a, stream);
    });
}

template <int D, int kBlockN>
sf_status launch_products(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                          const uint16_t *p, float *s, float *o, cudaStream_t stream) {
    auto kernel = wgmma_products_kernel<D, kBlockN>;
    constexpr size_t smem = Sm90Shape<D, kBlockN>::kSmemBytes;
    SF_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<1, 128, smem, stream>>>(q, k, v, p, s, o);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

}  // namespace

extern "C" sf_status sf_cuda_attention_sm90_check(void) {
    // wgmma exists on compute capability 9.0 only (this file is built for sm_90a). Every launch
    // asks, so each device's answer is kept: 10 * major + minor + 1, 0 while unknown.
    static std::atomic<int> known[64];
    int dev = 0, major = 0, minor = 0;
    SF_CUDA_TRY(cudaGetDevice(&dev));
    const int cached = dev >= 0 && dev < 64 ? known[dev].load(std::memory_order_relaxed) : 0;
    if (cached > 0) {
        major = (cached - 1) / 10;
        minor = (cached - 1) % 10;
    } else {
        SF_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
        SF_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
        if (dev >= 0 && dev < 64 && minor >= 0 && minor < 10) {
            known[dev].store(10 * major + minor + 1, std::memory_order_relaxed);
        }
    }
    if (major != 9 || minor != 0) {
        return sf_fail(SF_ERR_UNSUPPORTED, "sf_cuda_attention_sm90_bf16: needs a compute "
                       "capability 9.0 device (sm_90a), device %d is %d.%d", dev, major, minor);
    }
    return SF_OK;
}

extern "C" sf_status sf_cuda_attention_sm90_tiles_bf16(const sf_attention_args *a,
                                                       int32_t block_n, cudaStream_t stream) {
    return sm90_attention(a, block_n, false, "sf_cuda_attention_sm90_bf16", stream);
}

extern "C" sf_status sf_cuda_attention_sm90_bf16(const sf_attention_args *a,
                                                 cudaStream_t stream) {
    return sm90_attention(a, 0, false, "sf_cuda_attention_sm90_bf16", stream);
}

extern "C" sf_status sf_cuda_attention_sm90_ws_bf16(const sf_attention_args *a, int32_t block_n,
                                                    cudaStream_t stream) {
    return sm90_attention(a, block_n, true, "sf_cuda_attention_sm90_ws_bf16", stream);
}

// sf_cuda_wgmma_products_bf16's kernel, its arguments checked
static sf_status wgmma_products(int32_t head_dim, int32_t block_n, const uint16_t *q,
                                const uint16_t *k, const uint16_t *v, const uint16_t *p, float *s,
                                float *o, cudaStream_t stream) {
    sf_status st = sf_cuda_attention_sm90_check();
    if (st != SF_OK) return st;
    sf_nvtx_range range("sf_cuda_wgmma_products_bf16");
    return with_shape(head_dim, block_n, [&](auto d, auto n) {
        return launch_products<decltype(d)::value, decltype(n)::value>(q, k, v, p, s, o, stream);
    });
}

#else  // built without sm_90 among the architectures

extern "C" sf_status sf_cuda_attention_sm90_check(void) {
    return sf_fail(SF_ERR_UNSUPPORTED, "sf_cuda_attention_sm90_bf16: this build has no sm_90a "
                   "code (CMAKE_CUDA_ARCHITECTURES without 90)");
}

extern "C" sf_status sf_cuda_attention_sm90_tiles_bf16(const sf_attention_args *a,
                                                       int32_t block_n, cudaStream_t stream) {
    (void)a;
    (void)block_n;
    (void)stream;
    return sf_cuda_attention_sm90_check();
}

extern "C" sf_status sf_cuda_attention_sm90_bf16(const sf_attention_args *a,
                                                 cudaStream_t stream) {
    return sf_cuda_attention_sm90_tiles_bf16(a, 0, stream);
}

extern "C" sf_status sf_cuda_attention_sm90_ws_bf16(const sf_attention_args *a, int32_t block_n,
                                                    cudaStream_t stream) {
    return sf_cuda_attention_sm90_tiles_bf16(a, block_n, stream);
}

static sf_status wgmma_products(int32_t, int32_t, const uint16_t *, const uint16_t *,
                                const uint16_t *, const uint16_t *, float *, float *,
                                cudaStream_t) {
    return sf_cuda_attention_sm90_check();
}

#endif

extern "C" sf_status sf_cuda_wgmma_products_bf16(int32_t head_dim, int32_t block_n,
                                                 const uint16_t *q, const uint16_t *k,
                                                 const uint16_t *v, const uint16_t *p, float *s,
                                                 float *o, cudaStream_t stream) {
    static const char fn[] = "sf_cuda_wgmma_products_bf16";
    if (head_dim != 64 && head_dim != 80 && head_dim != 96 && head_dim != 128) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: head_dim = %d (64, 80, 96 or 128)", fn,
                       (int)head_dim);
    }
    sf_status st = check_block_n(block_n, fn);
    if (st != SF_OK) return st;
    if (!q || !k || !v || !p || !s || !o) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL pointer", fn);
    }
    if ((uintptr_t)q % 16 || (uintptr_t)k % 16 || (uintptr_t)v % 16) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: q, k and v must be 16-byte aligned", fn);
    }
    return wgmma_products(head_dim, block_n, q, k, v, p, s, o, stream);
}
