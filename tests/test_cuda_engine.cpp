// The CUDA engine (host/cuda/*) end to end against the CPU reference path: guarded prefill,
// the device-side guarded embedding for serving stacks, decode over the KV slots, CUDA-graph
// replay, generation, hostile arguments, the memory report and stage timing; and, at the end,
// what it does when CUDA fails under it (CudaEngineFaults, built only on tools/simt's emulated
// device, which can fail calls on cue). Every test but CudaEngineArgs.* skips without a GPU
// (bench/device_check.sh runs them on a lent one); CudaEngineArgs.CreateWithoutAGpuReportsNoDevice
// runs only without one.
//
// Models: the golden configurations of tests/golden/llm rebuilt at head_dim 64 (the fused
// attention has 64, 80, 96 and 128 only; see engine_test_util.h for what each one covers), each
// with an "open" Sysformer (every branch non-zero, weights scaled like nn.Linear's), and
// SmolLM2-135M-Instruct when weights/smollm2/ holds it.
//
// Tolerance, derived once for every GPU-vs-CPU comparison of logits.
//   The engine stores weights and activations in bf16 and accumulates in fp32; the CPU path is
//   fp32 throughout, so its own error (~1e-6, see test_llm_golden.cpp) is negligible here.
//   Rounding to bf16 moves a value by at most u = 2^-9 of itself (8 significant bits). In the
//   standard first-order model every rounding injects a relative perturbation <= u into the
//   vector it rounds, and what reaches the residual stream adds up over the sub-layers.
//   One residual sub-layer (x += f(norm(x))) rounds: the norm output, the first GEMM's weights
//   and output, the inner op's output (RoPE / attention, or the activation product), the second
//   GEMM's weights and output, and the residual add: seven roundings, but only the residual add
//   acts on the whole stream; the other six act on the branch, whose norm is at most about the
//   stream's for these models (weights with std 1/sqrt(fan_in), norm weights near 1) and whose
//   six errors are independent, so they add like sqrt(6) ~ 2.5 of them rather than 6. We count
//   3u per sub-layer (one for the residual add, two for the branch, a bound that is not tight
//   when the roundings are independent and that also absorbs the attention softmax's mild
//   amplification of score errors, |scores| = O(1) here).
//   An LLM layer has two sub-layers (attention, MLP): 6u per layer. A Sysformer layer has three
//   (self-attention, cross-attention, feed-forward): 9u per layer; its error reaches the logits
//   only through the system rows, so counting all of it is conservative. Plus the embedding
//   table's rounding (1u, which S, P and the LLM's other rows all carry) and the head: the
//   final RMSNorm's output and the LM head's weights (2u; the logits are fp32, not rounded).
//   Growth across layers is taken as additive: RMSNorm re-scales, it does not amplify.
//       logits, normwise relative:  b = u (6 L + 9 L_s + 3)
//   e.g. 2 LLM layers + 2 Sysformer layers: 33u = 0.064; SmolLM2 (30 + 2): 201u = 0.39.
//   S' alone (sf_cuda_guarded_embed), per request over its system rows: b_s = u (9 L_s + 1).
//   For scale, measured on the CPU: rounding only the weights to bf16 moves these models'
//   logits by 1.4-3.8u (SmolLM2: 1-2u), while leaving the Sysformer out moves the tiny models'
//   logits by 0.09-0.38 on the requests whose last row can see the system span (and a wrong
//   window alone moved the golden Mistral's by 0.9, see test_llm_golden.cpp).
//   Two bf16 paths (decode over the cache vs a fresh prefill, whose GEMMs have other row counts
//   and may get other cuBLASLt algorithms) are each within b of the same fp32 truth: 2b apart.
//
// Argmax. |g_i - c_i| <= ||g - c||_2 <= b ||c||_2 for every entry, so where the CPU's top-2
//   margin exceeds 2 b ||c||_2 the GPU must pick the same token: required. Within that the two
//   may differ without a bug, so nothing is required there. The device's greedy pick must be
//   exactly the first maximum of the logits it kept (sf_cuda_engine_read_logits): required.
//
// Determinism. Graph replay runs the same kernels with the same arguments as the eager path,
//   on the same shapes (so cuBLASLt's per-shape algorithm cache gives the same algorithm), with
//   no atomics in the reductions: its logits must equal the eager engine's bit for bit. The
//   same holds for repeating a step on the same engine (used to show that refused steps left
//   nothing behind).
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <string.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "cuda_test_util.h"
#include "engine_test_util.h"
#include "sampling.h"
#include "sysformer.h"

namespace {

using namespace sf_engine_test;

// The bounds derived above.
double logit_bound(int llm_layers, int sys_layers) {
    return kUbf16 * (6.0 * llm_layers + 9.0 * sys_layers + 3.0);
}
double splice_bound(int sys_layers) { return kUbf16 * (9.0 * sys_layers + 1.0); }

const sf_sampling kGreedy = {0.0f, 0, 1.0f, 0, false, 0};

struct EngineFree {
    void operator()(sf_cuda_engine *e) const { sf_cuda_engine_free(e); }
};
using EnginePtr = std::unique_ptr<sf_cuda_engine, EngineFree>;
struct SessionFree {
    void operator()(sf_cuda_session *s) const { sf_cuda_session_free(s); }
};
using SessionPtr = std::unique_ptr<sf_cuda_session, SessionFree>;

sf_cuda_engine_options options(int32_t max_slots, int32_t max_context = 0,
                               int32_t max_batch_tokens = 0, bool graphs = true) {
    sf_cuda_engine_options o = sf_cuda_engine_default_options();
    o.max_slots = max_slots;
    o.max_context = max_context;
    o.max_batch_tokens = max_batch_tokens;
    o.cuda_graphs = graphs;
    return o;
}

EnginePtr make_engine(const sf_llm *llm, const sf_sysformer *sf, const sf_cuda_engine_options &o) {
    sf_cuda_engine *e = nullptr;
    const sf_status st = sf_cuda_engine_create(llm, sf, &o, &e);
    EXPECT_EQ(st, SF_OK) << sf_status_string(st) << ": " << sf_last_error();
    return EnginePtr(st == SF_OK ? e : nullptr);
}

// What a step left: logits [n, vocab] and the n sampled tokens.
struct StepOut {
    std::vector<float> logits;
    std::vector<int32_t> tokens;
    const float *row(int32_t i, int64_t vocab) const { return logits.data() + (size_t)i * vocab; }
};

::testing::AssertionResult read_step(sf_cuda_engine *e, int32_t n, int64_t vocab, StepOut *out) {
    out->logits.assign((size_t)n * vocab, NAN);
    out->tokens.assign((size_t)n, -1);
    sf_status st = sf_cuda_engine_read_logits(e, out->logits.data(), n);
    if (st != SF_OK) {
        return ::testing::AssertionFailure()
               << "read_logits: " << sf_status_string(st) << ": " << sf_last_error();
    }
    st = sf_cuda_engine_read_tokens(e, out->tokens.data(), n);
    if (st != SF_OK) {
        return ::testing::AssertionFailure()
               << "read_tokens: " << sf_status_string(st) << ": " << sf_last_error();
    }
    return ::testing::AssertionSuccess();
}

// A prefill step over p's requests on the given slots (guarded: with p's spans), greedy; reads
// logits and tokens into out unless out is NULL.
::testing::AssertionResult prefill(sf_cuda_engine *e, const Prompts &p,
                                   const std::vector<int32_t> &slots, bool guarded, int64_t vocab,
                                   StepOut *out) {
    sf_cuda_step s = {};
    s.n_requests = p.n();
    s.slots = slots.data();
    s.cu_seqlens = p.cu.data();
    s.token_ids = p.ids.data();
    s.spans = guarded ? p.spans.data() : nullptr;
    s.sampling = &kGreedy;
    const sf_status st = sf_cuda_engine_step(e, &s);
    if (st != SF_OK) {
        return ::testing::AssertionFailure()
               << "prefill step: " << sf_status_string(st) << ": " << sf_last_error();
    }
    return out ? read_step(e, p.n(), vocab, out) : ::testing::AssertionSuccess();
}

// A greedy decode step on the given slots.
::testing::AssertionResult decode(sf_cuda_engine *e, const std::vector<int32_t> &slots,
                                  int64_t vocab, StepOut *out) {
    sf_cuda_step s = {};
    s.n_requests = (int32_t)slots.size();
    s.slots = slots.data();
    s.sampling = &kGreedy;
    const sf_status st = sf_cuda_engine_step(e, &s);
    if (st != SF_OK) {
        return ::testing::AssertionFailure()
               << "decode step: " << sf_status_string(st) << ": " << sf_last_error();
    }
    return out ? read_step(e, (int32_t)slots.size(), vocab, out) : ::testing::AssertionSuccess();
}

// sf_cuda_guarded_embed over p's requests from device copies of its arrays, on the legacy
// stream: the bf16 embeddings [total, d], or an empty vector (with a failure recorded).
std::vector<uint16_t> guarded_embed(sf_cuda_engine *e, const Prompts &p, int64_t d,
                                    int32_t max_system, int32_t max_user) {
    DeviceBuffer<int32_t> d_cu(p.cu), d_ids(p.ids), d_spans(flat_spans(p.spans));
    DeviceBuffer<uint16_t> d_out((size_t)p.total() * d);
    if (!d_cu.get() || !d_ids.get() || !d_spans.get() || !d_out.get()) {
        ADD_FAILURE() << "guarded_embed: device buffers";
        return {};
    }
    const sf_status st = sf_cuda_guarded_embed(e, p.n(), p.total(), d_cu.get(), d_ids.get(),
                                               (const sf_prompt_spans *)d_spans.get(),
                                               max_system, max_user, d_out.get(), nullptr,
                                               nullptr);
    if (st != SF_OK || cudaDeviceSynchronize() != cudaSuccess) {
        ADD_FAILURE() << "sf_cuda_guarded_embed: " << sf_status_string(st) << ": "
                      << sf_last_error();
        return {};
    }
    return d_out.host();
}

// One row of GPU logits against the CPU's: finite, within the normwise bound, the same argmax
// where the CPU's margin is beyond the bound's reach, and the device's greedy pick = argmax(gpu).
void expect_logits_close(const float *gpu, const float *cpu, int64_t vocab, double bound,
                         const std::string &what, const int32_t *sampled = nullptr) {
    ASSERT_TRUE(all_finite(gpu, vocab)) << what << ": NaN or inf in the GPU logits";
    const double rel = rel_error(gpu, cpu, (size_t)vocab);
    EXPECT_LE(rel, bound) << what << ": normwise relative error " << rel << ", bound " << bound;
    const Top2 c = top2(cpu, vocab), g = top2(gpu, vocab);
    if (c.margin > 2.0 * bound * norm2(cpu, vocab)) {
        EXPECT_EQ(g.id, c.id) << what << ": argmax differs though the CPU's margin " << c.margin
                              << " exceeds 2 b ||c|| = " << 2.0 * bound * norm2(cpu, vocab);
    }
    if (sampled) {
        EXPECT_EQ(*sampled, g.id) << what << ": the greedy pick is not the first maximum of the "
                                    "logits the engine kept";
    }
    if (getenv("SF_TEST_VERBOSE")) printf("  %-40s rel %.2e (bound %.2e)\n", what.c_str(), rel, bound);
}

// CPU KV caches, freed on scope exit.
struct CpuCaches {
    std::vector<sf_kv_cache *> kv;
    CpuCaches(const sf_llm *llm, int n, int32_t capacity) : kv((size_t)n, nullptr) {
        for (auto &c : kv) EXPECT_EQ(sf_kv_cache_create(llm, capacity, &c), SF_OK) << sf_last_error();
    }
    ~CpuCaches() {
        for (auto *c : kv) sf_kv_cache_free(c);
    }
};

// One CPU step over some requests' caches: n_i new tokens each (packed), logits of each
// request's last new row.
std::vector<float> cpu_step(const sf_llm *llm, const std::vector<sf_kv_cache *> &kv,
                            const std::vector<int32_t> &cu, const std::vector<int32_t> &ids) {
    const int64_t vocab = sf_llm_get_config(llm)->vocab_size;
    const int32_t n = (int32_t)kv.size();
    std::vector<int32_t> rows((size_t)n);
    for (int32_t r = 0; r < n; r++) rows[r] = cu[r + 1] - 1;
    sf_batch b = {n, cu.data(), ids.data(), nullptr, kv.data(), n, rows.data()};
    std::vector<float> out((size_t)n * vocab, NAN);
    EXPECT_EQ(sf_llm_forward_cpu(llm, &b, out.data()), SF_OK) << sf_last_error();
    return out;
}

void free_results(std::vector<sf_generation_result> *res) {
    for (auto &r : *res) sf_generation_result_free(&r);
}

// Frees lists of generation results on scope exit (whatever assertion returns first).
struct FreeResults {
    std::vector<std::vector<sf_generation_result> *> lists;
    ~FreeResults() {
        for (auto *l : lists) free_results(l);
    }
};

struct StreamLog {
    std::vector<std::vector<int32_t>> tokens;
};
bool record_stream(void *user, int32_t request, int32_t token, const char *, size_t) {
    auto *log = static_cast<StreamLog *>(user);
    if (request >= 0 && (size_t)request < log->tokens.size()) log->tokens[request].push_back(token);
    return true;
}

// log softmax(z)[t] over a row of V fp32 logits, in long double: the exact value to which the
// device's log-probabilities are compared.
double exact_logprob(const float *z, int64_t V, int32_t t) {
    long double m = z[0], sum = 0.0L;
    for (int64_t i = 1; i < V; i++) m = z[i] > m ? z[i] : m;
    for (int64_t i = 0; i < V; i++) sum += expl((long double)z[i] - m);
    return (double)(((long double)z[t] - m) - logl(sum));
}

// How far the engine's log-probability of token t may be from exact_logprob over the same fp32
// row: the engine takes it with sf_cuda_logprobs, whose arithmetic is the cross-entropy's loss
// with t as the target and weight 1 (kernels/loss.cu), and tests/test_cuda_backward.cpp
// derives that bound:
//   u (|M - z_t| + 2 log S + sum_i e^(z_i - M) (P + M - z_i) / S) + 2u |ref|,
// M the row's maximum, S = sum_i e^(z_i - M), P = n_t (VEC + 5) + 58 with n_t = ceil(V / VEC /
// 512) the chunks a thread reads. The larger of the two paths' P (VEC 1 and 8), so that the
// bound holds whichever the launcher took.
double logprob_bound(const float *z, int64_t V, int32_t t, double ref) {
    const double u = std::ldexp(1.0, -24);
    const double P = std::max(std::ceil(V / 512.0) * 6.0, std::ceil(V / 4096.0) * 13.0) + 58.0;
    double M = z[0];
    for (int64_t i = 1; i < V; i++) M = std::max(M, (double)z[i]);
    double S = 0.0, E = 0.0;
    for (int64_t i = 0; i < V; i++) {
        const double e = std::exp(z[i] - M);
        S += e;
        E += e * (P + (M - z[i]));
    }
    return u * (std::fabs(M - z[t]) + 2.0 * std::log(S) + E / S) + 2.0 * u * std::fabs(ref);
}

// Reads the last step's log-probabilities and checks each against exact_logprob over the
// step's own logits (o.logits, o.tokens: read_step's) within logprob_bound; with n_top, also
// its n_top most likely tokens a row: the ids exactly sf_top_logprobs's over the same logits
// (a selection by comparisons of the same fp32 values), each log-probability within its bound.
// Returns every value read, in order.
std::vector<float> expect_logprobs_of(sf_cuda_engine *e, const StepOut &o, int64_t vocab,
                                      const std::string &what, int32_t n_top = 0) {
    const int32_t n = (int32_t)o.tokens.size();
    std::vector<float> lp((size_t)n, NAN);
    const sf_status st = sf_cuda_engine_read_logprobs(e, lp.data(), n);
    EXPECT_EQ(st, SF_OK) << what << ": " << sf_last_error();
    if (st != SF_OK) return lp;
    for (int32_t r = 0; r < n; r++) {
        const double want = exact_logprob(o.row(r, vocab), vocab, o.tokens[r]);
        EXPECT_NEAR(lp[r], want, logprob_bound(o.row(r, vocab), vocab, o.tokens[r], want))
            << what << ", request " << r;
    }
    if (n_top == 0) return lp;
    std::vector<int32_t> ids((size_t)n * n_top, -2);
    std::vector<float> top((size_t)n * n_top, NAN);
    EXPECT_EQ(sf_cuda_engine_read_top_logprobs(e, ids.data(), top.data(), n, n_top), SF_OK)
        << what << ": " << sf_last_error();
    for (int32_t r = 0; r < n; r++) {
        std::vector<int32_t> want_ids(n_top);
        std::vector<float> want_lp(n_top);
        EXPECT_EQ(sf_top_logprobs(o.row(r, vocab), (int32_t)vocab, n_top, want_ids.data(),
                                  want_lp.data()),
                  SF_OK);
        EXPECT_EQ(std::vector<int32_t>(ids.begin() + (size_t)r * n_top,
                                       ids.begin() + (size_t)(r + 1) * n_top),
                  want_ids)
            << what << ", request " << r;
        for (int32_t j = 0; j < n_top; j++) {
            const double want = exact_logprob(o.row(r, vocab), vocab, want_ids[j]);
            EXPECT_NEAR(top[(size_t)r * n_top + j], want,
                        logprob_bound(o.row(r, vocab), vocab, want_ids[j], want))
                << what << ", request " << r << ", rank " << j;
        }
    }
    lp.insert(lp.end(), top.begin(), top.end());
    return lp;
}

// A step over the given slots (prefill of p, or decode when p is NULL) in which request r
// samples with set[r] and draw u[r]; reads logits and tokens into out.
::testing::AssertionResult sampled_step(sf_cuda_engine *e, const Prompts *p,
                                        const std::vector<int32_t> &slots,
                                        const std::vector<sf_sampling> &set,
                                        const std::vector<double> &u, int64_t vocab,
                                        StepOut *out) {
    sf_cuda_step s = {};
    s.n_requests = (int32_t)slots.size();
    s.slots = slots.data();
    if (p) {
        s.cu_seqlens = p->cu.data();
        s.token_ids = p->ids.data();
        s.spans = p->spans.data();
    }
    s.request_sampling = set.data();
    s.uniforms = u.data();
    const sf_status st = sf_cuda_engine_step(e, &s);
    if (st != SF_OK) {
        return ::testing::AssertionFailure()
               << "sampled step: " << sf_status_string(st) << ": " << sf_last_error();
    }
    return read_step(e, s.n_requests, vocab, out);
}

// What the engine must pick for each request of o: its row of logits given alone to the device
// sampler (sf_cuda_sample_f32) with its own setting and draw. The same kernels on the same
// logits, so the picks are exact; the sampler's own agreement with sf_sample is
// CudaSampling's to show.
std::vector<int32_t> device_picks(const StepOut &o, const std::vector<sf_sampling> &set,
                                  const std::vector<double> &u, int64_t vocab) {
    std::vector<int32_t> picks(set.size(), -1);
    const size_t ws_bytes = sf_cuda_sample_workspace_bytes(1, (int32_t)vocab);
    DeviceBuffer<uint64_t> ws(ws_bytes / 8 + 1);
    DeviceBuffer<int32_t> d_pick(1);
    for (size_t r = 0; r < set.size(); r++) {
        DeviceBuffer<float> d_row(std::vector<float>(o.row((int32_t)r, vocab),
                                                     o.row((int32_t)r, vocab) + vocab));
        DeviceBuffer<double> d_u(std::vector<double>{u[r]});
        const sf_status st = sf_cuda_sample_f32(d_pick.get(), d_row.get(), d_u.get(), 1,
                                                (int32_t)vocab, &set[r], ws.get(), ws_bytes,
                                                nullptr);
        EXPECT_EQ(st, SF_OK) << sf_last_error();
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        picks[r] = d_pick.host()[0];
    }
    return picks;
}

// A greedy generation of max_new tokens over p's requests, with their spans.
sf_generation generation_of(const Prompts &p, int32_t max_new) {
    sf_generation g = {};
    g.n_requests = p.n();
    g.cu_seqlens = p.cu.data();
    g.token_ids = p.ids.data();
    g.spans = p.spans.data();
    g.max_new_tokens = max_new;
    g.sampling = kGreedy;
    return g;
}

// sf_generate_cuda against sf_generate_cpu, greedy, max_new tokens per request, on slots 0..n-1.
//  1. Both finish every request by length; the stream callback saw exactly the GPU's tokens.
//  2. Replaying the same steps by hand (prefill + decodes, reading every step's logits d_j)
//     gives the same tokens bit for bit (same engine, same computation), and each token is the
//     first maximum of d_j.
//  3. d_j is within the bound of the CPU's logits c_j for the same prefix (the CPU's guarded
//     prefill and decode steps, fed the GPU's tokens).
//  4. The CPU's and the GPU's sequences agree token by token until the first position where
//     the CPU's top-2 margin is within 2 max|d_j - c_j| (plus 2e-4 max|c_j|, room for fp32
//     summation-order differences between that replay and sf_generate_cpu's own steps): past
//     such a near-tie they may part without a bug. Given 2-3 this cannot flake; it fails when
//     the generation loop or the sampler picks anything but the argmax of what it computed.
void check_generate(const sf_llm *llm, const sf_sysformer *sf, const sf_tokenizer *tok,
                    sf_cuda_engine *e, const Prompts &p, int32_t max_new, double bound) {
    const int64_t vocab = sf_llm_get_config(llm)->vocab_size;
    const int32_t n = p.n();
    sf_generation g = generation_of(p, max_new);
    g.sampling.logprobs = true;
    g.sampling.top_logprobs = 3;

    std::vector<sf_generation_result> gpu((size_t)n), cpu((size_t)n);
    StreamLog log;
    log.tokens.resize((size_t)n);
    ASSERT_EQ(sf_generate_cuda(e, tok, &g, record_stream, &log, gpu.data()), SF_OK)
        << sf_last_error();
    const sf_status cst = sf_generate_cpu(llm, sf, tok, &g, nullptr, nullptr, cpu.data());
    if (cst != SF_OK) free_results(&gpu);
    ASSERT_EQ(cst, SF_OK) << sf_last_error();
    const FreeResults free_all{{&gpu, &cpu}};

    for (int32_t r = 0; r < n; r++) {
        ASSERT_EQ(gpu[r].n_tokens, max_new) << "request " << r;
        ASSERT_EQ(cpu[r].n_tokens, max_new) << "request " << r;
        EXPECT_EQ(gpu[r].finish, SF_FINISH_LENGTH) << "request " << r;
        EXPECT_EQ(log.tokens[r], std::vector<int32_t>(gpu[r].tokens, gpu[r].tokens + max_new))
            << "request " << r << ": the stream callback saw other tokens";
        EXPECT_EQ(gpu[r].text != nullptr, tok != nullptr) << "request " << r;
        ASSERT_NE(gpu[r].logprobs, nullptr) << "request " << r;
        ASSERT_NE(cpu[r].logprobs, nullptr) << "request " << r;
        ASSERT_EQ(gpu[r].n_top, 3) << "request " << r;
        ASSERT_NE(gpu[r].top_ids, nullptr) << "request " << r;
    }

    // 2. The same steps by hand.
    std::vector<int32_t> slots((size_t)n);
    for (int32_t r = 0; r < n; r++) {
        slots[r] = r;
        ASSERT_EQ(sf_cuda_engine_reset_slot(e, r), SF_OK) << sf_last_error();
    }
    std::vector<StepOut> d((size_t)max_new);
    ASSERT_TRUE(prefill(e, p, slots, sf != nullptr, vocab, &d[0]));
    for (int32_t j = 1; j < max_new; j++) ASSERT_TRUE(decode(e, slots, vocab, &d[j]));
    for (int32_t r = 0; r < n; r++) {
        for (int32_t j = 0; j < max_new; j++) {
            EXPECT_EQ(d[j].tokens[r], gpu[r].tokens[j]) << "request " << r << " token " << j
                                                        << ": the replayed steps differ";
            EXPECT_EQ(d[j].tokens[r], top2(d[j].row(r, vocab), vocab).id)
                << "request " << r << " token " << j << ": not the greedy pick";
            // each log-probability is its token's under the step's own logits (the replay's
            // are the generation's bit for bit)
            const double own = exact_logprob(d[j].row(r, vocab), vocab, gpu[r].tokens[j]);
            EXPECT_NEAR(gpu[r].logprobs[j], own,
                        logprob_bound(d[j].row(r, vocab), vocab, gpu[r].tokens[j], own))
                << "request " << r << " token " << j;
            // and the most likely tokens: sf_top_logprobs's over those logits
            int32_t want_ids[3];
            float want_lp[3];
            ASSERT_EQ(sf_top_logprobs(d[j].row(r, vocab), (int32_t)vocab, 3, want_ids, want_lp),
                      SF_OK);
            EXPECT_EQ(std::vector<int32_t>(gpu[r].top_ids + 3 * j, gpu[r].top_ids + 3 * j + 3),
                      std::vector<int32_t>(want_ids, want_ids + 3))
                << "request " << r << " token " << j;
        }
    }

    // 3. The CPU's logits for the same prefixes, computed the way generation computes them: a
    // guarded prefill into caches, then decode steps fed the GPU's tokens. (Not one prefill of
    // the whole sequence: with longrope a request that crosses original_max while decoding
    // keeps short-factor keys in its cache, and a fresh prefill would not.)
    int32_t capacity = 0;
    for (int32_t r = 0; r < n; r++) capacity = std::max(capacity, p.len(r) + max_new);
    CpuCaches caches(llm, n, capacity);
    std::vector<std::vector<float>> c((size_t)max_new);
    {
        const std::vector<int32_t> rows = last_rows(p);
        sf_guarded_batch gb = {n, p.cu.data(), p.ids.data(), p.spans.data(), caches.kv.data(), n,
                               rows.data()};
        c[0].assign((size_t)n * vocab, NAN);
        ASSERT_EQ(sf_guarded_forward_cpu(llm, sf, &gb, c[0].data()), SF_OK) << sf_last_error();
        std::vector<int32_t> cu((size_t)n + 1);
        for (int32_t r = 0; r <= n; r++) cu[r] = r;
        for (int32_t j = 1; j < max_new; j++) {
            std::vector<int32_t> fed((size_t)n);
            for (int32_t r = 0; r < n; r++) fed[r] = gpu[r].tokens[j - 1];
            c[j] = cpu_step(llm, caches.kv, cu, fed);
        }
    }
    for (int32_t r = 0; r < n; r++) {
        for (int32_t j = 0; j < max_new; j++) {
            expect_logits_close(d[j].row(r, vocab), c[j].data() + (size_t)r * vocab, vocab, bound,
                                "request " + std::to_string(r) + " token " + std::to_string(j));
            // Against the CPU's logits: every entry is within bound ||c||_2 of the CPU's (the
            // normwise bound holds for the largest entry too), and log-sum-exp moves by at
            // most the largest change, so a log-probability by twice that; plus the device's
            // fp32 rounding.
            const float *cr = c[j].data() + (size_t)r * vocab;
            double norm = 0.0;
            for (int64_t i = 0; i < vocab; i++) norm += (double)cr[i] * cr[i];
            const double want = exact_logprob(cr, vocab, gpu[r].tokens[j]);
            EXPECT_NEAR(gpu[r].logprobs[j], want,
                        2.0 * bound * std::sqrt(norm) +
                            logprob_bound(cr, vocab, gpu[r].tokens[j], want))
                << "request " << r << " token " << j << ": against the CPU";
            for (int k = 0; k < 3; k++) {
                const int32_t id = gpu[r].top_ids[3 * j + k];
                const double ref = exact_logprob(cr, vocab, id);
                EXPECT_NEAR(gpu[r].top_logprobs[3 * j + k], ref,
                            2.0 * bound * std::sqrt(norm) + logprob_bound(cr, vocab, id, ref))
                    << "request " << r << " token " << j << " rank " << k << ": the CPU's";
            }
        }
    }

    // 4. CPU and GPU sequences up to the first near-tie.
    for (int32_t r = 0; r < n; r++) {
        int32_t decisive = 0;
        for (int32_t j = 0; j < max_new; j++) {
            const float *cj = c[j].data() + (size_t)r * vocab;
            const float *dj = d[j].row(r, vocab);
            double max_c = 0;
            for (int64_t i = 0; i < vocab; i++) max_c = std::max(max_c, std::fabs((double)cj[i]));
            const double tol = 2.0 * max_abs_diff(dj, cj, vocab) + 2e-4 * max_c;
            if (!(top2(cj, vocab).margin > tol)) break;
            EXPECT_EQ(gpu[r].tokens[j], cpu[r].tokens[j])
                << "request " << r << " token " << j << ": CPU margin " << top2(cj, vocab).margin
                << " > " << tol;
            if (gpu[r].tokens[j] != cpu[r].tokens[j]) break;
            decisive++;
        }
        ::testing::Test::RecordProperty("decisive_tokens_request_" + std::to_string(r), decisive);
        if (decisive == max_new && tok) {
            EXPECT_STREQ(gpu[r].text, cpu[r].text) << "request " << r;
        }
    }
}

// ------------------------------------------------------------------------------------------
// No GPU needed
// ------------------------------------------------------------------------------------------

// Argument checks that come before any device call, so they answer the same with or without a
// GPU.
TEST(CudaEngineArgs, RefusesBadArgumentsBeforeTouchingTheDevice) {
    ASSERT_TRUE(sf_cuda_built());
    const sf_cuda_engine_options d = sf_cuda_engine_default_options();
    EXPECT_EQ(d.device, 0);
    EXPECT_EQ(d.max_slots, 8);
    EXPECT_EQ(d.max_context, 0);
    EXPECT_EQ(d.max_batch_tokens, 0);
    EXPECT_TRUE(d.cuda_graphs);
    EXPECT_EQ(d.attention, SF_ATTENTION_AUTO);

    TempDir dir;
    ASSERT_TRUE(write_llm_variant("llama_gqa_llama3", dir.path(), 17));
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(dir.path().c_str(), &llm), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> llm_guard(llm, sf_llm_free);

    sf_cuda_engine *e = nullptr;
    EXPECT_EQ(sf_cuda_engine_create(nullptr, nullptr, &d, &e), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(e, nullptr);
    EXPECT_EQ(sf_cuda_engine_create(llm, nullptr, &d, nullptr), SF_ERR_INVALID_ARGUMENT);
    const sf_llm_config *cfg = sf_llm_get_config(llm);
    EXPECT_EQ(sf_cuda_engine_create_random(nullptr, nullptr, 1, &d, &e), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(e, nullptr);
    EXPECT_EQ(sf_cuda_engine_create_random(cfg, nullptr, 1, &d, nullptr), SF_ERR_INVALID_ARGUMENT);
    e = reinterpret_cast<sf_cuda_engine *>(&e);  // anything but NULL
    EXPECT_EQ(sf_cuda_engine_create_sharing(nullptr, nullptr, &d, &e), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(e, nullptr);
    sf_cuda_engine_options bad = d;
    bad.attention = static_cast<sf_attention_kernel>(4);  // not a kernel
    EXPECT_EQ(sf_cuda_engine_create(llm, nullptr, &bad, &e), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(e, nullptr);

    sf_cuda_step step = {};
    int32_t slot = 0, tok = 0;
    float logit = 0;
    step.n_requests = 1;
    step.slots = &slot;
    EXPECT_EQ(sf_cuda_engine_step(nullptr, &step), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_read_tokens(nullptr, &tok, 1), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_read_logits(nullptr, &logit, 1), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_reset_slot(nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_set_timing(nullptr, true), SF_ERR_INVALID_ARGUMENT);
    sf_cuda_stage_times times;
    EXPECT_EQ(sf_cuda_engine_stage_times(nullptr, &times), SF_ERR_INVALID_ARGUMENT);
    sf_cuda_memory mem;
    EXPECT_EQ(sf_cuda_engine_memory(nullptr, &mem), SF_ERR_INVALID_ARGUMENT);
    sf_cuda_engine_free(nullptr);  // a no-op

    int32_t cu[2] = {0, 1}, ids[1] = {5};
    sf_generation g = {};
    g.n_requests = 1;
    g.cu_seqlens = cu;
    g.token_ids = ids;
    g.max_new_tokens = 1;
    sf_generation_result res;
    EXPECT_EQ(sf_generate_cuda(nullptr, nullptr, &g, nullptr, nullptr, &res),
              SF_ERR_INVALID_ARGUMENT);
    int err = 0;
    uint16_t out[64];
    EXPECT_EQ(sf_cuda_guarded_embed(nullptr, 1, 1, cu, ids, nullptr, 0, 0, out, &err, nullptr),
              SF_ERR_INVALID_ARGUMENT);

    sf_cuda_session *s = nullptr;
    EXPECT_EQ(sf_cuda_session_create(nullptr, nullptr, nullptr, 0, nullptr, 0, &s),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(s, nullptr);
    int32_t id = -1, running = -1;
    bool done = false;
    EXPECT_EQ(sf_cuda_session_submit(nullptr, ids, 1, nullptr, nullptr, 1, &id),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_step(nullptr, nullptr, nullptr, &running, nullptr),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_cancel(nullptr, 0), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_take(nullptr, 0, &res, &done), SF_ERR_INVALID_ARGUMENT);
    sf_cuda_session_free(nullptr);  // a no-op
}

// Without a GPU a well-formed create reports the missing device with the status sysformer.h
// defines for it (SF_ERR_NO_DEVICE: "CUDA support not built in, or no usable GPU present") and
// hands back nothing. Runs only where there is no GPU (CI).
TEST(CudaEngineArgs, CreateWithoutAGpuReportsNoDevice) {
    int count = 0;
    ASSERT_EQ(sf_cuda_device_count(&count), SF_OK);
    if (count > 0) GTEST_SKIP() << "a GPU is present";
    TempDir dir;
    ASSERT_TRUE(write_llm_variant("llama_gqa_llama3", dir.path(), 17));
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(dir.path().c_str(), &llm), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> llm_guard(llm, sf_llm_free);
    const sf_cuda_engine_options d = sf_cuda_engine_default_options();
    sf_cuda_engine *e = nullptr;
    EXPECT_EQ(sf_cuda_engine_create(llm, nullptr, &d, &e), SF_ERR_NO_DEVICE) << sf_last_error();
    EXPECT_EQ(e, nullptr);
    EXPECT_EQ(sf_cuda_engine_create_random(sf_llm_get_config(llm), nullptr, 1, &d, &e),
              SF_ERR_NO_DEVICE)
        << sf_last_error();
    EXPECT_EQ(e, nullptr);
}

// ------------------------------------------------------------------------------------------
// The golden configurations at head_dim 64, each with an open Sysformer
// ------------------------------------------------------------------------------------------

class CudaEngineVariant : public ::testing::TestWithParam<std::string> {
  protected:
    void SetUp() override {
        if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
        ASSERT_TRUE(write_llm_variant(GetParam(), dir_.path(), 17));
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        ASSERT_TRUE(make_open_sysformer(llm_, 5, &sf_));
        cfg_ = sf_llm_get_config(llm_);
        vocab_ = cfg_->vocab_size;
        L_ = cfg_->num_layers;
        Ls_ = sf_sysformer_get_config(sf_)->num_layers;
    }
    void TearDown() override {
        sf_sysformer_free(sf_);
        sf_llm_free(llm_);
    }

    // Four requests of 15, 16, 29 and 12 tokens (72 in all): system spans of 5, 1, 12 and 0
    // rows (the last has nothing to rewrite), user spans of 2, 7, 9 and 4. With longrope's
    // original_max 16 the first two stay on the short factors (16 is not > 16), the third
    // is long; with the window of 8 the longer requests lose their first keys.
    static Prompts four_prompts(uint64_t seed) {
        return tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {0, 4}}, seed);
    }

    // The rounds a session ran (got[r]: the tokens it gave request r; every request ending by
    // its limit), replayed by hand on e with engine steps under the session's rule: the running
    // requests' next tokens first, then, while a slot is free and the step's budget holds, the
    // prompts that have arrived (arrive[r]: the round before which request r was submitted),
    // first come, first served; a round with nothing to run runs nothing. Checked round by
    // round: each token the session's, each pick the device sampler's from the step's own
    // logits, each row within the derived bound of the CPU's (each request alone, with its own
    // cache). *mixed: the rounds that started a prompt beside running requests.
    void replay_rounds(sf_cuda_engine *e, const Prompts &p, const std::vector<int32_t> &limit,
                       const std::vector<sf_sampling> &set, const std::vector<int32_t> &arrive,
                       const std::vector<std::vector<int32_t>> &got, int32_t slots,
                       int32_t budget, int32_t *mixed) {
        const int32_t n = p.n();
        const double b = logit_bound(L_, Ls_);
        std::vector<std::unique_ptr<CpuCaches>> cpu((size_t)n);
        std::vector<std::vector<int32_t>> fed((size_t)n);
        std::vector<int32_t> slot_of((size_t)n, -1), free_slots;
        std::vector<uint64_t> stream((size_t)n);
        for (int32_t r = 0; r < n; r++) stream[r] = set[r].seed;
        for (int32_t k = slots - 1; k >= 0; k--) {
            ASSERT_EQ(sf_cuda_engine_reset_slot(e, k), SF_OK);
            free_slots.push_back(k);
        }
        *mixed = 0;
        int32_t waiting = 0;
        for (int32_t round = 0;; round++) {
            std::vector<int32_t> req;
            for (int32_t r = 0; r < waiting; r++) {
                if ((int32_t)fed[r].size() < limit[r]) req.push_back(r);
            }
            const size_t running = req.size();
            int32_t tokens = (int32_t)running, max_sys = 0, max_usr = 0;
            while (waiting < n && arrive[waiting] <= round && !free_slots.empty()) {
                const int32_t ms = std::max(max_sys, p.spans[waiting].system);
                const int32_t mu = std::max(max_usr, p.spans[waiting].user);
                const int32_t m = (int32_t)req.size() + 1;
                if (tokens + p.len(waiting) > budget || m * ms > budget || m * mu > budget) break;
                slot_of[waiting] = free_slots.back();
                free_slots.pop_back();
                ASSERT_EQ(sf_cuda_engine_reset_slot(e, slot_of[waiting]), SF_OK);
                req.push_back(waiting);
                tokens += p.len(waiting);
                max_sys = ms;
                max_usr = mu;
                waiting++;
            }
            if (req.empty()) {
                if (waiting == n) break;
                continue;  // nothing has arrived to run
            }
            std::vector<int32_t> step_slots;
            std::vector<sf_sampling> step_set;
            std::vector<double> u;
            for (int32_t r : req) {
                step_slots.push_back(slot_of[r]);
                step_set.push_back(set[r]);
                double x = 0.0;
                if (set[r].temperature > 0.0f) {
                    sf_rng rng = sf_rng_seed(stream[r]);
                    x = sf_rng_uniform(&rng);
                    stream[r] = rng.state;
                }
                u.push_back(x);
            }
            StepOut out;
            if (req.size() > running) {
                Prompts step;
                for (size_t i = 0; i < req.size(); i++) {
                    const int32_t r = req[i];
                    if (i < running) {
                        step.add({fed[r].back()}, sf_prompt_spans{0, 0, 0, 0, 1});
                    } else {
                        step.add(p.request(r), p.spans[r]);
                    }
                }
                *mixed += running > 0;
                ASSERT_TRUE(sampled_step(e, &step, step_slots, step_set, u, vocab_, &out));
            } else {
                ASSERT_TRUE(sampled_step(e, nullptr, step_slots, step_set, u, vocab_, &out));
            }
            EXPECT_EQ(out.tokens, device_picks(out, step_set, u, vocab_)) << "round " << round;
            for (size_t i = 0; i < req.size(); i++) {
                const int32_t r = req[i], j = (int32_t)fed[r].size();
                const std::string what = "request " + std::to_string(r) + " token " +
                                         std::to_string(j);
                ASSERT_LT(j, (int32_t)got[r].size()) << what;
                EXPECT_EQ(out.tokens[i], got[r][j]) << what << ": the replayed round differs";
                std::vector<float> c;
                if (i >= running) {
                    cpu[r] = std::make_unique<CpuCaches>(llm_, 1, 128);
                    const Prompts single = p.only(r);
                    c = cpu_guarded_logits(llm_, sf_, single, last_rows(single),
                                           cpu[r]->kv.data());
                } else {
                    c = cpu_step(llm_, cpu[r]->kv, {0, 1}, {fed[r].back()});
                }
                const bool greedy = !(set[r].temperature > 0.0f);
                expect_logits_close(out.row((int32_t)i, vocab_), c.data(), vocab_, b, what,
                                    greedy ? &out.tokens[i] : nullptr);
                fed[r].push_back(out.tokens[i]);
                if ((int32_t)fed[r].size() == limit[r]) free_slots.push_back(slot_of[r]);
            }
        }
        for (int32_t r = 0; r < n; r++) EXPECT_EQ(fed[r], got[r]) << "request " << r;
    }

    TempDir dir_;
    sf_llm *llm_ = nullptr;
    sf_sysformer *sf_ = nullptr;
    const sf_llm_config *cfg_ = nullptr;
    int64_t vocab_ = 0;
    int L_ = 0, Ls_ = 0;
};

// 1. A packed guarded prefill (four requests on scattered slots) against sf_guarded_forward_cpu;
// then the same prompts unguarded (spans NULL) against the plain model.
TEST_P(CudaEngineVariant, GuardedPrefillMatchesCpu) {
    EnginePtr e = make_engine(llm_, sf_, options(4));
    ASSERT_TRUE(e);
    const Prompts p = four_prompts(3);
    const std::vector<int32_t> slots = {1, 3, 0, 2};
    for (int32_t s = 0; s < 4; s++) EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), s), 0);

    StepOut out;
    ASSERT_TRUE(prefill(e.get(), p, slots, true, vocab_, &out));
    const double b = logit_bound(L_, Ls_);
    const std::vector<float> cpu = cpu_guarded_logits(llm_, sf_, p, last_rows(p));
    for (int32_t r = 0; r < p.n(); r++) {
        expect_logits_close(out.row(r, vocab_), cpu.data() + (size_t)r * vocab_, vocab_, b,
                            "guarded request " + std::to_string(r), &out.tokens[r]);
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), slots[r]), p.len(r)) << "request " << r;
    }

    for (int32_t s = 0; s < 4; s++) {
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), s), SF_OK) << sf_last_error();
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), s), 0);
    }
    ASSERT_TRUE(prefill(e.get(), p, slots, false, vocab_, &out));
    const std::vector<float> plain = cpu_guarded_logits(llm_, nullptr, p, last_rows(p));
    for (int32_t r = 0; r < p.n(); r++) {
        expect_logits_close(out.row(r, vocab_), plain.data() + (size_t)r * vocab_, vocab_,
                            logit_bound(L_, 0), "unguarded request " + std::to_string(r),
                            &out.tokens[r]);
    }
}

