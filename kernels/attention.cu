// Fused scaled-dot-product attention on bf16 (flash-style). CPU twin: host/cpu/attention.c.
//
// One CTA owns one (request, kv head, tile of kBlockM "packed rows"). A packed row is a (query,
// head within the GQA group) pair, ordered query-major: row p is query p / group of query head
// kv_head * group + p % group. Packing the group's heads into one tile lets them share every K/V
// tile loaded into shared memory, and turns GQA decode (one query, group heads) into one tile
// instead of `group` nearly empty ones.
//
// Per CTA: 4 warps, 16 * MI rows each (MI = 2: 128 rows). For every tile of N keys, each warp
//   S = Q K^T                       (mma.m16n8k16, bf16 in, fp32 accumulators in registers;
//                                     Q and K fragments by ldmatrix from shared memory)
//   mask, running max m, P = exp2(S * scale * log2 e - m) rounded to bf16
//   O = O * exp2(m_old - m_new) + P V (P reused straight from the accumulator registers as the
//                                     A operand: the m16n8 C layout of two adjacent n-tiles is
//                                     the m16k16 A layout; V fragments by ldmatrix.trans)
// and divides by the running sum l of the (rounded) P at the end. K and V tiles are staged with
// cp.async in one buffer each: K(t+1) streams in during the softmax and PV of tile t, V(t+1)
// during the QK^T of tile t+1. Key tiles the causal/window mask hides from every row of the CTA
// are never visited; tiles it hides from none skip the per-element mask. Tile shapes per head
// dim (the dispatch at the bottom) are chosen to stay under 255 registers without spills.
//
// With kLse (sf_attention_args.lse != NULL) the epilogue also stores each row's natural
// log-sum-exp, ln 2 * (m + log2 l), for the backward (attention_backward.cu); the kernel
// without it is the same code as before the option existed.
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "attention.h"
#include "attention_mma.cuh"
#include "cuda_check.cuh"

