// tools/simt: kernels/ptx_sm80.cuh's twin on the emulator. run.sh puts it in place of the real
// header, so attention.cu and attention_backward.cu run unchanged with these semantics, written
// from the PTX ISA's descriptions of each instruction (the fragment layouts of mma.m16n8k16 and
// ldmatrix are those the real header's comments state):
//   - smem_u32: dynamic shared memory from address 0 (shim.h's shared_address).
//   - cp.async: the source is read at issue, the destination written when a cp_async_wait
//     covers the copy's group, so a thread that reads shared memory before its wait (or before
//     the barrier after another thread's wait) sees the poison instead.
//   - ldmatrix (.trans): every lane of the warp at once; row addresses must be 16-byte aligned
//     and lie in shared memory.
//   - mma.m16n8k16 bf16 -> fp32: the 16 products of each output and its accumulator summed
//     exactly (in double; bf16 products are exact in double) and rounded once to fp32. Tensor
//     cores sum in fp32 in an order of their own and truncate; EMU_MMA=rz models the worst of
//     that the tests' bounds allow instead: the accumulator plus one product at a time, each
//     sum truncated (rounded toward zero) to fp32, which loses up to an ulp per addition.
//   - cvt.rn.bf16x2.f32: round to nearest even, NaN to the canonical 0x7fff.
#pragma once

#include <stdint.h>

namespace sf_attn {

namespace ptx_emu {

inline void report(const std::string &what) {
    char b[96];
    snprintf(b, sizeof b, "block (%u,%u,%u) thread %u: ", blockIdx.x, blockIdx.y, blockIdx.z,
             threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
    emu::errors.push_back(b + what);
}

inline std::string hex(uint32_t a) {
    char b[16];
    snprintf(b, sizeof b, "0x%x", a);
    return b;
}

struct Ldmatrix {
    uint32_t addr;
    uint32_t r[4];
};

// ldmatrix.x4 (trans: .trans): lane l receives, in register m, the two b16 at row l / 4,
// columns 2 (l % 4) and +1 of matrix m (of its transpose with .trans), the lower column in the
// low half; lanes 8m .. 8m + 7 give the addresses of matrix m's rows.
template <bool kTrans>
bool ldmatrix_x4(void *const io[32], unsigned mask, std::string &err) {
    if (mask != 0xffffffffu) {
        err = "ldmatrix .aligned needs every lane of the warp";
        return false;
    }
    const unsigned char *rows[32];
    for (int l = 0; l < 32; l++) {
        const uint32_t a = static_cast<const Ldmatrix *>(io[l])->addr;
        rows[l] = emu::shared_pointer(a, 16);
        if (a % 16 != 0 || !rows[l]) {
            err = "ldmatrix: lane " + std::to_string(l) + "'s row address " + hex(a) +
                  (a % 16 ? " is not 16-byte aligned" : " is outside shared memory");
            return false;
        }
    }
    auto elem = [&](int m, int row, int col) {
        uint16_t v;
        memcpy(&v, rows[8 * m + row] + 2 * col, 2);
        return (uint32_t)v;
    };
    for (int l = 0; l < 32; l++) {
        Ldmatrix *d = static_cast<Ldmatrix *>(io[l]);
        const int i = l / 4, j = 2 * (l % 4);
        for (int m = 0; m < 4; m++)
            d->r[m] = kTrans ? elem(m, j, i) | elem(m, j + 1, i) << 16
                             : elem(m, i, j) | elem(m, i, j + 1) << 16;
    }
    return true;
}

struct Mma {
    uint32_t a[4], b[2];
    float c[4];
};

// mma.m16n8k16.row.col.f32.bf16.bf16.f32: D = A B + C with A 16x16, B 16x8 (k x n), from the
// lanes' fragments (g = l / 4, t = l % 4; the low half of a register is the lower index):
//   a[0]: A[g][2t..2t+1]  a[1]: A[g+8][2t..2t+1]  a[2]: A[g][2t+8..2t+9]  a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]  b[1]: B[2t+8..2t+9][g]
//   c[0..1]: C[g][2t..2t+1]  c[2..3]: C[g+8][2t..2t+1]
// EMU_MMA=rz: sequential fp32 sums rounded toward zero (see the top of the file).
inline bool mma_truncates() {
    static const bool rz = [] {
        const char *m = getenv("EMU_MMA");
        return m && strcmp(m, "rz") == 0;
    }();
    return rz;
}
// a + b rounded toward zero to fp32 (b: a product of two bf16, exact in double). The exact sum
// is x + e (TwoSum); f, the nearest float to x, steps toward zero when it lies beyond x + e.
inline float add_rz(float a, double b) {
    const double x = (double)a + b;
    const double bp = x - (double)a, ap = x - bp;
    const double e = ((double)a - ap) + (b - bp);
    float f = (float)x;
    const double beyond = ((double)f - x) - e;  // sign of f - (x + e)
    if ((x > 0 && beyond > 0) || (x < 0 && beyond < 0)) f = std::nextafter(f, 0.0f);
    return f;
}

inline bool mma_bf16_16816(void *const io[32], unsigned mask, std::string &err) {
    if (mask != 0xffffffffu) {
        err = "mma.sync .aligned needs every lane of the warp";
        return false;
    }
    auto lo = [](uint32_t x) { return (double)emu::bf2f((unsigned short)(x & 0xffffu)); };
    auto hi = [](uint32_t x) { return (double)emu::bf2f((unsigned short)(x >> 16)); };
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const Mma *f = static_cast<const Mma *>(io[l]);
        const int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; h++) {  // h: rows g, g + 8 (A, C); k rows 2t, 2t + 8 (B)
            A[g + 8 * h][2 * t] = lo(f->a[h]);
            A[g + 8 * h][2 * t + 1] = hi(f->a[h]);
            A[g + 8 * h][2 * t + 8] = lo(f->a[2 + h]);
            A[g + 8 * h][2 * t + 9] = hi(f->a[2 + h]);
            B[2 * t + 8 * h][g] = lo(f->b[h]);
            B[2 * t + 8 * h + 1][g] = hi(f->b[h]);
            C[g + 8 * h][2 * t] = f->c[2 * h];
            C[g + 8 * h][2 * t + 1] = f->c[2 * h + 1];
        }
    }
    for (int l = 0; l < 32; l++) {
        Mma *f = static_cast<Mma *>(io[l]);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; i++) {
            const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
            if (mma_truncates()) {
                float s = (float)C[row][col];
                for (int k = 0; k < 16; k++) s = add_rz(s, A[row][k] * B[k][col]);
                f->c[i] = s;
            } else {
                double s = C[row][col];
                for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
                f->c[i] = (float)s;
            }
        }
    }
    return true;
}

}  // namespace ptx_emu

