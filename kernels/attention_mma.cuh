// Internal: the warp-level building blocks the attention kernels share (attention.cu, the
// forward; attention_backward.cu, the backward): the PTX wrappers of ptx_sm80.cuh (cp.async,
// ldmatrix, the bf16 m16n8k16 mma, bf16 packing), accumulators reused as A operands, and the
// causal/window visibility rule.
#pragma once

#include <stdint.h>

#include "ptx_sm80.cuh"

namespace sf_attn {

// Shared-memory rows are padded by 8 bf16 (16 bytes): for every supported head dim the 8 row
// addresses of an ldmatrix phase then fall on distinct 16-byte bank groups.
constexpr int kPad = 8;

// In mma_bf16_16816's fragment layout (ptx_sm80.cuh) the C layout of two adjacent n8 tiles
// (columns 16c .. 16c + 15) is the A layout of one k16 step over those columns: an accumulator
// tile becomes the next product's A operand in registers (see pack_c_as_a).

// The two bf16 of a pack, back in fp32 and summed.
__device__ __forceinline__ float sum_bf16x2(uint32_t x) {
    return __uint_as_float(x << 16) + __uint_as_float(x & 0xffff0000u);
}

// The fp32 accumulators of n8 tiles 2c and 2c + 1, rounded to bf16, as the A fragment of the
// k16 step over their 16 columns.
__device__ __forceinline__ void pack_c_as_a(uint32_t (&a)[4], const float (&lo)[4],
                                            const float (&hi)[4]) {
    a[0] = pack_bf16x2(lo[0], lo[1]);  // row g,     columns 2t, 2t+1
    a[1] = pack_bf16x2(lo[2], lo[3]);  // row g + 8, the same columns
    a[2] = pack_bf16x2(hi[0], hi[1]);  // row g,     columns 8 + 2t, +1
    a[3] = pack_bf16x2(hi[2], hi[3]);  // row g + 8
}

// The online softmax, shared by the forward kernels (attention.cu, attention_sm90.cu), on this
// thread's share of one tile of S in the C layout: rows g and g + 8, columns 2t, 2t + 1 of
// each n8 block.
//
// One n8 block c (c[0], c[1]: row g; c[2], c[3]: row g + 8; keys j, j + 1, j = the block's
// first key + 2t) into log2 units: scaled, keys outside a row's visible [lo, hi) set to -inf
// when mask, and each row's maximum taken into mx.
__device__ __forceinline__ void scale_mask_max(float *c, float scale_log2, bool mask, int32_t j,
                                               const int32_t (&lo)[2], const int32_t (&hi)[2],
                                               float (&mx)[2]) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float x = c[e] * scale_log2;
        if (mask) {
            const int32_t k = j + (e & 1);
            if (k < lo[e >> 1] || k >= hi[e >> 1]) x = -INFINITY;
        }
        c[e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
}

// Then, per row h: mx reduced over the row's four lanes (t = 0..3), m moved to the new running
// maximum; base[h] is what this tile's exponents subtract, alpha[h] = exp2(m_old - base) what
// the sums so far must be scaled by. A row that has seen only masked keys keeps m = -inf and
// subtracts 0 instead, so that exp2 gives 0, never NaN.
__device__ __forceinline__ void online_max_step(float (&mx)[2], float (&m)[2], float (&base)[2],
                                                float (&alpha)[2]) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m[h], mx[h]);
        base[h] = m_new == -INFINITY ? 0.0f : m_new;
        alpha[h] = exp2_ftz(m[h] - base[h]);
        m[h] = m_new;
    }
}

// The keys [lo, hi) of a request with kv_len keys that a query at position pos may see:
// causal: j <= pos and, with window > 0, pos - j < window; otherwise all of them.
__device__ __forceinline__ void visible_keys(bool causal, int32_t window, int64_t pos,
                                             int32_t kv_len, int32_t *lo, int32_t *hi) {
    int64_t l = 0, h = kv_len;
    if (causal) {
        if (pos + 1 < h) h = pos + 1;
        if (window > 0 && pos - window + 1 > l) l = pos - window + 1;
    }
    if (h < 0) h = 0;
    if (l > h) l = h;
    *lo = (int32_t)l;
    *hi = (int32_t)h;
}

}  // namespace sf_attn
