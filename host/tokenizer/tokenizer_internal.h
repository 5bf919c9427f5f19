/* Internal: the tokenizer's tables and the pieces of its pipeline.
 *
 * One engine serves both families. A tokenizer is a list of added tokens matched in the raw
 * text, a normalizer, a list of pre-tokenizer steps that cut the text into pieces, and a BPE
 * model that turns each piece into ids. The families differ only in how a piece becomes the
 * initial BPE symbols: byte-level BPE maps every byte to one of 256 printable characters (so a
 * byte's symbol is a table lookup), SentencePiece-style BPE starts from UTF-8 characters and
 * falls back to <0xNN> byte tokens for characters outside the vocabulary. Decoding differs in
 * the same way. The loaders (load_json.c, load_gguf.c) fill the struct; everything after that
 * treats it as read-only, so one tokenizer can encode from many threads at once: per-call
 * scratch (regex match data, BPE heaps, the word cache) lives in an encode context. */
#ifndef SF_TOKENIZER_INTERNAL_H
#define SF_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sysformer.h"

/* Far above any real vocabulary (Gemma's 256K is the largest in use); it bounds what a
 * hostile file can make us allocate and keeps every id and offset in 32 bits. */
#define SF_TOK_MAX_VOCAB (1 << 24)
/* Token texts live in one arena addressed with 32-bit offsets. */
#define SF_TOK_MAX_ARENA ((size_t)UINT32_MAX)

/* ------------------------------------------------------------------------------------------ */
/* Growable buffers                                                                            */
/* ------------------------------------------------------------------------------------------ */

typedef struct sf_buf {
    char *data;
    size_t len, cap;
} sf_buf;

/* Each returns false when memory runs out (the buffer is then left as it was). */
bool sf_buf_reserve(sf_buf *b, size_t extra);
bool sf_buf_append(sf_buf *b, const void *data, size_t n);
bool sf_buf_push(sf_buf *b, char c);
void sf_buf_free(sf_buf *b);

typedef struct sf_ids {
    int32_t *data;
    size_t len, cap;
} sf_ids;

bool sf_ids_push(sf_ids *v, int32_t id);
void sf_ids_free(sf_ids *v);

/* ------------------------------------------------------------------------------------------ */
/* UTF-8 and the byte-level alphabet (unicode.c)                                               */
/* ------------------------------------------------------------------------------------------ */

/* Checks that s[0, n) is well-formed UTF-8 (no overlong forms, surrogates or values past
 * U+10FFFF). Returns n when it is, else the offset of the first byte of the first bad
 * sequence. */
size_t sf_utf8_validate(const char *s, size_t n);

/* The length of the UTF-8 sequence that starts with lead byte c (1 for anything that is not a
 * valid lead, so that loops over already-validated text always advance). */
int sf_utf8_seq_len(unsigned char c);

/* Decodes the character at s (validated text, at least one byte); *len receives its length. */
uint32_t sf_utf8_decode(const char *s, int *len);

/* Encodes cp (<= U+10FFFF) into out (4 bytes), returning the length. */
int sf_utf8_encode(uint32_t cp, char *out);

/* Appends s[0, n) to out, replacing ill-formed parts with U+FFFD by the Unicode "maximal
 * subpart" rule (which is what Rust's String::from_utf8_lossy, and so transformers, does).
 * When final is false, a valid but incomplete sequence at the end is not consumed: *consumed
 * (if not NULL) receives how many bytes were, and the rest must be offered again with more
 * bytes appended. Returns false when memory runs out. */
bool sf_utf8_append_lossy(sf_buf *out, const char *s, size_t n, bool final, size_t *consumed);

/* Unicode NFC (canonical decomposition, canonical ordering, canonical composition) of valid
 * UTF-8 s[0, n), appended to out. Returns false when memory runs out. */
bool sf_nfc_append(sf_buf *out, const char *s, size_t n);

/* GPT-2's byte-to-character map: bytes that are printable Latin-1 map to themselves, the other
 * 68 to U+0100 onwards in byte order, so that every byte is a visible, non-space character. */
uint32_t sf_byte_to_unicode(unsigned char b);
/* The inverse: the byte a character stands for, or -1 when it is not in the alphabet. */
int sf_unicode_to_byte(uint32_t cp);

/* ------------------------------------------------------------------------------------------ */
/* Hash tables (tables.c)                                                                      */
/* ------------------------------------------------------------------------------------------ */

