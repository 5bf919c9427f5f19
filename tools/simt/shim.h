// tools/simt: compiles CUDA kernel source as host C++ and runs each block as one fiber per
// thread (cooperative, one OS thread, x86-64). Force-included with -include shim.h.
//
// Model: threads of a block are fibers that run one at a time; a fiber runs until it reaches a
// sync point (__syncthreads, a warp intrinsic), so atomics are trivially atomic and memory is
// sequentially consistent. Blocks run serially, so shared memory is one window of host memory
// that the launcher poisons before every block: static __shared__ declarations (rewrite.py turns
// each into a reference from emu::static_shared) are laid out in it in the order the block first
// reaches them, and dynamic shared memory (extern __shared__, which rewrite.py turns into
// emu::dynamic_shared()) is the launch's byte count at the end of a mapping, right before a guard
// page.
// Warp-wide instructions with wider operands (ldmatrix, mma: tools/simt/ptx_sm80.cuh) are
// warp ops whose lanes pass their operands by address and one function resolves them all.
#pragma once
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <source_location>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// rewrite.py rewrites every __shared__ declaration; one it missed stops the compile here
#define __shared__ EMU_SHARED_DECLARATION_NOT_REWRITTEN_BY_REWRITE_PY

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};
constexpr int warpSize = 32;


// Switches stacks: saves the callee-saved registers on the current stack, stores its sp in
// *save_sp, loads new_sp and pops the registers saved there (System V x86-64). Opaque to the
// compiler, so every global (shared memory, threadIdx) is reloaded after a sync point.
extern "C" void emu_swap(void **save_sp, void *new_sp);
asm(R"(
    .text
    .weak emu_swap
    .type emu_swap, @function
emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_swap, .-emu_swap
)");

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {

enum State { RUN, BAR, WARP, WAIT, DONE };

constexpr size_t kMaxStaticShared = 48 * 1024;  // a block's static __shared__ bytes, at most
enum Op { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, MATCH_ANY, BALLOT, VOTE_ANY, VOTE_ALL, SYNCWARP,
          CUSTOM };
inline const char *op_name(int op) {
    static const char *n[] = {"__shfl_sync",      "__shfl_up_sync", "__shfl_down_sync",
                              "__shfl_xor_sync",  "__match_any_sync", "__ballot_sync",
                              "__any_sync",       "__all_sync",     "__syncwarp",
                              "a warp-wide instruction"};
    return n[op];
}

// A CUSTOM warp op's resolver: io[l] is lane l's operand block (nullptr for a lane outside the
// mask); it reads every lane's inputs and writes every lane's outputs, or returns false with a
// message in err (a fault of the whole block).
using CustomOp = bool (*)(void *const io[32], unsigned mask, std::string &err);

// One wgmma in flight (tools/simt/ptx_sm90.cuh): the accumulator registers it will write, and
// the values, computed at issue; the operands it read, to be checked unchanged when it retires.
struct PendingAcc {
    float *d;
    int n;
    float v[128];
    const uint32_t *a_src;              // register A operand (nullptr: A from shared memory)
    uint32_t a_val[4];                  // its value at issue
    std::shared_ptr<void> operands;     // the warp's shared-memory operands as read at issue
};

// One cp.async copy in flight: its destination and the bytes it will write (read at issue).
struct AsyncCopy {
    unsigned char *dst;
    unsigned char bytes[16];
    int n;
};

struct Fiber {
    void *sp = nullptr;
    State st = DONE;
    Op op = SYNCWARP;
    unsigned mask = 0;
    int width = 32, arg = 0, size = 0;
    uint64_t val = 0, res = 0;
    unsigned line = 0;
    const char *func = "";
    void *io = nullptr;           // CUSTOM: this lane's operands
    CustomOp custom = nullptr;    // CUSTOM: the resolver
    std::vector<AsyncCopy> async_open;                  // cp.async since the last commit
    std::vector<std::vector<AsyncCopy>> async_groups;   // committed groups, oldest first
    std::vector<PendingAcc> acc_open;                   // wgmma since the last commit
    std::vector<std::vector<PendingAcc>> acc_groups;    // committed wgmma groups, oldest first
    std::function<bool()> ready;  // WAIT: runnable again once this holds (block_until)
    const char *wait_what = "";   // WAIT: what it waits for
};

// A named barrier (bar.sync / bar.arrive id, count): arrivals so far in its current round.
struct NamedBarrier {
    int arrived = 0, count = 0;
    unsigned round = 0;
};

struct Ctx {
    std::vector<Fiber> f;
    std::vector<char *> stacks;
    size_t stack_size = 640 << 10;  // 512 KiB and more below each fiber's first frame
    void *sched_sp = nullptr;
    int cur = -1;
    const char *stack_lo = nullptr, *stack_hi = nullptr;  // the running fiber's stack (else empty)
    std::function<void()> body;
    std::string error;
    int order = 0;  // 0: ascending thread order, 1: descending, 2: random per sweep
    int block_order = 0;  // 0: ascending block order, 1: descending, 2: random
    int sched = 0;        // 0: lockstep, 1: warp-serial, 2: random steps (see run_block)
    int warp_order = 0;   // warp-serial: 0 ascending, 1 descending, 2 random
    unsigned char poison = 0;
    std::mt19937 rng{12345};
    long long syncs = 0, warp_ops = 0, switches = 0;
    int waiting = 0;  // the running block's fibers in WAIT (none: resolve_waits has nothing to do)
    NamedBarrier named[16];  // the running block's named barriers
};
inline Ctx ctx;
}  // namespace emu

