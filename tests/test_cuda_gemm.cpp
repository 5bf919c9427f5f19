// The cuBLASLt GEMM wrapper (host/cuda/gemm.c) against a double-precision loop over the same
// bf16 inputs. GPU tests skip without a device (bench/device_check.sh runs them on a lent GPU);
// the argument tests run everywhere: sf_cuda_gemm checks its arguments before it looks at the
// cache or touches CUDA, so they pass a NULL cache and never need a cuBLASLt handle.
//
// Tolerance, derived per element (u = 2^-24, the fp32 unit roundoff). Let
//     ref = sum_l x[i,l] w[j,l] (+ b[j]),   S = sum_l |x[i,l] w[j,l]| (+ |b[j]|),
// computed in double from the bf16 values the GPU sees (double's own error, k 2^-53 S, is
// negligible against what follows).
// - Products of two bf16 values (8 significant bits each) are exact in fp32.
// - A sum of k terms in any order (tree, split-K, partial sums combined in the workspace) is
//   off by at most gamma_(k-1) S under round-to-nearest; the bias add is one more rounding.
//   Tensor cores do not promise round-to-nearest: their multi-term adders align terms by
//   truncation, which can cost up to 2u per addition plus up to 2u per term in alignment. So
//   we charge 4u per term and per addition and allow two extra roundings (bias add, split-K
//   combine):  E = gamma_(4(k+2)) S.  Generous by design, and still far below what a wrong
//   element, a dropped bias, a transposed operand or a read of the padding would cost.
// - ReLU is 1-Lipschitz, so relu(c) is within E of relu(ref).
// - fp32 y: |got - ref| <= E.
// - bf16 y: got = bf16(c) with |c - ref| <= E; rounding to nearest bf16 moves c by at most half
//   an ulp, 2^-8 |c| in the worst case (2^-9 just below a power of two; 2^-8 just above one),
//   so |got - ref| <= E + 2^-8 (|ref| + E). Values are O(1): no underflow term is needed.
// For fp32 y at small k the bound is a few ulps of fp32 relative to S, so an output that was
// rounded to bf16 on the way (2^-8 relative) fails it.
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/gemm.h"
#include "cuda_test_util.h"
#include "test_util.h"

namespace {

using sf_test::BoundCheck;
using sf_test::Rng;

constexpr double kBf16Round = 0x1p-8;  // bf16 rounding to nearest, relative, worst case
// host/cuda/gemm.c's SF_GEMM_CACHE_CAPACITY: the overflow test must pass it.
constexpr int64_t kCacheCapacity = 512;
constexpr uint16_t kBf16Nan = 0x7fc0;  // fills padding that the product must never read

// One product. x is a column block [x_col, x_col + k) of a [m, ldx] buffer, y a column block
// [y_col, y_col + n) of a [m, ldy] buffer; w and bias start w_shift and bias_shift elements
// into their buffers (cudaMalloc gives 256-byte bases, so a shift sets the alignment).
struct Spec {
    int64_t m = 1, n = 8, k = 8;
    int64_t ldx = 0, x_col = 0;  // ldx 0: k
    int64_t ldy = 0, y_col = 0;  // ldy 0: n
    int64_t w_shift = 0, bias_shift = 0;
    bool y_f32 = false;
    sf_gemm_epilogue epilogue = SF_GEMM_NONE;

