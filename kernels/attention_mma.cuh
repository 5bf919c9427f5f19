// Internal: the warp-level building blocks the attention kernels share (attention.cu, the
// forward; attention_backward.cu, the backward): asynchronous global -> shared copies, ldmatrix,
// the bf16 m16n8k16 tensor-core mma, bf16 packing, and the causal/window visibility rule.
#pragma once

#include <stdint.h>

namespace sf_attn {

// Shared-memory rows are padded by 8 bf16 (16 bytes): for every supported head dim the 8 row
// addresses of an ldmatrix phase then fall on distinct 16-byte bank groups.
constexpr int kPad = 8;

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared, asynchronously; with pred false the destination is zero-filled and
// nothing is read.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 address the rows of matrix m. Register m receives
// row lane / 4, columns 2 (lane % 4) and +1 of matrix m (.trans: the transposed matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c[16x8] += a[16x16] b[16x8], bf16 inputs, fp32 accumulators. Lane l (g = l / 4, t = l % 4):
//   a: {a[0], a[1], a[2], a[3]} = rows (g, g+8, g, g+8), columns (2t, 2t, 2t+8, 2t+8) and +1;
//   b: {b0, b1} = k rows (2t, 2t+8) and +1, column g;   c: c[0..1] row g, c[2..3] row g+8,
//   columns 2t, 2t+1.
// Hence the C layout of two adjacent n8 tiles (columns 16c .. 16c + 15) is the A layout of one
// k16 step over those columns: an accumulator tile becomes the next product's A operand in
// registers (see pack_c_as_a).
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> bf16x2 (round to nearest even), lo in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
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