#include "racecheck.h"  // RACE=1: the shared-memory race check's hooks (else empty)

namespace emu {

// AddressSanitizer fiber annotations (SAN=asan), so it knows which stack is live.
inline const void *main_stack_bottom = nullptr;
inline size_t main_stack_size = 0;
inline void asan_enter_fiber() {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &main_stack_bottom, &main_stack_size);
#endif
}
inline void asan_leave_fiber() {
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, main_stack_bottom, main_stack_size);
#endif
}

[[noreturn]] inline void entry() {
    asan_enter_fiber();
    ctx.body();
    Fiber &me = ctx.f[ctx.cur];
    me.st = DONE;
    void *dummy;
    asan_leave_fiber();
    emu_swap(&dummy, ctx.sched_sp);
    __builtin_unreachable();
}

inline void yield() {
    asan_leave_fiber();
    emu_swap(&ctx.f[ctx.cur].sp, ctx.sched_sp);
    asan_enter_fiber();
}

inline void reset_fiber(int i) {
    if ((int)ctx.stacks.size() <= i) {
        void *p = mmap(nullptr, ctx.stack_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            abort();
        }
        mprotect(p, 4096, PROT_NONE);  // guard page against stack overflow
        ctx.stacks.push_back((char *)p);
    }
#if EMU_ASAN
    __asan_unpoison_memory_region(ctx.stacks[i] + 4096, ctx.stack_size - 4096);
#endif
    // Each fiber's frames start at their own offset below its stack's top, 33 cache lines
    // apart (over 128 KiB): at the same offset in every stack, a block's hot frames would all
    // fall in the same few cache sets, and each switch would miss in L1 and L2.
    const size_t color = (size_t)i * 33 * 64 % ((size_t)128 << 10);
    char *top = ctx.stacks[i] + ctx.stack_size - color;
    uintptr_t a = ((uintptr_t)top - 32) & ~(uintptr_t)15;  // return-address slot, 16-aligned
    void **slot = (void **)a;
    slot[0] = (void *)&entry;
    slot[1] = nullptr;
    for (int k = 1; k <= 6; k++) slot[-k] = nullptr;  // rbp rbx r12..r15
    ctx.f[i] = Fiber{};
    ctx.f[i].sp = (void *)(slot - 6);
    ctx.f[i].st = RUN;
}

