// tools/simt: kernels/ptx_sm90.cuh's twin on the emulator (run.sh puts it in place of the real
// header), written from the semantics the real header's comments state, which are this
// project's reading of the PTX ISA. Unlike ptx_sm80.cuh's, these layouts have not been pinned by
// a GPU run: a pass here says a kernel agrees with that reading, and the first GPU run of
// CudaAttention/*/sm90 says whether the reading is right.
//   - wgmma (wgmma_ss, wgmma_rs_bt): resolved per warp (a warp's 16 rows of D need only its
//     own rows of A and all of B), every lane of the warp taking part; that all four warps of
//     the warpgroup issue it is not checked. Operands are read from shared memory through the
//     descriptor (no-swizzle layout only; anything else is an error), every address checked.
//     The result is computed at issue and lands in the accumulator registers only when a
//     wgmma_wait covers its group, so a kernel that reads or rescales accumulators before the
//     wait sees the old values; a later wgmma of the same group chains on the pending result.
//     The hardware may read the operands at any time until then, so the wait that retires a
//     wgmma reads them again: a register A operand, or a shared-memory operand, written
//     between issue and wait (a buffer refilled too early) is reported.
//     Sums as ptx_sm80.cuh's mma (exact, or EMU_MMA=rz).
//   - wgmma_fence and fence_proxy_async: no effect (memory here is sequentially consistent);
//     reg_fence neither (it only constrains nvcc's scheduling).
//   - mbarriers: the state (pending and expected arrivals, phase parity, a tag that catches use
//     before mbar_init) lives in the barrier's 8 bytes of shared memory. cp_async_mbar_arrive
//     takes every copy the thread has in flight off its cp.async groups and attaches it to the
//     barrier: the bytes land when the phase completes, not before. A phase with copies
//     completes either at its last arrival (eagerly) or only when a thread next waits on the
//     barrier or arrives on it again (lazily), a coin flip per phase: eager landing catches a
//     buffer refilled while a product still reads it, lazy landing a consumer that reads a
//     buffer without waiting for its phase (it sees the poison, or the old tile). mbar_wait
//     suspends the thread until the phase of that parity has completed; a wait that can never
//     end is a deadlock the scheduler reports. mbar_arrive yields, so the threads it releases
//     may run (and refill a buffer) before the arriving thread's next step.
//   - named barriers: shim.h's named_barrier (bar.sync waits, bar.arrive does not).
//   - setmaxnreg: no effect (registers are not modelled).
#pragma once

#include <stdint.h>

#include "ptx_sm80.cuh"  // ptx_emu::report, hex, mma_truncates, add_rz
#include "wgmma_layout.cuh"  // tile_offset, wgmma_desc: the kernel's own

