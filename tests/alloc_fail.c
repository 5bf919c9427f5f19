/* Host allocations that fail on cue, for tests/test_alloc_faults.cpp and the CUDA tests' fault
 * sections on tools/simt: what the library does when malloc returns NULL. The test binary is
 * linked with -Wl,--wrap=malloc (and calloc, realloc, strdup), so every call from the
 * library's objects (and the test's) comes through here; allocations made inside shared
 * libraries (libc's own, jansson's, libstdc++'s operator new) do not. Counting is cheap and
 * always on; a failure is armed for one call. */
#include <execinfo.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc_fail.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);

static long long calls;   /* allocation calls so far */
static long long fail_at; /* the number (from 1) of the call to fail; 0: none */
static size_t largest;    /* the most bytes one call asked for since the last reset */

/* SF_ALLOC_TRACE=1: where each failed allocation was made, on stderr (addresses; addr2line
 * -f -e sf_alloc_tests turns them into functions and lines). */
static int fails(size_t bytes) {
    if (bytes > largest) largest = bytes;
    if (++calls != fail_at) return 0;
    fail_at = 0;
    if (getenv("SF_ALLOC_TRACE")) {
        void *frames[12];
        fprintf(stderr, "alloc_fail: failing allocation %lld here:\n", calls);
        backtrace_symbols_fd(frames, backtrace(frames, 12), 2);
    }
    return 1;
}

void *__wrap_malloc(size_t n) { return fails(n) ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t size) {
    return fails(n * size) ? NULL : __real_calloc(n, size);
}
void *__wrap_realloc(void *p, size_t n) { return fails(n) ? NULL : __real_realloc(p, n); }
char *__wrap_strdup(const char *s) { return fails(strlen(s) + 1) ? NULL : __real_strdup(s); }

void sf_test_alloc_fail(long long after) { fail_at = calls + after + 1; }
void sf_test_alloc_disarm(void) { fail_at = 0; }
long long sf_test_alloc_calls(void) { return calls; }
unsigned long long sf_test_alloc_largest(void) { return largest; }
void sf_test_alloc_reset_largest(void) { largest = 0; }
