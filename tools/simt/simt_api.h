// tools/simt: the emulated runtime's entry points for code built without shim.h (the cuBLASLt
// stand-in, compiled against the real cublasLt.h): only standard types cross this line. Also
// included by cuda_emu.h, so that the tests reach the fault injection and the counters.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <string>
#include <vector>

#define SIMT_FAULT_INJECTION 1  // the checks below exist

namespace simt {
// Puts op on the stream (a cudaStream_t) as a kernel launch would go: run at once on the legacy
// stream, queued on a created one, recorded while it captures. 0 or the cudaError_t value.
int enqueue_op(void *stream, const char *what, std::function<void()> op);
// [p, p + bytes) lies inside one device allocation.
bool device_span(const void *p, size_t bytes);
// The largest range [*lo, *hi) around p that is all one device allocation (true), or that
// holds no device allocation's byte (false): the race check's cache of where device memory is.
bool device_range(const void *p, uintptr_t *lo, uintptr_t *hi);
// An emulator error: printed, and failing the next synchronisation.
void report(const std::string &msg);
// The emulated device's memory (EMU_DEVICE_GIB).
size_t device_memory_bytes();

// Fault injection, for the tests of what the library does when CUDA fails (the *Faults
// sections of tests/test_cuda_engine.cpp and test_cuda_train.cpp, and the host-traffic tests,
// compiled where SIMT_FAULT_INJECTION is defined: only here). Each kind counts its calls from
// the start of the process; fail_call(kind, n) makes the call n calls from now fail (0: the
// next one), once.
enum Fault {
    // A creation fails with cudaErrorMemoryAllocation ("out of memory"): cudaMalloc,
    // cudaHostAlloc, cudaStreamCreate*, cudaEventCreate*, cudaGraphInstantiate; cublasLtCreate
    // with CUBLAS_STATUS_ALLOC_FAILED.
    FAULT_CREATE,
    // A launch is refused when it is made: a kernel with cudaErrorLaunchOutOfResources (what
    // cudaGetLastError then returns, once, as for a launch a GPU cannot fit), cublasLtMatmul
    // with CUBLAS_STATUS_EXECUTION_FAILED. Nothing is queued; the device is unharmed.
    FAULT_LAUNCH,
    // A kernel faults when it runs (from a stream's queue or a graph replay), as an illegal
    // address would: it does nothing, nor does any kernel after it, and from then on every
    // synchronisation, cudaGetLastError, launch, copy and creation returns
    // cudaErrorIllegalAddress (frees still free). Sticky for the rest of the test, as it is for
    // the rest of a real process.
    FAULT_KERNEL,
    FAULT_KINDS
};
void fail_call(Fault kind, long long after);
void disarm_faults();            // every kind; also clears a FAULT_KERNEL's sticky error
long long fault_calls(Fault kind);  // the calls of that kind so far

// What the process holds of the emulated device, to show that an error path released it all;
// and the NVTX ranges open, which an error path must close too.
struct Resources {
    size_t device_bytes, device_allocs, pinned_allocs, streams, events, graphs, blaslt_objects;
    int nvtx_depth;
    bool operator==(const Resources &) const = default;
};
Resources resources();
// The stand-in's live cuBLASLt handles, descriptors, layouts and preferences (cublaslt_emu.cpp)
size_t blaslt_objects();
// What host code asked of the runtime since reset_traffic(), to check an engine's promises
// about a step (one stream, no synchronisation, only the sampled ids copied back):
struct Traffic {
    long long stream_syncs, event_syncs, device_syncs;  // host waits, by kind
    long long sync_calls;   // calls that return only when done: cudaMemcpy, cudaMemset, and
                            // cudaMemcpyAsync to or from pageable memory
    long long allocations;  // cudaMalloc, cudaFree, cudaHostAlloc, cudaFreeHost
    long long d2h_copies, d2h_bytes;  // copies from the device to the host
    long long h2d_copies;             // and from the host to the device
    std::vector<void *> streams;      // the streams that received work (NULL: the legacy one)
};
void reset_traffic();
Traffic traffic();
// The engine's code asks this at each call it can fail (runtime.cpp, cublaslt_emu.cpp, the
// launch in cuda_emu.h): true when this call of that kind is the one to fail.
bool injected(Fault kind);
}  // namespace simt