inline void resume(int i) {
    ctx.cur = i;
    ctx.stack_lo = ctx.stacks[i];
    ctx.stack_hi = ctx.stacks[i] + ctx.stack_size;
    threadIdx = dim3{(unsigned)i % blockDim.x, ((unsigned)i / blockDim.x) % blockDim.y,
                     (unsigned)i / (blockDim.x * blockDim.y)};
    ctx.switches++;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, ctx.stacks[i] + 4096, ctx.stack_size - 4096);
#endif
    emu_swap(&ctx.sched_sp, ctx.f[i].sp);
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    ctx.cur = -1;
    ctx.stack_lo = ctx.stack_hi = nullptr;
}

inline std::string describe(int i) {
    const Fiber &f = ctx.f[i];
    char b[256];
    const char *s = f.st == RUN    ? "running"
                    : f.st == BAR  ? "__syncthreads"
                    : f.st == DONE ? "exited"
                    : f.st == WAIT ? f.wait_what
                                   : op_name(f.op);
    snprintf(b, sizeof b, "thread %d: %s (%s line %u, mask %08x)", i, s, f.func, f.line, f.mask);
    return b;
}

inline bool fail(std::string msg) {
    char b[64];
    snprintf(b, sizeof b, "block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
    ctx.error = b + msg;
    return false;
}

// Resolves the warp ops of warp w whose participants have all arrived; returns true if any.
inline bool resolve_warp(int w, int n, bool &bad) {
    bool released = false;
    for (int l = 0; l < 32; l++) {
        Fiber &a = ctx.f[w * 32 + l];
        if (a.st != WARP) continue;
        const unsigned m = a.mask;
        if (!((m >> l) & 1u)) {
            bad = true;
            return fail(describe(w * 32 + l) + ": calling lane not in mask (undefined)");
        }
        bool ready = true;
        for (int j = 0; j < 32; j++) {
            if (!((m >> j) & 1u)) continue;
            if (w * 32 + j >= n) {
                bad = true;
                return fail(describe(w * 32 + l) + ": mask names a lane beyond blockDim");
            }
            const Fiber &b = ctx.f[w * 32 + j];
            if (b.st != WARP) {
                ready = false;
                break;
            }
            if (b.mask != m || b.op != a.op || b.line != a.line || b.func != a.func ||
                b.width != a.width || b.size != a.size || b.custom != a.custom) {
                bad = true;
                return fail("warp " + std::to_string(w) + " lanes disagree on the warp op: " +
                            describe(w * 32 + l) + " vs " + describe(w * 32 + j));
            }
        }
        if (!ready) continue;
        if (a.op == CUSTOM) {
            void *io[32];
            for (int j = 0; j < 32; j++)
                io[j] = ((m >> j) & 1u) ? ctx.f[w * 32 + j].io : nullptr;
            std::string err;
            if (!a.custom(io, m, err)) {
                bad = true;
                return fail(describe(w * 32 + l) + ": " + err);
            }
            for (int j = 0; j < 32; j++)
                if ((m >> j) & 1u) ctx.f[w * 32 + j].st = RUN;
            ctx.warp_ops++;
            released = true;
            continue;
        }
        const int width = a.width;
        if (width < 1 || width > 32 || (width & (width - 1))) {
            bad = true;
            return fail(describe(w * 32 + l) + ": width not a power of 2 <= 32");
        }
        for (int j = 0; j < 32; j++) {
            if (!((m >> j) & 1u)) continue;
            Fiber &b = ctx.f[w * 32 + j];
            int src = j;
            switch (b.op) {
                case SHFL_IDX: src = ((unsigned)b.arg % (unsigned)width) + (j / width) * width; break;
                case SHFL_UP: src = (j % width) < b.arg ? j : j - b.arg; break;
                case SHFL_DOWN: src = (j % width) + b.arg >= width ? j : j + b.arg; break;
                case SHFL_XOR: src = j ^ b.arg; if (src / width > j / width || src > 31) src = j; break;
                default: break;
            }
            if (b.op <= SHFL_XOR) {
                if (!((m >> src) & 1u)) {
                    bad = true;
                    return fail(describe(w * 32 + j) + ": reads lane " + std::to_string(src) +
                                " outside the mask (undefined)");
                }
                b.res = ctx.f[w * 32 + src].val;
            } else if (b.op == MATCH_ANY) {
                unsigned r = 0;
                for (int k = 0; k < 32; k++)
                    if (((m >> k) & 1u) && ctx.f[w * 32 + k].val == b.val) r |= 1u << k;
                b.res = r;
            } else if (b.op == BALLOT || b.op == VOTE_ANY || b.op == VOTE_ALL) {
                unsigned r = 0;
                for (int k = 0; k < 32; k++)
                    if (((m >> k) & 1u) && ctx.f[w * 32 + k].val) r |= 1u << k;
                b.res = b.op == BALLOT ? r : b.op == VOTE_ANY ? (r != 0) : (r == m);
            } else {
                b.res = 0;
            }
        }
        race::warp_sync(w, m);
        for (int j = 0; j < 32; j++)
            if ((m >> j) & 1u) ctx.f[w * 32 + j].st = RUN;
        ctx.warp_ops++;
        released = true;
    }
    return released;
}

// Makes every waiting fiber whose condition now holds runnable; true if any.
inline bool resolve_waits(int n) {
    bool woke = false;
    for (int i = 0; i < n && ctx.waiting > 0; i++) {
        Fiber &f = ctx.f[i];
        if (f.st == WAIT && f.ready()) {
            f.st = RUN;
            f.ready = nullptr;
            ctx.waiting--;
            woke = true;
        }
    }
    return woke;
}
inline bool any_runnable(int n) {
    for (int i = 0; i < n; i++)
        if (ctx.f[i].st == RUN) return true;
    return false;
}

// One sweep over warp w's runnable fibers (thread order ctx.order); true if any ran.
inline bool sweep_warp(int w, int n) {
    const int lo = w * 32, hi = std::min(n, lo + 32);
    int order[32], k = 0;
    for (int i = lo; i < hi; i++) order[k++] = ctx.order == 1 ? hi - 1 - (i - lo) : i;
    if (ctx.order == 2) std::shuffle(order, order + k, ctx.rng);
    bool ran = false;
    for (int j = 0; j < k; j++)
        if (ctx.f[order[j]].st == RUN) {
            resume(order[j]);
            ran = true;
        }
    return ran;
}

// Runs one block of n threads to completion; false (ctx.error set) on a sync error.
// Schedules (ctx.sched), between two block barriers:
//   0 lockstep: every runnable fiber to its next sync point, then every warp's ops resolve;
//   1 warp-serial: one warp at a time (ctx.warp_order: ascending, descending, random), each
//     run to the barrier (or its exit) before the next starts: the widest skew between warps;
//   2 random steps: a random warp advances one sync point at a time.
inline bool run_block(int n) {
    if ((int)ctx.f.size() < n) ctx.f.resize(n);
    for (int i = 0; i < n; i++) reset_fiber(i);
    for (NamedBarrier &b : ctx.named) b = NamedBarrier{};
    ctx.waiting = 0;
    std::vector<int> order(n);
    const int n_warps = (n + 31) / 32;
    std::vector<int> warps(n_warps);
    for (;;) {
        bool bad = false;
        if (ctx.sched == 1) {
            for (int w = 0; w < n_warps; w++) warps[w] = ctx.warp_order == 1 ? n_warps - 1 - w : w;
            if (ctx.warp_order == 2) std::shuffle(warps.begin(), warps.end(), ctx.rng);
            for (int w : warps) {
                for (;;) {
                    const bool ran = sweep_warp(w, n);
                    const bool rel = resolve_warp(w, n, bad);
                    if (bad) return false;
                    if (!ran && !rel && !resolve_waits(n)) break;
                }
            }
            // Warp ops are per warp, but a wait (an mbarrier, a named barrier) may have been
            // released by a warp that ran after the waiter's turn: another round then.
            if (resolve_waits(n) || any_runnable(n)) continue;
        } else if (ctx.sched == 2) {
            for (;;) {
                resolve_waits(n);
                warps.clear();
                for (int w = 0; w < n_warps; w++) {
                    bool active = false;
                    for (int i = w * 32; i < std::min(n, w * 32 + 32) && !active; i++)
                        active = ctx.f[i].st == RUN || ctx.f[i].st == WARP;
                    if (active) warps.push_back(w);
                }
                std::shuffle(warps.begin(), warps.end(), ctx.rng);
                bool progress = false;
                for (int w : warps) {
                    const bool ran = sweep_warp(w, n);
                    const bool rel = resolve_warp(w, n, bad);
                    if (bad) return false;
                    if (ran || rel) {
                        progress = true;
                        break;
                    }
                }
                if (!progress) break;
            }
            warps.resize(n_warps);
        } else {
            // Run every runnable fiber up to its next sync point, waking waiters after each
            // sweep (a thread that arrived on an mbarrier and yielded resumes only after the
            // waiters its arrival released have run).
            for (;;) {
                for (int i = 0; i < n; i++) order[i] = ctx.order == 1 ? n - 1 - i : i;
                if (ctx.order == 2) std::shuffle(order.begin(), order.end(), ctx.rng);
                bool ran = false;
                for (int i : order)
                    if (ctx.f[i].st == RUN) {
                        resume(i);
                        ran = true;
                    }
                if (!resolve_waits(n) && !ran) break;
            }
            bool released = false;
            for (int w = 0; w * 32 < n; w++) {
                released |= resolve_warp(w, n, bad);
                if (bad) return false;
            }
            released |= resolve_waits(n);
            if (released) continue;
        }
        int n_bar = 0, n_done = 0, n_warp = 0, n_wait = 0;
        for (int i = 0; i < n; i++) {
            n_bar += ctx.f[i].st == BAR;
            n_done += ctx.f[i].st == DONE;
            n_warp += ctx.f[i].st == WARP;
            n_wait += ctx.f[i].st == WAIT;
        }
        if (n_done == n) {
            for (int id = 1; id < 16; id++)
                if (ctx.named[id].arrived)
                    return fail("the block ends with " + std::to_string(ctx.named[id].arrived) +
                                " of " + std::to_string(ctx.named[id].count) +
                                " arrivals on named barrier " + std::to_string(id) +
                                " (an arrive or sync without its match)");
            return true;
        }
        if (n_warp == 0 && n_done == 0 && n_wait == 0) {
            for (int i = 1; i < n; i++)
                if (ctx.f[i].line != ctx.f[0].line || ctx.f[i].func != ctx.f[0].func)
                    return fail("threads wait at different __syncthreads: " + describe(0) +
                                " vs " + describe(i));
            race::block_barrier();
            for (int i = 0; i < n; i++) ctx.f[i].st = RUN;
            ctx.syncs++;
            continue;
        }
        std::string msg = "deadlock / divergent sync:";
        int shown = 0;
        for (int i = 0; i < n && shown < 6; i++) {
            bool differs = i == 0 || ctx.f[i].st != ctx.f[i - 1].st ||
                           ctx.f[i].line != ctx.f[i - 1].line;
            if (differs) {
                msg += "\n    " + describe(i);
                shown++;
            }
        }
        return fail(msg + "\n    (" + std::to_string(n_bar) + " at __syncthreads, " +
                    std::to_string(n_warp) + " at warp ops, " + std::to_string(n_wait) +
                    " waiting on barriers, " + std::to_string(n_done) + " exited)");
    }
}

// Dynamic shared memory: the largest a block may opt in to on sm_90 (227 KB), in one mapping
// that ends at a guard page. A launch of n bytes gets the last n (rounded up to 16) before the
// guard, so a kernel reading or writing past what its launch asked for faults.
constexpr size_t kMaxDynamicShared = 227 * 1024;
struct DynamicShared {
    unsigned char *end = nullptr;  // the guard page
    unsigned char *base = nullptr;
    size_t bytes = 0;
};
inline DynamicShared dyn;
inline void set_dynamic_shared(size_t bytes) {
    if (!dyn.end) {
        const size_t map = kMaxDynamicShared + 2 * 4096;
        void *p = mmap(nullptr, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            abort();
        }
        dyn.end = (unsigned char *)p + map - 4096;
        mprotect(dyn.end, 4096, PROT_NONE);
    }
    dyn.bytes = bytes;
    dyn.base = dyn.end - ((bytes + 15) & ~(size_t)15);
}
// What `extern __shared__ T name[];` names in the running block.
inline unsigned char *dynamic_shared() { return dyn.base; }

// Static shared memory: each __shared__ declaration's bytes (rewrite.py) at an offset of the
// launch's window, assigned when a thread of its first block reaches the declaration (the key is
// a static of that declaration, one per template instantiation), up to CUDA's 48 KB
// (kMaxStaticShared). The window ends at a guard page, as the dynamic one does.
struct StaticShared {
    unsigned char *base = nullptr;
    size_t used = 0;
    std::vector<std::pair<const void *, size_t>> slots;  // key, offset
};
inline StaticShared stat;
// A new kernel's static window: mapped once, laid out afresh.
inline void static_window_reset() {
    if (!stat.base) {
        const size_t map = kMaxStaticShared + 4096;
        void *p = mmap(nullptr, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("mmap");
            abort();
        }
        stat.base = (unsigned char *)p;
        mprotect(stat.base + kMaxStaticShared, 4096, PROT_NONE);
    }
    stat.used = 0;
    stat.slots.clear();
}
inline unsigned char *static_shared_bytes(const void *key, size_t n, size_t align) {
    for (const auto &s : stat.slots)
        if (s.first == key) return stat.base + s.second;
    const size_t off = (stat.used + align - 1) / align * align;
    if (off + n > kMaxStaticShared) {
        fprintf(stderr, "EMULATOR: more than %zu bytes of static __shared__ in one kernel\n",
                kMaxStaticShared);
        abort();
    }
    stat.slots.push_back({key, off});
    stat.used = off + n;
    return stat.base + off;
}
template <typename T>
inline T &static_shared(const void *key) {
    return *reinterpret_cast<T *>(static_shared_bytes(key, sizeof(T), alignof(T)));
}

inline void poison_shared() {
    if (stat.base) memset(stat.base, ctx.poison, kMaxStaticShared);
    if (dyn.base) memset(dyn.base, ctx.poison, (size_t)(dyn.end - dyn.base));
}

// Shared-state-space addresses (__cvta_generic_to_shared): dynamic shared memory from 0, the
// static __shared__ variables from kStaticSharedBase. shared_pointer maps back, and checks that
// [addr, addr + n) lies in one of the two (nullptr if not).
constexpr uint32_t kStaticSharedBase = 0x100000;
inline bool shared_address(const void *p, uint32_t *addr) {
    const unsigned char *c = (const unsigned char *)p;
    if (dyn.base && c >= dyn.base && c < dyn.base + dyn.bytes) {
        *addr = (uint32_t)(c - dyn.base);
        return true;
    }
    if (stat.base && c >= stat.base && c < stat.base + stat.used) {
        *addr = kStaticSharedBase + (uint32_t)(c - stat.base);
        return true;
    }
    return false;
}
inline unsigned char *shared_pointer(uint32_t addr, size_t n) {
    if (addr < kStaticSharedBase)
        return (size_t)addr + n <= dyn.bytes ? dyn.base + addr : nullptr;
    const size_t off = addr - kStaticSharedBase;
    return off + n <= stat.used ? stat.base + off : nullptr;
}

// Launches body on grid x block threads, one block at a time, in the block order of
// ctx.block_order (0 ascending, 1 descending, 2 random). False on a sync error.
inline bool launch(dim3 grid, dim3 block, size_t dynamic_smem, std::function<void()> body) {
    const unsigned long long nt = (unsigned long long)block.x * block.y * block.z;
    if (nt == 0 || nt > 1024 || nt % 32) {
        ctx.error = "unsupported block size " + std::to_string(nt);
        return false;
    }
    gridDim = grid;
    blockDim = block;
    set_dynamic_shared(dynamic_smem);
    static_window_reset();
    ctx.body = std::move(body);
    const unsigned long long nb = (unsigned long long)grid.x * grid.y * grid.z;
    race::launch_begin();
    std::vector<unsigned long long> ord(nb);
    for (unsigned long long b = 0; b < nb; b++) ord[b] = ctx.block_order == 1 ? nb - 1 - b : b;
    if (ctx.block_order == 2) std::shuffle(ord.begin(), ord.end(), ctx.rng);
    for (unsigned long long b : ord) {
        blockIdx = dim3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                        (unsigned)(b / ((unsigned long long)grid.x * grid.y))};
        poison_shared();
        race::block_begin((int)nt, stat.base, dyn.base, dyn.bytes);
        if (!run_block((int)nt)) return false;
    }
    return true;
}

