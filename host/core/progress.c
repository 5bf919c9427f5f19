/* The thread-local progress function of long calls (sf_set_progress). */
#include "core/progress.h"

#include "sysformer.h"

static _Thread_local sf_progress_fn g_fn;
static _Thread_local void *g_user;

void sf_set_progress(sf_progress_fn fn, void *user) {
    g_fn = fn;
    g_user = fn ? user : NULL;
}

void sf_progress(const char *what, uint64_t done, uint64_t total) {
    if (g_fn) g_fn(g_user, what, done, total);
}
