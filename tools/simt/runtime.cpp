// tools/simt: the emulated CUDA runtime (declared in cuda_emu.h, extern "C" so that C code built
// against the real cuda_runtime.h links to it too). One device; device memory is host memory.
//
// What it models, because a GPU would punish getting it wrong:
//   - Streams are queues. Work on a created stream runs only when something waits for it
//     (cudaStreamSynchronize, cudaEventSynchronize up to that event's record,
//     cudaDeviceSynchronize, cudaFree, a copy to pageable memory), so a host read of a pinned
//     buffer that no synchronisation ordered after its copy sees the old bytes, as it would on
//     a GPU.
//     Work on the legacy stream (nullptr) runs at once, after the blocking streams' queues
//     (created without cudaStreamNonBlocking); non-blocking streams do not wait for it.
//   - Stream capture records kernel launches, copies, memsets and cuBLASLt products with their
//     arguments by value, executing nothing; a graph launch queues the recorded work, so a host
//     value baked into a capture is what every replay uses, and a pinned buffer a captured copy
//     reads is read at replay. Calls a capture forbids (allocation, synchronisation, copies to
//     or from pageable memory) fail with cudaErrorStreamCaptureUnsupported and invalidate it.
//   - Copies and memsets must lie inside one allocation of the kind their direction names
//     (device: cudaMalloc; pinned: cudaHostAlloc; anything else is pageable host memory).
//     Fresh device memory is filled with 0xff bytes (NaN in bf16 and fp32, -1 in int32), so a
//     read of something never written shows.
//   - Device memory is not the host's: outside the device's own work (kernels, copies, memsets,
//     cuBLASLt products) it is inaccessible (mprotect PROT_NONE; under AddressSanitizer,
//     poisoned), so host code that dereferences a device pointer faults here as it would on a
//     GPU machine, instead of reading a value no GPU would give it. Each allocation ends at a
//     guard page (without ASan, whose redzones do that job), so a kernel running off its end
//     faults too. EMU_HOST_GUARD=0 turns both off.
//   - Events time the work between them with the host's clock (the emulated work is what runs
//     between them); cudaEventElapsedTime refuses untimed, unrecorded and unfinished events.
//     A cudaEventRecord while the stream captures is no graph node (only
//     cudaEventRecordExternal makes one): replays never record the event. Waiting on, querying
//     or timing an event whose last record was such a one is reported as a fault, as the host
//     code would otherwise read a stale event on a GPU.
// Kernel errors (emulator faults, bad configurations) are reported by the next synchronisation
// and are sticky, as a device fault is.
// Faults can be injected (simt::fail_call, simt_api.h): a creation, a launch or a running
// kernel fails as it would on a GPU, so that tests can drive the library's error paths; a
// kernel's fault kills the device as a real one does (device_dead: every later call that would
// reach the device fails with cudaErrorIllegalAddress, frees still free). And it counts what
// host code asks of it (simt::traffic: waits, synchronous calls, allocations, copies, streams),
// so that tests can hold a step to "one stream, no synchronisation".
#include <execinfo.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <set>

#include "simt_api.h"

