// tools/simt: a race check (run.sh RACE=1) for shared memory, the emulator's counterpart of
// compute-sanitizer's racecheck, and for device memory between the blocks of a launch, which
// no CUDA tool checks. Included by shim.h; with EMU_RACECHECK unset every hook below is an
// empty inline function.
//
// RACE=1 compiles the kernels with GCC's -fsanitize=thread instrumentation but without its
// runtime: every load and store the kernel code makes calls a __tsan_readN / __tsan_writeN
// defined in racecheck.cpp, which hands those that fall in the block's shared memory (static
// __shared__ and the launch's dynamic bytes) to access() below. The emulator adds what the
// instrumentation cannot see: ldmatrix's row reads, cp.async writes (checked at issue, recorded
// where they complete: the wait, or the arrival on an mbarrier), and wgmma's shared-memory
// operands (read at issue, and again where the first lane's wait retires the product).
//
// Order (happens-before) within a block, as the hardware gives it:
//   - program order within a thread;
//   - __syncthreads: everything before it, in any thread, before everything after it;
//   - warp sync points (__syncwarp, shuffles, votes: not mma or ldmatrix): between the lanes
//     of that warp;
//   - named barriers (bar.sync, bar.arrive) and mbarriers: an arrival releases what its thread
//     knows, a completed bar.sync or mbarrier wait acquires it.
// Two accesses to one shared 2-byte cell from different threads, at least one a write, with
// no such order between them, are a race: the first in each block is reported as an emulator
// error (which fails the test that launched it) with both accesses' code addresses.
//
// What it knows is kept per warp, not per thread (FastTrack's epochs over warps): an access
// is stamped with its warp's clock, which every release by a lane of that warp advances, so
// a lane's release also publishes its warp-mates' earlier accesses. That misses a race
// between a thread and a warp-mate of an arriving thread; it never invents one. Atomics are
// exempt (they may race by design), and so are the emulator's own accesses (the mbarrier
// words, operand checks).
//
// Device memory (global_access below). The blocks of one launch run in no order the kernel
// may rely on: nothing here uses grid-wide synchronisation, or the fence-and-counter hand-over
// of a "last block" reduction. So two accesses to one 2-byte cell of a device allocation from
// different blocks of a launch, at least one a write (not an atomic), are a race, whatever
// order the emulator ran the blocks in; it reports the first of each launch with both blocks,
// threads and this access's place. Within a block, device memory is not checked (shared memory
// is), nor are launches of one block; EMU_RACE_GLOBAL=0 turns this part off.
// Accesses the instrumentation does not see are not checked either: cp.async's reads of
// device memory (the emulator's copies), and the cuBLASLt stand-in, which is host code.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>

#include <memory>
#include <unordered_map>

#include "simt_api.h"