// 2. sf_cuda_guarded_embed on caller-owned device buffers and the caller's stream, against
// sf_guarded_embed_cpu; then hostile device inputs (bad ids, spans, offsets, bounds), which are
// counted in d_errors, not faulted, and named request by request by sf_cuda_guard_check.
TEST_P(CudaEngineVariant, GuardedEmbedMatchesCpuAndCountsBadInputs) {
    EnginePtr e = make_engine(llm_, sf_, options(4));  // max_batch_tokens = max_context = 128
    ASSERT_TRUE(e);
    const int64_t d = cfg_->hidden_size;
    const Prompts p = four_prompts(4);
    const int32_t n = p.n(), total = p.total();

    // A step first, to show afterwards that the embed left the engine as it was.
    StepOut ref;
    ASSERT_TRUE(prefill(e.get(), p, {0, 1, 2, 3}, true, vocab_, &ref));

    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    std::unique_ptr<CUstream_st, cudaError_t (*)(cudaStream_t)> stream_guard(stream,
                                                                            cudaStreamDestroy);
    static_assert(sizeof(sf_prompt_spans) == 5 * sizeof(int32_t), "spans are five int32");

    // --- Valid batch.
    DeviceBuffer<int32_t> d_cu(p.cu), d_ids(p.ids), d_spans(flat_spans(p.spans));
    DeviceBuffer<uint16_t> d_out((size_t)total * d);  // NaN-poisoned: unwritten rows show
    DeviceBuffer<int> d_err(1);
    ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_out.get() && d_err.get());
    ASSERT_EQ(cudaMemset(d_err.get(), 0, sizeof(int)), cudaSuccess);
    int32_t max_system = 0, max_user = 0;
    for (const auto &s : p.spans) {
        max_system = std::max(max_system, s.system);
        max_user = std::max(max_user, s.user);
    }
    ASSERT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(),
                                    (const sf_prompt_spans *)d_spans.get(), max_system, max_user,
                                    d_out.get(), d_err.get(), stream),
              SF_OK)
        << sf_last_error();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(d_err.host()[0], 0);
    // sf_cuda_guard_check's per-request reasons for a batch (device arrays), on the stream
    auto check_flags = [&](sf_cuda_engine *eng, const Prompts &b, const int32_t *cu,
                           const int32_t *ids, const int32_t *spans, int32_t ms, int32_t mu) {
        DeviceBuffer<int32_t> d_flags((size_t)b.n());
        EXPECT_EQ(sf_cuda_guard_check(eng, b.n(), b.total(), cu, ids,
                                      (const sf_prompt_spans *)spans, ms, mu, d_flags.get(),
                                      stream),
                  SF_OK)
            << sf_last_error();
        EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        return d_flags.host();
    };
    EXPECT_EQ(check_flags(e.get(), p, d_cu.get(), d_ids.get(), d_spans.get(), max_system,
                          max_user),
              std::vector<int32_t>(4, 0))
        << "a valid batch flagged";

    std::vector<float> want((size_t)total * d);
    sf_guarded_batch gb = {n, p.cu.data(), p.ids.data(), p.spans.data(), nullptr, 0, nullptr};
    ASSERT_EQ(sf_guarded_embed_cpu(llm_, sf_, &gb, want.data()), SF_OK) << sf_last_error();
    std::vector<float> plain((size_t)total * d);
    ASSERT_EQ(sf_llm_embed(llm_, p.ids.data(), total, plain.data()), SF_OK);
    const std::vector<uint16_t> got = d_out.host();
    const double bs = splice_bound(Ls_);
    for (int32_t r = 0; r < n; r++) {
        const sf_prompt_spans &s = p.spans[r];
        const int32_t sys0 = p.cu[r] + s.prefix, sys1 = sys0 + s.system;
        // Rows outside the system span are E[token] rounded once (to nearest even).
        int64_t mismatches = 0;
        for (int32_t row = p.cu[r]; row < p.cu[r + 1]; row++) {
            if (row >= sys0 && row < sys1) continue;
            for (int64_t k = 0; k < d; k++)
                mismatches += got[(size_t)row * d + k] != to_bf16(want[(size_t)row * d + k]);
        }
        EXPECT_EQ(mismatches, 0) << "request " << r << ": rows outside the system span";
        if (s.system == 0) continue;
        const size_t off = (size_t)sys0 * d, len = (size_t)s.system * d;
        std::vector<float> g(len);
        for (size_t k = 0; k < len; k++) g[k] = from_bf16(got[off + k]);
        ASSERT_TRUE(all_finite(g.data(), (int64_t)len)) << "request " << r;
        const double rel = rel_error(g.data(), want.data() + off, len);
        EXPECT_LE(rel, bs) << "request " << r << ": S' normwise relative error, bound " << bs;
        // The test has teeth: the Sysformer moves S far beyond the bound.
        EXPECT_GT(rel_error(plain.data() + off, want.data() + off, len), 10 * bs) << "request " << r;
    }

    // --- Hostile device inputs. Request 0: valid. Request 1: valid spans, but its last token
    // (in the suffix) is outside the vocabulary: that row is zeros, counted once. Request 2:
    // spans that do not add up (suffix one too long), and a first token of -1: both counted,
    // and the request's rows are plain E[token] (zeros for the bad id). Request 3: request 2's
    // valid layout, but its system span (12) exceeds max_system (7): counted, rows plain.
    // d_errors = 1 + 2 + 1 = 4.
    Prompts h;
    std::vector<int32_t> t1 = p.request(1), t2 = p.request(2);
    h.add(p.request(0), p.spans[0]);
    t1.back() = (int32_t)vocab_;
    h.add(t1, p.spans[1]);
    sf_prompt_spans bad = p.spans[2];
    bad.suffix += 1;
    t2[0] = -1;
    h.add(t2, bad);
    h.add(p.request(2), p.spans[2]);
    const int32_t h_max_system = 7, h_max_user = 9;
    DeviceBuffer<int32_t> h_cu(h.cu), h_ids(h.ids), h_spans(flat_spans(h.spans));
    DeviceBuffer<uint16_t> h_out((size_t)h.total() * d);
    ASSERT_TRUE(h_cu.get() && h_ids.get() && h_spans.get() && h_out.get());
    ASSERT_EQ(cudaMemset(d_err.get(), 0, sizeof(int)), cudaSuccess);
    ASSERT_EQ(sf_cuda_guarded_embed(e.get(), h.n(), h.total(), h_cu.get(), h_ids.get(),
                                    (const sf_prompt_spans *)h_spans.get(), h_max_system,
                                    h_max_user, h_out.get(), d_err.get(), stream),
              SF_OK)
        << sf_last_error();
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << "the hostile batch faulted";
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(d_err.host()[0], 4);
    EXPECT_EQ(check_flags(e.get(), h, h_cu.get(), h_ids.get(), h_spans.get(), h_max_system,
                          h_max_user),
              (std::vector<int32_t>{
                  0, SF_GUARD_BAD_TOKEN,
                  SF_GUARD_BAD_SPANS | SF_GUARD_TOO_LONG | SF_GUARD_BAD_TOKEN,  // system 12 > 7
                  SF_GUARD_TOO_LONG}))
        << "the hostile batch's reasons";
    {
        // without a Sysformer the spans are not read: only the bad ids count
        EnginePtr plain_e = make_engine(llm_, nullptr, options(4));
        ASSERT_TRUE(plain_e);
        EXPECT_EQ(check_flags(plain_e.get(), h, h_cu.get(), h_ids.get(), h_spans.get(),
                              h_max_system, h_max_user),
                  (std::vector<int32_t>{0, SF_GUARD_BAD_TOKEN, SF_GUARD_BAD_TOKEN, 0}));
    }
    const std::vector<uint16_t> hg = h_out.host();
    for (int32_t r = 0; r < h.n(); r++) {
        const bool rewritten = r < 2;  // requests 0 and 1 are valid
        const sf_prompt_spans &s = h.spans[r];
        const int32_t sys0 = h.cu[r] + s.prefix, sys1 = sys0 + s.system;
        int64_t mismatches = 0;
        for (int32_t row = h.cu[r]; row < h.cu[r + 1]; row++) {
            if (rewritten && row >= sys0 && row < sys1) continue;
            const int32_t id = h.ids[row];
            std::vector<float> e_row((size_t)d, 0.0f);
            if (id >= 0 && id < vocab_) {
                ASSERT_EQ(sf_llm_embed(llm_, &id, 1, e_row.data()), SF_OK);
            }
            for (int64_t k = 0; k < d; k++)
                mismatches += hg[(size_t)row * d + k] != to_bf16(e_row[(size_t)k]);
        }
        EXPECT_EQ(mismatches, 0) << "hostile request " << r << ": plain rows";
        if (!rewritten) continue;
        // The valid requests' S' is what the valid batch's CPU reference gave (their system
        // and user rows are requests 0 and 1 of p).
        const size_t len = (size_t)s.system * d, off_h = (size_t)sys0 * d;
        const size_t off_p = (size_t)(p.cu[r] + p.spans[r].prefix) * d;
        std::vector<float> g(len);
        for (size_t k = 0; k < len; k++) g[k] = from_bf16(hg[off_h + k]);
        EXPECT_LE(rel_error(g.data(), want.data() + off_p, len), bs) << "hostile request " << r;
    }

    // --- Host-side refusals: nothing is enqueued and d_errors is untouched. The header names
    // the checks but not their status; the step's own checks use SF_ERR_OUT_OF_RANGE for sizes.
    auto is_refusal = [](sf_status st) {
        return st == SF_ERR_OUT_OF_RANGE || st == SF_ERR_INVALID_ARGUMENT;
    };
    EXPECT_PRED1(is_refusal, sf_cuda_guarded_embed(e.get(), 5, total, d_cu.get(), d_ids.get(),
                                                   (const sf_prompt_spans *)d_spans.get(), 12, 9,
                                                   d_out.get(), d_err.get(), stream))
        << "more requests than max_slots (4)";
    EXPECT_PRED1(is_refusal, sf_cuda_guarded_embed(e.get(), n, 129, d_cu.get(), d_ids.get(),
                                                   (const sf_prompt_spans *)d_spans.get(), 12, 9,
                                                   d_out.get(), d_err.get(), stream))
        << "more tokens than max_batch_tokens (128)";
    EXPECT_PRED1(is_refusal, sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(),
                                                   (const sf_prompt_spans *)d_spans.get(), 33, 9,
                                                   d_out.get(), d_err.get(), stream))
        << "max_system x n_requests = 132 > max_batch_tokens";
    EXPECT_PRED1(is_refusal, sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(),
                                                   (const sf_prompt_spans *)d_spans.get(), 12, 33,
                                                   d_out.get(), d_err.get(), stream))
        << "max_user x n_requests = 132 > max_batch_tokens";
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(),
                                    (const sf_prompt_spans *)d_spans.get(), 12, 9, nullptr,
                                    d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, nullptr, d_ids.get(),
                                    (const sf_prompt_spans *)d_spans.get(), 12, 9, d_out.get(),
                                    d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), -1, total, d_cu.get(), d_ids.get(),
                                    (const sf_prompt_spans *)d_spans.get(), 12, 9, d_out.get(),
                                    d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    // An int array off its 4-byte alignment (a corrupt offset: on a GPU, a misaligned-address
    // fault that would end the stack's context) is refused, each argument in turn.
    const auto off2 = [](const void *p) {
        return reinterpret_cast<const char *>(p) + 2;
    };
    const int32_t *cu2 = (const int32_t *)off2(d_cu.get());
    const int32_t *ids2 = (const int32_t *)off2(d_ids.get());
    const sf_prompt_spans *spans2 = (const sf_prompt_spans *)off2(d_spans.get());
    int *err2 = (int *)off2(d_err.get());
    const sf_prompt_spans *spans0 = (const sf_prompt_spans *)d_spans.get();
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, cu2, d_ids.get(), spans0, 12, 9,
                                    d_out.get(), d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), ids2, spans0, 12, 9,
                                    d_out.get(), d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(), spans2, 12, 9,
                                    d_out.get(), d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(), spans0, 12, 9,
                                    d_out.get(), err2, stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_TRUE(strstr(sf_last_error(), "4-byte")) << sf_last_error();
    EXPECT_EQ(sf_cuda_guard_check(e.get(), n, total, cu2, d_ids.get(), spans0, 12, 9,
                                  (int32_t *)d_err.get(), stream),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_guard_check(e.get(), n, total, d_cu.get(), d_ids.get(), spans0, 12, 9,
                                  (int32_t *)err2, stream),
              SF_ERR_INVALID_ARGUMENT);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    EXPECT_EQ(d_err.host()[0], 4);

    // --- Hostile offsets. cu_seqlens is device memory, which the host cannot check. Request 0
    // claims to start 1000 rows before the batch and request 3 to end 1000 rows after it; each
    // has a prefix 1000 tokens longer, so its spans still add up. Request 3's system and user
    // rows would then lie past the end of the buffers. Both requests are counted and left
    // plain: no row outside the batch is read or written. Requests 1 and 2 are rewritten as in
    // the valid batch.
    {
        std::vector<int32_t> cu = p.cu;
        std::vector<sf_prompt_spans> sp = p.spans;
        cu[0] -= 1000;
        sp[0].prefix += 1000;
        cu[4] += 1000;
        sp[3].prefix += 1000;
        DeviceBuffer<int32_t> o_cu(cu), o_spans(flat_spans(sp));
        DeviceBuffer<uint16_t> o_out((size_t)total * d);
        ASSERT_TRUE(o_cu.get() && o_spans.get() && o_out.get());
        ASSERT_EQ(cudaMemset(d_err.get(), 0, sizeof(int)), cudaSuccess);
        ASSERT_EQ(sf_cuda_guarded_embed(e.get(), n, total, o_cu.get(), d_ids.get(),
                                        (const sf_prompt_spans *)o_spans.get(), max_system,
                                        max_user, o_out.get(), d_err.get(), stream),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess) << "hostile offsets faulted";
        EXPECT_EQ(d_err.host()[0], 2);
        EXPECT_EQ(check_flags(e.get(), p, o_cu.get(), d_ids.get(), o_spans.get(), max_system,
                              max_user),
                  (std::vector<int32_t>{SF_GUARD_BAD_OFFSETS, 0, 0, SF_GUARD_BAD_OFFSETS}));
        const std::vector<uint16_t> og = o_out.host();
        for (int32_t r = 0; r < n; r++) {
            const bool rewritten = r == 1 || r == 2;
            const int32_t sys0 = p.cu[r] + p.spans[r].prefix, sys1 = sys0 + p.spans[r].system;
            int64_t mismatches = 0;
            for (int32_t row = p.cu[r]; row < p.cu[r + 1]; row++) {
                if (rewritten && row >= sys0 && row < sys1) continue;
                for (int64_t k = 0; k < d; k++)
                    mismatches += og[(size_t)row * d + k] != to_bf16(plain[(size_t)row * d + k]);
            }
            EXPECT_EQ(mismatches, 0) << "hostile offsets, request " << r << ": plain rows";
            if (!rewritten) continue;
            const size_t off = (size_t)sys0 * d, len = (size_t)p.spans[r].system * d;
            std::vector<float> g(len);
            for (size_t k = 0; k < len; k++) g[k] = from_bf16(og[off + k]);
            EXPECT_LE(rel_error(g.data(), want.data() + off, len), bs)
                << "hostile offsets, request " << r;
        }
    }

    // --- max_system 0 while three requests have a system span (5, 1 and 12 tokens): nothing is
    // rewritten, and those three are counted (their spans exceed the bound), not passed over.
    {
        DeviceBuffer<uint16_t> z_out((size_t)total * d);
        ASSERT_TRUE(z_out.get());
        ASSERT_EQ(cudaMemset(d_err.get(), 0, sizeof(int)), cudaSuccess);
        ASSERT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(),
                                        (const sf_prompt_spans *)d_spans.get(), 0, max_user,
                                        z_out.get(), d_err.get(), stream),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        EXPECT_EQ(d_err.host()[0], 3);
        const std::vector<uint16_t> zg = z_out.host();
        int64_t mismatches = 0;
        for (size_t k = 0; k < zg.size(); k++) mismatches += zg[k] != to_bf16(plain[k]);
        EXPECT_EQ(mismatches, 0) << "max_system 0: every row plain";
        EXPECT_EQ(check_flags(e.get(), p, d_cu.get(), d_ids.get(), d_spans.get(), 0, max_user),
                  (std::vector<int32_t>{SF_GUARD_TOO_LONG, SF_GUARD_TOO_LONG, SF_GUARD_TOO_LONG,
                                        0}));
    }

    // The engine's own steps are unaffected.
    for (int32_t s = 0; s < 4; s++) ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), s), SF_OK);
    StepOut again;
    ASSERT_TRUE(prefill(e.get(), p, {0, 1, 2, 3}, true, vocab_, &again));
    EXPECT_EQ(again.tokens, ref.tokens);
    EXPECT_EQ(0, memcmp(again.logits.data(), ref.logits.data(), ref.logits.size() * sizeof(float)))
        << "a repeated step after sf_cuda_guarded_embed differs";
}