template <typename T>
inline uint64_t bits(T v) {
    static_assert(sizeof(T) <= 8, "warp op on a value over 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    return b;
}
template <typename T>
inline T unbits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
}

inline uint64_t warp_op(Op op, unsigned mask, uint64_t val, int size, int arg, int width,
                        const std::source_location &loc) {
    Fiber &me = ctx.f[ctx.cur];
    me.st = WARP;
    me.op = op;
    me.mask = mask;
    me.val = val;
    me.size = size;
    me.arg = arg;
    me.width = width;
    me.line = loc.line();
    me.func = loc.function_name();
    yield();
    return me.res;
}

// A warp-wide instruction: this lane's operand block io, resolved with the other lanes' by fn
// once every lane of mask has arrived.
inline void warp_custom(CustomOp fn, void *io, unsigned mask, const std::source_location &loc) {
    Fiber &me = ctx.f[ctx.cur];
    me.custom = fn;
    me.io = io;
    warp_op(CUSTOM, mask, 0, 0, 0, 32, loc);
    me.custom = nullptr;
    me.io = nullptr;
}

// Suspends this fiber until ready() holds (checked by the scheduler between steps); what
// names the wait in a deadlock report. Returns at once if it already holds.
inline void block_until(std::function<bool()> ready, const char *what,
                        const std::source_location &loc) {
    if (ready()) return;
    Fiber &me = ctx.f[ctx.cur];
    me.st = WAIT;
    ctx.waiting++;
    me.ready = std::move(ready);
    me.wait_what = what;
    me.line = loc.line();
    me.func = loc.function_name();
    yield();
}

