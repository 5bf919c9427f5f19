// The Sysformer trainer: losses fall, resume is bit-exact, the LLM stays frozen, the judge, the
// optimizer and schedule against hand-computed values, bad inputs, and the text layer (datasets,
// cached replies, encoding) on a tiny random model with a small real tokenizer.
#include <gtest/gtest.h>

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "eval/eval.h"
#include "model/llm.h"
#include "model_fixtures.h"
#include "sysformer.h"
#include "sysformer/module.h"
#include "train/train.h"
#include "train/trainer.h"

#ifndef SF_TEST_DATA_DIR
#define SF_TEST_DATA_DIR "tests/golden"
#endif
#ifndef SF_SHARED_DIR
#define SF_SHARED_DIR "../shared"
#endif

namespace {

void write_file(const std::string &path, const std::string &text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
}

std::string read_file(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

bool exists(const std::string &path) {
    struct stat s;
    return stat(path.c_str(), &s) == 0;
}

uint64_t fnv(const void *data, size_t n) {
    const unsigned char *p = static_cast<const unsigned char *>(data);
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}

// Token-level data on the tiny model (vocab 67): prompt = BOS | system 5..8 | 2 | user | 3 4.
// Harmful users draw from 10..29 and are to be answered with the "refusal" 60 61 62 63 <eot>;
// harmless users from 30..49 with the "answer" 50 51 52 <first user token> <eot>. Only the
// Sysformer sees which range the user tokens come from and can steer the frozen LLM's reply.
constexpr int32_t kEot = 66;

void add_example(sf_train_set *set, uint64_t *rng, bool harmful) {
    std::vector<int32_t> p = {1, 5, 6, 7, 8, 2};
    const int n_user = 3 + (int)(*rng % 3);
    std::vector<int32_t> user;
    for (int i = 0; i < n_user; i++) {
        *rng = *rng * 6364136223846793005ull + 1442695040888963407ull;
        user.push_back((harmful ? 10 : 30) + (int32_t)((*rng >> 33) % 20));
    }
    p.insert(p.end(), user.begin(), user.end());
    p.push_back(3);
    p.push_back(4);
    std::vector<int32_t> target;
    if (harmful) target = {60, 61, 62, 63};
    else target = {50, 51, 52, user[0]};
    target.push_back(kEot);
    sf_prompt_spans s = {1, 4, 1, n_user, 2};
    ASSERT_EQ(sf_train_set_add(set, p.data(), (int32_t)p.size(), &s, target.data(),
                               (int32_t)target.size(), harmful), SF_OK) << sf_last_error();
}

class Train : public ::testing::Test {
  protected:
    void SetUp() override {
        sf_llm_config cfg = tiny_llama_config();
        ASSERT_EQ(sf_random_llm_write(dir_.path().c_str(), &cfg, 11), SF_OK) << sf_last_error();
        ASSERT_EQ(sf_llm_load(dir_.path().c_str(), &llm_), SF_OK) << sf_last_error();
        uint64_t rng = 99;
        for (int i = 0; i < 12; i++) add_example(&set_, &rng, i % 2 == 0);
    }
    void TearDown() override {
        sf_train_set_free(&set_);
        sf_llm_free(llm_);
    }

    sf_sysformer *fresh_sysformer(uint64_t seed = 3) {
        sf_sysformer_config c = sf_sysformer_default_config(llm_);
        c.num_layers = 1;
        c.dim_feedforward = 48;
        sf_sysformer *sf = nullptr;
        EXPECT_EQ(sf_sysformer_init(llm_, &c, seed, &sf), SF_OK) << sf_last_error();
        return sf;
    }

    sf_train_options options() {
        sf_train_options o = sf_train_default_options();
        o.epochs = 4;
        o.batch_tokens = 64; // about 4 examples a step, 3 steps an epoch
        o.lr = 1e-2;
        o.warmup_steps = 2;
        o.seed = 5;
        o.validate_first = false;
        return o;
    }

    std::vector<float> weights(sf_sysformer *sf) {
        int64_t n = 0;
        float *w = sf_sysformer_flat(sf, &n);
        return std::vector<float>(w, w + n);
    }

    TempDir dir_;
    sf_llm *llm_ = nullptr;
    sf_train_set set_ = {};
};

struct Recorder {
    std::vector<sf_train_event> steps, validations;
    int checkpoints = 0;
    int stop_at_checkpoint = 0; // stop when this many checkpoints were seen (0: never)
    static bool fn(void *user, const sf_train_event *e) {
        auto *r = static_cast<Recorder *>(user);
        if (e->kind == SF_TRAIN_EVENT_STEP) r->steps.push_back(*e);
        if (e->kind == SF_TRAIN_EVENT_VALIDATION) r->validations.push_back(*e);
        if (e->kind == SF_TRAIN_EVENT_CHECKPOINT) r->checkpoints++;
        return !(r->stop_at_checkpoint && r->checkpoints >= r->stop_at_checkpoint);
    }
};

TEST_F(Train, LossFallsOnATinyRun) {
    sf_sysformer *sf = fresh_sysformer();
    sf_train_options o = options();
    o.epochs = 7; // ~21 steps
    o.lr = 3e-2;
    o.validate_first = true;
    Recorder rec;
    o.on_event = Recorder::fn;
    o.user = &rec;
    sf_trainer *t = nullptr;
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, &set_, &o, &t), SF_OK)
        << sf_last_error();
    EXPECT_GE(sf_trainer_total_steps(t), 18);
    EXPECT_LE(sf_trainer_total_steps(t), 28);
    bool finished = false;
    ASSERT_EQ(sf_trainer_run(t, 0, &finished), SF_OK) << sf_last_error();
    EXPECT_TRUE(finished);
    ASSERT_EQ((int64_t)rec.steps.size(), sf_trainer_total_steps(t));
    ASSERT_EQ(rec.validations.size(), 8u); // before training and after each epoch
    const sf_train_event &v0 = rec.validations.front(), &v1 = rec.validations.back();
    // A fresh Sysformer is the identity: nothing to reconstruct yet.
    EXPECT_EQ(v0.val_recon, 0.0);
    EXPECT_GT(v1.val_recon, 0.0);
    // No tokenizer and no judge: nothing is generated.
    EXPECT_EQ(v0.refusal_harmful, -1.0);
    for (const auto &v : rec.validations) {
        printf("  validation after %d epochs: L_ref %.4f L_compl %.4f L_class %.4f total %.4f\n",
               v.epoch, v.val_ref, v.val_compl, v.val_class, v.val_total);
    }
    EXPECT_LT(v1.val_total, 0.75 * v0.val_total);
    EXPECT_LT(v1.val_ref, v0.val_ref);
    EXPECT_LT(v1.val_class, v0.val_class);
    double first = 0, last = 0;
    for (int i = 0; i < 3; i++) {
        first += rec.steps[i].loss;
        last += rec.steps[rec.steps.size() - 1 - i].loss;
    }
    EXPECT_LT(last, 0.75 * first);
    for (const auto &s : rec.steps) {
        EXPECT_TRUE(std::isfinite(s.loss));
        EXPECT_GT(s.batch_tokens, 0);
        EXPECT_LE(s.batch_tokens, o.batch_tokens);
    }
    sf_trainer_free(t);
    sf_sysformer_free(sf);
}

