// Fused scaled-dot-product attention on bf16 for Hopper (sm_90a): the forward of attention.cu
// (same arguments, masks, packing and results up to rounding) with its two products on wgmma,
// the warpgroup-wide tensor-core instruction that reads its operands from shared memory.
// CPU twin: host/cpu/attention.c. NOT YET RUN ON A GPU: sf_cuda_attention_bf16 runs it only
// when asked (args.kernel = SF_ATTENTION_WGMMA, which the engine passes for its option
// attention); tests and bench_attention also call sf_cuda_attention_sm90_bf16 directly.
//
// One CTA owns one (request, kv head, tile of kBlockM = 128 packed rows), as in attention.cu
// (packed row p = query p / group of query head kv_head * group + p % group). Two warpgroups of
// four warps; warpgroup w owns rows 64 w .. 64 w + 63, warp v of it rows 16 v .. 16 v + 15 of
// those, so each thread holds the same two rows (g, g + 8) as in attention.cu. Per tile of
// kBlockN = 128 keys (or 64: sf_cuda_attention_sm90_tiles_bf16) each warpgroup computes
//   S = Q K^T     wgmma m64nKk16 (K = kBlockN), A = Q and B = K from shared memory (D / 16 of
//                 them);
//   the mask and online softmax in registers (attention_mma.cuh's, as attention.cu), P rounded
//                 to bf16;
//   O = O alpha + P V   wgmma m64nNk16 with A = P straight from the S accumulators (their
//                 layout is the A fragment layout) and B = V from shared memory, transposed;
// and the epilogue divides by l.
//
// The pipeline (predicted, not yet measured, to keep the tensor cores busy where the first
// version waited):
//   - each iteration issues S(t) = Q K(t)^T and then O += P(t-1) V(t-1), waits for S(t) only,
//     runs the softmax of tile t, and rescales O once the second product has landed
//     (FlashAttention-3's intra-warpgroup overlap; how much of the softmax ptxas leaves before
//     that second wait: see the loop), while the other warpgroup's products keep the tensor
//     cores busy;
//   - K and V are double-buffered: the copies of K(t+1) and V(t) are issued at the start of
//     iteration t, into the buffers iteration t-1 finished reading, and land during its
//     products; one barrier per tile;
//   - copies into shared memory go 8 rows of one 16-byte column at a time, i.e. one whole
//     128-byte core matrix per 8 threads, so they are free of bank conflicts (row-major order
//     would put 8 threads' stores 1 KB apart, on the same banks).
// Tiles are stored as 8-row core matrices (wgmma_layout.cuh's tile_offset), the layout wgmma's
// descriptors describe, so no swizzle is involved.
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "attention.h"
#include "attention_mma.cuh"
#include "cuda_check.cuh"
#include "ptx_sm90.cuh"

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
// FlashAttention-3 for these head dims; which of 64 and 128 is faster here is for the first GPU
// run's bench_attention to say.
constexpr int kDefaultBlockN = 128;

