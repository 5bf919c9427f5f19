// Decode attention with the keys split over blocks ("split-KV"): one query per request against
// its KV cache. CPU twin: host/cpu/attention.c (sf_cpu_attention); semantics: attention.h.
//
// Why a kernel of its own. The tiled kernel (attention.cu) gives each (request, kv head) one CTA
// whose 128 packed rows hold only the group's few query heads, and walks all the keys in it:
// at batch 32 x 8 kv heads that is 256 CTAs (two per SM, most of each idle), at batch 1 only 8,
// so decode reached 2374 GB/s on the H200 (docs/PERF.md) and a single request far less. Decode
// is a stream of the K/V cache (one query: 4 flops per key element), so what matters is
// keeping enough blocks and loads in flight. Here the visible keys of each (request, kv head)
// are cut into `splits` ranges of split_keys keys, one 128-thread block each; the ranges are
// combined by a second kernel (flash-decoding: each block returns its unnormalised output with
// its running max m and sum l, and out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M)).
// The grid is fixed by max_kv_len, not by the lengths on the device, so a CUDA graph of the
// decode step replays it at any cache length; blocks past a request's keys write an empty part.
//
// Per block, for each tile of 128 keys (one per thread), with the group's queries staged in
// shared memory as fp32 (already multiplied by scale * log2 e):
//   1. scores: thread t computes s_h = q_h . k_t for every head h of the group from its key
//      row (16-byte loads; the queries are broadcast reads of shared memory);
//   2. online softmax: warp w updates the running max and sum of heads w, w + 4, ... over the
//      tile and turns the scores into p = 2^(s - m) (fp32: no rounding of P to bf16);
//   3. p V: thread slot (h, 4 columns) accumulates p_j v_j over the tile's keys into registers
//      (8-byte loads; a warp's slots cover whole value rows).
// No tensor cores: with one query a tile's products are matrix-vector work, and the cache
// stream, not the arithmetic, sets the time.
#include <math.h>
#include <stdint.h>

#include <cuda_bf16.h>

#include "attention.h"
#include "cuda_check.cuh"

namespace {

constexpr int kThreads = 128;          // a tile of keys is one key per thread
constexpr int kMaxGroup = 8;           // query heads per kv head this kernel takes
constexpr int kMinSplitKeys = 256;     // at most ceil(max_kv_len / 256) splits
constexpr int64_t kTargetBlocks = 1024;  // about 8 resident 128-thread blocks per SM of 132

struct DecodeParams {
    sf_attention_args a;  // the caller's arguments, by value (pointers, strides, masking)
    float *part_o;        // splits > 1: [n_requests, n_heads, splits, D] unnormalised outputs
    float *part_ml;       // and [n_requests, n_heads, splits, 2] their running max m and sum l
    int32_t group, splits, split_keys;
    float scale_log2;
};

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) {
    return __uint_as_float(bits16 << 16);
}

// dst[0..3] = bf16(v * scale), round to nearest even: one 8-byte store.
__device__ __forceinline__ void store_bf16x4(uint16_t *dst, const float (&v)[4], float scale) {
    __align__(8) __nv_bfloat162 h[2];
#pragma unroll
    for (int i = 0; i < 2; i++)
        h[i] = __floats2bfloat162_rn(v[2 * i] * scale, v[2 * i + 1] * scale);
    *reinterpret_cast<uint2 *>(dst) = *reinterpret_cast<const uint2 *>(h);
}

// The keys the request's query sees: [lo, hi), as sf_cpu_attention.
__device__ __forceinline__ void visible_range(const DecodeParams &p, int32_t req, int32_t n_kv,
                                              int32_t *lo, int32_t *hi) {
    *lo = 0;
    *hi = n_kv;
    if (p.a.causal) {
        const int64_t pos = p.a.q_pos0 ? p.a.q_pos0[req] : 0;
        *hi = (int32_t)min((int64_t)n_kv, pos + 1);
        if (p.a.window > 0) *lo = (int32_t)max((int64_t)0, pos - p.a.window + 1);
    }
}