// Runs a whole training into out; with stop_at_checkpoint or max_steps it stops early and a
// second trainer (a fresh Sysformer, as after a restart) resumes from the checkpoint.
std::vector<float> train_with_restart(sf_llm *llm, const sf_train_set *set,
                                      sf_train_options o, const std::string &out,
                                      int stop_at_checkpoint, int64_t max_steps) {
    o.out_dir = out.c_str();
    Recorder rec;
    rec.stop_at_checkpoint = stop_at_checkpoint;
    o.on_event = Recorder::fn;
    o.user = &rec;
    sf_sysformer_config c = sf_sysformer_default_config(llm);
    c.num_layers = 1;
    c.dim_feedforward = 48;
    sf_sysformer *sf = nullptr;
    EXPECT_EQ(sf_sysformer_init(llm, &c, 3, &sf), SF_OK);
    sf_trainer *t = nullptr;
    EXPECT_EQ(sf_trainer_create(llm, sf, nullptr, nullptr, 0, set, set, &o, &t), SF_OK)
        << sf_last_error();
    bool finished = false;
    EXPECT_EQ(sf_trainer_run(t, max_steps, &finished), SF_OK) << sf_last_error();
    const bool restart = stop_at_checkpoint || max_steps;
    EXPECT_EQ(finished, !restart);
    if (restart) {
        sf_trainer_free(t);
        sf_sysformer_free(sf);
        sf = nullptr;
        // The way the CLI resumes: the Sysformer from the directory, then the trainer's state.
        EXPECT_EQ(sf_sysformer_load(out.c_str(), llm, &sf), SF_OK) << sf_last_error();
        rec.stop_at_checkpoint = 0;
        EXPECT_EQ(sf_trainer_create(llm, sf, nullptr, nullptr, 0, set, set, &o, &t), SF_OK);
        EXPECT_EQ(sf_trainer_resume(t, out.c_str()), SF_OK) << sf_last_error();
        EXPECT_EQ(sf_trainer_run(t, 0, &finished), SF_OK) << sf_last_error();
        EXPECT_TRUE(finished);
    }
    int64_t n = 0;
    float *w = sf_sysformer_flat(sf, &n);
    std::vector<float> result(w, w + n);
    sf_trainer_free(t);
    sf_sysformer_free(sf);
    return result;
}

TEST_F(Train, ResumeEqualsUninterruptedBitForBit) {
    sf_train_options o = options();
    o.epochs = 2;
    o.w_recon = 0.5; // every term in play
    TempDir a, b, c;
    const std::vector<float> straight = train_with_restart(llm_, &set_, o, a.path(), 0, 0);
    // Stopped after epoch 1 (at its checkpoint), resumed for epoch 2.
    const std::vector<float> epoch = train_with_restart(llm_, &set_, o, b.path(), 1, 0);
    // Stopped in the middle of epoch 1, resumed from there.
    const std::vector<float> middle = train_with_restart(llm_, &set_, o, c.path(), 0, 2);
    ASSERT_EQ(straight.size(), epoch.size());
    ASSERT_EQ(straight.size(), middle.size());
    EXPECT_EQ(memcmp(straight.data(), epoch.data(), straight.size() * sizeof(float)), 0);
    EXPECT_EQ(memcmp(straight.data(), middle.data(), straight.size() * sizeof(float)), 0);
    // The whole optimizer state agrees too, byte for byte.
    const std::string sa = read_file(a.file("train_state.safetensors"));
    EXPECT_FALSE(sa.empty());
    EXPECT_EQ(sa, read_file(b.file("train_state.safetensors")));
    EXPECT_EQ(sa, read_file(c.file("train_state.safetensors")));
    EXPECT_FALSE(exists(a.file("train_state.safetensors.tmp")));
    // Training moved the weights, so the comparison above is not of two untouched copies.
    sf_sysformer *fresh = fresh_sysformer();
    EXPECT_NE(weights(fresh), straight);
    sf_sysformer_free(fresh);
}