inline uint32_t smem_u32(const void *p) {
    uint32_t a = 0;
    if (!emu::shared_address(p, &a)) ptx_emu::report("smem_u32 of a pointer outside shared memory");
    return a;
}

inline void cp_async_16(uint32_t dst, const void *src, bool pred, EMU_LOC) {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    unsigned char *d = emu::shared_pointer(dst, 16);
    if (!d || dst % 16) {
        ptx_emu::report("cp.async to shared address " + ptx_emu::hex(dst) +
                        (d ? ", not 16-byte aligned" : ", outside shared memory"));
        return;
    }
    if (pred && (uintptr_t)src % 16) {
        ptx_emu::report("cp.async from a global address that is not 16-byte aligned");
        return;
    }
    emu::AsyncCopy c{d, {}, 16};
    if (pred) memcpy(c.bytes, src, 16);  // src-size 0: zero fill, nothing read
    me.async_open.push_back(c);
    // the write may land any time until the wait: what it overwrites must be done with now
    emu::race::access(emu::ctx.cur, d, 16, true, emu::race::site(loc), false);
}
inline void cp_async_commit() {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    me.async_groups.push_back(std::move(me.async_open));
    me.async_open.clear();
}
template <int N>
inline void cp_async_wait(EMU_LOC) {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    while (me.async_groups.size() > (size_t)N) {
        for (const emu::AsyncCopy &c : me.async_groups.front()) {
            memcpy(c.dst, c.bytes, c.n);
            emu::race::access(emu::ctx.cur, c.dst, c.n, true, emu::race::site(loc));
        }
        me.async_groups.erase(me.async_groups.begin());
    }
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, EMU_LOC) {
    emu::race::access(emu::ctx.cur, emu::shared_pointer(addr, 16), 16, false, emu::race::site(loc));
    ptx_emu::Ldmatrix io{addr, {}};
    emu::warp_custom(ptx_emu::ldmatrix_x4<false>, &io, 0xffffffffu, loc);
    for (int m = 0; m < 4; m++) r[m] = io.r[m];
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr, EMU_LOC) {
    emu::race::access(emu::ctx.cur, emu::shared_pointer(addr, 16), 16, false, emu::race::site(loc));
    ptx_emu::Ldmatrix io{addr, {}};
    emu::warp_custom(ptx_emu::ldmatrix_x4<true>, &io, 0xffffffffu, loc);
    for (int m = 0; m < 4; m++) r[m] = io.r[m];
}

inline void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                           EMU_LOC) {
    ptx_emu::Mma io{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
    emu::warp_custom(ptx_emu::mma_bf16_16816, &io, 0xffffffffu, loc);
    for (int i = 0; i < 4; i++) c[i] = io.c[i];
}

inline float exp2_ftz(float x) {  // ex2.approx.ftz: subnormals in and out are 0
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
    const float r = exp2f(x);
    return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}

inline uint32_t pack_bf16x2(float lo, float hi) {
    return (uint32_t)emu::f2bf_rn(lo) | (uint32_t)emu::f2bf_rn(hi) << 16;
}

}  // namespace sf_attn
