// tools/simt: the part of the CUDA runtime, math library, vector types, cuda_bf16.h and
// cuda_fp16.h that the emulated kernels and their launchers use, on the host. Included at the
// end of shim.h.
#pragma once
#include <stdarg.h>

#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "simt_api.h"  // fault injection (the launch below asks it)

#define __align__(n) alignas(n)

// ---------------------------------------------------------------------------------------------
// Vector types (alignment as CUDA's vector_types.h)
// ---------------------------------------------------------------------------------------------
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

template <typename T>
inline T __ldg(const T *p) {
    return *p;
}

// ---------------------------------------------------------------------------------------------
// bf16 (cuda_bf16.h): bits only, exact round-to-nearest-even; NaN -> canonical 0x7fff as
// cvt.rn.bf16.f32 does on sm_80+.
// ---------------------------------------------------------------------------------------------
struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
#include "bf16_bits.h"  // emu::f2bf_rn, emu::bf2f
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::f2bf_rn(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return {emu::f2bf_rn(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf2f(h.__x); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
    return {emu::bf2f(h.x.__x), emu::bf2f(h.y.__x)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {{emu::f2bf_rn(a)}, {emu::f2bf_rn(b)}};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

// ---------------------------------------------------------------------------------------------
// fp16 (cuda_fp16.h): bits only. The conversions are the host compiler's _Float16 (IEEE
// binary16, round-to-nearest-even, overflow to inf), not the library's or the tests' own bit
// code; NaN -> canonical 0x7fff as cvt.rn.f16.f32 does.
// ---------------------------------------------------------------------------------------------
struct alignas(2) __half {
    unsigned short __x;
};
struct alignas(4) __half2 {
    __half x, y;
};
namespace emu {
inline unsigned short f2h_rn(float f) {
    if (f != f) return 0x7fffu;
    const _Float16 h = (_Float16)f;
    unsigned short u;
    memcpy(&u, &h, sizeof u);
    return u;
}
inline float h2f(unsigned short u) {
    _Float16 h;
    memcpy(&h, &u, sizeof h);
    return (float)h;
}
}  // namespace emu
inline __half __float2half_rn(float f) { return {emu::f2h_rn(f)}; }
inline float __half2float(__half h) { return emu::h2f(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return {{emu::f2h_rn(a)}, {emu::f2h_rn(b)}}; }
inline float2 __half22float2(__half2 h) { return {emu::h2f(h.x.__x), emu::h2f(h.y.__x)}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }

// ---------------------------------------------------------------------------------------------
// Math. IEEE basic operations are the host's. The transcendental functions are glibc's
// (correctly rounded or nearly); emu::ulp_noise > 0 moves each result by up to that many ulps
// (a deterministic pseudo-random direction per argument) to stay inside, but near, the CUDA
// documented bounds (expf, rsqrtf, sincosf 2 ulp; erfcf 4 ulp; logf 1 ulp: not moved).
// Applied to the kernel translation units only (EMU_DEVICE_MATH).
// ---------------------------------------------------------------------------------------------
namespace emu {
inline int ulp_noise = 0;
inline float nudge(float r, float arg, unsigned salt, int max_ulps) {
    if (ulp_noise <= 0 || max_ulps <= 0 || !std::isfinite(r) || r == 0.0f) return r;
    uint32_t a;
    memcpy(&a, &arg, 4);
    uint32_t h = (a ^ salt) * 0x9e3779b1u;
    h ^= h >> 15;
    h *= 0x85ebca77u;
    h ^= h >> 13;
    const int m = std::min(ulp_noise, max_ulps);
    int k = (int)(h % (unsigned)(2 * m + 1)) - m;
    for (; k > 0; k--) r = nextafterf(r, INFINITY);
    for (; k < 0; k++) r = nextafterf(r, -INFINITY);
    return r;
}
inline float dev_expf(float x) { return nudge(::expf(x), x, 0x1234u, 1); }
inline float dev_logf(float x) { return ::logf(x); }
inline float dev_erfcf(float x) { return nudge(::erfcf(x), x, 0x5678u, 3); }
inline float dev_rsqrtf(float x) { return nudge(1.0f / ::sqrtf(x), x, 0x9abcu, 1); }
inline void dev_sincosf(float x, float *s, float *c) {
    ::sincosf(x, s, c);
    *s = nudge(*s, x, 0xdef0u, 1);
    *c = nudge(*c, x, 0x0fedu, 1);
}
}  // namespace emu
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
// Double intrinsics, each result rounded on its own. The empty asm makes the value opaque, so
// that with EMU_FMA=1 (-mfma -ffp-contract=fast) the compiler cannot fuse a product into the
// following add, just as nvcc never fuses the __d*_rn intrinsics.
namespace emu {
inline double opaque(double x) {
    asm volatile("" : "+x"(x));
    return x;
}
}  // namespace emu
inline double __dmul_rn(double a, double b) { return emu::opaque(a * b); }
inline double __dadd_rn(double a, double b) { return emu::opaque(a + b); }
inline double __dsub_rn(double a, double b) { return emu::opaque(a - b); }
inline double __ddiv_rn(double a, double b) { return emu::opaque(a / b); }
inline double __dsqrt_rn(double a) { return emu::opaque(::sqrt(a)); }
inline float __double2float_rn(double a) { return (float)a; }
#ifdef EMU_DEVICE_MATH
#define expf(x) emu::dev_expf(x)
#define logf(x) emu::dev_logf(x)
#define erfcf(x) emu::dev_erfcf(x)
#define rsqrtf(x) emu::dev_rsqrtf(x)
#define sincosf(x, s, c) emu::dev_sincosf(x, s, c)
#define __expf(x) emu::dev_expf(x)
#define __logf(x) emu::dev_logf(x)
#else
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
#endif

// ---------------------------------------------------------------------------------------------
// CUDA runtime and NVTX. The runtime calls are extern "C" and defined once, in runtime.cpp, so
// that C code compiled against the real cuda_runtime.h (the engine, host/cuda/) reaches the same
// emulated device as the kernels and the tests: the types and error values here are the real
// ones' ABI (pointers to the same struct names, int-sized enums with CUDA's numbers).
// ---------------------------------------------------------------------------------------------
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUgraph_st *cudaGraph_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInsufficientDriver = 35,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalState = 401,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureUnmatched = 903,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
};
enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3
};
// The same layout as the toolkit's, so that C code built against cuda_runtime.h reads it.
struct cudaPointerAttributes {
    cudaMemoryType type;
    int device;
    void *devicePointer;
    void *hostPointer;
    long reserved[8];
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaEventBlockingSync 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00

extern "C" {
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes *a, const void *p);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned int flags);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k);
cudaError_t cudaMemset(void *d, int v, size_t n);
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k,
                            cudaStream_t stream = nullptr);
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t stream = nullptr);
cudaError_t cudaMemset2DAsync(void *d, size_t pitch, int v, size_t width, size_t height,
                              cudaStream_t stream = nullptr);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned int flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph,
                                 unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
}
template <typename T>
inline cudaError_t cudaMalloc(T **p, size_t n) {
    return cudaMalloc(reinterpret_cast<void **>(p), n);
}
namespace emu {
// The dynamic shared memory each kernel opted in to (cudaFuncSetAttribute); 48 KB without.
inline std::map<const void *, int> max_dynamic_shared;
template <typename Tag, typename F>
inline const void *kernel_key(Tag, F *f) {
    return reinterpret_cast<const void *>(f);
}
}  // namespace emu
// A launch's kernel as cudaFuncSetAttribute names it: the function's address, or nullptr
// (no opt-in, 48 KB) when the launch's expression names a template whose remaining parameters
// only the arguments deduce (rewrite.py cannot name that specialisation; none of those kernels
// opts in).
#define EMU_KERNEL_KEY(...)                                                  \
    ([&](auto emu_tag) -> const void * {                                     \
        if constexpr (requires { emu::kernel_key(emu_tag, __VA_ARGS__); }) \
            return emu::kernel_key(emu_tag, __VA_ARGS__);                    \
        else                                                                 \
            return nullptr;                                                  \
    }(0))
