// Running an operation with each of its host allocations failing in turn (tests/alloc_fail.c,
// linked with --wrap): shared by test_alloc_faults.cpp and the CUDA tests' Faults sections.
#pragma once

#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>

#include <functional>
#include <string>
#include <vector>

#include "alloc_fail.h"
#include "model_fixtures.h"
#include "sysformer.h"

// op(out) runs the operation and, when it succeeds, releases what it made and leaves in *out
// what to compare. It must succeed when nothing fails; then it runs with each allocation (of
// those it made; `points` spread over them when there are more) failing, and must return
// SF_ERR_OUT_OF_MEMORY with a message; after_each (may be empty) checks more after each run.
// Where the library deliberately carries on without an allocation (the CPU backward's kernels
// fall back to ones that need no scratch; the tokenizer's cache), degraded != 0: SF_OK is then
// accepted too, if *out is within that relative distance of the clean run's (1e-30: equal).
using AllocOp = std::function<sf_status(std::vector<float> *out)>;
inline void fail_each_allocation(const std::string &what, const AllocOp &op, double degraded = 0.0,
                                 long long points = 1000,
                                 const std::function<void()> &after_each = nullptr) {
    SCOPED_TRACE(what);
    std::vector<float> want, got;
    const long long c0 = sf_test_alloc_calls();
    ASSERT_EQ(op(&want), SF_OK) << sf_last_error();
    const long long n = sf_test_alloc_calls() - c0;
    ASSERT_GT(n, 0) << "no allocation to fail (is the binary linked with --wrap?)";
    int failed = 0, carried_on = 0;
    for (long long k : spread(n, points)) {
        sf_clear_error();
        got.clear();
        sf_test_alloc_fail(k);
        const sf_status st = op(&got);
        sf_test_alloc_disarm();
        if (after_each) after_each();
        if (st == SF_OK && degraded > 0.0) {
            carried_on++;
            const bool same_size = got.size() == want.size();
            EXPECT_TRUE(same_size && rel_error(got.data(), want.data(), want.size()) <= degraded)
                << "allocation " << k << " of " << n << ": carried on, and differs";
            continue;
        }
        EXPECT_EQ(st, SF_ERR_OUT_OF_MEMORY)
            << "allocation " << k << " of " << n << " failing: " << sf_status_string(st) << ": "
            << sf_last_error();
        EXPECT_STRNE(sf_last_error(), "") << "allocation " << k << ": no message";
        if (++failed > 20 && ::testing::Test::HasFailure()) break;  // enough to see the pattern
    }
    if (getenv("SF_TEST_VERBOSE")) {
        printf("  %-40s %lld allocations, %d failed the call, %d carried on\n", what.c_str(), n,
               failed, carried_on);
    }
}