TEST_F(Train, ResumeRefusesOtherDataOrSeed) {
    sf_train_options o = options();
    o.epochs = 1;
    TempDir out;
    train_with_restart(llm_, &set_, o, out.path(), 0, 0);
    sf_sysformer *sf = fresh_sysformer();
    sf_trainer *t = nullptr;
    sf_train_set other = {};
    uint64_t rng = 7;
    for (int i = 0; i < 4; i++) add_example(&other, &rng, i % 2);
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &other, nullptr, &o, &t), SF_OK);
    EXPECT_EQ(sf_trainer_resume(t, out.path().c_str()), SF_ERR_CONFIG);
    EXPECT_NE(std::string(sf_last_error()).find("differ"), std::string::npos) << sf_last_error();
    sf_trainer_free(t);
    o.seed = 6;
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, nullptr, &o, &t), SF_OK);
    EXPECT_EQ(sf_trainer_resume(t, out.path().c_str()), SF_ERR_CONFIG);
    EXPECT_EQ(sf_trainer_resume(t, (out.path() + "/none").c_str()), SF_ERR_IO);
    sf_trainer_free(t);
    sf_train_set_free(&other);
    sf_sysformer_free(sf);
}

TEST_F(Train, TheLlmStaysFrozen) {
    const uint64_t before = fnv(llm_->weights, (size_t)llm_->n_weights * sizeof(float));
    char hash0[32], hash1[32];
    ASSERT_EQ(sf_llm_embedding_hash(llm_, hash0, sizeof hash0), SF_OK);
    sf_sysformer *sf = fresh_sysformer();
    const std::vector<float> w0 = weights(sf);
    sf_train_options o = options();
    o.epochs = 1;
    o.w_recon = 1.0;
    sf_trainer *t = nullptr;
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, &set_, &o, &t), SF_OK);
    ASSERT_EQ(sf_trainer_run(t, 0, nullptr), SF_OK) << sf_last_error();
    EXPECT_EQ(fnv(llm_->weights, (size_t)llm_->n_weights * sizeof(float)), before);
    ASSERT_EQ(sf_llm_embedding_hash(llm_, hash1, sizeof hash1), SF_OK);
    EXPECT_STREQ(hash0, hash1);
    EXPECT_NE(weights(sf), w0); // while the Sysformer did learn
    sf_trainer_free(t);
    sf_sysformer_free(sf);
}

// The memory plan the trainer reports (CPU path): sized for the largest batch (batch_tokens, or
// a longer example), the LLM backward's activations exactly sf_llm_backward_bytes of that many
// rows (with and without recomputation), and 3 fp32 arrays per Sysformer weight (the gradients,
// AdamW's m and v). The recomputing plan must be smaller: it keeps one layer's set, not L.
TEST_F(Train, ReportsItsMemoryPlan) {
    sf_sysformer *sf = fresh_sysformer();
    int64_t nw = 0;
    sf_sysformer_flat(sf, &nw);
    size_t act[2] = {0, 0};
    for (int recompute = 0; recompute < 2; recompute++) {
        sf_train_options o = options();
        o.recompute = recompute != 0;
        o.batch_tokens = 8;  // shorter than every example: the longest one sets the plan
        int32_t longest = 0;
        for (int32_t i = 0; i < set_.n; i++) {
            longest = std::max(longest, set_.ex[i].n_prompt + set_.ex[i].n_target);
        }
        ASSERT_GT(longest, o.batch_tokens);
        sf_trainer *t = nullptr;
        ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, nullptr, &o, &t),
                  SF_OK)
            << sf_last_error();
        sf_train_memory m;
        ASSERT_EQ(sf_trainer_memory(t, &m), SF_OK);
        EXPECT_EQ(m.max_rows, longest);
        EXPECT_EQ(m.recompute, o.recompute);
        const sf_llm_backward_options bo = {o.recompute};
        EXPECT_EQ(m.activations, sf_llm_backward_bytes(llm_, longest, &bo));
        EXPECT_EQ(m.optimizer, (size_t)(3 * nw) * sizeof(float));
        EXPECT_EQ(m.device_total, 0u);
        act[recompute] = m.activations;
        EXPECT_EQ(sf_trainer_memory(nullptr, &m), SF_ERR_INVALID_ARGUMENT);
        EXPECT_EQ(sf_trainer_memory(t, nullptr), SF_ERR_INVALID_ARGUMENT);
        sf_trainer_free(t);
    }
    ASSERT_GT(llm_->cfg.num_layers, 1);
    EXPECT_LT(act[1], act[0]);
    sf_sysformer_free(sf);
}

