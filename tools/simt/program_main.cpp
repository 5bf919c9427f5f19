// tools/simt: a program of this repository (the sysformer CLI, host/cli/*.c; bench_engine),
// unchanged but for its main's name (program_main, renamed by run.sh), on the emulated device,
// so that its CUDA paths run where there is no GPU. The emulator's settings come from the
// environment as in the test harness (EMU_MODE, EMU_ULP); an emulator error that no
// synchronisation reported is printed at exit and turns a successful exit into 3, so a script
// cannot miss it.
#include <stdio.h>
#include <stdlib.h>

#include <string>

extern "C" int program_main(int argc, char **argv);

int main(int argc, char **argv) {
    if (const char *m = getenv("EMU_MODE")) emu::mode_select = atoi(m);
    if (const char *u = getenv("EMU_ULP")) emu::ulp_noise = atoi(u);
    int rc = program_main(argc, argv);
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