uint64_t sf_hash_bytes(const void *data, size_t n);

/* String -> int32 with keys stored as (offset, length) into an arena the caller passes to every
 * call, so that keys are never copied and the arena may grow while the map is being filled. */
typedef struct sf_strmap_slot {
    uint32_t hash; /* low 32 bits of the key's hash, to skip most key comparisons */
    int32_t value; /* -1: empty slot */
    uint32_t off, len;
} sf_strmap_slot;

typedef struct sf_strmap {
    sf_strmap_slot *slots;
    size_t mask; /* capacity - 1 (capacity is a power of two) */
    size_t count;
} sf_strmap;

bool sf_strmap_init(sf_strmap *m, size_t expected);
void sf_strmap_free(sf_strmap *m);
/* The value of the key, or -1. */
int32_t sf_strmap_find(const sf_strmap *m, const char *arena, const char *key, size_t len);
/* Inserts or overwrites (the key's bytes must already be at arena + off). Returns false when
 * memory runs out. *previous receives the value replaced, or -1. */
bool sf_strmap_put(sf_strmap *m, const char *arena, uint32_t off, uint32_t len, int32_t value,
                   int32_t *previous);

/* (left id, right id) -> (rank, merged id): the BPE merge table. */
typedef struct sf_pairmap_slot {
    uint64_t key; /* left << 32 | right; UINT64_MAX when empty */
    int32_t rank;
    int32_t merged;
} sf_pairmap_slot;

typedef struct sf_pairmap {
    sf_pairmap_slot *slots;
    size_t mask;
    size_t count;
} sf_pairmap;

bool sf_pairmap_init(sf_pairmap *m, size_t expected);
void sf_pairmap_free(sf_pairmap *m);
/* NULL when the pair does not merge. */
const sf_pairmap_slot *sf_pairmap_find(const sf_pairmap *m, int32_t left, int32_t right);
/* Inserts or overwrites. */
bool sf_pairmap_put(sf_pairmap *m, int32_t left, int32_t right, int32_t rank, int32_t merged);

/* ------------------------------------------------------------------------------------------ */
/* Normalizers and pre-tokenizers (pretokenize.c)                                              */
/* ------------------------------------------------------------------------------------------ */

typedef enum sf_norm_kind {
    SF_NORM_PREPEND, /* prepend text to a non-empty string                              */
    SF_NORM_REPLACE, /* replace every occurrence of a literal string                    */
    SF_NORM_NFC,     /* Unicode canonical composition (Qwen2)                           */
} sf_norm_kind;

typedef struct sf_norm_step {
    sf_norm_kind kind;
    char *pattern; /* REPLACE: what to look for (non-empty) */
    size_t pattern_len;
    char *content; /* PREPEND: what to prepend; REPLACE: the replacement */
    size_t content_len;
} sf_norm_step;

/* How a split's matches become pieces (tokenizers' SplitDelimiterBehavior). */
typedef enum sf_split_behavior {
    SF_SPLIT_REMOVED,
    SF_SPLIT_ISOLATED,
    SF_SPLIT_MERGED_WITH_PREVIOUS,
    SF_SPLIT_MERGED_WITH_NEXT,
    SF_SPLIT_CONTIGUOUS,
} sf_split_behavior;

typedef enum sf_pretok_kind {
    SF_PRETOK_SPLIT,     /* split by a regex or a literal string                            */
    SF_PRETOK_BYTELEVEL, /* optional prefix space and GPT-2 regex split; marks the byte map */
    SF_PRETOK_METASPACE, /* spaces -> replacement, optional prefix, optional split          */
} sf_pretok_kind;

typedef enum sf_prepend_scheme {
    SF_PREPEND_ALWAYS,
    SF_PREPEND_FIRST, /* only for the piece that starts the input                       */
    SF_PREPEND_NEVER,
} sf_prepend_scheme;

typedef struct sf_pretok_step {
    sf_pretok_kind kind;
    /* SPLIT (and BYTELEVEL with use_regex): the compiled regex, or a literal when re is NULL */
    pcre2_code *re;
    char *literal;
    size_t literal_len;
    sf_split_behavior behavior;
    bool invert;
    /* BYTELEVEL */
    bool add_prefix_space;
    /* METASPACE */
    char replacement[4];
    int replacement_len;
    sf_prepend_scheme prepend_scheme;
    bool split;
} sf_pretok_step;

/* Compiles a pattern written for the Oniguruma engine tokenizers uses; the patterns these files
 * carry mean the same thing to PCRE2 with UTF and Unicode properties on. */
