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
