/* Fuzzes the GGUF reader (host/io/gguf.c) and what reads a GGUF file through it: every key and
 * tensor of a file that opens is visited, tensors of a modest size dequantised; then the
 * tokenizer (tokenizer.ggml.*), the model's configuration and embedding table, and then the
 * whole model are loaded from the same bytes. */
#include "fuzz_common.h"
#include "io/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_write("model.gguf", data, size);
    sf_gguf *g = NULL;
    sf_status st = sf_gguf_open(path, &g);
    fuzz_check_message(st);
    if (st != SF_OK) return 0;
    static float buf[1 << 16];
    volatile size_t sink = 0;
    for (int64_t i = 0; i < sf_gguf_kv_count(g); i++) {
        const sf_gguf_kv *kv = sf_gguf_kv_at(g, i);
        sf_gguf_string s;
        int64_t v;
        if (sf_gguf_get_string(g, kv->key, &s) == SF_OK && s.len) {
            sink += (unsigned char)s.data[s.len - 1]; /* the string's last byte is readable */
        }
        if (sf_gguf_get_int(g, kv->key, &v) == SF_OK) sink += (size_t)v;
        if (kv->type == SF_GGUF_ARRAY && kv->v.arr.n > 0) { /* the last element is readable */
            if (kv->v.arr.strings) {
                const sf_gguf_string *last = &kv->v.arr.strings[kv->v.arr.n - 1];
                if (last->len) sink += (unsigned char)last->data[last->len - 1];
            } else if (kv->v.arr.data && kv->v.arr.type != SF_GGUF_ARRAY) {
                static const uint8_t size_of[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
                const size_t bytes = kv->v.arr.type < 13 ? size_of[kv->v.arr.type] : 0;
                if (bytes) sink += ((const uint8_t *)kv->v.arr.data)[kv->v.arr.n * bytes - 1];
            }
        }
    }
    for (int64_t i = 0; i < sf_gguf_tensor_count(g); i++) {
        const sf_gguf_tensor *t = sf_gguf_tensor_at(g, i);
        if (t->numel <= (int64_t)(sizeof buf / sizeof buf[0])) {
            fuzz_check_message(sf_gguf_dequantize(t, buf));
        }
    }
    sf_gguf_close(g);
    (void)sink;

    sf_tokenizer *tok = NULL;
    st = sf_tokenizer_load(path, &tok);
    fuzz_check_message(st);
    if (st == SF_OK) {
        int32_t ids[256], n = 0;
        static const char text[] = "Hello, world! 123 <|im_start|>user\n\xc3\xa9t\xc3\xa9";
        st = sf_tokenizer_encode(tok, text, sizeof text - 1, true, true, ids, 256, &n);
        fuzz_check_message(st);
        char out[2048];
        size_t len = 0;
        if (st == SF_OK) {
            fuzz_check_message(sf_tokenizer_decode(tok, ids, n, false, out, sizeof out, &len));
        }
        sf_tokenizer_free(tok);
    }
    sf_llm *llm = NULL;
    st = sf_llm_load_embeddings(path, &llm);
    fuzz_check_message(st);
    sf_llm_free(llm);
    llm = NULL;
    if (st == SF_OK) { /* the whole model only when its configuration and table load */
        st = sf_llm_load(path, &llm);
        fuzz_check_message(st);
        sf_llm_free(llm);
    }
    return 0;
}
