/* tests/alloc_fail.c: host allocations that fail on cue (the binary must be linked with
 * -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=strdup). */
#pragma once
#ifdef __cplusplus
extern "C" {
#endif
/* The allocation `after` calls from now fails (0: the next one), once. */
void sf_test_alloc_fail(long long after);
void sf_test_alloc_disarm(void);
/* Allocation calls so far. */
long long sf_test_alloc_calls(void);
/* The most bytes one call asked for since the last reset (realloc: the new size). */
unsigned long long sf_test_alloc_largest(void);
void sf_test_alloc_reset_largest(void);
#ifdef __cplusplus
}
#endif