// Writes one head's result: normalised to out when the keys are not split, else
// the unnormalised part with its m and l for the combine kernel.
template <int D>
__device__ __forceinline__ void store_head_column(const DecodeParams &p, int32_t req,
                                                  int32_t q_row, int32_t head, int32_t split,
                                                  int d4, const float (&o)[4], float l) {
    if (p.splits == 1) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no visible key: zeros
        store_bf16x4(p.a.out + (int64_t)q_row * p.a.out_stride + (int64_t)head * D + 4 * d4, o,
                     inv);
    } else {
        float *dst = p.part_o + (((int64_t)req * p.a.n_heads + head) * p.splits + split) * D;
        *reinterpret_cast<float4 *>(dst + 4 * d4) = make_float4(o[0], o[1], o[2], o[3]);
    }
}

// grid (splits, n_kv_heads, n_requests), kThreads threads.
template <int D>
__global__ void __launch_bounds__(kThreads) attention_decode_kernel(const DecodeParams p) {
    static_assert(D % 8 == 0 && kMaxGroup * D / 4 <= 2 * kThreads, "two column slots a thread");
    constexpr int kCols = D / 4;  // 4-column slots per head
    __shared__ float4 sQ[kMaxGroup][D / 4];  // float4: read 4 values at a time
    __shared__ float sP[kMaxGroup][kThreads];
    __shared__ float sM[kMaxGroup], sL[kMaxGroup], sAlpha[kMaxGroup];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int32_t split = blockIdx.x, kv_head = blockIdx.y, req = blockIdx.z;
    const int32_t q_row = p.a.cu_q[req];
    if (p.a.cu_q[req + 1] - q_row < 1) return;  // no query (the whole block: uniform)
    const int32_t kv0 = p.a.cu_kv[req];
    const int32_t n_kv = p.a.kv_len ? p.a.kv_len[req] : p.a.cu_kv[req + 1] - kv0;
    int32_t lo, hi;
    visible_range(p, req, n_kv, &lo, &hi);
    const int32_t begin = lo + split * p.split_keys;
    const int32_t end = min(hi, begin + p.split_keys);
    const int group = p.group;
    const int32_t head0 = kv_head * group;

    for (int i = tid; i < group * D; i += kThreads) {
        const int h = i / D, e = i % D;
        const uint16_t bits = p.a.q[(int64_t)q_row * p.a.q_stride + (int64_t)(head0 + h) * D + e];
        reinterpret_cast<float *>(sQ[h])[e] = bf16_bits_to_f32(bits) * p.scale_log2;
    }
    if (tid < kMaxGroup) {
        sM[tid] = -INFINITY;
        sL[tid] = 0.0f;
    }
    // this thread's output slots: slot = tid + kThreads * s, head slot / kCols, columns
    // 4 (slot % kCols) .. + 3
    float o[2][4] = {};
    const uint16_t *k_base = p.a.k + (int64_t)kv0 * p.a.kv_stride + (int64_t)kv_head * D;
    const uint16_t *v_base = p.a.v + (int64_t)kv0 * p.a.kv_stride + (int64_t)kv_head * D;
    __syncthreads();

    for (int32_t t0 = begin; t0 < end; t0 += kThreads) {
        const int n_tile = min(kThreads, end - t0);
        // 1. scores of key t0 + tid for every head of the group
        float s[kMaxGroup];
#pragma unroll
        for (int h = 0; h < kMaxGroup; h++) s[h] = 0.0f;
        if (tid < n_tile) {
            const uint16_t *krow = k_base + (int64_t)(t0 + tid) * p.a.kv_stride;
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                const uint4 raw = *reinterpret_cast<const uint4 *>(krow + 8 * c);
                const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
                float kf[8];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    kf[2 * e] = bf16_bits_to_f32(w[e] & 0xffffu);
                    kf[2 * e + 1] = bf16_bits_to_f32(w[e] >> 16);
                }
#pragma unroll
                for (int h = 0; h < kMaxGroup; h++) {
                    if (h < group) {
                        const float4 qa = sQ[h][2 * c], qb = sQ[h][2 * c + 1];
                        s[h] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] +
                                qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
                    }
                }
            }
        }