// 3. Decode over the KV slots, with requests joining, pausing and changing order between
// steps, against the CPU's decode over its caches (fed the tokens the GPU sampled) after every
// step, and the final logits against a fresh prefill of each whole sequence in other slots.
TEST_P(CudaEngineVariant, DecodeWithTheKvCacheMatchesRecomputation) {
    EnginePtr e = make_engine(llm_, sf_, options(6));
    ASSERT_TRUE(e);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}}, 11);  // 15, 16, 29 tokens
    const std::vector<int32_t> slot_of = {3, 0, 2};
    const double b = logit_bound(L_, Ls_);

    StepOut pre;
    ASSERT_TRUE(prefill(e.get(), p, slot_of, true, vocab_, &pre));
    CpuCaches cpu(llm_, 3, 128);
    const std::vector<float> cl = cpu_guarded_logits(llm_, sf_, p, last_rows(p), cpu.kv.data());
    std::vector<std::vector<int32_t>> sampled(3), fed(3);
    std::vector<std::vector<float>> last(3);
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(pre.row(r, vocab_), cl.data() + (size_t)r * vocab_, vocab_, b,
                            "prefill request " + std::to_string(r), &pre.tokens[r]);
        sampled[r].push_back(pre.tokens[r]);
        last[r].assign(pre.row(r, vocab_), pre.row(r, vocab_) + vocab_);
    }

    // Batch sizes 3, 2, 1 and 3 again in another order; request 1 sits out steps 3-4.
    const std::vector<std::vector<int32_t>> schedule = {{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {2, 0},
                                                        {2, 0},    {1},       {1, 2, 0}};
    for (size_t k = 0; k < schedule.size(); k++) {
        const std::vector<int32_t> &reqs = schedule[k];
        const int32_t m = (int32_t)reqs.size();
        std::vector<int32_t> slots, toks, cu = {0};
        std::vector<sf_kv_cache *> kv;
        for (int32_t r : reqs) {
            slots.push_back(slot_of[r]);
            toks.push_back(sampled[r].back());
            cu.push_back(cu.back() + 1);
            kv.push_back(cpu.kv[r]);
        }
        StepOut out;
        ASSERT_TRUE(decode(e.get(), slots, vocab_, &out)) << "step " << k;
        const std::vector<float> want = cpu_step(llm_, kv, cu, toks);
        for (int32_t i = 0; i < m; i++) {
            const int32_t r = reqs[i];
            expect_logits_close(out.row(i, vocab_), want.data() + (size_t)i * vocab_, vocab_, b,
                                "step " + std::to_string(k) + " request " + std::to_string(r),
                                &out.tokens[i]);
            fed[r].push_back(toks[i]);
            sampled[r].push_back(out.tokens[i]);
            last[r].assign(out.row(i, vocab_), out.row(i, vocab_) + vocab_);
        }
        for (int32_t r = 0; r < 3; r++) {
            EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), slot_of[r]),
                      p.len(r) + (int32_t)fed[r].size())
                << "step " << k << " request " << r;
        }
    }

    // The whole sequences (prompt + fed tokens) as one fresh guarded prefill in slots 1, 4, 5.
    const Prompts full = p.extended(fed);
    StepOut re;
    ASSERT_TRUE(prefill(e.get(), full, {1, 4, 5}, true, vocab_, &re));
    const std::vector<float> cf = cpu_guarded_logits(llm_, sf_, full, last_rows(full));
    const int32_t orig = cfg_->rope.original_max_position_embeddings;
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(re.row(r, vocab_), cf.data() + (size_t)r * vocab_, vocab_, b,
                            "recomputed request " + std::to_string(r), &re.tokens[r]);
        // Longrope switches factors per call (transformers' rule, the CPU's and the engine's):
        // a request that crossed original_max while decoding keeps short-factor keys in its
        // cache, which a fresh prefill of the whole sequence does not have. Only those differ.
        const bool crossed = cfg_->rope.type == SF_ROPE_LONGROPE && p.len(r) <= orig &&
                             full.len(r) > orig;
        if (crossed) continue;
        const double rel = rel_error(last[r].data(), re.row(r, vocab_), (size_t)vocab_);
        EXPECT_LE(rel, 2 * b) << "request " << r << ": decode vs recomputation";
    }
}

// A guarded prefill of three requests on slots 2, 0, 1; then an unguarded prefill step that
// appends 3, 1 and 5 tokens to those non-empty slots (queries at positions > 0 against the
// cache); then one decode step. Each step's logits against the CPU's (its caches advanced by
// the same tokens) within bound b, and the slots' lengths after each.
void chunked_prefill_then_decode(sf_cuda_engine *e, const sf_llm *llm, const sf_sysformer *sf,
                                 int64_t vocab, double b, uint64_t seed, const std::string &what) {
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}}, seed);
    const std::vector<int32_t> slots = {2, 0, 1};
    StepOut pre;
    ASSERT_TRUE(prefill(e, p, slots, true, vocab, &pre));
    CpuCaches cpu(llm, 3, 128);
    const std::vector<float> cl = cpu_guarded_logits(llm, sf, p, last_rows(p), cpu.kv.data());
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(pre.row(r, vocab), cl.data() + (size_t)r * vocab, vocab, b,
                            what + "guarded request " + std::to_string(r), &pre.tokens[r]);
        EXPECT_EQ(sf_cuda_engine_slot_length(e, slots[r]), p.len(r));
    }

    Prompts chunk;  // spans unused (unguarded)
    Uniform rng(seed + 87);
    for (int len : {3, 1, 5}) {
        std::vector<int32_t> t;
        for (int i = 0; i < len; i++) t.push_back(rng.below(3, 89));
        chunk.add(t, sf_prompt_spans{0, 0, 0, 0, len});
    }
    StepOut out;
    ASSERT_TRUE(prefill(e, chunk, slots, false, vocab, &out));
    std::vector<float> want = cpu_step(llm, cpu.kv, chunk.cu, chunk.ids);
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(out.row(r, vocab), want.data() + (size_t)r * vocab, vocab, b,
                            what + "chunk request " + std::to_string(r), &out.tokens[r]);
        EXPECT_EQ(sf_cuda_engine_slot_length(e, slots[r]), p.len(r) + chunk.len(r));
    }
    StepOut dec;
    ASSERT_TRUE(decode(e, slots, vocab, &dec));
    want = cpu_step(llm, cpu.kv, {0, 1, 2, 3}, out.tokens);
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(dec.row(r, vocab), want.data() + (size_t)r * vocab, vocab, b,
                            what + "decode request " + std::to_string(r), &dec.tokens[r]);
        EXPECT_EQ(sf_cuda_engine_slot_length(e, slots[r]), p.len(r) + chunk.len(r) + 1);
    }
}

// Chunked prefill continues the slots (chunked_prefill_then_decode).
TEST_P(CudaEngineVariant, ChunkedPrefillContinuesTheSlots) {
    EnginePtr e = make_engine(llm_, sf_, options(4));
    ASSERT_TRUE(e);
    chunked_prefill_then_decode(e.get(), llm_, sf_, vocab_, logit_bound(L_, Ls_), 12, "");
}

// 3c. Continuous batching: a guarded prefill of two requests (slots 2, 0); then one step that
// carries request 0's sampled token, a new guarded prompt into slot 1 and request 1's token
// (the running requests as 1-token chunks with spans {0, 0, 0, 0, 1}: no system span, so they
// continue their slots); then a decode step over all three. Each step's logits against the
// CPU's (the same guarded batches on caches advanced alike) within bound b, and the slots'
// lengths. The new prompt sent into a running slot instead is refused and changes nothing.
TEST_P(CudaEngineVariant, GuardedPrefillJoinsRequestsAlreadyRunning) {
    EnginePtr e = make_engine(llm_, sf_, options(4));
    ASSERT_TRUE(e);
    const double b = logit_bound(L_, Ls_);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}}, 61);
    const Prompts late = tiny_prompts({{12, 9}}, 62);
    StepOut pre;
    ASSERT_TRUE(prefill(e.get(), p, {2, 0}, true, vocab_, &pre));
    CpuCaches cpu(llm_, 3, 128);
    const std::vector<float> cl = cpu_guarded_logits(llm_, sf_, p, last_rows(p), cpu.kv.data());
    for (int32_t r = 0; r < 2; r++) {
        expect_logits_close(pre.row(r, vocab_), cl.data() + (size_t)r * vocab_, vocab_, b,
                            "prefill request " + std::to_string(r), &pre.tokens[r]);
    }

    Prompts mixed;
    const sf_prompt_spans one = {0, 0, 0, 0, 1};
    mixed.add({pre.tokens[0]}, one);
    mixed.add(late.request(0), late.spans[0]);
    mixed.add({pre.tokens[1]}, one);
    {
        const std::vector<int32_t> wrong = {2, 0, 1};  // the new prompt into running slot 0
        sf_cuda_step s = {};
        s.n_requests = 3;
        s.slots = wrong.data();
        s.cu_seqlens = mixed.cu.data();
        s.token_ids = mixed.ids.data();
        s.spans = mixed.spans.data();
        s.sampling = &kGreedy;
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(sf_last_error()).find("request 1's system span"), std::string::npos)
            << sf_last_error();
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 0), p.len(1));
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 1), 0);
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 2), p.len(0));
    }
    const std::vector<int32_t> slots = {2, 1, 0};
    StepOut mid;
    ASSERT_TRUE(prefill(e.get(), mixed, slots, true, vocab_, &mid));
    std::vector<sf_kv_cache *> kv = {cpu.kv[0], cpu.kv[2], cpu.kv[1]};
    const std::vector<float> cm = cpu_guarded_logits(llm_, sf_, mixed, last_rows(mixed),
                                                     kv.data());
    const char *what[3] = {"request 0's next token", "the new prompt", "request 1's next token"};
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(mid.row(r, vocab_), cm.data() + (size_t)r * vocab_, vocab_, b,
                            what[r], &mid.tokens[r]);
    }
    EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 2), p.len(0) + 1);
    EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 1), late.len(0));
    EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 0), p.len(1) + 1);

    StepOut dec;
    ASSERT_TRUE(decode(e.get(), slots, vocab_, &dec));
    const std::vector<float> cd = cpu_step(llm_, kv, {0, 1, 2, 3}, mid.tokens);
    for (int32_t r = 0; r < 3; r++) {
        expect_logits_close(dec.row(r, vocab_), cd.data() + (size_t)r * vocab_, vocab_, b,
                            std::string("decode after ") + what[r], &dec.tokens[r]);
    }
}

// 4. Two engines from the same model, graphs on and off, the same steps: the same tokens and
// bit-identical logits. The graph engine runs most decode steps back to back without reading
// anything (the serving pattern); round 2 resets the slots and replays every captured graph
// (batch sizes 3, 2, 1) on new prompts.
TEST_P(CudaEngineVariant, GraphReplayEqualsEagerBitForBit) {
    EnginePtr g = make_engine(llm_, sf_, options(6, 0, 0, true));
    EnginePtr x = make_engine(llm_, sf_, options(6, 0, 0, false));
    ASSERT_TRUE(g && x);
    const std::vector<int32_t> slot_of = {3, 0, 2};
    const std::vector<std::vector<int32_t>> schedule = {{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {2, 0},
                                                        {2, 0},    {1},       {1, 2, 0}};
    auto same = [&](const StepOut &a, const StepOut &c, const std::string &what) {
        EXPECT_EQ(a.tokens, c.tokens) << what;
        ASSERT_EQ(a.logits.size(), c.logits.size()) << what;
        EXPECT_EQ(0, memcmp(a.logits.data(), c.logits.data(), a.logits.size() * sizeof(float)))
            << what << ": logits differ (max |diff| "
            << max_abs_diff(a.logits.data(), c.logits.data(), (int64_t)a.logits.size()) << ")";
    };
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            for (int32_t s : slot_of) {
                ASSERT_EQ(sf_cuda_engine_reset_slot(g.get(), s), SF_OK);
                ASSERT_EQ(sf_cuda_engine_reset_slot(x.get(), s), SF_OK);
            }
        }
        const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}}, 30 + round);
        StepOut pg, px;
        ASSERT_TRUE(prefill(g.get(), p, slot_of, true, vocab_, &pg));
        ASSERT_TRUE(prefill(x.get(), p, slot_of, true, vocab_, &px));
        same(pg, px, "round " + std::to_string(round) + " prefill");
        for (size_t k = 0; k < schedule.size(); k++) {
            std::vector<int32_t> slots;
            for (int32_t r : schedule[k]) slots.push_back(slot_of[r]);
            const bool read = k == 0 || k == 3 || k == 5 || k + 1 == schedule.size();
            StepOut og, ox;
            ASSERT_TRUE(decode(x.get(), slots, vocab_, &ox));
            ASSERT_TRUE(decode(g.get(), slots, vocab_, read ? &og : nullptr));
            ASSERT_TRUE(all_finite(ox.logits.data(), (int64_t)ox.logits.size()));
            if (read) same(og, ox, "round " + std::to_string(round) + " step " + std::to_string(k));
        }
        for (int32_t s : slot_of) {
            EXPECT_EQ(sf_cuda_engine_slot_length(g.get(), s), sf_cuda_engine_slot_length(x.get(), s));
        }
    }
}

// 5. sf_generate_cuda against sf_generate_cpu (see check_generate).
TEST_P(CudaEngineVariant, GenerateMatchesCpu) {
    EnginePtr e = make_engine(llm_, sf_, options(4));
    ASSERT_TRUE(e);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}}, 21);
    check_generate(llm_, sf_, nullptr, e.get(), p, 8, logit_bound(L_, Ls_));
}

// 5b. Continuous batching in sf_generate_cuda: seven requests on an engine of three slots whose
// steps take 64 tokens, with limits from 1 to 7 new tokens, so that requests finish in
// different rounds and the waiting ones start beside running ones (the first round admits two:
// a third prompt would pass 64 tokens). Odd requests sample (each from its own seed), even ones
// are greedy.
//  1. Each request gets its own number of tokens (finish: length), and the stream callback saw
//     them in order.
//  2. Replaying by hand the rounds the header documents (requests start in order, each in the
//     first round with a free slot whose step it fits; a round is a prefill step of the running
//     requests' next tokens, in request order, then the starting prompts, or else a decode
//     step), each sampling request drawing from its own stream once per token, gives the same
//     tokens bit for bit (the same steps on the same engine); each is the device sampler's pick
//     from its row of the step's logits (for a greedy request, the first maximum),
//  3. and those logits are within the bound of the CPU's (each request replayed alone: its
//     guarded prefill, then decode steps fed the same tokens).
// A prompt longer than a step is refused before anything runs.
TEST_P(CudaEngineVariant, GenerateRefillsSlotsAsRequestsFinish) {
    EnginePtr e = make_engine(llm_, sf_, options(3, 128, 64));
    ASSERT_TRUE(e);
    const Prompts p =
        tiny_prompts({{12, 9}, {10, 10}, {5, 2}, {1, 7}, {3, 4}, {6, 6}, {2, 3}}, 65);
    const std::vector<int32_t> limit = {3, 7, 1, 5, 2, 4, 6};
    const int32_t n = p.n(), slots = 3, budget = 64;
    std::vector<sf_sampling> set;
    for (int32_t r = 0; r < n; r++) {
        set.push_back(r % 2 ? sf_sampling{0.9f, 0, 1.0f, (uint64_t)(100 + r), false, 0} : kGreedy);
    }
    sf_generation g = generation_of(p, 0);  // max_new_tokens unused with request limits
    g.request_max_new_tokens = limit.data();
    g.request_sampling = set.data();
    std::vector<sf_generation_result> res((size_t)n);
    StreamLog log;
    log.tokens.resize((size_t)n);
    ASSERT_EQ(sf_generate_cuda(e.get(), nullptr, &g, record_stream, &log, res.data()), SF_OK)
        << sf_last_error();
    std::vector<std::vector<int32_t>> got((size_t)n);
    for (int32_t r = 0; r < n; r++) {
        got[r].assign(res[r].tokens, res[r].tokens + res[r].n_tokens);
        EXPECT_EQ(res[r].n_tokens, limit[r]) << "request " << r;
        EXPECT_EQ(res[r].finish, SF_FINISH_LENGTH) << "request " << r;
        EXPECT_EQ(log.tokens[r], got[r]) << "request " << r << ": the stream saw other tokens";
    }
    free_results(&res);

    // 2-3. The rounds by hand, on the same engine, and each request alone on the CPU.
    int32_t mixed = 0;
    ASSERT_NO_FATAL_FAILURE(replay_rounds(e.get(), p, limit, set,
                                          std::vector<int32_t>((size_t)n, 0), got, slots,
                                          budget, &mixed));
    EXPECT_GE(mixed, 2) << "fewer than two rounds started a prompt beside running requests";

    const Prompts too_long = tiny_prompts({{30, 30}}, 66);  // 68 tokens > 64
    g.n_requests = 1;
    g.cu_seqlens = too_long.cu.data();
    g.token_ids = too_long.ids.data();
    g.spans = too_long.spans.data();
    std::vector<sf_generation_result> none(1);
    EXPECT_EQ(sf_generate_cuda(e.get(), nullptr, &g, nullptr, nullptr, none.data()),
              SF_ERR_OUT_OF_RANGE);
    EXPECT_NE(std::string(sf_last_error()).find("max_batch_tokens"), std::string::npos)
        << sf_last_error();
}

// A session whose requests arrive while others run: submitted before the rounds given, they
// wait for a slot, start beside the running requests, and the last arrives after everything
// else has finished (the rounds between do nothing). The rounds replayed by hand must give
// the same tokens, within the bound of the CPU's logits; the stream sees each request by id.
TEST_P(CudaEngineVariant, SessionAdmitsRequestsAsTheyArrive) {
    const int32_t slots = 3, budget = 64;
    EnginePtr e = make_engine(llm_, sf_, options(slots, 128, budget));
    ASSERT_TRUE(e);
    const Prompts p =
        tiny_prompts({{12, 9}, {10, 10}, {5, 2}, {1, 7}, {3, 4}, {6, 6}, {2, 3}}, 67);
    const std::vector<int32_t> limit = {4, 2, 6, 3, 5, 2, 3};
    const std::vector<int32_t> arrive = {0, 0, 1, 1, 1, 4, 30};
    const int32_t n = p.n();
    std::vector<sf_sampling> set;
    for (int32_t r = 0; r < n; r++) {
        set.push_back(r % 3 ? sf_sampling{0.8f, 0, 1.0f, (uint64_t)(300 + r), false, 0} : kGreedy);
    }
    sf_cuda_session *raw = nullptr;
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr s(raw);
    StreamLog log;
    log.tokens.resize((size_t)n);
    int32_t submitted = 0, idle = 0;
    for (int32_t round = 0; round < 100; round++) {
        for (int32_t r = submitted; r < n && arrive[r] == round; r++, submitted++) {
            const std::vector<int32_t> ids = p.request(r);
            int32_t id = -1;
            ASSERT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(),
                                             &p.spans[r], &set[r], limit[r], &id),
                      SF_OK)
                << sf_last_error();
            EXPECT_EQ(id, r) << "ids are the submission order";
        }
        int32_t running = -1, waiting = -1;
        ASSERT_EQ(sf_cuda_session_step(s.get(), record_stream, &log, &running, &waiting), SF_OK)
            << "round " << round << ": " << sf_last_error();
        EXPECT_LE(running, slots) << "round " << round;
        EXPECT_GE(waiting, 0) << "round " << round;
        idle += running == 0 && waiting == 0;
        if (submitted == n && running == 0 && waiting == 0) break;
    }
    EXPECT_GE(idle, 2) << "the session never idled before the last arrival";
    std::vector<std::vector<int32_t>> got((size_t)n);
    for (int32_t r = 0; r < n; r++) {
        sf_generation_result res = {};
        bool done = false;
        ASSERT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK) << sf_last_error();
        ASSERT_TRUE(done) << "request " << r;
        got[r].assign(res.tokens, res.tokens + res.n_tokens);
        EXPECT_EQ(res.n_tokens, limit[r]) << "request " << r;
        EXPECT_EQ(res.finish, SF_FINISH_LENGTH) << "request " << r;
        EXPECT_EQ(log.tokens[r], got[r]) << "request " << r << ": the stream saw other tokens";
        sf_generation_result_free(&res);
        EXPECT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_ERR_INVALID_ARGUMENT)
            << "request " << r << " taken twice";
    }
    int32_t mixed = 0;
    ASSERT_NO_FATAL_FAILURE(
        replay_rounds(e.get(), p, limit, set, arrive, got, slots, budget, &mixed));
    EXPECT_GE(mixed, 1) << "no round started a prompt beside running requests";
}


INSTANTIATE_TEST_SUITE_P(CudaEngine, CudaEngineVariant, ::testing::ValuesIn(variant_names()),
                         [](const ::testing::TestParamInfo<std::string> &info) {
                             return info.param;
                         });

// ------------------------------------------------------------------------------------------
// One model for the hostile, memory and timing tests
// ------------------------------------------------------------------------------------------

class CudaEngineTiny : public ::testing::Test {
  protected:
    void SetUp() override {
        if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
        ASSERT_TRUE(write_llm_variant("llama_gqa_llama3", dir_.path(), 17));
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        ASSERT_TRUE(make_open_sysformer(llm_, 5, &sf_));
        vocab_ = sf_llm_get_config(llm_)->vocab_size;
    }
    void TearDown() override {
        sf_sysformer_free(sf_);
        sf_llm_free(llm_);
    }
    // The LLM's whole embedding table, fp32 [vocab, hidden]: what a serving stack holds (as
    // bf16) and may lend a guard-only engine.
    std::vector<float> embedding_table() const {
        const int64_t d = sf_llm_get_config(llm_)->hidden_size;
        std::vector<int32_t> every((size_t)vocab_);
        for (int32_t t = 0; t < (int32_t)vocab_; t++) every[(size_t)t] = t;
        std::vector<float> table((size_t)(vocab_ * d));
        EXPECT_EQ(sf_llm_embed(llm_, every.data(), vocab_, table.data()), SF_OK)
            << sf_last_error();
        return table;
    }
    TempDir dir_;
    sf_llm *llm_ = nullptr;
    sf_sysformer *sf_ = nullptr;
    int64_t vocab_ = 0;
};

// 6. Every documented refusal of a step, with its exact status; a refused step changes no slot,
// and afterwards the engine repeats an earlier step bit for bit. Engine: 4 slots, max_context
// 64, max_batch_tokens 96 (more than max_context, so the two limits can be told apart).
TEST_F(CudaEngineTiny, HostileStepsAreRefusedAndTheEngineStaysUsable) {
    EnginePtr e = make_engine(llm_, sf_, options(4, 64, 96));
    ASSERT_TRUE(e);
    const Prompts ref_p = tiny_prompts({{5, 2}}, 41);  // 15 tokens
    StepOut ref;
    ASSERT_TRUE(prefill(e.get(), ref_p, {0}, true, vocab_, &ref));

    std::vector<int32_t> expect_len = {15, 0, 0, 0};
    auto lengths = [&]() {
        std::vector<int32_t> v;
        for (int32_t s = 0; s < 4; s++) v.push_back(sf_cuda_engine_slot_length(e.get(), s));
        return v;
    };
    ASSERT_EQ(lengths(), expect_len);
    auto check = [&](const char *what, sf_status got, sf_status want) {
        EXPECT_EQ(got, want) << what << ": got " << sf_status_string(got) << " (" << sf_last_error()
                             << ")";
        EXPECT_EQ(lengths(), expect_len) << what << " changed a slot";
    };
    Uniform rng(77);
    auto random_ids = [&](int n) {
        std::vector<int32_t> v;
        for (int i = 0; i < n; i++) v.push_back(rng.below(3, 89));
        return v;
    };
    auto unguarded = [&](const std::vector<int32_t> &slots, const std::vector<int32_t> &cu,
                         const std::vector<int32_t> &ids) {
        sf_cuda_step s = {};
        s.n_requests = (int32_t)slots.size();
        s.slots = slots.data();
        s.cu_seqlens = cu.data();
        s.token_ids = ids.data();
        s.sampling = &kGreedy;
        return sf_cuda_engine_step(e.get(), &s);
    };
    auto guarded = [&](const std::vector<int32_t> &slots, const std::vector<int32_t> &cu,
                       const std::vector<int32_t> &ids, const std::vector<sf_prompt_spans> &sp) {
        sf_cuda_step s = {};
        s.n_requests = (int32_t)slots.size();
        s.slots = slots.data();
        s.cu_seqlens = cu.data();
        s.token_ids = ids.data();
        s.spans = sp.data();
        s.sampling = &kGreedy;
        return sf_cuda_engine_step(e.get(), &s);
    };
    const std::vector<int32_t> ids15 = ref_p.ids;  // spans {3, 5, 2, 2, 3}
    const sf_prompt_spans sp15 = ref_p.spans[0];

    check("NULL step", sf_cuda_engine_step(e.get(), nullptr), SF_ERR_INVALID_ARGUMENT);
    {
        sf_cuda_step s = {};
        int32_t slot = 1;
        s.n_requests = -1;
        s.slots = &slot;
        s.sampling = &kGreedy;
        check("n_requests = -1", sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT);
        s.n_requests = 1;
        s.slots = nullptr;
        const int32_t cu[2] = {0, 15};
        s.cu_seqlens = cu;
        s.token_ids = ids15.data();
        check("NULL slots", sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT);
    }
    check("an empty request in a prefill", unguarded({1, 2}, {0, 15, 15}, ids15),
          SF_ERR_INVALID_ARGUMENT);
    check("an empty request in a guarded prefill",
          guarded({1, 2}, {0, 15, 15}, ids15, {sp15, sf_prompt_spans{0, 0, 0, 0, 0}}),
          SF_ERR_INVALID_ARGUMENT);
    check("decreasing cu_seqlens", unguarded({1, 2}, {0, 15, 10}, ids15), SF_ERR_INVALID_ARGUMENT);
    {
        sf_prompt_spans s = sp15;
        s.suffix += 1;
        check("spans that do not add up", guarded({1}, {0, 15}, ids15, {s}),
              SF_ERR_INVALID_ARGUMENT);
        s = sp15;
        s.prefix -= 4;  // -1
        s.suffix += 4;
        check("a negative span", guarded({1}, {0, 15}, ids15, {s}), SF_ERR_INVALID_ARGUMENT);
        s = sp15;
        s.suffix += s.user;
        s.user = 0;
        check("a system span with an empty user span", guarded({1}, {0, 15}, ids15, {s}),
              SF_ERR_INVALID_ARGUMENT);
    }
    check("5 requests, 4 slots", unguarded({1, 2, 3, 0, 1}, {0, 1, 2, 3, 4, 5}, {5, 6, 7, 8, 9}),
          SF_ERR_OUT_OF_RANGE);
    check("a repeated slot", unguarded({1, 1}, {0, 1, 2}, {5, 6}), SF_ERR_INVALID_ARGUMENT);
    check("slot 4 of 4", unguarded({4}, {0, 1}, {5}), SF_ERR_INVALID_ARGUMENT);
    check("slot -1", unguarded({-1}, {0, 1}, {5}), SF_ERR_INVALID_ARGUMENT);
    check("a guarded prefill into a used slot", guarded({0}, {0, 15}, ids15, {sp15}),
          SF_ERR_INVALID_ARGUMENT);
    check("100 tokens > max_batch_tokens 96", unguarded({1, 2}, {0, 50, 100}, random_ids(100)),
          SF_ERR_OUT_OF_RANGE);
    check("a 65-token prompt > max_context 64", unguarded({1}, {0, 65}, random_ids(65)),
          SF_ERR_OUT_OF_RANGE);
    check("appending 50 to a slot of 15 > max_context", unguarded({0}, {0, 50}, random_ids(50)),
          SF_ERR_OUT_OF_RANGE);
    {
        std::vector<int32_t> ids = random_ids(3);
        ids[1] = (int32_t)vocab_;
        check("an id = vocab", unguarded({1}, {0, 3}, ids), SF_ERR_INVALID_ARGUMENT);
        ids[1] = -1;
        check("an id = -1", unguarded({1}, {0, 3}, ids), SF_ERR_INVALID_ARGUMENT);
        std::vector<sf_prompt_spans> sp = {sp15};
        std::vector<int32_t> bad15 = ids15;
        bad15[4] = (int32_t)vocab_;  // inside the system span
        check("an id = vocab in a guarded prefill", guarded({1}, {0, 15}, bad15, sp),
              SF_ERR_INVALID_ARGUMENT);
    }
    {
        const sf_sampling hot = {1.0f, 0, 1.0f, 7, false, 0};
        const std::vector<int32_t> slots = {1}, cu = {0, 3}, ids = random_ids(3);
        sf_cuda_step s = {};
        s.n_requests = 1;
        s.slots = slots.data();
        s.cu_seqlens = cu.data();
        s.token_ids = ids.data();
        s.sampling = &hot;
        s.uniforms = nullptr;
        check("temperature sampling without uniforms", sf_cuda_engine_step(e.get(), &s),
              SF_ERR_INVALID_ARGUMENT);
    }
    {
        sf_cuda_step s = {};
        const int32_t four[1] = {4}, zeros[2] = {0, 0};
        s.n_requests = 1;
        s.slots = four;
        s.sampling = &kGreedy;
        check("decode on slot 4", sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT);
        s.n_requests = 2;
        s.slots = zeros;
        check("decode with a repeated slot", sf_cuda_engine_step(e.get(), &s),
              SF_ERR_INVALID_ARGUMENT);
    }

    // A slot filled to max_context: the prefill is fine (64 <= 64), its decode is not.
    StepOut full;
    ASSERT_TRUE(prefill(e.get(), tiny_prompts({{27, 29}}, 43), {3}, false, vocab_, &full));
    expect_len[3] = 64;
    ASSERT_EQ(lengths(), expect_len);
    {
        int32_t toks[4];
        float logits[2 * 96];
        ASSERT_EQ(vocab_, 96);
        EXPECT_EQ(sf_cuda_engine_read_tokens(e.get(), toks, 2), SF_ERR_INVALID_ARGUMENT)
            << "the last step had 1 request";
        EXPECT_EQ(sf_cuda_engine_read_logits(e.get(), logits, 2), SF_ERR_INVALID_ARGUMENT)
            << "the last step had 1 request";
        EXPECT_EQ(sf_cuda_engine_read_tokens(e.get(), toks, -1), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(sf_cuda_engine_read_tokens(e.get(), nullptr, 1), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(sf_cuda_engine_read_logits(e.get(), nullptr, 1), SF_ERR_INVALID_ARGUMENT);
        ASSERT_EQ(sf_cuda_engine_read_tokens(e.get(), toks, 1), SF_OK) << sf_last_error();
        EXPECT_EQ(toks[0], full.tokens[0]);
    }
    {
        sf_cuda_step s = {};
        const int32_t one[1] = {3}, two[2] = {0, 3};
        s.n_requests = 1;
        s.slots = one;
        s.sampling = &kGreedy;
        check("decode in a full slot", sf_cuda_engine_step(e.get(), &s), SF_ERR_OUT_OF_RANGE);
        s.n_requests = 2;
        s.slots = two;
        check("decode in a full slot beside a fine one", sf_cuda_engine_step(e.get(), &s),
              SF_ERR_OUT_OF_RANGE);
    }

    EXPECT_EQ(sf_cuda_engine_reset_slot(e.get(), 4), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_reset_slot(e.get(), -1), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 4), -1);
    EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), -1), -1);

    // sf_generate_cuda's own refusals come before it resets any slot. (More requests than
    // slots are not one: they wait for a slot, GenerateRefillsSlotsAsRequestsFinish.)
    {
        sf_generation g = {};
        g.max_new_tokens = 2;
        g.sampling = kGreedy;
        std::vector<sf_generation_result> res(1);
        const Prompts long_p = tiny_prompts({{27, 29}}, 45);  // 64 tokens: no room left
        g.n_requests = 1;
        g.cu_seqlens = long_p.cu.data();
        g.token_ids = long_p.ids.data();
        g.spans = long_p.spans.data();
        check("generate: a 64-token prompt with max_context 64",
              sf_generate_cuda(e.get(), nullptr, &g, nullptr, nullptr, res.data()),
              SF_ERR_OUT_OF_RANGE);
    }

    // Still usable: the first step again, bit for bit.
    ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 0), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 0), 0);
    StepOut again;
    ASSERT_TRUE(prefill(e.get(), ref_p, {0}, true, vocab_, &again));
    EXPECT_EQ(again.tokens, ref.tokens);
    EXPECT_EQ(0, memcmp(again.logits.data(), ref.logits.data(), ref.logits.size() * sizeof(float)))
        << "the repeated step differs";
    ASSERT_EQ(cudaStreamSynchronize((cudaStream_t)sf_cuda_engine_stream(e.get())), cudaSuccess);
}

