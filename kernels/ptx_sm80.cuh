// Internal: the sm_80+ PTX instructions the attention kernels use (attention.cu,
// attention_backward.cu, through attention_mma.cuh), one inline-asm wrapper each: shared-memory
// addresses, asynchronous global -> shared copies, ldmatrix, the bf16 m16n8k16 tensor-core mma,
// and the fp32 -> bf16x2 conversion. Nothing else in kernels/ writes PTX.
//
// tools/simt/ptx_sm80.cuh is this file's twin for the CPU emulator: the same functions, with
// the semantics each comment states. Keep the two in step.
#pragma once

#include <stdint.h>

namespace sf_attn {

// The shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared, asynchronously; with pred false the destination is zero-filled and
// nothing is read. The bytes land when a cp_async_wait covers this copy's group.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
// Closes this thread's copies issued since the last commit into one group.
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight (the N newest).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices, a warp-wide instruction: lanes 8m..8m+7 address the rows of matrix m
// (16-byte aligned). Register m receives row lane / 4, columns 2 (lane % 4) and +1 of matrix m,
// the lower column in the low half (.trans: of the transposed matrix).
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

// c[16x8] += a[16x16] b[16x8], bf16 inputs, fp32 accumulators, a warp-wide instruction. Lane l
// (g = l / 4, t = l % 4), each register two bf16 with the lower index in the low half:
//   a: {a[0], a[1], a[2], a[3]} = rows (g, g+8, g, g+8), columns (2t, 2t, 2t+8, 2t+8) and +1;
//   b: {b0, b1} = k rows (2t, 2t+8) and +1, column g;   c: c[0..1] row g, c[2..3] row g+8,
//   columns 2t, 2t+1.
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x on the special-function unit, subnormal inputs and results flushed to zero: one
// MUFU.EX2, where exp2f (without --use_fast_math) wraps it in a subnormal range check and two
// conditional multiplies (SASS of nvcc 13.0). A softmax weight of 2^-126 or less next to the
// row maximum's 1 is nothing in bf16 or in the fp32 row sum.
__device__ __forceinline__ float exp2_ftz(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
}

// Two floats -> bf16x2 (round to nearest even), lo in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

}  // namespace sf_attn