// bar.sync (wait = true) / bar.arrive on named barrier id with count threads; false (message
// in err) when the call is malformed. Each thread counts one arrival (the hardware counts a
// warp at a time: a warp's threads all take part, as every kernel here calls them).
inline bool named_barrier(int id, int count, bool wait, std::string &err,
                          const std::source_location &loc) {
    if (id < 1 || id > 15 || count <= 0 || count % 32 || count > (int)(blockDim.x * blockDim.y *
                                                                       blockDim.z)) {
        err = "named barrier " + std::to_string(id) + " with count " + std::to_string(count) +
              " (ids 1..15 here, counts multiples of 32 up to the block size)";
        return false;
    }
    NamedBarrier &b = ctx.named[id];
    if (b.arrived > 0 && b.count != count) {
        err = "named barrier " + std::to_string(id) + ": count " + std::to_string(count) +
              " while this round counts to " + std::to_string(b.count);
        return false;
    }
    b.count = count;
    const unsigned round = b.round;
    const int me = ctx.cur;
    const bool complete = ++b.arrived == count;
    race::named_arrive(id, me, complete);
    if (complete) {
        b.arrived = 0;
        b.round++;
    } else if (wait) {
        block_until([&b, round] { return b.round != round; }, "bar.sync", loc);
    }
    if (wait) race::named_passed(id, me);
    return true;
}

}  // namespace emu

