// tools/simt: a program of this repository (the sysformer CLI, host/cli/*.c; bench_engine),
// unchanged but for its main's name (program_main, renamed by run.sh), on the emulated device,
// so that its CUDA paths run where there is no GPU. The emulator's settings come from the
// environment as in the test harness (EMU_MODE, EMU_ULP); an emulator error that no
// synchronisation reported is printed at exit and turns a successful exit into 3, so a script
// cannot miss it. EMU_FAIL=KIND:N (create, launch or kernel: simt_api.h's faults) fails the
// program's N-th call of that kind (from 0), to see what the program says when CUDA fails;
// EMU_CALLS=1 prints at exit how many calls of each kind it made (where to put such faults).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>

extern "C" int program_main(int argc, char **argv);

int main(int argc, char **argv) {
    if (const char *m = getenv("EMU_MODE")) emu::mode_select = atoi(m);
    if (const char *u = getenv("EMU_ULP")) emu::ulp_noise = atoi(u);
    if (const char *f = getenv("EMU_FAIL")) {
        const char *colon = strchr(f, ':');
        const std::string kind(f, colon ? (size_t)(colon - f) : strlen(f));
        const simt::Fault k = kind == "create" ? simt::FAULT_CREATE
                              : kind == "launch" ? simt::FAULT_LAUNCH
                              : kind == "kernel" ? simt::FAULT_KERNEL
                                                 : simt::FAULT_KINDS;
        if (!colon || k == simt::FAULT_KINDS) {
            fprintf(stderr, "EMU_FAIL=%s: want create:N, launch:N or kernel:N\n", f);
            return 2;
        }
        simt::fail_call(k, atoll(colon + 1));
    }
    int rc = program_main(argc, argv);
    if (getenv("EMU_CALLS")) {
        fprintf(stderr, "EMU_CALLS create=%lld launch=%lld kernel=%lld\n",
                simt::fault_calls(simt::FAULT_CREATE), simt::fault_calls(simt::FAULT_LAUNCH),
                simt::fault_calls(simt::FAULT_KERNEL));
    }
    if (!emu::errors.empty()) {
        for (const std::string &e : emu::errors) fprintf(stderr, "EMULATOR ERROR: %s\n", e.c_str());
        if (rc == 0) rc = 3;
    }
    if (emu::nvtx_depth != 0) {
        fprintf(stderr, "EMULATOR: NVTX ranges unbalanced at exit: depth %d\n", emu::nvtx_depth);
        if (rc == 0) rc = 3;
    }
    return rc;
}
