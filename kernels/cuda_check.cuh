// Internal: turning CUDA errors into library statuses, and the helpers every launcher uses.
#pragma once

#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include "core/error.h"

// Checks a CUDA runtime call; on failure records where it happened and returns SF_ERR_CUDA.
#define SF_CUDA_TRY(call)                                                                     \
    do {                                                                                      \
        cudaError_t sf_err_ = (call);                                                         \
        if (sf_err_ != cudaSuccess) {                                                         \
            return sf_fail(SF_ERR_CUDA, "%s:%d: %s: %s", __FILE__, __LINE__, #call,          \
                           cudaGetErrorString(sf_err_));                                      \
        }                                                                                     \
    } while (0)

// Blocks of b covering a items (a >= 0, b > 0), in 64 bits: every launcher's grid arithmetic.
constexpr int64_t sf_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An NVTX range open for the launcher's scope, so Nsight timelines name every stage.
struct sf_nvtx_range {
    explicit sf_nvtx_range(const char *name) { nvtxRangePushA(name); }
    ~sf_nvtx_range() { nvtxRangePop(); }
    sf_nvtx_range(const sf_nvtx_range &) = delete;
    sf_nvtx_range &operator=(const sf_nvtx_range &) = delete;
};