namespace {

using namespace sf_attn;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

// D: head dim; MI: m16 tiles per warp, so a CTA covers kBlockM = 64 * MI packed rows; N: keys
// per K/V tile.
template <int D, int MI, int N>
struct AttnShape {
    static constexpr int kBlockM = kWarps * 16 * MI;
    static constexpr int kBlockN = N;
    static constexpr int kRow = D + kPad;  // bf16 elements per shared-memory row
    static constexpr int kChunks = D / 8;  // 16-byte chunks per head row
    static constexpr size_t kSmemBytes = (size_t)(kBlockM + 2 * kBlockN) * kRow * sizeof(uint16_t);
    // the copy loops give every thread (every lane, for the per-warp store) the same count
    static_assert(D % 16 == 0 && (kBlockM * kChunks) % kThreads == 0 &&
                      (kBlockN * kChunks) % kThreads == 0 && (16 * MI * kChunks) % 32 == 0,
                  "unsupported head dim");
};

struct AttnParams {
    uint16_t *out;
    const uint16_t *q;
    const uint16_t *k;
    const uint16_t *v;
    const int32_t *cu_q;
    const int32_t *cu_kv;
    const int32_t *kv_len;
    const int32_t *q_pos0;
    int64_t q_stride, kv_stride, out_stride;
    int32_t group;  // n_heads / n_kv_heads
    int32_t window;
    float scale_log2;  // scale * log2(e): the softmax runs on exp2
    bool causal;
};

// The kLse instantiations' parameters: a separate type, so that the plain kernel's parameter
// block (and with it its code) stays exactly what it was before lse existed.
struct AttnLseParams : AttnParams {
    float *lse;  // [rows, n_heads]
    int32_t n_heads;
};
template <bool kLse>
using AttnParamsFor = typename std::conditional<kLse, AttnLseParams, AttnParams>::type;

// The keys [lo, hi) of a request with kv_len keys that query position pos may see: the rule of
// sf_attn::visible_keys, kept in this form (reading the mask from the parameters) because with
// it the lse == NULL kernel compiles to exactly the PTX it had before the backward existed.
__device__ __forceinline__ void visible_keys(const AttnParams &p, int64_t pos, int32_t kv_len,
                                             int32_t *lo, int32_t *hi) {
    int64_t l = 0, h = kv_len;
    if (p.causal) {
        if (pos + 1 < h) h = pos + 1;
        if (p.window > 0 && pos - p.window + 1 > l) l = pos - p.window + 1;
    }
    if (h < 0) h = 0;
    if (l > h) l = h;
    *lo = (int32_t)l;
    *hi = (int32_t)h;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Grid: x = packed-row tiles (heaviest causal tiles scheduled first), y = kv head, z = request.
// Warp w owns rows [w * 16 * MI, (w + 1) * 16 * MI) of the tile, as MI m16 tiles: every K or V
// fragment read from shared memory feeds MI mma, which is what keeps ldmatrix traffic below the
// tensor cores' appetite.
template <int D, int MI, int N, bool kLse>
__global__ void __launch_bounds__(kThreads)
    attention_bf16_kernel(const AttnParamsFor<kLse> p) {
    using S = AttnShape<D, MI, N>;
    constexpr int kBlockN = S::kBlockN;
    constexpr int kRow = S::kRow;
    constexpr int kChunks = S::kChunks;
    constexpr int kBlockM = S::kBlockM;
    constexpr int kWarpRows = 16 * MI;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    uint16_t *sQ = reinterpret_cast<uint16_t *>(smem_raw);  // [kBlockM][kRow], later: output
    uint16_t *sK = sQ + kBlockM * kRow;                      // [kBlockN][kRow]
    uint16_t *sV = sK + kBlockN * kRow;                      // [kBlockN][kRow]

    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
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

    // Keys any row of the CTA sees: [lo, hi) (first query's lo, last query's hi, both monotone
    // in the position); a tile inside [lo_last, hi_first) is visible to every row.
    const int32_t i_first = row0 / group;
    const int32_t i_last = min((row0 + kBlockM - 1) / group, q_len - 1);
    int32_t lo, hi_first, lo_last, hi;
    visible_keys(p, pos0 + i_first, kv_len, &lo, &hi_first);
    visible_keys(p, pos0 + i_last, kv_len, &lo_last, &hi);
    const int32_t n_tiles = hi > lo ? (hi - lo + kBlockN - 1) / kBlockN : 0;

    const uint16_t *k_base = p.k + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    const uint16_t *v_base = p.v + (int64_t)kv_begin * p.kv_stride + (int64_t)kv_head * D;
    auto load_kv_tile = [&](uint16_t *dst, const uint16_t *base, int32_t j0) {
#pragma unroll
        for (int it = 0; it < kBlockN * kChunks / kThreads; it++) {
            const int c = tid + it * kThreads;
            const int r = c / kChunks, cc = c % kChunks;
            const int32_t j = j0 + r;
            const bool ok = j < hi;  // rows past the visible range are zero-filled, never read
            const uint16_t *src = ok ? base + (int64_t)j * p.kv_stride + cc * 8 : base;
            cp_async_16(smem_u32(dst + r * kRow + cc * 8), src, ok);
        }
    };

    // Q tile (+ the first K tile) as one cp.async group, the first V tile as the next.
#pragma unroll
    for (int it = 0; it < kBlockM * kChunks / kThreads; it++) {
        const int c = tid + it * kThreads;
        const int r = c / kChunks, cc = c % kChunks;
        const int32_t prow = row0 + r;
        const int32_t i = prow / group;
        const bool ok = i < q_len;
        const uint16_t *src =
            ok ? p.q + (int64_t)(q_begin + i) * p.q_stride +
                     (int64_t)(kv_head * group + prow % group) * D + cc * 8
               : p.q;
        cp_async_16(smem_u32(sQ + r * kRow + cc * 8), src, ok);
    }
    if (n_tiles > 0) load_kv_tile(sK, k_base, lo);
    cp_async_commit();
    if (n_tiles > 0) load_kv_tile(sV, v_base, lo);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // This thread's rows: for m-tile mi, rows g = lane / 4 (h = 0) and g + 8 (h = 1) of the
    // warp's 16 * mi .. 16 * mi + 15; it holds columns 2t, 2t+1 (t = lane % 4) of every 8-column
    // accumulator tile of each. Per-row state is indexed [mi][h].
    const int g = lane / 4, t4 = lane % 4;
    const int32_t warp_row0 = row0 + warp * kWarpRows;
    const bool warp_active = warp_row0 / group < q_len;  // warp-uniform
    int32_t row_lo[MI][2], row_hi[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int32_t i = (warp_row0 + mi * 16 + g + 8 * h) / group;
            if (i < q_len) {
                visible_keys(p, pos0 + i, kv_len, &row_lo[mi][h], &row_hi[mi][h]);
            } else {
                row_lo[mi][h] = row_hi[mi][h] = 0;  // padding row: sees nothing, written nowhere
            }
        }
    }
    // ldmatrix lane addressing inside a 16x16 block: row offset and column offset (elements)
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;  // Q and V
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;  // K

    float o[MI][D / 8][4];
    float m[MI][2], l[MI][2];  // running max (log2 domain), this thread's share of the sum
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            o[mi][dt][0] = o[mi][dt][1] = o[mi][dt][2] = o[mi][dt][3] = 0.0f;
        m[mi][0] = m[mi][1] = -INFINITY;
        l[mi][0] = l[mi][1] = 0.0f;
    }

