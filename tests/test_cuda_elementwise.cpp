// The elementwise CUDA kernels against their CPU twins: fp32 <-> bf16 and fp32 -> fp16
// conversion, the bf16 and fp16 embedding gathers, the splice and the row moves between the two
// formats, RoPE, SwiGLU / GELU / ReLU / bias add, argmax and top-k / top-p
// sampling. GPU tests skip without a device (bench/device_check.sh runs them on a lent GPU);
// the argument tests and the sampling-margin test run everywhere and never touch CUDA.
//
// Tolerances. Every bound is derived next to its test, per element, from these facts:
// - bf16 has 8 significant bits, so rounding to nearest moves a value y by at most half an ulp:
//   |bf16(y) - y| <= 2^-8 |y| (the worst case, just above a power of two; 2^-9 |y| just below
//   the next one, and about 2^-9.3 in RMS over random data) plus, in the subnormal range, an
//   absolute 2^-134 (half the bf16 subnormal spacing 2^-133).
// - fp32 unit roundoff u = 2^-24; CUDA's expf, sinf/cosf (sincosf) are within 2 ulp, erfcf
//   within 4 ulp (CUDA C Programming Guide, "Mathematical functions"), one ulp being at most 2u
//   relative. The CPU twins compute in double and round to fp32 once: error u |ref|.
// - Gathers, splices, conversions, ReLU, bias add and argmax are exact (bits compared); the
//   fp16 ones against to_f16 of tests/cuda_test_util.h, a rounding found by search.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "activations.h"
#include "convert.h"
#include "core/rng.h"
#include "cpu/ops.h"
#include "cuda_test_util.h"
#include "embedding.h"
#include "guard.h"
#include "rope.h"
#include "sampling.h"
#include "test_util.h"

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

constexpr double kU32 = 0x1p-24;         // fp32 unit roundoff
constexpr double kBf16Round = 0x1p-8;    // bf16 rounding, relative (worst case)
constexpr double kBf16Floor = 0x1p-133;  // covers bf16 subnormal rounding and fp32 underflow

uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Host <-> device helpers that fail the test (not crash) when CUDA does.
template <typename T>
std::vector<T> download(const T *d, size_t n) {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
}
template <typename T>
void upload(T *d, const std::vector<T> &v) {
    EXPECT_EQ(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
}
#define SF_EXPECT_SYNC() ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess)

std::vector<float> scaled_normal(Rng &rng, size_t n, float sigma) {
    std::vector<float> v = rng.normal_vec(n);
    for (float &x : v) x *= sigma;
    return v;
}

// =============================================================================================
// Argument validation: runs everywhere, returns before any CUDA call.
// =============================================================================================

TEST(CudaElementwiseArgs, RejectBadShapesWithoutTouchingCuda) {
    sf_bf16 *p = reinterpret_cast<sf_bf16 *>(uintptr_t{256});  // never dereferenced
    const int32_t *ids = reinterpret_cast<const int32_t *>(uintptr_t{256});
    const float *f = reinterpret_cast<const float *>(uintptr_t{256});
    float *fo = reinterpret_cast<float *>(uintptr_t{256});
    int32_t *io = reinterpret_cast<int32_t *>(uintptr_t{256});

    EXPECT_EQ(sf_cuda_f32_to_bf16(p, f, -1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_f32_to_bf16(nullptr, f, 5, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bf16_to_f32(fo, p, -1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bf16_to_f32(fo, nullptr, 5, 0), SF_ERR_INVALID_ARGUMENT);

    EXPECT_EQ(sf_cuda_embedding_bf16(p, p, ids, -1, 8, 10, nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_bf16(p, p, ids, 4, -8, 10, nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_bf16(p, p, ids, (int64_t)1 << 31, 8, 10, nullptr, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_bf16(p, nullptr, ids, 4, 8, 10, nullptr, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_splice_rows_bf16(p, p, ids, -1, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_splice_rows_bf16(p, p, nullptr, 3, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_f32_to_f16(p, f, -1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_f32_to_f16(p, nullptr, 5, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_f16(p, p, ids, -1, 8, 10, nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_f16(p, p, nullptr, 4, 8, 10, nullptr, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_gather_rows_f16_to_bf16(p, 8, p, 7, ids, 4, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_gather_rows_f16_to_bf16(p, 8, p, 8, ids, -1, 8, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_scatter_rows_bf16_to_f16(p, 7, p, 8, ids, 4, 8, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_scatter_rows_bf16_to_f16(nullptr, 8, p, 8, ids, 4, 8, 0),
              SF_ERR_INVALID_ARGUMENT);

    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, -1, 8, 64, 512, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, 8, 63, 504, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, 8, 0, 0, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, 1, 514, 514, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, 8, 64, 511, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, -1, 64, 64, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, 8, 64, 512, nullptr, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);

    // A pointer off its element's alignment (a corrupt offset: on a GPU, a misaligned-address
    // fault that breaks the context) is refused before any CUDA call.
    sf_bf16 *odd = reinterpret_cast<sf_bf16 *>(uintptr_t{257});
    const int32_t *odd_ids = reinterpret_cast<const int32_t *>(uintptr_t{258});
    float *odd_f = reinterpret_cast<float *>(uintptr_t{258});
    EXPECT_EQ(sf_cuda_rope_bf16(odd, ids, 4, 8, 64, 512, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, odd_ids, 4, 8, 64, 512, f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_rope_bf16(p, ids, 4, 8, 64, 512, odd_f, 1.0f, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_bf16(odd, p, ids, 4, 8, 10, nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_f16(p, p, odd_ids, 4, 8, 10, nullptr, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_f32(odd_f, f, ids, 4, 8, 10, nullptr, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_embedding_f32(fo, f, nullptr, 4, 8, 10, nullptr, 0),
              SF_ERR_INVALID_ARGUMENT);  // NULL ids
    EXPECT_EQ(sf_cuda_splice_rows_bf16(p, odd, ids, 3, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_gather_rows_f16_to_bf16(p, 8, p, 8, odd_ids, 4, 8, 0),
              SF_ERR_INVALID_ARGUMENT);

    EXPECT_EQ(sf_cuda_swiglu_bf16(p, p, p, -1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_bf16(p, nullptr, p, 3, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_bf16(p, p, -1, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_bf16(p, p, 2, -8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_bf16(p, p, INT64_MAX / 4, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_swiglu_fused_bf16(nullptr, p, 2, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_gelu_bf16(p, p, -1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_gelu_bf16(p, nullptr, 3, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_relu_bf16(p, p, -1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_relu_bf16(nullptr, p, 3, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_add_bf16(p, p, -1, 8, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_bias_add_bf16(p, nullptr, 2, 8, 0), SF_ERR_INVALID_ARGUMENT);

    EXPECT_EQ(sf_cuda_argmax_f32(io, f, -1, 10, nullptr, 0, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_argmax_f32(io, f, 2, 0, nullptr, 0, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_argmax_f32(nullptr, f, 2, 10, nullptr, 0, 0), SF_ERR_INVALID_ARGUMENT);
    // the split argmax: 8 bytes per row per started 8192 logits; none when a row is one block
    EXPECT_EQ(sf_cuda_argmax_workspace_bytes(3, 8192), (size_t)0);
    EXPECT_EQ(sf_cuda_argmax_workspace_bytes(3, 8193), (size_t)(3 * 2 * 8));
    EXPECT_EQ(sf_cuda_argmax_workspace_bytes(-1, 9000), (size_t)0);
    EXPECT_EQ(sf_cuda_argmax_workspace_bytes(INT64_MAX, 1 << 30), (size_t)0);
    void *ws8 = reinterpret_cast<void *>(uintptr_t{256});
    const size_t argmax_need = sf_cuda_argmax_workspace_bytes(2, 20000);
    EXPECT_EQ(sf_cuda_argmax_f32(io, f, 2, 20000, ws8, argmax_need - 1, 0),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_argmax_f32(io, f, 2, 20000, reinterpret_cast<void *>(uintptr_t{260}),
                                 argmax_need, 0),
              SF_ERR_INVALID_ARGUMENT);

    const double *u = reinterpret_cast<const double *>(uintptr_t{256});
    void *ws = reinterpret_cast<void *>(uintptr_t{256});
    const size_t need = sf_cuda_sample_workspace_bytes(2, 10);
    EXPECT_EQ(need, (size_t)16 * 2 * 10);
    EXPECT_EQ(sf_cuda_sample_workspace_bytes(-1, 10), (size_t)0);
    EXPECT_EQ(sf_cuda_sample_workspace_bytes(3, 0), (size_t)0);  // no division by zero
    // rows over 8192 logits also hold the split top-p's state: more than the key buffers
    EXPECT_GT(sf_cuda_sample_workspace_bytes(2, 8193), (size_t)(2 * 16 * 8193));
    EXPECT_EQ(sf_cuda_sample_workspace_bytes(2, 8192), (size_t)(2 * 16 * 8192));
    EXPECT_EQ(sf_cuda_sample_workspace_bytes(INT64_MAX, 1 << 30), (size_t)0);
    sf_sampling s = {1.0f, 0, 1.0f, 0, false, 0};
    EXPECT_EQ(sf_cuda_sample_f32(io, f, u, 2, 10, nullptr, ws, need, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_sample_f32(io, f, u, 2, 0, &s, ws, need, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_sample_f32(io, f, u, 2, 10, &s, ws, need - 1, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_sample_f32(io, f, nullptr, 2, 10, &s, ws, need, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_sample_f32(io, f, u, 2, 10, &s, nullptr, need, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(
        sf_cuda_sample_f32(io, f, u, 2, 10, &s, reinterpret_cast<void *>(uintptr_t{258}), need, 0),
        SF_ERR_INVALID_ARGUMENT);
    s.temperature = INFINITY;  // every logit / inf is 0: refused, as sf_sample refuses it
    EXPECT_EQ(sf_cuda_sample_f32(io, f, u, 2, 10, &s, ws, need, 0), SF_ERR_INVALID_ARGUMENT);
}

// Empty work is success and launches nothing, so it also needs no device.
TEST(CudaElementwiseArgs, EmptyWorkSucceedsWithoutTouchingCuda) {
    EXPECT_EQ(sf_cuda_f32_to_bf16(nullptr, nullptr, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_f32_to_f16(nullptr, nullptr, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_embedding_f16(nullptr, nullptr, nullptr, 0, 8, 10, nullptr, 0), SF_OK);
    EXPECT_EQ(sf_cuda_gather_rows_f16_to_bf16(nullptr, 8, nullptr, 8, nullptr, 0, 8, 0), SF_OK);
    EXPECT_EQ(sf_cuda_scatter_rows_bf16_to_f16(nullptr, 8, nullptr, 8, nullptr, 0, 8, 0), SF_OK);
    EXPECT_EQ(sf_cuda_bf16_to_f32(nullptr, nullptr, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_embedding_bf16(nullptr, nullptr, nullptr, 0, 8, 10, nullptr, 0), SF_OK);
    EXPECT_EQ(sf_cuda_splice_rows_bf16(nullptr, nullptr, nullptr, 4, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_rope_bf16(nullptr, nullptr, 0, 8, 64, 512, nullptr, 1.0f, 0), SF_OK);
    EXPECT_EQ(sf_cuda_swiglu_bf16(nullptr, nullptr, nullptr, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_swiglu_fused_bf16(nullptr, nullptr, 0, 8, 0), SF_OK);
    EXPECT_EQ(sf_cuda_gelu_bf16(nullptr, nullptr, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_relu_bf16(nullptr, nullptr, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_bias_add_bf16(nullptr, nullptr, 5, 0, 0), SF_OK);
    EXPECT_EQ(sf_cuda_argmax_f32(nullptr, nullptr, 0, 10, nullptr, 0, 0), SF_OK);
    sf_sampling s = {0.8f, 40, 0.9f, 0, false, 0};
    EXPECT_EQ(sf_cuda_sample_f32(nullptr, nullptr, nullptr, 0, 10, &s, nullptr, 0, 0), SF_OK);
}

// =============================================================================================
// Conversion: round-to-nearest-even, compared bit for bit with the host rounding.
// =============================================================================================

// Values that probe every rounding case: exact ties with even and odd results, just above and
// below a tie, the largest finite float (rounds to inf), subnormals, signed zeros, infinities.
std::vector<float> rounding_probes(Rng &rng, size_t n) {
    std::vector<float> v = scaled_normal(rng, n, 100.0f);
    const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu, 0xbf818000u,
                                0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x00000001u,
                                0x00018000u, 0x00008000u, 0x80000000u, 0x00000000u, 0x7f800000u,
                                0xff800000u, 0x007fffffu, 0x00800000u};
    for (size_t i = 0; i < n && i < sizeof special / sizeof special[0]; i++) {
        v[(i * 7919) % n] = from_bits(special[i]);
    }
    return v;
}

// The fp16 rounding cases on top of rounding_probes: ties between fp16 neighbours with even and
// odd results and their neighbours, the largest finite value and the overflow boundary
// (65520 is the tie that goes to inf), the subnormals (spacing 2^-24; 2^-25 is the tie that
// goes to zero, 3 * 2^-25 the one that goes up to 2^-23), the smallest normal, and values
// spread over fp16's whole range.
std::vector<float> f16_rounding_probes(Rng &rng, size_t n) {
    std::vector<float> v = rounding_probes(rng, n);
    const float special[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 1.0f + 0x1p-11f + 0x1p-20f,
                             1.0f + 0x1p-11f - 0x1p-20f, -(1.0f + 3 * 0x1p-11f), 65504.0f,
                             65519.0f, 65520.0f, -65520.0f, 65536.0f, 1e6f, 0x1p-24f, 0x1p-25f,
                             0x1p-25f + 0x1p-40f, 3 * 0x1p-25f, -3 * 0x1p-25f, 0x1p-14f,
                             0x1p-14f - 0x1p-25f, 0x1p-30f, 2047.5f, 2048.5f, 4097.0f};
    const size_t n_special = sizeof special / sizeof special[0];
    for (size_t i = 0; i < n && i < n_special; i++) v[(i * 104729 + 3) % n] = special[i];
    // every binade of fp16, with random significands
    for (size_t i = n_special; i < n; i += 5) {
        v[i] = std::ldexp(rng.uniform(1.0f, 2.0f), (int)(i % 45) - 30) * (i % 2 ? -1.0f : 1.0f);
    }
    return v;
}

// fp32 -> bf16 against to_bf16 (bit arithmetic) and fp32 -> fp16 against to_f16 (a search), on
// probes for each format's rounding cases.
TEST(CudaConvert, F32ToBf16AndF16MatchHostRoundingBitForBit) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(11);
    for (bool f16 : {false, true}) {
        // 4096 + 8 and 65536 take the 128-bit path; the others, and the offset pointer, the
        // scalar one.
        for (size_t n : {1, 7, 65, 1000, 4104, 65536}) {
            for (size_t offset : {0, 1}) {
                SCOPED_TRACE(testing::Message() << (f16 ? "fp16" : "bf16") << ", n = " << n
                                                << ", offset = " << offset);
                std::vector<float> in = f16 ? f16_rounding_probes(rng, n) : rounding_probes(rng, n);
                DeviceBuffer<float> d_in(n + offset);
                DeviceBuffer<uint16_t> d_out(n + offset);
                upload(d_in.get() + offset, in);
                uint16_t *out = d_out.get() + offset;
                const float *src = d_in.get() + offset;
                ASSERT_EQ(f16 ? sf_cuda_f32_to_f16(out, src, (int64_t)n, 0)
                              : sf_cuda_f32_to_bf16(out, src, (int64_t)n, 0),
                          SF_OK)
                    << sf_last_error();
                SF_EXPECT_SYNC();
                std::vector<uint16_t> got = download(out, n);
                for (size_t i = 0; i < n; i++) {
                    ASSERT_EQ(got[i], f16 ? to_f16(in[i]) : to_bf16(in[i]))
                        << "i = " << i << ", in " << in[i] << " (bits 0x" << std::hex
                        << bits(in[i]) << ")";
                }
            }
        }
    }
}

TEST(CudaConvert, F32ToBf16AndF16KeepNaN) {
    SF_SKIP_WITHOUT_GPU();
    std::vector<float> in(16, std::nanf(""));
    in[3] = -std::nanf("");
    DeviceBuffer<float> d_in(in);
    for (bool f16 : {false, true}) {
        DeviceBuffer<uint16_t> d_out(in.size());
        const int64_t n = (int64_t)in.size();
        ASSERT_EQ(f16 ? sf_cuda_f32_to_f16(d_out.get(), d_in.get(), n, 0)
                      : sf_cuda_f32_to_bf16(d_out.get(), d_in.get(), n, 0),
                  SF_OK);
        SF_EXPECT_SYNC();
        for (uint16_t h : d_out.host()) EXPECT_TRUE(std::isnan(f16 ? from_f16(h) : from_bf16(h)));
    }
}

// Every one of the 65536 bf16 patterns (NaNs included) widens to exactly its bits << 16.
TEST(CudaConvert, Bf16ToF32IsExactForEveryPattern) {
    SF_SKIP_WITHOUT_GPU();
    std::vector<uint16_t> in(65536);
    for (size_t i = 0; i < in.size(); i++) in[i] = (uint16_t)i;
    for (size_t offset : {0, 1}) {
        const size_t n = in.size() - offset;  // offset 1: odd length, scalar path
        DeviceBuffer<uint16_t> d_in(in.size());
        DeviceBuffer<float> d_out(in.size());
        upload(d_in.get(), in);
        ASSERT_EQ(sf_cuda_bf16_to_f32(d_out.get() + offset, d_in.get() + offset, (int64_t)n, 0),
                  SF_OK)
            << sf_last_error();
        SF_EXPECT_SYNC();
        std::vector<float> got = download(d_out.get() + offset, n);
        for (size_t i = 0; i < n; i++) {
            ASSERT_EQ(bits(got[i]), (uint32_t)in[i + offset] << 16) << "pattern " << i + offset;
        }
    }
}

// =============================================================================================
// Embedding gather and splice: bit copies, so exact.
// =============================================================================================

// Both 16-bit gathers: the table's values are those of its format, so the CPU twin's fp32 rows
// convert back to the same bits.
TEST(CudaEmbedding, Bf16AndF16GathersMatchCpuExactly) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(21);
    const int32_t vocab = 1000;
    for (bool f16 : {false, true}) {
        for (int64_t dim : {1, 7, 65, 576, 4096}) {
            for (int64_t n : {1, 7, 65}) {
                SCOPED_TRACE(testing::Message()
                             << (f16 ? "fp16" : "bf16") << ", dim = " << dim << ", n = " << n);
                auto encode = [f16](const std::vector<float> &v) {
                    return f16 ? to_f16(v) : to_bf16(v);
                };
                std::vector<uint16_t> table_bits =
                    encode(scaled_normal(rng, (size_t)(vocab * dim), 1.0f));
                std::vector<float> table(table_bits.size());
                for (size_t i = 0; i < table.size(); i++) {
                    table[i] = f16 ? from_f16(table_bits[i]) : from_bf16(table_bits[i]);
                }
                std::vector<int32_t> ids(n);
                for (auto &id : ids) id = (int32_t)rng.below(vocab);
                ids[0] = vocab - 1;
                std::vector<float> want(n * dim);
                sf_cpu_embedding(want.data(), table.data(), ids.data(), n, dim);
                // Out-of-range ids on the device only: zero rows, counted.
                std::vector<int32_t> dev_ids = ids;
                if (n > 1) dev_ids[n - 1] = vocab;
                if (n > 3) dev_ids[2] = -5;
                int expect_bad = (n > 1) + (n > 3);
                if (n > 1) std::fill(want.begin() + (n - 1) * dim, want.begin() + n * dim, 0.0f);
                if (n > 3) std::fill(want.begin() + 2 * dim, want.begin() + 3 * dim, 0.0f);

                DeviceBuffer<uint16_t> d_table(table_bits);
                DeviceBuffer<int32_t> d_ids(dev_ids);
                DeviceBuffer<uint16_t> d_out((size_t)(n * dim));
                DeviceBuffer<int> d_bad(1);
                ASSERT_EQ(cudaMemset(d_bad.get(), 0, sizeof(int)), cudaSuccess);
                const sf_status st =
                    f16 ? sf_cuda_embedding_f16(d_out.get(), d_table.get(), d_ids.get(), n, dim,
                                                vocab, d_bad.get(), 0)
                        : sf_cuda_embedding_bf16(d_out.get(), d_table.get(), d_ids.get(), n, dim,
                                                 vocab, d_bad.get(), 0);
                ASSERT_EQ(st, SF_OK) << sf_last_error();
                SF_EXPECT_SYNC();
                EXPECT_EQ(d_out.host(), encode(want));
                EXPECT_EQ(d_bad.host()[0], expect_bad);
            }
        }
    }
}

// S' rows land at their rows of the packed input buffer; every other row is untouched, and a
// negative row index writes nothing.
TEST(CudaEmbedding, SpliceWritesExactlyTheGivenRows) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(22);
    for (int64_t dim : {1, 7, 65, 576, 4096}) {
        for (int64_t n_rows : {1, 7, 65}) {
            SCOPED_TRACE(testing::Message() << "dim = " << dim << ", n_rows = " << n_rows);
            const int64_t total = 3 * n_rows + 5;
            std::vector<uint16_t> dst = to_bf16(scaled_normal(rng, (size_t)(total * dim), 1.0f));
            std::vector<uint16_t> src = to_bf16(scaled_normal(rng, (size_t)(n_rows * dim), 1.0f));
            // A system span in the middle of the packed buffer, then scattered rows.
            std::vector<int32_t> rows(n_rows);
            for (int64_t i = 0; i < n_rows; i++)
                rows[i] = (int32_t)(i < n_rows / 2 ? 2 + i : 3 * i + 4);
            if (n_rows > 2) rows[n_rows - 1] = -1;
            std::vector<uint16_t> want = dst;
            for (int64_t i = 0; i < n_rows; i++) {
                if (rows[i] < 0) continue;
                std::copy(src.begin() + i * dim, src.begin() + (i + 1) * dim,
                          want.begin() + (int64_t)rows[i] * dim);
            }
            DeviceBuffer<uint16_t> d_dst(dst), d_src(src);
            DeviceBuffer<int32_t> d_rows(rows);
            ASSERT_EQ(
                sf_cuda_splice_rows_bf16(d_dst.get(), d_src.get(), d_rows.get(), n_rows, dim, 0),
                SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            EXPECT_EQ(d_dst.host(), want);
        }
    }
}

// The row moves between the formats of an fp16 guard (kernels/guard.cu): gather fp16 rows into
// bf16 ones and scatter bf16 rows into fp16 ones, each value rounded once to nearest even, so
// bits compare with the host's two-step fp16 -> fp32 (exact) -> target rounding. Strides wider
// than the rows, odd widths (the one-value path) and multiples of 8 (the 128-bit path); values
// over the whole fp16 range, past it (bf16 -> fp16 overflows to inf) and in its subnormals.
TEST(CudaEmbedding, RowMovesBetweenFormatsRoundEachValueOnce) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(23);
    for (int64_t dim : {1, 7, 64, 576}) {
        for (int64_t pad : {0, 8}) {
            SCOPED_TRACE(testing::Message() << "dim = " << dim << ", stride = " << dim + pad);
            const int64_t stride = dim + pad, n_src = 40, n = 9;
            std::vector<int32_t> rows(n);
            for (int64_t i = 0; i < n; i++) rows[i] = (int32_t)(4 * i + 1);
            rows[3] = -1;  // gather: a zero row; scatter: nothing written
            std::vector<float> values = f16_rounding_probes(rng, (size_t)(n_src * stride));
            for (size_t i = 0; i < values.size(); i += 11) values[i] *= 3.0f;  // past 65504

            // gather: fp16 [n_src, stride] -> bf16 [n, stride]
            std::vector<uint16_t> src16 = to_f16(values);
            std::vector<uint16_t> dst(n * stride, 0x5555), want_g = dst;
            for (int64_t i = 0; i < n; i++) {
                for (int64_t c = 0; c < dim; c++) {
                    want_g[i * stride + c] =
                        rows[i] < 0 ? 0 : to_bf16(from_f16(src16[rows[i] * stride + c]));
                }
            }
            DeviceBuffer<uint16_t> d_src16(src16), d_dst(dst);
            DeviceBuffer<int32_t> d_rows(rows);
            ASSERT_EQ(sf_cuda_gather_rows_f16_to_bf16(d_dst.get(), stride, d_src16.get(), stride,
                                                      d_rows.get(), n, dim, 0),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            EXPECT_EQ(d_dst.host(), want_g);

            // scatter: bf16 [n, stride] -> fp16 [n_src, stride]
            std::vector<uint16_t> src_bf(n * stride);
            for (int64_t i = 0; i < n * stride; i++) src_bf[i] = to_bf16(values[i]);
            std::vector<uint16_t> out(n_src * stride, 0x5555), want_s = out;
            for (int64_t i = 0; i < n; i++) {
                if (rows[i] < 0) continue;
                for (int64_t c = 0; c < dim; c++) {
                    want_s[rows[i] * stride + c] = to_f16(from_bf16(src_bf[i * stride + c]));
                }
            }
            DeviceBuffer<uint16_t> d_src_bf(src_bf), d_out(out);
            ASSERT_EQ(sf_cuda_scatter_rows_bf16_to_f16(d_out.get(), stride, d_src_bf.get(),
                                                       stride, d_rows.get(), n, dim, 0),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            EXPECT_EQ(d_out.host(), want_s);
        }
    }
}

// =============================================================================================
// RoPE
// =============================================================================================

struct RopeCase {
    const char *name;
    sf_llm_config cfg;
    int32_t n_heads;
};

using sf_test::rope_config;

// Per-element bound for one rotated pair (x0, x1) at position pos and frequency i:
//   angle:  the GPU forms a = fl32(pos * fl32(inv)), the CPU pos * inv in double, so
//           |da| <= |pos| |fl32(inv) - inv| + u |fl32(pos * fl32(inv))|  (at pos 8192 and
//           inv = 1: 4.9e-4 rad, about 1/8 of the bf16 step);
//   cos, sin: sincosf within 2 ulp (<= 2^-23 absolute, both are <= 1), times the fp32 scale
//           (one rounding, plus the scale's own rounding to fp32: 2u relative);
//   rotation: x0 c - x1 s in fp32, two roundings: 2u (|x0| + |x1|) scale.
// Moving (c, s) by da along the circle and by e per component changes y by at most
// (|x0| + |x1|) scale (da + e), so B = scale (|x0| + |x1|) (da + 3 * 2^-23) bounds the GPU's
// fp32 value against the exact one; the CPU's fp32 value adds u |ref|; bf16 rounding adds
// 2^-8 (|ref| + B).
double rope_bound(double ref, double x0, double x1, double scale, double pos, double inv64) {
    const float inv32 = (float)inv64;
    const float a32 = (float)pos * inv32;
    const double da = std::fabs(pos) * std::fabs((double)inv32 - inv64) + kU32 * std::fabs(a32);
    const double b = std::fabs(scale) * (std::fabs(x0) + std::fabs(x1)) * (da + 3 * 0x1p-23);
    return kBf16Round * (std::fabs(ref) + b) + b + kU32 * std::fabs(ref) + kBf16Floor;
}

void check_rope(const sf_llm_config &cfg, int32_t n_heads, int64_t n, int64_t stride_pad,
                uint64_t seed) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(seed);
    const int32_t d = cfg.head_dim, half = d / 2;
    const int64_t packed = (int64_t)n_heads * d, stride = packed + stride_pad;
    std::vector<int32_t> pos(n);
    for (int64_t t = 0; t < n; t++) pos[t] = (int32_t)rng.below(8193);
    pos[0] = 0;
    if (n > 1) pos[n - 1] = 8192;
    if (n > 5) pos[3] = 131071;  // Llama 3.1's longest context: sincosf's large-argument path
    std::vector<double> inv64(half);
    double scale = 1.0;
    sf_cpu_rope_freqs(&cfg, 8193, inv64.data(), &scale);
    std::vector<float> inv32(half);
    for (int32_t i = 0; i < half; i++) inv32[i] = (float)inv64[i];

    // The device buffer has stride_pad extra values per token that must stay as they were.
    std::vector<float> x = bf16_round(scaled_normal(rng, (size_t)(n * stride), 1.0f));
    std::vector<float> want(n * packed);
    for (int64_t t = 0; t < n; t++)
        std::copy(x.begin() + t * stride, x.begin() + t * stride + packed,
                  want.begin() + t * packed);
    const std::vector<float> before = want;
    sf_cpu_rope_apply(want.data(), pos.data(), n, n_heads, d, inv64.data(), scale);

    DeviceBuffer<uint16_t> d_x(to_bf16(x));
    DeviceBuffer<int32_t> d_pos(pos);
    DeviceBuffer<float> d_inv(inv32);
    ASSERT_EQ(sf_cuda_rope_bf16(d_x.get(), d_pos.get(), n, n_heads, d, stride, d_inv.get(),
                                (float)scale, 0),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    std::vector<float> got = from_bf16(d_x.host());

    BoundCheck check("rope");
    for (int64_t t = 0; t < n; t++) {
        for (int32_t h = 0; h < n_heads; h++) {
            for (int32_t i = 0; i < d; i++) {
                const int64_t k = t * packed + (int64_t)h * d;
                const int32_t j = i % half;
                const double b = rope_bound(want[k + i], before[k + j], before[k + j + half], scale,
                                            pos[t], inv64[j]);
                check.add(got[t * stride + (int64_t)h * d + i], want[k + i], b, k + i);
            }
        }
        for (int64_t i = packed; i < stride; i++) {
            ASSERT_EQ(bits(got[t * stride + i]), bits(x[t * stride + i])) << "pad of token " << t;
        }
    }
    EXPECT_TRUE(check.ok());
    check.record();
}

// Head dims 64 (default, theta 1e4), 96 (longrope with its attention factor), 128 (Llama 3.1);
// 1, 7 and 65 tokens; packed rows (128-bit path) and rows inside a wider buffer.
TEST(CudaRope, MatchesCpuWithinDerivedBound) {
    SF_SKIP_WITHOUT_GPU();
    const sf_test::RopeConfigs rc;
    uint64_t seed = 100;
    for (const sf_llm_config *cfg : {&rc.c64, &rc.c96, &rc.c128}) {
        for (int32_t heads : {1, 8}) {
            for (int64_t n : {1, 7, 65}) {
                for (int64_t pad : {0, 4 * cfg->head_dim + 4}) {  // + 4: scalar path
                    SCOPED_TRACE(testing::Message() << "head_dim " << cfg->head_dim << ", heads "
                                                    << heads << ", n " << n << ", pad " << pad);
                    check_rope(*cfg, heads, n, pad, seed++);
                }
            }
        }
    }
}

// An odd half (head_dim 6) takes the scalar path; 32 heads of 128 is Llama-3.1-8B's q.
TEST(CudaRope, OddHalfAndManyHeads) {
    SF_SKIP_WITHOUT_GPU();
    check_rope(rope_config(SF_ROPE_DEFAULT, 6, 10000.0), 3, 7, 0, 7);
    check_rope(rope_config(SF_ROPE_DEFAULT, 128, 500000.0), 32, 65, 0, 8);
}

// The fused inference form (sf_cuda_rope_kv_cache_bf16): in qkv rows of n_heads q, n_kv_heads k
// and n_kv_heads v heads (plus qkv_pad values), q rotated in place; k rotated and v copied into
// cache rows kv_rows[t] (rows cache_pad values wider than the heads). Rotations against the CPU
// twin within rope_bound (the arithmetic is rope_kernel's); everything else bit for bit: the v
// copies, and all that must stay as it was (qkv's k, v and pad, cache rows no token names,
// tokens with kv_rows[t] = -1, the caches' pad). With use_table (longrope) each token takes
// the short or the long frequencies and scale at random, as requests past the original context
// do; without, table is NULL and only the first table is read.
void check_rope_kv_cache(const sf_llm_config &cfg, int32_t n_heads, int32_t n_kv_heads,
                         int64_t n, int64_t qkv_pad, int64_t cache_pad, bool use_table,
                         uint64_t seed) {
    Rng rng(seed);
    const int32_t d = cfg.head_dim, half = d / 2;
    const int64_t q_vals = (int64_t)n_heads * d, kv_vals = (int64_t)n_kv_heads * d;
    const int64_t qkv_stride = q_vals + 2 * kv_vals + qkv_pad, cache_stride = kv_vals + cache_pad;
    const int64_t cache_rows = n + 5;  // five rows nobody writes
    // each cache is handed over one row into a buffer with a row more at either end, which
    // must stay as they are (a write through kv_rows[t] = -1 would land in the first)
    const int64_t buf_rows = cache_rows + 2;

    std::vector<int32_t> pos(n), table(n, 0), kv_rows(n), perm(cache_rows);
    for (int64_t t = 0; t < n; t++) pos[t] = (int32_t)rng.below(8193);
    pos[0] = 0;
    if (n > 1) pos[n - 1] = 8192;
    for (int64_t r = 0; r < cache_rows; r++) perm[r] = (int32_t)r;
    for (int64_t r = cache_rows - 1; r > 0; r--) std::swap(perm[r], perm[rng.below(r + 1)]);
    for (int64_t t = 0; t < n; t++) {
        kv_rows[t] = t % 5 == 3 ? -1 : perm[t];  // every fifth token stores nothing
        if (use_table) table[t] = (int32_t)rng.below(2);
    }
    // the two tables: short (a request within the original context) and long
    std::vector<double> inv64[2] = {std::vector<double>(half), std::vector<double>(half)};
    double scale[2];
    sf_cpu_rope_freqs(&cfg, 1, inv64[0].data(), &scale[0]);
    sf_cpu_rope_freqs(&cfg, 1 << 20, inv64[1].data(), &scale[1]);
    std::vector<float> inv32(2 * half);
    for (int32_t i = 0; i < 2 * half; i++) inv32[i] = (float)inv64[i / half][i % half];

    const std::vector<float> qkv = bf16_round(scaled_normal(rng, (size_t)(n * qkv_stride), 1.0f));
    const size_t buf_vals = (size_t)(buf_rows * cache_stride);
    const std::vector<float> kc_buf = bf16_round(scaled_normal(rng, buf_vals, 1.0f));
    const std::vector<float> vc_buf = bf16_round(scaled_normal(rng, buf_vals, 1.0f));
    DeviceBuffer<uint16_t> d_qkv(to_bf16(qkv)), d_kc(to_bf16(kc_buf)), d_vc(to_bf16(vc_buf));
    DeviceBuffer<int32_t> d_pos(pos), d_table(table), d_rows(kv_rows);
    DeviceBuffer<float> d_inv(inv32);
    ASSERT_EQ(sf_cuda_rope_kv_cache_bf16(d_qkv.get(), qkv_stride, n, n_heads, n_kv_heads, d,
                                         d_pos.get(), use_table ? d_table.get() : nullptr,
                                         d_inv.get(), (float)scale[0], (float)scale[1],
                                         d_rows.get(), d_kc.get() + cache_stride,
                                         d_vc.get() + cache_stride, cache_stride, 0),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    const std::vector<float> got_qkv = from_bf16(d_qkv.host());
    // the caches as handed over (row r at r * cache_stride), and the whole buffers
    const std::vector<float> got_kc_buf = from_bf16(d_kc.host());
    const std::vector<float> got_vc_buf = from_bf16(d_vc.host());
    const float *kc = kc_buf.data() + cache_stride, *vc = vc_buf.data() + cache_stride;
    const float *got_kc = got_kc_buf.data() + cache_stride;
    const float *got_vc = got_vc_buf.data() + cache_stride;

    BoundCheck check("rope_kv_cache");
    std::vector<bool> written(cache_rows, false);
    for (int64_t t = 0; t < n; t++) {
        const int tb = table[t];
        const float *row = qkv.data() + t * qkv_stride;
        // the CPU twin on this token's q and k heads, with its table
        std::vector<float> want(row, row + q_vals + kv_vals);
        sf_cpu_rope_apply(want.data(), &pos[t], 1, n_heads + n_kv_heads, d, inv64[tb].data(),
                          scale[tb]);
        auto check_head = [&](const float *got, int64_t h) {
            for (int32_t i = 0; i < d; i++) {
                const int64_t k = h * d;
                const int32_t j = i % half;
                check.add(got[i], want[k + i],
                          rope_bound(want[k + i], row[k + j], row[k + j + half], scale[tb],
                                     pos[t], inv64[tb][j]),
                          t * qkv_stride + k + i);
            }
        };
        for (int64_t h = 0; h < n_heads; h++) {
            check_head(got_qkv.data() + t * qkv_stride + h * d, h);
        }
        for (int64_t i = q_vals; i < qkv_stride; i++) {
            ASSERT_EQ(bits(got_qkv[t * qkv_stride + i]), bits(row[i]))
                << "qkv value " << i << " of token " << t << " (k, v or pad) changed";
        }
        if (kv_rows[t] < 0) continue;
        const int64_t r = kv_rows[t];
        written[r] = true;
        for (int64_t h = 0; h < n_kv_heads; h++)
            check_head(got_kc + r * cache_stride + h * d, n_heads + h);
        for (int64_t i = 0; i < kv_vals; i++) {
            ASSERT_EQ(bits(got_vc[r * cache_stride + i]), bits(row[q_vals + kv_vals + i]))
                << "v value " << i << " of token " << t << " in cache row " << r;
        }
        for (int64_t i = kv_vals; i < cache_stride; i++) {
            ASSERT_EQ(bits(got_kc[r * cache_stride + i]), bits(kc[r * cache_stride + i]));
            ASSERT_EQ(bits(got_vc[r * cache_stride + i]), bits(vc[r * cache_stride + i]));
        }
    }
    for (int64_t r = -1; r <= cache_rows; r++) {  // with the rows either side
        if (r >= 0 && r < cache_rows && written[r]) continue;
        for (int64_t i = 0; i < cache_stride; i++) {
            ASSERT_EQ(bits(got_kc[r * cache_stride + i]), bits(kc[r * cache_stride + i]))
                << "k cache row " << r << ", which no token names, changed (-1 and "
                << cache_rows << ": the rows either side)";
            ASSERT_EQ(bits(got_vc[r * cache_stride + i]), bits(vc[r * cache_stride + i]))
                << "v cache row " << r << ", which no token names, changed (-1 and "
                << cache_rows << ": the rows either side)";
        }
    }
    EXPECT_TRUE(check.ok());
    check.record();
}

// SmolLM2's heads (9/3, d 64), Phi-3.5's longrope (d 96, both tables), Llama 3.1's (32/8, d 128);
// 1, 7 and 65 tokens; packed rows (128-bit path) and padded ones (+4: the scalar path).
TEST(CudaRope, KvCacheMatchesCpuWithinDerivedBound) {
    SF_SKIP_WITHOUT_GPU();
    const sf_test::RopeConfigs rc;
    struct Heads {
        const sf_llm_config *cfg;
        int32_t n_heads, n_kv_heads;
    };
    uint64_t seed = 300;
    for (const Heads &h : {Heads{&rc.c64, 9, 3}, Heads{&rc.c96, 4, 4}, Heads{&rc.c128, 32, 8}}) {
        for (int64_t n : {1, 7, 65}) {
            for (int64_t pad : {0, 4}) {
                SCOPED_TRACE(testing::Message() << "head_dim " << h.cfg->head_dim << ", heads "
                                                << h.n_heads << "/" << h.n_kv_heads << ", n "
                                                << n << ", pad " << pad);
                check_rope_kv_cache(*h.cfg, h.n_heads, h.n_kv_heads, n, pad, pad,
                                    h.cfg->rope.type == SF_ROPE_LONGROPE, seed++);
                if (HasFatalFailure()) return;
            }
        }
    }
}

TEST(CudaRope, KvCacheRejectsBadArguments) {
    // checked before any CUDA call: no device needed, pointers never dereferenced
    alignas(16) uint16_t buf[8] = {};
    int32_t ints[2] = {};
    float f[2] = {};
    sf_bf16 *x = buf;
    auto call = [&](int64_t qkv_stride, int64_t n, int32_t nh, int32_t nkv, int32_t d,
                    int64_t cache_stride) {
        return sf_cuda_rope_kv_cache_bf16(x, qkv_stride, n, nh, nkv, d, ints, nullptr, f, 1.0f,
                                          1.0f, ints, x, x, cache_stride, 0);
    };
    EXPECT_EQ(call(384, -1, 4, 2, 48, 96), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(call(384, 4, 4, 2, 47, 96), SF_ERR_INVALID_ARGUMENT);        // odd head_dim
    EXPECT_EQ(call(384, 4, 4, 2, 514, 96), SF_ERR_INVALID_ARGUMENT);       // head_dim > 512
    EXPECT_EQ(call(383, 4, 4, 2, 48, 96), SF_ERR_INVALID_ARGUMENT);        // qkv row too short
    EXPECT_EQ(call(384, 4, 4, 2, 48, 95), SF_ERR_INVALID_ARGUMENT);        // cache row too short
    EXPECT_EQ(call(384, 4, -1, 2, 48, 96), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(call(INT64_MAX / 2, 4, 4, 2, 48, 96), SF_ERR_INVALID_ARGUMENT);  // overflows
    EXPECT_EQ(sf_cuda_rope_kv_cache_bf16(x, 384, 4, 4, 2, 48, ints, nullptr, f, 1.0f, 1.0f,
                                         nullptr, x, x, 96, 0),
              SF_ERR_INVALID_ARGUMENT);  // no kv_rows
    EXPECT_EQ(sf_cuda_rope_kv_cache_bf16(x + 1, 384, 4, 4, 2, 48, ints, nullptr, f, 1.0f, 1.0f,
                                         ints, x, reinterpret_cast<sf_bf16 *>((char *)buf + 1),
                                         96, 0),
              SF_ERR_INVALID_ARGUMENT);  // v cache not aligned to its element
    EXPECT_EQ(call(384, 0, 4, 2, 48, 96), SF_OK);  // nothing to do
}

// =============================================================================================
// Activations
// =============================================================================================

// SwiGLU. GPU: e = expf(-|g|) (2 ulp = 4u), s = (1 or e) / (1 + e) (e's error counts twice:
// 8u; two roundings), g s, times up: at most 12u relative; budget 16u = 2^-20. CPU: u. bf16:
// 2^-8 of the fp32 value. Below g = -87 e is an fp32 subnormal, whose absolute rounding
// (2^-150, times |g up| < 2^12) stays under the 2^-133 floor.
// tol = 2^-8 (1 + 2^-19) |ref| + 2^-19 |ref| + 2^-133.
double swiglu_bound(double ref) {
    return kBf16Round * (1 + 0x1p-19) * std::fabs(ref) + 0x1p-19 * std::fabs(ref) + kBf16Floor;
}

std::vector<float> swiglu_inputs(Rng &rng, size_t n) {
    std::vector<float> v = bf16_round(scaled_normal(rng, n, 3.0f));
    const float tails[] = {-90.0f, -95.0f, -100.0f, 40.0f, -0.0f, 0.0f, -20.0f};
    for (size_t i = 0; i < n && i < 7; i++) v[(i * 131) % n] = tails[i];
    return v;
}

TEST(CudaActivations, SwigluMatchesCpuWithinDerivedBound) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(31);
    for (size_t n : {1, 7, 65, 1000, 4096 * 3 + 5, 14336 * 7}) {
        for (size_t offset : {0, 1}) {
            SCOPED_TRACE(testing::Message() << "n = " << n << ", offset = " << offset);
            std::vector<float> g = swiglu_inputs(rng, n),
                               u = bf16_round(scaled_normal(rng, n, 2.0f));
            std::vector<float> want(n);
            sf_cpu_swiglu(want.data(), g.data(), u.data(), (int64_t)n);
            DeviceBuffer<uint16_t> d_g(n + 1), d_u(n + 1), d_out(n + 1);
            upload(d_g.get() + offset, to_bf16(g));
            upload(d_u.get() + offset, to_bf16(u));
            ASSERT_EQ(sf_cuda_swiglu_bf16(d_out.get() + offset, d_g.get() + offset,
                                          d_u.get() + offset, (int64_t)n, 0),
                      SF_OK)
                << sf_last_error();
            // In place (out = gate) gives the same values.
            ASSERT_EQ(sf_cuda_swiglu_bf16(d_g.get() + offset, d_g.get() + offset,
                                          d_u.get() + offset, (int64_t)n, 0),
                      SF_OK);
            SF_EXPECT_SYNC();
            std::vector<float> got = from_bf16(download(d_out.get() + offset, n));
            BoundCheck check("swiglu");
            for (size_t i = 0; i < n; i++) check.add(got[i], want[i], swiglu_bound(want[i]), i);
            EXPECT_TRUE(check.ok());
            EXPECT_EQ(download(d_g.get() + offset, n), download(d_out.get() + offset, n));
        }
    }
}

// Phi-3's fused layout: gate in the first ff columns of each row, up in the next ff.
TEST(CudaActivations, FusedSwigluMatchesCpuWithinDerivedBound) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(32);
    for (int64_t rows : {1, 7, 65}) {
        for (int64_t ff : {1, 7, 96, 1000, 8192 + 3}) {
            SCOPED_TRACE(testing::Message() << "rows = " << rows << ", ff = " << ff);
            std::vector<float> gu = swiglu_inputs(rng, (size_t)(rows * 2 * ff));
            std::vector<float> gate(rows * ff), up(rows * ff), want(rows * ff);
            for (int64_t r = 0; r < rows; r++) {
                for (int64_t j = 0; j < ff; j++) {
                    gate[r * ff + j] = gu[r * 2 * ff + j];
                    up[r * ff + j] = gu[r * 2 * ff + ff + j];
                }
            }
            sf_cpu_swiglu(want.data(), gate.data(), up.data(), rows * ff);
            DeviceBuffer<uint16_t> d_gu(to_bf16(gu)), d_out((size_t)(rows * ff));
            ASSERT_EQ(sf_cuda_swiglu_fused_bf16(d_out.get(), d_gu.get(), rows, ff, 0), SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            std::vector<float> got = from_bf16(d_out.host());
            BoundCheck check("swiglu_fused");
            for (size_t i = 0; i < want.size(); i++)
                check.add(got[i], want[i], swiglu_bound(want[i]), i);
            EXPECT_TRUE(check.ok());
        }
    }
}

// GELU. GPU: y = -x * fl32(1/sqrt 2) carries 2u relative; erfc's condition number
// |y erfc'(y) / erfc(y)| = 2|y| e^-y^2 / (sqrt(pi) erfc(y)) is below 2y^2 + 2 for y > 0 (the left
// tail of x) and below 1 for y <= 0, so the argument costs (2y^2 + 2) 2u; erfcf 4 ulp = 8u; the
// products 0.5 x (exact) and * erfc: u. CPU: u. Inputs reach |x| = 12 (erfc(8.5) ~ 1e-33, still
// a normal fp32). tol = 2^-8 (|ref| + B) + B + 2^-133 with B = ((2y^2 + 2) 2u + 10u) |ref|.
double gelu_bound(double ref, double x) {
    const double y = -x / std::sqrt(2.0);
    const double cond = y > 0 ? 2 * y * y + 2 : 1.0;
    const double b = (cond * 2 * kU32 + 10 * kU32) * std::fabs(ref);
    return kBf16Round * (std::fabs(ref) + b) + b + kBf16Floor;
}

TEST(CudaActivations, GeluMatchesCpuWithinDerivedBound) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(33);
    for (size_t n : {1, 7, 65, 1000, 4096 * 3 + 5, 4096 * 8}) {
        for (size_t offset : {0, 1}) {
            SCOPED_TRACE(testing::Message() << "n = " << n << ", offset = " << offset);
            std::vector<float> x = bf16_round(rng.uniform_vec(n, -12.0f, 12.0f));
            for (size_t i = 0; i < n; i += 3) x[i] = from_bf16(to_bf16(rng.normal()));  // near 0
            std::vector<float> want(n);
            sf_cpu_gelu(want.data(), x.data(), (int64_t)n);
            DeviceBuffer<uint16_t> d_x(n + 1), d_out(n + 1);
            upload(d_x.get() + offset, to_bf16(x));
            ASSERT_EQ(sf_cuda_gelu_bf16(d_out.get() + offset, d_x.get() + offset, (int64_t)n, 0),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            std::vector<float> got = from_bf16(download(d_out.get() + offset, n));
            BoundCheck check("gelu");
            for (size_t i = 0; i < n; i++) check.add(got[i], want[i], gelu_bound(want[i], x[i]), i);
            EXPECT_TRUE(check.ok());
        }
    }
}

// ReLU selects, so it is exact: bits compared, -0 kept (x < 0 is false), NaN kept.
TEST(CudaActivations, ReluIsExact) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(34);
    for (size_t n : {1, 7, 65, 1000, 65536}) {
        for (size_t offset : {0, 1}) {
            SCOPED_TRACE(testing::Message() << "n = " << n << ", offset = " << offset);
            std::vector<uint16_t> x = to_bf16(scaled_normal(rng, n, 2.0f));
            const uint16_t special[] = {0x8000, 0x0000, 0x8001, 0x0001, 0xff80,
                                        0x7f80, 0xffc1, 0x7fc1, 0xff81};
            for (size_t i = 0; i < n && i < 9; i++) x[(i * 97) % n] = special[i];
            if (n == 65536)
                for (size_t i = 0; i < n; i++) x[i] = (uint16_t)i;  // every pattern
            std::vector<float> xf = from_bf16(x), want(n);
            sf_cpu_relu(want.data(), xf.data(), (int64_t)n);
            DeviceBuffer<uint16_t> d_x(n + 1), d_out(n + 1);
            upload(d_x.get() + offset, x);
            ASSERT_EQ(sf_cuda_relu_bf16(d_out.get() + offset, d_x.get() + offset, (int64_t)n, 0),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            std::vector<uint16_t> got = download(d_out.get() + offset, n);
            for (size_t i = 0; i < n; i++) {
                // The CPU's fp32 result of a bf16 input is a bf16 value; NaN must stay the same
                // NaN.
                const uint16_t expect = std::isnan(want[i]) ? x[i] : to_bf16(want[i]);
                ASSERT_EQ(got[i], expect) << "i = " << i << ", x = 0x" << std::hex << x[i];
            }
        }
    }
}

// Bias add: both sides form the same fp32 sum a + b (one IEEE rounding) and round it to bf16
// to nearest even, so the bits agree exactly with to_bf16 of sf_cpu_add's result.
TEST(CudaActivations, BiasAddIsExactFp32SumRoundedOnce) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(35);
    for (int64_t rows : {1, 7, 65}) {
        for (int64_t dim : {1, 7, 65, 576, 4096}) {
            SCOPED_TRACE(testing::Message() << "rows = " << rows << ", dim = " << dim);
            std::vector<float> x = bf16_round(scaled_normal(rng, (size_t)(rows * dim), 4.0f));
            std::vector<float> b = bf16_round(scaled_normal(rng, (size_t)dim, 1.0f));
            b[0] = 1e-6f;  // far below x's ulp: the sum rounds in fp32, then to bf16
            std::vector<uint16_t> want(rows * dim);
            for (int64_t r = 0; r < rows; r++) {
                std::vector<float> sum(dim);
                sf_cpu_add(sum.data(), x.data() + r * dim, b.data(), dim);
                for (int64_t j = 0; j < dim; j++) want[r * dim + j] = to_bf16(sum[j]);
            }
            DeviceBuffer<uint16_t> d_x(to_bf16(x)), d_b(to_bf16(b));
            ASSERT_EQ(sf_cuda_bias_add_bf16(d_x.get(), d_b.get(), rows, dim, 0), SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            EXPECT_EQ(d_x.host(), want);
        }
    }
}

// =============================================================================================
// Argmax and sampling
// =============================================================================================

sf_sampling greedy() { return sf_sampling{0.0f, 0, 1.0f, 0, false, 0}; }

// Greedy is a comparison, so exact: the GPU must return what sf_sample's loop returns, ties
// (lowest index), -0 == +0, -inf, and NaN (never wins, except at index 0) included.
TEST(CudaSampling, ArgmaxMatchesCpuExactly) {
    SF_SKIP_WITHOUT_GPU();
    Rng rng(41);
    // 8192 and 8193: one chunk and just over it; 50257 (odd): scalar loads, split rows
    for (int32_t vocab : {1, 1000, 8192, 8193, 49152, 50257, 128256}) {
        for (int64_t rows : {1, 7, 65}) {
            SCOPED_TRACE(testing::Message() << "vocab = " << vocab << ", rows = " << rows);
            std::vector<float> logits = scaled_normal(rng, (size_t)(rows * vocab), 3.0f);
            for (int64_t r = 0; r < rows && vocab > 10; r++) {
                float *row = logits.data() + r * vocab;
                switch (r % 6) {
                    case 0:
                        break;
                    case 1: {  // a tie for the maximum: the lower index wins
                        const int32_t a = (int32_t)rng.below(vocab), b = (int32_t)rng.below(vocab);
                        row[a] = row[b] = 100.0f;
                        break;
                    }
                    case 2:  // -0 and +0 as the maximum: equal, so the lower index wins
                        for (int32_t i = 0; i < vocab; i++) row[i] = -std::fabs(row[i]) - 1.0f;
                        row[9] = 0.0f;
                        row[4] = -0.0f;
                        break;
                    case 3:  // NaN elsewhere never wins; -inf entries
                        row[5] = std::nanf("");
                        row[6] = -INFINITY;
                        break;
                    case 4:  // NaN at index 0 wins
                        row[0] = std::nanf("");
                        break;
                    case 5:  // all equal: index 0
                        std::fill(row, row + vocab, 1.5f);
                        break;
                }
            }
            std::vector<int32_t> want(rows);
            const sf_sampling s = greedy();
            for (int64_t r = 0; r < rows; r++) {
                uint64_t state = 0;
                ASSERT_EQ(sf_sample(logits.data() + r * vocab, vocab, &s, &state, &want[r]), SF_OK);
            }
            DeviceBuffer<float> d_logits(logits);
            DeviceBuffer<int32_t> d_out((size_t)rows);
            // Rows split over blocks (with a workspace) ...
            const size_t ws_bytes = sf_cuda_argmax_workspace_bytes(rows, vocab);
            DeviceBuffer<uint64_t> d_ws(ws_bytes / 8 + 1);
            ASSERT_EQ(sf_cuda_argmax_f32(d_out.get(), d_logits.get(), rows, vocab, d_ws.get(),
                                         ws_bytes, 0),
                      SF_OK)
                << sf_last_error();
            // ... and one block a row: the sampler's greedy mode without a workspace.
            DeviceBuffer<int32_t> d_out2((size_t)rows);
            ASSERT_EQ(sf_cuda_sample_f32(d_out2.get(), d_logits.get(), nullptr, rows, vocab, &s,
                                         nullptr, 0, 0),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            EXPECT_EQ(d_out.host(), want);
            EXPECT_EQ(d_out2.host(), want);
        }
    }
}

// --- Sampling -------------------------------------------------------------------------------
//
// Why exact equality holds. The sorted order is built from the fp32 logits exactly as
// sf_sample's (dividing distinct floats by the same positive temperature in double keeps them
// distinct and in order; ties go to the lower index on both sides), and top_k is a count, so
// the kept list is identical. What differs is rounding in double: each weight exp(z - z_max)
// within 1 ulp on either side (2^-52 relative apart), and sums of up to n = 262144 positive
// terms in a different order, each within (n - 1) 2^-53 relative of the exact sum. So every
// total, running sum and mass differs by under 2 * 262144 * 2^-53 + 2^-51 < 1e-10 relative.
// The tokens can differ only if u * total lands within that distance of a running sum, or the
// top_p mass within it of top_p. mirror_sample() below repeats sf_sample's arithmetic and
// returns the relative distance of every decision from its boundary; SamplingInputsHaveMargin
// (which runs everywhere) asserts that it exceeds 1e-9 for every case the GPU test uses, so the
// comparison is exact by argument, not by luck.

struct SampleCase {
    float temperature;
    int32_t top_k;
    float top_p;
};

const SampleCase kSampleCases[] = {
    {1.0f, 0, 1.0f},        // plain sampling over the whole vocabulary
    {0.7f, 50, 1.0f},       // top-k only
    {1.3f, 0, 0.9f},        // top-p only
    {0.8f, 40, 0.95f},      // both
    {1.0f, 1, 1.0f},        // k = 1: the argmax
    {2.0f, 1 << 20, 0.5f},  // k beyond the vocabulary is off
    {0.5f, 1000, 0.99f},
    // top-p alone takes the mass-weighted select (sampling.cu's select_nucleus): a small nucleus
    // at a low temperature, a middling one, and one that keeps nearly the whole row
    {0.25f, 0, 0.9f},
    {0.7f, 0, 0.5f},
    {1.0f, 0, 0.995f},
};

struct SampleMirror {
    int32_t token;
    double margin;  // smallest relative distance of a decision from its boundary
};

SampleMirror mirror_sample(const float *logits, int32_t vocab, const SampleCase &c, double u) {
    struct Scored {
        double z;
        int32_t id;
    };
    std::vector<Scored> s(vocab);
    for (int32_t i = 0; i < vocab; i++) s[i] = {(double)logits[i] / c.temperature, i};
    std::sort(s.begin(), s.end(), [](const Scored &a, const Scored &b) {
        return a.z != b.z ? a.z > b.z : a.id < b.id;
    });
    int32_t keep = vocab;
    if (c.top_k > 0 && c.top_k < keep) keep = c.top_k;
    std::vector<double> w(keep);
    double total = 0.0;
    for (int32_t i = 0; i < keep; i++) total += (w[i] = std::exp(s[i].z - s[0].z));
    double margin = INFINITY;
    if (c.top_p > 0.0f && c.top_p < 1.0f) {
        const double p = c.top_p;
        double mass = 0.0, before = 0.0;
        int32_t n = 0;
        while (n < keep) {
            before = mass;
            mass += w[n] / total;
            n++;
            if (mass >= p) break;
        }
        if (mass >= p) {
            margin = std::min(margin, mass - p);    // the crossing sum is at least top_p
            margin = std::min(margin, p - before);  // and the one before it is below
        } else {
            margin = std::min(margin, p - mass);  // never reached: all kept
        }
        keep = n;
        total = 0.0;
        for (int32_t i = 0; i < keep; i++) total += w[i];
    }
    const double target = u * total;
    double acc = 0.0, before = 0.0;
    int32_t pick = -1;
    for (int32_t i = 0; i < keep; i++) {
        before = acc;
        acc += w[i];
        if (target < acc) {
            pick = i;
            break;
        }
    }
    if (pick >= 0) {
        margin = std::min(margin, (acc - target) / total);
        // Token 0 has no lower boundary (u = 0 picks it on both sides).
        if (pick > 0) margin = std::min(margin, (target - before) / total);
    } else {
        pick = keep - 1;
        margin = std::min(margin, (target - acc) / total);
    }
    return {s[pick].id, margin};
}

// Logits for sampling: normal with the given spread; "ties" rounds them to multiples of 1/4 so
// that equal logits straddle the top-k cut and the draw.
std::vector<float> sample_logits(int64_t rows, int32_t vocab, uint64_t seed, bool ties) {
    Rng rng(seed);
    std::vector<float> v = scaled_normal(rng, (size_t)(rows * vocab), 2.5f);
    if (ties)
        for (float &x : v) x = std::round(x * 4.0f) / 4.0f;
    for (int64_t r = 0; r < rows && vocab > 20; r++) {
        v[r * vocab + 3] = -INFINITY;
        v[r * vocab + 5] = -0.0f;
        v[r * vocab + 6] = 0.0f;
    }
    return v;
}

double row_uniform(uint64_t seed) {
    sf_rng rng = sf_rng_seed(seed);
    return sf_rng_uniform(&rng);
}

struct SampleShape {
    int32_t vocab;
    int64_t rows;
};
// The first kShortShapes have vocabularies up to SmolLM2's (49152: already split over several
// chunks); the last two are Llama 3's and a 2^18 one.
const SampleShape kSampleShapes[] = {{1, 7}, {1000, 65}, {49152, 7}, {128256, 7}, {262144, 1}};
constexpr size_t kShortShapes = 3;

uint64_t shape_seed(size_t shape, bool ties) { return 5000 + 2 * shape + (ties ? 1 : 0); }
uint64_t row_seed(size_t shape, size_t c, int64_t r) { return 1000003 * shape + 7919 * c + r; }

// The precondition of the exact comparison, checked on the CPU (no device needed): for every
// input the GPU test feeds, the mirror agrees with sf_sample and every decision has a margin
// far above the rounding differences bounded above.
TEST(CudaSampling, SamplingInputsHaveMargin) {
    for (size_t sh = 0; sh < sizeof kSampleShapes / sizeof kSampleShapes[0]; sh++) {
        const SampleShape shape = kSampleShapes[sh];
        for (bool ties : {false, true}) {
            const std::vector<float> logits =
                sample_logits(shape.rows, shape.vocab, shape_seed(sh, ties), ties);
            for (size_t c = 0; c < sizeof kSampleCases / sizeof kSampleCases[0]; c++) {
                const SampleCase &sc = kSampleCases[c];
                const sf_sampling s = {sc.temperature, sc.top_k, sc.top_p, 0, false, 0};
                for (int64_t r = 0; r < shape.rows; r++) {
                    const uint64_t seed = row_seed(sh, c, r);
                    uint64_t state = seed;
                    int32_t token = -1;
                    ASSERT_EQ(
                        sf_sample(logits.data() + r * shape.vocab, shape.vocab, &s, &state, &token),
                        SF_OK);
                    const SampleMirror m = mirror_sample(logits.data() + r * shape.vocab,
                                                         shape.vocab, sc, row_uniform(seed));
                    ASSERT_EQ(m.token, token) << "mirror disagrees: vocab " << shape.vocab
                                              << " case " << c << " row " << r;
                    EXPECT_GT(m.margin, 1e-9)
                        << "vocab " << shape.vocab << " case " << c << " row " << r;
                }
            }
        }
    }
}

// Every case of kSampleCases on kSampleShapes[first, last), exactly against sf_sample.
void topk_topp_match_cpu(size_t first, size_t last) {
    for (size_t sh = first; sh < last; sh++) {
        const SampleShape shape = kSampleShapes[sh];
        for (bool ties : {false, true}) {
            const std::vector<float> logits =
                sample_logits(shape.rows, shape.vocab, shape_seed(sh, ties), ties);
            DeviceBuffer<float> d_logits(logits);
            const size_t ws_bytes = sf_cuda_sample_workspace_bytes(shape.rows, shape.vocab);
            DeviceBuffer<uint8_t> d_ws(ws_bytes);
            for (size_t c = 0; c < sizeof kSampleCases / sizeof kSampleCases[0]; c++) {
                SCOPED_TRACE(testing::Message()
                             << "vocab " << shape.vocab << ", rows " << shape.rows << ", ties "
                             << ties << ", case " << c);
                const SampleCase &sc = kSampleCases[c];
                const sf_sampling s = {sc.temperature, sc.top_k, sc.top_p, 0, false, 0};
                std::vector<int32_t> want(shape.rows);
                std::vector<double> u(shape.rows);
                for (int64_t r = 0; r < shape.rows; r++) {
                    const uint64_t seed = row_seed(sh, c, r);
                    uint64_t state = seed;
                    u[r] = row_uniform(seed);  // the draw sf_sample makes from this state
                    ASSERT_EQ(sf_sample(logits.data() + r * shape.vocab, shape.vocab, &s, &state,
                                        &want[r]),
                              SF_OK);
                    const SampleMirror m =
                        mirror_sample(logits.data() + r * shape.vocab, shape.vocab, sc, u[r]);
                    ASSERT_GT(m.margin, 1e-9) << "row " << r << ": inputs too close to a boundary";
                }
                DeviceBuffer<double> d_u(u);
                DeviceBuffer<int32_t> d_out((size_t)shape.rows), d_again((size_t)shape.rows);
                ASSERT_EQ(sf_cuda_sample_f32(d_out.get(), d_logits.get(), d_u.get(), shape.rows,
                                             shape.vocab, &s, d_ws.get(), ws_bytes, 0),
                          SF_OK)
                    << sf_last_error();
                ASSERT_EQ(sf_cuda_sample_f32(d_again.get(), d_logits.get(), d_u.get(), shape.rows,
                                             shape.vocab, &s, d_ws.get(), ws_bytes, 0),
                          SF_OK);
                SF_EXPECT_SYNC();
                EXPECT_EQ(d_out.host(), want);
                EXPECT_EQ(d_again.host(), d_out.host()) << "not deterministic";
            }
        }
    }
}

// Split in two so that the CPU emulator (tools/simt/run.sh elementwise), where the long
// vocabularies take two minutes, can run the first alone; a GPU runs both.
TEST(CudaSampling, TopKTopPMatchesCpuExactlyGivenTheSameUniform) {
    SF_SKIP_WITHOUT_GPU();
    topk_topp_match_cpu(0, kShortShapes);
}
TEST(CudaSampling, TopKTopPMatchesCpuOnLongVocabularies) {
    SF_SKIP_WITHOUT_GPU();
    topk_topp_match_cpu(kShortShapes, sizeof kSampleShapes / sizeof kSampleShapes[0]);
}

// top_p alone and plain sampling on rows longer than a chunk run split over blocks
// (sampling.cu's nucleus_* kernels: bins of z below the row's maximum, then the candidates of
// each chunk). Rows that stress the bins, exactly against sf_sample under the same margin
// argument as above:
// a vocabulary masked to 50 tokens (the rest -inf, in the last bin), all logits equal (one
// bin holds the row), logits spread over 340 nats (the last bin holds mass-less ones, the
// crossing bin is refined), two logits that hold nearly all the mass (a nucleus of 1 or 2),
// and one whose mass crosses top_p inside a run of ties. vocab 20000: two full chunks and
// a partial one. A row with +inf (unspecified by the contract, as for sf_sample) must still
// give a token in range.
TEST(CudaSampling, SplitPrefixSelectMatchesCpuOnHardRows) {
    SF_SKIP_WITHOUT_GPU();
    const int32_t vocab = 20000;
    const int64_t rows = 6;
    Rng rng(4242);
    std::vector<float> logits((size_t)(rows * vocab));
    float *r0 = logits.data(), *r1 = r0 + vocab, *r2 = r1 + vocab, *r3 = r2 + vocab,
          *r4 = r3 + vocab, *r5 = r4 + vocab;
    for (int32_t i = 0; i < vocab; i++) {
        r0[i] = i % 400 == 7 ? 2.5f * rng.normal() : -INFINITY;
        r1[i] = 1.5f;
        r2[i] = rng.uniform(-300.0f, 40.0f);
        r3[i] = 2.0f * rng.normal();
        r4[i] = std::round(4.0f * rng.normal()) / 2.0f;  // multiples of 1/2: long runs of ties
        r5[i] = 2.0f * rng.normal();
    }
    r3[9000] = 30.0f;
    r3[17] = 29.5f;
    r5[12345] = INFINITY;
    DeviceBuffer<float> d_logits(logits);
    const size_t ws_bytes = sf_cuda_sample_workspace_bytes(rows, vocab);
    DeviceBuffer<uint8_t> d_ws(ws_bytes + 8);
    const SampleCase cases[] = {{1.0f, 0, 0.9f},  {0.6f, 0, 0.95f},      {1.7f, 0, 0.3f},
                                {1.0f, 1 << 20, 0.77f}, {1.0f, 0, 1.0f}, {0.6f, 1 << 20, 1.0f}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        SCOPED_TRACE(testing::Message() << "case " << c);
        const SampleCase &sc = cases[c];
        const sf_sampling s = {sc.temperature, sc.top_k, sc.top_p, 0, false, 0};
        std::vector<int32_t> want(rows);
        std::vector<double> u(rows);
        for (int64_t r = 0; r < rows; r++) {
            const uint64_t seed = 77 * c + r;
            uint64_t state = seed;
            u[r] = row_uniform(seed);
            ASSERT_EQ(sf_sample(logits.data() + r * vocab, vocab, &s, &state, &want[r]), SF_OK);
            if (r == 5) continue;
            const SampleMirror m = mirror_sample(logits.data() + r * vocab, vocab, sc, u[r]);
            ASSERT_EQ(m.token, want[r]) << "mirror disagrees, row " << r;
            ASSERT_GT(m.margin, 1e-9) << "row " << r << ": inputs too close to a boundary";
        }
        DeviceBuffer<double> d_u(u);
        // the workspace at its 8-byte aligned start takes the split path; 4 bytes on (valid,
        // but not 8-byte aligned) the per-row path (select_nucleus, or the full sort)
        for (size_t offset : {0, 4}) {
            SCOPED_TRACE(testing::Message() << "workspace offset " << offset);
            DeviceBuffer<int32_t> d_out((size_t)rows);
            ASSERT_EQ(sf_cuda_sample_f32(d_out.get(), d_logits.get(), d_u.get(), rows, vocab, &s,
                                         d_ws.get() + offset, ws_bytes, 0),
                      SF_OK)
                << sf_last_error();
            SF_EXPECT_SYNC();
            const std::vector<int32_t> got = d_out.host();
            for (int64_t r = 0; r < 5; r++) EXPECT_EQ(got[r], want[r]) << "row " << r;
            EXPECT_GE(got[5], 0);
            EXPECT_LT(got[5], vocab);
        }
    }
}

// u at the extremes: 0 picks the most likely token; just below 1 picks the last kept one.
TEST(CudaSampling, ExtremeUniformsPickTheEnds) {
    SF_SKIP_WITHOUT_GPU();
    const int32_t vocab = 1000;
    std::vector<float> logits = sample_logits(1, vocab, 77, false);
    const sf_sampling s = {1.0f, 10, 1.0f, 0, false, 0};
    std::vector<std::pair<float, int32_t>> order;
    for (int32_t i = 0; i < vocab; i++) order.push_back({-logits[i], i});
    std::sort(order.begin(), order.end());
    DeviceBuffer<float> d_logits(logits);
    DeviceBuffer<uint8_t> d_ws(sf_cuda_sample_workspace_bytes(2, vocab));
    DeviceBuffer<double> d_u(std::vector<double>{0.0, 0.99999999999});
    std::vector<float> two_rows = logits;
    two_rows.insert(two_rows.end(), logits.begin(), logits.end());
    DeviceBuffer<float> d_two(two_rows);
    DeviceBuffer<int32_t> d_out(2);
    ASSERT_EQ(sf_cuda_sample_f32(d_out.get(), d_two.get(), d_u.get(), 2, vocab, &s, d_ws.get(),
                                 sf_cuda_sample_workspace_bytes(2, vocab), 0),
              SF_OK)
        << sf_last_error();
    SF_EXPECT_SYNC();
    std::vector<int32_t> got = d_out.host();
    EXPECT_EQ(got[0], order[0].second);
    EXPECT_EQ(got[1], order[9].second);
}

}  // namespace
