/* tests/fuzz: a main for the harnesses without libFuzzer, so that the ordinary builds compile
 * them and ctest replays inputs through them (under the sanitizer build too): runs
 * LLVMFuzzerTestOneInput once on each file named, or on every file of each directory named,
 * in name order. Exit status 0 unless a harness aborts (or a sanitizer stops the process), a
 * path is missing, or a directory gives no input. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

static long g_runs;

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: cannot open %s\n", path);
        return 1;
    }
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            uint8_t *grown = realloc(buf, cap);
            if (!grown) abort();
            buf = grown;
        }
        const size_t got = fread(buf + n, 1, cap - n, f);
        if (got == 0) break;
        n += got;
    }
    fclose(f);
    /* an exact-size copy, so that a read past the input's end is one ASan sees */
    uint8_t *input = malloc(n ? n : 1);
    if (!input) abort();
    memcpy(input, buf, n);
    free(buf);
    LLVMFuzzerTestOneInput(input, n);
    free(input);
    g_runs++;
    return 0;
}

static int by_name(const struct dirent **a, const struct dirent **b) {
    return strcmp((*a)->d_name, (*b)->d_name);
}

int main(int argc, char **argv) {
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    int bad = 0;
    for (int i = 1; i < argc; i++) {
        struct stat s;
        if (stat(argv[i], &s) != 0) {
            fprintf(stderr, "replay: no %s\n", argv[i]);
            bad = 1;
        } else if (S_ISDIR(s.st_mode)) {
            struct dirent **list = NULL;
            const int n = scandir(argv[i], &list, NULL, by_name);
            const long before = g_runs;
            for (int k = 0; k < n; k++) {
                char path[4096];
                snprintf(path, sizeof path, "%s/%s", argv[i], list[k]->d_name);
                if (stat(path, &s) == 0 && S_ISREG(s.st_mode)) bad |= run_file(path);
                free(list[k]);
            }
            free(list);
            if (g_runs == before) { /* unreadable, or empty: nothing of it was replayed */
                fprintf(stderr, "replay: no input read from %s\n", argv[i]);
                bad = 1;
            }
        } else {
            bad |= run_file(argv[i]);
        }
    }
    printf("replay: %ld inputs\n", g_runs);
    return bad;
}
