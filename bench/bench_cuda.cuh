// What the CUDA kernel benchmarks (bench/bench_*.cu) share: checks that end the benchmark with a
// message, a deterministic bf16 fill on the device, and the event timer. Header-only: each
// benchmark is one translation unit (bench_attention also links its cuDNN peer).
#ifndef SF_BENCH_CUDA_CUH
#define SF_BENCH_CUDA_CUH

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <vector>

#include <cuda_runtime.h>

#include "sysformer.h"

// A failed CUDA call ends the benchmark with its place and message.
#define BENCH_CUDA(call)                                                                      \
    do {                                                                                      \
        cudaError_t e_ = (call);                                                              \
        if (e_ != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                     \
                    cudaGetErrorString(e_));                                                  \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// The same for a library call.
#define BENCH_SF(call)                                                                        \
    do {                                                                                      \
        sf_status s_ = (call);                                                                \
        if (s_ != SF_OK) {                                                                    \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, sf_last_error());   \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// Deterministic bf16 noise in [lo, hi), from a hash of the index (rounded to nearest even):
// ordinary values, never zeros or NaNs.
__global__ void bench_fill_bf16_kernel(uint16_t *p, int64_t n, uint32_t seed, float lo,
                                       float hi) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        const float f = lo + (hi - lo) * ((float)(h >> 8) / 16777216.0f);
        const uint32_t u = __float_as_uint(f);
        p[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}

inline void bench_fill_bf16(void *p, int64_t n, uint32_t seed, float lo, float hi) {
    bench_fill_bf16_kernel<<<1024, 256>>>(static_cast<uint16_t *>(p), n, seed, lo, hi);
    BENCH_CUDA(cudaGetLastError());
}

// Keeps one SM busy for `cycles` clock cycles.
__global__ void bench_spin_kernel(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}

// Queues about `ms` milliseconds of waiting on stream (at the SM's peak clock; slower clocks
// wait longer).
inline void bench_spin(cudaStream_t stream, double ms) {
    int dev = 0, khz = 0;
    BENCH_CUDA(cudaGetDevice(&dev));
    BENCH_CUDA(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev));
    bench_spin_kernel<<<1, 1, 0, stream>>>((long long)(ms * khz));
    BENCH_CUDA(cudaGetLastError());
}

// The median, in milliseconds, of enqueue(i) for i = warmup .. warmup + reps - 1, after warm-up
// calls with i = 0 .. warmup - 1 (i counts up so that callers can rotate buffer sets). Each
// timed call sits between two events on `stream`, and every call is enqueued before any event
// is read, behind a 20 ms spin kernel: the host has queued them all before the GPU reaches the
// first, so the GPU runs them back to back and an interval holds the call's GPU time, never
// the host's launch latency or a library's host-side work (which would otherwise count
// whenever the GPU outran the host: a few-microsecond decode, a cuDNN execute).
// enqueue must only enqueue work on `stream` (no synchronisation), and reps calls must take
// the host well under 20 ms.
template <typename Enqueue>
double bench_median_ms(int warmup, int reps, cudaStream_t stream, Enqueue &&enqueue) {
    for (int i = 0; i < warmup; i++) enqueue(i);
    std::vector<cudaEvent_t> start(reps), stop(reps);
    for (int i = 0; i < reps; i++) {
        BENCH_CUDA(cudaEventCreate(&start[i]));
        BENCH_CUDA(cudaEventCreate(&stop[i]));
    }
    bench_spin(stream, 20.0);
    for (int i = 0; i < reps; i++) {
        BENCH_CUDA(cudaEventRecord(start[i], stream));
        enqueue(warmup + i);
        BENCH_CUDA(cudaEventRecord(stop[i], stream));
    }
    BENCH_CUDA(cudaStreamSynchronize(stream));
    std::vector<double> ms(reps);
    for (int i = 0; i < reps; i++) {
        float t = 0.0f;
        BENCH_CUDA(cudaEventElapsedTime(&t, start[i], stop[i]));
        ms[i] = t;
        BENCH_CUDA(cudaEventDestroy(start[i]));
        BENCH_CUDA(cudaEventDestroy(stop[i]));
    }
    std::sort(ms.begin(), ms.end());
    return reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
}

#endif