using emu_loc = std::source_location;
#define EMU_LOC std::source_location loc = std::source_location::current()

inline void __syncthreads(EMU_LOC) {
    emu::Fiber &me = emu::ctx.f[emu::ctx.cur];
    me.st = emu::BAR;
    me.line = loc.line();
    me.func = loc.function_name();
    emu::yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu, EMU_LOC) {
    emu::warp_op(emu::SYNCWARP, mask, 0, 0, 0, 32, loc);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, EMU_LOC) {
    return emu::unbits<T>(emu::warp_op(emu::SHFL_IDX, mask, emu::bits(v), sizeof(T), src, width, loc));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, EMU_LOC) {
    return emu::unbits<T>(emu::warp_op(emu::SHFL_UP, mask, emu::bits(v), sizeof(T), (int)delta, width, loc));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, EMU_LOC) {
    return emu::unbits<T>(emu::warp_op(emu::SHFL_DOWN, mask, emu::bits(v), sizeof(T), (int)delta, width, loc));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, EMU_LOC) {
    return emu::unbits<T>(emu::warp_op(emu::SHFL_XOR, mask, emu::bits(v), sizeof(T), lane_mask, width, loc));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v, EMU_LOC) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32/64-bit values");
    return (unsigned)emu::warp_op(emu::MATCH_ANY, mask, emu::bits(v), sizeof(T), 0, 32, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred, EMU_LOC) {
    return (unsigned)emu::warp_op(emu::BALLOT, mask, pred != 0, 4, 0, 32, loc);
}
inline int __any_sync(unsigned mask, int pred, EMU_LOC) {
    return (int)emu::warp_op(emu::VOTE_ANY, mask, pred != 0, 4, 0, 32, loc);
}
inline int __all_sync(unsigned mask, int pred, EMU_LOC) {
    return (int)emu::warp_op(emu::VOTE_ALL, mask, pred != 0, 4, 0, 32, loc);
}
#define __activemask() 0xffffffffu

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __float_as_uint(float f) { return emu::unbits<unsigned>(emu::bits(f)); }
inline float __uint_as_float(unsigned u) { return emu::unbits<float>(emu::bits(u)); }
inline int __float_as_int(float f) { return emu::unbits<int>(emu::bits(f)); }
inline float __int_as_float(int u) { return emu::unbits<float>(emu::bits(u)); }
inline long long __double_as_longlong(double d) { return emu::unbits<long long>(emu::bits(d)); }
inline double __longlong_as_double(long long u) { return emu::unbits<double>(emu::bits(u)); }

