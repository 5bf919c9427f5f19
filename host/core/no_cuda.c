/* The CUDA entry points of a build without CUDA: they say so instead of failing to link. */
#include "sysformer.h"

bool sf_cuda_built(void) { return false; }

sf_status sf_cuda_device_count(int *count) {
    if (count) *count = 0;
    return SF_OK;
}
