// tools/simt: the entry points GCC's -fsanitize=thread instrumentation calls from the kernels
// (run.sh RACE=1 builds the kernels with it), without ThreadSanitizer's runtime: each load
// and store the kernel code makes reaches racecheck.h's access(), which checks those that fall
// in the running block's shared memory. Built without the instrumentation itself.
#include <stddef.h>
#include <stdint.h>

#include "shim.h"

namespace {
bool inside = false;  // the check's own code may be an instrumented copy (inline functions)
inline void hook(void *p, size_t n, bool write, void *pc) {
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