// Atomics: fibers never interleave inside one, so plain read-modify-write is atomic (and
// exempt from the race check: atomics may meet by design).
// One read-modify-write of *p, exempt from the race check.
template <typename T, typename F>
inline T atomic_rmw(T *p, F f) {
    emu::race::Quiet q;
    const T o = *p;
    *p = f(o);
    return o;
}
template <typename T>
inline T atomicAdd(T *p, T v) { return atomic_rmw(p, [v](T o) { return o + v; }); }
template <typename T>
inline T atomicSub(T *p, T v) { return atomic_rmw(p, [v](T o) { return o - v; }); }
template <typename T>
inline T atomicMin(T *p, T v) { return atomic_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicMax(T *p, T v) { return atomic_rmw(p, [v](T o) { return v > o ? v : o; }); }
template <typename T>
inline T atomicExch(T *p, T v) { return atomic_rmw(p, [v](T) { return v; }); }
template <typename T>
inline T atomicCAS(T *p, T cmp, T v) {
    return atomic_rmw(p, [=](T o) { return o == cmp ? v : o; });
}
template <typename T>
inline T atomicOr(T *p, T v) { return atomic_rmw(p, [v](T o) { return o | v; }); }
template <typename T>
inline T atomicAnd(T *p, T v) { return atomic_rmw(p, [v](T o) { return o & v; }); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// CUDA's global min/max overloads (math_functions.hpp): same-type, mixed signedness -> unsigned.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
#include "cuda_emu.h"