// Options the engine must refuse, and a model no device can hold: refused with the documented
// status, nothing handed back, and the next engine works.
TEST_F(CudaEngineTiny, CreateRefusesBadOptionsAndImpossibleSizes) {
    sf_cuda_engine *e = nullptr;
    sf_cuda_engine_options o = options(4, 129);  // max_position_embeddings is 128
    EXPECT_EQ(sf_cuda_engine_create(llm_, sf_, &o, &e), SF_ERR_INVALID_ARGUMENT)
        << "max_context 129 > max_position_embeddings 128: " << sf_last_error();
    EXPECT_EQ(e, nullptr);
    sf_cuda_engine_free(e);
    e = nullptr;
    o = options(-1);
    EXPECT_EQ(sf_cuda_engine_create(llm_, sf_, &o, &e), SF_ERR_INVALID_ARGUMENT) << "max_slots -1";
    EXPECT_EQ(e, nullptr);
    o = options(4, -1);
    EXPECT_EQ(sf_cuda_engine_create(llm_, sf_, &o, &e), SF_ERR_INVALID_ARGUMENT) << "max_context -1";
    EXPECT_EQ(e, nullptr);
    o = options(4, 0, -1);
    EXPECT_EQ(sf_cuda_engine_create(llm_, sf_, &o, &e), SF_ERR_INVALID_ARGUMENT)
        << "max_batch_tokens -1";
    EXPECT_EQ(e, nullptr);

    // An embedding table of (2^31 - 1) x 16384 bf16 values is 64 TiB.
    sf_llm_config big = *sf_llm_get_config(llm_);
    big.arch = SF_ARCH_LLAMA;
    big.vocab_size = 2147483647;
    big.hidden_size = 16384;
    big.intermediate_size = 53248;
    big.num_layers = 1;
    big.num_heads = 128;
    big.num_kv_heads = 8;
    big.head_dim = 128;
    big.max_position_embeddings = 4096;
    big.rope.type = SF_ROPE_DEFAULT;
    big.rope.factor = 1.0;
    big.rope.attention_factor = 1.0;
    big.rope.short_factor = nullptr;
    big.rope.long_factor = nullptr;
    big.sliding_window = 0;
    big.attention_bias = false;
    big.qkv_bias = false;
    big.tie_word_embeddings = false;
    o = options(1, 16, 16);
    EXPECT_EQ(sf_cuda_engine_create_random(&big, nullptr, 1, &o, &e), SF_ERR_OUT_OF_MEMORY)
        << sf_last_error();
    EXPECT_EQ(e, nullptr);
    sf_cuda_engine_free(e);

    // The device and the library are fine afterwards.
    EnginePtr ok = make_engine(llm_, sf_, options(2));
    ASSERT_TRUE(ok);
    StepOut out;
    ASSERT_TRUE(prefill(ok.get(), tiny_prompts({{5, 2}}, 46), {0}, true, vocab_, &out));
    EXPECT_TRUE(all_finite(out.logits.data(), vocab_));
    (void)cudaGetLastError();  // leave no stale error to later tests, whatever happened above
}

// 6b. The engine on the wgmma attention kernels (options.attention = SF_ATTENTION_WGMMA, the
// pipelined one, and SF_ATTENTION_WGMMA_WS, the warp-specialized one): the Sysformer's self-
// and cross-attention and the LLM's causal prefill in a guarded prefill, then a chunked prefill
// against the cache (queries at positions > 0) and a decode step, all against the CPU with the
// bound of every engine test (the attention kernel is one more bf16 op of the same class: the
// bound does not depend on which kernel runs it). Skips, saying why, where the kernel cannot
// run (a build without sm_90, a device other than compute capability 9.0).
void attention_kernel_matches_cpu(const sf_llm *llm, const sf_sysformer *sf, int64_t vocab,
                                  sf_cuda_engine_options o, sf_attention_kernel kernel,
                                  uint64_t seed, const char *label) {
    o.attention = kernel;
    sf_cuda_engine *raw = nullptr;
    const sf_status st = sf_cuda_engine_create(llm, sf, &o, &raw);
    if (st == SF_ERR_UNSUPPORTED) GTEST_SKIP() << sf_last_error();
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    EnginePtr e(raw);
    const int L = sf_llm_get_config(llm)->num_layers;
    const int Ls = sf_sysformer_get_config(sf)->num_layers;
    chunked_prefill_then_decode(e.get(), llm, sf, vocab, logit_bound(L, Ls), seed, label);
}
TEST_F(CudaEngineTiny, WgmmaAttentionMatchesCpu) {
    attention_kernel_matches_cpu(llm_, sf_, vocab_, options(4), SF_ATTENTION_WGMMA, 21, "wgmma ");
}
TEST_F(CudaEngineTiny, WgmmaWsAttentionMatchesCpu) {
    attention_kernel_matches_cpu(llm_, sf_, vocab_, options(4), SF_ATTENTION_WGMMA_WS, 22,
                                 "wgmma ws ");
}

// 7. The memory report. kv_cache is exactly max_slots x max_context positions x layers x (K and
// V) x kv_heads x head_dim bf16 values:
//     kv_cache = max_slots * max_context * layers * 2 * kv_heads * head_dim * 2 bytes;
// weights hold every parameter once as bf16 (2 bytes), tied tables at least once, the
// Sysformer's classifier head optionally: >= 2 P_min, and at most 2 P_max plus 2% and 8 MiB for
// alignment and tables (fp32 storage would be twice); total is the sum of the three.
int64_t llm_params(const sf_llm_config &c, bool count_tied_twice) {
    const int64_t d = c.hidden_size, ff = c.intermediate_size, v = c.vocab_size;
    const int64_t q = (int64_t)c.num_heads * c.head_dim, kv = (int64_t)c.num_kv_heads * c.head_dim;
    int64_t layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * ff;
    if (c.attention_bias) layer += q + 2 * kv + d;
    else if (c.qkv_bias) layer += q + 2 * kv;
    const bool head = !c.tie_word_embeddings || count_tied_twice;
    return v * d + (head ? v * d : 0) + d + c.num_layers * layer;
}
int64_t sysformer_params(const sf_sysformer_config &s, bool with_classifier) {
    const int64_t d = s.d_model, ff = s.dim_feedforward;
    const int64_t layer = 2 * (3 * d * d + 3 * d + d * d + d) + ff * d + ff + d * ff + d + 6 * d;
    return s.num_layers * layer + (s.final_norm ? 2 * d : 0) + (int64_t)s.system_offset_rows * d +
           (with_classifier && s.has_classifier ? d + 1 : 0);
}
void expect_sizes(const sf_cuda_memory &m, const sf_llm_config &c, const sf_sysformer_config *s,
                  int64_t slots, int64_t context, const std::string &what) {
    const size_t kv = (size_t)(slots * context * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2);
    EXPECT_EQ(m.kv_cache, kv) << what;
    const double p_min = (double)llm_params(c, false) + (s ? sysformer_params(*s, false) : 0);
    const double p_max = (double)llm_params(c, true) + (s ? sysformer_params(*s, true) : 0);
    EXPECT_GE((double)m.weights, 2.0 * p_min) << what;
    EXPECT_LE((double)m.weights, 2.0 * p_max * 1.02 + 8.0 * 1048576.0) << what;
    EXPECT_GT(m.activations, 0u) << what;
    EXPECT_EQ(m.total, m.weights + m.kv_cache + m.activations) << what;
}
// The engine's report, and the device-free plan made from the same arguments: equal, field by
// field.
void expect_memory(sf_cuda_engine *e, const sf_llm_config &c, const sf_sysformer_config *s,
                   const sf_cuda_engine_options &o, int64_t slots, int64_t context,
                   const std::string &what) {
    sf_cuda_memory m, p;
    ASSERT_EQ(sf_cuda_engine_memory(e, &m), SF_OK) << sf_last_error();
    expect_sizes(m, c, s, slots, context, what);
    ASSERT_EQ(sf_cuda_engine_plan(&c, s, &o, &p), SF_OK) << sf_last_error();
    EXPECT_EQ(p.weights, m.weights) << what;
    EXPECT_EQ(p.kv_cache, m.kv_cache) << what;
    EXPECT_EQ(p.activations, m.activations) << what;
    EXPECT_EQ(p.total, m.total) << what;
}

// The plan needs no device (this runs in CI): the same sizes, the same refusals as creation.
TEST(CudaEngineArgs, PlanNeedsNoDevice) {
    TempDir dir;
    ASSERT_TRUE(write_llm_variant("llama_gqa_llama3", dir.path(), 17));
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(dir.path().c_str(), &llm), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> llm_guard(llm, sf_llm_free);
    const sf_llm_config &c = *sf_llm_get_config(llm);
    sf_sysformer_config sc = sf_sysformer_default_config(llm);
    sc.num_heads = sc.d_model / 64;
    sf_cuda_memory m;
    sf_cuda_engine_options o = options(3, 100);
    ASSERT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &m), SF_OK) << sf_last_error();
    expect_sizes(m, c, &sc, 3, 100, "plan, 3 slots x 100");
    sf_cuda_memory bare;
    ASSERT_EQ(sf_cuda_engine_plan(&c, nullptr, &o, &bare), SF_OK) << sf_last_error();
    expect_sizes(bare, c, nullptr, 3, 100, "plan without a Sysformer");
    EXPECT_LT(bare.weights, m.weights);
    EXPECT_LT(bare.activations, m.activations);  // no Sysformer buffers
    // twice the slots: twice the cache, the weights unchanged
    o = options(6, 100);
    sf_cuda_memory six;
    ASSERT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &six), SF_OK);
    EXPECT_EQ(six.kv_cache, 2 * m.kv_cache);
    EXPECT_EQ(six.weights, m.weights);
    // a learned system offset of 7 rows: 7 d more bf16 weights (and at most one more 256-byte
    // alignment gap); a negative row count is refused
    sf_sysformer_config with_offset = sc;
    with_offset.system_offset_rows = 7;
    sf_cuda_memory om;
    ASSERT_EQ(sf_cuda_engine_plan(&c, &with_offset, &o, &om), SF_OK) << sf_last_error();
    EXPECT_GE(om.weights, six.weights + 7 * (size_t)c.hidden_size * 2);
    EXPECT_LE(om.weights, six.weights + 7 * (size_t)c.hidden_size * 2 + 256);
    with_offset.system_offset_rows = -1;
    EXPECT_EQ(sf_cuda_engine_plan(&c, &with_offset, &o, &om), SF_ERR_INVALID_ARGUMENT);

    EXPECT_EQ(sf_cuda_engine_plan(nullptr, nullptr, &o, &m), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_plan(&c, nullptr, &o, nullptr), SF_ERR_INVALID_ARGUMENT);
    o = options(0, 100);
    EXPECT_EQ(sf_cuda_engine_plan(&c, nullptr, &o, &m), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(m.total, 0u);
    o = options(2, c.max_position_embeddings + 1);
    EXPECT_EQ(sf_cuda_engine_plan(&c, nullptr, &o, &m), SF_ERR_INVALID_ARGUMENT);
    o = options(65535);  // 65535 slots x 65536 positions pass 2^31 cache rows
    sf_llm_config wide = c;
    wide.max_position_embeddings = 1 << 16;
    o.max_context = 1 << 16;
    EXPECT_EQ(sf_cuda_engine_plan(&wide, nullptr, &o, &m), SF_ERR_OUT_OF_RANGE);
    sf_llm_config odd = c;
    odd.head_dim = 48;
    o = options(2, 100);
    EXPECT_EQ(sf_cuda_engine_plan(&odd, nullptr, &o, &m), SF_ERR_UNSUPPORTED);
    // a guard-only engine runs no LLM attention: the LLM's head dim does not matter, and it
    // holds no KV cache
    o.guard_only = true;
    EXPECT_EQ(sf_cuda_engine_plan(&odd, &sc, &o, &m), SF_OK) << sf_last_error();
    EXPECT_EQ(m.kv_cache, 0u);
}

TEST_F(CudaEngineTiny, MemoryReportAddsUp) {
    const sf_llm_config &c = *sf_llm_get_config(llm_);
    const sf_sysformer_config *s = sf_sysformer_get_config(sf_);
    {
        EnginePtr e = make_engine(llm_, sf_, options(3, 100));
        ASSERT_TRUE(e);
        expect_memory(e.get(), c, s, options(3, 100), 3, 100, "3 slots x 100");
    }
    {
        EnginePtr e = make_engine(llm_, nullptr, sf_cuda_engine_default_options());
        ASSERT_TRUE(e);
        expect_memory(e.get(), c, nullptr, sf_cuda_engine_default_options(), 8, 128,
                      "defaults: 8 slots x min(128, 4096)");
    }

    // A model of ~144M parameters drawn on the device, where fp32 storage could not hide in the
    // slack; max_context 0 with max_position_embeddings 8192 means 4096.
    sf_llm_config big = c;
    big.vocab_size = 32000;
    big.hidden_size = 1024;
    big.intermediate_size = 2816;
    big.num_layers = 4;
    big.num_heads = 16;
    big.num_kv_heads = 4;
    big.head_dim = 64;
    big.max_position_embeddings = 8192;
    big.rope.type = SF_ROPE_DEFAULT;
    big.rope.factor = 1.0;
    big.rope.attention_factor = 1.0;
    big.rope.short_factor = nullptr;
    big.rope.long_factor = nullptr;
    big.tie_word_embeddings = false;
    sf_sysformer_config sc = *s;
    sc.d_model = 1024;
    sc.num_layers = 2;
    sc.num_heads = 16;
    sc.dim_feedforward = 4096;
    sc.final_norm = true;
    sc.has_classifier = false;
    sc.system_offset_rows = 5;  // drawn too; the guarded request below has 5 system rows
    sc.llm_name = nullptr;
    sc.llm_hidden_size = 0;
    sc.llm_vocab_size = 0;
    sc.llm_embedding_hash = nullptr;
    sc.system_prompt = nullptr;
    sc.chat_template = nullptr;
    sf_cuda_engine *raw = nullptr;
    sf_cuda_engine_options o = options(2, 0, 512);
    ASSERT_EQ(sf_cuda_engine_create_random(&big, &sc, 7, &o, &raw), SF_OK) << sf_last_error();
    EnginePtr e(raw);
    expect_memory(e.get(), big, &sc, o, 2, 4096, "random 144M");

    // It runs: a guarded and an unguarded request.
    const Prompts p = tiny_prompts({{5, 2}, {0, 3}}, 47);  // ids < 96 <= vocab
    StepOut out;
    ASSERT_TRUE(prefill(e.get(), p, {0, 1}, true, big.vocab_size, &out));
    EXPECT_TRUE(all_finite(out.logits.data(), (int64_t)out.logits.size()));
    for (int32_t r = 0; r < 2; r++) {
        EXPECT_EQ(out.tokens[r], top2(out.row(r, big.vocab_size), big.vocab_size).id);
    }
}

// 8. A learned system offset, X = S + offset before the layers: the SystemEmbedder baseline (no
// layers) and a Sysformer with one, against the CPU. Spans must be empty or exactly the
// offset's 5 rows; another length is refused by a step and counted by sf_cuda_guarded_embed.
// Bound: the engine rounds the offset to bf16 and rounds the sum, which carries u ||S|| from
// the embedding's own rounding, u ||offset|| and u ||S + offset||. In place of the 1u that the
// embedding's rounding counts in the bounds above, that is (k + 1) u relative to ||S + offset||
// with k = (||S|| + ||offset||) / ||S + offset||: 2u more while k <= 2, which is checked on each
// request's rows (S and the offset are independent rows of equal scale: k ~ sqrt 2).
TEST_F(CudaEngineTiny, LearnedSystemOffsetMatchesCpu) {
    const int32_t rows = 5;
    const int L = (int)sf_llm_get_config(llm_)->num_layers;
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    const Prompts p = tiny_prompts({{rows, 2}, {rows, 7}, {0, 4}, {rows, 9}}, 51);
    for (const int layers : {0, 2}) {
        const std::string what = layers ? "Sysformer with an offset" : "SystemEmbedder";
        sf_sysformer *raw_sf = nullptr;
        ASSERT_TRUE(make_open_sysformer(llm_, 9, &raw_sf, layers, rows));
        std::unique_ptr<sf_sysformer, void (*)(sf_sysformer *)> sf(raw_sf, sf_sysformer_free);
        EnginePtr e = make_engine(llm_, sf.get(), options(4));
        ASSERT_TRUE(e);
        expect_memory(e.get(), *sf_llm_get_config(llm_), sf_sysformer_get_config(sf.get()),
                      options(4), 4, 128, what);

        // The CPU's S' and the precondition of the bound.
        const int32_t n = p.n(), total = p.total();
        std::vector<float> want((size_t)total * d), plain((size_t)total * d);
        sf_guarded_batch gb = {n, p.cu.data(), p.ids.data(), p.spans.data(), nullptr, 0, nullptr};
        ASSERT_EQ(sf_guarded_embed_cpu(llm_, sf.get(), &gb, want.data()), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_llm_embed(llm_, p.ids.data(), total, plain.data()), SF_OK);
        const float *offset = sf->system_offset;
        ASSERT_NE(offset, nullptr);
        for (int32_t r = 0; r < n; r++) {
            if (p.spans[r].system == 0) continue;
            const size_t off = (size_t)(p.cu[r] + p.spans[r].prefix) * d, len = (size_t)rows * d;
            std::vector<float> x0(len);
            for (size_t k = 0; k < len; k++) x0[k] = plain[off + k] + offset[k];
            const double kappa = (norm2(plain.data() + off, (int64_t)len) +
                                  norm2(offset, (int64_t)len)) /
                                 norm2(x0.data(), (int64_t)len);
            ASSERT_LE(kappa, 2.0) << what << " request " << r;
        }

        // A guarded prefill.
        StepOut out;
        ASSERT_TRUE(prefill(e.get(), p, {0, 1, 2, 3}, true, vocab_, &out));
        const std::vector<float> cpu = cpu_guarded_logits(llm_, sf.get(), p, last_rows(p));
        const double b = logit_bound(L, layers) + 2.0 * kUbf16;
        for (int32_t r = 0; r < n; r++) {
            expect_logits_close(out.row(r, vocab_), cpu.data() + (size_t)r * vocab_, vocab_, b,
                                what + " request " + std::to_string(r), &out.tokens[r]);
        }

        // A span of another length: refused before anything runs, the slots untouched.
        for (int32_t s = 0; s < 4; s++) ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), s), SF_OK);
        const Prompts other = tiny_prompts({{rows, 2}, {rows - 1, 3}}, 52);
        sf_cuda_step st = {};
        const std::vector<int32_t> slots = {0, 1};
        st.n_requests = other.n();
        st.slots = slots.data();
        st.cu_seqlens = other.cu.data();
        st.token_ids = other.ids.data();
        st.spans = other.spans.data();
        st.sampling = &kGreedy;
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &st), SF_ERR_INVALID_ARGUMENT) << what;
        EXPECT_NE(std::string(sf_last_error()).find("learned system offset has 5 rows"),
                  std::string::npos)
            << sf_last_error();
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 0), 0);

        // sf_cuda_guarded_embed with max_system 12 (the layout keeps 5 rows per request), then
        // with a request of 4 system rows (counted, its rows plain), then with max_system 4
        // (every non-empty span exceeds it: counted, all rows plain).
        auto embed = [&](const Prompts &q, int32_t max_system, int expect_errors,
                         std::vector<uint16_t> *got) {
            DeviceBuffer<int32_t> d_cu(q.cu), d_ids(q.ids), d_spans(flat_spans(q.spans));
            DeviceBuffer<uint16_t> d_out((size_t)q.total() * d);
            DeviceBuffer<int> d_err(1);
            ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_out.get() && d_err.get());
            ASSERT_EQ(cudaMemset(d_err.get(), 0, sizeof(int)), cudaSuccess);
            ASSERT_EQ(sf_cuda_guarded_embed(e.get(), q.n(), q.total(), d_cu.get(), d_ids.get(),
                                            (const sf_prompt_spans *)d_spans.get(), max_system,
                                            9, d_out.get(), d_err.get(), nullptr),
                      SF_OK)
                << sf_last_error();
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            EXPECT_EQ(d_err.host()[0], expect_errors) << what << ", max_system " << max_system;
            *got = d_out.host();
        };
        // Rows of q outside the rewritten spans must be E[token] rounded once.
        auto expect_plain = [&](const Prompts &q, const std::vector<uint16_t> &got,
                                const std::vector<bool> &rewritten, const std::string &label) {
            std::vector<float> e_rows((size_t)q.total() * d);
            ASSERT_EQ(sf_llm_embed(llm_, q.ids.data(), q.total(), e_rows.data()), SF_OK);
            for (int32_t r = 0; r < q.n(); r++) {
                const int32_t sys0 = q.cu[r] + q.spans[r].prefix, sys1 = sys0 + q.spans[r].system;
                int64_t mismatches = 0;
                for (int32_t row = q.cu[r]; row < q.cu[r + 1]; row++) {
                    if (rewritten[r] && row >= sys0 && row < sys1) continue;
                    const size_t at = (size_t)row * d;
                    for (int64_t k = 0; k < d; k++) {
                        mismatches += got[at + k] != to_bf16(e_rows[at + k]);
                    }
                }
                EXPECT_EQ(mismatches, 0) << what << ", " << label << ": request " << r;
            }
        };
        const double bs = splice_bound(layers) + 2.0 * kUbf16;
        auto expect_spliced = [&](const std::vector<uint16_t> &got, int32_t r, size_t want_off,
                                  const std::string &label) {
            const size_t len = (size_t)rows * d;
            std::vector<float> g(len);
            for (size_t k = 0; k < len; k++) g[k] = from_bf16(got[want_off + k]);
            ASSERT_TRUE(all_finite(g.data(), (int64_t)len));
            EXPECT_LE(rel_error(g.data(), want.data() + want_off, len), bs)
                << what << ", " << label << ": request " << r;
            // The test has teeth: the offset alone moves S far beyond the bound.
            EXPECT_GT(rel_error(plain.data() + want_off, want.data() + want_off, len), 10 * bs);
        };
        std::vector<uint16_t> got;
        embed(p, 12, 0, &got);
        expect_plain(p, got, {true, true, false, true}, "valid batch");
        for (int32_t r = 0; r < n; r++) {
            if (p.spans[r].system) {
                expect_spliced(got, r, (size_t)(p.cu[r] + p.spans[r].prefix) * d, "valid batch");
            }
        }
        Prompts mixed = p.only(0);
        mixed.add(other.request(1), other.spans[1]);  // 4 system rows
        embed(mixed, 12, 1, &got);
        expect_plain(mixed, got, {true, false}, "a span of 4");
        expect_spliced(got, 0, (size_t)p.spans[0].prefix * d, "a span of 4");
        embed(p, rows - 1, 3, &got);
        expect_plain(p, got, {false, false, false, false}, "max_system 4");
    }
}

// 9. A guard-only engine (a serving stack's, which runs its own LLM: the embedding table and
// the Sysformer only), made from the whole model and from one loaded with its embeddings only.
// Its sf_cuda_guarded_embed writes exactly what a full engine's writes, bit for bit: the same
// kernels on the same bf16 weights. It holds no KV cache, none of the LLM's other weights and a
// smaller arena, as its device-free plan says; steps, slot resets and generation are refused.
TEST_F(CudaEngineTiny, GuardOnlyEngineEmbedsAsTheFullOne) {
    sf_cuda_engine_options o = options(4);
    EnginePtr full = make_engine(llm_, sf_, o);
    o.guard_only = true;
    EnginePtr guard = make_engine(llm_, sf_, o);
    // the same from a model loaded with its embedding table only (all a guard needs)
    sf_llm *emb = nullptr;
    ASSERT_EQ(sf_llm_load_embeddings(dir_.path().c_str(), &emb), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> emb_guard(emb, sf_llm_free);
    EnginePtr guard_emb = make_engine(emb, sf_, o);
    ASSERT_TRUE(full && guard && guard_emb);

    const sf_llm_config &c = *sf_llm_get_config(llm_);
    const sf_sysformer_config &sc = *sf_sysformer_get_config(sf_);
    sf_cuda_memory mf, mg, plan;
    ASSERT_EQ(sf_cuda_engine_memory(full.get(), &mf), SF_OK);
    ASSERT_EQ(sf_cuda_engine_memory(guard.get(), &mg), SF_OK);
    ASSERT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &plan), SF_OK) << sf_last_error();
    EXPECT_EQ(plan.weights, mg.weights);
    EXPECT_EQ(plan.kv_cache, mg.kv_cache);
    EXPECT_EQ(plan.activations, mg.activations);
    EXPECT_EQ(mg.kv_cache, 0u);
    const int64_t vd = (int64_t)c.vocab_size * c.hidden_size;
    EXPECT_GE((int64_t)mg.weights, 2 * (vd + sysformer_params(sc, false)));
    EXPECT_GE((int64_t)(mf.weights - mg.weights), 2 * (llm_params(c, false) - vd));
    EXPECT_LT(mg.activations, mf.activations);
    EXPECT_EQ(mg.total, mg.weights + mg.activations);

    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {0, 4}}, 4);
    std::vector<uint16_t> out[3];
    sf_cuda_engine *engines[3] = {full.get(), guard.get(), guard_emb.get()};
    for (int k = 0; k < 3; k++) {
        out[k] = guarded_embed(engines[k], p, c.hidden_size, 12, 9);
        ASSERT_FALSE(out[k].empty());
    }
    EXPECT_EQ(out[0], out[1]) << "the guard-only engine's embeddings differ from the full one's";
    EXPECT_EQ(out[0], out[2]) << "from the embeddings-only model they differ";

    sf_cuda_step st = {};
    const std::vector<int32_t> slots = {0, 1, 2, 3};
    st.n_requests = p.n();
    st.slots = slots.data();
    st.cu_seqlens = p.cu.data();
    st.token_ids = p.ids.data();
    st.spans = p.spans.data();
    EXPECT_EQ(sf_cuda_engine_step(guard.get(), &st), SF_ERR_UNSUPPORTED);
    EXPECT_EQ(sf_cuda_engine_reset_slot(guard.get(), 0), SF_ERR_UNSUPPORTED);
    const sf_generation g = generation_of(p, 2);
    std::vector<sf_generation_result> res((size_t)p.n());
    EXPECT_EQ(sf_generate_cuda(guard.get(), nullptr, &g, nullptr, nullptr, res.data()),
              SF_ERR_UNSUPPORTED);
}

// 9b. A guard-only engine that borrows the serving stack's own device embedding table (here a
// bf16 copy the "stack" made of the LLM's table) instead of uploading a second one. It writes
// what the engine with its own copy writes, bit for bit (the same kernels on the same bf16
// rows); it reads the table where it lies (a row changed after creation shows in the output at
// that token's positions, and nowhere else); its weights are the table's bytes fewer, as its
// plan says. A lender that truncated to bf16 instead of rounding is accepted (within one ulp);
// a table that is not the LLM's, host memory, a misaligned address, and a table lent to a full
// engine or to random weights are refused with SF_ERR_INVALID_ARGUMENT.
TEST_F(CudaEngineTiny, GuardOnlyEngineBorrowsTheStacksEmbeddingTable) {
    const sf_llm_config &c = *sf_llm_get_config(llm_);
    const sf_sysformer_config &sc = *sf_sysformer_get_config(sf_);
    const int64_t V = c.vocab_size, d = c.hidden_size;
    const std::vector<float> table = embedding_table();
    DeviceBuffer<uint16_t> d_table(to_bf16(table));
    ASSERT_TRUE(d_table.get());

    sf_cuda_engine_options o = options(4);
    o.guard_only = true;
    EnginePtr own = make_engine(llm_, sf_, o);
    o.embedding_table = d_table.get();
    EnginePtr borrowing = make_engine(llm_, sf_, o);
    ASSERT_TRUE(own && borrowing);

    sf_cuda_memory mo, mb, plan;
    ASSERT_EQ(sf_cuda_engine_memory(own.get(), &mo), SF_OK);
    ASSERT_EQ(sf_cuda_engine_memory(borrowing.get(), &mb), SF_OK);
    ASSERT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &plan), SF_OK) << sf_last_error();
    const size_t table_bytes = ((size_t)(V * d) * 2 + 255) / 256 * 256;  // one 256-byte piece
    EXPECT_EQ(mb.weights + table_bytes, mo.weights);
    EXPECT_EQ(plan.weights, mb.weights);
    EXPECT_EQ(plan.activations, mb.activations);
    EXPECT_EQ(mb.activations, mo.activations);
    EXPECT_EQ(mb.total, mb.weights + mb.activations);

    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {0, 4}}, 4);
    const std::vector<uint16_t> want = guarded_embed(own.get(), p, d, 12, 9);
    ASSERT_FALSE(want.empty());
    EXPECT_EQ(guarded_embed(borrowing.get(), p, d, 12, 9), want)
        << "the borrowed table's embeddings differ";

    // Every request opens with token 1 (the template prefix, outside both spans): its row set
    // to 1.0 in the lender's table must show at those positions only.
    const std::vector<uint16_t> ones((size_t)d, 0x3f80);
    ASSERT_EQ(cudaMemcpy(d_table.get() + d, ones.data(), (size_t)d * 2, cudaMemcpyHostToDevice),
              cudaSuccess);
    const std::vector<uint16_t> got = guarded_embed(borrowing.get(), p, d, 12, 9);
    ASSERT_EQ(got.size(), want.size());
    int64_t moved = 0, wrong = 0;
    for (int64_t i = 0; i < p.total(); i++) {
        const bool token1 = p.ids[(size_t)i] == 1;
        for (int64_t j = 0; j < d; j++) {
            const size_t k = (size_t)(i * d + j);
            moved += got[k] != want[k];
            wrong += token1 ? got[k] != 0x3f80 : got[k] != want[k];
        }
    }
    EXPECT_EQ(wrong, 0) << "rows other than token 1's changed, or token 1's is not the lender's";
    EXPECT_GT(moved, 0) << "the engine did not read the lender's table after creation";

    auto refused = [&](const sf_cuda_engine_options &oo, const char *why) {
        sf_cuda_engine *e = nullptr;
        const sf_status st = sf_cuda_engine_create(llm_, sf_, &oo, &e);
        EXPECT_EQ(st, SF_ERR_INVALID_ARGUMENT) << why << ": " << sf_last_error();
        EXPECT_EQ(e, nullptr) << why;
        sf_cuda_engine_free(e);
        if (st == SF_ERR_INVALID_ARGUMENT) return std::string(sf_last_error());
        return std::string();
    };
    // a lender that truncated toward zero instead of rounding: within one ulp, accepted
    std::vector<uint16_t> truncated(table.size());
    for (size_t i = 0; i < table.size(); i++) {
        uint32_t u;
        memcpy(&u, &table[i], 4);
        truncated[i] = (uint16_t)(u >> 16);
    }
    DeviceBuffer<uint16_t> d_truncated(truncated);
    o.embedding_table = d_truncated.get();
    EXPECT_TRUE(make_engine(llm_, sf_, o)) << "a truncated bf16 copy was refused";
    // another table: the last row (always among those checked) negated
    std::vector<uint16_t> other = to_bf16(table);
    for (int64_t j = 0; j < d; j++) other[(size_t)((V - 1) * d + j)] ^= 0x8000;
    DeviceBuffer<uint16_t> d_other(other);
    o.embedding_table = d_other.get();
    EXPECT_NE(refused(o, "another table").find("not this LLM's"), std::string::npos)
        << sf_last_error();
    o.embedding_table = table.data();  // host memory
    EXPECT_NE(refused(o, "host memory").find("memory"), std::string::npos) << sf_last_error();
    o.embedding_table = (const char *)d_table.get() + 1;
    refused(o, "a misaligned table");
    o.embedding_table = d_table.get();
    o.guard_only = false;
    refused(o, "a full engine");
    sf_cuda_memory m;
    EXPECT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &m), SF_ERR_INVALID_ARGUMENT) << "a full plan";
    o.guard_only = true;
    sf_cuda_engine *r = nullptr;
    EXPECT_EQ(sf_cuda_engine_create_random(&c, &sc, 1, &o, &r), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(r, nullptr);
    sf_cuda_engine_free(r);
}