// D: head dim; kBlockN: keys per tile (64 or 128, sf_cuda_attention_sm90_tiles_bf16's block_n).
template <int D, int kBlockN>
struct Sm90Shape {
    static constexpr int kChunks = D / 8;  // 16-byte chunks per head row
    // O's columns: one n64 wgmma, plus one of D - 64 (16, 32 or 64) when D > 64
    static constexpr int kN1 = D - 64;
    // Q, then two buffers each of K and V
    static constexpr size_t kSmemBytes = (size_t)(kBlockM + 4 * kBlockN) * D * sizeof(uint16_t);
    static_assert(D == 64 || D == 80 || D == 96 || D == 128, "unsupported head dim");
    static_assert(kBlockN == 64 || kBlockN == 128, "wgmma_ss has n64 and n128");
    static_assert((16 * kChunks) % 32 == 0, "the store loop gives every lane the same count");
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

// O's accumulators: columns 0..63 in o0, 64..D-1 in o1 (empty for D = 64); column block j
// (8 columns) of either, element e, through at().
template <int D>
struct OAcc {
    static constexpr int kN1 = D - 64;
    float o0[32];
    float o1[kN1 > 0 ? kN1 / 2 : 1];
    __device__ __forceinline__ float &at(int j, int e) {
        return j < 8 ? o0[4 * j + e] : o1[4 * (j - 8) + e];
    }
};

// ---------------------------------------------------------------------------------------------
// Kernel
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

// Grid: x = packed-row tiles (heaviest causal tiles first), y = kv head, z = request.
template <int D, int kBlockN>
__global__ void __launch_bounds__(kThreads) attention_sm90_kernel(const Sm90Params p) {
    using S = Sm90Shape<D, kBlockN>;
    constexpr int kChunks = S::kChunks;
    constexpr uint32_t kKvTileBytes = kBlockN * D * 2;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char *sQ = smem_raw;  // [kBlockM x D], later: output
    // [2][kBlockN x D] each; tile t of K and V in buffer t % 2
    const uint32_t q_addr = smem_u32(sQ), k_addr = q_addr + kBlockM * D * 2,
                   v_addr = k_addr + 2 * kKvTileBytes;

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int wg = warp / 4;
    const int req = blockIdx.z;
    const int kv_head = blockIdx.y;
    const int32_t row0 = (int32_t)(gridDim.x - 1 - blockIdx.x) * kBlockM;  // first packed row
    const int32_t group = p.group;

    const int32_t q_begin = p.cu_q[req];
    const int32_t q_len = p.cu_q[req + 1] - q_begin;
    if (row0 >= q_len * group) return;  // whole CTA: past this request's queries
    const int32_t kv_begin = p.cu_kv[req];
    const int32_t kv_len = p.kv_len ? p.kv_len[req] : p.cu_kv[req + 1] - kv_begin;
    const int64_t pos0 = p.q_pos0 ? p.q_pos0[req] : 0;

    // Keys any row of the CTA sees: [lo, hi); a tile inside [lo_last, hi_first) is visible to
    // every row (attention.cu).
    const int32_t i_first = row0 / group;
    const int32_t i_last = min((row0 + kBlockM - 1) / group, q_len - 1);
    int32_t lo, hi_first, lo_last, hi;
    visible_keys(p.causal, p.window, pos0 + i_first, kv_len, &lo, &hi_first);
    visible_keys(p.causal, p.window, pos0 + i_last, kv_len, &lo_last, &hi);
    const int32_t n_tiles = hi > lo ? (hi - lo + kBlockN - 1) / kBlockN : 0;

    const uint16_t *k_base = p.k + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    const uint16_t *v_base = p.v + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    // Copies tile t of K or V (base) into its buffer; rows past the visible range are
    // zero-filled, never read.
    auto load_kv_tile = [&](uint32_t buffers, const uint16_t *base, int32_t t) {
        const uint32_t dst = buffers + (t % 2) * kKvTileBytes;
        const int32_t j0 = lo + t * kBlockN;
#pragma unroll
        for (int c = tid; c < kBlockN * kChunks; c += kThreads) {
            int r, cc;
            copy_order<kChunks>(c, &r, &cc);
            const int32_t j = j0 + r;
            const bool ok = j < hi;
            const uint16_t *src = ok ? base + (int64_t)j * p.kv_stride + cc * 8 : base;
            cp_async_16(dst + tile_offset(r, cc, kBlockN), src, ok);
        }
    };

    // Copy groups: {Q, K(0)}, then {V(0), K(1)}; iteration t >= 1 issues {V(t), K(t + 1)}.
#pragma unroll
    for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
        int r, cc;
        copy_order<kChunks>(c, &r, &cc);
        const int32_t prow = row0 + r;
        const int32_t i = prow / group;
        const bool ok = i < q_len;
        const uint16_t *src =
            ok ? p.q + (int64_t)(q_begin + i) * p.q_stride +
                     (int64_t)(kv_head * group + prow % group) * D + cc * 8
               : p.q;
        cp_async_16(q_addr + tile_offset(r, cc, kBlockM), src, ok);
    }
    if (n_tiles > 0) load_kv_tile(k_addr, k_base, 0);
    cp_async_commit();
    if (n_tiles > 0) load_kv_tile(v_addr, v_base, 0);
    if (n_tiles > 1) load_kv_tile(k_addr, k_base, 1);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K(0) have landed
    fence_proxy_async();
    __syncthreads();

