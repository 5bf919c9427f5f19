// tools/simt: cudaGetDeviceProperties for programs built against the real cuda_runtime.h
// (bench_engine prints the device it measures), compiled like the cuBLASLt stand-in against
// the real header, whose cudaDeviceProp layout the caller uses: one device, compute capability
// 9.0 (as cudaDeviceGetAttribute says), EMU_DEVICE_GIB of memory, one "SM". Nothing reads
// more than these fields.
#include <cuda_runtime.h>
#include <string.h>

#include "simt_api.h"

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
    if (!prop || device != 0) return cudaErrorInvalidDevice;
    memset(prop, 0, sizeof *prop);
    strncpy(prop->name, "tools/simt emulator", sizeof prop->name - 1);
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = 1;
    prop->totalGlobalMem = simt::device_memory_bytes();
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}
