/* Fuzzes encoding and decoding with real tokenizers (tests/golden/tokenizer: SmolLM2's and the
 * four synthetic ones, covering byte-level and SentencePiece-style BPE, NFC, Digits, Metaspace
 * and added-token options). Input: byte 0 picks the tokenizer, byte 1 the flags, the rest is
 * the text. Whatever encodes must give ids in the vocabulary that decode, in one call and one
 * id at a time; a chat prompt is built around the text with the tokenizer's template family. */
#include "fuzz_common.h"

#ifndef SF_FUZZ_DATA
#error "SF_FUZZ_DATA: the repository's tests/golden/tokenizer"
#endif

static const char *const k_dirs[] = {"smollm2", "synthetic/synth-bytelevel-digits",
                                     "synthetic/synth-bytelevel-nfc", "synthetic/synth-sp-first",
                                     "synthetic/synth-sp-legacy"};
enum { N_TOK = sizeof k_dirs / sizeof k_dirs[0] };
static const sf_template_id k_templates[N_TOK] = {SF_TEMPLATE_CHATML, SF_TEMPLATE_CHATML,
                                                  SF_TEMPLATE_CHATML, SF_TEMPLATE_LLAMA2,
                                                  SF_TEMPLATE_MISTRAL};
static sf_tokenizer *g_tok[N_TOK];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    for (int i = 0; i < N_TOK; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", SF_FUZZ_DATA, k_dirs[i]);
        if (sf_tokenizer_load(path, &g_tok[i]) != SF_OK) {
            fprintf(stderr, "fuzz_tokenizer_encode: %s\n", sf_last_error());
            abort();
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const sf_tokenizer *tok = g_tok[data[0] % N_TOK];
    const sf_template_id tmpl = k_templates[data[0] % N_TOK];
    const bool add_bos = data[1] & 1, parse_special = data[1] & 2, skip = data[1] & 4;
    const char *text = (const char *)data + 2;
    const size_t len = size - 2;
    const int32_t vocab = sf_tokenizer_vocab_size(tok);

    int32_t need = 0;
    sf_status st = sf_tokenizer_encode(tok, text, len, add_bos, parse_special, NULL, 0, &need);
    fuzz_check_message(st);
    if (st != SF_OK && st != SF_ERR_OUT_OF_RANGE) return 0;
    int32_t *ids = malloc(((size_t)need + 1) * sizeof *ids);
    if (!ids) abort();
    int32_t n = 0;
    st = sf_tokenizer_encode(tok, text, len, add_bos, parse_special, ids, need, &n);
    if (st != SF_OK || n != need) abort(); /* the count it asked for must do */
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab) abort();
    }
    size_t out_len = 0;
    st = sf_tokenizer_decode(tok, ids, n, skip, NULL, 0, &out_len);
    if (st != SF_OK && st != SF_ERR_OUT_OF_RANGE) abort();
    char *out = malloc(out_len + 1);
    if (!out) abort();
    size_t got = 0;
    if (sf_tokenizer_decode(tok, ids, n, skip, out, out_len + 1, &got) != SF_OK || got != out_len) {
        abort();
    }
    /* streaming: the same text, one id at a time */
    sf_detokenizer *d = NULL;
    if (sf_detokenizer_create(tok, skip, &d) != SF_OK) abort();
    char piece[256];
    size_t streamed = 0, pl = 0;
    for (int32_t i = 0; i < n; i++) {
        st = sf_detokenizer_push(d, ids[i], piece, sizeof piece, &pl);
        fuzz_check_message(st);
        if (st == SF_OK) streamed += pl;
    }
    fuzz_check_message(sf_detokenizer_flush(d, piece, sizeof piece, &pl));
    sf_detokenizer_free(d);
    (void)streamed;

    /* the text as a chat prompt's user turn (NUL-terminated: cut at the first NUL) */
    char *user = malloc(len + 1);
    if (!user) abort();
    memcpy(user, text, len);
    user[len] = '\0';
    int32_t chat[4096], n_chat = 0;
    sf_prompt_spans spans;
    st = sf_chat_encode(tok, tmpl, "Be helpful.", NULL, 0, user, chat, 4096, &n_chat, &spans);
    fuzz_check_message(st);
    if (st == SF_OK) {
        const int64_t sum = (int64_t)spans.prefix + spans.system + spans.middle + spans.user +
                            spans.suffix;
        if (sum != n_chat) abort(); /* the spans must tile the prompt */
    }
    free(user);
    free(out);
    free(ids);
    return 0;
}
