// tools/simt: the race check's code (racecheck.h says what it checks), and the entry points
// GCC's -fsanitize=thread instrumentation calls from the kernels (run.sh RACE=1 builds the
// kernels with it) in place of ThreadSanitizer's runtime: each load and store the kernel code
// makes, outside the thread's own stack, reaches access(), which checks those that fall in the
// running block's shared memory or in device memory. Built without the instrumentation, so
// that the check's own loads and stores are neither checked nor a call each: as inline
// functions in the kernels' files they were about 250 calls to the hooks for each access
// checked, and the check ran 30 times slower than the kernels it checked.
#include <cxxabi.h>
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>

#include "shim.h"

#if EMU_RACECHECK
namespace emu::race {

static std::string where(const void *pc, uint32_t line) {
    if (line) {
        std::string s = (const char *)pc;
        if (s.size() > 160) s = s.substr(0, 157) + "...";
        return s + " line " + std::to_string(line);
    }
    Dl_info info;
    if (!pc || !dladdr(pc, &info)) {
        char b[32];
        snprintf(b, sizeof b, "%p", pc);
        return b;
    }
    if (!info.dli_sname) {  // a local symbol: where addr2line -f -e BINARY finds it
        char b[64];
        const size_t off = (size_t)((const char *)pc - (const char *)info.dli_fbase);
        snprintf(b, sizeof b, "offset 0x%zx", off);
        return b;
    }
    int ok = -1;
    char *name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &ok);
    std::string s = ok == 0 ? name : info.dli_sname;
    free(name);
    if (s.size() > 160) s = s.substr(0, 157) + "...";
    char b[48];
    snprintf(b, sizeof b, "+0x%zx", (size_t)((const char *)pc - (const char *)info.dli_saddr));
    return s + b;
}

static uint32_t *knows(int t) { return &st.V[(size_t)t * st.warps]; }

static bool ordered(const Stamp &p, int t) {
    if (p.tid == t) return true;
    const int w = t / 32;
    return knows(t)[p.warp] >= p.c || (p.warp == w && st.S[w] > p.s);
}

