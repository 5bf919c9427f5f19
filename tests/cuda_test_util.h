// Helpers for the CUDA tests: host-side bfloat16 and fp16 rounding, device buffers, and the skip
// when no GPU is present. Every CUDA test compares a kernel with its CPU twin in host/cpu/.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "sysformer.h"

#define SF_SKIP_WITHOUT_GPU()                                                                  \
    do {                                                                                       \
        int sf_count_ = 0;                                                                     \
        if (sf_cuda_device_count(&sf_count_) != SF_OK || sf_count_ == 0)                       \
            GTEST_SKIP() << "no CUDA device";                                                  \
    } while (0)

// fp32 -> bf16 bits with round-to-nearest-even (NaN kept quiet), and back.
inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline std::vector<uint16_t> to_bf16(const std::vector<float> &v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = to_bf16(v[i]);
    return out;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t> &v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = from_bf16(v[i]);
    return out;
}
// Rounds every value to bf16 and back: the inputs the GPU sees, for the CPU twin.
inline std::vector<float> bf16_round(const std::vector<float> &v) { return from_bf16(to_bf16(v)); }

// IEEE binary16 bits -> fp32, from the format's definition: (-1)^s 2^(e-15) (1 + f/1024), or
// f 2^-24 when e = 0; e = 31 is inf or NaN.
inline float from_f16(uint16_t h) {
    const int e = (h >> 10) & 31, f = h & 1023;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (e == 31) return f ? std::nanf("") : sign * INFINITY;
    return sign * (e ? std::ldexp(1.0f + f / 1024.0f, e - 15) : std::ldexp((float)f, -24));
}

// fp32 -> fp16 bits, round to nearest, ties to even, by search instead of bit arithmetic (an
// oracle independent of the kernels' and the emulator's conversions): the finite non-negative
// patterns 0x0000..0x7bff increase with their value, so the nearest one to |x| is found by
// bisection, compared in double. |x| >= 65520 (halfway from 65504 to the next power 65536, a
// tie whose even side is the infinity) gives inf; NaN gives the quiet NaN 0x7e00.
inline uint16_t to_f16(float x) {
    if (std::isnan(x)) return 0x7e00;
    const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double a = std::fabs((double)x);
    if (a >= 65520.0) return sign | 0x7c00;
    unsigned lo = 0, hi = 0x7bff;  // the largest pattern whose value is <= a, by bisection
    while (lo < hi) {
        const unsigned mid = (lo + hi + 1) / 2;
        if ((double)from_f16((uint16_t)mid) <= a) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if (lo == 0x7bff) return sign | 0x7bff;  // a in [65504, 65520)
    const double below = a - from_f16((uint16_t)lo), above = from_f16((uint16_t)(lo + 1)) - a;
    const bool up = above < below || (above == below && (lo & 1));
    return sign | (uint16_t)(up ? lo + 1 : lo);
}
inline std::vector<uint16_t> to_f16(const std::vector<float> &v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = to_f16(v[i]);
    return out;
}

// A device buffer freed on scope exit; poisoned with 0xFF bytes (NaN) so unwritten outputs show.
template <typename T>
class DeviceBuffer {
  public:
    explicit DeviceBuffer(size_t n) : n_(n) {
        if (cudaMalloc(&p_, n * sizeof(T) + 1) != cudaSuccess) p_ = nullptr;
        if (p_) cudaMemset(p_, 0xff, n * sizeof(T));
    }
    explicit DeviceBuffer(const std::vector<T> &host) : DeviceBuffer(host.size()) {
        if (p_) cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
    ~DeviceBuffer() { cudaFree(p_); }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    T *get() const { return p_; }
    std::vector<T> host() const {
        std::vector<T> v(n_);
        cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
        return v;
    }

  private:
    T *p_ = nullptr;
    size_t n_;
};

// ||a - b|| / ||b||, NaN-aware (a NaN anywhere gives +inf so it never passes).
inline double rel_err(const std::vector<float> &a, const std::vector<float> &b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i])) return INFINITY;
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}