namespace emu {
namespace {

struct Work {
    const char *what;
    std::function<void()> fn;
};

struct Stream {
    unsigned flags = 0;
    std::deque<Work> queue;
    bool capturing = false, invalidated = false;
    std::vector<Work> nodes;  // the capture so far
};

struct Event {
    unsigned flags = 0;
    bool recorded = false, complete = false;
    bool in_capture = false;  // last recorded while its stream captured: no replay records it
    uint64_t generation = 0;  // a record supersedes the previous one still queued
    double ms = 0;
    Stream *stream = nullptr;
};

struct Graph {
    std::vector<Work> nodes;
};

struct Alloc {
    size_t bytes;
    bool pinned;
    char *map = nullptr;  // guarded device memory: the mapping, its accessible part, its guard
    size_t map_bytes = 0;
};

std::map<uintptr_t, Alloc> allocs;
size_t device_bytes = 0;
std::set<Stream *> streams;
std::map<cudaEvent_t, std::shared_ptr<Event>> events;
std::set<Graph *> graphs;
int current_device = 0;
simt::Traffic traffic;  // since simt::reset_traffic()

void used_stream(cudaStream_t s) {
    void *p = (void *)s;
    if (std::find(traffic.streams.begin(), traffic.streams.end(), p) == traffic.streams.end())
        traffic.streams.push_back(p);
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Device memory the emulator hands out in all (EMU_DEVICE_GIB, default 16): beyond it
// cudaMalloc fails with cudaErrorMemoryAllocation, as a device of that size would.
size_t device_limit() {
    static const size_t limit = [] {
        const char *g = getenv("EMU_DEVICE_GIB");
        return (size_t)(g ? atof(g) : 16.0) << 30;
    }();
    return limit;
}

// An emulator error: printed by the next synchronisation (which then fails), or at the end of
// the test by emu_main.cpp's listener if none comes.
void fault(const std::string &msg) { errors.push_back(msg); }

bool host_guard() {
    static const bool on = [] {
        const char *g = getenv("EMU_HOST_GUARD");
        return !g || atoi(g) != 0;
    }();
    return on;
}

// Device memory opens for the device's work and closes behind it; nested opens are one.
int open_depth = 0;
void set_access(bool open) {
    if (!host_guard()) return;
    for (auto &[base, a] : allocs) {
        if (a.pinned) continue;
#if EMU_ASAN
        if (open) __asan_unpoison_memory_region((void *)base, a.bytes);
        else __asan_poison_memory_region((void *)base, a.bytes);
#else
        if (mprotect(a.map, a.map_bytes, open ? PROT_READ | PROT_WRITE : PROT_NONE) != 0) {
            perror("simt: mprotect");
            abort();
        }
#endif
    }
}
// A fault in guarded device memory: say whose and why, with a backtrace, then die of it.
void on_segv(int sig, siginfo_t *info, void *) {
    const uintptr_t at = (uintptr_t)info->si_addr;
    for (auto &[base, a] : allocs) {
        if (!a.map || at < (uintptr_t)a.map || at >= (uintptr_t)a.map + a.map_bytes + 4096)
            continue;
        char msg[256];
        const int len = snprintf(
            msg, sizeof msg,
            "\nsimt: %s at %p, %s device allocation %p (%zu bytes)\n",
            open_depth ? "a device operation ran past the end" : "HOST code touched device memory",
            (void *)at, at >= base + a.bytes ? "past the end of" : "inside", (void *)base, a.bytes);
        if (write(2, msg, (size_t)len) < 0) break;
        void *frames[48];
        backtrace_symbols_fd(frames, backtrace(frames, 48), 2);
        break;
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_segv_handler() {
    static bool done = false;
    if (done || EMU_ASAN) return;
    done = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
}

struct DeviceOpen {
    DeviceOpen() {
        if (open_depth++ == 0) set_access(true);
    }
    ~DeviceOpen() {
        if (--open_depth == 0) set_access(false);
    }
    DeviceOpen(const DeviceOpen &) = delete;
    DeviceOpen &operator=(const DeviceOpen &) = delete;
};

Stream *stream_of(cudaStream_t s) { return reinterpret_cast<Stream *>(s); }

bool known(cudaStream_t s) { return !s || streams.count(stream_of(s)); }

Stream *capturing_stream() {
    for (Stream *s : streams)
        if (s->capturing) return s;
    return nullptr;
}

// A call that a capture in progress forbids (one that allocates or synchronises): the capture
// is invalidated and the call fails, as cudaStreamCaptureModeGlobal / ThreadLocal have it.
bool forbidden_in_capture(const char *call) {
    Stream *c = capturing_stream();
    if (!c) return false;
    fault(std::string(call) + " while a stream is capturing (cudaErrorStreamCaptureUnsupported)");
    c->invalidated = true;
    last_error = cudaErrorStreamCaptureUnsupported;
    return true;
}

void run_front(Stream *s) {
    stats.deferred_runs++;
    Work op = std::move(s->queue.front());
    s->queue.pop_front();
    DeviceOpen open;
    op.fn();
}

void flush(Stream *s) {
    if (s->queue.empty()) return;
    DeviceOpen open;  // once for the whole queue, not per operation
    while (!s->queue.empty()) run_front(s);
}

void flush_blocking() {
    for (Stream *s : streams)
        if (!(s->flags & cudaStreamNonBlocking)) flush(s);
}

void flush_all() {
    for (Stream *s : streams) flush(s);
}

// What a synchronisation returns: the kernel errors since the last one, printed, then sticky;
// or an injected kernel fault's.
cudaError_t sync_status() {
    if (!errors.empty()) {
        for (const std::string &e : errors) fprintf(stderr, "EMULATOR ERROR: %s\n", e.c_str());
        errors.clear();
        sticky_failure = true;
    }
    if (sticky_failure) return cudaErrorLaunchFailure;
    return device_dead ? cudaErrorIllegalAddress : cudaSuccess;
}

// A call that reaches the device fails once a kernel has faulted (an injected FAULT_KERNEL).
bool dead_device() {
    if (!device_dead) return false;
    last_error = cudaErrorIllegalAddress;
    return true;
}

enum Space { PAGEABLE, DEVICE, PINNED, STRADDLES };

// Where [p, p + n) lies: inside one device or pinned allocation, in pageable memory, or across
// an allocation's end (always a bug).
Space space_of(const void *p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    auto it = allocs.upper_bound(a);
    if (it == allocs.begin()) return PAGEABLE;
    --it;
    if (a >= it->first + it->second.bytes) return PAGEABLE;
    if (a + n > it->first + it->second.bytes) return STRADDLES;
    return it->second.pinned ? PINNED : DEVICE;
}

const char *space_name(Space s) {
    switch (s) {
    case DEVICE: return "device";
    case PINNED: return "pinned host";
    case PAGEABLE: return "pageable host";
    case STRADDLES: break;
    }
    return "past an allocation's end";
}

// A copy's direction, for simt::traffic.
void count_copy(const void *d, const void *s, size_t n) {
    const bool from_device = space_of(s, n ? n : 1) == DEVICE;
    const bool to_device = space_of(d, n ? n : 1) == DEVICE;
    if (from_device && !to_device) {
        traffic.d2h_copies++;
        traffic.d2h_bytes += (long long)n;
    }
    if (to_device && !from_device) traffic.h2d_copies++;
}

std::string where(const void *p, size_t n) {
    char b[96];
    snprintf(b, sizeof b, "%p (+%zu bytes)", p, n);
    return b;
}

}  // namespace

bool enqueue(cudaStream_t s, const char *what, std::function<void()> op) {
    if (dead_device()) return false;
    used_stream(s);
    if (!known(s)) {
        fault(std::string(what) + " on a stream that does not exist (destroyed?)");
        last_error = cudaErrorInvalidResourceHandle;
        return false;
    }
    if (!s) {
        flush_blocking();
        DeviceOpen open;
        op();
        return true;
    }
    Stream *st = stream_of(s);
    if (st->capturing) {
        if (st->invalidated) {
            last_error = cudaErrorStreamCaptureInvalidated;
            return false;
        }
        st->nodes.push_back({what, std::move(op)});
        stats.captured_nodes++;
        return true;
    }
    st->queue.push_back({what, std::move(op)});
    stats.queued++;
    return true;
}

void check_kernel_pointer(const char *kernel, int arg, const void *p) {
    if (space_of(p, 1) == PAGEABLE)
        fault(std::string(kernel) + ": argument " + std::to_string(arg) + " = " + where(p, 0) +
              " points to pageable host memory, not device or pinned memory");
}

}  // namespace emu

using namespace emu;

namespace simt {
int enqueue_op(void *stream, const char *what, std::function<void()> op) {
    return emu::enqueue((cudaStream_t)stream, what, std::move(op)) ? 0 : (int)emu::last_error;
}
bool device_span(const void *p, size_t bytes) { return space_of(p, bytes ? bytes : 1) == DEVICE; }
bool device_range(const void *p, uintptr_t *lo, uintptr_t *hi) {
    const uintptr_t a = (uintptr_t)p;
    auto next = allocs.upper_bound(a);
    *hi = next == allocs.end() ? UINTPTR_MAX : next->first;
    *lo = 0;
    if (next != allocs.begin()) {
        auto it = std::prev(next);
        const uintptr_t end = it->first + it->second.bytes;
        if (a < end) {  // inside it
            *lo = it->first;
            *hi = end;
            return !it->second.pinned;
        }
        *lo = end;
    }
    return false;
}
void report(const std::string &msg) { fault(msg); }
size_t device_memory_bytes() { return device_limit(); }

namespace {
// Per kind: the calls so far, and the number (counted from 1) of the one to fail, 0 for none.
long long fault_count[FAULT_KINDS] = {}, fault_at[FAULT_KINDS] = {};
}  // namespace
void fail_call(Fault kind, long long after) { fault_at[kind] = fault_count[kind] + after + 1; }
void disarm_faults() {
    for (long long &a : fault_at) a = 0;
    emu::device_dead = false;
}
long long fault_calls(Fault kind) { return fault_count[kind]; }
bool injected(Fault kind) {
    if (++fault_count[kind] != fault_at[kind]) return false;
    fault_at[kind] = 0;
    return true;
}

// cublaslt_emu.cpp's, where a suite links the stand-in
__attribute__((weak)) size_t blaslt_objects() { return 0; }

void reset_traffic() { emu::traffic = Traffic{}; }
Traffic traffic() { return emu::traffic; }

Resources resources() {
    Resources r = {};
    r.device_bytes = device_bytes;
    r.streams = streams.size();
    r.events = events.size();
    r.graphs = graphs.size();
    r.blaslt_objects = blaslt_objects();
    r.nvtx_depth = emu::nvtx_depth;
    for (const auto &[base, a] : allocs) (a.pinned ? r.pinned_allocs : r.device_allocs)++;
    return r;
}
}  // namespace simt

extern "C" {

cudaError_t cudaGetLastError(void) {
    const cudaError_t e = last_error;
    last_error = cudaSuccess;
    return device_dead ? cudaErrorIllegalAddress : e;
}
cudaError_t cudaPeekAtLastError(void) { return device_dead ? cudaErrorIllegalAddress : last_error; }

const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator)";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorStreamCaptureUnsupported:
        return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
        return "operation failed due to a previous error during capture";
    default: return "cuda error";
    }
}

// EMU_NO_DEVICE=1: a machine without a GPU (the driver's answer), for the tests that run only
// there.
cudaError_t cudaGetDeviceCount(int *count) {
    const char *none = getenv("EMU_NO_DEVICE");
    if (none && atoi(none)) {
        *count = 0;
        return last_error = cudaErrorNoDevice;
    }
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
    if (device != 0) return last_error = cudaErrorInvalidDevice;
    current_device = device;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *device) {
    *device = current_device;
    return cudaSuccess;
}

// Device memory (cudaMalloc) or pinned host memory (cudaHostAlloc) of device 0; anything else
// is unregistered host memory, as CUDA 11 and later report it.
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p) {
    if (!a) return last_error = cudaErrorInvalidValue;
    *a = {};
    const Space s = space_of(p, 1);
    a->type = s == DEVICE ? cudaMemoryTypeDevice
              : s == PINNED ? cudaMemoryTypeHost
                            : cudaMemoryTypeUnregistered;
    a->device = s == PAGEABLE ? -2 : 0;
    a->devicePointer = s == PAGEABLE ? nullptr : const_cast<void *>(p);
    a->hostPointer = s == DEVICE ? nullptr : const_cast<void *>(p);
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t n) {
    *p = nullptr;
    traffic.allocations++;
    if (forbidden_in_capture("cudaMalloc")) return cudaErrorStreamCaptureUnsupported;
    if (dead_device()) return last_error;
    if (simt::injected(simt::FAULT_CREATE) ||
        n > device_limit() - std::min(device_limit(), device_bytes)) {
        return last_error = cudaErrorMemoryAllocation;
    }
    Alloc a = {n, false};
    if (host_guard() && !EMU_ASAN) {
        install_segv_handler();
        // The allocation ends 256-byte aligned just before a guard page. Large ones sit in
        // 2 MiB-aligned huge pages where the kernel offers them (madvise): every
        // synchronisation reprotects all device memory, and that costs per page.
        const size_t page = (size_t)sysconf(_SC_PAGESIZE), huge = (size_t)2 << 20;
        const size_t body = (n + 255) / 256 * 256, unit = body >= huge ? huge : page;
        a.map_bytes = (body + unit - 1) / unit * unit;
        void *m = mmap(nullptr, a.map_bytes + unit + page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return last_error = cudaErrorMemoryAllocation;
        char *lo = (char *)(((uintptr_t)m + unit - 1) / unit * unit);
        // keep [lo, lo + map_bytes + page): the body and its guard page
        if (lo > (char *)m) munmap(m, (size_t)(lo - (char *)m));
        char *end = (char *)m + a.map_bytes + unit + page, *keep = lo + a.map_bytes + page;
        if (end > keep) munmap(keep, (size_t)(end - keep));
        a.map = lo;
        if (unit == huge) madvise(a.map, a.map_bytes, MADV_HUGEPAGE);
        mprotect(a.map + a.map_bytes, page, PROT_NONE);
        *p = a.map + a.map_bytes - body;
    } else if (posix_memalign(p, 256, n ? n : 1) != 0) {
        return last_error = cudaErrorMemoryAllocation;
    }
    memset(*p, 0xff, n);
    allocs[(uintptr_t)*p] = a;
    device_bytes += n;
    if (open_depth == 0) set_access(false);
    return cudaSuccess;
}

cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    traffic.allocations++;
    if (forbidden_in_capture("cudaFree")) return cudaErrorStreamCaptureUnsupported;
    flush_all();  // cudaFree synchronises the device
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end() || it->second.pinned) {
        fault("cudaFree of " + where(p, 0) + ", which cudaMalloc did not return");
        return last_error = cudaErrorInvalidValue;
    }
    const Alloc a = it->second;
    {
        DeviceOpen open;  // unpoisoned before ASan gets it back
        device_bytes -= a.bytes;
        allocs.erase(it);
    }
    if (a.map) munmap(a.map, a.map_bytes + (size_t)sysconf(_SC_PAGESIZE));
    else free(p);
    return cudaSuccess;
}