    // This thread's rows g and g + 8 of its warp's 16; it holds columns 2t, 2t+1 of every
    // 8-column accumulator block. Per-row state is indexed [h].
    const int g = lane / 4, t4 = lane % 4;
    const int32_t warp_row0 = row0 + warp * 16;
    const bool wg_active = (row0 + wg * 64) / group < q_len;  // warpgroup-uniform
    int32_t row_lo[2], row_hi[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int32_t i = (warp_row0 + g + 8 * h) / group;
        if (i < q_len) {
            visible_keys(p.causal, p.window, pos0 + i, kv_len, &row_lo[h], &row_hi[h]);
        } else {
            row_lo[h] = row_hi[h] = 0;  // padding row: sees nothing, written nowhere
        }
    }
    // a tile needs the mask only where some row of the CTA loses part of it
    auto need_mask = [&](int32_t t) {
        const int32_t j0 = lo + t * kBlockN;
        return j0 < lo_last || j0 + kBlockN > hi_first;
    };

    // Descriptors (tile_offset's placement): Q rows of this warpgroup; K as B, K-major; V as B,
    // MN-major: keys are K (core matrices 128 bytes apart), head dims are N (kBlockN * 16 bytes
    // apart), columns 64.. start 8 chunk columns in.
    constexpr uint32_t kQLbo = kBlockM * 16, kKvLbo = kBlockN * 16;
    const uint32_t q_wg = q_addr + tile_offset(wg * 64, 0, kBlockM);
    float s[kBlockN / 2];  // S(t), then P(t) unrounded
    auto issue_qk = [&](int32_t t) {
        const uint32_t k_t = k_addr + (t % 2) * kKvTileBytes;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wgmma_ss<kBlockN>(s, wgmma_desc(q_wg + kk * 2 * kQLbo, kQLbo, 128),
                              wgmma_desc(k_t + kk * 2 * kKvLbo, kKvLbo, 128), kk > 0);
        }
        wgmma_commit();
    };
    OAcc<D> o;
    uint32_t pf[kBlockN / 16][4] = {};  // P(t) rounded to bf16, as A fragments, one per 16 keys
    auto issue_pv = [&](int32_t t) {
        const uint32_t v_t = v_addr + (t % 2) * kKvTileBytes;
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; kc++) {
            const uint32_t v_kc = v_t + tile_offset(16 * kc, 0, kBlockN);
            wgmma_rs_bt<64>(o.o0, pf[kc], wgmma_desc(v_kc, 128, kKvLbo), 1);
            if constexpr (S::kN1 > 0) {
                wgmma_rs_bt<S::kN1>(o.o1, pf[kc],
                                    wgmma_desc(v_kc + tile_offset(0, 8, kBlockN), 128, kKvLbo), 1);
            }
        }
        wgmma_commit();
    };