#pragma unroll
        for (int h = 0; h < kMaxGroup; h++)
            if (h < group) sP[h][tid] = tid < n_tile ? s[h] : -INFINITY;
        __syncthreads();

        // 2. online softmax, one warp per head
        for (int h = warp; h < group; h += kThreads / 32) {
            float mx = -INFINITY;
            for (int j = lane; j < n_tile; j += 32) mx = fmaxf(mx, sP[h][j]);
            for (int off = 16; off > 0; off >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_old = sM[h];
            const float m_new = fmaxf(m_old, mx);
            // m_new = -inf only if every score so far is -inf (non-finite inputs): p = 0 then
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            float sum = 0.0f;
            for (int j = lane; j < kThreads; j += 32) {
                const float e = j < n_tile ? exp2f(sP[h][j] - base) : 0.0f;
                sP[h][j] = e;
                sum += e;
            }
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            __syncwarp();
            if (lane == 0) {
                const float alpha = exp2f(m_old - base);  // 0 on the first tile (m_old = -inf)
                sAlpha[h] = alpha;
                sL[h] = sL[h] * alpha + sum;
                sM[h] = m_new;
            }
        }
        __syncthreads();

        // 3. o = o * alpha + p V over the tile's keys
#pragma unroll
        for (int si = 0; si < 2; si++) {
            const int slot = tid + kThreads * si;
            if (slot < group * kCols) {
                const int h = slot / kCols, d4 = slot % kCols;
                const float alpha = sAlpha[h];
#pragma unroll
                for (int e = 0; e < 4; e++) o[si][e] *= alpha;
                const uint16_t *vcol = v_base + (int64_t)t0 * p.a.kv_stride + 4 * d4;
#pragma unroll 4
                for (int j = 0; j < n_tile; j++) {
                    const uint2 raw =
                        *reinterpret_cast<const uint2 *>(vcol + (int64_t)j * p.a.kv_stride);
                    const float pj = sP[h][j];
                    o[si][0] += pj * bf16_bits_to_f32(raw.x & 0xffffu);
                    o[si][1] += pj * bf16_bits_to_f32(raw.x >> 16);
                    o[si][2] += pj * bf16_bits_to_f32(raw.y & 0xffffu);
                    o[si][3] += pj * bf16_bits_to_f32(raw.y >> 16);
                }
            }
        }
        __syncthreads();  // sP and sAlpha are rewritten by the next tile
    }

#pragma unroll
    for (int si = 0; si < 2; si++) {
        const int slot = tid + kThreads * si;
        if (slot < group * kCols) {
            const int h = slot / kCols;
            store_head_column<D>(p, req, q_row, head0 + h, split, slot % kCols, o[si], sL[h]);
        }
    }
    if (p.splits > 1 && tid < group) {
        float *dst =
            p.part_ml + (((int64_t)req * p.a.n_heads + head0 + tid) * p.splits + split) * 2;
        dst[0] = sM[tid];
        dst[1] = sL[tid];
    }
}

