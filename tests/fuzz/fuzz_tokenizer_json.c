/* Fuzzes the tokenizer.json loader (host/tokenizer/load_json.c): any bytes as tokenizer.json;
 * a tokenizer that loads encodes and decodes a few strings that reach its pre-tokenizer,
 * normalizer, added tokens and byte fallback. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_write("tokenizer.json", data, size);
    sf_tokenizer *tok = NULL;
    const sf_status st = sf_tokenizer_load(fuzz_dir(), &tok);
    fuzz_check_message(st);
    if (st != SF_OK) return 0;
    static const char *const texts[] = {
        "Hello world", "  two  spaces\tand\ttabs\n\nnewlines", "digits 1234567 3.14",
        "caf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 \xf0\x9f\x98\x80", "<s>[INST] <|im_start|>x</s>",
        "\xe4\xb8\xad\xe6\x96\x87 \xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82"};
    int32_t ids[512];
    char out[8192];
    const int32_t vocab = sf_tokenizer_vocab_size(tok);
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        int32_t n = 0;
        for (int mode = 0; mode < 2; mode++) {
            sf_status e = sf_tokenizer_encode(tok, texts[i], strlen(texts[i]), mode, mode, ids,
                                              512, &n);
            fuzz_check_message(e);
            if (e != SF_OK) continue;
            for (int32_t k = 0; k < n; k++) {
                if (ids[k] < 0 || ids[k] >= vocab) abort(); /* an id outside the vocabulary */
            }
            size_t len = 0;
            fuzz_check_message(sf_tokenizer_decode(tok, ids, n, mode, out, sizeof out, &len));
        }
    }
    sf_tokenizer_free(tok);
    return 0;
}