    int64_t lx() const { return ldx ? ldx : k; }
    int64_t ly() const { return ldy ? ldy : n; }
};

std::string describe(const Spec &s) {
    static const char *kEpi[] = {"none", "bias", "relu_bias"};
    std::ostringstream o;
    o << "m=" << s.m << " n=" << s.n << " k=" << s.k << " ldx=" << s.lx() << " x_col=" << s.x_col
      << " ldy=" << s.ly() << " y_col=" << s.y_col << " w_shift=" << s.w_shift
      << " bias_shift=" << s.bias_shift << (s.y_f32 ? " fp32" : " bf16") << " y, epilogue "
      << kEpi[s.epilogue];
    return o.str();
}

bool has_bias(const Spec &s) { return s.epilogue != SF_GEMM_NONE; }

// Host inputs, bf16-exact, in the buffers' layout (padding included).
struct Inputs {
    std::vector<uint16_t> x, w, bias;  // buffers as uploaded
};

Inputs make_inputs(const Spec &s, uint64_t seed) {
    Rng rng(seed);
    Inputs in;
    in.x.assign((size_t)(s.m * s.lx()), kBf16Nan);
    for (int64_t i = 0; i < s.m; i++) {
        for (int64_t l = 0; l < s.k; l++) {
            in.x[i * s.lx() + s.x_col + l] = to_bf16(rng.uniform(-1, 1));
        }
    }
    in.w.assign((size_t)(s.w_shift + s.n * s.k), kBf16Nan);
    for (int64_t i = 0; i < s.n * s.k; i++) in.w[s.w_shift + i] = to_bf16(rng.uniform(-1, 1));
    in.bias.assign((size_t)(s.bias_shift + s.n), kBf16Nan);
    for (int64_t j = 0; j < s.n; j++) in.bias[s.bias_shift + j] = to_bf16(rng.uniform(-1, 1));
    return in;
}

// Device copies of the inputs and a poisoned output buffer (all bits set: NaN in both types).
struct Device {
    explicit Device(const Spec &s, const Inputs &in)
        : x(in.x), w(in.w), bias(in.bias), y16(s.y_f32 ? 1 : s.m * s.ly()),
          y32(s.y_f32 ? s.m * s.ly() : 1) {}
    bool ok() const { return x.get() && w.get() && bias.get() && y16.get() && y32.get(); }
    DeviceBuffer<uint16_t> x, w, bias, y16;
    DeviceBuffer<float> y32;
};

sf_gemm_args make_args(const Spec &s, const Device &d) {
    sf_gemm_args a;
    memset(&a, 0, sizeof a);
    a.y = s.y_f32 ? (void *)(d.y32.get() + s.y_col) : (void *)(d.y16.get() + s.y_col);
    a.ldy = s.ly();
    a.y_f32 = s.y_f32;
    a.x = d.x.get() + s.x_col;
    a.ldx = s.lx();
    a.w = d.w.get() + s.w_shift;
    a.bias = has_bias(s) ? d.bias.get() + s.bias_shift : nullptr;
    a.m = s.m;
    a.n = s.n;
    a.k = s.k;
    a.epilogue = s.epilogue;
    return a;
}

// The whole output buffer's bits, one uint32 per element in either type.
std::vector<uint32_t> output_bits(const Spec &s, const Device &d) {
    std::vector<uint32_t> bits;
    if (s.y_f32) {
        const std::vector<float> v = d.y32.host();
        bits.resize(v.size());
        for (size_t i = 0; i < v.size(); i++) memcpy(&bits[i], &v[i], 4);
    } else {
        const std::vector<uint16_t> v = d.y16.host();
        bits.assign(v.begin(), v.end());
    }
    return bits;
}

float bits_value(const Spec &s, uint32_t b) {
    if (!s.y_f32) return from_bf16((uint16_t)b);
    float f;
    memcpy(&f, &b, 4);
    return f;
}

// Checks the output block against the reference and every element outside it against the
// poison (DeviceBuffer fills with 0xff bytes), which the product must not overwrite.
void expect_matches_reference(const Spec &s, const Inputs &in, const std::vector<uint32_t> &bits) {
    const double gamma = sf_test::gamma32(4.0 * (double)(s.k + 2));
    BoundCheck check("y");
    int64_t clobbered = 0;
    const uint32_t poison = s.y_f32 ? 0xffffffffu : 0xffffu;
    for (int64_t i = 0; i < s.m; i++) {
        for (int64_t c = 0; c < s.ly(); c++) {
            const uint32_t b = bits[(size_t)(i * s.ly() + c)];
            const int64_t j = c - s.y_col;
            if (j < 0 || j >= s.n) {
                if (b != poison) clobbered++;
                continue;
            }
            double ref = 0.0, mag = 0.0;
            for (int64_t l = 0; l < s.k; l++) {
                const double p = (double)from_bf16(in.x[i * s.lx() + s.x_col + l]) *
                                 (double)from_bf16(in.w[s.w_shift + j * s.k + l]);
                ref += p;
                mag += std::fabs(p);
            }
            if (has_bias(s)) {
                const double bj = from_bf16(in.bias[s.bias_shift + j]);
                ref += bj;
                mag += std::fabs(bj);
            }
            if (s.epilogue == SF_GEMM_RELU_BIAS && ref < 0.0) ref = 0.0;
            const double e = gamma * mag;
            const double bound = s.y_f32 ? e : e + kBf16Round * (std::fabs(ref) + e);
            check.add(bits_value(s, b), ref, bound, i * s.n + j);
        }
    }
    EXPECT_TRUE(check.ok());
    EXPECT_EQ(clobbered, 0) << "elements outside y's column block were overwritten";
}

// Runs one product on a fresh set of buffers and checks it. Returns the output bits (empty
// when the call failed) so that callers can compare runs.
std::vector<uint32_t> run_and_check(sf_gemm_cache *cache, const Spec &s, uint64_t seed,
                                    cudaStream_t stream = nullptr) {
    SCOPED_TRACE(describe(s));
    const Inputs in = make_inputs(s, seed);
    Device d(s, in);
    if (!d.ok()) {
        ADD_FAILURE() << "cudaMalloc failed";
        return {};
    }
    const sf_gemm_args a = make_args(s, d);
    const sf_status st = sf_cuda_gemm(cache, &a, stream);
    EXPECT_EQ(st, SF_OK) << sf_last_error();
    if (st != SF_OK) return {};
    EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    std::vector<uint32_t> bits = output_bits(s, d);
    expect_matches_reference(s, in, bits);
    return bits;
}

// A cache over a full-size workspace, for every GPU test.
class CudaGemm : public ::testing::Test {
  protected:
    void SetUp() override {
        SF_SKIP_WITHOUT_GPU();
        ASSERT_EQ(cudaMalloc(&workspace_, SF_GEMM_WORKSPACE_BYTES), cudaSuccess);
        ASSERT_EQ(sf_gemm_cache_create(workspace_, SF_GEMM_WORKSPACE_BYTES, &cache_), SF_OK)
            << sf_last_error();
    }
    void TearDown() override {
        sf_gemm_cache_free(cache_);
        cudaFree(workspace_);
    }
    void *workspace_ = nullptr;
    sf_gemm_cache *cache_ = nullptr;
};

const int64_t kMs[] = {1, 3, 17, 128, 257};
const int64_t kNs[] = {1, 8, 31, 576, 1000};
const int64_t kKs[] = {8, 64, 100, 576};

// The four supported (output, epilogue) pairs; a bias with fp32 y is refused (see below).
struct Variant {
    bool y_f32;
    sf_gemm_epilogue epilogue;
};
const Variant kVariants[] = {
    {false, SF_GEMM_NONE}, {false, SF_GEMM_BIAS}, {false, SF_GEMM_RELU_BIAS}, {true, SF_GEMM_NONE}};

// Every shape of the grid, each with one of the variants in turn (so each variant meets every
// m, n and k), contiguous operands.
TEST_F(CudaGemm, AwkwardShapesMatchReference) {
    uint64_t seed = 1;
    size_t v = 0;
    for (int64_t m : kMs) {
        for (int64_t n : kNs) {
            for (int64_t k : kKs) {
                Spec s;
                s.m = m;
                s.n = n;
                s.k = k;
                s.y_f32 = kVariants[v % 4].y_f32;
                s.epilogue = kVariants[v % 4].epilogue;
                v++;
                run_and_check(cache_, s, seed++);
            }
        }
    }
}

// Every variant on a few shapes that stress different kernels: a decode row, an odd tile
// remainder, and a full prefill block.
TEST_F(CudaGemm, EveryVariantMatchesReference) {
    uint64_t seed = 1001;
    const int64_t shapes[][3] = {{1, 576, 576}, {17, 31, 100}, {257, 1000, 576}};
    for (const auto &sh : shapes) {
        for (const Variant &var : kVariants) {
            Spec s;
            s.m = sh[0];
            s.n = sh[1];
            s.k = sh[2];
            s.y_f32 = var.y_f32;
            s.epilogue = var.epilogue;
            run_and_check(cache_, s, seed++);
        }
    }
}

// x a column block of a wider buffer (ldx > k) and y written into a column block of a wider
// one (ldy > n), at the offsets a fused qkv buffer gives: the q, k and v blocks of SmolLM2's
// [tokens, 576 + 192 + 192] (16-byte aligned), and odd element offsets (2-byte aligned).
TEST_F(CudaGemm, StridedBlocksMatchReferenceAndLeaveTheRestAlone) {
    uint64_t seed = 2001;
    struct Block {
        int64_t col, width, ld;
    };
    const Block x_blocks[] = {{0, 576, 960}, {576, 192, 960}, {768, 192, 960}, {3, 100, 107}};
    const Block y_blocks[] = {{0, 576, 960}, {576, 192, 960}, {768, 192, 960}, {1, 31, 40}};
    for (const Block &xb : x_blocks) {
        for (const Block &yb : y_blocks) {
            for (const Variant &var : kVariants) {
                Spec s;
                s.m = 17;
                s.k = xb.width;
                s.x_col = xb.col;
                s.ldx = xb.ld;
                s.n = yb.width;
                s.y_col = yb.col;
                s.ldy = yb.ld;
                s.y_f32 = var.y_f32;
                s.epilogue = var.epilogue;
                run_and_check(cache_, s, seed++);
            }
        }
    }
}

// Same m, n, k and strides, different pointer alignments, in an order that would reuse a
// kernel picked for 256-byte aligned operands on misaligned ones if alignment were not part of
// the cache key: each result must still be right (a wrong kernel gives garbage or a fault).
TEST_F(CudaGemm, PointerAlignmentIsPartOfTheShape) {
    uint64_t seed = 3001;
    Spec base;
    base.m = 128;
    base.n = 576;
    base.k = 576;
    base.ldx = 576 + 8;
    base.ldy = 576 + 8;
    base.epilogue = SF_GEMM_BIAS;
    // {x_col, y_col, w_shift}: aligned, 16 bytes, then 2 bytes for each operand, then all.
    const int64_t shifts[][3] = {{0, 0, 0}, {8, 8, 8}, {1, 0, 0}, {0, 1, 0},
                                 {0, 0, 1}, {1, 1, 1}, {0, 0, 0}};
    for (bool y_f32 : {false, true}) {
        for (const auto &sh : shifts) {
            Spec s = base;
            s.y_f32 = y_f32;
            if (y_f32) s.epilogue = SF_GEMM_NONE;
            s.x_col = sh[0];
            s.y_col = sh[1];
            s.w_shift = sh[2];
            run_and_check(cache_, s, seed++);
        }
    }
    // The bias at 16 bytes must work. At 2 bytes cuBLASLt may offer no kernel: the engine never
    // passes such a bias (its weights are 256-byte aligned), so SF_ERR_UNSUPPORTED is an
    // acceptable answer there, but a success must be right.
    Spec s = base;
    s.bias_shift = 8;
    run_and_check(cache_, s, seed++);
    s.bias_shift = 1;
    {
        SCOPED_TRACE(describe(s));
        const Inputs in = make_inputs(s, seed++);
        Device d(s, in);
        ASSERT_TRUE(d.ok());
        const sf_gemm_args a = make_args(s, d);
        const sf_status st = sf_cuda_gemm(cache_, &a, nullptr);
        if (st == SF_ERR_UNSUPPORTED) {
            RecordProperty("bias_2_byte_aligned", sf_last_error());
        } else {
            ASSERT_EQ(st, SF_OK) << sf_last_error();
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            expect_matches_reference(s, in, output_bits(s, d));
        }
    }
}

// The second call at a shape takes the cached algorithm; it must give the same bits (and the
// same as a third call after other shapes went through the cache).
TEST_F(CudaGemm, RepeatedCallsAreBitIdentical) {
    for (const Variant &var : kVariants) {
        Spec s;
        s.m = 257;
        s.n = 1000;
        s.k = 576;
        s.y_f32 = var.y_f32;
        s.epilogue = var.epilogue;
        SCOPED_TRACE(describe(s));
        const Inputs in = make_inputs(s, 4001);
        Device d(s, in);
        ASSERT_TRUE(d.ok());
        const sf_gemm_args a = make_args(s, d);
        ASSERT_EQ(sf_cuda_gemm(cache_, &a, nullptr), SF_OK) << sf_last_error();
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        const std::vector<uint32_t> first = output_bits(s, d);
        expect_matches_reference(s, in, first);
        for (int rep = 0; rep < 2; rep++) {
            ASSERT_EQ(cudaMemset(s.y_f32 ? (void *)d.y32.get() : (void *)d.y16.get(), 0xff,
                                 (size_t)(s.m * s.ly()) * (s.y_f32 ? 4 : 2)),
                      cudaSuccess);
            if (rep == 1) {  // other shapes in between
                Spec other = s;
                other.m = 3;
                run_and_check(cache_, other, 4002);
            }
            ASSERT_EQ(sf_cuda_gemm(cache_, &a, nullptr), SF_OK) << sf_last_error();
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            EXPECT_TRUE(output_bits(s, d) == first) << "call " << rep + 2 << " differs";
        }
    }
}

// More distinct shapes than the cache holds: the oldest entries are evicted (their descriptors
// destroyed) and rebuilt when their shape comes back; every result stays right.
TEST_F(CudaGemm, CacheOverflowStaysCorrect) {
    uint64_t seed = 5001;
    for (int64_t m = 1; m <= kCacheCapacity + 40; m++) {
        Spec s;
        s.m = m;
        s.n = 8;
        s.k = 8;
        s.epilogue = SF_GEMM_BIAS;
        run_and_check(cache_, s, seed++);
        if (HasFailure()) return;  // one broken shape is enough to report
    }
    for (int64_t m = 1; m <= 50; m++) {  // evicted by now, and the newest still cached
        Spec s;
        s.m = m % 2 ? m : kCacheCapacity + 40 - m;
        s.n = 8;
        s.k = 8;
        s.epilogue = SF_GEMM_BIAS;
        run_and_check(cache_, s, seed++);
        if (HasFailure()) return;
    }
}

// A cache without workspace holds the heuristic to kernels that need none (no split-K
// reduction buffer); the results must be as right.
TEST_F(CudaGemm, NoWorkspaceMatchesReference) {
    sf_gemm_cache *bare = nullptr;
    ASSERT_EQ(sf_gemm_cache_create(nullptr, 0, &bare), SF_OK) << sf_last_error();
    uint64_t seed = 6001;
    const int64_t shapes[][3] = {{1, 8, 8192}, {3, 1000, 576}, {128, 31, 100}};
    for (const auto &sh : shapes) {
        for (const Variant &var : kVariants) {
            Spec s;
            s.m = sh[0];
            s.n = sh[1];
            s.k = sh[2];
            s.y_f32 = var.y_f32;
            s.epilogue = var.epilogue;
            run_and_check(bare, s, seed++);
        }
    }
    sf_gemm_cache_free(bare);
}

// m == 0 or n == 0: SF_OK, and nothing is written.
TEST_F(CudaGemm, EmptyProductsWriteNothing) {
    for (int64_t m : {(int64_t)0, (int64_t)5}) {
        Spec s;
        s.m = 5;
        s.n = 8;
        s.k = 64;
        s.epilogue = SF_GEMM_RELU_BIAS;
        const Inputs in = make_inputs(s, 7001);
        Device d(s, in);
        ASSERT_TRUE(d.ok());
        sf_gemm_args a = make_args(s, d);
        a.m = m;
        a.n = m == 0 ? 8 : 0;
        ASSERT_EQ(sf_cuda_gemm(cache_, &a, nullptr), SF_OK) << sf_last_error();
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        for (uint32_t b : output_bits(s, d)) ASSERT_EQ(b, 0xffffu);
    }
}

// A bias with fp32 y is refused before any work: cuBLASLt's bias type follows the output's,
// and the engine's biases are bf16 (see host/cuda/gemm.c).
TEST_F(CudaGemm, BiasWithFp32OutputIsUnsupported) {
    Spec s;
    s.m = 3;
    s.n = 8;
    s.k = 8;
    s.y_f32 = true;
    s.epilogue = SF_GEMM_BIAS;
    const Inputs in = make_inputs(s, 8001);
    Device d(s, in);
    ASSERT_TRUE(d.ok());
    const sf_gemm_args a = make_args(s, d);
    EXPECT_EQ(sf_cuda_gemm(cache_, &a, nullptr), SF_ERR_UNSUPPORTED);
    EXPECT_NE(strstr(sf_last_error(), "fp32"), nullptr) << sf_last_error();
}

// Two products at cached shapes, the second reading the first's output (a projection then
// the next layer's input), captured into a CUDA graph on a non-default stream and replayed:
// bit for bit what eager execution gave, on every replay.
TEST_F(CudaGemm, GraphCaptureReplaysEagerResults) {
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);