sf_status sf_regex_compile(const char *pattern, size_t len, const char *what, pcre2_code **out);

/* The regexes tokenizers and llama.cpp hard-code. */
extern const char *const sf_regex_gpt2;   /* ByteLevel(use_regex), GPT-2, SmolLM2 */
extern const char *const sf_regex_llama3; /* Llama-3 ("llama-bpe")                */
extern const char *const sf_regex_qwen2;  /* Qwen2                                */

/* ------------------------------------------------------------------------------------------ */
/* The tokenizer                                                                               */
/* ------------------------------------------------------------------------------------------ */

enum {
    SF_TOKF_PRESENT = 1u, /* the id has a token (vocabularies may have gaps)              */
    SF_TOKF_SPECIAL = 2u, /* a special added token: skippable in decode                  */
    SF_TOKF_ADDED = 4u,   /* an added token, matched in the text before BPE              */
};

typedef struct sf_added_token {
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
    /* normalized tokens: their text run through the normalizer (set by sf_tok_finish). It is
     * what they are matched as, and what they decode from: tokenizers maps such an id back
     * to the normalized text ("▁hello▁world" under a Prepend/Replace normalizer). */
    uint32_t norm_off, norm_len;
} sf_added_token;

/* A byte trie of added-token texts for leftmost-longest matching. Node 0 is the root. */
typedef struct sf_trie_node {
    int32_t child;   /* first child, -1 when none */
    int32_t sibling; /* next sibling, -1 when none */
    int32_t added;   /* index into tok->added of the token ending here, -1 when none */
    unsigned char byte;
} sf_trie_node;

typedef struct sf_trie {
    sf_trie_node *nodes;
    size_t n, cap;
    int32_t root_child[256]; /* the root's children by first byte, -1 when none */
} sf_trie;

typedef enum sf_tok_family {
    SF_FAMILY_BYTE_LEVEL,    /* symbols are bytes through the GPT-2 alphabet */
    SF_FAMILY_SENTENCEPIECE, /* symbols are characters, <0xNN> byte fallback */
} sf_tok_family;

typedef enum sf_decode_kind {
    SF_DECODE_BYTE_LEVEL, /* characters back to bytes, then lossy UTF-8                 */
    SF_DECODE_PIECES,     /* replace the metaspace, fuse byte runs, strip leading spaces */
} sf_decode_kind;

struct sf_tokenizer {
    char *source; /* the path it was loaded from, for messages */
    sf_tok_family family;

    /* Per id: the token's text (vocabulary entry or added-token content) and flags. */
    int32_t n_ids;
    uint32_t *piece_off, *piece_len;
    uint8_t *flags;
    sf_buf arena; /* every string the tables point into */

    /* The BPE model. */
    sf_strmap vocab; /* model vocabulary (added tokens outside it are not BPE symbols) */
    sf_pairmap merges;
    int32_t unk_id;    /* -1: characters outside the vocabulary are dropped */
    bool fuse_unk;
    bool byte_fallback;
    bool ignore_merges; /* a piece that is itself a token is emitted whole (Llama-3) */
    /* SentencePiece files often have no pre-tokenizer, so a whole paragraph is one BPE
     * piece. When no token has U+2581 after another character, no merge can join across the
     * start of a "▁word", and cutting the piece there changes nothing but the speed (the
     * word cache then works too). Decided once at load. */
    bool split_at_metaspace;
    int32_t byte_ids[256];     /* byte-level: the token of each byte's character; -1 none  */
    int32_t fallback_ids[256]; /* SentencePiece: <0xNN> tokens; -1 when absent             */
    int32_t ascii_ids[128];    /* SentencePiece: single-character ASCII tokens, for speed  */

    /* Added tokens, and tries over their texts: raw matches run on the input, normalized ones
     * on each normalized segment. */
    sf_added_token *added;
    int32_t n_added;
    sf_trie trie_raw, trie_norm;

    sf_norm_step *norm;
    int32_t n_norm;
    sf_pretok_step *pretok;
    int32_t n_pretok;