    for (int32_t tile = 0; tile < n_tiles; tile++) {
        const int32_t j0 = lo + tile * kBlockN;
        if (tile > 0) {
            cp_async_wait<1>();  // K(tile) has landed; V(tile) may still be in flight
            __syncthreads();
        }

        uint32_t pf[MI][kBlockN / 16][4];  // P as mma A fragments, one per 16 keys
        if (warp_active) {
            float s[MI][kBlockN / 8][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int nt = 0; nt < kBlockN / 8; nt++)
                    s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                // Q fragments come from shared memory each time: in registers they would cost
                // D / 4 * MI more, which the accumulators need.
                uint32_t qf[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    // matrices: rows +0..7, +8..15 | cols +0..7; the same | cols +8..15
                    ldmatrix_x4(qf[mi], smem_u32(sQ + (warp * kWarpRows + mi * 16 + a_row) * kRow +
                                                 kk * 16 + a_col));
                }
#pragma unroll
                for (int np = 0; np < kBlockN / 16; np++) {
                    // matrices: keys +0..7 | dims +0, +8; keys +8..15 | dims +0, +8
                    uint32_t b[4];
                    ldmatrix_x4(b, smem_u32(sK + (np * 16 + k_row) * kRow + kk * 16 + k_col));
#pragma unroll
                    for (int mi = 0; mi < MI; mi++) {
                        mma_bf16_16816(s[mi][2 * np], qf[mi], b[0], b[1]);
                        mma_bf16_16816(s[mi][2 * np + 1], qf[mi], b[2], b[3]);
                    }
                }
            }

            // Mask (only where some row of the CTA loses part of this tile), online softmax.
            const bool need_mask = j0 < lo_last || j0 + kBlockN > hi_first;
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int nt = 0; nt < kBlockN / 8; nt++) {
                    scale_mask_max(s[mi][nt], p.scale_log2, need_mask, j0 + nt * 8 + 2 * t4,
                                   row_lo[mi], row_hi[mi], mx);
                }
                float base[2], alpha[2];
                online_max_step(mx, m[mi], base, alpha);
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    l[mi][h] *= alpha[h];
#pragma unroll
                    for (int dt = 0; dt < D / 8; dt++) {
                        o[mi][dt][2 * h] *= alpha[h];
                        o[mi][dt][2 * h + 1] *= alpha[h];
                    }
                }
                // P = exp2(s - m), rounded to bf16; the sum l takes the rounded values, so the
                // weights applied to V sum to exactly what divides them. The C layout of two
                // adjacent n8 tiles is the A layout of one k16 step.
