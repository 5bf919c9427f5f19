// Device-side uniform fills for benchmark weights: an 8B-parameter model drawn on the host and
// copied over would take minutes; here it takes milliseconds.
#include "bf16_vec.cuh"
#include "cuda_check.cuh"
#include "random.h"

namespace {

// splitmix64 of (seed, index): independent of the launch configuration.
__device__ __forceinline__ uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Fmt: sf_vec::Bf16 or sf_vec::F16.
template <class Fmt>
__global__ void fill_uniform_kernel(uint16_t *__restrict__ x, int64_t n, uint64_t seed, float lo,
                                    float span) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const uint64_t h = mix(seed + 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1));
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 bits: [0, 1)
        x[i] = Fmt::from_f32(lo + span * u);
    }
}

}  // namespace

template <class Fmt>
static sf_status fill_uniform(const char *fn, uint16_t *x, int64_t n, uint64_t seed, float lo,
                              float hi, cudaStream_t stream) {
    if (n < 0 || (n > 0 && !x) || !(hi >= lo)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "%s: n = %lld, range [%g, %g)", fn, (long long)n,
                       (double)lo, (double)hi);
    }
    if (n == 0) return SF_OK;
    sf_nvtx_range range(fn);
    const int64_t blocks = n / 256 + 1 < 4096 ? n / 256 + 1 : 4096;
    fill_uniform_kernel<Fmt><<<(unsigned)blocks, 256, 0, stream>>>(x, n, seed, lo, hi - lo);
    SF_CUDA_TRY(cudaGetLastError());
    return SF_OK;
}

extern "C" sf_status sf_cuda_fill_uniform_bf16(sf_bf16 *x, int64_t n, uint64_t seed, float lo,
                                               float hi, cudaStream_t stream) {
    return fill_uniform<sf_vec::Bf16>("sf_cuda_fill_uniform_bf16", x, n, seed, lo, hi, stream);
}

extern "C" sf_status sf_cuda_fill_uniform_f16(sf_f16 *x, int64_t n, uint64_t seed, float lo,
                                              float hi, cudaStream_t stream) {
    return fill_uniform<sf_vec::F16>("sf_cuda_fill_uniform_f16", x, n, seed, lo, hi, stream);
}
