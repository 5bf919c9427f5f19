/* Tokenizer throughput: encode and decode about 1 MB of text with every tokenizer available.
 *
 * usage: bench_tokenizer [TEXT_FILE] [--tokenizer PATH]... [--repeats R]
 * Without a text file it generates a deterministic 1 MiB mix of English prose, numbers, code,
 * whitespace runs, CJK, Arabic and emoji. Without --tokenizer it tries the shared Llama-3.1
 * and Mistral tokenizers ($SF_SHARED_DIR, default ../shared), the committed SmolLM2
 * tokenizer.json, and a SmolLM2 GGUF under weights/smollm2/, skipping the ones absent.
 * Reports the best of R repeats (default 3): MB/s of input text and tokens/s, for encode
 * (special tokens parsed, no BOS) and for a full decode of the ids. */
#if !defined(_GNU_SOURCE) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L /* clock_gettime, glob */
#endif
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "bench_util.h"
#include "sysformer.h"

/* A fixed linear congruential generator: the text must be the same on every machine. */
static uint64_t g_rng = 0x2545F4914F6CDD1DULL;
static unsigned rnd(unsigned n) {
    g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return (unsigned)((g_rng >> 33) % n);
}

static char *generate_text(size_t target, size_t *len) {
    static const char *const pieces[] = {
        "The quick brown fox jumps over the lazy dog. ",
        "It's a truth universally acknowledged that we'll need more tokens. ",
        "In 2024, revenue grew 17.5% to $1,234,567,890 across 42 regions. ",
        "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]\n\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
        "    \n\n\t  ",
        "https://example.com/search?q=byte+pair+encoding&lang=en#results ",
        "\xe8\xaf\xad\xe8\xa8\x80\xe6\xa8\xa1\xe5\x9e\x8b\xe7\x9a\x84\xe5\x88\x86\xe8\xaf\x8d\xe5\x99\xa8"
        "\xe5\xbe\x88\xe9\x87\x8d\xe8\xa6\x81\xe3\x80\x82",
        "\xd9\x85\xd8\xb1\xd8\xad\xd8\xa8\xd8\xa7 \xd8\xa8\xd8\xa7\xd9\x84\xd8\xb9\xd8\xa7\xd9\x84\xd9\x85 ",
        "\xf0\x9f\x98\x80 \xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd \xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9"
        "\xe2\x80\x8d\xf0\x9f\x91\xa7 ",
        "Na\xc3\xafve caf\xc3\xa9 r\xc3\xa9sum\xc3\xa9s co\xc3\xb6perate. ",
        "SELECT id, name FROM users WHERE created_at > '2023-01-01' ORDER BY id; ",
        "Please summarise the following document in three bullet points.\n",
    };
    const size_t n_pieces = sizeof pieces / sizeof pieces[0];
    char *buf = malloc(target + 256);
    if (!buf) return NULL;
    size_t n = 0;
    while (n < target) {
        /* Prose dominates, as in real prompts. */
        unsigned k = rnd(4) ? rnd(3) : rnd((unsigned)n_pieces);
        size_t m = strlen(pieces[k]);
        memcpy(buf + n, pieces[k], m);
        n += m;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

static char *read_text(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    char *buf = size >= 0 ? malloc((size_t)size + 1) : NULL;
    if (buf && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[size] = '\0';
        *len = (size_t)size;
    }
    return buf;
}

static int exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void bench_one(const char *path, const char *text, size_t len, int repeats) {
    sf_tokenizer *tok = NULL;
    double t0 = bench_now_s();
    sf_status st = sf_tokenizer_load(path, &tok);
    double t_load = bench_now_s() - t0;
    if (st != SF_OK) {
        printf("%-60s load failed: %s\n", path, sf_last_error());
        return;
    }
    int32_t n = 0;
    sf_tokenizer_encode(tok, text, len, false, true, NULL, 0, &n);
    int32_t *ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *ids);
    char *out = malloc(len * 2 + 16);
    double best_enc = 1e30, best_dec = 1e30;
    for (int r = 0; r < repeats && ids && out; r++) {
        t0 = bench_now_s();
        st = sf_tokenizer_encode(tok, text, len, false, true, ids, n, &n);
        double t = bench_now_s() - t0;
        if (st != SF_OK) {
            printf("%-60s encode failed: %s\n", path, sf_last_error());
            break;
        }
        if (t < best_enc) best_enc = t;
        size_t out_len = 0;
        t0 = bench_now_s();
        st = sf_tokenizer_decode(tok, ids, n, false, out, len * 2 + 16, &out_len);
        t = bench_now_s() - t0;
        if (st != SF_OK) {
            printf("%-60s decode failed: %s\n", path, sf_last_error());
            break;
        }
        if (t < best_dec) best_dec = t;
    }
    if (st == SF_OK) {
        double mb = (double)len / 1e6;
        printf("%-60s load %6.3f s | encode %7.2f MB/s %10.0f tok/s | decode %8.1f MB/s "
               "%11.0f tok/s | %d tokens, %.2f bytes/token\n",
               path, t_load, mb / best_enc, n / best_enc, mb / best_dec, n / best_dec, (int)n,
               (double)len / (n > 0 ? n : 1));
    }
    free(ids);
    free(out);
    sf_tokenizer_free(tok);
}

int main(int argc, char **argv) {
    const char *text_path = NULL;
    const char *toks[16];
    int n_toks = 0, repeats = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc && n_toks < 16) {
            toks[n_toks++] = argv[++i];
        } else if (!strcmp(argv[i], "--repeats") && i + 1 < argc) {
            repeats = atoi(argv[++i]);
        } else if (argv[i][0] != '-' && !text_path) {
            text_path = argv[i];
        } else {
            fprintf(stderr, "usage: bench_tokenizer [TEXT_FILE] [--tokenizer PATH]... [--repeats R]\n");
            return 2;
        }
    }
    if (repeats < 1) repeats = 1;

    size_t len = 0;
    char *text = text_path ? read_text(text_path, &len) : generate_text((size_t)1 << 20, &len);
    if (!text) {
        fprintf(stderr, "bench_tokenizer: cannot read %s\n", text_path ? text_path : "(generated)");
        return 1;
    }
    printf("text: %s, %zu bytes; best of %d\n", text_path ? text_path : "generated mix", len, repeats);

    char shared_buf[3][512];
    glob_t gl;
    int have_glob = 0;
    if (n_toks == 0) {
        const char *shared = getenv("SF_SHARED_DIR");
        if (!shared) shared = "../shared";
        snprintf(shared_buf[0], sizeof shared_buf[0], "%.400s/tokenizers/llama-3.1", shared);
        snprintf(shared_buf[1], sizeof shared_buf[1], "%.400s/tokenizers/mistral-7b", shared);
        snprintf(shared_buf[2], sizeof shared_buf[2], "tests/golden/tokenizer/smollm2");
        for (int k = 0; k < 3; k++) {
            char probe[sizeof shared_buf[0] + 32];
            snprintf(probe, sizeof probe, "%.500s/tokenizer.json", shared_buf[k]);
            if (exists(probe)) toks[n_toks++] = shared_buf[k];
            else printf("%-60s absent, skipped\n", shared_buf[k]);
        }
        if (glob("weights/smollm2/*.gguf", 0, NULL, &gl) == 0 && gl.gl_pathc > 0) {
            toks[n_toks++] = gl.gl_pathv[0];
            have_glob = 1;
        }
    }
    for (int k = 0; k < n_toks; k++) bench_one(toks[k], text, len, repeats);
    if (have_glob) globfree(&gl);
    free(text);
    return 0;
}