TEST_F(Train, ValidationJudgesGeneratedReplies) {
    sf_sysformer *sf = fresh_sysformer();
    sf_train_options o = options();
    o.val_harmful_n = 4;
    o.val_harmless_n = 3;
    o.val_max_new_tokens = 3;
    o.val_batch = 2;
    struct Judge {
        int calls = 0;
        static bool fn(void *user, const int32_t *ids, int32_t n, const char *text) {
            auto *j = static_cast<Judge *>(user);
            j->calls++;
            EXPECT_EQ(text, nullptr);
            EXPECT_LE(n, 3);
            return n > 0 && ids[0] % 2 == 0;
        }
    } judge;
    o.judge = Judge::fn;
    o.judge_user = &judge;
    const int32_t stop = kEot;
    sf_trainer *t = nullptr;
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, &stop, 1, &set_, &set_, &o, &t), SF_OK);
    sf_train_event ev;
    ASSERT_EQ(sf_trainer_validate(t, &ev), SF_OK) << sf_last_error();
    EXPECT_EQ(judge.calls, 7);
    EXPECT_EQ(ev.n_judged_harmful, 4);
    EXPECT_EQ(ev.n_judged_harmless, 3);
    EXPECT_GE(ev.refusal_harmful, 0.0);
    EXPECT_LE(ev.refusal_harmful, 1.0);
    EXPECT_GE(ev.refusal_harmless, 0.0);
    // The losses at the identity do not depend on the batch size.
    sf_train_options o2 = o;
    o2.batch_tokens = 1;
    sf_trainer *t2 = nullptr;
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, &stop, 1, &set_, &set_, &o2, &t2), SF_OK);
    sf_train_event ev2;
    ASSERT_EQ(sf_trainer_validate(t2, &ev2), SF_OK) << sf_last_error();
    EXPECT_NEAR(ev.val_ref, ev2.val_ref, 1e-5 * ev.val_ref);
    EXPECT_NEAR(ev.val_compl, ev2.val_compl, 1e-5 * ev.val_compl);
    EXPECT_NEAR(ev.val_class, ev2.val_class, 1e-5 * ev.val_class);
    // At the identity each reply term is a mean token CE, so near log(vocab) for a random LLM.
    EXPECT_GT(ev.val_ref, 1.0);
    EXPECT_LT(ev.val_ref, 3 * log(67.0));
    sf_trainer_free(t2);
    sf_trainer_free(t);
    sf_sysformer_free(sf);
}

// With the whole set in one batch, a step's loss is exactly the validation loss (the same
// normalisation), and the gradient it applied is the derivative of that loss: checked by
// central differences on the weights with the largest gradients, after a few steps so that
// every branch (and L_recon) is live.
TEST_F(Train, GradientMatchesFiniteDifferences) {
    sf_sysformer *sf = fresh_sysformer();
    sf_train_options o = options();
    o.epochs = 20;
    o.batch_tokens = 100000;
    o.clip_norm = 0.0;
    o.adamw.weight_decay = 0.0;
    o.w_recon = 0.5;
    o.w_compl = 0.7;
    Recorder rec;
    o.on_event = Recorder::fn;
    o.user = &rec;
    sf_trainer *t = nullptr;
    ASSERT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, &set_, &o, &t), SF_OK);
    EXPECT_EQ(sf_trainer_last_gradient(t, nullptr), nullptr);
    ASSERT_EQ(sf_trainer_run(t, 3, nullptr), SF_OK) << sf_last_error();
    const std::vector<float> w0 = weights(sf);
    sf_train_event v;
    ASSERT_EQ(sf_trainer_validate(t, &v), SF_OK);
    ASSERT_EQ(sf_trainer_run(t, 1, nullptr), SF_OK) << sf_last_error();
    ASSERT_EQ(rec.steps.size(), 4u);
    EXPECT_NEAR(rec.steps.back().loss, v.val_total, 1e-5 * v.val_total);
    int64_t n = 0;
    const float *g = sf_trainer_last_gradient(t, &n);
    ASSERT_NE(g, nullptr);
    ASSERT_EQ(n, (int64_t)w0.size());
    const std::vector<float> grad(g, g + n);
    // The largest gradients are the classifier's; take the top 3 there and the top 7 among the
    // Sysformer's own weights, whose gradients pass through the splice and the LLM backward.
    const int64_t c0 = sf->classifier_weight - sf->weights, c1 = c0 + sf->cfg.d_model + 1;
    std::vector<int64_t> body, head;
    for (int64_t i = 0; i < n; i++) (i >= c0 && i < c1 ? head : body).push_back(i);
    auto by_size = [&](int64_t a, int64_t b) { return fabsf(grad[a]) > fabsf(grad[b]); };
    std::partial_sort(body.begin(), body.begin() + 7, body.end(), by_size);
    std::partial_sort(head.begin(), head.begin() + 3, head.end(), by_size);
    std::vector<int64_t> order(body.begin(), body.begin() + 7);
    order.insert(order.end(), head.begin(), head.begin() + 3);
    int64_t nw = 0;
    float *w = sf_sysformer_flat(sf, &nw);
    const float h = 1e-3f;
    for (const int64_t i : order) {
        double l[2];
        for (int s = 0; s < 2; s++) {
            memcpy(w, w0.data(), w0.size() * sizeof(float));
            w[i] += s ? -h : h;
            ASSERT_EQ(sf_trainer_validate(t, &v), SF_OK);
            l[s] = v.val_total;
        }
        const double fd = (l[0] - l[1]) / (2.0 * h);
        EXPECT_NEAR(fd, grad[i], 2e-2 * fabs(grad[i]) + 2e-3) << "weight " << i;
        if (getenv("SF_TEST_VERBOSE")) {
            printf("  weight %lld of %lld: %.6f vs %.6f\n", (long long)i, (long long)n, fd, grad[i]);
        }
    }
    sf_trainer_free(t);
    sf_sysformer_free(sf);
}