namespace sf_attn {

namespace ptx_emu {

struct Wgmma {
    float *d;       // this thread's accumulators
    int n;          // N: the thread holds n / 2 of them
    uint64_t a, b;  // descriptors (a: unused with register A)
    uint32_t a_regs[4];
    const uint32_t *a_src;  // the kernel's register A operand (checked at the wait)
    bool a_in_regs, b_trans;
    int accumulate;
    int warp_in_group;
    emu::Fiber *self;  // the issuing thread (its pending results)
};

// Where the race check says a wgmma read its shared-memory operands.
inline emu::race::Site race_site() {
#if EMU_RACECHECK
    return {"a wgmma's shared-memory operand (read at issue, and until its wait)", 1};
#else
    return {};
#endif
}

// Operands read at issue (in the resolver, outside any fiber) count as thread t's for the
// race check; at the retiring wait they are the waiting thread's own.
struct RaceReader {
#if EMU_RACECHECK
    int saved;
    explicit RaceReader(int t) : saved(emu::race::st.attrib) { emu::race::st.attrib = t; }
    ~RaceReader() { emu::race::st.attrib = saved; }
#else
    explicit RaceReader(int) {}
#endif
};

// One 16-byte row of a core matrix of a no-swizzle operand, as 8 values: core matrix
// (mn / 8, k / 8) lies at (mn / 8) * sbo + (k / 8) * lbo from the start, 16 bytes per row.
// K-major: the row of (mn, k) holds k rounded down to 8 and the 7 after it; MN-major: mn
// rounded down to 8 and the 7 after it.
inline bool desc_row(uint64_t desc, int mn, int k, bool mn_major, double (&out)[8],
                     std::string &err) {
    if (desc >> 62) {
        err = "wgmma: swizzled descriptor (not modelled)";
        return false;
    }
    if ((desc >> 49) & 7) {
        err = "wgmma: descriptor base offset (not modelled)";
        return false;
    }
    const uint32_t start = (uint32_t)(desc & 0x3FFF) << 4;
    const uint32_t lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4;
    const uint32_t sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    const uint32_t addr = start + (mn / 8) * sbo + (k / 8) * lbo +
                          (mn_major ? (k % 8) * 16 : (mn % 8) * 16);
    const unsigned char *p = emu::shared_pointer(addr, 16);
    if (!p) {
        err = "wgmma: operand address " + hex(addr) + " outside shared memory";
        return false;
    }
    // the race check's read, by the thread the caller names (emu::race::st.attrib)
    emu::race::access(emu::race::current_thread(), p, 16, false, race_site());
    uint16_t v[8];
    {
        emu::race::Quiet q;
        memcpy(v, p, 16);
    }
    for (int j = 0; j < 8; j++) out[j] = emu::bf2f(v[j]);
    return true;
}

// The value the thread's accumulator i has for the next wgmma: a pending result, else the
// register.
inline float acc_in(const emu::Fiber &f, const float *d, int i) {
    for (auto it = f.acc_open.rbegin(); it != f.acc_open.rend(); ++it)
        if (it->d == d) return it->v[i];
    for (auto g = f.acc_groups.rbegin(); g != f.acc_groups.rend(); ++g)
        for (auto it = g->rbegin(); it != g->rend(); ++it)
            if (it->d == d) return it->v[i];
    return d[i];
}

// The shared-memory operands of one warp's wgmma, as read at issue: B, and A unless it comes
// from registers. Checked again when the last lane's wait retires it.
struct Operands {
    uint64_t a, b;
    int n, wq;
    bool a_in_regs, b_trans;
    double A[16][16], B[16][256];
    int retired = 0;
};

inline bool read_shared_operands(const Operands &op, double (&A)[16][16], double (&B)[16][256],
                                 std::string &err) {
    double v[8];
    if (!op.a_in_regs) {  // K-major: a row holds 8 k
        for (int r = 0; r < 16; r++)
            for (int k = 0; k < 16; k += 8) {
                if (!desc_row(op.a, 16 * op.wq + r, k, false, v, err)) return false;
                for (int j = 0; j < 8; j++) A[r][k + j] = v[j];
            }
    }
    if (op.b_trans) {  // MN-major: a row holds 8 columns
        for (int k = 0; k < 16; k++)
            for (int c = 0; c < op.n; c += 8) {
                if (!desc_row(op.b, c, k, true, v, err)) return false;
                for (int j = 0; j < 8; j++) B[k][c + j] = v[j];
            }
    } else {
        for (int c = 0; c < op.n; c++)
            for (int k = 0; k < 16; k += 8) {
                if (!desc_row(op.b, c, k, false, v, err)) return false;
                for (int j = 0; j < 8; j++) B[k + j][c] = v[j];
            }
    }
    return true;
}

// At the wait that retires one lane's share of a wgmma: its register A operand and, once the
// warp's last lane retires it, the shared-memory operands must still hold what was read at
// issue (bitwise: NaN poison compares by its bits).
inline void check_unchanged(const emu::PendingAcc &r) {
    if (r.a_src && memcmp(r.a_src, r.a_val, sizeof r.a_val) != 0)
        report("wgmma: register A operand written before the wgmma_wait that retires it");
    Operands &op = *static_cast<Operands *>(r.operands.get());
    static thread_local double A[16][16], B[16][256];
    std::string err;
    // the race check's reads: the product is done once one lane's wait returns
    if (++op.retired == 1 && emu::race::kOn) (void)read_shared_operands(op, A, B, err);
    if (op.retired < 32) return;
    emu::race::Quiet quiet;  // the emulator's own check, not the kernel's
    if (!read_shared_operands(op, A, B, err)) {
        report(err + " (at the wait)");
        return;
    }
    const bool same_a = op.a_in_regs || memcmp(A, op.A, sizeof A) == 0;
    bool same_b = true;
    for (int k = 0; k < 16 && same_b; k++)
        same_b = memcmp(B[k], op.B[k], op.n * sizeof(double)) == 0;
    if (!same_a || !same_b)
        report(std::string("wgmma: shared-memory operand ") + (same_a ? "B" : "A") +
               " written between issue and the wgmma_wait that retires it");
}

inline bool wgmma(void *const io[32], unsigned mask, std::string &err) {
    if (mask != 0xffffffffu) {
        err = "wgmma .sync.aligned needs every lane of the warp";
        return false;
    }
    const Wgmma &w0 = *static_cast<const Wgmma *>(io[0]);
    const int n = w0.n, wq = w0.warp_in_group;
    for (int l = 1; l < 32; l++) {
        const Wgmma &w = *static_cast<const Wgmma *>(io[l]);
        if (w.n != n || w.a != w0.a || w.b != w0.b || w.b_trans != w0.b_trans ||
            w.accumulate != w0.accumulate || w.warp_in_group != wq) {
            err = "wgmma: lanes disagree on the instruction's operands";
            return false;
        }
    }
    auto snap = std::make_shared<Operands>();
    Operands &op = *snap;
    op.a = w0.a;
    op.b = w0.b;
    op.n = n;
    op.wq = wq;
    op.a_in_regs = w0.a_in_regs;
    op.b_trans = w0.b_trans;
    double (&A)[16][16] = op.A;
    double (&B)[16][256] = op.B;
    {
        RaceReader reader((int)(w0.self - emu::ctx.f.data()));  // the warp's lane 0
        if (!read_shared_operands(op, A, B, err)) return false;
    }
    if (w0.a_in_regs) {
        auto lo = [](uint32_t x) { return (double)emu::bf2f((unsigned short)(x & 0xffffu)); };
        auto hi = [](uint32_t x) { return (double)emu::bf2f((unsigned short)(x >> 16)); };
        for (int l = 0; l < 32; l++) {  // the mma.m16n8k16 A layout
            const uint32_t *a = static_cast<const Wgmma *>(io[l])->a_regs;
            const int g = l / 4, t = l % 4;
            for (int h = 0; h < 2; h++) {
                A[g + 8 * h][2 * t] = lo(a[h]);
                A[g + 8 * h][2 * t + 1] = hi(a[h]);
                A[g + 8 * h][2 * t + 8] = lo(a[2 + h]);
                A[g + 8 * h][2 * t + 9] = hi(a[2 + h]);
            }
        }
    }
    for (int l = 0; l < 32; l++) {
        const Wgmma &w = *static_cast<const Wgmma *>(io[l]);
        emu::Fiber &f = *w.self;
        emu::PendingAcc r{w.d, n / 2, {}, w.a_src, {}, snap};
        if (w.a_in_regs) memcpy(r.a_val, w.a_regs, sizeof r.a_val);
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < n / 2; i++) {
            const int row = g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * t + i % 2;
            const float c = w.accumulate ? acc_in(f, w.d, i) : 0.0f;
            if (mma_truncates()) {
                float s = c;
                for (int k = 0; k < 16; k++) s = add_rz(s, A[row][k] * B[k][col]);
                r.v[i] = s;
            } else {
                double s = c;
                for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
                r.v[i] = (float)s;
            }
        }
        f.acc_open.push_back(r);
    }
    return true;
}

// mbarrier state in its 8 bytes: pending arrivals (bits 0..19; 0: every arrival has happened
// and the phase waits for its copies to land), expected per phase (20..39), phase parity (40),
// and kMbarTag in bits 48..63.
constexpr uint64_t kMbarTag = 0x5b47ull << 48;
struct Mbar {
    uint64_t *word;
    uint32_t pending() const { return (uint32_t)(*word & 0xFFFFF); }
    uint32_t expected() const { return (uint32_t)((*word >> 20) & 0xFFFFF); }
    uint32_t phase() const { return (uint32_t)((*word >> 40) & 1); }
    void set(uint32_t pending, uint32_t expected, uint32_t phase) {
        *word = kMbarTag | (uint64_t)phase << 40 | (uint64_t)expected << 20 | pending;
    }
};
// Copies attached to each mbarrier (by shared address), landing when its phase completes.
inline std::vector<std::pair<uint32_t, std::vector<emu::AsyncCopy>>> mbar_copies;
inline std::vector<emu::AsyncCopy> &copies_of(uint32_t bar) {
    for (auto &e : mbar_copies)
        if (e.first == bar) return e.second;
    mbar_copies.push_back({bar, {}});
    return mbar_copies.back().second;
}
// Points m at the mbarrier at shared address bar; false (reported) where there is none.
inline bool mbar_at(uint32_t bar, const char *op, Mbar *m) {
    unsigned char *p = emu::shared_pointer(bar, 8);
    if (!p || bar % 8) {
        report(std::string(op) + ": " + hex(bar) + " is not an 8-byte aligned shared address");
        return false;
    }
    m->word = reinterpret_cast<uint64_t *>(p);
    if ((*m->word & (0xFFFFull << 48)) != kMbarTag) {
        report(std::string(op) + ": the mbarrier at " + hex(bar) + " was never initialised");
        return false;
    }
    return true;
}
// Completes a phase whose arrivals have all happened: its copies land, the parity flips.
inline void mbar_complete(uint32_t bar, Mbar m) {
    emu::race::mbar_phase_done(bar);
    std::vector<emu::AsyncCopy> &c = copies_of(bar);
    for (const emu::AsyncCopy &a : c) memcpy(a.dst, a.bytes, a.n);
    c.clear();
    m.set(m.expected(), m.expected(), m.phase() ^ 1);
}
inline void mbar_arrive_on(uint32_t bar, const char *op) {
    emu::race::Quiet quiet;  // the mbarrier's own word
    Mbar m;
    if (!mbar_at(bar, op, &m)) return;
    if (m.pending() == 0) mbar_complete(bar, m);  // a lazily completing phase: it is over now
    emu::race::mbar_arrive(bar, emu::ctx.cur);    // this arrival belongs to the phase now open
    if (m.pending() > 1) {
        m.set(m.pending() - 1, m.expected(), m.phase());
    } else if (!copies_of(bar).empty() && emu::ctx.rng() % 2) {
        m.set(0, m.expected(), m.phase());  // lazily: at the next wait or arrival
    } else {
        mbar_complete(bar, m);
    }
}

inline void issue(Wgmma io, const std::source_location &loc) {
    io.warp_in_group = emu::ctx.cur / 32 % 4;
    io.self = &emu::ctx.f[emu::ctx.cur];
    emu::warp_custom(wgmma, &io, 0xffffffffu, loc);
}

}  // namespace ptx_emu