#pragma unroll
    for (int j = 0; j < D / 8; j++) o.at(j, 0) = o.at(j, 1) = o.at(j, 2) = o.at(j, 3) = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    // Every register a wgmma reads or writes, pinned (ptx_sm90.cuh's reg_fence) before each
    // wgmma_fence and after each wgmma_wait.
    auto pin_operands = [&]() {
        reg_fence(s);
        reg_fence(o.o0);
        reg_fence(o.o1);
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; kc++) reg_fence(pf[kc]);
    };
    // Once the product that last wrote O has landed: O and l scaled by alpha, then P(t) rounded
    // to bf16 into pf, l summing the rounded values (attention.cu).
    auto rescale_and_round = [&](const float (&alpha)[2]) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] *= alpha[h];
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                o.at(j, 2 * h) *= alpha[h];
                o.at(j, 2 * h + 1) *= alpha[h];
            }
        }
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; kc++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const float *sv = s + 4 * (2 * kc + half);
                const uint32_t top = pack_bf16x2(sv[0], sv[1]);
                const uint32_t bot = pack_bf16x2(sv[2], sv[3]);
                pf[kc][2 * half] = top;      // row g,     keys 16kc + 8half + 2t, +1
                pf[kc][2 * half + 1] = bot;  // row g + 8, same keys
                l[0] += sum_bf16x2(top);
                l[1] += sum_bf16x2(bot);
            }
        }
    };

    if (wg_active && n_tiles > 0) {
        float alpha[2];
        pin_operands();
        wgmma_fence();
        issue_qk(0);
        wgmma_wait<0>();
        pin_operands();
        softmax_tile<kBlockN>(s, m, alpha, p.scale_log2, need_mask(0), lo, t4, row_lo, row_hi);
        rescale_and_round(alpha);
    }
    for (int32_t t = 1; t < n_tiles; t++) {
        // K(t) and V(t-1) have landed, and both warpgroups are done with iteration t-1, whose
        // products read K(t-1) and V(t-2): their buffers take K(t+1) and V(t).
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        load_kv_tile(v_addr, v_base, t);
        if (t + 1 < n_tiles) load_kv_tile(k_addr, k_base, t + 1);
        cp_async_commit();

        if (wg_active) {
            float alpha[2];
            pin_operands();
            wgmma_fence();  // s, o and pf were written by this thread since the last products
            issue_qk(t);
            issue_pv(t - 1);
            wgmma_wait<1>();  // S(t) has landed; P(t-1) V(t-1) may still be running
            reg_fence(s);     // (o and pf stay untouched until the next wait)
            softmax_tile<kBlockN>(s, m, alpha, p.scale_log2, need_mask(t), lo + t * kBlockN, t4,
                                  row_lo, row_hi);
            // (The SASS of ptxas 13.0 has this wait right after the max reduction, before the
            // exponentials: it reuses P's registers, still read by the pending product, for the
            // shuffles' results. So within a warpgroup only the masking and the row maxima
            // overlap P V; the exponentials overlap the other warpgroup's products.)
            wgmma_wait<0>();
            pin_operands();
            rescale_and_round(alpha);
        }
    }
    cp_async_wait<0>();  // V(last) has landed (and nothing is still landing when the CTA exits)
    fence_proxy_async();
    __syncthreads();
    if (!wg_active) return;  // no barrier follows: the rest is per warpgroup and per warp
    if (n_tiles > 0) {
        pin_operands();
        wgmma_fence();
        issue_pv(n_tiles - 1);
        wgmma_wait<0>();
        pin_operands();
    }

    // Normalise, stage the warp's 16 rows in its own rows of sQ (every product that read Q was
    // waited for before the last barrier), then store whole 16-byte chunks of the rows that are
    // real queries.
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float sum = l[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[h] = sum > 0.0f ? 1.0f / sum : 0.0f;  // 0: no visible key, zeros
        const int32_t prow = warp_row0 + g + 8 * h;
        const int32_t i = prow / group;
        if (p.lse && t4 == 0 && i < q_len) {
            // the sum of the rounded P the output was divided by (attention.cu)
            p.lse[(int64_t)(q_begin + i) * p.n_heads + kv_head * group + prow % group] =
                sum > 0.0f ? (m[h] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
        }
    }
    const int r_warp = warp * 16;
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            *reinterpret_cast<uint32_t *>(sQ + tile_offset(r_warp + g + 8 * h, j, kBlockM) +
                                          4 * t4) =
                pack_bf16x2(o.at(j, 2 * h) * inv[h], o.at(j, 2 * h + 1) * inv[h]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 16 * kChunks / 32; it++) {
        int r, cc;
        copy_order<kChunks>(lane + it * 32, &r, &cc);
        r += r_warp;
        const int32_t prow = row0 + r;
        const int32_t i = prow / group;
        if (i < q_len) {
            uint16_t *dst = p.out + (int64_t)(q_begin + i) * p.out_stride +
                            (int64_t)(kv_head * group + prow % group) * D + cc * 8;
            *reinterpret_cast<uint4 *>(dst) =
                *reinterpret_cast<const uint4 *>(sQ + tile_offset(r, cc, kBlockM));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------------------------

template <int D, int kBlockN>
sf_status launch_sm90(const Sm90Params &p, const sf_attention_args *a, cudaStream_t stream) {
    constexpr size_t smem = Sm90Shape<D, kBlockN>::kSmemBytes;
    if (smem > 48 * 1024) {
        SF_CUDA_TRY(cudaFuncSetAttribute(attention_sm90_kernel<D, kBlockN>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    const int64_t tiles = sf_ceil_div((int64_t)a->max_q_len * p.group, kBlockM);
    const dim3 grid((unsigned)tiles, (unsigned)a->n_kv_heads, (unsigned)a->n_requests);
    attention_sm90_kernel<D, kBlockN><<<grid, kThreads, smem, stream>>>(p);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

}  // namespace

extern "C" sf_status sf_cuda_attention_sm90_check(void) {
    // wgmma exists on compute capability 9.0 only (this file is built for sm_90a)
    int dev = 0, major = 0, minor = 0;
    SF_CUDA_TRY(cudaGetDevice(&dev));
    SF_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    SF_CUDA_TRY(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major != 9 || minor != 0) {
        return sf_fail(SF_ERR_UNSUPPORTED, "sf_cuda_attention_sm90_bf16: needs a compute "
                       "capability 9.0 device (sm_90a), device %d is %d.%d", dev, major, minor);
    }
    return SF_OK;
}

extern "C" sf_status sf_cuda_attention_sm90_tiles_bf16(const sf_attention_args *a,
                                                       int32_t block_n, cudaStream_t stream) {
    static const char *fn = "sf_cuda_attention_sm90_bf16";
    sf_status st = sf_attention_check_shapes(a, fn);
    if (st != SF_OK) return st;
    if (block_n == 0) block_n = kDefaultBlockN;
    if (block_n != 64 && block_n != 128) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: block_n = %d (64 or 128)", fn, (int)block_n);
    }
    st = sf_cuda_attention_sm90_check();
    if (st != SF_OK) return st;
    if (a->n_requests == 0 || a->max_q_len == 0) return SF_OK;  // nothing to compute
    st = sf_attention_check_tensors(a, fn);
    if (st != SF_OK) return st;

    sf_nvtx_range range("sf_cuda_attention_sm90_bf16");
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
    if (block_n == 64) {
        switch (a->head_dim) {
            case 64: return launch_sm90<64, 64>(p, a, stream);
            case 80: return launch_sm90<80, 64>(p, a, stream);
            case 96: return launch_sm90<96, 64>(p, a, stream);
            default: return launch_sm90<128, 64>(p, a, stream);
        }
    }
    switch (a->head_dim) {
        case 64: return launch_sm90<64, 128>(p, a, stream);
        case 80: return launch_sm90<80, 128>(p, a, stream);
        case 96: return launch_sm90<96, 128>(p, a, stream);
        default: return launch_sm90<128, 128>(p, a, stream);
    }
}

extern "C" sf_status sf_cuda_attention_sm90_bf16(const sf_attention_args *a,
                                                 cudaStream_t stream) {
    return sf_cuda_attention_sm90_tiles_bf16(a, 0, stream);
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

#endif