// 9b'. A guard-only engine for a stack that runs its LLM in fp16 (SF_EMBEDDING_F16), on a
// model whose embedding is published in fp16 (so the bf16 engine's table and the Sysformer's
// bf16 inputs are the same values in both engines). Every plain row is the checkpoint's fp16
// row exactly; every system row is the bf16 engine's S' rounded once to fp16, bit for bit (the
// same bf16 inputs, weights and kernels: only the final rounding differs), and S' differs from
// S (the test would pass vacuously otherwise). A lent fp16 table gives the same bits, saves its
// bytes, and matches the plan. A bf16 table lent to an fp16 engine (and the converse), fp16 on a
// full engine, and a value outside sf_embedding_dtype are refused with SF_ERR_INVALID_ARGUMENT.
// Random weights in fp16 are the bf16 engine's draws, rounded to fp16 instead (within one bf16
// rounding of them).
TEST_F(CudaEngineTiny, GuardOnlyEngineWritesTheStacksFp16Embeddings) {
    TempDir dir;
    ASSERT_TRUE(write_llm_variant("llama_gqa_llama3", dir.path(), 17, true));
    sf_llm *raw_llm = nullptr;
    ASSERT_EQ(sf_llm_load(dir.path().c_str(), &raw_llm), SF_OK) << sf_last_error();
    std::unique_ptr<sf_llm, void (*)(sf_llm *)> llm(raw_llm, sf_llm_free);
    sf_sysformer *raw_sf = nullptr;
    ASSERT_TRUE(make_open_sysformer(llm.get(), 5, &raw_sf));
    std::unique_ptr<sf_sysformer, void (*)(sf_sysformer *)> sf(raw_sf, sf_sysformer_free);
    const sf_llm_config &c = *sf_llm_get_config(llm.get());
    const sf_sysformer_config &sc = *sf_sysformer_get_config(sf.get());
    const int64_t V = c.vocab_size, d = c.hidden_size;
    std::vector<int32_t> every((size_t)V);
    for (int32_t t = 0; t < (int32_t)V; t++) every[(size_t)t] = t;
    std::vector<float> table((size_t)(V * d));
    ASSERT_EQ(sf_llm_embed(llm.get(), every.data(), V, table.data()), SF_OK) << sf_last_error();
    const std::vector<uint16_t> table16 = to_f16(table);
    for (size_t i = 0; i < table.size(); i++) {
        ASSERT_EQ(from_f16(table16[i]), table[i]) << "the checkpoint's table is not fp16";
    }

    sf_cuda_engine_options o = options(4);
    o.guard_only = true;
    EnginePtr b = make_engine(llm.get(), sf.get(), o);
    o.embedding_dtype = SF_EMBEDDING_F16;
    EnginePtr h = make_engine(llm.get(), sf.get(), o);
    DeviceBuffer<uint16_t> d_table16(table16);
    o.embedding_table = d_table16.get();
    EnginePtr lent = make_engine(llm.get(), sf.get(), o);
    ASSERT_TRUE(b && h && lent);

    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {0, 4}}, 4);
    const std::vector<uint16_t> want_b = guarded_embed(b.get(), p, d, 12, 9);
    const std::vector<uint16_t> got = guarded_embed(h.get(), p, d, 12, 9);
    ASSERT_FALSE(want_b.empty());
    ASSERT_EQ(got.size(), want_b.size());
    int64_t wrong_plain = 0, wrong_system = 0, rewritten = 0, system_values = 0;
    for (int32_t r = 0; r < p.n(); r++) {
        const int32_t sys0 = p.cu[r] + p.spans[r].prefix, sys1 = sys0 + p.spans[r].system;
        for (int32_t i = p.cu[r]; i < p.cu[r + 1]; i++) {
            const bool system = i >= sys0 && i < sys1;
            for (int64_t j = 0; j < d; j++) {
                const size_t k = (size_t)(i * d + j);
                const uint16_t plain = table16[(size_t)(p.ids[(size_t)i] * d + j)];
                if (system) {
                    system_values++;
                    wrong_system += got[k] != to_f16(from_bf16(want_b[k]));
                    rewritten += got[k] != plain;
                } else {
                    wrong_plain += got[k] != plain;
                }
            }
        }
    }
    EXPECT_EQ(wrong_plain, 0) << "plain rows that are not the checkpoint's fp16 values";
    EXPECT_EQ(wrong_system, 0) << "S' rows that are not the bf16 engine's rounded to fp16";
    EXPECT_GT(rewritten, system_values / 2) << "the Sysformer left most system values as S";
    // And against the CPU directly, per request over its system rows: the bf16 S' is within
    // b_s = u (9 L_s + 1) of it (the header above); rounding that to fp16 moves each value by at
    // most 2^-11 of itself, so 2^-11 (1 + b_s) more, normwise.
    std::vector<float> want((size_t)p.total() * d);
    sf_guarded_batch gb = {p.n(), p.cu.data(), p.ids.data(), p.spans.data(), nullptr, 0, nullptr};
    ASSERT_EQ(sf_guarded_embed_cpu(llm.get(), sf.get(), &gb, want.data()), SF_OK)
        << sf_last_error();
    const double b_s = splice_bound(sc.num_layers), b16 = b_s + 0x1p-11 * (1.0 + b_s);
    for (int32_t r = 0; r < p.n(); r++) {
        if (p.spans[r].system == 0) continue;
        const size_t off = (size_t)(p.cu[r] + p.spans[r].prefix) * d;
        const size_t len = (size_t)p.spans[r].system * d;
        std::vector<float> g(len);
        for (size_t k = 0; k < len; k++) g[k] = from_f16(got[off + k]);
        EXPECT_LE(rel_error(g.data(), want.data() + off, len), b16) << "request " << r;
    }
    EXPECT_EQ(guarded_embed(lent.get(), p, d, 12, 9), got) << "the lent fp16 table differs";

    sf_cuda_memory mh, ml, mb, plan;
    ASSERT_EQ(sf_cuda_engine_memory(h.get(), &mh), SF_OK);
    ASSERT_EQ(sf_cuda_engine_memory(lent.get(), &ml), SF_OK);
    ASSERT_EQ(sf_cuda_engine_memory(b.get(), &mb), SF_OK);
    ASSERT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &plan), SF_OK) << sf_last_error();
    const size_t table_bytes = ((size_t)(V * d) * 2 + 255) / 256 * 256;
    EXPECT_EQ(mh.weights, mb.weights);
    EXPECT_EQ(ml.weights + table_bytes, mh.weights);
    EXPECT_EQ(plan.weights, ml.weights);
    EXPECT_EQ(plan.activations, ml.activations);

    auto refused = [&](const sf_cuda_engine_options &oo, const char *why) {
        sf_cuda_engine *e = nullptr;
        EXPECT_EQ(sf_cuda_engine_create(llm.get(), sf.get(), &oo, &e), SF_ERR_INVALID_ARGUMENT)
            << why << ": " << sf_last_error();
        EXPECT_EQ(e, nullptr) << why;
        sf_cuda_engine_free(e);
        return std::string(sf_last_error());
    };
    DeviceBuffer<uint16_t> d_table_bf16(to_bf16(table));
    o.embedding_table = d_table_bf16.get();
    EXPECT_NE(refused(o, "a bf16 table lent as fp16").find("not this LLM's (fp16"),
              std::string::npos);
    o.embedding_dtype = SF_EMBEDDING_BF16;
    o.embedding_table = d_table16.get();
    EXPECT_NE(refused(o, "an fp16 table lent as bf16").find("not this LLM's (bf16"),
              std::string::npos);
    o.embedding_table = nullptr;
    o.embedding_dtype = SF_EMBEDDING_F16;
    o.guard_only = false;
    refused(o, "fp16 embeddings on a full engine");
    sf_cuda_memory m;
    EXPECT_EQ(sf_cuda_engine_plan(&c, &sc, &o, &m), SF_ERR_INVALID_ARGUMENT) << "a full plan";
    o.guard_only = true;
    o.embedding_dtype = (sf_embedding_dtype)7;
    refused(o, "an unknown embedding_dtype");

    // random weights: the same draws in either format
    o.embedding_dtype = SF_EMBEDDING_F16;
    sf_cuda_engine *rh = nullptr, *rb = nullptr;
    ASSERT_EQ(sf_cuda_engine_create_random(&c, &sc, 3, &o, &rh), SF_OK) << sf_last_error();
    EnginePtr random_h(rh);
    o.embedding_dtype = SF_EMBEDDING_BF16;
    ASSERT_EQ(sf_cuda_engine_create_random(&c, &sc, 3, &o, &rb), SF_OK) << sf_last_error();
    EnginePtr random_b(rb);
    const std::vector<uint16_t> xh = guarded_embed(random_h.get(), p, d, 12, 9);
    const std::vector<uint16_t> xb = guarded_embed(random_b.get(), p, d, 12, 9);
    ASSERT_EQ(xh.size(), xb.size());
    int64_t far = 0;
    for (int32_t r = 0; r < p.n(); r++) {
        const int32_t sys0 = p.cu[r] + p.spans[r].prefix, sys1 = sys0 + p.spans[r].system;
        for (int32_t i = p.cu[r]; i < p.cu[r + 1]; i++) {
            if (i >= sys0 && i < sys1) continue;  // plain rows only
            for (int64_t j = 0; j < d; j++) {
                const size_t k = (size_t)(i * d + j);
                const double x = from_bf16(xb[k]), y = from_f16(xh[k]);
                // Both round the same draw u: half an ulp is at most 2^-8 |u| in bf16 (8
                // significant bits) and 2^-11 |u| in fp16 (11), or 2^-25 in fp16's subnormals;
                // |u| <= (1 + 2^-11) |y| + 2^-25.
                far += !(std::fabs(x - y) <= 0x1.3p-8 * std::fabs(y) + 0x1p-24);
            }
        }
    }
    EXPECT_EQ(far, 0) << "the fp16 random table is not the bf16 one's draws";
}

// 9b''. A stack that runs its forward as a CUDA graph captures the guard into it. On the stack's
// own stream a reset of d_errors, sf_cuda_guard_check and sf_cuda_guarded_embed are captured as
// the engine's very first calls (nothing warmed up), and each replay equals the eager calls bit
// for bit, reading what the device buffers hold at replay: a second batch of the same shape
// (other ids and spans, one id outside the vocabulary) written into the same buffers replays
// as its own eager call, with its count and flags. Both formats. The emulated runtime refuses
// inside a capture what CUDA refuses (allocation, synchronisation, pageable copies), so a call
// that did any of those would fail here.
TEST_F(CudaEngineTiny, GuardedEmbedReplaysInsideTheStacksCudaGraph) {
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    // (system, user) per request; lengths 15, 16, 29, 12 in both, so one graph serves both
    const Prompts a = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {0, 4}}, 4);
    Prompts b = tiny_prompts({{2, 5}, {7, 1}, {9, 12}, {0, 4}}, 8);
    b.ids.back() = (int32_t)vocab_;  // request 3's last row: a zero row, counted
    ASSERT_EQ(a.cu, b.cu);
    const int32_t n = a.n(), total = a.total(), max_system = 12, max_user = 12;

    for (sf_embedding_dtype dtype : {SF_EMBEDDING_BF16, SF_EMBEDDING_F16}) {
        SCOPED_TRACE(dtype == SF_EMBEDDING_F16 ? "fp16" : "bf16");
        sf_cuda_engine_options o = options(4);
        o.guard_only = true;
        o.embedding_dtype = dtype;
        EnginePtr e = make_engine(llm_, sf_, o);
        ASSERT_TRUE(e);
        cudaStream_t stream = nullptr;
        ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
        std::unique_ptr<CUstream_st, cudaError_t (*)(cudaStream_t)> stream_guard(
            stream, cudaStreamDestroy);
        DeviceBuffer<int32_t> d_cu(a.cu), d_ids((size_t)total), d_spans((size_t)n * 5),
            d_flags((size_t)n);
        DeviceBuffer<uint16_t> d_out((size_t)total * d), d_ref((size_t)total * d);
        DeviceBuffer<int> d_err(1), d_ref_err(1);
        ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_flags.get() && d_out.get() &&
                    d_ref.get() && d_err.get() && d_ref_err.get());
        // The stack's work for one batch, enqueued on its stream: eager, or into a capture.
        auto enqueue = [&](uint16_t *out, int *err) {
            EXPECT_EQ(cudaMemsetAsync(err, 0, sizeof(int), stream), cudaSuccess);
            EXPECT_EQ(sf_cuda_guard_check(e.get(), n, total, d_cu.get(), d_ids.get(),
                                          (const sf_prompt_spans *)d_spans.get(), max_system,
                                          max_user, d_flags.get(), stream),
                      SF_OK)
                << sf_last_error();
            EXPECT_EQ(sf_cuda_guarded_embed(e.get(), n, total, d_cu.get(), d_ids.get(),
                                            (const sf_prompt_spans *)d_spans.get(), max_system,
                                            max_user, out, err, stream),
                      SF_OK)
                << sf_last_error();
        };

        ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
        enqueue(d_out.get(), d_err.get());
        cudaGraph_t graph = nullptr;
        ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
        ASSERT_FALSE(HasFailure()) << "the capture failed";
        std::unique_ptr<CUgraph_st, cudaError_t (*)(cudaGraph_t)> graph_guard(graph,
                                                                             cudaGraphDestroy);
        cudaGraphExec_t exec = nullptr;
        ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
        std::unique_ptr<CUgraphExec_st, cudaError_t (*)(cudaGraphExec_t)> exec_guard(
            exec, cudaGraphExecDestroy);

        std::vector<uint16_t> replayed_a;
        const Prompts *batches[] = {&a, &b};
        for (const Prompts *p : batches) {
            const bool is_b = p == &b;
            SCOPED_TRACE(is_b ? "batch b" : "batch a");
            ASSERT_EQ(cudaMemcpy(d_ids.get(), p->ids.data(), (size_t)total * 4,
                                 cudaMemcpyHostToDevice),
                      cudaSuccess);
            const std::vector<int32_t> spans = flat_spans(p->spans);
            ASSERT_EQ(cudaMemcpy(d_spans.get(), spans.data(), spans.size() * 4,
                                 cudaMemcpyHostToDevice),
                      cudaSuccess);
            ASSERT_EQ(cudaMemset(d_out.get(), 0xff, (size_t)total * d * 2), cudaSuccess);
            ASSERT_EQ(cudaMemset(d_err.get(), 0x7f, sizeof(int)), cudaSuccess);
            ASSERT_EQ(cudaMemset(d_flags.get(), 0x7f, (size_t)n * 4), cudaSuccess);
            ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
            ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
            const std::vector<uint16_t> replayed = d_out.host();
            const std::vector<int32_t> replayed_flags = d_flags.host();
            const int replayed_err = d_err.host()[0];

            enqueue(d_ref.get(), d_ref_err.get());  // eager
            ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
            EXPECT_EQ(replayed, d_ref.host()) << "the replay differs from the eager call";
            EXPECT_EQ(replayed_err, d_ref_err.host()[0]);
            EXPECT_EQ(replayed_flags, d_flags.host());
            EXPECT_EQ(replayed_err, is_b ? 1 : 0);
            EXPECT_EQ(replayed_flags,
                      (std::vector<int32_t>{0, 0, 0, is_b ? (int32_t)SF_GUARD_BAD_TOKEN : 0}));
            if (is_b) {
                EXPECT_NE(replayed, replayed_a) << "the replay did not read the new batch";
            } else {
                replayed_a = replayed;
            }
        }
    }
}

// 9c. Swapping the Sysformer (sf_cuda_engine_set_sysformer). An engine created with Sysformer A
// and then given B steps exactly as an engine created with B, bit for bit (the same bf16
// weights through the same kernels), B differing from A in its weights and in the settings a
// swap may change (activation, norm_first, layer_norm_eps); its logits before the swap were
// A's. A request prefilled before the swap decodes on exactly as on an engine that kept A (the
// LLM and the caches are untouched). A guard-only engine swaps too. Another shape, an engine
// without a Sysformer and NULL are refused, the engine stepping on unchanged.
TEST_F(CudaEngineTiny, SetSysformerStepsAsAnEngineCreatedWithIt) {
    using SfPtr = std::unique_ptr<sf_sysformer, void (*)(sf_sysformer *)>;
    sf_sysformer_config bc = *sf_sysformer_get_config(sf_);
    ASSERT_EQ(bc.activation, SF_ACT_RELU);
    ASSERT_TRUE(bc.norm_first);
    bc.activation = SF_ACT_GELU;
    bc.norm_first = false;
    bc.layer_norm_eps = 1e-6f;
    sf_sysformer *raw = nullptr;
    ASSERT_TRUE(make_open_sysformer_with(llm_, bc, 23, &raw));
    SfPtr b(raw, sf_sysformer_free);
    ASSERT_TRUE(make_open_sysformer(llm_, 29, &raw, 1));
    SfPtr one_layer(raw, sf_sysformer_free);

    EnginePtr x = make_engine(llm_, sf_, options(4));   // A, then B
    EnginePtr kept = make_engine(llm_, sf_, options(4));  // A throughout
    EnginePtr y = make_engine(llm_, b.get(), options(4)); // B from the start
    ASSERT_TRUE(x && kept && y);

    const Prompts q = tiny_prompts({{6, 3}}, 31);  // slot 0, before the swap
    const Prompts p = tiny_prompts({{5, 2}, {12, 9}}, 37);
    StepOut q_x, q_kept, before, after, want;
    ASSERT_TRUE(prefill(x.get(), q, {0}, true, vocab_, &q_x));
    ASSERT_TRUE(prefill(kept.get(), q, {0}, true, vocab_, &q_kept));
    ASSERT_TRUE(prefill(x.get(), p, {1, 2}, true, vocab_, &before));
    ASSERT_EQ(sf_cuda_engine_reset_slot(x.get(), 1), SF_OK);
    ASSERT_EQ(sf_cuda_engine_reset_slot(x.get(), 2), SF_OK);

    ASSERT_EQ(sf_cuda_engine_set_sysformer(x.get(), b.get()), SF_OK) << sf_last_error();
    ASSERT_TRUE(prefill(x.get(), p, {1, 2}, true, vocab_, &after));
    ASSERT_TRUE(prefill(y.get(), p, {1, 2}, true, vocab_, &want));
    EXPECT_EQ(after.logits, want.logits) << "after the swap the logits are not B's";
    EXPECT_EQ(after.tokens, want.tokens);
    EXPECT_NE(before.logits, want.logits) << "A and B give the same logits: the test is void";

    StepOut d_x, d_kept;
    ASSERT_TRUE(decode(x.get(), {0}, vocab_, &d_x));
    ASSERT_TRUE(decode(kept.get(), {0}, vocab_, &d_kept));
    EXPECT_EQ(q_x.tokens, q_kept.tokens);
    EXPECT_EQ(d_x.logits, d_kept.logits) << "the swap disturbed a request already in a slot";

    // refusals leave the engine as it was: the same step gives B's logits again
    EXPECT_EQ(sf_cuda_engine_set_sysformer(x.get(), one_layer.get()), SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(sf_last_error()).find("2 layers"), std::string::npos) << sf_last_error();
    EXPECT_EQ(sf_cuda_engine_set_sysformer(x.get(), nullptr), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_engine_set_sysformer(nullptr, b.get()), SF_ERR_INVALID_ARGUMENT);
    ASSERT_EQ(sf_cuda_engine_reset_slot(x.get(), 1), SF_OK);
    ASSERT_EQ(sf_cuda_engine_reset_slot(x.get(), 2), SF_OK);
    StepOut again;
    ASSERT_TRUE(prefill(x.get(), p, {1, 2}, true, vocab_, &again));
    EXPECT_EQ(again.logits, want.logits) << "a refused swap changed the engine";
    EnginePtr plain = make_engine(llm_, nullptr, options(2));
    ASSERT_TRUE(plain);
    EXPECT_EQ(sf_cuda_engine_set_sysformer(plain.get(), b.get()), SF_ERR_INVALID_ARGUMENT);

    // a guard-only engine (a serving stack's) swaps as well
    sf_cuda_engine_options g = options(4);
    g.guard_only = true;
    EnginePtr guard_x = make_engine(llm_, sf_, g), guard_y = make_engine(llm_, b.get(), g);
    ASSERT_TRUE(guard_x && guard_y);
    ASSERT_EQ(sf_cuda_engine_set_sysformer(guard_x.get(), b.get()), SF_OK) << sf_last_error();
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    const std::vector<uint16_t> got = guarded_embed(guard_x.get(), p, d, 12, 9);
    ASSERT_FALSE(got.empty());
    EXPECT_EQ(got, guarded_embed(guard_y.get(), p, d, 12, 9))
        << "the guard-only engine's embeddings after the swap are not B's";
}

// 9d. Engines sharing one LLM upload (sf_cuda_engine_create_sharing). From a base engine
// without a Sysformer: one with Sysformer A, one with B (other options), one without; each
// steps bit for bit as an engine created with the same LLM, Sysformer and options (prefill,
// then a decode step), and holds none of the LLM's weights (what it reports, against the
// engines created whole: the two differ by the Sysformer's bytes and at most the alignment
// of the LLM's last tensor). The base is then freed first: the sharing engines decode on
// exactly as before. A guard-only engine shares a sharing engine's LLM and embeds as one
// created whole. Every refused combination says why and leaves *out NULL.
TEST_F(CudaEngineTiny, SharingEnginesStepAsEnginesCreatedWholeOnOneLlmCopy) {
    using SfPtr = std::unique_ptr<sf_sysformer, void (*)(sf_sysformer *)>;
    sf_sysformer *raw = nullptr;
    ASSERT_TRUE(make_open_sysformer(llm_, 23, &raw));
    SfPtr b(raw, sf_sysformer_free);
    auto share = [](const sf_cuda_engine *base, const sf_sysformer *sf,
                    const sf_cuda_engine_options &o) {
        sf_cuda_engine *e = nullptr;
        const sf_status st = sf_cuda_engine_create_sharing(base, sf, &o, &e);
        EXPECT_EQ(st, SF_OK) << sf_status_string(st) << ": " << sf_last_error();
        return EnginePtr(st == SF_OK ? e : nullptr);
    };
    auto memory = [](const sf_cuda_engine *e) {
        sf_cuda_memory m = {};
        EXPECT_EQ(sf_cuda_engine_memory(e, &m), SF_OK) << sf_last_error();
        return m;
    };
    const sf_cuda_engine_options oa = options(4), ob = options(2, 64, 96), on = options(4);
    EnginePtr base = make_engine(llm_, nullptr, on);
    ASSERT_TRUE(base);
    EnginePtr a = share(base.get(), sf_, oa), sb = share(base.get(), b.get(), ob),
              none = share(base.get(), nullptr, on);
    EnginePtr whole_a = make_engine(llm_, sf_, oa), whole_b = make_engine(llm_, b.get(), ob);
    ASSERT_TRUE(a && sb && none && whole_a && whole_b);

    const sf_cuda_memory m_base = memory(base.get()), m_a = memory(a.get());
    const sf_cuda_memory m_whole = memory(whole_a.get()), m_none = memory(none.get());
    EXPECT_GT(m_a.weights, 0u);
    EXPECT_LE(m_a.weights + m_base.weights, m_whole.weights);
    EXPECT_LT(m_whole.weights - m_base.weights - m_a.weights, 256u)
        << "a sharing engine holds more than its Sysformer";
    EXPECT_EQ(m_a.kv_cache, m_whole.kv_cache);
    EXPECT_EQ(m_a.activations, m_whole.activations);
    EXPECT_EQ(m_none.weights, 0u) << "an engine sharing the LLM without a Sysformer";

    const Prompts p = tiny_prompts({{5, 2}, {12, 9}}, 37);
    struct Pair {
        sf_cuda_engine *shared, *whole;
        const char *name;
    };
    EnginePtr whole_none = make_engine(llm_, nullptr, on);
    ASSERT_TRUE(whole_none);
    const Pair pairs[] = {{a.get(), whole_a.get(), "Sysformer A"},
                          {sb.get(), whole_b.get(), "Sysformer B, other options"},
                          {none.get(), whole_none.get(), "no Sysformer"}};
    std::vector<std::vector<float>> first;
    for (const Pair &q : pairs) {
        SCOPED_TRACE(q.name);
        const bool guarded = q.shared != none.get();
        StepOut got, want;
        ASSERT_TRUE(prefill(q.shared, p, {0, 1}, guarded, vocab_, &got));
        ASSERT_TRUE(prefill(q.whole, p, {0, 1}, guarded, vocab_, &want));
        EXPECT_EQ(got.logits, want.logits);
        EXPECT_EQ(got.tokens, want.tokens);
        ASSERT_TRUE(decode(q.shared, {0, 1}, vocab_, &got));
        ASSERT_TRUE(decode(q.whole, {0, 1}, vocab_, &want));
        EXPECT_EQ(got.logits, want.logits) << "decode";
        first.push_back(want.logits);
    }
    EXPECT_NE(first[0], first[1]) << "Sysformers A and B give the same logits: the test is void";

    base.reset();  // freed first: the LLM stays for the engines that read it
    for (const Pair &q : pairs) {
        SCOPED_TRACE(std::string(q.name) + ", after the base was freed");
        StepOut got, want;
        ASSERT_TRUE(decode(q.shared, {0, 1}, vocab_, &got));
        ASSERT_TRUE(decode(q.whole, {0, 1}, vocab_, &want));
        EXPECT_EQ(got.logits, want.logits);
        EXPECT_EQ(got.tokens, want.tokens);
    }

    // a guard-only engine sharing a sharing engine's LLM (now held only by the sharers)
    sf_cuda_engine_options g = options(4);
    g.guard_only = true;
    EnginePtr guard = share(a.get(), b.get(), g), guard_whole = make_engine(llm_, b.get(), g);
    ASSERT_TRUE(guard && guard_whole);
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    const std::vector<uint16_t> embedded = guarded_embed(guard.get(), p, d, 12, 9);
    ASSERT_FALSE(embedded.empty());
    EXPECT_EQ(embedded, guarded_embed(guard_whole.get(), p, d, 12, 9));

    // refusals
    auto refused = [&](const char *what, const sf_cuda_engine *from,
                       const sf_cuda_engine_options *o, sf_status want, const char *says) {
        sf_cuda_engine *e = reinterpret_cast<sf_cuda_engine *>(&e);  // anything but NULL
        const sf_status st = sf_cuda_engine_create_sharing(from, sf_, o, &e);
        EXPECT_EQ(st, want) << what << ": " << sf_status_string(st) << ": " << sf_last_error();
        EXPECT_EQ(e, nullptr) << what;
        EXPECT_TRUE(contains(sf_last_error(), says)) << what << ": " << sf_last_error();
    };
    refused("NULL base", nullptr, &oa, SF_ERR_INVALID_ARGUMENT, "NULL base");
    EXPECT_EQ(sf_cuda_engine_create_sharing(a.get(), sf_, &oa, nullptr), SF_ERR_INVALID_ARGUMENT);
    sf_cuda_engine_options o = oa;
    o.device = 1;
    refused("another device", a.get(), &o, SF_ERR_INVALID_ARGUMENT, "on device 0");
    std::vector<uint16_t> table((size_t)vocab_ * (size_t)d);
    o = g;
    o.embedding_table = table.data();
    refused("a table of its own", a.get(), &o, SF_ERR_INVALID_ARGUMENT, "no table of its own");
    o = g;
    o.embedding_dtype = SF_EMBEDDING_F16;
    refused("fp16 embeddings over a bf16 LLM", a.get(), &o, SF_ERR_INVALID_ARGUMENT,
            "bf16 embeddings");
    refused("a full engine over a guard-only one", guard.get(), &oa, SF_ERR_INVALID_ARGUMENT,
            "guard-only");
    o = oa;
    o.max_context = sf_llm_get_config(llm_)->max_position_embeddings + 1;
    refused("a context past the model's", a.get(), &o, SF_ERR_INVALID_ARGUMENT,
            "max_position_embeddings");
    o = oa;
    o.max_slots = 0;
    refused("no slots", a.get(), &o, SF_ERR_INVALID_ARGUMENT, "max_slots 0");

    StepOut got, want;  // the sharers step on, unharmed
    ASSERT_TRUE(decode(a.get(), {0, 1}, vocab_, &got));
    ASSERT_TRUE(decode(whole_a.get(), {0, 1}, vocab_, &want));
    EXPECT_EQ(got.logits, want.logits);
}

// ------------------------------------------------------------------------------------------
// Per-request sampling (sf_cuda_step.request_sampling, sf_generation.request_sampling)
// ------------------------------------------------------------------------------------------

// Five requests, three distinct settings, interleaved: greedy (t 0, and t -1), plain sampling
// at t 0.9 (written once with top_k and top_p both off, once with top_k 500 > vocab and top_p
// 1.5, which act alike), and top-k 5 with top-p 0.8 at t 1.3. Greedy requests carry draws
// outside [0, 1), which the engine must not read.
const std::vector<sf_sampling> kMix = {{0.9f, 0, 1.0f, 0, false, 0},
                                       {0.0f, 0, 1.0f, 0, false, 0},
                                       {1.3f, 5, 0.8f, 0, false, 0},
                                       {0.9f, 500, 1.5f, 0, false, 0},
                                       {-1.0f, 3, 0.5f, 0, false, 0}};

std::vector<double> draws(const std::vector<sf_sampling> &set, uint64_t seed) {
    Uniform rng(seed);
    std::vector<double> u;
    for (const sf_sampling &s : set) u.push_back(s.temperature > 0.0f ? rng.unit() : 7.0);
    return u;
}