namespace emu::race {

#if EMU_RACECHECK
constexpr bool kOn = true;
constexpr int kMaxWarps = 32;

// Where an access was made: a code address (line 0: an instrumented load or store), or a
// function name and line (the emulator's own hooks, from std::source_location).
struct Site {
    const void *pc = nullptr;
    uint32_t line = 0;
};
inline Site site(const std::source_location &loc) { return {loc.function_name(), loc.line()}; }

// One access: its warp's clock c and warp-sync count s when it happened, the thread (-2:
// several lanes of the warp, at the same c and s) and where.
struct Stamp {
    uint32_t c = 0, s = 0;
    int16_t tid = -1, warp = -1;
    uint32_t line = 0;
    const void *pc = nullptr;
};
// A 2-byte cell of shared memory: the last write, then one read stamp per warp.
struct Cell {
    uint32_t gen;  // the block whose accesses these are (older: none)
    Stamp w;
};

// A vector clock over warps.
struct Clock {
    uint32_t v[kMaxWarps] = {};
    void join(const uint32_t *o, int warps) {
        for (int i = 0; i < warps; i++) v[i] = std::max(v[i], o[i]);
    }
};

struct State {
    int quiet = 0;       // > 0: the emulator's own accesses, or an atomic: not checked
    int attrib = -1;     // >= 0: accesses made outside a fiber count as this thread's
    int n = 0, warps = 0;
    uint32_t C[kMaxWarps], S[kMaxWarps];  // each warp's clock and warp-sync count
    std::vector<uint32_t> V;              // [n][warps]: what thread t knows of each warp
    uint32_t gen = 0;
    std::vector<unsigned char> cells;
    size_t cell_bytes = 0, n_static = 0;
    const unsigned char *s_lo = nullptr, *s_hi = nullptr, *d_lo = nullptr, *d_hi = nullptr;
    Clock named_acc[16], named_done[16];
    std::vector<std::pair<uint32_t, std::pair<Clock, Clock>>> mbar;  // address: acc, done
    const char *kernel = "";
    bool reported = false;          // this block's race is reported
    std::vector<std::string> found;  // reports not yet handed to the launch (cuda_emu.h)
    long long accesses = 0, races = 0;
    long long global_accesses = 0;
};
inline State st;

// A 2-byte cell of device memory: the blocks (linear ids) that last wrote and read it in the
// launch `gen` (-1: none; a read by a second block sets r_block to -2, several), and their
// threads. 16 bytes: the shadow is 8 times the device memory a launch touches, so the places
// are not kept (a report names this access's place and the other's block and thread).
struct GlobalCell {
    uint32_t gen;
    int32_t w_block, r_block;
    int16_t w_tid, r_tid;
};
struct Global {
    static constexpr int kPageShift = 16;  // a shadow page covers 64 KiB of device memory
    std::unordered_map<uintptr_t, std::unique_ptr<GlobalCell[]>> pages;
    uintptr_t last_page = UINTPTR_MAX;
    GlobalCell *last = nullptr;
    uint32_t gen = 0;                // launches so far
    uintptr_t dev_lo = 0, dev_hi = 0;   // the last device allocation met (this launch)
    uintptr_t host_lo = 1, host_hi = 0; // the last range known to hold no device memory
    bool reported = false;           // this launch's race is reported
    bool on = false;                 // this launch is checked: more than one block, and not
                                     // EMU_RACE_GLOBAL=0
};
inline Global g;

// The compiler barriers keep the count's change in place: the instrumentation comes after
// optimisation, which would otherwise drop an increment and decrement with nothing between.
struct Quiet {
    Quiet() {
        st.quiet++;
        asm volatile("" ::: "memory");
    }
    ~Quiet() {
        asm volatile("" ::: "memory");
        st.quiet--;
    }
    Quiet(const Quiet &) = delete;
    Quiet &operator=(const Quiet &) = delete;
};

inline std::string where(const void *pc, uint32_t line) {
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

inline uint32_t *knows(int t) { return &st.V[(size_t)t * st.warps]; }

inline bool ordered(const Stamp &p, int t) {
    if (p.tid == t) return true;
    const int w = t / 32;
    return knows(t)[p.warp] >= p.c || (p.warp == w && st.S[w] > p.s);
}

inline void report(const char *what, const Stamp &p, int t, Site at, const void *addr) {
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

inline void global_access(int t, const void *p, size_t n, bool write, Site at);

inline Cell *cell_of(const unsigned char *p) {
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
        c->w = Stamp{};
        Stamp *r = reinterpret_cast<Stamp *>(c + 1);
        for (int k = 0; k < st.warps; k++) r[k] = Stamp{};
    }
    return c;
}

// Thread t reads or writes [p, p + n); record false: a check only (a cp.async at issue).
inline void access(int t, const void *p, size_t n, bool write, Site at, bool record = true) {
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
            for (int k = 0; k < st.warps; k++)
                if (r[k].tid != -1 && !ordered(r[k], t))
                    report("write after read", r[k], t, at, (void *)q);
            if (!record) continue;
            c->w = now;
            for (int k = 0; k < st.warps; k++) r[k] = Stamp{};
        } else if (record) {
            Stamp &mine = r[w];
            if (mine.tid != -1 && mine.tid != t && mine.c == now.c && mine.s == now.s)
                mine.tid = -2;
            else
                mine = now;
        }
    }
}