template <int N>
inline void reg_fence(float (&)[N]) {}  // no compiler to hold back here
template <int N>
inline void reg_fence(uint32_t (&)[N]) {}
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void wgmma_commit() {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    me.acc_groups.push_back(std::move(me.acc_open));
    me.acc_open.clear();
}
template <int N>
inline void wgmma_wait() {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    while (me.acc_groups.size() > (size_t)N) {
        for (const emu::PendingAcc &r : me.acc_groups.front()) {
            ptx_emu::check_unchanged(r);
            for (int i = 0; i < r.n; i++) r.d[i] = r.v[i];
        }
        me.acc_groups.erase(me.acc_groups.begin());
    }
}

inline void mbar_init(uint32_t bar, uint32_t count) {
    emu::race::Quiet quiet;  // the mbarrier's own word
    unsigned char *p = emu::shared_pointer(bar, 8);
    if (!p || bar % 8 || count == 0 || count > 0xFFFFF) {
        ptx_emu::report("mbar_init: address " + ptx_emu::hex(bar) + ", count " +
                        std::to_string(count));
        return;
    }
    std::vector<emu::AsyncCopy> &c = ptx_emu::copies_of(bar);
    if (!c.empty()) {
        ptx_emu::report("mbar_init: copies attached to the mbarrier at " + ptx_emu::hex(bar) +
                        " (in an earlier block) never landed");
        c.clear();
    }
    ptx_emu::Mbar{reinterpret_cast<uint64_t *>(p)}.set(count, count, 0);
}
// The arriving thread then yields, so that the threads its arrival released may run before it
// goes on (a consumer that frees a buffer before its last read of it is then caught).
inline void mbar_arrive(uint32_t bar) {
    ptx_emu::mbar_arrive_on(bar, "mbar_arrive");
    emu::yield();
}
inline void cp_async_mbar_arrive(uint32_t bar, EMU_LOC) {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    std::vector<emu::AsyncCopy> &c = ptx_emu::copies_of(bar);
    const size_t first = c.size();
    for (auto &g : me.async_groups) c.insert(c.end(), g.begin(), g.end());
    c.insert(c.end(), me.async_open.begin(), me.async_open.end());
    // the copies' writes, published by this arrival (they land when its phase completes)
    for (size_t i = first; i < c.size(); i++)
        emu::race::access(emu::ctx.cur, c[i].dst, c[i].n, true, emu::race::site(loc));
    me.async_groups.clear();
    me.async_open.clear();
    ptx_emu::mbar_arrive_on(bar, "cp_async_mbar_arrive");
}
inline void mbar_wait(uint32_t bar, uint32_t parity, EMU_LOC) {
    ptx_emu::Mbar m;
    {
        emu::race::Quiet quiet;  // the mbarrier's own word (no yield while quiet)
        if (!ptx_emu::mbar_at(bar, "mbar_wait", &m)) return;
    }
    // the phase of this parity has completed once the current phase has the other parity (a
    // phase that completes lazily does so now)
    emu::block_until(
        [m, bar, parity] {
            emu::race::Quiet quiet;
            if (m.pending() == 0) ptx_emu::mbar_complete(bar, m);
            return m.phase() != (parity & 1);
        },
        "mbar_wait", loc);
    emu::race::mbar_passed(bar, emu::ctx.cur);
}
inline void named_bar_sync(int id, int count, EMU_LOC) {
    std::string err;
    if (!emu::named_barrier(id, count, true, err, loc)) ptx_emu::report("bar.sync: " + err);
}
inline void named_bar_arrive(int id, int count, EMU_LOC) {
    std::string err;
    if (!emu::named_barrier(id, count, false, err, loc)) ptx_emu::report("bar.arrive: " + err);
}
template <int N>
inline void setmaxnreg_dec() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
}
template <int N>
inline void setmaxnreg_inc() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
}

template <int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate, EMU_LOC) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma: N a multiple of 8 in [8, 256]");
    ptx_emu::issue({d, N, a, b, {}, nullptr, false, false, accumulate, 0, nullptr}, loc);
}
template <int N>
inline void wgmma_rs_bt(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate,
                        EMU_LOC) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma: N a multiple of 8 in [8, 256]");
    ptx_emu::issue({d, N, 0, b, {a[0], a[1], a[2], a[3]}, a, true, true, accumulate, 0, nullptr},
                   loc);
}

}  // namespace sf_attn
