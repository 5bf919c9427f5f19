// Bandwidth of the elementwise kernels at Llama-3.1-8B shapes, next to the device-to-device
// copy bandwidth measured in the same run (the ceiling for a kernel that reads and writes).
//
//   bench_elementwise [tokens]     (default 8192 tokens; prints a table, one row per kernel)
//
// Each kernel is timed with CUDA events around each launch, the launches enqueued back to back
// (bench_cuda.cuh), after warm-up, over enough rotated input sets that the working set exceeds
// the L2 cache several times, and the median of the repeats is reported. GB/s counts the bytes
// the kernel must move (stated per row: reads plus writes, 10^9 bytes). Without a GPU it says
// so and exits 0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "activations.h"
#include "bench_cuda.cuh"
#include "embedding.h"
#include "guard.h"
#include "rope.h"
#include "sampling.h"

namespace {

// Llama-3.1-8B.
constexpr int64_t kHidden = 4096;
constexpr int32_t kHeads = 32, kKvHeads = 8, kHeadDim = 128;
constexpr int64_t kFF = 14336;
constexpr int32_t kVocab = 128256;

constexpr int kWarmup = 5;
constexpr int kRepeats = 50;

size_t g_l2_bytes = 0;

// How many copies of a working set of `bytes` to rotate through so that one pass over all of
// them is at least 4x the L2 cache (2..16).
int rotations(size_t bytes) {
    size_t r = (4 * g_l2_bytes + bytes - 1) / std::max<size_t>(bytes, 1);
    return (int)std::min<size_t>(16, std::max<size_t>(2, r));
}

void *dalloc(size_t bytes) {
    void *p = nullptr;
    BENCH_CUDA(cudaMalloc(&p, bytes));
    return p;
}

// Fills a device buffer of bf16 with small random values in [-2, 2).
void fill_bf16(void *d, size_t n, uint32_t seed) {
    bench_fill_bf16(d, (int64_t)n, seed, -2.0f, 2.0f);
}

// Median time in microseconds of launch(rot) over kRepeats launches, rot cycling through the
// rotated sets (bench_median_ms: back to back on the stream, events around each).
double time_us(int n_rot, const std::function<void(int)> &launch, cudaStream_t stream) {
    return 1e3 * bench_median_ms(kWarmup, kRepeats, stream, [&](int i) { launch(i % n_rot); });
}

double g_copy_gbs = 0;

void report(const char *name, const char *shape, double bytes, double us) {
    const double gbs = bytes / (us * 1e-6) / 1e9;
    std::printf("%-38s %-34s %10.1f %9.1f %8.1f%%\n", name, shape, us, gbs,
                g_copy_gbs > 0 ? 100.0 * gbs / g_copy_gbs : 0.0);
}

}  // namespace