// 10a. One guarded prefill with per-request settings: the engine runs the requests grouped by
// setting and hands everything back in the caller's order. Each request's logits are those of
// the same batch stepped greedily in the caller's order, within 2b: the two steps hold the
// rows in other orders, and a GEMM algorithm that splits the reduction per tile (split-K,
// stream-K) may sum a row in another order at another place, so only the bf16 bound holds
// for both (each within b of the same truth). Another request's logits are much further off
// (checked), so a row handed back to the wrong request fails. Each pick is what the device
// sampler picks from that request's row of the step's own logits with its own setting and
// draw (exact: the same kernels on the same numbers). Reading fewer tokens than the step has
// gives the first requests'. Refused: sampling and request_sampling together, a sampling
// request without uniforms or with a draw outside [0, 1), an infinite temperature; no slot
// changes.
TEST_F(CudaEngineTiny, PerRequestSamplingRunsGroupedAndAnswersInOrder) {
    EnginePtr e = make_engine(llm_, sf_, options(6));
    EnginePtr ref = make_engine(llm_, sf_, options(6));
    ASSERT_TRUE(e && ref);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {3, 4}, {6, 6}}, 51);
    const std::vector<int32_t> slots = {4, 0, 2, 1, 5};
    const std::vector<double> u = draws(kMix, 52);

    // refusals first, on empty slots
    {
        sf_cuda_step s = {};
        s.n_requests = p.n();
        s.slots = slots.data();
        s.cu_seqlens = p.cu.data();
        s.token_ids = p.ids.data();
        s.spans = p.spans.data();
        s.request_sampling = kMix.data();
        s.uniforms = u.data();
        s.sampling = &kGreedy;
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT) << "both settings";
        s.sampling = nullptr;
        s.uniforms = nullptr;
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT) << "no uniforms";
        EXPECT_NE(std::string(sf_last_error()).find("request 0"), std::string::npos)
            << sf_last_error();
        std::vector<double> bad = u;
        bad[2] = 1.0;
        s.uniforms = bad.data();
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT) << "u = 1";
        std::vector<sf_sampling> hot = kMix;
        hot[3].temperature = INFINITY;
        s.request_sampling = hot.data();
        s.uniforms = u.data();
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT) << "temperature inf";
        EXPECT_NE(std::string(sf_last_error()).find("request 3's temperature is infinite"),
                  std::string::npos)
            << sf_last_error();
        for (int32_t slot = 0; slot < 6; slot++) {
            EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), slot), 0) << "a refusal filled a slot";
        }
    }

    StepOut got, want;
    ASSERT_TRUE(sampled_step(e.get(), &p, slots, kMix, u, vocab_, &got));
    ASSERT_TRUE(prefill(ref.get(), p, slots, true, vocab_, &want));
    const double b2 = 2.0 * logit_bound(sf_llm_get_config(llm_)->num_layers,
                                        sf_sysformer_get_config(sf_)->num_layers);
    for (int32_t r = 0; r < p.n(); r++) {
        const double rel = rel_error(got.row(r, vocab_), want.row(r, vocab_), (size_t)vocab_);
        EXPECT_LE(rel, b2) << "request " << r << ": its logits are not its own";
        for (int32_t q = 0; q < p.n(); q++) {
            if (q == r) continue;
            EXPECT_GT(rel_error(got.row(r, vocab_), want.row(q, vocab_), (size_t)vocab_), 2 * b2)
                << "requests " << r << " and " << q << " cannot be told apart: the test is void";
        }
        EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), slots[r]), p.len(r)) << "request " << r;
    }
    const std::vector<int32_t> picks = device_picks(got, kMix, u, vocab_);
    EXPECT_EQ(got.tokens, picks);
    std::vector<int32_t> first(2, -1);
    ASSERT_EQ(sf_cuda_engine_read_tokens(e.get(), first.data(), 2), SF_OK) << sf_last_error();
    EXPECT_EQ(first, std::vector<int32_t>(got.tokens.begin(), got.tokens.begin() + 2));
    // Not vacuous: the sampled picks are not all the greedy ones.
    EXPECT_NE(want.tokens, got.tokens);
}

// 10b. Decode steps whose mix of settings changes, on a graph engine and an eager one: three
// groups (the graph holds the forward, the passes follow), one setting for all (the pass
// inside the graph), another one for all (captured again), two groups twice (captured once,
// then replayed with other draws and another order), two other groups (the same graph, other
// passes after it), then three of the requests; last, at a new batch size, a decode step
// without sampling, a prefill chunk, and decode steps with two groups. Every step: the same
// tokens and bit-identical logits on both engines, and each pick the device sampler's for its
// request.
TEST_F(CudaEngineTiny, PerRequestSamplingDecodeGraphsEqualEager) {
    EnginePtr g = make_engine(llm_, sf_, options(6, 0, 0, true));
    EnginePtr x = make_engine(llm_, sf_, options(6, 0, 0, false));
    ASSERT_TRUE(g && x);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {3, 4}, {6, 6}}, 53);
    const std::vector<int32_t> all = {4, 0, 2, 1, 5};
    const sf_sampling hot = {0.9f, 0, 1.0f, 0, false, 0}, warm = {1.3f, 5, 0.8f, 0, false, 0};
    const sf_sampling cold = {0.0f, 0, 1.0f, 0, false, 0};
    struct Step {
        std::vector<int32_t> slots;
        std::vector<sf_sampling> set;
    };
    const std::vector<Step> schedule = {
        {all, kMix},
        {all, {hot, hot, hot, hot, hot}},
        {all, {warm, warm, warm, warm, warm}},
        {all, {warm, warm, cold, warm, warm}},
        {{5, 2, 4, 0, 1}, {cold, warm, warm, warm, warm}},
        {all, {cold, hot, hot, cold, hot}},
        {{2, 0, 5}, {warm, cold, hot}},
        {{2, 0, 5}, {warm, cold, hot}},
    };
    StepOut pg, px;
    const std::vector<double> u0 = draws(kMix, 54);
    ASSERT_TRUE(sampled_step(g.get(), &p, all, kMix, u0, vocab_, &pg));
    ASSERT_TRUE(sampled_step(x.get(), &p, all, kMix, u0, vocab_, &px));
    EXPECT_EQ(pg.tokens, px.tokens);
    for (size_t k = 0; k < schedule.size(); k++) {
        const Step &st = schedule[k];
        const std::vector<double> u = draws(st.set, 60 + k);
        StepOut og, ox;
        ASSERT_TRUE(sampled_step(g.get(), nullptr, st.slots, st.set, u, vocab_, &og)) << k;
        ASSERT_TRUE(sampled_step(x.get(), nullptr, st.slots, st.set, u, vocab_, &ox)) << k;
        EXPECT_EQ(og.tokens, ox.tokens) << "step " << k;
        EXPECT_EQ(0, memcmp(og.logits.data(), ox.logits.data(), og.logits.size() * sizeof(float)))
            << "step " << k << ": the graph's logits differ from the eager ones";
        EXPECT_EQ(ox.tokens, device_picks(ox, st.set, u, vocab_)) << "step " << k;
    }

    // A decode step without sampling captures the forward of two requests (a batch size not
    // seen before) with no draws to upload; once a prefill chunk has sampled the slots again,
    // a decode step with two groups replays that graph, so its passes must upload their own
    // draws.
    const std::vector<int32_t> two = {2, 0};
    for (auto *e : {g.get(), x.get()}) {
        sf_cuda_step s = {};
        s.n_requests = 2;
        s.slots = two.data();
        ASSERT_EQ(sf_cuda_engine_step(e, &s), SF_OK) << sf_last_error();
    }
    std::vector<float> logits_g((size_t)2 * vocab_), logits_x((size_t)2 * vocab_);
    ASSERT_EQ(sf_cuda_engine_read_logits(g.get(), logits_g.data(), 2), SF_OK);
    ASSERT_EQ(sf_cuda_engine_read_logits(x.get(), logits_x.data(), 2), SF_OK);
    EXPECT_EQ(logits_g, logits_x) << "logits-only decode";
    Prompts chunk;
    for (int32_t t : {7, 8}) chunk.add({t}, sf_prompt_spans{0, 0, 0, 0, 1});
    const std::vector<sf_sampling> mix2 = {warm, hot};
    StepOut cg, cx;
    const std::vector<double> uc = draws(mix2, 80);
    ASSERT_TRUE(sampled_step(g.get(), &chunk, two, mix2, uc, vocab_, &cg));
    ASSERT_TRUE(sampled_step(x.get(), &chunk, two, mix2, uc, vocab_, &cx));
    EXPECT_EQ(cg.tokens, cx.tokens) << "prefill chunk";
    for (uint64_t k = 0; k < 3; k++) {
        StepOut dg, dx;
        const std::vector<double> ud = draws(mix2, 81 + k);
        ASSERT_TRUE(sampled_step(g.get(), nullptr, two, mix2, ud, vocab_, &dg));
        ASSERT_TRUE(sampled_step(x.get(), nullptr, two, mix2, ud, vocab_, &dx));
        EXPECT_EQ(dg.tokens, dx.tokens) << "decode " << k << " after a logits-only graph";
        EXPECT_EQ(dx.tokens, device_picks(dx, mix2, ud, vocab_)) << "decode " << k;
    }
}

// 10c. sf_generate_cuda with request_sampling: each request draws from its own stream (started
// from its setting's seed, one draw per sampled token, none for a greedy one), whatever
// g.sampling says. Shown by replaying the generation's steps by hand with the draws taken from
// those streams (the same tokens, bit for bit: the same computation), and by sf_sample, the
// CPU reference, which takes its draw from the same stream: given each step's logits it picks
// every token the engine picked (the device sampler differs from it only within ~1e-11 of a
// boundary of the draw, see kernels/sampling.cu).
TEST_F(CudaEngineTiny, GenerateSamplesEachRequestWithItsOwnSettingAndStream) {
    EnginePtr e = make_engine(llm_, sf_, options(5));
    ASSERT_TRUE(e);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {5, 2}}, 55);
    // requests 1 and 2 also ask for their tokens' log-probabilities
    const std::vector<sf_sampling> set = {{1.1f, 0, 1.0f, 5, false, 0},
                                          {0.0f, 0, 1.0f, 0, true, 0},
                                          {0.8f, 4, 0.9f, 77, true, 0},
                                          {1.1f, 0, 1.0f, 6, false, 0}};
    const int32_t n = p.n(), max_new = 6;
    sf_generation gen = generation_of(p, max_new);
    gen.sampling = {2.0f, 2, 0.3f, 999, true, 0};  // overridden
    gen.request_sampling = set.data();
    std::vector<sf_generation_result> res((size_t)n);
    ASSERT_EQ(sf_generate_cuda(e.get(), nullptr, &gen, nullptr, nullptr, res.data()), SF_OK)
        << sf_last_error();
    std::vector<std::vector<int32_t>> tokens;
    std::vector<std::vector<float>> logprobs;
    for (int32_t r = 0; r < n; r++) {
        tokens.emplace_back(res[r].tokens, res[r].tokens + res[r].n_tokens);
        EXPECT_EQ(res[r].n_tokens, max_new);
        EXPECT_EQ(res[r].logprobs != nullptr, set[r].logprobs) << "request " << r;
        logprobs.emplace_back();
        if (res[r].logprobs) logprobs[r].assign(res[r].logprobs, res[r].logprobs + max_new);
    }
    free_results(&res);

    std::vector<int32_t> slots((size_t)n);
    std::vector<uint64_t> stream((size_t)n), cpu_stream((size_t)n);
    for (int32_t r = 0; r < n; r++) {
        slots[r] = r;
        stream[r] = cpu_stream[r] = set[r].seed;
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), r), SF_OK);
    }
    for (int32_t j = 0; j < max_new; j++) {
        std::vector<double> u((size_t)n, 0.0);
        for (int32_t r = 0; r < n; r++) {
            if (set[r].temperature > 0.0f) {
                sf_rng rng = sf_rng_seed(stream[r]);
                u[r] = sf_rng_uniform(&rng);
                stream[r] = rng.state;
            }
        }
        StepOut o;
        ASSERT_TRUE(sampled_step(e.get(), j ? nullptr : &p, slots, set, u, vocab_, &o));
        std::vector<float> lp((size_t)n);
        ASSERT_EQ(sf_cuda_engine_read_logprobs(e.get(), lp.data(), n), SF_OK) << sf_last_error();
        for (int32_t r = 0; r < n; r++) {
            EXPECT_EQ(o.tokens[r], tokens[r][j]) << "request " << r << " token " << j;
            if (set[r].logprobs) {  // the same step on the same engine: the same bits
                EXPECT_EQ(lp[r], logprobs[r][j]) << "request " << r << " token " << j;
            }
            int32_t cpu = -1;
            ASSERT_EQ(sf_sample(o.row(r, vocab_), (int32_t)vocab_, &set[r], &cpu_stream[r], &cpu),
                      SF_OK);
            EXPECT_EQ(cpu, o.tokens[r]) << "request " << r << " token " << j << ": sf_sample";
        }
    }
    // Not vacuous: requests 0 and 3 share a prompt and a setting but not a seed.
    EXPECT_NE(tokens[0], tokens[3]);
}

// 10d. sf_generate_cuda with request_max_new_tokens {6, 6, 3}: each request stops at its own
// length (finish: length). Until request 2 stops the steps are those of a run where every
// request gets 6 (the same batches on the same engine: the same bits), so every request's
// first 3 tokens are that run's; after it the other two run on in smaller steps, whose
// cuBLASLt algorithms may differ, so only their lengths are checked there.
TEST_F(CudaEngineTiny, GenerateStopsEachRequestAtItsOwnLimit) {
    EnginePtr e = make_engine(llm_, sf_, options(4));
    ASSERT_TRUE(e);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}}, 63);
    sf_generation gen = generation_of(p, 6);
    auto generate = [&](std::vector<sf_generation_result> *res) {
        res->assign((size_t)p.n(), sf_generation_result{});
        return sf_generate_cuda(e.get(), nullptr, &gen, nullptr, nullptr, res->data());
    };
    std::vector<sf_generation_result> full, own;
    ASSERT_EQ(generate(&full), SF_OK) << sf_last_error();
    const std::vector<int32_t> limit = {6, 6, 3};
    gen.request_max_new_tokens = limit.data();
    const sf_status st = generate(&own);
    const FreeResults free_all{{&full, &own}};
    ASSERT_EQ(st, SF_OK) << sf_last_error();
    for (int32_t r = 0; r < p.n(); r++) {
        ASSERT_EQ(own[r].n_tokens, limit[r]) << "request " << r;
        EXPECT_EQ(own[r].finish, SF_FINISH_LENGTH) << "request " << r;
        EXPECT_EQ(std::vector<int32_t>(own[r].tokens, own[r].tokens + 3),
                  std::vector<int32_t>(full[r].tokens, full[r].tokens + 3))
            << "request " << r;
    }
    const std::vector<int32_t> bad = {6, -1, 3};
    gen.request_max_new_tokens = bad.data();
    std::vector<sf_generation_result> none((size_t)p.n());
    EXPECT_EQ(sf_generate_cuda(e.get(), nullptr, &gen, nullptr, nullptr, none.data()),
              SF_ERR_INVALID_ARGUMENT);
}

// 10e. Log-probabilities from steps: each is its token's under the step's own logits (read
// back), within the fp32 bound of the kernel that takes them (logprob_bound), handed back in the
// caller's order. In turn: a guarded prefill whose requests run grouped by setting (some ask,
// some not: every request gets one); decode steps with one setting not asking (a graph without
// them: reading them is refused), then asking (another graph, taking them inside: had the
// first been replayed, the values read would be the prefill's), replayed; not asking and
// asking again (each graph replayed); asking for the 3, then 5, then 3 most likely tokens
// (each a graph of its own: the values read are checked, so a graph replayed for another n
// would fail); two groups (the passes after the graph) asking for up to 5. Every row gets the
// largest number asked, its ids exactly sf_top_logprobs's over the step's logits. An eager
// engine gives the same values bit for bit. A setting asking for more than
// SF_MAX_TOP_LOGPROBS is refused before anything runs.
TEST_F(CudaEngineTiny, LogprobsAreThoseOfTheStepsOwnLogits) {
    EnginePtr g = make_engine(llm_, sf_, options(6, 0, 0, true));
    EnginePtr x = make_engine(llm_, sf_, options(6, 0, 0, false));
    ASSERT_TRUE(g && x);
    const Prompts p = tiny_prompts({{5, 2}, {1, 7}, {12, 9}, {3, 4}, {6, 6}}, 57);
    const std::vector<int32_t> slots = {4, 0, 2, 1, 5};
    std::vector<sf_sampling> mix = kMix;
    mix[0].logprobs = mix[2].logprobs = true;
    mix[3].top_logprobs = 4;  // and the most likely tokens (every row gets them)
    sf_sampling hot = {0.9f, 0, 1.0f, 0, true, 0}, cold = {0.0f, 0, 1.0f, 0, true, 0};
    sf_sampling hot_quiet = hot, hot_top3 = hot, hot_top5 = hot, cold_top = cold;
    hot_quiet.logprobs = false;
    hot_top3.top_logprobs = 3;
    hot_top5.top_logprobs = 5;
    hot_top5.logprobs = false;  // implied
    cold_top.top_logprobs = 2;
    struct Step {
        std::vector<sf_sampling> set;
        bool asks;
        int32_t n_top;
    };
    const std::vector<Step> decode_steps = {
        {{hot_quiet, hot_quiet, hot_quiet, hot_quiet, hot_quiet}, false, 0},
        {{hot, hot, hot, hot, hot}, true, 0},
        {{hot, hot, hot, hot, hot}, true, 0},
        {{hot_quiet, hot_quiet, hot_quiet, hot_quiet, hot_quiet}, false, 0},
        {{hot, hot, hot, hot, hot}, true, 0},
        {{hot_top3, hot_top3, hot_top3, hot_top3, hot_top3}, true, 3},
        {{hot_top5, hot_top5, hot_top5, hot_top5, hot_top5}, true, 5},
        {{hot_top3, hot_top3, hot_top3, hot_top3, hot_top3}, true, 3},
        {{cold, hot_quiet, cold_top, hot, hot_top5}, true, 5},
    };
    {
        std::vector<sf_sampling> bad = mix;
        bad[1].top_logprobs = SF_MAX_TOP_LOGPROBS + 1;
        StepOut o;
        EXPECT_FALSE(sampled_step(g.get(), &p, slots, bad, draws(bad, 58), vocab_, &o));
        EXPECT_NE(std::string(sf_last_error()).find("top_logprobs"), std::string::npos)
            << sf_last_error();
        EXPECT_EQ(sf_cuda_engine_slot_length(g.get(), slots[0]), 0) << "a refusal ran a step";
    }
    std::vector<std::vector<float>> seen[2];  // each pass's values, step after step
    for (int pass = 0; pass < 2; pass++) {
        SCOPED_TRACE(pass == 0 ? "graphs" : "eager");
        sf_cuda_engine *e = pass == 0 ? g.get() : x.get();
        StepOut o;
        const std::vector<double> u0 = draws(mix, 58);
        ASSERT_TRUE(sampled_step(e, &p, slots, mix, u0, vocab_, &o));
        seen[pass].push_back(expect_logprobs_of(e, o, vocab_, "prefill", 4));
        std::vector<float> lp(6);
        EXPECT_EQ(sf_cuda_engine_read_logprobs(e, lp.data(), 6), SF_ERR_INVALID_ARGUMENT)
            << "more than the step has";
        EXPECT_EQ(sf_cuda_engine_read_logprobs(e, nullptr, 1), SF_ERR_INVALID_ARGUMENT);
        for (size_t k = 0; k < decode_steps.size(); k++) {
            const std::vector<double> u = draws(decode_steps[k].set, 59 + k);
            ASSERT_TRUE(sampled_step(e, nullptr, slots, decode_steps[k].set, u, vocab_, &o));
            const std::string what = "decode " + std::to_string(k);
            if (decode_steps[k].asks) {
                seen[pass].push_back(expect_logprobs_of(e, o, vocab_, what,
                                                        decode_steps[k].n_top));
                if (decode_steps[k].n_top == 0) {
                    int32_t id;
                    EXPECT_EQ(sf_cuda_engine_read_top_logprobs(e, &id, lp.data(), 1, 1),
                              SF_ERR_INVALID_ARGUMENT)
                        << what << ": no request asked for the most likely tokens";
                }
            } else {
                EXPECT_EQ(sf_cuda_engine_read_logprobs(e, lp.data(), 1), SF_ERR_INVALID_ARGUMENT)
                    << what << ": no request asked";
                EXPECT_NE(std::string(sf_last_error()).find("logprobs"), std::string::npos)
                    << sf_last_error();
            }
        }
        // a step without sampling takes none
        sf_cuda_step s = {};
        s.n_requests = 2;
        s.slots = slots.data();
        ASSERT_EQ(sf_cuda_engine_step(e, &s), SF_OK) << sf_last_error();
        EXPECT_EQ(sf_cuda_engine_read_logprobs(e, lp.data(), 1), SF_ERR_INVALID_ARGUMENT);
    }
    ASSERT_EQ(seen[0].size(), seen[1].size());
    for (size_t k = 0; k < seen[0].size(); k++) {
        EXPECT_EQ(0, memcmp(seen[0][k].data(), seen[1][k].data(), seen[0][k].size() * 4))
            << "step " << k << ": the graph engine's values differ from the eager one's";
    }
}

// 9d. sf_set_progress during creation: "uploading weights" rises from 0 to the bf16 bytes of
// every parameter uploaded (the LLM's, tied tables once, and the Sysformer's without its
// classifier), and reaches them only once the upload has finished. A guard-only engine on a
// borrowed table uploads the Sysformer alone.
TEST_F(CudaEngineTiny, CreationReportsTheUploadsProgress) {
    struct Log {
        std::vector<std::pair<uint64_t, uint64_t>> events;
        bool other_what = false;
        static void record(void *user, const char *what, uint64_t done, uint64_t total) {
            Log *l = static_cast<Log *>(user);
            l->events.emplace_back(done, total);
            l->other_what |= strcmp(what, "uploading weights") != 0;
        }
    };
    const sf_llm_config &c = *sf_llm_get_config(llm_);
    const sf_sysformer_config &sc = *sf_sysformer_get_config(sf_);
    auto check = [](const Log &log, uint64_t want_total, const char *what) {
        ASSERT_GE(log.events.size(), 3u) << what;
        EXPECT_FALSE(log.other_what) << what;
        EXPECT_EQ(log.events.front().first, 0u) << what;
        EXPECT_EQ(log.events.back().first, want_total) << what;
        for (size_t i = 0; i < log.events.size(); i++) {
            EXPECT_EQ(log.events[i].second, want_total) << what;
            if (i > 0) {
                EXPECT_GE(log.events[i].first, log.events[i - 1].first) << what;
            }
        }
    };
    Log full;
    sf_set_progress(Log::record, &full);
    EnginePtr e = make_engine(llm_, sf_, options(2));
    sf_set_progress(nullptr, nullptr);
    ASSERT_TRUE(e);
    check(full, 2 * (uint64_t)(llm_params(c, false) + sysformer_params(sc, false)), "full");

    DeviceBuffer<uint16_t> d_table(to_bf16(embedding_table()));
    sf_cuda_engine_options o = options(2);
    o.guard_only = true;
    o.embedding_table = d_table.get();
    Log guard;
    sf_set_progress(Log::record, &guard);
    EnginePtr g = make_engine(llm_, sf_, o);
    sf_set_progress(nullptr, nullptr);
    ASSERT_TRUE(g);
    check(guard, 2 * (uint64_t)sysformer_params(sc, false), "guard-only on a borrowed table");
}

// 10. Stage timing: sane numbers, never speed. Eager steps report their stages; a decode step
// replayed as a CUDA graph reports 0 for every stage and its whole time as total. The times
// name their step: the engine's steps are numbered from 1, a refused step is not one, and
// reading twice reads the same step.
TEST_F(CudaEngineTiny, StageTimesAreSane) {
    auto sane = [](const sf_cuda_stage_times &t, const std::string &what) {
        const float st[6] = {t.upload_ms, t.embed_ms, t.sysformer_ms, t.layers_ms, t.head_ms,
                             t.sample_ms};
        double sum = 0;
        for (float v : st) {
            EXPECT_TRUE(std::isfinite(v) && v >= 0.0f) << what << ": a stage reads " << v;
            sum += v;
        }
        EXPECT_TRUE(std::isfinite(t.total_ms) && t.total_ms > 0.0f) << what << ": " << t.total_ms;
        EXPECT_GE(t.total_ms, 0.5 * sum) << what << ": total below the stages' sum " << sum;
        EXPECT_LT(t.total_ms, 60000.0f) << what;
    };
    const Prompts p = tiny_prompts({{5, 2}, {12, 9}}, 48);
    for (bool graphs : {true, false}) {
        const std::string mode = graphs ? "graphs" : "eager";
        EnginePtr e = make_engine(llm_, sf_, options(2, 0, 0, graphs));
        ASSERT_TRUE(e);
        ASSERT_EQ(sf_cuda_engine_set_timing(e.get(), true), SF_OK) << sf_last_error();
        ASSERT_TRUE(prefill(e.get(), p, {0, 1}, true, vocab_, nullptr));
        sf_cuda_stage_times t;
        ASSERT_EQ(sf_cuda_engine_stage_times(e.get(), &t), SF_OK) << sf_last_error();
        sane(t, mode + " guarded prefill");
        EXPECT_EQ(t.step, 1u) << mode;
        EXPECT_GT(t.layers_ms, 0.0f) << mode;
        EXPECT_GT(t.sysformer_ms, 0.0f) << mode << ": a guarded step rewrote 17 system rows";

        ASSERT_TRUE(decode(e.get(), {0, 1}, vocab_, nullptr));
        ASSERT_TRUE(decode(e.get(), {0, 1}, vocab_, nullptr));  // graphs: a replay
        const int32_t bad_slot = 7;
        const sf_cuda_step refused = {1, &bad_slot, nullptr, nullptr, nullptr, &kGreedy,
                                      nullptr, nullptr};
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &refused), SF_ERR_INVALID_ARGUMENT);
        ASSERT_EQ(sf_cuda_engine_stage_times(e.get(), &t), SF_OK) << sf_last_error();
        sane(t, mode + " decode");
        EXPECT_EQ(t.step, 3u) << mode << ": two decode steps after the prefill, one refused";
        sf_cuda_stage_times again;
        ASSERT_EQ(sf_cuda_engine_stage_times(e.get(), &again), SF_OK) << sf_last_error();
        EXPECT_EQ(again.step, 3u) << mode;
        EXPECT_EQ(again.total_ms, t.total_ms) << mode << ": the same step's events";
        if (graphs) {
            EXPECT_EQ(t.upload_ms, 0.0f);
            EXPECT_EQ(t.embed_ms, 0.0f);
            EXPECT_EQ(t.sysformer_ms, 0.0f);
            EXPECT_EQ(t.layers_ms, 0.0f);
            EXPECT_EQ(t.head_ms, 0.0f);
            EXPECT_EQ(t.sample_ms, 0.0f);
        } else {
            EXPECT_GT(t.layers_ms, 0.0f) << "an eager decode step has stages";
        }
        ASSERT_EQ(sf_cuda_engine_set_timing(e.get(), false), SF_OK);
        StepOut out;
        ASSERT_TRUE(decode(e.get(), {0, 1}, vocab_, &out));
        EXPECT_TRUE(all_finite(out.logits.data(), (int64_t)out.logits.size()));
    }
}

// sf_cuda_session_peek. From the stream callback, the reply so far ends with the token being
// streamed, and for a request that asked, its log-probability there is the one the taken
// result holds at that place; a waiting request shows no tokens; a finished one its whole
// reply, still there to take (and gone once taken). No tokenizer: no text. Bad ids and NULL
// arguments are refused, and so is a submission asking for too many alternatives (it takes no
// id: 3 is never given).
struct PeekLog {
    sf_cuda_session *s = nullptr;
    std::vector<std::vector<int32_t>> tokens;
    std::vector<std::vector<float>> logprobs;
};
bool peek_each_token(void *user, int32_t request, int32_t token, const char *, size_t) {
    auto *log = static_cast<PeekLog *>(user);
    sf_generation_result view = {};
    bool done = true;
    EXPECT_EQ(sf_cuda_session_peek(log->s, request, &view, &done), SF_OK) << sf_last_error();
    EXPECT_FALSE(done) << "request " << request << " is being given a token";
    auto &seen = log->tokens[(size_t)request];
    seen.push_back(token);
    EXPECT_EQ(std::vector<int32_t>(view.tokens, view.tokens + view.n_tokens), seen)
        << "request " << request;
    EXPECT_EQ(view.text, nullptr);
    if (view.logprobs && view.n_tokens > 0) {
        log->logprobs[(size_t)request].push_back(view.logprobs[view.n_tokens - 1]);
    }
    return true;
}

TEST_F(CudaEngineTiny, SessionPeekShowsTheReplySoFar) {
    EnginePtr e = make_engine(llm_, sf_, options(2, 64, 48));
    ASSERT_TRUE(e);
    sf_cuda_session *raw = nullptr;
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr s(raw);
    const Prompts p = tiny_prompts({{5, 2}, {3, 4}, {2, 6}}, 73);
    const std::vector<sf_sampling> set = {{0.0f, 0, 1.0f, 0, true, 0},
                                          {0.9f, 0, 1.0f, 41, true, 0},
                                          {0.0f, 0, 1.0f, 0, false, 0}};
    for (int32_t r = 0; r < 3; r++) {
        const std::vector<int32_t> ids = p.request(r);
        int32_t id = -1;
        ASSERT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(), &p.spans[r],
                                         &set[r], 5, &id),
                  SF_OK)
            << sf_last_error();
    }
    {  // refused at submission, taking no id: a top_logprobs past SF_MAX_TOP_LOGPROBS
        sf_sampling bad = set[0];
        bad.top_logprobs = SF_MAX_TOP_LOGPROBS + 1;
        const std::vector<int32_t> ids = p.request(0);
        int32_t id = -1;
        EXPECT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(), &p.spans[0],
                                         &bad, 5, &id),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(sf_last_error()).find("top_logprobs"), std::string::npos)
            << sf_last_error();
    }
    sf_generation_result view = {};
    bool done = true;
    ASSERT_EQ(sf_cuda_session_peek(s.get(), 2, &view, &done), SF_OK) << sf_last_error();
    EXPECT_FALSE(done);
    EXPECT_EQ(view.n_tokens, 0) << "waiting";
    EXPECT_EQ(view.logprobs, nullptr) << "it did not ask";
    EXPECT_EQ(sf_cuda_session_peek(s.get(), 3, &view, &done), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_peek(nullptr, 0, &view, &done), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_peek(s.get(), 0, nullptr, &done), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_peek(s.get(), 0, &view, nullptr), SF_ERR_INVALID_ARGUMENT);

    PeekLog log;
    log.s = s.get();
    log.tokens.resize(3);
    log.logprobs.resize(3);
    int32_t running = 1, waiting = 1;
    for (int k = 0; k < 20 && (running > 0 || waiting > 0); k++) {
        ASSERT_EQ(sf_cuda_session_step(s.get(), peek_each_token, &log, &running, &waiting), SF_OK)
            << sf_last_error();
    }
    ASSERT_EQ(running + waiting, 0);
    for (int32_t r = 0; r < 3; r++) {
        SCOPED_TRACE("request " + std::to_string(r));
        ASSERT_EQ(sf_cuda_session_peek(s.get(), r, &view, &done), SF_OK) << sf_last_error();
        EXPECT_TRUE(done);
        EXPECT_EQ(view.n_tokens, 5);
        EXPECT_EQ(view.finish, SF_FINISH_LENGTH);
        sf_generation_result res = {};
        ASSERT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK) << sf_last_error();
        ASSERT_TRUE(done);
        EXPECT_EQ(std::vector<int32_t>(res.tokens, res.tokens + res.n_tokens), log.tokens[r]);
        if (set[r].logprobs) {
            ASSERT_NE(res.logprobs, nullptr);
            EXPECT_EQ(std::vector<float>(res.logprobs, res.logprobs + res.n_tokens),
                      log.logprobs[r]);
        } else {
            EXPECT_EQ(res.logprobs, nullptr);
            EXPECT_TRUE(log.logprobs[r].empty());
        }
        sf_generation_result_free(&res);
        EXPECT_EQ(sf_cuda_session_peek(s.get(), r, &view, &done), SF_ERR_INVALID_ARGUMENT)
            << "taken";
    }
}

