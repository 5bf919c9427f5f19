// sf_tests' main: GoogleTest's, after the step the sysformer CLI takes first, so that the CPU
// path is tested with the BLAS kernels its users get (core/native_blas.h).
#include <gtest/gtest.h>

#include "core/native_blas.h"

int main(int argc, char **argv) {
    sf_main_use_native_blas(argv);
    testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}
