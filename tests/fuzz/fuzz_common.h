/* tests/fuzz: what every harness shares. The library reads files by path, so each input is
 * written, as the file the entry point reads, into a private directory on a tmpfs (/dev/shm, or
 * SF_FUZZ_TMP), removed at exit. A harness may abort on its own failures (test code); the
 * library under it must only return statuses. */
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sysformer.h"

static char fuzz_dir_[256];
static char fuzz_names_[8][64];
static int fuzz_n_names_;

static inline void fuzz_cleanup_(void) {
    char p[sizeof fuzz_dir_ + sizeof fuzz_names_[0] + 1];
    for (int i = 0; i < fuzz_n_names_; i++) {
        snprintf(p, sizeof p, "%.255s/%.63s", fuzz_dir_, fuzz_names_[i]);
        unlink(p);
    }
    rmdir(fuzz_dir_);
}

static inline const char *fuzz_dir(void) {
    if (!fuzz_dir_[0]) {
        const char *base = getenv("SF_FUZZ_TMP");
        if (!base) base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(fuzz_dir_, sizeof fuzz_dir_, "%s/sf_fuzz_XXXXXX", base);
        if (!mkdtemp(fuzz_dir_)) abort();
        atexit(fuzz_cleanup_);
    }
    return fuzz_dir_;
}

/* Writes data as fuzz_dir()/name and returns that path (valid until the next call). */
static inline const char *fuzz_write(const char *name, const uint8_t *data, size_t size) {
    static char path[sizeof fuzz_dir_ + sizeof fuzz_names_[0] + 1];
    int known = 0;
    for (int i = 0; i < fuzz_n_names_; i++) known |= !strcmp(fuzz_names_[i], name);
    if (!known) {
        if (fuzz_n_names_ == 8 || strlen(name) >= sizeof fuzz_names_[0]) abort();
        strcpy(fuzz_names_[fuzz_n_names_++], name);
    }
    snprintf(path, sizeof path, "%.255s/%.63s", fuzz_dir(), name);
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) abort();
    return path;
}

/* Copies the file src (at most 1 MiB) as fuzz_dir()/name: a fixed file beside the inputs. */
static inline void fuzz_copy(const char *src, const char *name) {
    static uint8_t buf[1 << 20];
    FILE *f = fopen(src, "rb");
    const size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (!f || n == 0 || n == sizeof buf) abort();
    fclose(f);
    fuzz_write(name, buf, n);
}

/* A failing call must say why (SF_FUZZ_VERBOSE=1 prints it: what the seeds reach). */
static inline void fuzz_check_message(sf_status st) {
    if (st == SF_OK) return;
    if (!sf_last_error() || !sf_last_error()[0]) abort();
    if (getenv("SF_FUZZ_VERBOSE")) {
        fprintf(stderr, "%s: %s\n", sf_status_string(st), sf_last_error());
    }
}