// Cancelling, taking early, and what a session refuses: a cancelled waiting request never
// starts, a cancelled running one frees its slot for the next, a result is not there before
// its request ends; a bad request is refused at submission (never reaching a shared step)
// and takes no id, and the session goes on.
TEST_F(CudaEngineTiny, SessionCancelsTakesAndRefuses) {
    EnginePtr e = make_engine(llm_, sf_, options(2, 64, 48));
    ASSERT_TRUE(e);
    sf_cuda_session *raw = nullptr;
    EXPECT_EQ(sf_cuda_session_create(nullptr, nullptr, nullptr, 0, nullptr, 0, &raw),
              SF_ERR_INVALID_ARGUMENT);
    const char *stop = "x";
    EXPECT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, &stop, 1, &raw),
              SF_ERR_INVALID_ARGUMENT)
        << "stop strings without a tokenizer";
    EXPECT_EQ(raw, nullptr);
    // A NULL stop string, and one that is not valid UTF-8 (the CPU path's rule, which
    // Generate.RefusesBadStopStringsAndSettings covers case by case).
    sf_tokenizer *tok = nullptr;
    ASSERT_EQ(sf_tokenizer_load((std::string(SF_TEST_DATA_DIR) +
                                 "/tokenizer/synthetic/synth-bytelevel-nfc").c_str(), &tok),
              SF_OK)
        << sf_last_error();
    const char *stops[2] = {"x", nullptr};
    EXPECT_EQ(sf_cuda_session_create(e.get(), tok, nullptr, 0, stops, 2, &raw),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "stop string 1 is NULL"), nullptr) << sf_last_error();
    stops[1] = "\xc3";
    EXPECT_EQ(sf_cuda_session_create(e.get(), tok, nullptr, 0, stops, 2, &raw),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_NE(strstr(sf_last_error(), "stop string 1 is not valid UTF-8"), nullptr)
        << sf_last_error();
    EXPECT_EQ(raw, nullptr);
    sf_tokenizer_free(tok);
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr s(raw);

    const Prompts p = tiny_prompts({{5, 2}, {3, 4}, {2, 6}, {4, 3}}, 71);
    StreamLog log;
    log.tokens.resize(8);
    auto submit = [&](int32_t r, int32_t max_new) {
        const std::vector<int32_t> ids = p.request(r);
        int32_t id = -1;
        EXPECT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(), &p.spans[r],
                                         nullptr, max_new, &id),
                  SF_OK)
            << sf_last_error();
        return id;
    };
    for (int32_t r = 0; r < 4; r++) EXPECT_EQ(submit(r, 6), r);
    int32_t running = -1, waiting = -1;
    ASSERT_EQ(sf_cuda_session_step(s.get(), record_stream, &log, &running, &waiting), SF_OK)
        << sf_last_error();
    EXPECT_EQ(running, 2);
    EXPECT_EQ(waiting, 2);
    sf_generation_result res = {};
    bool done = true;
    EXPECT_EQ(sf_cuda_session_take(s.get(), 0, &res, &done), SF_OK);
    EXPECT_FALSE(done) << "request 0 is running";
    EXPECT_EQ(res.tokens, nullptr) << "untouched while it runs";

    EXPECT_EQ(sf_cuda_session_cancel(s.get(), 3), SF_OK) << sf_last_error();  // waiting
    EXPECT_EQ(sf_cuda_session_cancel(s.get(), 0), SF_OK) << sf_last_error();  // running
    EXPECT_EQ(sf_cuda_session_cancel(s.get(), 0), SF_OK) << "cancelling twice changes nothing";
    ASSERT_EQ(sf_cuda_session_step(s.get(), record_stream, &log, &running, &waiting), SF_OK)
        << sf_last_error();
    EXPECT_EQ(running, 2) << "request 2 took request 0's slot";
    EXPECT_EQ(waiting, 0) << "request 3 was cancelled while it waited";
    for (int32_t k = 0; k < 20 && (running > 0 || waiting > 0); k++) {
        ASSERT_EQ(sf_cuda_session_step(s.get(), record_stream, &log, &running, &waiting), SF_OK)
            << sf_last_error();
    }
    EXPECT_EQ(running, 0);
    const int32_t want_tokens[4] = {1, 6, 6, 0};
    const sf_finish_reason want_finish[4] = {SF_FINISH_CALLBACK, SF_FINISH_LENGTH,
                                             SF_FINISH_LENGTH, SF_FINISH_CALLBACK};
    for (int32_t r = 0; r < 4; r++) {
        ASSERT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK) << sf_last_error();
        ASSERT_TRUE(done) << "request " << r;
        EXPECT_EQ(res.n_tokens, want_tokens[r]) << "request " << r;
        EXPECT_EQ(res.finish, want_finish[r]) << "request " << r;
        EXPECT_EQ(log.tokens[r], std::vector<int32_t>(res.tokens, res.tokens + res.n_tokens))
            << "request " << r;
        sf_generation_result_free(&res);
    }
    EXPECT_EQ(sf_cuda_session_take(s.get(), 0, &res, &done), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(sf_cuda_session_cancel(s.get(), 0), SF_ERR_INVALID_ARGUMENT) << "taken";
    EXPECT_EQ(sf_cuda_session_cancel(s.get(), 4), SF_ERR_INVALID_ARGUMENT) << "never given";
    EXPECT_EQ(sf_cuda_session_take(s.get(), -1, &res, &done), SF_ERR_INVALID_ARGUMENT);

    // Refused at submission, each with the documented status; no id is used up.
    std::vector<int32_t> ids = p.request(1);
    const sf_prompt_spans sp = p.spans[1];
    int32_t id = -1;
    auto refused = [&](const char *what, const std::vector<int32_t> &x, const sf_prompt_spans *q,
                       int32_t max_new, sf_status want) {
        EXPECT_EQ(sf_cuda_session_submit(s.get(), x.data(), (int32_t)x.size(), q, nullptr,
                                         max_new, &id),
                  want)
            << what << ": " << sf_last_error();
    };
    std::vector<int32_t> bad_id = ids;
    bad_id[2] = (int32_t)vocab_;
    refused("an id outside the vocabulary", bad_id, &sp, 4, SF_ERR_INVALID_ARGUMENT);
    sf_prompt_spans short_sp = sp;
    short_sp.suffix -= 1;
    refused("spans that do not add up", ids, &short_sp, 4, SF_ERR_INVALID_ARGUMENT);
    sf_prompt_spans no_user = {sp.prefix, sp.system, sp.middle + sp.user, 0, sp.suffix};
    refused("a system span without a user span", ids, &no_user, 4, SF_ERR_INVALID_ARGUMENT);
    refused("no spans with a Sysformer", ids, nullptr, 4, SF_ERR_INVALID_ARGUMENT);
    refused("no new tokens asked", ids, &sp, 0, SF_ERR_INVALID_ARGUMENT);
    refused("an empty prompt", {}, &sp, 4, SF_ERR_INVALID_ARGUMENT);
    // tiny_prompts({{s, u}}) has s + u + 8 tokens
    const Prompts long_p = tiny_prompts({{20, 20}}, 72);  // 48: max_batch_tokens exactly
    const Prompts over_p = tiny_prompts({{25, 25}}, 73);  // 58: past max_batch_tokens (48)
    const Prompts full_p = tiny_prompts({{30, 26}}, 74);  // 64: no room left in the window
    refused("a prompt past max_batch_tokens", over_p.request(0), &over_p.spans[0], 4,
            SF_ERR_OUT_OF_RANGE);
    refused("a prompt that fills the window", full_p.request(0), &full_p.spans[0], 4,
            SF_ERR_OUT_OF_RANGE);
    const std::vector<int32_t> ok_ids = long_p.request(0);
    ASSERT_EQ(sf_cuda_session_submit(s.get(), ok_ids.data(), (int32_t)ok_ids.size(),
                                     &long_p.spans[0], nullptr, 3, &id),
              SF_OK)
        << sf_last_error();
    EXPECT_EQ(id, 4) << "refused requests took no id";
    for (int32_t k = 0; k < 10; k++) {
        ASSERT_EQ(sf_cuda_session_step(s.get(), nullptr, nullptr, &running, &waiting), SF_OK)
            << sf_last_error();
        if (running == 0 && waiting == 0) break;
    }
    ASSERT_EQ(sf_cuda_session_take(s.get(), 4, &res, &done), SF_OK) << sf_last_error();
    EXPECT_TRUE(done);
    EXPECT_EQ(res.n_tokens, 3);
    sf_generation_result_free(&res);

    // A stream callback may cancel, submit and take, not step: at request 0's first token it
    // cancels request 1 (admitted in the same round, its token not yet accepted: it gets none)
    // and submits a third request, which then takes request 1's slot.
    s.reset();
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    s.reset(raw);
    struct Reentry {
        sf_cuda_session *s;
        const Prompts *p;
        sf_status step = SF_OK, cancel = SF_ERR_IO, submit = SF_ERR_IO;
        int32_t new_id = -1, calls = 0;
    } re = {s.get(), &p};
    auto reenter = [](void *user, int32_t request, int32_t, const char *, size_t) {
        auto *r = static_cast<Reentry *>(user);
        if (request == 0 && r->calls++ == 0) {
            r->step = sf_cuda_session_step(r->s, nullptr, nullptr, nullptr, nullptr);
            r->cancel = sf_cuda_session_cancel(r->s, 1);
            const std::vector<int32_t> x = r->p->request(2);
            r->submit = sf_cuda_session_submit(r->s, x.data(), (int32_t)x.size(),
                                               &r->p->spans[2], nullptr, 5, &r->new_id);
        }
        return true;
    };
    for (int32_t r = 0; r < 2; r++) EXPECT_EQ(submit(r, 5), r);
    for (int32_t k = 0; k < 20; k++) {
        ASSERT_EQ(sf_cuda_session_step(s.get(), reenter, &re, &running, &waiting), SF_OK)
            << sf_last_error();
        if (running == 0 && waiting == 0) break;
    }
    EXPECT_EQ(re.step, SF_ERR_INVALID_ARGUMENT) << "a step from inside a step";
    EXPECT_EQ(re.cancel, SF_OK);
    EXPECT_EQ(re.submit, SF_OK);
    EXPECT_EQ(re.new_id, 2);
    const int32_t want_n[3] = {5, 0, 5};
    for (int32_t r = 0; r < 3; r++) {
        ASSERT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK) << sf_last_error();
        ASSERT_TRUE(done) << "request " << r;
        EXPECT_EQ(res.n_tokens, want_n[r]) << "request " << r;
        EXPECT_EQ(res.finish, r == 1 ? SF_FINISH_CALLBACK : SF_FINISH_LENGTH) << "request " << r;
        sf_generation_result_free(&res);
    }

    // A guard-only engine has no LLM to generate with.
    sf_cuda_engine_options o = options(2, 64, 48);
    o.guard_only = true;
    EnginePtr g = make_engine(llm_, sf_, o);
    ASSERT_TRUE(g);
    raw = nullptr;
    EXPECT_EQ(sf_cuda_session_create(g.get(), nullptr, nullptr, 0, nullptr, 0, &raw),
              SF_ERR_UNSUPPORTED);
    EXPECT_EQ(raw, nullptr);
}

// A session holds its ids in a ring from the oldest not taken to the newest (host/cuda/
// generate.c): ids keep naming their requests as the ring wraps and grows, whatever order the
// results are taken in, and requests submitted after thousands of others generate exactly what
// they do on a fresh session.
TEST_F(CudaEngineTiny, SessionIdsStayRightAsTheRingWraps) {
    EnginePtr e = make_engine(llm_, sf_, options(2, 64, 48));
    ASSERT_TRUE(e);
    const Prompts p = tiny_prompts({{5, 2}, {3, 4}, {2, 6}}, 75);
    const int32_t limit[3] = {4, 6, 5};
    // Submits request r of p, returning its id (-1 when refused).
    auto submit = [&](sf_cuda_session *s, int32_t r, int32_t max_new) {
        const std::vector<int32_t> ids = p.request(r);
        int32_t id = -1;
        EXPECT_EQ(sf_cuda_session_submit(s, ids.data(), (int32_t)ids.size(), &p.spans[r],
                                         nullptr, max_new, &id),
                  SF_OK)
            << sf_last_error();
        return id;
    };
    // Takes a finished request: its tokens and finish reason.
    auto take = [](sf_cuda_session *s, int32_t id, sf_finish_reason *finish) {
        sf_generation_result res = {};
        bool done = false;
        EXPECT_EQ(sf_cuda_session_take(s, id, &res, &done), SF_OK) << sf_last_error();
        EXPECT_TRUE(done) << "request " << id;
        std::vector<int32_t> tokens(res.tokens, res.tokens + res.n_tokens);
        *finish = res.finish;
        sf_generation_result_free(&res);
        return tokens;
    };
    // Runs the three requests of p to the end on s (submitted now), and takes them newest first.
    auto generate = [&](sf_cuda_session *s) {
        int32_t first = -1;
        for (int32_t r = 0; r < 3; r++) {
            const int32_t id = submit(s, r, limit[r]);
            if (r == 0) first = id;
            EXPECT_EQ(id, first + r);
        }
        int32_t running = 1, waiting = 0;
        for (int32_t k = 0; k < 40 && running + waiting > 0; k++) {
            EXPECT_EQ(sf_cuda_session_step(s, nullptr, nullptr, &running, &waiting), SF_OK)
                << sf_last_error();
        }
        std::vector<std::vector<int32_t>> tokens(3);
        for (int32_t r = 2; r >= 0; r--) {
            sf_finish_reason finish;
            tokens[r] = take(s, first + r, &finish);
            EXPECT_EQ(finish, SF_FINISH_LENGTH);
            EXPECT_EQ((int32_t)tokens[r].size(), limit[r]);
        }
        return tokens;
    };
    sf_cuda_session *raw = nullptr;
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr fresh(raw);
    const std::vector<std::vector<int32_t>> want = generate(fresh.get());
    fresh.reset();

    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr s(raw);
    sf_finish_reason finish;
    // Request 0 is cancelled and held while 300 others come and go, one at a time: the ring
    // grows past its first 64 entries to span 0 .. 300.
    ASSERT_EQ(submit(s.get(), 0, 3), 0);
    ASSERT_EQ(sf_cuda_session_cancel(s.get(), 0), SF_OK) << sf_last_error();
    for (int32_t id = 1; id <= 300; id++) {
        ASSERT_EQ(submit(s.get(), id % 3, 2), id);
        ASSERT_EQ(sf_cuda_session_cancel(s.get(), id), SF_OK) << sf_last_error();
        EXPECT_TRUE(take(s.get(), id, &finish).empty());
    }
    // Then it is taken, the oldest leaves, and 300 more wrap the ring, two at a time with the
    // newer one taken first.
    EXPECT_TRUE(take(s.get(), 0, &finish).empty());
    EXPECT_EQ(finish, SF_FINISH_CALLBACK);
    for (int32_t id = 301; id <= 600; id += 2) {
        ASSERT_EQ(submit(s.get(), 1, 2), id);
        ASSERT_EQ(submit(s.get(), 2, 2), id + 1);
        for (const int32_t k : {id + 1, id}) {
            ASSERT_EQ(sf_cuda_session_cancel(s.get(), k), SF_OK) << sf_last_error();
            EXPECT_TRUE(take(s.get(), k, &finish).empty());
        }
    }
    EXPECT_EQ(generate(s.get()), want);
    sf_generation_result res = {};
    bool done = false;
    for (const int32_t id : {0, 1, 300, 601, 603}) {
        EXPECT_EQ(sf_cuda_session_take(s.get(), id, &res, &done), SF_ERR_INVALID_ARGUMENT)
            << "request " << id << " was taken";
    }
    EXPECT_EQ(sf_cuda_session_cancel(s.get(), 604), SF_ERR_INVALID_ARGUMENT) << "never given";
}

// A stream callback that cancels the very request whose token it is given: that request ends
// with that token (SF_FINISH_CALLBACK, as if the callback had returned false), and a take from
// inside the same callback finds it still running, so nothing the round still uses is freed.
TEST_F(CudaEngineTiny, SessionCallbackCancelsItsOwnRequest) {
    EnginePtr e = make_engine(llm_, sf_, options(2, 64, 48));
    ASSERT_TRUE(e);
    sf_cuda_session *raw = nullptr;
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr s(raw);
    const Prompts p = tiny_prompts({{5, 2}, {3, 4}}, 76);
    for (int32_t r = 0; r < 2; r++) {
        const std::vector<int32_t> ids = p.request(r);
        int32_t id = -1;
        ASSERT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(), &p.spans[r],
                                         nullptr, 6, &id),
                  SF_OK)
            << sf_last_error();
    }
    struct Own {
        sf_cuda_session *s;
        StreamLog log;
        sf_status cancel = SF_ERR_IO, take = SF_ERR_IO;
        bool done = true;
    } own = {s.get(), {}};
    own.log.tokens.resize(2);
    auto cancel_own = [](void *user, int32_t request, int32_t token, const char *, size_t) {
        auto *o = static_cast<Own *>(user);
        record_stream(&o->log, request, token, nullptr, 0);
        if (request == 0 && o->log.tokens[0].size() == 2) {
            o->cancel = sf_cuda_session_cancel(o->s, 0);
            sf_generation_result res = {};
            o->take = sf_cuda_session_take(o->s, 0, &res, &o->done);
        }
        return true;
    };
    int32_t running = 1, waiting = 0;
    for (int32_t k = 0; k < 20 && running + waiting > 0; k++) {
        ASSERT_EQ(sf_cuda_session_step(s.get(), cancel_own, &own, &running, &waiting), SF_OK)
            << sf_last_error();
    }
    EXPECT_EQ(own.cancel, SF_OK);
    EXPECT_EQ(own.take, SF_OK);
    EXPECT_FALSE(own.done) << "taken from inside its own token's callback";
    for (int32_t r = 0; r < 2; r++) {
        sf_generation_result res = {};
        bool done = false;
        ASSERT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK) << sf_last_error();
        ASSERT_TRUE(done) << "request " << r;
        EXPECT_EQ(res.n_tokens, r == 0 ? 2 : 6) << "request " << r;
        EXPECT_EQ(res.finish, r == 0 ? SF_FINISH_CALLBACK : SF_FINISH_LENGTH) << "request " << r;
        EXPECT_EQ(own.log.tokens[r], std::vector<int32_t>(res.tokens, res.tokens + res.n_tokens))
            << "request " << r;
        sf_generation_result_free(&res);
    }
}

// ------------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct (when fetched), guarded by an open Sysformer, on ChatML prompts
// ------------------------------------------------------------------------------------------

class CudaEngineSmolLM2 : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        if (!have_gpu()) {
            skip_ = "no CUDA device";
            return;
        }
        const std::string path = smollm2_path();
        if (path.empty()) {
            skip_ = "SmolLM2-135M-Instruct GGUF not found: run weights/fetch_smollm2.sh or set "
                    "SF_SMOLLM2_GGUF";
            return;
        }
        if (sf_llm_load(path.c_str(), &llm_) != SF_OK ||
            sf_tokenizer_load(path.c_str(), &tok_) != SF_OK) {
            error_ = sf_last_error();
            return;
        }
        const ::testing::AssertionResult ok = make_open_sysformer(llm_, 9, &sf_);
        if (!ok) {
            error_ = ok.message();
            return;
        }
        const char *system[3] = {"You are a helpful assistant.",
                                 "You are a careful assistant that refuses harmful requests.",
                                 "Answer in one word."};
        const char *user[3] = {"What is the capital of France?", "Write a haiku about GPUs.",
                               "Name a primary colour."};
        prompts_ = Prompts();
        for (int r = 0; r < 3; r++) {
            std::vector<int32_t> ids(256);
            int32_t n = 0;
            sf_prompt_spans s;
            if (sf_chat_encode(tok_, SF_TEMPLATE_CHATML, system[r], nullptr, 0, user[r], ids.data(),
                               256, &n, &s) != SF_OK) {
                error_ = sf_last_error();
                return;
            }
            ids.resize((size_t)n);
            prompts_.add(ids, s);
        }
    }
    static void TearDownTestSuite() {
        sf_sysformer_free(sf_);
        sf_tokenizer_free(tok_);
        sf_llm_free(llm_);
        sf_ = nullptr;
        tok_ = nullptr;
        llm_ = nullptr;
    }
    void SetUp() override {
        if (!skip_.empty()) GTEST_SKIP() << skip_;
        ASSERT_TRUE(error_.empty()) << error_;
        ASSERT_EQ(sf_llm_get_config(llm_)->head_dim, 64);
    }
    static double bound() {
        return logit_bound(sf_llm_get_config(llm_)->num_layers,
                           sf_sysformer_get_config(sf_)->num_layers);
    }

    static inline std::string skip_, error_;
    static inline sf_llm *llm_ = nullptr;
    static inline sf_tokenizer *tok_ = nullptr;
    static inline sf_sysformer *sf_ = nullptr;
    static inline Prompts prompts_;
};

TEST_F(CudaEngineSmolLM2, GuardedPrefillMatchesCpu) {
    EnginePtr e = make_engine(llm_, sf_, options(4, 256, 256));
    ASSERT_TRUE(e);
    const int64_t vocab = sf_llm_get_config(llm_)->vocab_size;
    StepOut out;
    ASSERT_TRUE(prefill(e.get(), prompts_, {2, 0, 1}, true, vocab, &out));
    const std::vector<float> cpu = cpu_guarded_logits(llm_, sf_, prompts_, last_rows(prompts_));
    for (int32_t r = 0; r < prompts_.n(); r++) {
        expect_logits_close(out.row(r, vocab), cpu.data() + (size_t)r * vocab, vocab, bound(),
                            "SmolLM2 request " + std::to_string(r), &out.tokens[r]);
    }
}

TEST_F(CudaEngineSmolLM2, GenerateMatchesCpu) {
    EnginePtr e = make_engine(llm_, sf_, options(4, 256, 256));
    ASSERT_TRUE(e);
    check_generate(llm_, sf_, tok_, e.get(), prompts_, 8, bound());
}

// ------------------------------------------------------------------------------------------
// Faults: what the engine does when CUDA fails under it (tools/simt only); and what a step asks
// of the host (CudaEngineHostTraffic, at the end)
// ------------------------------------------------------------------------------------------
//
// Every creation that can fail (an allocation, a stream, an event, a graph, the cuBLASLt
// handle), a launch the device refuses, a kernel that faults. The contract (sysformer.h): a
// clear status and message, nothing leaked, no crash, and an engine still usable where the
// device is (a refused launch leaves it intact; a fault does not).
// A GPU cannot be made to fail on cue, so these tests exist only on tools/simt's emulated
// device, whose runtime fails any call of a kind on request (simt::fail_call, simt_api.h, which
// defines SIMT_FAULT_INJECTION) and counts what the process holds (simt::resources: device and
// pinned allocations, streams, events, graphs, cuBLASLt objects, open NVTX ranges).
// Results compared here come from the same engine configuration on the same inputs, so equal
// means bit for bit (Determinism, at the top).
#ifdef SIMT_FAULT_INJECTION
#include "alloc_faults.h"  // host allocations failing on cue: tools/simt links alloc_fail.c

// A session's outcome: each request's tokens once all have finished, or the first failure.
struct Outcome {
    sf_status failed = SF_OK;
    std::string message;
    std::vector<std::vector<int32_t>> tokens;
};

// CudaEngineTiny's model
class CudaEngineFaults : public CudaEngineTiny {
  protected:
    void SetUp() override {
        CudaEngineTiny::SetUp();
        if (IsSkipped() || HasFatalFailure()) return;
        // Three requests on two slots: the third waits and starts beside a running one, so a
        // run has guarded prefills, mixed rounds, decode graphs (captured, then replayed) and
        // both samplers (request 1 samples, the others are greedy), and the log-probabilities'
        // pass and copy (request 1 asks for them).
        prompts_ = tiny_prompts({{5, 2}, {3, 4}, {2, 6}}, 81);
        limits_ = {4, 6, 5};
        sampling_ = {{0.0f, 0, 1.0f, 0, false, 0},
                     {0.9f, 0, 1.0f, 77, true, 0},
                     {0.0f, 0, 1.0f, 0, false, 0}};
        // a batch for the guarded embedding, which takes at most max_slots requests
        for (int32_t r = 0; r < 2; r++) two_.add(prompts_.request(r), prompts_.spans[r]);
    }
    void TearDown() override {
        simt::disarm_faults();
        CudaEngineTiny::TearDown();
    }

    // two slots of 64 positions, steps of 48 tokens
    static sf_cuda_engine_options faults_options(bool guard_only = false) {
        sf_cuda_engine_options o = options(2, 64, 48);
        o.guard_only = guard_only;
        return o;
    }

    EnginePtr engine() { return make_engine(llm_, sf_, faults_options()); }

    // Runs the requests on a new session of e, to the end or to the first failed step. After a
    // failure it checks what a broken session promises: later steps and submissions repeat the
    // failure, requests can still be cancelled and taken, and it frees.
    Outcome run(sf_cuda_engine *e) {
        Outcome out;
        sf_cuda_session *raw = nullptr;
        EXPECT_EQ(sf_cuda_session_create(e, nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
            << sf_last_error();
        SessionPtr s(raw);
        if (!s) return out;
        const int32_t n = prompts_.n();
        for (int32_t r = 0; r < n; r++) {
            const std::vector<int32_t> ids = prompts_.request(r);
            int32_t id = -1;
            EXPECT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(),
                                             &prompts_.spans[r], &sampling_[r], limits_[r], &id),
                      SF_OK)
                << sf_last_error();
        }
        int32_t running = 0, waiting = 0;
        for (int32_t round = 0; round < 64; round++) {
            const sf_status st = sf_cuda_session_step(s.get(), nullptr, nullptr, &running,
                                                      &waiting);
            if (st != SF_OK) {
                out.failed = st;
                out.message = sf_last_error();
                break;
            }
            if (running == 0 && waiting == 0) break;
        }
        if (out.failed != SF_OK) {
            EXPECT_EQ(simt::resources().nvtx_depth, 0) << "the failed step left NVTX ranges open";
            EXPECT_EQ(sf_cuda_session_step(s.get(), nullptr, nullptr, &running, &waiting),
                      out.failed);
            EXPECT_TRUE(contains(sf_last_error(), "failed earlier") &&
                        contains(sf_last_error(), out.message.c_str()))
                << sf_last_error();
            const std::vector<int32_t> ids = prompts_.request(0);
            int32_t id = -1;
            EXPECT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(),
                                             &prompts_.spans[0], nullptr, 2, &id),
                      out.failed);
            for (int32_t r = 0; r < n; r++) {
                sf_generation_result res = {};
                bool done = false;
                EXPECT_EQ(sf_cuda_session_cancel(s.get(), r), SF_OK) << sf_last_error();
                EXPECT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK);
                EXPECT_TRUE(done) << "request " << r << ", cancelled";
                EXPECT_LE(res.n_tokens, limits_[r]);
                sf_generation_result_free(&res);
            }
            return out;
        }
        EXPECT_EQ(running + waiting, 0) << "the requests did not finish in 64 rounds";
        for (int32_t r = 0; r < n; r++) {
            sf_generation_result res = {};
            bool done = false;
            EXPECT_EQ(sf_cuda_session_take(s.get(), r, &res, &done), SF_OK) << sf_last_error();
            EXPECT_TRUE(done) << "request " << r;
            out.tokens.emplace_back(res.tokens, res.tokens + res.n_tokens);
            sf_generation_result_free(&res);
        }
        return out;
    }

    // The calls of a kind that one run makes on a new engine (its creation not counted), and
    // that run's tokens.
    long long calls_of_a_run(simt::Fault kind, Outcome *ref) {
        EnginePtr e = engine();
        if (!e) return 0;
        const long long before = simt::fault_calls(kind);
        *ref = run(e.get());
        return simt::fault_calls(kind) - before;
    }

    Prompts prompts_, two_;
    std::vector<int32_t> limits_;
    std::vector<sf_sampling> sampling_;
};