// The current thread's access (in a fiber), or the attributed thread's (the emulator's own
// resolvers, outside any fiber).
inline int current_thread() { return ctx.cur >= 0 ? ctx.cur : st.attrib; }

// A block of n threads starts, with its static shared window at stat (kMaxStaticShared bytes)
// and dyn_bytes of dynamic shared memory at dyn: no access, no knowledge.
inline void block_begin(int n, const unsigned char *stat, const unsigned char *dyn,
                        size_t dyn_bytes) {
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
inline void launch_begin() {
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

inline GlobalCell *global_cell(uintptr_t q) {
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

inline std::string block_name(int32_t b) {
    const unsigned x = gridDim.x, y = gridDim.y;
    char s[64];
    snprintf(s, sizeof s, "block (%u,%u,%u)", (unsigned)b % x, ((unsigned)b / x) % y,
             (unsigned)b / (x * y));
    return s;
}

inline void global_report(const char *what, int32_t other_block, int other_tid, int t, Site at,
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
inline void global_access(int t, const void *p, size_t n, bool write, Site at) {
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
inline void block_barrier() {
    for (int t = 0; t < st.n; t++)
        for (int w = 0; w < st.warps; w++) knows(t)[w] = st.C[w];
    for (int w = 0; w < st.warps; w++) {
        st.C[w]++;
        st.S[w]++;
    }
}

// A warp sync point of warp w's lanes in mask resolved: they know what each of them knew.
inline void warp_sync(int w, unsigned mask) {
    st.S[w]++;
    Clock all;
    for (int l = 0; l < 32; l++)
        if ((mask >> l) & 1u && w * 32 + l < st.n) all.join(knows(w * 32 + l), st.warps);
    for (int l = 0; l < 32; l++)
        if ((mask >> l) & 1u && w * 32 + l < st.n)
            for (int k = 0; k < st.warps; k++) knows(w * 32 + l)[k] = all.v[k];
}

// Thread t releases what it knows (and its warp's accesses so far) into x.
inline void release(Clock &x, int t) {
    const int w = t / 32;
    x.join(knows(t), st.warps);
    x.v[w] = std::max(x.v[w], st.C[w]);
    st.C[w]++;
}
inline void acquire(const Clock &x, int t) {
    uint32_t *k = knows(t);
    for (int i = 0; i < st.warps; i++) k[i] = std::max(k[i], x.v[i]);
}

// Named barrier id: an arrival of thread t, and the round it completes (complete: true).
inline void named_arrive(int id, int t, bool complete) {
    release(st.named_acc[id], t);
    if (complete) {
        st.named_done[id] = st.named_acc[id];
        st.named_acc[id] = Clock{};
    }
}
inline void named_passed(int id, int t) { acquire(st.named_done[id], t); }

inline std::pair<Clock, Clock> &mbar_clocks(uint32_t bar) {
    for (auto &e : st.mbar)
        if (e.first == bar) return e.second;
    st.mbar.push_back({bar, {}});
    return st.mbar.back().second;
}
inline void mbar_arrive(uint32_t bar, int t) { release(mbar_clocks(bar).first, t); }
inline void mbar_phase_done(uint32_t bar) {
    auto &c = mbar_clocks(bar);
    c.second = c.first;
    c.first = Clock{};
}
inline void mbar_passed(uint32_t bar, int t) { acquire(mbar_clocks(bar).second, t); }

#else
constexpr bool kOn = false;
struct Quiet {};
struct Site {};
inline Site site(const std::source_location &) { return {}; }
inline void access(int, const void *, size_t, bool, Site, bool = true) {}
inline int current_thread() { return -1; }
inline void launch_begin() {}
inline void block_begin(int, const unsigned char *, const unsigned char *, size_t) {}
inline void block_barrier() {}
inline void warp_sync(int, unsigned) {}
inline void named_arrive(int, int, bool) {}
inline void named_passed(int, int) {}
inline void mbar_arrive(uint32_t, int) {}
inline void mbar_phase_done(uint32_t) {}
inline void mbar_passed(uint32_t, int) {}
#endif

}  // namespace emu::race
