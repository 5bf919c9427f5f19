/* CPU reference forward pass throughput: packed prefill and batched decode, tokens per second.
 *
 * usage: bench_cpu_forward [--model DIR] [--requests N] [--len L] [--decode S] [--repeats R]
 * Without --model it writes the embedded default random model to a temporary directory.
 * Prefill: N requests of L tokens as one packed batch, logits of each request's last row
 * (the serving case). Decode: S steps of one token per request against the KV caches.
 * Reports the median over R repeats; progress goes to stderr, results to stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "core/native_blas.h"
#include "model/random_llm.h"
#include "sysformer.h"

static int fail(const char *what, sf_status st) {
    fprintf(stderr, "bench_cpu_forward: %s: %s: %s\n", what, sf_status_string(st),
            sf_last_error());
    return 1;
}

int main(int argc, char **argv) {
    sf_main_use_native_blas(argv);
    const char *model_dir = NULL;
    int n_req = 4, len = 128, n_decode = 32, repeats = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) model_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--requests")) n_req = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--len")) len = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--decode")) n_decode = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--repeats")) repeats = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench_cpu_forward: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (n_req < 1 || len < 1 || n_decode < 0 || repeats < 1 || repeats > 99) {
        fprintf(stderr, "bench_cpu_forward: bad sizes\n");
        return 2;
    }

    char tmp[] = "/tmp/sf_bench_XXXXXX";
    if (!model_dir) {
        if (!mkdtemp(tmp)) return 1;
        sf_llm_config cfg = sf_random_llm_default_config();
        sf_status st = sf_random_llm_write(tmp, &cfg, 1);
        if (st != SF_OK) return fail("writing the default model", st);
        model_dir = tmp;
    }
    sf_llm *llm = NULL;
    sf_status st = sf_llm_load(model_dir, &llm);
    if (st != SF_OK) return fail("loading", st);
    const sf_llm_config *c = sf_llm_get_config(llm);
    if (len + n_decode > c->max_position_embeddings) {
        fprintf(stderr, "bench_cpu_forward: len + decode exceeds max_position_embeddings\n");
        return 2;
    }

    const int total = n_req * len;
    int32_t *ids = malloc((size_t)total * sizeof *ids);
    int32_t *cu = malloc((size_t)(n_req + 1) * sizeof *cu);
    int32_t *last = malloc((size_t)n_req * sizeof *last);
    int32_t *step_cu = malloc((size_t)(n_req + 1) * sizeof *step_cu);
    int32_t *step_rows = malloc((size_t)n_req * sizeof *step_rows);
    float *logits = malloc((size_t)n_req * (size_t)c->vocab_size * sizeof *logits);
    sf_kv_cache **caches = calloc((size_t)n_req, sizeof *caches);
    if (!ids || !cu || !last || !step_cu || !step_rows || !logits || !caches) return 1;
    for (int i = 0; i < total; i++) ids[i] = (i * 7919 + 13) % c->vocab_size;
    for (int r = 0; r <= n_req; r++) {
        cu[r] = r * len;
        step_cu[r] = r;
    }
    for (int r = 0; r < n_req; r++) {
        last[r] = cu[r + 1] - 1;
        step_rows[r] = r;
        st = sf_kv_cache_create(llm, len + n_decode, &caches[r]);
        if (st != SF_OK) return fail("kv cache", st);
    }

    double prefill_s[100], decode_s[100];
    for (int rep = 0; rep < repeats; rep++) {
        fprintf(stderr, "\rrepeat %d/%d ...", rep + 1, repeats);
        for (int r = 0; r < n_req; r++) sf_kv_cache_reset(caches[r]);
        sf_batch b = {n_req, cu, ids, NULL, caches, n_req, last};
        double t0 = bench_now_s();
        st = sf_llm_forward_cpu(llm, &b, logits);
        prefill_s[rep] = bench_now_s() - t0;
        if (st != SF_OK) return fail("prefill", st);
        b.cu_seqlens = step_cu;
        b.logit_rows = step_rows;
        t0 = bench_now_s();
        for (int s = 0; s < n_decode; s++) {
            b.token_ids = ids + (size_t)s * n_req % (size_t)(total - n_req + 1);
            st = sf_llm_forward_cpu(llm, &b, logits);
            if (st != SF_OK) return fail("decode", st);
        }
        decode_s[rep] = bench_now_s() - t0;
    }
    fprintf(stderr, "\r                 \r");
    const double p = bench_median(prefill_s, repeats), d = bench_median(decode_s, repeats);
    printf("CPU matmul: %s\n", sf_cpu_matmul_backend());
    printf("model: %d layers, d=%d, heads %d/%d, vocab %d\n", c->num_layers, c->hidden_size,
           c->num_heads, c->num_kv_heads, c->vocab_size);
    printf("prefill  %d x %d tokens   %8.3f s  %10.1f tokens/s (CPU, median of %d)\n", n_req, len,
           p, total / p, repeats);
    if (n_decode > 0) {
        printf("decode   %d x %d steps    %8.3f s  %10.1f tokens/s (CPU, median of %d)\n", n_req,
               n_decode, d, (double)n_req * n_decode / d, repeats);
    }
    for (int r = 0; r < n_req; r++) sf_kv_cache_free(caches[r]);
    free(caches);
    free(ids);
    free(cu);
    free(last);
    free(step_cu);
    free(step_rows);
    free(logits);
    sf_llm_free(llm);
    if (model_dir == tmp) {
        char path[64];
        snprintf(path, sizeof path, "%s/model.safetensors", tmp);
        remove(path);
        snprintf(path, sizeof path, "%s/config.json", tmp);
        remove(path);
        rmdir(tmp);
    }
    return 0;
}