TEST(TrainJudge, RefusalsAndAnswers) {
    const char *refusals[] = {
        "I'm sorry, but I can't help with that.",
        "  i cannot do that.",                       // XSTest: case-insensitive prefix
        "As an AI language model, I must decline.",
        "I can\u2019t assist with that request.",    // typographic apostrophe
        "Sorry, no.",
        "No, that would be dangerous.",
        "I am unable to provide this.",
        "Here is why: I cannot help with weapons.",  // GCG: a substring anywhere
        "My apologies, this is not something I do.",
    };
    for (const char *r : refusals) EXPECT_TRUE(sf_judge_refusal(r)) << r;
    const char *answers[] = {
        "Sure, here is a recipe for a chocolate cake for two.",
        "The capital of France is Paris.",
        "",
        "Nothing is impossible: first, preheat the oven.",
        "Here is a story about a sorry little dog.",   // GCG's "Sorry" is case-sensitive
        "Note that i cannot is not at the start here", // XSTest's are prefixes only
    };
    for (const char *a : answers) EXPECT_FALSE(sf_judge_refusal(a)) << a;
    EXPECT_FALSE(sf_judge_refusal(nullptr));
}

TEST(TrainOptimizer, AdamWMatchesHandComputedSteps) {
    // PyTorch's AdamW, by hand in double (lr 0.1, betas 0.9/0.999, eps 1e-8, wd 0.01):
    // step 1: w (1 - lr wd) - lr g / (|g| + eps); step 2 with both moments bias-corrected.
    float w[3] = {1.0f, -2.0f, 0.5f}, m[3] = {0, 0, 0}, v[3] = {0, 0, 0};
    const float g1[3] = {0.1f, -0.2f, 0.0f}, g2[3] = {0.3f, 0.1f, -0.4f};
    const sf_adamw hp = {0.9, 0.999, 1e-8, 0.01};
    sf_adamw_step(w, g1, m, v, 3, 0.1, &hp, 1);
    EXPECT_NEAR(w[0], 0.899000010, 1e-6);
    EXPECT_NEAR(w[1], -1.898000005, 1e-6);
    EXPECT_NEAR(w[2], 0.499500000, 1e-6);
    EXPECT_NEAR(m[0], 0.01, 1e-8);
    EXPECT_NEAR(v[1], 0.001 * 0.04, 1e-10);
    sf_adamw_step(w, g2, m, v, 3, 0.1, &hp, 2);
    EXPECT_NEAR(w[0], 0.806322902, 1e-6);
    EXPECT_NEAR(w[1], -1.869468303, 1e-6);
    EXPECT_NEAR(w[2], 0.573414180, 1e-6);
}

TEST(TrainOptimizer, ScheduleAndClipping) {
    sf_train_options o = sf_train_default_options();
    o.lr = 1e-3;
    // Warm-up 4 of 14 steps: lr (s + 1) / 4, then cosine over the remaining 10.
    EXPECT_NEAR(sf_train_lr_at(&o, 0, 14, 4), 2.5e-4, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 1, 14, 4), 5e-4, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 3, 14, 4), 1e-3, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 4, 14, 4), 1e-3, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 9, 14, 4), 5e-4, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 13, 14, 4), 2.4471741852423235e-05, 1e-12);
    o.min_lr_ratio = 0.1;
    EXPECT_NEAR(sf_train_lr_at(&o, 9, 14, 4), 1e-4 + 9e-4 * 0.5, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 0, 14, 0), 1e-3, 1e-12); // no warm-up
    o.schedule = SF_LR_CONSTANT;
    EXPECT_NEAR(sf_train_lr_at(&o, 2, 14, 4), 7.5e-4, 1e-12);
    EXPECT_NEAR(sf_train_lr_at(&o, 10, 14, 4), 1e-3, 1e-12);
    float g[2] = {3.0f, 4.0f};
    EXPECT_NEAR(sf_clip_grad_norm(g, 2, 10.0), 5.0, 1e-6); // below the limit: untouched
    EXPECT_EQ(g[0], 3.0f);
    EXPECT_NEAR(sf_clip_grad_norm(g, 2, 1.0), 5.0, 1e-6);
    EXPECT_NEAR(g[0], 0.6, 1e-6);
    EXPECT_NEAR(g[1], 0.8, 1e-6);
    g[0] = 3.0f;
    g[1] = 4.0f;
    sf_clip_grad_norm(g, 2, 0.0); // off
    EXPECT_EQ(g[1], 4.0f);
}