// 1. Each creation call of engine creation failing in turn (an allocation, the pinned
// staging, the stream, the events, the cuBLASLt handle; the full engine, a guard-only one, one
// with random weights, and one sharing another engine's LLM): SF_ERR_OUT_OF_MEMORY with a
// message that says so, *out NULL, and everything created before it released. Then a creation succeeds and steps as ever: a failed
// creation leaves no error behind for a later launch to report as its own.
TEST_F(CudaEngineFaults, EveryFailedCreationIsReportedAndReleasesEverything) {
    Outcome ref;
    ASSERT_GT(calls_of_a_run(simt::FAULT_CREATE, &ref), 0);
    ASSERT_EQ(ref.failed, SF_OK) << ref.message;
    const sf_llm_config llm_cfg = *sf_llm_get_config(llm_);
    const sf_sysformer_config sys_cfg = *sf_sysformer_get_config(sf_);

    // the base of the fourth kind, an engine sharing its LLM: once freed at the end, nothing a
    // failed sharing engine held on to is left
    const simt::Resources at_start = simt::resources();
    EnginePtr base = make_engine(llm_, nullptr, faults_options());
    ASSERT_TRUE(base);
    const char *kinds[] = {"full", "guard-only", "random weights", "sharing the LLM"};
    for (int kind = 0; kind < 4; kind++) {
        SCOPED_TRACE(kinds[kind]);
        const sf_cuda_engine_options o = faults_options(kind == 1);
        auto create = [&](sf_cuda_engine **e) {
            return kind == 2   ? sf_cuda_engine_create_random(&llm_cfg, &sys_cfg, 3, &o, e)
                   : kind == 3 ? sf_cuda_engine_create_sharing(base.get(), sf_, &o, e)
                               : sf_cuda_engine_create(llm_, sf_, &o, e);
        };
        const simt::Resources before = simt::resources();
        const long long c0 = simt::fault_calls(simt::FAULT_CREATE);
        sf_cuda_engine *e = nullptr;
        ASSERT_EQ(create(&e), SF_OK) << sf_last_error();
        sf_cuda_engine_free(e);
        const long long creations = simt::fault_calls(simt::FAULT_CREATE) - c0;
        ASSERT_TRUE(holds(before)) << "a plain create and free";
        // weights, the K and V caches (not guard-only), the arena, the pinned staging, the
        // upload's staging buffer, the stream, events, the cuBLASLt handle
        EXPECT_GE(creations, kind == 1 ? 6 : 8);
        for (long long k = 0; k < creations; k++) {
            SCOPED_TRACE("creation call " + std::to_string(k));
            simt::fail_call(simt::FAULT_CREATE, k);
            e = reinterpret_cast<sf_cuda_engine *>(&e);  // anything but NULL
            const sf_status st = create(&e);
            simt::disarm_faults();
            EXPECT_EQ(st, SF_ERR_OUT_OF_MEMORY) << sf_status_string(st) << ": " << sf_last_error();
            EXPECT_TRUE(contains(sf_last_error(), "out of memory") ||
                        contains(sf_last_error(), "ALLOC_FAILED"))
                << sf_last_error();
            EXPECT_EQ(e, nullptr);
            EXPECT_TRUE(holds(before));
        }
    }
    base.reset();
    EXPECT_TRUE(holds(at_start)) << "a failed sharing engine kept the LLM's weights";
    EnginePtr e = engine();
    ASSERT_TRUE(e);
    const Outcome again = run(e.get());
    EXPECT_EQ(again.failed, SF_OK) << again.message;
    EXPECT_EQ(again.tokens, ref.tokens);
}

// 2. A launch the device refuses (a kernel or a cuBLASLt product), at points spread over a
// whole session's run, from the first guarded prefill through the decode graphs' captures and
// replays: the step fails with SF_ERR_CUDA naming the refusal, the session is broken (and says
// so), and the engine is not: a new session on it gives the same tokens as an engine that never
// failed (test 5 checks the slots a failed step leaves).
TEST_F(CudaEngineFaults, ARefusedLaunchBreaksTheSessionNotTheEngine) {
    Outcome ref;
    const long long launches = calls_of_a_run(simt::FAULT_LAUNCH, &ref);
    ASSERT_EQ(ref.failed, SF_OK) << ref.message;
    ASSERT_GT(launches, 20);
    for (long long k : spread(launches, 12)) {
        SCOPED_TRACE("launch " + std::to_string(k) + " of " + std::to_string(launches));
        EnginePtr e = engine();
        ASSERT_TRUE(e);
        simt::fail_call(simt::FAULT_LAUNCH, k);
        const Outcome failed = run(e.get());
        simt::disarm_faults();
        EXPECT_EQ(failed.failed, SF_ERR_CUDA) << failed.message;
        EXPECT_TRUE(contains(failed.message, "too many resources requested for launch") ||
                    contains(failed.message, "CUBLAS_STATUS_EXECUTION_FAILED"))
            << failed.message;
        const Outcome after = run(e.get());
        EXPECT_EQ(after.failed, SF_OK) << after.message;
        EXPECT_EQ(after.tokens, ref.tokens) << "the engine did not recover";
    }
}

// 2b. A decode graph that cannot be instantiated (out of memory), for each graph a run
// instantiates: the step fails with SF_ERR_OUT_OF_MEMORY saying so, the session is broken,
// and a new session on the same engine (which instantiates the graph then) gives the
// never-failed tokens.
TEST_F(CudaEngineFaults, AGraphThatCannotBeInstantiatedBreaksTheSessionNotTheEngine) {
    Outcome ref;
    const long long graphs = calls_of_a_run(simt::FAULT_CREATE, &ref);
    ASSERT_EQ(ref.failed, SF_OK) << ref.message;
    ASSERT_GE(graphs, 2) << "the run's decode steps at two batch sizes";
    for (long long k = 0; k < graphs; k++) {
        SCOPED_TRACE("graph " + std::to_string(k) + " of " + std::to_string(graphs));
        EnginePtr e = engine();
        ASSERT_TRUE(e);
        simt::fail_call(simt::FAULT_CREATE, k);
        const Outcome failed = run(e.get());
        simt::disarm_faults();
        EXPECT_EQ(failed.failed, SF_ERR_OUT_OF_MEMORY) << failed.message;
        EXPECT_TRUE(contains(failed.message, "instantiating the decode graph: out of memory"))
            << failed.message;
        const Outcome after = run(e.get());
        EXPECT_EQ(after.failed, SF_OK) << after.message;
        EXPECT_EQ(after.tokens, ref.tokens) << "the engine did not recover";
    }
}

// 3. A kernel that faults, at points spread over a run: the step that waits for it fails with
// SF_ERR_CUDA naming the fault, and so does everything after that needs the device (a new
// session's step, sf_generate_cuda, a guarded embedding, a new engine) with no result leaked;
// freeing the engine releases all it held.
TEST_F(CudaEngineFaults, AKernelFaultFailsEveryLaterCallAndFreesCleanly) {
    // the guarded embedding's inputs, on the device while it still works
    DeviceBuffer<int32_t> d_cu(two_.cu), d_ids(two_.ids), d_spans(flat_spans(two_.spans));
    DeviceBuffer<uint16_t> d_out((size_t)two_.total() *
                                 (size_t)sf_llm_get_config(llm_)->hidden_size);
    ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_out.get());
    Outcome ref;
    const simt::Resources before = simt::resources();
    const long long kernels = calls_of_a_run(simt::FAULT_KERNEL, &ref);
    ASSERT_EQ(ref.failed, SF_OK) << ref.message;
    ASSERT_GT(kernels, 20);
    ASSERT_TRUE(holds(before));
    for (long long k : spread(kernels, 6)) {
        SCOPED_TRACE("kernel " + std::to_string(k) + " of " + std::to_string(kernels));
        EnginePtr e = engine();
        ASSERT_TRUE(e);
        simt::fail_call(simt::FAULT_KERNEL, k);
        const Outcome failed = run(e.get());
        EXPECT_EQ(failed.failed, SF_ERR_CUDA) << failed.message;
        EXPECT_TRUE(contains(failed.message, "an illegal memory access was encountered"))
            << failed.message;

        const Outcome next = run(e.get());
        EXPECT_EQ(next.failed, SF_ERR_CUDA) << "a new session on a dead device";

        sf_generation g = {};
        g.n_requests = prompts_.n();
        g.cu_seqlens = prompts_.cu.data();
        g.token_ids = prompts_.ids.data();
        g.spans = prompts_.spans.data();
        g.max_new_tokens = 3;
        std::vector<sf_generation_result> res((size_t)g.n_requests);
        EXPECT_EQ(sf_generate_cuda(e.get(), nullptr, &g, nullptr, nullptr, res.data()),
                  SF_ERR_CUDA);
        for (const sf_generation_result &r : res) {
            EXPECT_EQ(r.tokens, nullptr) << "a failed generation returns no result";
            EXPECT_EQ(r.text, nullptr);
        }

        const sf_status st = sf_cuda_guarded_embed(
            e.get(), two_.n(), two_.total(), d_cu.get(), d_ids.get(),
            (const sf_prompt_spans *)d_spans.get(), 8, 8, d_out.get(), nullptr, nullptr);
        EXPECT_EQ(st, SF_ERR_CUDA) << sf_last_error();

        sf_cuda_engine *other = reinterpret_cast<sf_cuda_engine *>(&other);
        const sf_cuda_engine_options o = faults_options();
        EXPECT_NE(sf_cuda_engine_create(llm_, sf_, &o, &other), SF_OK);
        EXPECT_EQ(other, nullptr);
        e.reset();
        simt::disarm_faults();  // what a real process cannot do: it would have to restart
    }
    EXPECT_TRUE(holds(before)) << "the engines did not release everything";
}

// 4. sf_cuda_guarded_embed on the stack's own stream, a launch refused at each of its launches:
// SF_ERR_CUDA, and the next call writes what a call that never failed writes.
TEST_F(CudaEngineFaults, ARefusedLaunchInTheGuardedEmbeddingIsReported) {
    EnginePtr e = make_engine(llm_, sf_, faults_options(true));
    ASSERT_TRUE(e);
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    DeviceBuffer<int32_t> d_cu(two_.cu), d_ids(two_.ids), d_spans(flat_spans(two_.spans));
    DeviceBuffer<uint16_t> d_out((size_t)two_.total() * d);
    DeviceBuffer<int> d_err(1);
    ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_out.get() && d_err.get());
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    std::unique_ptr<CUstream_st, cudaError_t (*)(cudaStream_t)> stream_guard(stream,
                                                                             cudaStreamDestroy);
    auto embed = [&] {
        EXPECT_EQ(cudaMemsetAsync(d_err.get(), 0, sizeof(int), stream), cudaSuccess);
        return sf_cuda_guarded_embed(e.get(), two_.n(), two_.total(), d_cu.get(),
                                     d_ids.get(), (const sf_prompt_spans *)d_spans.get(), 8, 8,
                                     d_out.get(), d_err.get(), stream);
    };
    const long long c0 = simt::fault_calls(simt::FAULT_LAUNCH);
    ASSERT_EQ(embed(), SF_OK) << sf_last_error();
    const long long launches = simt::fault_calls(simt::FAULT_LAUNCH) - c0;
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::vector<uint16_t> want = d_out.host();
    ASSERT_EQ(d_err.host()[0], 0);
    ASSERT_GT(launches, 5);
    for (long long k = 0; k < launches; k++) {
        SCOPED_TRACE("launch " + std::to_string(k) + " of " + std::to_string(launches));
        simt::fail_call(simt::FAULT_LAUNCH, k);
        const sf_status st = embed();
        simt::disarm_faults();
        EXPECT_EQ(st, SF_ERR_CUDA) << sf_last_error();
        EXPECT_EQ(simt::resources().nvtx_depth, 0) << "NVTX ranges left open";
        EXPECT_TRUE(contains(sf_last_error(), "too many resources requested for launch") ||
                    contains(sf_last_error(), "CUBLAS_STATUS_EXECUTION_FAILED"))
            << sf_last_error();
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        ASSERT_EQ(cudaMemset(d_out.get(), 0xff, want.size() * 2), cudaSuccess);
        ASSERT_EQ(embed(), SF_OK) << sf_last_error();
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        EXPECT_EQ(d_out.host(), want);
        EXPECT_EQ(d_err.host()[0], 0);
    }
}

// 4b. A Sysformer swap whose upload fails part-way (a conversion launch refused, at points spread
// over the upload) leaves the device with a mix of two Sysformers' weights. The engine then
// refuses guarded prefill steps and guarded embeddings, saying why, before enqueueing
// anything; unguarded steps and a request already in a slot go on. A swap that then succeeds
// makes the engine step exactly as one created with that Sysformer.
TEST_F(CudaEngineFaults, AFailedSysformerSwapRefusesGuardedWorkUntilOneSucceeds) {
    sf_sysformer *raw = nullptr;
    ASSERT_TRUE(make_open_sysformer(llm_, 23, &raw));
    std::unique_ptr<sf_sysformer, void (*)(sf_sysformer *)> b(raw, sf_sysformer_free);
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    const Prompts p = tiny_prompts({{5, 2}, {4, 3}}, 91);
    StepOut want_a, want_b, plain_want;
    {
        EnginePtr a_ref = make_engine(llm_, sf_, faults_options());
        EnginePtr b_ref = make_engine(llm_, b.get(), faults_options());
        ASSERT_TRUE(a_ref && b_ref);
        ASSERT_TRUE(prefill(a_ref.get(), p, {0, 1}, true, vocab_, &want_a));
        ASSERT_TRUE(prefill(b_ref.get(), p, {0, 1}, true, vocab_, &want_b));
        ASSERT_NE(want_a.logits, want_b.logits) << "A and B give the same logits: void test";
        ASSERT_EQ(sf_cuda_engine_reset_slot(b_ref.get(), 0), SF_OK);
        ASSERT_EQ(sf_cuda_engine_reset_slot(b_ref.get(), 1), SF_OK);
        ASSERT_TRUE(prefill(b_ref.get(), p, {0, 1}, false, vocab_, &plain_want));
    }
    EnginePtr e = make_engine(llm_, sf_, faults_options());
    EnginePtr g = make_engine(llm_, sf_, faults_options(true));  // guard-only
    ASSERT_TRUE(e && g);
    const long long c0 = simt::fault_calls(simt::FAULT_LAUNCH);
    ASSERT_EQ(sf_cuda_engine_set_sysformer(e.get(), sf_), SF_OK) << sf_last_error();
    const long long launches = simt::fault_calls(simt::FAULT_LAUNCH) - c0;
    ASSERT_GT(launches, 4) << "one conversion a tensor";
    const std::vector<int32_t> slots = {0, 1};
    for (const long long k : spread(launches, 4)) {
        SCOPED_TRACE("launch " + std::to_string(k) + " of " + std::to_string(launches));
        for (sf_cuda_engine *x : {e.get(), g.get()}) {
            simt::fail_call(simt::FAULT_LAUNCH, k);
            const sf_status st = sf_cuda_engine_set_sysformer(x, b.get());
            simt::disarm_faults();
            EXPECT_EQ(st, SF_ERR_CUDA) << sf_last_error();
        }
        const long long before = simt::fault_calls(simt::FAULT_LAUNCH);
        sf_cuda_step s = {};
        s.n_requests = p.n();
        s.slots = slots.data();
        s.cu_seqlens = p.cu.data();
        s.token_ids = p.ids.data();
        s.spans = p.spans.data();
        s.sampling = &kGreedy;
        EXPECT_EQ(sf_cuda_engine_step(e.get(), &s), SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(contains(sf_last_error(), "set one again")) << sf_last_error();
        DeviceBuffer<int32_t> d_cu(p.cu), d_ids(p.ids), d_spans(flat_spans(p.spans));
        DeviceBuffer<uint16_t> d_out((size_t)p.total() * d);
        ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_out.get());
        EXPECT_EQ(sf_cuda_guarded_embed(g.get(), p.n(), p.total(), d_cu.get(), d_ids.get(),
                                        (const sf_prompt_spans *)d_spans.get(), 8, 8,
                                        d_out.get(), nullptr, nullptr),
                  SF_ERR_INVALID_ARGUMENT);
        EXPECT_TRUE(contains(sf_last_error(), "incomplete")) << sf_last_error();
        EXPECT_EQ(simt::fault_calls(simt::FAULT_LAUNCH), before) << "a refusal launched work";
        // unguarded work goes on
        StepOut plain;
        ASSERT_TRUE(prefill(e.get(), p, slots, false, vocab_, &plain));
        EXPECT_EQ(plain.logits, plain_want.logits);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 0), SF_OK);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 1), SF_OK);
        // a swap that succeeds: B's logits, then A's again
        ASSERT_EQ(sf_cuda_engine_set_sysformer(e.get(), b.get()), SF_OK) << sf_last_error();
        StepOut got;
        ASSERT_TRUE(prefill(e.get(), p, slots, true, vocab_, &got));
        EXPECT_EQ(got.logits, want_b.logits);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 0), SF_OK);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 1), SF_OK);
        ASSERT_EQ(sf_cuda_engine_set_sysformer(e.get(), sf_), SF_OK) << sf_last_error();
        ASSERT_TRUE(prefill(e.get(), p, slots, true, vocab_, &got));
        EXPECT_EQ(got.logits, want_a.logits);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 0), SF_OK);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 1), SF_OK);
        ASSERT_EQ(sf_cuda_engine_set_sysformer(g.get(), sf_), SF_OK) << sf_last_error();
        EXPECT_FALSE(guarded_embed(g.get(), p, d, 8, 8).empty());
    }
}

// 5. The step API (sf_cuda_engine_step): a step that fails after validation empties its own
// slots, and only those (include/sysformer.h). A launch is refused at points spread over a
// guarded prefill of two requests, and over the decode step after it (whose graph is captured
// then), while a third request holds another slot. Afterwards the step's slots are empty, the
// third's is as it was, and the third request's decode, then the same steps again, give the
// logits of an engine that never failed (the decode first: its inputs differ from the failed
// step's, which the failed step's queued uploads must not read).
TEST_F(CudaEngineFaults, AFailedStepEmptiesItsSlotsAndNoOthers) {
    sf_cuda_engine_options o = faults_options();
    o.max_slots = 3;
    const int64_t vocab = sf_llm_get_config(llm_)->vocab_size;
    const sf_sampling greedy = {0.0f, 0, 1.0f, 0, false, 0};
    const Prompts third = prompts_.only(2);
    const std::vector<int32_t> pair_slots = {0, 1}, third_slot = {2};
    auto step = [&](sf_cuda_engine *e, const Prompts *p, const std::vector<int32_t> &slots) {
        sf_cuda_step st = {};
        st.n_requests = (int32_t)slots.size();
        st.slots = slots.data();
        if (p) {
            st.cu_seqlens = p->cu.data();
            st.token_ids = p->ids.data();
            st.spans = p->spans.data();
        }
        st.sampling = &greedy;
        return sf_cuda_engine_step(e, &st);
    };
    auto logits = [&](sf_cuda_engine *e, int32_t n) {
        std::vector<float> v((size_t)n * vocab, NAN);
        EXPECT_EQ(sf_cuda_engine_read_logits(e, v.data(), n), SF_OK) << sf_last_error();
        return v;
    };
    auto create = [&] { return make_engine(llm_, sf_, o); };
    // The reference: third on slot 2; the pair on 0 and 1; the pair's decode; third's decode.
    // Launches counted per step.
    EnginePtr ref = create();
    ASSERT_TRUE(ref);
    ASSERT_EQ(step(ref.get(), &third, third_slot), SF_OK) << sf_last_error();
    long long c0 = simt::fault_calls(simt::FAULT_LAUNCH);
    ASSERT_EQ(step(ref.get(), &two_, pair_slots), SF_OK) << sf_last_error();
    const std::vector<float> want_prefill = logits(ref.get(), 2);
    const long long prefill_launches = simt::fault_calls(simt::FAULT_LAUNCH) - c0;
    c0 = simt::fault_calls(simt::FAULT_LAUNCH);
    ASSERT_EQ(step(ref.get(), nullptr, pair_slots), SF_OK) << sf_last_error();
    const std::vector<float> want_decode = logits(ref.get(), 2);
    const long long decode_launches = simt::fault_calls(simt::FAULT_LAUNCH) - c0;
    ASSERT_EQ(step(ref.get(), nullptr, third_slot), SF_OK) << sf_last_error();
    const std::vector<float> want_third = logits(ref.get(), 1);
    const int32_t third_len = third.total();
    ASSERT_GT(prefill_launches, 10);
    ASSERT_GT(decode_launches, 10);

    for (int failing = 0; failing < 2; failing++) {
        const bool in_decode = failing == 1;
        const long long launches = in_decode ? decode_launches : prefill_launches;
        for (long long k : spread(launches, 8)) {
            SCOPED_TRACE(std::string(in_decode ? "decode" : "prefill") + ", launch " +
                         std::to_string(k) + " of " + std::to_string(launches));
            EnginePtr e = create();
            ASSERT_TRUE(e);
            ASSERT_EQ(step(e.get(), &third, third_slot), SF_OK) << sf_last_error();
            if (in_decode) {
                ASSERT_EQ(step(e.get(), &two_, pair_slots), SF_OK) << sf_last_error();
            }
            simt::fail_call(simt::FAULT_LAUNCH, k);
            const sf_status st = step(e.get(), in_decode ? nullptr : &two_, pair_slots);
            simt::disarm_faults();
            EXPECT_EQ(st, SF_ERR_CUDA) << sf_last_error();
            EXPECT_EQ(simt::resources().nvtx_depth, 0) << "NVTX ranges left open";
            EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 0), 0);
            EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 1), 0);
            EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 2), third_len) << "not the step's slot";
            float row;
            EXPECT_EQ(sf_cuda_engine_read_logits(e.get(), &row, 1), SF_ERR_INVALID_ARGUMENT)
                << "a failed step leaves no results to read";

            // First a step with other inputs (the third request's decode, alone): what the
            // failed step enqueued before it failed still reads the staging, which this step
            // must not refill before that has run.
            ASSERT_EQ(step(e.get(), nullptr, third_slot), SF_OK) << sf_last_error();
            EXPECT_EQ(logits(e.get(), 1), want_third) << "the third request's slot was touched";
            EXPECT_EQ(sf_cuda_engine_slot_length(e.get(), 2), third_len + 1);
            ASSERT_EQ(step(e.get(), &two_, pair_slots), SF_OK) << sf_last_error();
            EXPECT_EQ(logits(e.get(), 2), want_prefill);
            ASSERT_EQ(step(e.get(), nullptr, pair_slots), SF_OK) << sf_last_error();
            EXPECT_EQ(logits(e.get(), 2), want_decode);
        }
    }
}
// 6. Host memory: each allocation the host code makes (engine creation, then a session:
// creation, submissions, every round, taking the results) failing in turn, 300 spread over
// them: SF_ERR_OUT_OF_MEMORY from the call that made it, with a message, and nothing held on
// the device afterwards (under SAN=asan, LeakSanitizer watches the host side).
TEST_F(CudaEngineFaults, EveryHostAllocationFailingIsReported) {
    const simt::Resources before = simt::resources();
    fail_each_allocation(
        "an engine and a session",
        [&](std::vector<float> *) {
            const sf_cuda_engine_options o = faults_options();
            sf_cuda_engine *e = nullptr;
            sf_cuda_session *s = nullptr;
            sf_status st = sf_cuda_engine_create(llm_, sf_, &o, &e);
            if (st == SF_OK) st = sf_cuda_session_create(e, nullptr, nullptr, 0, nullptr, 0, &s);
            for (int32_t r = 0; st == SF_OK && r < prompts_.n(); r++) {
                const std::vector<int32_t> ids = prompts_.request(r);
                int32_t id = -1;
                st = sf_cuda_session_submit(s, ids.data(), (int32_t)ids.size(),
                                            &prompts_.spans[r], &sampling_[r], limits_[r], &id);
            }
            int32_t running = 1, waiting = 1;
            for (int32_t round = 0; st == SF_OK && round < 64 && running + waiting > 0; round++) {
                st = sf_cuda_session_step(s, nullptr, nullptr, &running, &waiting);
            }
            for (int32_t r = 0; st == SF_OK && r < prompts_.n(); r++) {
                sf_generation_result res = {};
                bool done = false;
                st = sf_cuda_session_take(s, r, &res, &done);
                sf_generation_result_free(&res);
            }
            sf_cuda_session_free(s);
            sf_cuda_engine_free(e);
            return st;
        },
        0.0, 300, [&] { EXPECT_TRUE(holds(before)); });
}

class CudaEngineHostTraffic : public CudaEngineFaults {};  // the same model and prompts

// A step copies back its sampled ids (4 bytes a request), and their log-probabilities (4 more,
// a second copy) when asked; a graph that holds the sampling holds those copies too.
TEST_F(CudaEngineHostTraffic, AStepNeverWaitsAndCopiesBackOnlyTheSampledIds) {
    const sf_sampling greedy = {0.0f, 0, 1.0f, 0, false, 0};
    sf_sampling greedy_logprobs = greedy;
    greedy_logprobs.logprobs = true;
    const std::vector<int32_t> slots = {0, 1};
    for (const bool graphs : {true, false}) {
        SCOPED_TRACE(graphs ? "CUDA graphs" : "eager");
        sf_cuda_engine_options o = faults_options();
        o.cuda_graphs = graphs;
        EnginePtr e = make_engine(llm_, sf_, o);
        ASSERT_TRUE(e);
        void *const stream = sf_cuda_engine_stream(e.get());
        auto step = [&](const char *what, bool prefill, bool sample, long long d2h_bytes,
                        bool logprobs = false) {
            SCOPED_TRACE(what);
            sf_cuda_step st = {};
            st.n_requests = 2;
            st.slots = slots.data();
            if (prefill) {
                st.cu_seqlens = two_.cu.data();
                st.token_ids = two_.ids.data();
                st.spans = two_.spans.data();
            }
            st.sampling = !sample ? nullptr : logprobs ? &greedy_logprobs : &greedy;
            simt::reset_traffic();
            ASSERT_EQ(sf_cuda_engine_step(e.get(), &st), SF_OK) << sf_last_error();
            const simt::Traffic t = simt::traffic();
            EXPECT_LE(t.event_syncs, 1);
            EXPECT_EQ(t.stream_syncs, 0);
            EXPECT_EQ(t.device_syncs, 0);
            EXPECT_EQ(t.sync_calls, 0);
            EXPECT_EQ(t.allocations, 0);
            EXPECT_EQ(t.streams, std::vector<void *>{stream});
            EXPECT_EQ(t.d2h_bytes, d2h_bytes);
            EXPECT_EQ(t.d2h_copies, d2h_bytes / 8);
            if (sample) {
                int32_t ids[2];
                ASSERT_EQ(sf_cuda_engine_read_tokens(e.get(), ids, 2), SF_OK) << sf_last_error();
            }
            if (logprobs) {
                float lp[2];
                ASSERT_EQ(sf_cuda_engine_read_logprobs(e.get(), lp, 2), SF_OK) << sf_last_error();
            }
        };
        step("guarded prefill", true, true, 8);
        step(graphs ? "decode, its graph captured" : "decode", false, true, 8);
        step(graphs ? "decode, the graph replayed" : "decode again", false, true, graphs ? 0 : 8);
        step(graphs ? "decode with log-probabilities, captured" : "decode with log-probabilities",
             false, true, 16, true);
        step(graphs ? "decode with log-probabilities, replayed" : "and again", false, true,
             graphs ? 0 : 16, true);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 0), SF_OK);
        ASSERT_EQ(sf_cuda_engine_reset_slot(e.get(), 1), SF_OK);
        step("guarded prefill, logits only", true, false, 0);
    }
}

// The serving entry points (sysformer.h: "allocates nothing, never synchronises and copies
// nothing between host and device"): sf_cuda_guard_check and sf_cuda_guarded_embed on the
// stack's stream, on a guard-only engine and a full one: no wait, nothing synchronous, no
// allocation, no copy either way, and work on the stack's stream alone (the engine's own
// stream untouched).
TEST_F(CudaEngineHostTraffic, TheGuardedEmbeddingNeverWaitsOrCopies) {
    const int64_t d = sf_llm_get_config(llm_)->hidden_size;
    DeviceBuffer<int32_t> d_cu(two_.cu), d_ids(two_.ids), d_spans(flat_spans(two_.spans)),
        d_flags(2);
    DeviceBuffer<uint16_t> d_out((size_t)two_.total() * d);
    DeviceBuffer<int> d_err(1);
    ASSERT_TRUE(d_cu.get() && d_ids.get() && d_spans.get() && d_flags.get() && d_out.get() &&
                d_err.get());
    cudaStream_t stream = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    std::unique_ptr<CUstream_st, cudaError_t (*)(cudaStream_t)> stream_guard(stream,
                                                                             cudaStreamDestroy);
    for (const bool guard_only : {true, false}) {
        SCOPED_TRACE(guard_only ? "guard-only engine" : "full engine");
        EnginePtr e = make_engine(llm_, sf_, faults_options(guard_only));
        ASSERT_TRUE(e);
        simt::reset_traffic();
        ASSERT_EQ(sf_cuda_guard_check(e.get(), two_.n(), two_.total(), d_cu.get(), d_ids.get(),
                                      (const sf_prompt_spans *)d_spans.get(), 8, 8,
                                      d_flags.get(), stream),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(sf_cuda_guarded_embed(e.get(), two_.n(), two_.total(), d_cu.get(), d_ids.get(),
                                        (const sf_prompt_spans *)d_spans.get(), 8, 8,
                                        d_out.get(), d_err.get(), stream),
                  SF_OK)
            << sf_last_error();
        const simt::Traffic t = simt::traffic();
        EXPECT_EQ(t.event_syncs + t.stream_syncs + t.device_syncs, 0);
        EXPECT_EQ(t.sync_calls, 0);
        EXPECT_EQ(t.allocations, 0);
        EXPECT_EQ(t.d2h_copies, 0);
        EXPECT_EQ(t.h2d_copies, 0);
        EXPECT_EQ(t.streams, std::vector<void *>{(void *)stream});
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    }
}

// A long-lived session holds what its caller has not taken, not every request it ever had:
// 100000 requests submitted, cancelled and taken one by one. The largest host allocation in the
// loop must stay a request's own: its struct, its prompt (15 ids), its result's token buffer
// (2 ids) and the ring's first 64 entries (512 bytes, the largest, as measured) are each well
// under 4 KiB, while a table of every id (the session before this ring) reaches 8 B x 2^17 =
// 1 MiB (measured on that code: 1048576). Counted by tests/alloc_fail.c, which tools/simt
// links in.
TEST_F(CudaEngineHostTraffic, ALongSessionHoldsOnlyWhatIsNotTaken) {
    EnginePtr e = engine();
    ASSERT_TRUE(e);
    sf_cuda_session *raw = nullptr;
    ASSERT_EQ(sf_cuda_session_create(e.get(), nullptr, nullptr, 0, nullptr, 0, &raw), SF_OK)
        << sf_last_error();
    SessionPtr s(raw);
    const std::vector<int32_t> ids = prompts_.request(0);
    sf_test_alloc_reset_largest();
    for (int32_t k = 0; k < 100000; k++) {
        int32_t id = -1;
        ASSERT_EQ(sf_cuda_session_submit(s.get(), ids.data(), (int32_t)ids.size(),
                                         &prompts_.spans[0], nullptr, 2, &id),
                  SF_OK)
            << sf_last_error();
        ASSERT_EQ(id, k);
        ASSERT_EQ(sf_cuda_session_cancel(s.get(), id), SF_OK) << sf_last_error();
        sf_generation_result res = {};
        bool done = false;
        ASSERT_EQ(sf_cuda_session_take(s.get(), id, &res, &done), SF_OK) << sf_last_error();
        ASSERT_TRUE(done);
        sf_generation_result_free(&res);
    }
    const unsigned long long largest = sf_test_alloc_largest();
    EXPECT_GT(largest, 0u) << "alloc_fail.c saw no allocation: not linked in?";
    EXPECT_LT(largest, 4096u) << largest;
}

#endif  // SIMT_FAULT_INJECTION

}  // namespace