    Spec s1;  // y1[17, 576] = bf16(x w1^T + b1)
    s1.m = 17;
    s1.n = 576;
    s1.k = 576;
    s1.epilogue = SF_GEMM_BIAS;
    Spec s2;  // y2[17, 1000] = y1 w2^T in fp32
    s2.m = 17;
    s2.n = 1000;
    s2.k = 576;
    s2.y_f32 = true;
    const Inputs in1 = make_inputs(s1, 9001), in2 = make_inputs(s2, 9002);
    Device d1(s1, in1), d2(s2, in2);
    ASSERT_TRUE(d1.ok() && d2.ok());
    const sf_gemm_args a1 = make_args(s1, d1);
    sf_gemm_args a2 = make_args(s2, d2);
    a2.x = d1.y16.get();

    auto enqueue = [&]() {
        EXPECT_EQ(sf_cuda_gemm(cache_, &a1, stream), SF_OK) << sf_last_error();
        EXPECT_EQ(sf_cuda_gemm(cache_, &a2, stream), SF_OK) << sf_last_error();
    };
    auto poison = [&]() {
        EXPECT_EQ(cudaMemsetAsync(d1.y16.get(), 0xff, 17 * 576 * 2, stream), cudaSuccess);
        EXPECT_EQ(cudaMemsetAsync(d2.y32.get(), 0xff, 17 * 1000 * 4, stream), cudaSuccess);
    };