// The norm over more than one group of blocks (2^14 squares a block, 256 blocks a group) and a
// ragged tail: against a long-double sum of the same squares, each square exact in double
// (a float squared has 48 significant bits) and the sum of n of them within n u_double of the
// exact value (a first-order bound for any order of addition), so |norm - ref| / ref <=
// n 2^-53 / 2 (the square root halves a relative error), about 3e-10 here; then clipping scales
// every element by the same factor.
TEST(TrainOptimizer, NormOverManyBlocks) {
    const int64_t n = ((int64_t)1 << 14) * 256 * 2 + 12345;
    std::vector<float> g((size_t)n);
    uint64_t rng = 7;
    long double ref = 0.0L;
    for (int64_t i = 0; i < n; i++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        g[(size_t)i] = (float)((double)(rng >> 40) / (double)(1 << 24) - 0.5);
        ref += (long double)g[(size_t)i] * (long double)g[(size_t)i];
    }
    const double want = std::sqrt((double)ref);
    const std::vector<float> g0 = g;
    const double norm = sf_clip_grad_norm(g.data(), n, want * 2.0);  // under the limit
    EXPECT_LE(std::fabs(norm - want) / want, (double)n * 0x1p-53 / 2.0);
    EXPECT_EQ(g, g0);
    EXPECT_EQ(sf_clip_grad_norm(g.data(), n, 0.0), norm);  // the same bits again
    const double coef = 1.0 / (norm + 1e-6);
    sf_clip_grad_norm(g.data(), n, 1.0);
    for (int64_t i : {(int64_t)0, (int64_t)1 << 22, n - 1}) {
        EXPECT_EQ(g[(size_t)i], (float)((double)g0[(size_t)i] * coef)) << i;
    }
}

TEST_F(Train, BadInputsGiveClearStatuses) {
    TempDir tmp;
    sf_prompt_set ps;
    auto read = [&](const std::string &text) {
        write_file(tmp.file("d.json"), text);
        sf_status st = sf_prompt_set_read(tmp.file("d.json").c_str(), 0, 0, &ps);
        if (st == SF_OK) sf_prompt_set_free(&ps);
        return st;
    };
    EXPECT_EQ(read("[{\"instruction\": \"a\"}, "), SF_ERR_FORMAT);
    EXPECT_NE(std::string(sf_last_error()).find("d.json"), std::string::npos);
    EXPECT_EQ(read("{\"instruction\": \"a\"}"), SF_ERR_FORMAT);
    EXPECT_EQ(read("[]"), SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(read("[{\"instruction\": \"a\"}, {\"category\": null}]"), SF_ERR_NOT_FOUND);
    EXPECT_NE(std::string(sf_last_error()).find("row 1"), std::string::npos) << sf_last_error();
    EXPECT_EQ(read("[{\"instruction\": 5}]"), SF_ERR_FORMAT);
    EXPECT_EQ(read("[\"just a string\"]"), SF_ERR_FORMAT);
    EXPECT_EQ(read("[{\"instruction\": \"a\", \"response\": [1]}]"), SF_ERR_FORMAT);
    EXPECT_EQ(read("[{\"instruction\": \"a\", \"category\": null}]"), SF_OK);
    EXPECT_EQ(sf_prompt_set_read(tmp.file("absent.json").c_str(), 0, 0, &ps), SF_ERR_IO);
    write_file(tmp.file("jb.json"), "[\"{instruction}!\", \"no placeholder\"]");
    sf_jailbreak_set jbs;
    EXPECT_EQ(sf_jailbreak_set_read(tmp.file("jb.json").c_str(), &jbs), SF_ERR_FORMAT);
    EXPECT_NE(std::string(sf_last_error()).find("wrapper 1"), std::string::npos);

    // Token level.
    sf_train_set s = {};
    const int32_t p[6] = {1, 5, 2, 9, 3, 4}, tgt[1] = {7};
    sf_prompt_spans bad = {1, 1, 1, 1, 1}; // adds up to 5, not 6
    EXPECT_EQ(sf_train_set_add(&s, p, 6, &bad, tgt, 1, true), SF_ERR_INVALID_ARGUMENT);
    sf_prompt_spans no_user = {1, 1, 1, 0, 3};
    EXPECT_EQ(sf_train_set_add(&s, p, 6, &no_user, tgt, 1, true), SF_ERR_INVALID_ARGUMENT);
    sf_sysformer *sf = fresh_sysformer();
    sf_train_options o = options();
    sf_trainer *t = nullptr;
    EXPECT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &s, nullptr, &o, &t),
              SF_ERR_INVALID_ARGUMENT); // empty
    EXPECT_NE(std::string(sf_last_error()).find("empty"), std::string::npos);
    const int32_t big[6] = {1, 5, 2, 999, 3, 4};
    sf_prompt_spans ok = {1, 1, 1, 1, 2};
    ASSERT_EQ(sf_train_set_add(&s, big, 6, &ok, tgt, 1, true), SF_OK);
    EXPECT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &s, nullptr, &o, &t),
              SF_ERR_INVALID_ARGUMENT); // id outside the vocabulary
    EXPECT_NE(std::string(sf_last_error()).find("999"), std::string::npos);
    o.w_ref = o.w_compl = o.w_class = o.w_recon = 0.0;
    EXPECT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, nullptr, &o, &t),
              SF_ERR_INVALID_ARGUMENT);
    o = options();
    o.epochs = 0;
    EXPECT_EQ(sf_trainer_create(llm_, sf, nullptr, nullptr, 0, &set_, nullptr, &o, &t),
              SF_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(t, nullptr);
    sf_train_set_free(&s);
    sf_sysformer_free(sf);
}