cudaError_t cudaHostAlloc(void **p, size_t n, unsigned int) {
    *p = nullptr;
    traffic.allocations++;
    if (forbidden_in_capture("cudaHostAlloc")) return cudaErrorStreamCaptureUnsupported;
    if (dead_device()) return last_error;
    if (simt::injected(simt::FAULT_CREATE) || posix_memalign(p, 4096, n ? n : 1) != 0)
        return last_error = cudaErrorMemoryAllocation;
    allocs[(uintptr_t)*p] = {n, true};
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }

cudaError_t cudaFreeHost(void *p) {
    if (!p) return cudaSuccess;
    traffic.allocations++;
    if (forbidden_in_capture("cudaFreeHost")) return cudaErrorStreamCaptureUnsupported;
    flush_all();
    auto it = allocs.find((uintptr_t)p);
    if (it == allocs.end() || !it->second.pinned) {
        fault("cudaFreeHost of " + where(p, 0) + ", which cudaHostAlloc did not return");
        return last_error = cudaErrorInvalidValue;
    }
    allocs.erase(it);
    free(p);
    return cudaSuccess;
}

// Checks a copy's two ends against its kind; names the problem and returns false if wrong.
static bool check_copy(const char *call, void *d, const void *s, size_t n, cudaMemcpyKind k) {
    const Space sd = space_of(d, n), ss = space_of(s, n);
    const bool dev_d = sd == DEVICE, dev_s = ss == DEVICE;
    bool ok = sd != STRADDLES && ss != STRADDLES;
    switch (k) {
    case cudaMemcpyHostToDevice: ok = ok && dev_d && !dev_s; break;
    case cudaMemcpyDeviceToHost: ok = ok && !dev_d && dev_s; break;
    case cudaMemcpyDeviceToDevice: ok = ok && dev_d && dev_s; break;
    case cudaMemcpyHostToHost: ok = ok && !dev_d && !dev_s; break;
    case cudaMemcpyDefault: break;
    }
    if (!ok) {
        fault(std::string(call) + " kind " + std::to_string((int)k) + ": destination " +
              where(d, n) + " is " + space_name(sd) + ", source " + where(s, n) + " is " +
              space_name(ss));
    }
    return ok;
}

cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k) {
    traffic.sync_calls++;
    count_copy(d, s, n);
    if (forbidden_in_capture("cudaMemcpy")) return cudaErrorStreamCaptureUnsupported;
    if (n == 0) return cudaSuccess;
    if (!check_copy("cudaMemcpy", d, s, n, k)) return last_error = cudaErrorInvalidValue;
    if (dead_device()) return last_error;
    flush_blocking();  // the legacy stream waits for the blocking streams
    DeviceOpen open;
    memmove(d, s, n);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *d, int v, size_t n) {
    traffic.sync_calls++;
    if (forbidden_in_capture("cudaMemset")) return cudaErrorStreamCaptureUnsupported;
    if (n == 0) return cudaSuccess;
    if (space_of(d, n) != DEVICE) {
        fault("cudaMemset of " + where(d, n) + ", not inside one device allocation");
        return last_error = cudaErrorInvalidValue;
    }
    if (dead_device()) return last_error;
    flush_blocking();
    DeviceOpen open;
    memset(d, v, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k,
                            cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (!check_copy("cudaMemcpyAsync", d, s, n, k)) return last_error = cudaErrorInvalidValue;
    const bool pageable = (space_of(d, n) == PAGEABLE) || (space_of(s, n) == PAGEABLE);
    if (pageable) traffic.sync_calls++;
    count_copy(d, s, n);
    Stream *st = known(stream) ? stream_of(stream) : nullptr;
    if (pageable && st && st->capturing) {
        // a graph's copy node cannot stage pageable memory
        fault("cudaMemcpyAsync of pageable host memory " +
              where(space_of(d, n) == PAGEABLE ? (const void *)d : s, n) + " during capture");
        st->invalidated = true;
        return last_error = cudaErrorStreamCaptureUnsupported;
    }
    if (pageable && st) {
        // Staged: the stream's earlier work completes, then the copy is made before the call
        // returns (to pageable memory the call returns only when the data is there).
        DeviceOpen open;
        flush(st);
        memmove(d, s, n);
        return sync_status();
    }
    if (!enqueue(stream, "cudaMemcpyAsync", [d, s, n] { memmove(d, s, n); })) return last_error;
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    if (space_of(d, n) != DEVICE) {
        fault("cudaMemsetAsync of " + where(d, n) + ", not inside one device allocation");
        return last_error = cudaErrorInvalidValue;
    }
    if (!enqueue(stream, "cudaMemsetAsync", [d, v, n] { memset(d, v, n); })) return last_error;
    return cudaSuccess;
}

cudaError_t cudaMemset2DAsync(void *d, size_t pitch, int v, size_t width, size_t height,
                              cudaStream_t stream) {
    if (width == 0 || height == 0) return cudaSuccess;
    if (width > pitch || space_of(d, pitch * (height - 1) + width) != DEVICE) {
        fault("cudaMemset2DAsync of " + std::to_string(height) + " rows of " +
              std::to_string(width) + " bytes, pitch " + std::to_string(pitch) + " at " +
              where(d, pitch * (height - 1) + width) + ": not inside one device allocation");
        return last_error = cudaErrorInvalidValue;
    }
    auto op = [d, pitch, v, width, height] {
        for (size_t r = 0; r < height; r++) memset((char *)d + r * pitch, v, width);
    };
    if (!enqueue(stream, "cudaMemset2DAsync", op)) return last_error;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
    traffic.device_syncs++;
    if (forbidden_in_capture("cudaDeviceSynchronize")) return cudaErrorStreamCaptureUnsupported;
    flush_all();
    return sync_status();
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags) {
    if (dead_device()) return last_error;
    if (simt::injected(simt::FAULT_CREATE)) return last_error = cudaErrorMemoryAllocation;
    Stream *st = new Stream;
    st->flags = flags;
    streams.insert(st);
    *s = reinterpret_cast<cudaStream_t>(st);
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s || !known(s)) return last_error = cudaErrorInvalidResourceHandle;
    Stream *st = stream_of(s);
    if (st->capturing) {
        fault("cudaStreamDestroy of a stream that is capturing");
        return last_error = cudaErrorStreamCaptureUnsupported;
    }
    flush(st);  // its work completes, then it goes
    streams.erase(st);
    delete st;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    traffic.stream_syncs++;
    if (!known(s)) return last_error = cudaErrorInvalidResourceHandle;
    if (forbidden_in_capture("cudaStreamSynchronize")) return cudaErrorStreamCaptureUnsupported;
    if (s) flush(stream_of(s));
    else flush_blocking();
    return sync_status();
}

cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, 0); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags) {
    if (dead_device()) return last_error;
    if (simt::injected(simt::FAULT_CREATE)) return last_error = cudaErrorMemoryAllocation;
    auto ev = std::make_shared<Event>();
    ev->flags = flags;
    *e = reinterpret_cast<cudaEvent_t>(ev.get());
    events[*e] = ev;
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e) {
    // a record still queued keeps its own reference
    if (!events.erase(e)) return last_error = cudaErrorInvalidResourceHandle;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    auto it = events.find(e);
    if (it == events.end() || !known(s)) return last_error = cudaErrorInvalidResourceHandle;
    std::shared_ptr<Event> ev = it->second;
    Stream *st = s ? stream_of(s) : nullptr;
    const uint64_t gen = ++ev->generation;
    ev->in_capture = st && st->capturing;
    if (ev->in_capture) return cudaSuccess;  // a capture dependency only, not a node
    ev->recorded = true;
    ev->complete = false;
    ev->stream = st;
    auto op = [ev, gen] {
        if (ev->generation == gen) {
            ev->complete = ev->recorded = true;
            ev->ms = now_ms();
        }
    };
    if (!enqueue(s, "cudaEventRecord", op)) return last_error;
    return cudaSuccess;
}

// An event last recorded inside a capture: a GPU's replays never record it, so waiting on it,
// querying or timing it reads whatever it held before; here that is a fault.
static bool captured_record_ok(const char *call, const Event &ev) {
    if (!ev.in_capture) return true;
    fault(std::string(call) + " on an event last recorded while its stream captured: a graph "
          "replay does not record it (cudaEventRecordExternal would make it a node)");
    last_error = cudaErrorIllegalState;
    return false;
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    traffic.event_syncs++;
    auto it = events.find(e);
    if (it == events.end()) return last_error = cudaErrorInvalidResourceHandle;
    if (forbidden_in_capture("cudaEventSynchronize")) return cudaErrorStreamCaptureUnsupported;
    Event *ev = it->second.get();
    if (!captured_record_ok("cudaEventSynchronize", *ev)) return last_error;
    // only up to the record: what the stream holds after it has not necessarily run
    while (ev->recorded && !ev->complete && ev->stream && streams.count(ev->stream) &&
           !ev->stream->queue.empty())
        run_front(ev->stream);
    return sync_status();
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
    auto it = events.find(e);
    if (it == events.end()) return last_error = cudaErrorInvalidResourceHandle;
    if (!captured_record_ok("cudaEventQuery", *it->second)) return last_error;
    return it->second->recorded && !it->second->complete ? cudaErrorNotReady : cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    auto a = events.find(start), b = events.find(end);
    if (a == events.end() || b == events.end()) return last_error = cudaErrorInvalidResourceHandle;
    const Event &s = *a->second, &t = *b->second;
    if (!captured_record_ok("cudaEventElapsedTime", s) ||
        !captured_record_ok("cudaEventElapsedTime", t))
        return last_error;
    if ((s.flags | t.flags) & cudaEventDisableTiming)
        return last_error = cudaErrorInvalidResourceHandle;
    if (!s.recorded || !t.recorded) return last_error = cudaErrorInvalidResourceHandle;
    if (!s.complete || !t.complete) return last_error = cudaErrorNotReady;
    *ms = (float)(t.ms - s.ms);
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (!s || !known(s)) {
        fault("cudaStreamBeginCapture on the legacy stream or an unknown one");
        return last_error = cudaErrorStreamCaptureUnsupported;
    }
    Stream *st = stream_of(s);
    if (st->capturing) return last_error = cudaErrorIllegalState;
    st->capturing = true;
    st->invalidated = false;
    st->nodes.clear();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph) {
    *graph = nullptr;
    if (!s || !known(s) || !stream_of(s)->capturing) return last_error = cudaErrorIllegalState;
    Stream *st = stream_of(s);
    st->capturing = false;
    if (st->invalidated) {
        st->nodes.clear();
        return last_error = cudaErrorStreamCaptureInvalidated;
    }
    Graph *g = new Graph{std::move(st->nodes)};
    stats.captures++;
    st->nodes.clear();
    graphs.insert(g);
    *graph = reinterpret_cast<cudaGraph_t>(g);
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long) {
    Graph *g = reinterpret_cast<Graph *>(graph);
    *exec = nullptr;
    if (!graphs.count(g)) return last_error = cudaErrorInvalidValue;
    if (dead_device()) return last_error;
    if (simt::injected(simt::FAULT_CREATE)) return last_error = cudaErrorMemoryAllocation;
    Graph *x = new Graph{g->nodes};  // the executable copy outlives the graph
    graphs.insert(x);
    *exec = reinterpret_cast<cudaGraphExec_t>(x);
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    Graph *x = reinterpret_cast<Graph *>(exec);
    if (!graphs.count(x) || !known(s)) return last_error = cudaErrorInvalidResourceHandle;
    stats.graph_launches++;
    stats.replayed_nodes += x->nodes.size();
    for (const Work &op : x->nodes)
        if (!enqueue(s, op.what, op.fn)) return last_error;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    Graph *g = reinterpret_cast<Graph *>(graph);
    if (!graphs.erase(g)) return last_error = cudaErrorInvalidValue;
    delete g;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    // queued replays hold copies of the nodes: destroying the executable does not cancel them
    return cudaGraphDestroy(reinterpret_cast<cudaGraph_t>(exec));
}

}  // extern "C"