    enqueue();  // eager, and it puts both shapes in the cache
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<uint32_t> eager1 = output_bits(s1, d1), eager2 = output_bits(s2, d2);
    expect_matches_reference(s1, in1, eager1);

    poison();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    enqueue();
    cudaGraph_t graph = nullptr;
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    ASSERT_FALSE(HasFailure()) << "capture failed";
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);

    for (int replay = 0; replay < 2; replay++) {
        SCOPED_TRACE("replay " + std::to_string(replay));
        poison();
        ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        EXPECT_TRUE(output_bits(s1, d1) == eager1) << "first product differs from eager";
        EXPECT_TRUE(output_bits(s2, d2) == eager2) << "second product differs from eager";
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
}

// ---------------------------------------------------------------------------------------------
// Argument checks. sf_cuda_gemm checks its arguments, then the cache pointer, then m == 0 ||
// n == 0, and only then touches cuBLASLt; sf_gemm_cache_create checks its arguments before
// cublasLtCreate. So these run without a GPU: the pointers are host arrays nothing
// dereferences, and the cache is NULL, which must not be what a bad argument is blamed on.
// ---------------------------------------------------------------------------------------------

TEST(CudaGemmArgs, RejectsBadArgumentsBeforeTheCacheOrCuda) {
    alignas(256) static uint16_t xs[64 * 64], ws[64 * 64], bs[64], ys[64 * 64];
    sf_gemm_args good;
    memset(&good, 0, sizeof good);
    good.y = ys;
    good.ldy = 32;
    good.x = xs;
    good.ldx = 16;
    good.w = ws;
    good.bias = bs;
    good.m = 4;
    good.n = 32;
    good.k = 16;
    good.epilogue = SF_GEMM_BIAS;

    struct Bad {
        const char *why;
        const char *named;  // what the message must mention
        sf_gemm_args a;
    };
    std::vector<Bad> bad;
    auto add = [&](const char *why, const char *named, auto edit) {
        Bad b{why, named, good};
        edit(b.a);
        bad.push_back(b);
    };
    add("NULL y", "NULL y", [](sf_gemm_args &a) { a.y = nullptr; });
    add("NULL x", "NULL x", [](sf_gemm_args &a) { a.x = nullptr; });
    add("NULL w", "NULL w", [](sf_gemm_args &a) { a.w = nullptr; });
    add("BIAS without bias", "bias", [](sf_gemm_args &a) { a.bias = nullptr; });
    add("RELU_BIAS without bias", "bias", [](sf_gemm_args &a) {
        a.bias = nullptr;
        a.epilogue = SF_GEMM_RELU_BIAS;
    });
    // 3 is the only out-of-list value the enum's range holds (C++ makes others undefined).
    add("unknown epilogue", "epilogue 3",
        [](sf_gemm_args &a) { a.epilogue = (sf_gemm_epilogue)3; });
    add("m < 0", "m=-1", [](sf_gemm_args &a) { a.m = -1; });
    add("n < 0", "n=-3", [](sf_gemm_args &a) { a.n = -3; });
    add("k == 0", "k=0", [](sf_gemm_args &a) {
        a.k = 0;
        a.ldx = 0;
    });
    add("k < 0", "k=-2", [](sf_gemm_args &a) { a.k = -2; });
    add("ldx < k", "ldx=15", [](sf_gemm_args &a) { a.ldx = 15; });
    add("ldy < n", "ldy=31", [](sf_gemm_args &a) { a.ldy = 31; });
    add("x not 2-byte aligned", "aligned",
        [](sf_gemm_args &a) { a.x = (const sf_bf16 *)((const char *)a.x + 1); });
    add("fp32 y not 4-byte aligned", "aligned", [](sf_gemm_args &a) {
        a.epilogue = SF_GEMM_NONE;
        a.y_f32 = true;
        a.y = (char *)a.y + 2;
    });
    add("m ldy overflows", "overflow", [](sf_gemm_args &a) {
        a.m = (int64_t)1 << 40;
        a.ldy = (int64_t)1 << 30;
    });
    add("n k overflows", "overflow", [](sf_gemm_args &a) {
        a.n = (int64_t)1 << 40;
        a.ldy = a.n;
        a.k = (int64_t)1 << 30;
        a.ldx = a.k;
    });
    // Nothing to do is still checked.
    add("NULL x, m == 0", "NULL x", [](sf_gemm_args &a) {
        a.x = nullptr;
        a.m = 0;
    });
    add("ldx < k, n == 0", "ldx=15", [](sf_gemm_args &a) {
        a.ldx = 15;
        a.n = 0;
    });

    for (const Bad &c : bad) {
        SCOPED_TRACE(c.why);
        sf_clear_error();
        EXPECT_EQ(sf_cuda_gemm(nullptr, &c.a, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(strstr(sf_last_error(), "sf_cuda_gemm"), nullptr) << sf_last_error();
        EXPECT_NE(strstr(sf_last_error(), c.named), nullptr) << sf_last_error();
        EXPECT_EQ(strstr(sf_last_error(), "cache"), nullptr) << sf_last_error();
    }

    sf_clear_error();
    EXPECT_EQ(sf_cuda_gemm(nullptr, nullptr, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "NULL args"), nullptr) << sf_last_error();

    // Good arguments: the NULL cache is the one thing wrong, whether or not there is work.
    for (int64_t m : {(int64_t)4, (int64_t)0}) {
        sf_gemm_args a = good;
        a.m = m;
        sf_clear_error();
        EXPECT_EQ(sf_cuda_gemm(nullptr, &a, nullptr), SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(strstr(sf_last_error(), "NULL cache"), nullptr) << sf_last_error();
    }

    // A bias with fp32 y is a valid request the wrapper does not support; still no CUDA call.
    sf_gemm_args a = good;
    a.y_f32 = true;
    sf_clear_error();
    EXPECT_EQ(sf_cuda_gemm(nullptr, &a, nullptr), SF_ERR_UNSUPPORTED);
    EXPECT_NE(strstr(sf_last_error(), "fp32"), nullptr) << sf_last_error();
}

TEST(CudaGemmArgs, CacheCreateRejectsBadArguments) {
    alignas(256) static unsigned char ws[512];
    // A non-NULL sentinel: a failed create must leave *out NULL.
    sf_gemm_cache *cache = reinterpret_cast<sf_gemm_cache *>(ws);

    sf_clear_error();
    EXPECT_EQ(sf_gemm_cache_create(ws, sizeof ws, nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "NULL out"), nullptr) << sf_last_error();

    sf_clear_error();
    EXPECT_EQ(sf_gemm_cache_create(nullptr, 1024, &cache), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "workspace_bytes=1024"), nullptr) << sf_last_error();
    EXPECT_EQ(cache, nullptr);

    sf_clear_error();
    EXPECT_EQ(sf_gemm_cache_create(ws + 16, 256, &cache), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "256-byte aligned"), nullptr) << sf_last_error();
    EXPECT_EQ(cache, nullptr);

    sf_gemm_cache_free(nullptr);  // a no-op
}

}  // namespace