namespace emu {
// The dynamic shared memory a kernel may opt in to: an H100's 227 KB, or EMU_SMEM_OPTIN bytes
// (at most that), to stand for a GPU that allows less (101376 on sm_86 / sm_89, 166912 on an
// A100), so that a launcher's choice for such a GPU can be tested.
inline size_t smem_optin() {
    static const size_t v = [] {
        const char *s = getenv("EMU_SMEM_OPTIN");
        const long long n = s ? atoll(s) : 0;
        return n > 0 && (size_t)n < kMaxDynamicShared ? (size_t)n : kMaxDynamicShared;
    }();
    return v;
}
}  // namespace emu
// The emulated device is an sm_90 (kernels that check for one, e.g. attention_sm90.cu, run).
inline cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
    if (device != 0) return cudaErrorInvalidDevice;
    *value = attr == cudaDevAttrComputeCapabilityMajor                ? 9
             : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? (int)emu::smem_optin()
                                                                       : 0;
    return cudaSuccess;
}
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T *f, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
        (size_t)value > emu::smem_optin())
        return cudaErrorInvalidValue;
    emu::max_dynamic_shared[emu::kernel_key(0, f)] = value;
    return cudaSuccess;
}

namespace emu {
inline cudaError_t last_error = cudaSuccess;
struct LaunchRec {
    std::string name;
    dim3 grid, block;
    bool ok;
};
inline std::vector<LaunchRec> launches;   // every launch since the driver cleared it
inline std::vector<std::string> errors;   // emulator errors (deadlock, divergent warp op, config)
inline int nvtx_depth = 0;
inline bool sticky_failure = false;
// A kernel faulted (simt::FAULT_KERNEL): nothing runs any more, every synchronisation and
// cudaGetLastError says cudaErrorIllegalAddress (runtime.cpp).
inline bool device_dead = false;
// What the runtime did over the run (runtime.cpp), reported at the end by emu_main.cpp, so a
// suite that meant to exercise queues and graphs can be seen to have.
struct RuntimeStats {
    unsigned long long queued = 0, deferred_runs = 0, captures = 0, captured_nodes = 0,
                       graph_launches = 0, replayed_nodes = 0;
};
inline RuntimeStats stats;
// Emulator modes: thread order, the byte __shared__ is filled with before each block, the block
// order and the warp schedule (shim.h run_block). mode_select 0..3 fixes one; 4 (default)
// rotates through them launch by launch (so a test's "second run gives the same bits"
// compares two modes).
struct Mode {
    int order;
    unsigned char poison;
    int block_order, sched, warp_order;
    const char *name;
};
inline constexpr int kNumModes = 4;
inline const Mode kModes[kNumModes] = {
    {0, 0x00, 0, 0, 0, "lockstep/threads-asc/0x00/blocks-asc"},
    {1, 0xff, 1, 1, 0, "warp-serial-asc/threads-desc/0xff/blocks-desc"},
    {0, 0x5a, 2, 1, 1, "warp-serial-desc/threads-asc/0x5a/blocks-rand"},
    {2, 0xa5, 0, 2, 2, "random-steps/threads-rand/0xa5/blocks-asc"}};
inline int mode_select = kNumModes;
inline unsigned long long launch_count = 0;
inline void apply_mode(unsigned long long n) {
    const Mode &m = kModes[mode_select < kNumModes ? mode_select : (int)(n % kNumModes)];
    ctx.order = m.order;
    ctx.poison = m.poison;
    ctx.block_order = m.block_order;
    ctx.sched = m.sched;
    ctx.warp_order = m.warp_order;
}

// A kernel's __launch_bounds__(max_threads) against the running block (rewrite.py inserts the
// call at the top of every kernel that declares one).
inline void check_launch_bounds(long long max_threads, const char *kernel) {
    const long long nt = (long long)blockDim.x * blockDim.y * blockDim.z;
    if (nt > max_threads && threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0 &&
        blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
        errors.push_back(std::string(kernel) + ": block of " + std::to_string(nt) +
                         " threads exceeds __launch_bounds__(" + std::to_string(max_threads) +
                         ")");
    }
}

// Puts work on a stream (runtime.cpp): run at once on the legacy stream (nullptr), queued on a
// created one until something waits for it, recorded into the graph while it captures. false
// when the stream's capture was invalidated (the call's error is then in last_error).
bool enqueue(cudaStream_t s, const char *what, std::function<void()> op);
// A kernel's pointer argument must be NULL or point into device or pinned memory: anything else
// is host memory a GPU kernel cannot read (runtime.cpp reports it; pointers inside structures
// passed by value are not seen).
void check_kernel_pointer(const char *kernel, int arg, const void *p);
template <typename T>
inline void check_kernel_arg(const char *kernel, int arg, const T &v) {
    if constexpr (std::is_pointer_v<T>)
        if (v) check_kernel_pointer(kernel, arg, (const void *)v);
}

template <typename F>
struct Launch {
    const char *name;
    const void *key;  // the kernel function (its cudaFuncSetAttribute opt-in)
    F f;
    dim3 g, b;
    size_t smem;
    cudaStream_t stream;
    // Runs the kernel now: what a queued or captured launch does when its turn comes.
    template <typename... A>
    void run(A... a) const {
        const unsigned long long nt = (unsigned long long)b.x * b.y * b.z;
        (void)nt;
        std::string cfg = std::string(name) + " <<<(" + std::to_string(g.x) + "," +
                          std::to_string(g.y) + "," + std::to_string(g.z) + "), (" +
                          std::to_string(b.x) + "," + std::to_string(b.y) + "," +
                          std::to_string(b.z) + ")>>>";
        if (device_dead) return;
        if (simt::injected(simt::FAULT_KERNEL)) {
            device_dead = true;
            return;
        }
        apply_mode(launch_count++);
        F fn = f;
#if EMU_RACECHECK
        race::st.kernel = name;
#endif
        const bool ok = emu::launch(g, b, smem, [&] { fn(a...); });
        launches.push_back({name, g, b, ok});
#if EMU_RACECHECK
        for (std::string &r : race::st.found) errors.push_back(cfg + ": " + r);
        race::st.found.clear();
#endif
        if (!ok) {
            last_error = cudaErrorLaunchFailure;
            errors.push_back(cfg + ": " + ctx.error);
        }
    }
    // The configuration is checked when the launch is made, as a real launch's is; the
    // arguments are copied then (a captured launch keeps the values of its capture).
    template <typename... A>
    void operator()(A... a) {
        const unsigned long long nt = (unsigned long long)b.x * b.y * b.z;
        const auto opt_in = max_dynamic_shared.find(key);
        const size_t smem_max =
            std::max<size_t>(48 * 1024, opt_in == max_dynamic_shared.end() ? 0 : opt_in->second);
        if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 ||
            nt == 0 || nt > 1024 || b.z > 64 || smem > smem_max) {
            last_error = cudaErrorInvalidConfiguration;
            errors.push_back("invalid launch configuration: " + std::string(name) + " <<<(" +
                             std::to_string(g.x) + "," + std::to_string(g.y) + "," +
                             std::to_string(g.z) + "), " + std::to_string(nt) + " threads, " +
                             std::to_string(smem) + " bytes>>>");
            launches.push_back({name, g, b, false});
            return;
        }
        int arg = 0;
        (check_kernel_arg(name, arg++, a), ...);
        if (simt::injected(simt::FAULT_LAUNCH)) {
            last_error = cudaErrorLaunchOutOfResources;
            return;
        }
        const Launch self = *this;
        enqueue(stream, name, [self, a...]() { self.run(a...); });
    }
};
template <typename F>
Launch<F> make_launch(const char *name, const void *key, F f, dim3 g, dim3 b, size_t smem = 0,
                      cudaStream_t s = nullptr) {
    return Launch<F>{name, key, f, g, b, smem, s};
}
}  // namespace emu

inline void nvtxRangePushA(const char *) { emu::nvtx_depth++; }
inline void nvtxRangePop() { emu::nvtx_depth--; }