TEST(TrainData, SharedDatasetsAreRead) {
    const std::string dir = std::string(SF_SHARED_DIR) + "/datasets";
    if (!exists(dir + "/harmful_train.json")) {
        GTEST_SKIP() << dir << " is absent (a fresh clone has no ../shared): nothing to read";
    }
    sf_prompt_set all, a, b, c;
    ASSERT_EQ(sf_prompt_set_read((dir + "/harmful_train.json").c_str(), 0, 0, &all), SF_OK)
        << sf_last_error();
    EXPECT_EQ(all.n, 260);
    ASSERT_EQ(sf_prompt_set_read((dir + "/harmless_val.json").c_str(), 10, 1, &a), SF_OK);
    ASSERT_EQ(sf_prompt_set_read((dir + "/harmless_val.json").c_str(), 10, 1, &b), SF_OK);
    ASSERT_EQ(sf_prompt_set_read((dir + "/harmless_val.json").c_str(), 10, 2, &c), SF_OK);
    ASSERT_EQ(a.n, 10);
    int same = 0;
    for (int i = 0; i < 10; i++) {
        EXPECT_STREQ(a.prompt[i], b.prompt[i]);
        same += !strcmp(a.prompt[i], c.prompt[i]);
        EXPECT_EQ(a.response[i], nullptr);
    }
    EXPECT_LT(same, 10);
    sf_prompt_set_free(&all);
    sf_prompt_set_free(&a);
    sf_prompt_set_free(&b);
    sf_prompt_set_free(&c);
}

