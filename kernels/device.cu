// Device discovery, and NVTX ranges for the C host code.
#include "cuda_check.cuh"
#include "kernels.h"

extern "C" bool sf_cuda_built(void) { return true; }

extern "C" sf_status sf_cuda_device_count(int *count) {
    if (!count) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_cuda_device_count: NULL count");
    *count = 0;
    cudaError_t err = cudaGetDeviceCount(count);
    // No GPU or no driver is an answer (zero devices), not a failure.
    if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
        cudaGetLastError();
        *count = 0;
        return SF_OK;
    }
    if (err != cudaSuccess) {
        *count = 0;
        return sf_fail(SF_ERR_CUDA, "cudaGetDeviceCount: %s", cudaGetErrorString(err));
    }
    return SF_OK;
}

extern "C" void sf_nvtx_push(const char *name) { nvtxRangePushA(name); }

extern "C" void sf_nvtx_pop(void) { nvtxRangePop(); }