    /* Decoding. Per id, the bytes the token contributes: byte-level, its characters mapped
     * back to bytes; pieces, its text with the metaspace replaced. byte_value >= 0 marks a
     * <0xNN> token whose byte joins a run (pieces with byte fallback). */
    sf_decode_kind decode_kind;
    uint32_t *dec_off, *dec_len;
    int16_t *byte_value;
    /* Pieces decoding, as the file's decoder declares: one literal replacement applied to
     * every token (the metaspace by a space), whether <0xNN> tokens become bytes, and how many
     * leading spaces of the result are stripped. */
    char *dec_replace_from, *dec_replace_to; /* NULL: no replacement */
    bool dec_byte_fallback;
    int32_t strip_leading;

    int32_t bos_id, eos_id;
    bool add_bos;
    char *chat_template;
};

/* Construction helpers shared by the loaders (tokenizer.c). */
sf_status sf_tok_alloc_ids(sf_tokenizer *tok, int32_t n_ids);
/* Appends bytes to the arena, returning their offset. */
sf_status sf_tok_intern(sf_tokenizer *tok, const char *s, size_t n, uint32_t *off);
/* Sets id's text (copied into the arena). */
sf_status sf_tok_set_piece(sf_tokenizer *tok, int32_t id, const char *s, size_t n);
/* Records an added token; its text must already be id's piece. */
sf_status sf_tok_add_token(sf_tokenizer *tok, const sf_added_token *at);
/* After the loader has filled pieces, vocab, merges, added tokens and options: builds the
 * tries, the byte tables and the decode strings, and checks what must hold. */
sf_status sf_tok_finish(sf_tokenizer *tok);

/* json_path: a tokenizer.json; config_dir: where tokenizer_config.json (and a
 * chat_template.jinja) may sit beside it. */
sf_status sf_tokenizer_load_json(const char *json_path, const char *config_dir,
                                 sf_tokenizer **out);
sf_status sf_tokenizer_load_gguf(const char *path, sf_tokenizer **out);

/* ------------------------------------------------------------------------------------------ */
/* Encoding (pretokenize.c, bpe.c)                                                             */
/* ------------------------------------------------------------------------------------------ */

/* A piece of text during pre-tokenization: a byte range of a buffer, and whether it starts
 * the whole input (for Metaspace's "first" prepend scheme). */
typedef struct sf_span {
    size_t start, end;
    bool first;
} sf_span;

typedef struct sf_spans {
    sf_span *data;
    size_t len, cap;
} sf_spans;

typedef struct sf_bpe_sym {
    int32_t id;
    int32_t prev, next;
} sf_bpe_sym;

typedef struct sf_bpe_entry {
    uint64_t key; /* rank << 32 | position: the heap's order (lowest rank, then leftmost) */
    int32_t left, right, merged;
} sf_bpe_entry;

/* A per-call word cache: piece bytes -> the ids BPE made of them. */
typedef struct sf_word_cache {
    sf_strmap map; /* key: the piece in keys; value: index into spans */
    sf_buf keys;
    sf_ids ids;
    uint32_t *range_off, *range_len; /* value -> its ids */
    size_t n, cap;
} sf_word_cache;

/* Scratch for one encode call. */
typedef struct sf_encode_ctx {
    const sf_tokenizer *tok;
    bool parse_special;
    sf_ids out;
    pcre2_match_data *md;
    sf_buf bufs[2];   /* pre-tokenizer buffers, swapped as steps rewrite the text */
    sf_spans spans[2];
    sf_buf norm;      /* the normalized segment */
    sf_buf mapped;    /* byte-level: a piece through the byte map (ignore_merges lookups) */
    sf_bpe_sym *syms;
    size_t syms_cap;
    sf_bpe_entry *heap;
    size_t heap_len, heap_cap;
    sf_word_cache cache;
} sf_encode_ctx;

bool sf_spans_push(sf_spans *s, size_t start, size_t end, bool first);

/* Runs the tokenizer's normalizer over text into out (tmp is scratch). False: out of
 * memory. */
bool sf_normalize_into(const sf_tokenizer *tok, const char *text, size_t len, sf_buf *out,
                       sf_buf *tmp);
/* Normalizes text (a segment between raw added tokens) into ctx->norm. */
sf_status sf_normalize(sf_encode_ctx *ctx, const char *text, size_t len, bool first);
/* Pre-tokenizes text and runs BPE on every piece, appending ids to ctx->out. */
sf_status sf_pretokenize_and_encode(sf_encode_ctx *ctx, const char *text, size_t len,
                                    bool first);
/* Runs BPE on one piece and appends its ids. */
sf_status sf_bpe_encode_piece(sf_encode_ctx *ctx, const char *piece, size_t len);

void sf_encode_ctx_free(sf_encode_ctx *ctx);

#endif
