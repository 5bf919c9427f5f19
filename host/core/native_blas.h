/* For a program's main(), first thing: when OpenBLAS has loaded its generic kernels on a CPU
 * that runs better ones (sf_cpu_blas_coretype_hint), sets OPENBLAS_CORETYPE to those and starts
 * the program again in place, so that OpenBLAS loads them this time. The sysformer CLI, the
 * test binary and the CPU benchmarks call it; the library never does (it does not act for the
 * program that links it).
 *
 * Nothing happens when OPENBLAS_CORETYPE is already set (by the user, or by this, in the second
 * start), off Linux, or when exec fails: the program then runs on, with the kernels it has. */
#ifndef SF_CORE_NATIVE_BLAS_H
#define SF_CORE_NATIVE_BLAS_H

#include <stdlib.h>
#if defined(__linux__)
#include <unistd.h>
#endif

#include "sysformer.h"

static inline void sf_main_use_native_blas(char **argv) {
#if defined(__linux__)
    const char *core = sf_cpu_blas_coretype_hint();
    if (!core || getenv("OPENBLAS_CORETYPE")) return;
    if (setenv("OPENBLAS_CORETYPE", core, 1) != 0) return;
    execv("/proc/self/exe", argv);
#else
    (void)argv;
#endif
}

#endif