// grid (n_heads, n_requests), one warp, a lane per 4 columns: out = sum_s o_s 2^(m_s - M) /
// sum_s l_s 2^(m_s - M), the splits in a fixed order (deterministic).
template <int D>
__global__ void __launch_bounds__(32) attention_decode_combine_kernel(const DecodeParams p) {
    static_assert(D / 4 <= 32, "a lane per 4 columns");
    const int32_t head = blockIdx.x, req = blockIdx.y;
    const int32_t q_row = p.a.cu_q[req];
    const int d4 = threadIdx.x;
    if (p.a.cu_q[req + 1] - q_row < 1 || d4 >= D / 4) return;
    const int64_t first = ((int64_t)req * p.a.n_heads + head) * p.splits;
    const float *part_o = p.part_o + first * D, *part_ml = p.part_ml + first * 2;
    float M = -INFINITY;
    for (int32_t s = 0; s < p.splits; s++) M = fmaxf(M, part_ml[2 * s]);
    const float base = M == -INFINITY ? 0.0f : M;
    float L = 0.0f, acc[4] = {};
    for (int32_t s = 0; s < p.splits; s++) {
        const float l = part_ml[2 * s + 1];
        if (!(l > 0.0f)) continue;  // an empty split (past the keys, or nothing visible)
        const float w = exp2f(part_ml[2 * s] - base);
        L += l * w;
        const float4 o = *reinterpret_cast<const float4 *>(part_o + (int64_t)s * D + 4 * d4);
        acc[0] += o.x * w;
        acc[1] += o.y * w;
        acc[2] += o.z * w;
        acc[3] += o.w * w;
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    store_bf16x4(p.a.out + (int64_t)q_row * p.a.out_stride + (int64_t)head * D + 4 * d4, acc, inv);
}

// How the keys are split: enough blocks to fill the GPU (kTargetBlocks), splits of at least
// kMinSplitKeys keys. Only host values enter, so a captured graph keeps its grid valid.
void plan_splits(const sf_attention_args *a, int32_t *splits, int32_t *split_keys) {
    const int64_t units = (int64_t)a->n_requests * a->n_kv_heads;
    int64_t s = (kTargetBlocks + units - 1) / units;
    const int64_t most = ((int64_t)a->max_kv_len + kMinSplitKeys - 1) / kMinSplitKeys;
    if (s > most) s = most;
    if (s < 1) s = 1;
    *splits = (int32_t)s;
    *split_keys = (int32_t)(((int64_t)a->max_kv_len + s - 1) / s);
}

template <int D>
sf_status launch_decode(const DecodeParams &p, const sf_attention_args *a, cudaStream_t stream) {
    const dim3 grid((unsigned)p.splits, (unsigned)a->n_kv_heads, (unsigned)a->n_requests);
    attention_decode_kernel<D><<<grid, kThreads, 0, stream>>>(p);
    SF_CUDA_TRY(cudaGetLastError());
    if (p.splits > 1) {
        attention_decode_combine_kernel<D>
            <<<dim3((unsigned)a->n_heads, (unsigned)a->n_requests), 32, 0, stream>>>(p);
        SF_CUDA_TRY(cudaGetLastError());
    }
    return SF_OK;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

// No lse: the backward's forward (training) never decodes.
extern "C" bool sf_attention_decode_applies(const sf_attention_args *a) {
    return a->max_q_len == 1 && a->max_kv_len > 0 && !a->lse &&
           a->n_heads / a->n_kv_heads <= kMaxGroup;
}

extern "C" size_t sf_cuda_attention_workspace_bytes(const sf_attention_args *a) {
    if (!a || a->n_requests <= 0 || a->n_kv_heads <= 0 || a->n_heads <= 0 ||
        !sf_attention_decode_applies(a))
        return 0;
    int32_t splits, split_keys;
    plan_splits(a, &splits, &split_keys);
    if (splits == 1) return 0;
    return (size_t)a->n_requests * (size_t)a->n_heads * (size_t)splits *
           (size_t)(a->head_dim + 2) * sizeof(float);
}

extern "C" sf_status sf_cuda_attention_decode_bf16(const sf_attention_args *a,
                                                   cudaStream_t stream) {
    sf_nvtx_range range("sf_cuda_attention_decode_bf16");
    DecodeParams p;
    p.a = *a;
    p.group = a->n_heads / a->n_kv_heads;
    p.scale_log2 = a->scale * 1.4426950408889634f;
    plan_splits(a, &p.splits, &p.split_keys);
    p.part_o = a->workspace;
    p.part_ml = a->workspace
                    ? a->workspace + (int64_t)a->n_requests * a->n_heads * p.splits * a->head_dim
                    : nullptr;
    switch (a->head_dim) {
        case 64: return launch_decode<64>(p, a, stream);
        case 80: return launch_decode<80>(p, a, stream);
        case 96: return launch_decode<96>(p, a, stream);
        default: return launch_decode<128>(p, a, stream);
    }
}