#pragma unroll
                for (int kc = 0; kc < kBlockN / 16; kc++) {
#pragma unroll
                    for (int half = 0; half < 2; half++) {
                        const float *sv = s[mi][2 * kc + half];
                        const uint32_t top =
                            pack_bf16x2(exp2_ftz(sv[0] - base[0]), exp2_ftz(sv[1] - base[0]));
                        const uint32_t bot =
                            pack_bf16x2(exp2_ftz(sv[2] - base[1]), exp2_ftz(sv[3] - base[1]));
                        pf[mi][kc][2 * half] = top;      // row g,     keys 16kc + 8half + 2t, +1
                        pf[mi][kc][2 * half + 1] = bot;  // row g + 8, same keys
                        l[mi][0] += sum_bf16x2(top);
                        l[mi][1] += sum_bf16x2(bot);
                    }
                }
            }
        }

        __syncthreads();  // every warp is done reading sK
        if (tile + 1 < n_tiles) load_kv_tile(sK, k_base, j0 + kBlockN);
        cp_async_commit();
        cp_async_wait<1>();  // V(tile) has landed; K(tile + 1) may still be in flight
        __syncthreads();

        if (warp_active) {
#pragma unroll
            for (int kc = 0; kc < kBlockN / 16; kc++) {
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    // matrices (transposed): keys +0..7, +8..15 | dims +0..7; the same | +8..15
                    uint32_t b[4];
                    ldmatrix_x4_trans(b, smem_u32(sV + (kc * 16 + a_row) * kRow + dp * 16 + a_col));
#pragma unroll
                    for (int mi = 0; mi < MI; mi++) {
                        mma_bf16_16816(o[mi][2 * dp], pf[mi][kc], b[0], b[1]);
                        mma_bf16_16816(o[mi][2 * dp + 1], pf[mi][kc], b[2], b[3]);
                    }
                }
            }
        }

        __syncthreads();  // every warp is done reading sV
        if (tile + 1 < n_tiles) load_kv_tile(sV, v_base, j0 + kBlockN);
        cp_async_commit();
    }

    if (!warp_active) return;  // no barrier follows: the rest is per warp

    // Normalise, stage the warp's rows in its own rows of sQ (only this warp ever read them),
    // then store whole 16-byte chunks of the rows that are real queries.
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
        float inv[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float sum = l[mi][h];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            inv[h] = sum > 0.0f ? 1.0f / sum : 0.0f;  // 0: no visible key, zeros
            if constexpr (kLse) {
                // l is the sum of the rounded P the output was divided by, so the backward's
                // exp(s - lse) reproduces the forward's normalised weights. No visible key:
                // log 0 = -inf.
                const int32_t prow = warp_row0 + mi * 16 + g + 8 * h;
                const int32_t i = prow / group;
                if (t4 == 0 && i < q_len) {
                    p.lse[(int64_t)(q_begin + i) * p.n_heads + kv_head * group + prow % group] =
                        sum > 0.0f ? (m[mi][h] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
                }
            }
        }
        uint16_t *stage = sQ + (warp * kWarpRows + mi * 16 + g) * kRow + 2 * t4;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<uint32_t *>(stage + dt * 8) =
                pack_bf16x2(o[mi][dt][0] * inv[0], o[mi][dt][1] * inv[0]);
            *reinterpret_cast<uint32_t *>(stage + 8 * kRow + dt * 8) =
                pack_bf16x2(o[mi][dt][2] * inv[1], o[mi][dt][3] * inv[1]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < kWarpRows * kChunks / 32; it++) {
        const int c = lane + it * 32;
        const int r = warp * kWarpRows + c / kChunks, cc = c % kChunks;
        const int32_t prow = row0 + r;
        const int32_t i = prow / group;
        if (i < q_len) {
            uint16_t *dst = p.out + (int64_t)(q_begin + i) * p.out_stride +
                            (int64_t)(kv_head * group + prow % group) * D + cc * 8;
            *reinterpret_cast<uint4 *>(dst) =
                *reinterpret_cast<const uint4 *>(sQ + r * kRow + cc * 8);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

template <int D, int MI, int N, bool kLse>
sf_status launch_attention(const AttnParamsFor<kLse> &p, const sf_attention_args *a,
                           cudaStream_t stream) {
    using S = AttnShape<D, MI, N>;
    constexpr size_t smem = S::kSmemBytes;
    if (smem > 48 * 1024) {
        // above the default 48 KB a kernel must opt in (per device; cheap to repeat)
        SF_CUDA_TRY(cudaFuncSetAttribute(attention_bf16_kernel<D, MI, N, kLse>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    const dim3 grid((unsigned)sf_ceil_div((int64_t)a->max_q_len * p.group, S::kBlockM),
                    (unsigned)a->n_kv_heads, (unsigned)a->n_requests);
    attention_bf16_kernel<D, MI, N, kLse><<<grid, kThreads, smem, stream>>>(p);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

template <int D, int MI, int N>
sf_status launch_attention(const AttnParams &p, const sf_attention_args *a, cudaStream_t stream) {
    if (!a->lse) return launch_attention<D, MI, N, false>(p, a, stream);
    AttnLseParams pl;
    static_cast<AttnParams &>(pl) = p;
    pl.lse = a->lse;
    pl.n_heads = a->n_heads;
    return launch_attention<D, MI, N, true>(pl, a, stream);
}

bool aligned16(const void *ptr) { return ((uintptr_t)ptr & 15u) == 0; }

}  // namespace

extern "C" sf_status sf_attention_check_shapes(const sf_attention_args *a, const char *fn) {
    if (!a) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL args", fn);
    if (a->n_requests < 0 || a->max_q_len < 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_requests = %d, max_q_len = %d", fn,
                       (int)a->n_requests, (int)a->max_q_len);
    }
    if (a->n_heads <= 0 || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads != 0) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n_heads = %d not a positive multiple of "
                       "n_kv_heads = %d", fn, (int)a->n_heads, (int)a->n_kv_heads);
    }
    const int32_t d = a->head_dim;
    if (d != 64 && d != 80 && d != 96 && d != 128) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: head_dim = %d (supported: 64, 80, 96, 128)", fn,
                       (int)d);
    }
    const int64_t q_row = (int64_t)a->n_heads * d, kv_row = (int64_t)a->n_kv_heads * d;
    if (a->q_stride < q_row || a->out_stride < q_row || a->kv_stride < kv_row) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: strides q %lld, kv %lld, out %lld shorter "
                       "than a row of heads (%lld, %lld, %lld)", fn, (long long)a->q_stride,
                       (long long)a->kv_stride, (long long)a->out_stride, (long long)q_row,
                       (long long)kv_row, (long long)q_row);
    }
    if (!isfinite(a->scale)) return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: scale is not finite", fn);
    if (a->kernel != SF_ATTENTION_AUTO && a->kernel != SF_ATTENTION_MMA &&
        a->kernel != SF_ATTENTION_WGMMA && a->kernel != SF_ATTENTION_WGMMA_WS) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: kernel = %d (not an sf_attention_kernel)",
                       fn, (int)a->kernel);
    }
    return SF_OK;
}

