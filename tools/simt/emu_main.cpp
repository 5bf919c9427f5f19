// tools/simt: the library functions the emulated launchers and the tests call (sf_fail,
// sf_last_error, sf_clear_error, sf_cuda_device_count: one "device"), the emulator's settings
// from the environment (EMU_MODE, EMU_ULP), and a gtest listener that reports the kernel
// variants each test launched (EMU_LAUNCHES=1) and any emulator error no synchronisation saw.
#include <gtest/gtest.h>
#include <stdarg.h>

#include <map>

extern "C" {
#include "core/error.h"
}

// All weak: the engine suite links the library's own (host/core/error.c, kernels/device.cu).
namespace {
thread_local char g_last_error[1024] = "";
}

extern "C" __attribute__((weak)) sf_status sf_fail(sf_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return status;
}
extern "C" __attribute__((weak)) const char *sf_last_error(void) { return g_last_error; }
extern "C" __attribute__((weak)) sf_status sf_cuda_device_count(int *count) {
    *count = 1;
    return SF_OK;
}

namespace {
// Per test: the distinct (kernel, grid shape class, block) launched, printed with EMU_LAUNCHES=1.
class LaunchLog : public testing::EmptyTestEventListener {
  public:
    void OnTestStart(const testing::TestInfo &) override {
        emu::launches.clear();
        emu::errors.clear();
        emu::sticky_failure = false;
        simt::disarm_faults();  // an injected fault is the test's that made it
        emu::nvtx_depth = 0;
    }
    void OnTestEnd(const testing::TestInfo &info) override {
        std::map<std::string, int> kinds;
        for (const emu::LaunchRec &l : emu::launches) {
            char b[64];
            snprintf(b, sizeof b, " block(%u,%u,%u)", l.block.x, l.block.y, l.block.z);
            kinds[l.name + b]++;
            all_[l.name + b] += 1;
        }
        if (getenv("EMU_LAUNCHES")) {
            printf("  [launches of %s.%s: %zu]\n", info.test_suite_name(), info.name(),
                   emu::launches.size());
            for (auto &k : kinds) printf("    %6d x %s\n", k.second, k.first.c_str());
        }
        if (emu::nvtx_depth != 0) printf("  NVTX ranges unbalanced: depth %d\n", emu::nvtx_depth);
        if (!emu::errors.empty()) {
            printf("  EMULATOR ERRORS not seen by a sync in %s.%s:\n", info.test_suite_name(),
                   info.name());
            for (auto &e : emu::errors) printf("    %s\n", e.c_str());
        }
    }
    void OnTestProgramEnd(const testing::UnitTest &) override {
        printf("[emu] mode %s, ulp noise %d; kernel variants launched over the run: %zu\n",
               emu::mode_select < emu::kNumModes ? emu::kModes[emu::mode_select].name : "rotating",
               emu::ulp_noise, all_.size());
        if (getenv("EMU_LAUNCHES"))
            for (auto &k : all_) printf("    %7d x %s\n", k.second, k.first.c_str());
#if EMU_RACECHECK
        printf("[emu] race check: %lld shared-memory and %lld device-memory accesses checked, "
               "%lld races\n",
               emu::race::st.accesses, emu::race::st.global_accesses, emu::race::st.races);
#endif
        const emu::RuntimeStats &s = emu::stats;
        if (s.queued || s.captures)
            printf("[emu] streams: %llu operations queued, %llu run when waited for; %llu "
                   "captures of %llu operations, %llu graph launches replaying %llu\n",
                   s.queued, s.deferred_runs, s.captures, s.captured_nodes, s.graph_launches,
                   s.replayed_nodes);
    }

  private:
    std::map<std::string, int> all_;
};
}  // namespace

int main(int argc, char **argv) {
    testing::InitGoogleTest(&argc, argv);
    if (const char *m = getenv("EMU_MODE")) emu::mode_select = atoi(m);
    if (const char *u = getenv("EMU_ULP")) emu::ulp_noise = atoi(u);
    testing::UnitTest::GetInstance()->listeners().Append(new LaunchLog);
    return RUN_ALL_TESTS();
}
extern "C" __attribute__((weak)) void sf_clear_error(void) { g_last_error[0] = 0; }