int main(int argc, char **argv) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        cudaGetLastError();
        std::printf("bench_elementwise: no CUDA device; nothing measured\n");
        return 0;
    }
    const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 8192;
    if (tokens < 1) {
        std::fprintf(stderr, "usage: bench_elementwise [tokens >= 1]\n");
        return 2;
    }
    cudaDeviceProp prop;
    BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
    g_l2_bytes = (size_t)prop.l2CacheSize;
    cudaStream_t stream;
    BENCH_CUDA(cudaStreamCreate(&stream));
    std::printf(
        "bench_elementwise: %s, L2 %.0f MB, %lld tokens, Llama-3.1-8B shapes, median of %d\n",
        prop.name, g_l2_bytes / 1e6, (long long)tokens, kRepeats);
    std::printf("%-38s %-34s %10s %9s %9s\n", "kernel", "shape", "time_us", "GB/s", "of_copy");
    char shape[64];

    // Device-to-device copy: reads and writes `bytes` each.
    {
        const size_t bytes = (size_t)tokens * kFF * 2;
        const int r = rotations(2 * bytes);
        std::vector<void *> src(r), dst(r);
        for (int i = 0; i < r; i++) {
            src[i] = dalloc(bytes);
            dst[i] = dalloc(bytes);
            BENCH_CUDA(cudaMemset(src[i], 1, bytes));
        }
        const double us = time_us(
            r,
            [&](int i) {
                BENCH_CUDA(
                    cudaMemcpyAsync(dst[i], src[i], bytes, cudaMemcpyDeviceToDevice, stream));
            },
            stream);
        g_copy_gbs = 2.0 * bytes / (us * 1e-6) / 1e9;
        std::snprintf(shape, sizeof shape, "%.0f MB", bytes / 1e6);
        report("cudaMemcpyAsync D2D", shape, 2.0 * bytes, us);
        for (int i = 0; i < r; i++) {
            BENCH_CUDA(cudaFree(src[i]));
            BENCH_CUDA(cudaFree(dst[i]));
        }
    }

    // RoPE on q [tokens, 32, 128] and on k [tokens, 8, 128], in place: read + write the tensor,
    // read the positions (the inv_freq table is 256 bytes and stays cached).
    for (int32_t heads : {kHeads, kKvHeads}) {
        const int64_t n = tokens * heads * kHeadDim;
        const size_t bytes = (size_t)n * 2;
        const int r = rotations(bytes);
        std::vector<void *> x(r);
        for (int i = 0; i < r; i++) {
            x[i] = dalloc(bytes);
            fill_bf16(x[i], (size_t)n, 10 + i);
        }
        std::vector<int32_t> pos(tokens);
        for (int64_t t = 0; t < tokens; t++) pos[t] = (int32_t)(t % 2048);
        std::vector<float> inv(kHeadDim / 2);
        for (int i = 0; i < kHeadDim / 2; i++)
            inv[i] = (float)std::pow(500000.0, -2.0 * i / kHeadDim);
        int32_t *d_pos = (int32_t *)dalloc(tokens * 4);
        float *d_inv = (float *)dalloc(inv.size() * 4);
        BENCH_CUDA(cudaMemcpy(d_pos, pos.data(), tokens * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(d_inv, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
        const double us = time_us(
            r,
            [&](int i) {
                BENCH_SF(sf_cuda_rope_bf16((sf_bf16 *)x[i], d_pos, tokens, heads, kHeadDim,
                                           (int64_t)heads * kHeadDim, d_inv, 1.0f, stream));
            },
            stream);
        std::snprintf(shape, sizeof shape, "[%lld, %d, %d]", (long long)tokens, heads, kHeadDim);
        report(heads == kHeads ? "sf_cuda_rope_bf16 (q)" : "sf_cuda_rope_bf16 (k)", shape,
               2.0 * bytes + 4.0 * tokens, us);
        for (void *p : x) BENCH_CUDA(cudaFree(p));
        BENCH_CUDA(cudaFree(d_pos));
        BENCH_CUDA(cudaFree(d_inv));
    }

    // One layer's attention inputs for the KV cache, from the qkv GEMM's [rows, 48 heads, 128]
    // output: q rotated in place, k rotated and v copied into cache rows (a shuffled set of a
    // 4096-slot cache), as the engine runs it (one sf_cuda_rope_kv_cache_bf16) and as it did
    // before (sf_cuda_rope2_bf16 on q and k, two row scatters). Bytes: q, k, v read, q and the
    // two cache rows written, and positions and kv_rows read. At `tokens` rows (prefill) and at
    // 32 (a decode step of 32 requests, where launches dominate).
    for (int64_t rows : {tokens, (int64_t)32}) {
        const int32_t heads = kHeads + 2 * kKvHeads;
        const int64_t qkv_vals = rows * heads * kHeadDim, kv = (int64_t)kKvHeads * kHeadDim;
        const int64_t cache_rows = std::max<int64_t>(rows, 4096);
        const size_t qkv_bytes = (size_t)qkv_vals * 2, cache_bytes = (size_t)cache_rows * kv * 2;
        const int r = rotations(qkv_bytes + 2 * (size_t)rows * kv * 2);
        std::vector<void *> qkv(r);
        for (int i = 0; i < r; i++) {
            qkv[i] = dalloc(qkv_bytes);
            fill_bf16(qkv[i], (size_t)qkv_vals, 40 + i);
        }
        sf_bf16 *kc = (sf_bf16 *)dalloc(cache_bytes), *vc = (sf_bf16 *)dalloc(cache_bytes);
        std::vector<int32_t> pos(rows), kv_rows(cache_rows);
        for (int64_t t = 0; t < cache_rows; t++) kv_rows[t] = (int32_t)t;
        uint64_t x = 88172645463325252ull;  // xorshift: a fixed shuffle of the cache rows
        for (int64_t t = cache_rows - 1; t > 0; t--) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            std::swap(kv_rows[t], kv_rows[(int64_t)(x % (uint64_t)(t + 1))]);
        }
        for (int64_t t = 0; t < rows; t++) pos[t] = (int32_t)(t % 2048);
        std::vector<float> inv(kHeadDim);  // both tables, the same
        for (int i = 0; i < kHeadDim; i++)
            inv[i] = (float)std::pow(500000.0, -2.0 * (i % (kHeadDim / 2)) / kHeadDim);
        int32_t *d_pos = (int32_t *)dalloc(rows * 4), *d_rows = (int32_t *)dalloc(rows * 4);
        float *d_inv = (float *)dalloc(inv.size() * 4);
        BENCH_CUDA(cudaMemcpy(d_pos, pos.data(), rows * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(d_rows, kv_rows.data(), rows * 4, cudaMemcpyHostToDevice));
        BENCH_CUDA(cudaMemcpy(d_inv, inv.data(), inv.size() * 4, cudaMemcpyHostToDevice));
        const int64_t stride = (int64_t)heads * kHeadDim, q = (int64_t)kHeads * kHeadDim;
        const double bytes = 2.0 * (double)rows * (q + 2 * kv) * 2 + 8.0 * rows;
        std::snprintf(shape, sizeof shape, "[%lld, %d, %d] -> cache", (long long)rows, heads,
                      kHeadDim);
        double us = time_us(
            r,
            [&](int i) {
                BENCH_SF(sf_cuda_rope_kv_cache_bf16((sf_bf16 *)qkv[i], stride, rows, kHeads,
                                                    kKvHeads, kHeadDim, d_pos, nullptr, d_inv,
                                                    1.0f, 1.0f, d_rows, kc, vc, kv, stream));
            },
            stream);
        report("sf_cuda_rope_kv_cache_bf16", shape, bytes, us);
        us = time_us(
            r,
            [&](int i) {
                sf_bf16 *b = (sf_bf16 *)qkv[i];
                BENCH_SF(sf_cuda_rope2_bf16(b, d_pos, nullptr, rows, kHeads + kKvHeads, kHeadDim,
                                            stride, d_inv, 1.0f, 1.0f, stream));
                BENCH_SF(sf_cuda_scatter_rows_bf16(kc, kv, b + q, stride, d_rows, rows, kv,
                                                   stream));
                BENCH_SF(sf_cuda_scatter_rows_bf16(vc, kv, b + q + kv, stride, d_rows, rows, kv,
                                                   stream));
            },
            stream);
        report("  before: rope2 + 2 row scatters", shape, bytes, us);
        for (void *p : qkv) BENCH_CUDA(cudaFree(p));
        for (void *p : {(void *)kc, (void *)vc, (void *)d_pos, (void *)d_rows, (void *)d_inv})
            BENCH_CUDA(cudaFree(p));
    }

    // SwiGLU: gate and up [tokens, 14336] read, out written; the fused form reads one
    // [tokens, 2 * 14336] buffer. Same bytes: 3 * tokens * ff * 2.
    {
        const int64_t n = tokens * kFF;
        const size_t bytes = (size_t)n * 2;
        const int r = rotations(3 * bytes);
        std::vector<void *> gu(r), out(r);
        for (int i = 0; i < r; i++) {
            gu[i] = dalloc(2 * bytes);
            out[i] = dalloc(bytes);
            fill_bf16(gu[i], 2 * (size_t)n, 20 + i);
        }
        std::snprintf(shape, sizeof shape, "[%lld, %lld]", (long long)tokens, (long long)kFF);
        double us = time_us(
            r,
            [&](int i) {
                const sf_bf16 *g = (const sf_bf16 *)gu[i];
                BENCH_SF(sf_cuda_swiglu_bf16((sf_bf16 *)out[i], g, g + n, n, stream));
            },
            stream);
        report("sf_cuda_swiglu_bf16", shape, 3.0 * bytes, us);
        us = time_us(
            r,
            [&](int i) {
                BENCH_SF(sf_cuda_swiglu_fused_bf16((sf_bf16 *)out[i], (const sf_bf16 *)gu[i],
                                                   tokens, kFF, stream));
            },
            stream);
        report("sf_cuda_swiglu_fused_bf16", shape, 3.0 * bytes, us);
        for (int i = 0; i < r; i++) {
            BENCH_CUDA(cudaFree(gu[i]));
            BENCH_CUDA(cudaFree(out[i]));
        }
    }

    // Embedding gather from the [128256, 4096] bf16 table (1 GB, far beyond L2): read
    // tokens rows + the ids, write tokens rows. Then the splice of 256 S' rows per request into
    // the packed buffer (tokens / 512 requests of 512 tokens).
    {
        const size_t table_bytes = (size_t)kVocab * kHidden * 2;
        void *table = dalloc(table_bytes);
        fill_bf16(table, (size_t)kVocab * kHidden, 30);
        const size_t out_bytes = (size_t)tokens * kHidden * 2;
        const int r = rotations(out_bytes);
        std::vector<void *> out(r);
        std::vector<int32_t *> ids(r);
        for (int i = 0; i < r; i++) {
            out[i] = dalloc(out_bytes);
            std::vector<int32_t> h(tokens);
            uint32_t x = 12345u + i;
            for (auto &id : h) id = (int32_t)((x = x * 1664525u + 1013904223u) % kVocab);
            ids[i] = (int32_t *)dalloc(tokens * 4);
            BENCH_CUDA(cudaMemcpy(ids[i], h.data(), tokens * 4, cudaMemcpyHostToDevice));
        }
        std::snprintf(shape, sizeof shape, "%lld x %lld of [%d, %lld]", (long long)tokens,
                      (long long)kHidden, kVocab, (long long)kHidden);
        double us = time_us(
            r,
            [&](int i) {
                BENCH_SF(sf_cuda_embedding_bf16((sf_bf16 *)out[i], (const sf_bf16 *)table, ids[i],
                                                tokens, kHidden, kVocab, nullptr, stream));
            },
            stream);
        report("sf_cuda_embedding_bf16", shape, 2.0 * out_bytes + 4.0 * tokens, us);

        const int64_t requests = std::max<int64_t>(1, tokens / 512);
        const int64_t n_s = std::min<int64_t>(256, tokens);
        const int64_t rows = requests * n_s;
        std::vector<int32_t> h_rows(rows);
        for (int64_t q = 0; q < requests; q++)
            for (int64_t j = 0; j < n_s; j++) h_rows[q * n_s + j] = (int32_t)(q * 512 + 8 + j);
        for (auto &v : h_rows) v = v < tokens ? v : -1;
        int32_t *d_rows = (int32_t *)dalloc(rows * 4);
        BENCH_CUDA(cudaMemcpy(d_rows, h_rows.data(), rows * 4, cudaMemcpyHostToDevice));
        void *src = dalloc((size_t)rows * kHidden * 2);
        fill_bf16(src, (size_t)rows * kHidden, 31);
        std::snprintf(shape, sizeof shape, "%lld rows of %lld", (long long)rows,
                      (long long)kHidden);
        us = time_us(
            r,
            [&](int i) {
                BENCH_SF(sf_cuda_splice_rows_bf16((sf_bf16 *)out[i], (const sf_bf16 *)src, d_rows,
                                                  rows, kHidden, stream));
            },
            stream);
        report("sf_cuda_splice_rows_bf16", shape, 2.0 * rows * kHidden * 2 + 4.0 * rows, us);
        // The same splice into an fp16 buffer (an SF_EMBEDDING_F16 guard): each value rounded.
        us = time_us(
            r,
            [&](int i) {
                BENCH_SF(sf_cuda_scatter_rows_bf16_to_f16((sf_f16 *)out[i], kHidden,
                                                          (const sf_bf16 *)src, kHidden, d_rows,
                                                          rows, kHidden, stream));
            },
            stream);
        report("sf_cuda_scatter_rows_bf16_to_f16", shape, 2.0 * rows * kHidden * 2 + 4.0 * rows,
               us);
        for (int i = 0; i < r; i++) {
            BENCH_CUDA(cudaFree(out[i]));
            BENCH_CUDA(cudaFree(ids[i]));
        }
        BENCH_CUDA(cudaFree(table));
        BENCH_CUDA(cudaFree(src));
        BENCH_CUDA(cudaFree(d_rows));
    }

    // Sampling over 32 rows of 128256 fp32 logits (a decode step of 32 requests): argmax, top-k
    // 50 with top-p 0.9, top-p alone and plain sampling: on these logits, uniform in [-10, 10],
    // the nucleus is large (the ~11% of tokens above ~7.7, all sorted); on "peaked" ones, closer
    // to a language model's (normal with sigma 2, and a few tokens 12-18 above the bulk), it is
    // a handful.
    // top-p alone and plain sampling are timed split over chunks (the engine's way) and in one
    // block a row (the workspace handed over 4 bytes off the 8-byte alignment the split needs).
    // Bytes: the logits once; the sampler re-reads them, so its GB/s says how far it is from one
    // pass.
    {
        const int64_t rows = 32;
        const size_t n = (size_t)rows * kVocab;
        std::vector<float> h(n);
        uint32_t x = 777;
        for (float &f : h)
            f = ((float)((x = x * 1664525u + 1013904223u) >> 8) / 16777216.0f) * 20.0f - 10.0f;
        float *logits = (float *)dalloc(n * 4);
        BENCH_CUDA(cudaMemcpy(logits, h.data(), n * 4, cudaMemcpyHostToDevice));
        std::vector<double> hu(rows, 0.37);
        double *u = (double *)dalloc(rows * 8);
        BENCH_CUDA(cudaMemcpy(u, hu.data(), rows * 8, cudaMemcpyHostToDevice));
        int32_t *out = (int32_t *)dalloc(rows * 4);
        const size_t ws_bytes = sf_cuda_sample_workspace_bytes(rows, kVocab);
        void *ws = dalloc(ws_bytes + 8);  // + 8: the 1 block/row rows shift it by 4
        std::snprintf(shape, sizeof shape, "[%lld, %d] fp32", (long long)rows, kVocab);
        // split over blocks of 8192 logits (the engine's way: it passes the sampler's
        // workspace), and one block a row (no workspace), which leaves most SMs idle at 32 rows
        double us = time_us(
            1,
            [&](int) {
                BENCH_SF(sf_cuda_argmax_f32(out, logits, rows, kVocab, ws, ws_bytes, stream));
            },
            stream);
        report("sf_cuda_argmax_f32 split", shape, 4.0 * n, us);
        us = time_us(
            1,
            [&](int) {
                BENCH_SF(sf_cuda_argmax_f32(out, logits, rows, kVocab, nullptr, 0, stream));
            },
            stream);
        report("sf_cuda_argmax_f32 1 block/row", shape, 4.0 * n, us);
        // One sampler row; split: the workspace at its start (the engine's way), else 4 bytes
        // on, which is valid but not the 8-byte alignment the split top-p / plain path needs,
        // so one block takes each row.
        auto time_sample = [&](const char *name, const sf_sampling &sampling, bool split) {
            void *w = split ? ws : (char *)ws + 4;
            const double t = time_us(
                1,
                [&](int) {
                    BENCH_SF(sf_cuda_sample_f32(out, logits, u, rows, kVocab, &sampling, w,
                                                ws_bytes, stream));
                },
                stream);
            report(name, shape, 4.0 * n, t);
        };
        time_sample("sf_cuda_sample_f32 k50 p0.9", {0.8f, 50, 0.9f, 0}, true);
        const sf_sampling topp = {1.0f, 0, 0.9f, 0};
        time_sample("sf_cuda_sample_f32 p0.9", topp, true);
        time_sample("sf_cuda_sample_f32 p0.9 1 block/row", topp, false);
        // plain sampling (no top-k, no top-p): the prefix that holds the draw, split; one block
        // a row sorts the whole row
        const sf_sampling plain = {1.0f, 0, 1.0f, 0};
        time_sample("sf_cuda_sample_f32 plain", plain, true);
        time_sample("sf_cuda_sample_f32 plain 1 block/row", plain, false);
        // peaked logits: an approximate normal (the sum of 4 uniforms) and 8 high tokens a row
        for (size_t i = 0; i < n; i++) {
            float sum = 0.0f;
            for (int j = 0; j < 4; j++)
                sum += (float)((x = x * 1664525u + 1013904223u) >> 8) / 16777216.0f - 0.5f;
            h[i] = sum * 3.46f;  // 4 uniforms on [-1/2, 1/2]: variance 1/3, so sigma 2
        }
        for (int64_t r = 0; r < rows; r++)
            for (int j = 0; j < 8; j++)
                h[(size_t)(r * kVocab + (r * 977 + j * 15013) % kVocab)] = 12.0f + 0.75f * j;
        BENCH_CUDA(cudaMemcpy(logits, h.data(), n * 4, cudaMemcpyHostToDevice));
        const sf_sampling peaked = {0.7f, 0, 0.9f, 0};
        time_sample("sf_cuda_sample_f32 p0.9 peaked", peaked, true);
        time_sample("sf_cuda_sample_f32 p0.9 peaked 1 block/row", peaked, false);
        BENCH_CUDA(cudaFree(logits));
        BENCH_CUDA(cudaFree(u));
        BENCH_CUDA(cudaFree(out));
        BENCH_CUDA(cudaFree(ws));
    }

    BENCH_CUDA(cudaStreamDestroy(stream));
    return 0;
}