static void report(const char *what, const Stamp &p, int t, Site at, const void *addr) {
    st.races++;
    if (st.reported) return;
    st.reported = true;
    char b[256];
    const unsigned char *a = (const unsigned char *)addr;
    const bool dyn = a >= st.d_lo && a < st.d_hi;
    snprintf(b, sizeof b,
             "shared-memory race (%s) on %s shared byte %zu: thread %d (warp %d) at ", what,
             dyn ? "dynamic" : "static",
             (size_t)(dyn ? a - st.d_lo : a - st.s_lo), t, t / 32);
    std::string msg = b + where(at.pc, at.line);
    if (p.tid == -2)
        snprintf(b, sizeof b, ", and lanes of warp %d at ", p.warp);
    else
        snprintf(b, sizeof b, ", and thread %d (warp %d) at ", p.tid, p.warp);
    msg += b + where(p.pc, p.line) + ", with no barrier between them";
    snprintf(b, sizeof b, "block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
    st.found.push_back(std::string(st.kernel) + ": " + b + msg);
}

static Cell *cell_of(const unsigned char *p) {
    size_t i;
    if (p >= st.d_lo && p < st.d_hi)
        i = st.n_static + (size_t)(p - st.d_lo) / 2;
    else if (p >= st.s_lo && p < st.s_hi)
        i = (size_t)(p - st.s_lo) / 2;
    else
        return nullptr;
    Cell *c = reinterpret_cast<Cell *>(st.cells.data() + i * st.cell_bytes);
    if (c->gen != st.gen) {
        c->gen = st.gen;
        c->readers = 0;
        c->w = Stamp{};
    }
    return c;
}

// Thread t reads or writes [p, p + n); record false: a check only (a cp.async at issue).
void access(int t, const void *p, size_t n, bool write, Site at, bool record) {
    if (st.quiet || t < 0 || t >= st.n) return;
    const unsigned char *a = (const unsigned char *)p;
    if (!((a >= st.d_lo && a < st.d_hi) || (a >= st.s_lo && a < st.s_hi))) {
        global_access(t, p, n, write, at);
        return;
    }
    st.accesses++;
    const int w = t / 32;
    const Stamp now{st.C[w], st.S[w], (int16_t)t, (int16_t)w, at.line, at.pc};
    const uintptr_t first = (uintptr_t)a & ~(uintptr_t)1;
    for (uintptr_t q = first; q < (uintptr_t)a + n; q += 2) {
        Cell *c = cell_of((const unsigned char *)q);
        if (!c) continue;
        if (c->w.tid != -1 && !ordered(c->w, t))
            report(write ? "write after write" : "read after write", c->w, t, at, (void *)q);
        Stamp *r = reinterpret_cast<Stamp *>(c + 1);
        if (write) {
            for (uint32_t m = c->readers; m; m &= m - 1) {
                const int k = __builtin_ctz(m);
                if (!ordered(r[k], t)) report("write after read", r[k], t, at, (void *)q);
            }
            if (!record) continue;
            c->w = now;
            c->readers = 0;
        } else if (record) {
            Stamp &mine = r[w];
            if ((c->readers >> w & 1u) && mine.tid != t && mine.c == now.c && mine.s == now.s)
                mine.tid = -2;
            else
                mine = now;
            c->readers |= 1u << w;
        }
    }
}

// A block of n threads starts, with its static shared window at stat (kMaxStaticShared bytes)
// and dyn_bytes of dynamic shared memory at dyn: no access, no knowledge.
void block_begin(int n, const unsigned char *stat, const unsigned char *dyn, size_t dyn_bytes) {
    st.n = n;
    st.warps = (n + 31) / 32;
    st.reported = false;
    st.gen++;
    for (int w = 0; w < st.warps; w++) st.C[w] = st.S[w] = 1;
    st.V.assign((size_t)n * st.warps, 0);
    for (int i = 0; i < 16; i++) st.named_acc[i] = st.named_done[i] = Clock{};
    st.mbar.clear();
    // the shadow covers the static __shared__ section and the launch's dynamic bytes
    st.s_lo = stat;
    st.s_hi = stat ? stat + kMaxStaticShared : nullptr;
    st.d_lo = dyn;
    st.d_hi = dyn ? dyn + dyn_bytes : nullptr;
    st.n_static = st.s_lo ? (size_t)(st.s_hi - st.s_lo + 1) / 2 : 0;
    const size_t cell_bytes = sizeof(Cell) + st.warps * sizeof(Stamp);
    const size_t cells = st.n_static + (dyn_bytes + 1) / 2;
    if (cell_bytes != st.cell_bytes || st.cells.size() < cells * cell_bytes) {
        st.cell_bytes = cell_bytes;
        st.cells.assign(cells * cell_bytes, 0);
        st.gen = 1;
    }
}

// A launch starts: no device-memory access yet; allocations may have come and gone since the
// last one.
void launch_begin() {
    static const bool enabled = [] {
        const char *v = getenv("EMU_RACE_GLOBAL");
        return !v || atoi(v) != 0;
    }();
    g.on = enabled && (unsigned long long)gridDim.x * gridDim.y * gridDim.z > 1;
    g.gen++;
    g.reported = false;
    g.dev_lo = g.dev_hi = 0;
    g.host_lo = 1;
    g.host_hi = 0;
}

static GlobalCell *global_cell(uintptr_t q) {
    const uintptr_t page = q >> Global::kPageShift;
    if (page != g.last_page) {
        auto &slot = g.pages[page];
        if (!slot) {
            slot.reset(new GlobalCell[(size_t)1 << (Global::kPageShift - 1)]);
            for (size_t i = 0; i < (size_t)1 << (Global::kPageShift - 1); i++) slot[i].gen = 0;
        }
        g.last_page = page;
        g.last = slot.get();
    }
    GlobalCell *c = &g.last[(q & (((uintptr_t)1 << Global::kPageShift) - 1)) >> 1];
    if (c->gen != g.gen) *c = GlobalCell{g.gen, -1, -1, -1, -1};
    return c;
}

static std::string block_name(int32_t b) {
    const unsigned x = gridDim.x, y = gridDim.y;
    char s[64];
    snprintf(s, sizeof s, "block (%u,%u,%u)", (unsigned)b % x, ((unsigned)b / x) % y,
             (unsigned)b / (x * y));
    return s;
}

static void global_report(const char *what, int32_t other_block, int other_tid, int t, Site at,
                          uintptr_t q) {
    st.races++;
    if (g.reported) return;
    g.reported = true;
    char b[160];
    snprintf(b, sizeof b, "device-memory race between blocks (%s) on device byte 0x%zx (%zu "
             "bytes into its allocation): ", what, (size_t)q, (size_t)(q - g.dev_lo));
    std::string msg = std::string(st.kernel) + ": " + b;
    const int32_t me = (int32_t)(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
    snprintf(b, sizeof b, " thread %d at ", t);
    msg += block_name(me) + b + where(at.pc, at.line);
    if (other_block == -2) {
        msg += ", and other blocks reading it";
    } else {
        snprintf(b, sizeof b, " thread %d", other_tid);
        msg += ", and " + block_name(other_block) + b;
    }
    msg += ": the blocks of one launch run in no order";
    st.found.push_back(msg);
}

// Thread t of the running block reads or writes [p, p + n), outside shared memory: checked
// against the launch's other blocks when it is device memory.
void global_access(int t, const void *p, size_t n, bool write, Site at) {
    if (!g.on) return;
    const uintptr_t a = (uintptr_t)p;
    if (a >= g.host_lo && a < g.host_hi) return;
    if (!(a >= g.dev_lo && a < g.dev_hi)) {
        // its own stack (the fiber's locals), or the runtime's answer, kept for the next
        const char *stack = ctx.cur >= 0 && ctx.cur < (int)ctx.stacks.size()
                                ? ctx.stacks[ctx.cur] : nullptr;
        if (stack && p >= stack && p < stack + ctx.stack_size) return;
        uintptr_t lo, hi;
        if (!simt::device_range(p, &lo, &hi)) {
            g.host_lo = lo;
            g.host_hi = hi;
            return;
        }
        g.dev_lo = lo;
        g.dev_hi = hi;
    }
    st.global_accesses++;
    const int32_t me = (int32_t)(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
    const uintptr_t end = std::min(a + n, g.dev_hi);
    for (uintptr_t q = a & ~(uintptr_t)1; q < end; q += 2) {
        GlobalCell *c = global_cell(q);
        if (c->w_block >= 0 && c->w_block != me) {
            global_report(write ? "write after write" : "read after write", c->w_block,
                          c->w_tid, t, at, q);
        }
        if (write) {
            if (c->r_block == -2 || (c->r_block >= 0 && c->r_block != me)) {
                global_report("write after read", c->r_block, c->r_tid, t, at, q);
            }
            c->w_block = me;
            c->w_tid = (int16_t)t;
        } else if (c->r_block == -1 || c->r_block == me) {
            c->r_block = me;
            c->r_tid = (int16_t)t;
        } else {
            c->r_block = -2;
        }
    }
}

// Every thread passed __syncthreads.
void block_barrier() {
    for (int t = 0; t < st.n; t++)
        for (int w = 0; w < st.warps; w++) knows(t)[w] = st.C[w];
    for (int w = 0; w < st.warps; w++) {
        st.C[w]++;
        st.S[w]++;
    }
}

// A warp sync point of warp w's lanes in mask resolved: they know what each of them knew.
void warp_sync(int w, unsigned mask) {
    st.S[w]++;
    Clock all;
    for (int l = 0; l < 32; l++)
        if ((mask >> l) & 1u && w * 32 + l < st.n) all.join(knows(w * 32 + l), st.warps);
    for (int l = 0; l < 32; l++)
        if ((mask >> l) & 1u && w * 32 + l < st.n)
            for (int k = 0; k < st.warps; k++) knows(w * 32 + l)[k] = all.v[k];
}

// Thread t releases what it knows (and its warp's accesses so far) into x.
static void release(Clock &x, int t) {
    const int w = t / 32;
    x.join(knows(t), st.warps);
    x.v[w] = std::max(x.v[w], st.C[w]);
    st.C[w]++;
}
static void acquire(const Clock &x, int t) {
    uint32_t *k = knows(t);
    for (int i = 0; i < st.warps; i++) k[i] = std::max(k[i], x.v[i]);
}

// Named barrier id: an arrival of thread t, and the round it completes (complete: true).
void named_arrive(int id, int t, bool complete) {
    release(st.named_acc[id], t);
    if (complete) {
        st.named_done[id] = st.named_acc[id];
        st.named_acc[id] = Clock{};
    }
}
void named_passed(int id, int t) { acquire(st.named_done[id], t); }

static std::pair<Clock, Clock> &mbar_clocks(uint32_t bar) {
    for (auto &e : st.mbar)
        if (e.first == bar) return e.second;
    st.mbar.push_back({bar, {}});
    return st.mbar.back().second;
}
void mbar_arrive(uint32_t bar, int t) { release(mbar_clocks(bar).first, t); }
void mbar_phase_done(uint32_t bar) {
    auto &c = mbar_clocks(bar);
    c.second = c.first;
    c.first = Clock{};
}
void mbar_passed(uint32_t bar, int t) { acquire(mbar_clocks(bar).second, t); }

}  // namespace emu::race
#endif

namespace {
// the check's own code may still call an instrumented copy of an inline library function (the
// linker keeps one of each): its accesses are not the kernel's
bool inside = false;
inline void hook(void *p, size_t n, bool write, void *pc) {
    // most accesses are the thread's own locals (fragments, accumulators): the first test
    if ((const char *)p >= emu::ctx.stack_lo && (const char *)p < emu::ctx.stack_hi) return;
    if (inside || emu::ctx.cur < 0) return;
    inside = true;
    emu::race::access(emu::ctx.cur, p, n, write, {pc, 0});
    inside = false;
}
}  // namespace

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void **, void *) {}
void __tsan_vptr_read(void **) {}
void __tsan_read_range(void *p, size_t n) { hook(p, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void *p, size_t n) { hook(p, n, true, __builtin_return_address(0)); }
#define EMU_TSAN_ACCESS(N)                                                                     \
    void __tsan_read##N(void *p) { hook(p, N, false, __builtin_return_address(0)); }           \
    void __tsan_write##N(void *p) { hook(p, N, true, __builtin_return_address(0)); }           \
    void __tsan_unaligned_read##N(void *p) { hook(p, N, false, __builtin_return_address(0)); } \
    void __tsan_unaligned_write##N(void *p) { hook(p, N, true, __builtin_return_address(0)); } \
    void __tsan_volatile_read##N(void *p) { hook(p, N, false, __builtin_return_address(0)); }  \
    void __tsan_volatile_write##N(void *p) { hook(p, N, true, __builtin_return_address(0)); }
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
}

// Atomic builtins in the instrumented code (the emulator's std::shared_ptr counts, and the
// like): done as they would be, sequentially consistent (memory orders are ignored).
extern "C" {
#define EMU_SC __ATOMIC_SEQ_CST
#define EMU_TSAN_RMW(N, T, OP)                                                          \
    T __tsan_atomic##N##_##OP(volatile T *a, T v, int) { return __atomic_##OP(a, v, EMU_SC); }
#define EMU_TSAN_ATOMIC(N, T)                                                           \
    T __tsan_atomic##N##_load(const volatile T *a, int) { return __atomic_load_n(a, EMU_SC); } \
    void __tsan_atomic##N##_store(volatile T *a, T v, int) { __atomic_store_n(a, v, EMU_SC); } \
    T __tsan_atomic##N##_exchange(volatile T *a, T v, int) {                            \
        return __atomic_exchange_n(a, v, EMU_SC);                                       \
    }                                                                                   \
    EMU_TSAN_RMW(N, T, fetch_add)                                                       \
    EMU_TSAN_RMW(N, T, fetch_sub)                                                       \
    EMU_TSAN_RMW(N, T, fetch_and)                                                       \
    EMU_TSAN_RMW(N, T, fetch_or)                                                        \
    EMU_TSAN_RMW(N, T, fetch_xor)                                                       \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T *a, T *c, T v, int, int) { \
        return __atomic_compare_exchange_n(a, c, v, false, EMU_SC, EMU_SC);             \
    }                                                                                   \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T *a, T *c, T v, int, int) {  \
        return __atomic_compare_exchange_n(a, c, v, false, EMU_SC, EMU_SC);             \
    }                                                                                   \
    T __tsan_atomic##N##_compare_exchange_val(volatile T *a, T c, T v, int, int) {      \
        __atomic_compare_exchange_n(a, &c, v, false, EMU_SC, EMU_SC);                   \
        return c;                                                                       \
    }
EMU_TSAN_ATOMIC(8, char)
EMU_TSAN_ATOMIC(16, short)
EMU_TSAN_ATOMIC(32, int)
EMU_TSAN_ATOMIC(64, long)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(EMU_SC); }
void __tsan_atomic_signal_fence(int) {}
}