extern "C" sf_status sf_attention_check_tensors(const sf_attention_args *a, const char *fn) {
    if (!a->out || !a->q || !a->k || !a->v || !a->cu_q || !a->cu_kv) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: NULL tensor or offsets", fn);
    }
    if (!aligned16(a->out) || !aligned16(a->q) || !aligned16(a->k) || !aligned16(a->v) ||
        a->q_stride % 8 != 0 || a->kv_stride % 8 != 0 || a->out_stride % 8 != 0) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: tensors must be 16-byte aligned with strides "
                       "a multiple of 8 elements", fn);
    }
    const int32_t group = a->n_heads / a->n_kv_heads;
    if (a->n_requests > 65535 || a->n_kv_heads > 65535 ||
        (int64_t)a->max_q_len * group > (int64_t)INT32_MAX - 256) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: grid too large (n_requests = %d, n_kv_heads = %d, "
                       "max_q_len * group = %lld)", fn, (int)a->n_requests, (int)a->n_kv_heads,
                       (long long)a->max_q_len * group);
    }
    return SF_OK;
}

extern "C" sf_status sf_cuda_attention_bf16(const sf_attention_args *a, cudaStream_t stream) {
    static const char *fn = "sf_cuda_attention_bf16";
    sf_status st = sf_attention_check_shapes(a, fn);
    if (st != SF_OK) return st;
    if (a->n_requests == 0 || a->max_q_len == 0) return SF_OK;  // nothing to compute
    st = sf_attention_check_tensors(a, fn);
    if (st != SF_OK) return st;

    if (sf_attention_decode_applies(a)) {
        const size_t need = sf_cuda_attention_workspace_bytes(a);
        if (need == 0 || (a->workspace && aligned16(a->workspace) && a->workspace_bytes >= need))
            return sf_cuda_attention_decode_bf16(a, stream);
    }
    if (a->kernel == SF_ATTENTION_WGMMA) return sf_cuda_attention_sm90_bf16(a, stream);
    if (a->kernel == SF_ATTENTION_WGMMA_WS) return sf_cuda_attention_sm90_ws_bf16(a, 0, stream);

    sf_nvtx_range range("sf_cuda_attention_bf16");
    const int32_t d = a->head_dim;
    const int32_t group = a->n_heads / a->n_kv_heads;
    AttnParams p;
    p.out = a->out;
    p.q = a->q;
    p.k = a->k;
    p.v = a->v;
    p.cu_q = a->cu_q;
    p.cu_kv = a->cu_kv;
    p.kv_len = a->kv_len;
    p.q_pos0 = a->q_pos0;
    p.q_stride = a->q_stride;
    p.kv_stride = a->kv_stride;
    p.out_stride = a->out_stride;
    p.group = group;
    p.window = a->window;
    p.scale_log2 = a->scale * 1.4426950408889634f;
    p.causal = a->causal;
    switch (d) {
        case 64: return launch_attention<64, 2, 64>(p, a, stream);
        case 80: return launch_attention<80, 2, 64>(p, a, stream);
        case 96: return launch_attention<96, 2, 64>(p, a, stream);
        default: return launch_attention<128, 2, 32>(p, a, stream);
    }
}
