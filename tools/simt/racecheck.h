// tools/simt: a race check (run.sh RACE=1) for shared memory, the emulator's counterpart of
// compute-sanitizer's racecheck, and for device memory between the blocks of a launch, which
// no CUDA tool checks. Included by shim.h: the check's state and its hooks' declarations (their
// code is racecheck.cpp's); with EMU_RACECHECK unset every hook below is an empty inline
// function.
//
// RACE=1 compiles the kernels with GCC's -fsanitize=thread instrumentation but without its
// runtime: every load and store the kernel code makes calls a __tsan_readN / __tsan_writeN
// defined in racecheck.cpp, which hands those outside the thread's own stack to access(): it
// checks those in the block's shared memory (static __shared__ and the launch's dynamic
// bytes), and global_access() those in device memory. The emulator adds what the
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
// Device memory (global_access). The blocks of one launch run in no order the kernel
// may rely on: nothing here uses grid-wide synchronisation, or the fence-and-counter hand-over
// of a "last block" reduction. So two accesses to one 2-byte cell of a device allocation from
// different blocks of a launch, at least one a write (not an atomic), are a race, whatever
// order the emulator ran the blocks in; it reports the first of each launch with both blocks,
// threads and this access's place. Within a block, device memory is not checked (shared memory
// is), nor are launches of one block; EMU_RACE_GLOBAL=0 turns this part off.
// Accesses the instrumentation does not see are not checked either: cp.async's reads of
// device memory (the emulator's copies), and the cuBLASLt stand-in, which is host code.
#pragma once

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
// A 2-byte cell of shared memory: the last write, then one read stamp per warp (warp k's
// valid when bit k of readers is set: a write then checks only the warps that read).
struct Cell {
    uint32_t gen;      // the block whose accesses these are (older: none)
    uint32_t readers;  // the warps with a read stamp
    Stamp w;
};
static_assert(kMaxWarps <= 32, "Cell::readers has a bit per warp");

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

// The hooks the emulator calls (bodies in racecheck.cpp, which is built without the
// instrumentation: the check's own loads and stores are not checked, and cost no call each).
void access(int t, const void *p, size_t n, bool write, Site at, bool record = true);
void global_access(int t, const void *p, size_t n, bool write, Site at);
void launch_begin();
void block_begin(int n, const unsigned char *stat, const unsigned char *dyn, size_t dyn_bytes);
void block_barrier();
void warp_sync(int w, unsigned mask);
void named_arrive(int id, int t, bool complete);
void named_passed(int id, int t);
void mbar_arrive(uint32_t bar, int t);
void mbar_phase_done(uint32_t bar);
void mbar_passed(uint32_t bar, int t);

// The current thread's access (in a fiber), or the attributed thread's (the emulator's own
// resolvers, outside any fiber).
inline int current_thread() { return ctx.cur >= 0 ? ctx.cur : st.attrib; }

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