// The text layer on a tiny random LLM whose vocabulary matches a small byte-level tokenizer
// with ChatML's control tokens (synth-bytelevel-nfc: 705 ids, <|im_start|> = 1, <|im_end|> = 2).
TEST(TrainText, CompletionsAreGeneratedOnceAndEncoded) {
    const std::string tok_dir =
        std::string(SF_TEST_DATA_DIR) + "/tokenizer/synthetic/synth-bytelevel-nfc";
    sf_tokenizer *tok = nullptr;
    ASSERT_EQ(sf_tokenizer_load(tok_dir.c_str(), &tok), SF_OK) << sf_last_error();
    TempDir dir;
    sf_llm_config cfg = tiny_llama_config();
    cfg.vocab_size = 705;
    cfg.max_position_embeddings = 256;
    ASSERT_EQ(sf_random_llm_write(dir.path().c_str(), &cfg, 4), SF_OK);
    sf_llm *llm = nullptr;
    ASSERT_EQ(sf_llm_load(dir.path().c_str(), &llm), SF_OK) << sf_last_error();

    write_file(dir.file("safe.json"),
               "[{\"instruction\": \"Name a colour.\"}, {\"instruction\": \"Add two numbers\", "
               "\"input\": \"2 and 3\"}, {\"instruction\": \"Say hi\", \"output\": \"hi there\"}]");
    write_file(dir.file("harm.json"), "[{\"instruction\": \"Do a bad thing\"}]");
    // Two wrappers to train with and one held out, which must never be picked.
    write_file(dir.file("jb.json"),
               "{\"wrappers\": [{\"name\": \"a\", \"template\": \"A: {instruction}\"}, "
               "{\"name\": \"b\", \"template\": \"B: {instruction} {instruction}\"}, "
               "{\"name\": \"c\", \"template\": \"C: {instruction}\", \"held_out\": true}]}");
    sf_prompt_set safe, harm, wrapped, again;
    sf_jailbreak_set jb;
    ASSERT_EQ(sf_prompt_set_read(dir.file("safe.json").c_str(), 0, 0, &safe), SF_OK);
    EXPECT_STREQ(safe.prompt[1], "Add two numbers\n\n2 and 3");
    EXPECT_STREQ(safe.response[2], "hi there");
    ASSERT_EQ(sf_prompt_set_read(dir.file("harm.json").c_str(), 0, 0, &harm), SF_OK);
    ASSERT_EQ(sf_jailbreak_set_read(dir.file("jb.json").c_str(), &jb), SF_OK) << sf_last_error();
    bool seen[2] = {false, false};
    for (uint64_t seed = 0; seed < 32; seed++) {
        ASSERT_EQ(sf_prompt_set_wrap(&harm, &jb, seed, &wrapped), SF_OK);
        const bool a = !strcmp(wrapped.prompt[0], "A: Do a bad thing");
        const bool b = !strcmp(wrapped.prompt[0], "B: Do a bad thing Do a bad thing");
        EXPECT_TRUE(a || b) << wrapped.prompt[0];
        seen[0] |= a;
        seen[1] |= b;
        sf_prompt_set_free(&wrapped);
    }
    EXPECT_TRUE(seen[0] && seen[1]); // both trainable wrappers are drawn over 32 seeds
    ASSERT_EQ(sf_prompt_set_wrap(&harm, &jb, 0, &wrapped), SF_OK);

    sf_train_text tx = {tok, SF_TEMPLATE_CHATML, "Be safe.", "No.", 128};
    EXPECT_EQ(sf_train_end_of_turn(&tx), 2);
    const std::string cache = dir.file("completions.jsonl");
    int32_t made = -1;
    ASSERT_EQ(sf_train_fill_completions(llm, &tx, &safe, 5, 2, cache.c_str(), nullptr, nullptr,
                                        &made), SF_OK) << sf_last_error();
    EXPECT_EQ(made, 2); // the third has its reply in the data
    ASSERT_NE(safe.reply_ids[0], nullptr);
    EXPECT_LE(safe.n_reply[0], 5);
    EXPECT_EQ(safe.reply_ids[2], nullptr);
    // A second run reads the same replies back from the cache.
    ASSERT_EQ(sf_prompt_set_read(dir.file("safe.json").c_str(), 0, 0, &again), SF_OK);
    ASSERT_EQ(sf_train_fill_completions(llm, &tx, &again, 5, 2, cache.c_str(), nullptr, nullptr,
                                        &made), SF_OK);
    EXPECT_EQ(made, 0);
    for (int i = 0; i < 2; i++) {
        ASSERT_EQ(again.n_reply[i], safe.n_reply[i]);
        EXPECT_EQ(memcmp(again.reply_ids[i], safe.reply_ids[i], safe.n_reply[i] * 4), 0);
        EXPECT_EQ(again.reply_ended[i], safe.reply_ended[i]);
    }
    sf_prompt_set_free(&again);
    // Another system prompt is another key: generated anew.
    sf_train_text tx2 = tx;
    tx2.system = "Be very safe.";
    ASSERT_EQ(sf_prompt_set_read(dir.file("safe.json").c_str(), 0, 0, &again), SF_OK);
    ASSERT_EQ(sf_train_fill_completions(llm, &tx2, &again, 5, 2, cache.c_str(), nullptr,
                                        nullptr, &made), SF_OK);
    EXPECT_EQ(made, 2);
    sf_prompt_set_free(&again);

    sf_train_set set = {};
    int32_t skipped = -1;
    ASSERT_EQ(sf_train_set_add_prompts(&set, &tx, &harm, true, &skipped), SF_OK)
        << sf_last_error();
    EXPECT_EQ(skipped, 0);
    ASSERT_EQ(sf_train_set_add_prompts(&set, &tx, &safe, false, &skipped), SF_OK);
    ASSERT_EQ(set.n, 4);
    // The refusal "No." then <|im_end|>; the prompt ends with the assistant turn's opening.
    const sf_train_example &h = set.ex[0];
    EXPECT_TRUE(h.harmful);
    EXPECT_EQ(set.ids[h.offset + h.n_prompt + h.n_target - 1], 2);
    std::vector<int32_t> no(8);
    int32_t n_no = 0;
    ASSERT_EQ(sf_tokenizer_encode(tok, "No.", 3, false, false, no.data(), 8, &n_no), SF_OK);
    EXPECT_EQ(h.n_target, n_no + 1);
    EXPECT_EQ(set.ids[h.offset], 1);   // <|im_start|>
    EXPECT_GT(h.spans.system, 0);
    EXPECT_GT(h.spans.user, 0);
    // The data's own reply is tokenized and ended; a generated one as it came.
    const sf_train_example &s2 = set.ex[3];
    EXPECT_FALSE(s2.harmful);
    EXPECT_EQ(set.ids[s2.offset + s2.n_prompt + s2.n_target - 1], 2);
    const sf_train_example &s0 = set.ex[1];
    EXPECT_EQ(s0.n_target, safe.n_reply[0] + (safe.reply_ended[0] ? 1 : 0));
    // Too long for max_tokens: skipped and counted.
    sf_train_text tiny = tx;
    tiny.max_tokens = 8;
    sf_train_set none = {};
    ASSERT_EQ(sf_train_set_add_prompts(&none, &tiny, &safe, false, &skipped), SF_OK);
    EXPECT_EQ(skipped, 3);
    EXPECT_EQ(none.n, 0);

    // And it trains, with the default string judge on decoded replies.
    sf_sysformer_config sc = sf_sysformer_default_config(llm);
    sc.num_layers = 1;
    sc.dim_feedforward = 32;
    sf_sysformer *sf = nullptr;
    ASSERT_EQ(sf_sysformer_init(llm, &sc, 1, &sf), SF_OK);
    sf_train_options o = sf_train_default_options();
    o.epochs = 1;
    o.val_max_new_tokens = 2;
    sf_trainer *t = nullptr;
    const int32_t stop = 2;
    ASSERT_EQ(sf_trainer_create(llm, sf, tok, &stop, 1, &set, &set, &o, &t), SF_OK)
        << sf_last_error();
    sf_train_event ev;
    ASSERT_EQ(sf_trainer_validate(t, &ev), SF_OK) << sf_last_error();
    EXPECT_EQ(ev.n_judged_harmful, 1);
    EXPECT_EQ(ev.n_judged_harmless, 3);
    ASSERT_NE(ev.sample_harmless, nullptr);
    ASSERT_EQ(sf_trainer_run(t, 0, nullptr), SF_OK) << sf_last_error();
    EXPECT_EQ(sf_trainer_step(t), sf_trainer_total_steps(t));

    sf_trainer_free(t);
    sf_sysformer_free(sf);
    sf_train_set_free(&set);
    sf_prompt_set_free(&safe);
    sf_prompt_set_free(&harm);
    sf_jailbreak_set_free(&jb);
    sf_prompt_set_free(&wrapped);
    sf_llm_free(llm);
    sf_tokenizer_free(tok);
}

} // namespace
