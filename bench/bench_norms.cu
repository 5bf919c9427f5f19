// RMSNorm and LayerNorm (kernels/rmsnorm.cu, kernels/layernorm.cu) against the device-to-device
// copy bandwidth measured in the same run (DESIGN.md §9: >= 90% of it at d = 4096, >= 16K rows).
//
//   bench_norms [--rows 16384] [--dim 4096] [--reps 25]
//
// Bytes counted per call, E = rows * dim bf16 values (2 bytes each):
//   plain:        read x, write out                          = 4E + weights
//   +residual:    read x and residual, write residual_out    = 8E + weights
//                 and out
//   weights:      w (2 dim bytes), and b for LayerNorm (2 dim more): read once from HBM, then
//                 served by L2 to every row, so counted once.
// The copy reference is cudaMemcpyAsync device to device of 2E and of 4E bytes (moving 4E and
// 8E: the same traffic as the two cases); the better of the two is the 100% line. Every call
// reads and writes a different buffer set, rotated over enough sets to cover 4x the L2, so
// that no input is still in L2 from an earlier call. Median of --reps timed calls (CUDA events
// around each) after 3 warm-up calls. Correctness is tests/test_cuda_norms.cpp's job.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "bench_cuda.cuh"
#include "norms.h"

namespace {

// One set of activations: in = [x | residual], out = [out | residual_out], each 2E values, so a
// copy of in to out is the copy reference too.
struct Set {
    uint16_t *in = nullptr, *out = nullptr;
};

constexpr int kWarmup = 3;

double gbps(double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; }

}  // namespace

int main(int argc, char **argv) {
    int64_t rows = 16384, dim = 4096;
    int reps = 25;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rows") && i + 1 < argc) {
            rows = atoll(argv[++i]);
        } else if (!strcmp(argv[i], "--dim") && i + 1 < argc) {
            dim = atoll(argv[++i]);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--rows N] [--dim D] [--reps R]\n", argv[0]);
            return 2;
        }
    }
    if (rows < 1 || dim < 1 || dim > SF_CUDA_NORM_MAX_DIM || reps < 1) {
        fprintf(stderr, "bench_norms: need rows >= 1, 1 <= dim <= %d, reps >= 1\n",
                SF_CUDA_NORM_MAX_DIM);
        return 2;
    }

    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        cudaGetLastError();
        printf("bench_norms: no CUDA device, nothing measured\n");
        return 0;
    }
    cudaDeviceProp prop;
    BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));

    const int64_t e = rows * dim;
    const size_t set_bytes = (size_t)e * 2 * 2 * 2;  // in and out, two arrays each
    const int n_sets =
        std::max<int>(2, (int)((4 * (size_t)prop.l2CacheSize + set_bytes - 1) / set_bytes));
    printf("bench_norms: %s, L2 %d MiB; rows %lld x dim %lld bf16, %d buffer sets rotated, "
           "median of %d\n",
           prop.name, prop.l2CacheSize >> 20, (long long)rows, (long long)dim, n_sets, reps);

    std::vector<Set> sets(n_sets);
    for (int s = 0; s < n_sets; s++) {
        BENCH_CUDA(cudaMalloc(&sets[s].in, (size_t)e * 2 * 2));
        BENCH_CUDA(cudaMalloc(&sets[s].out, (size_t)e * 2 * 2));
        bench_fill_bf16(sets[s].in, 2 * e, 0x9e3779b9u * (s + 1), -2.0f, 2.0f);
        BENCH_CUDA(cudaMemset(sets[s].out, 0, (size_t)e * 2 * 2));
    }
    uint16_t *w = nullptr, *b = nullptr;
    BENCH_CUDA(cudaMalloc(&w, dim * 2));
    BENCH_CUDA(cudaMalloc(&b, dim * 2));
    bench_fill_bf16(w, dim, 17, -2.0f, 2.0f);
    bench_fill_bf16(b, dim, 23, -2.0f, 2.0f);
    BENCH_CUDA(cudaDeviceSynchronize());

    // The reference: device-to-device copies of 2E and 4E bytes.
    double copy_best = 0.0;
    for (int64_t copy_bytes : {2 * e, 4 * e}) {
        const double ms = bench_median_ms(kWarmup, reps, 0, [&](int i) {
            const Set &s = sets[i % n_sets];
            BENCH_CUDA(cudaMemcpyAsync(s.out, s.in, copy_bytes, cudaMemcpyDeviceToDevice, 0));
        });
        const double bw = gbps(2.0 * copy_bytes, ms);
        copy_best = std::max(copy_best, bw);
        printf("  cudaMemcpyAsync D2D %7.1f MiB: %8.1f us  %7.1f GB/s (read + write)\n",
               copy_bytes / 1048576.0, ms * 1e3, bw);
    }

    printf("\n  %-10s %-9s %-12s %10s %9s %8s\n", "kernel", "residual", "threads/row", "median us",
           "GB/s", "of copy");
    bool all_ok = true;
    for (int layer = 0; layer < 2; layer++) {
        for (int residual = 0; residual < 2; residual++) {
            for (int tpr : {0, 32, 64, 128, 256, 512, 1024}) {
                auto call = [&](int i) {
                    const Set &s = sets[i % n_sets];
                    uint16_t *x = s.in, *r = residual ? s.in + e : nullptr;
                    uint16_t *out = s.out, *r_out = residual ? s.out + e : nullptr;
                    return layer ? sf_cuda_layernorm_bf16_variant(out, r_out, x, r, w, b, rows,
                                                                  dim, 1e-5f, tpr, 0)
                                 : sf_cuda_rmsnorm_bf16_variant(out, r_out, x, r, w, rows, dim,
                                                                1e-6f, tpr, 0);
                };
                // A variant that cannot hold this dim says so before any launch: skip it.
                if (call(0) != SF_OK) {
                    if (tpr == 0) {
                        fprintf(stderr, "bench_norms: %s\n", sf_last_error());
                        all_ok = false;
                    }
                    continue;
                }
                const double ms = bench_median_ms(kWarmup, reps, 0, [&](int i) {
                    if (call(i) != SF_OK) {
                        fprintf(stderr, "bench_norms: %s\n", sf_last_error());
                        exit(1);
                    }
                });
                const double bytes =
                    (residual ? 8.0 : 4.0) * (double)e + (layer ? 4.0 : 2.0) * (double)dim;
                const double bw = gbps(bytes, ms);
                char tpr_name[16];
                snprintf(tpr_name, sizeof tpr_name, tpr ? "%d" : "auto", tpr);
                printf("  %-10s %-9s %-12s %10.1f %9.1f %7.1f%%\n",
                       layer ? "layernorm" : "rmsnorm", residual ? "fused" : "none", tpr_name,
                       ms * 1e3, bw, 100.0 * bw / copy_best);
            }
        }
    }
    printf("\n  (auto = the launchers' own choice; the goal is auto >= 90%% of copy)\n");

    for (Set &s : sets) {
        cudaFree(s.in);
        cudaFree(s.out);
    }
    cudaFree(w);
    cudaFree(b);
    return all_ok ? 0 : 1;
}
