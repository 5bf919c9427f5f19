/* Loading a Hugging Face tokenizer.json (plus tokenizer_config.json) through jansson.
 *
 * Only what the two supported families use is accepted: a BPE model, the Prepend, Replace
 * and NFC normalizers, the Split/ByteLevel/Digits/Metaspace pre-tokenizers, and the ByteLevel or
 * Replace/ByteFallback/Fuse/Strip/Metaspace decoders. Anything else is refused with
 * SF_ERR_UNSUPPORTED naming it, rather than silently tokenizing differently from transformers.
 * Every value is type-checked and every id range-checked before use; messages name the file
 * and the JSON path of the offending value. */
#include "tokenizer/tokenizer_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "core/error.h"
#include "core/file.h"

/* Llama-3's tokenizer.json is 9 MB and Gemma's 34 MB; this only stops absurd inputs. */
#define TOKENIZER_JSON_MAX_BYTES ((size_t)1 << 30)
#define CONFIG_MAX_BYTES ((size_t)64 << 20)
/* Sequences of normalizers, pre-tokenizers or decoders may nest; real files use one level. */
#define MAX_NESTING 8

typedef struct loader {
    sf_tokenizer *tok;
    const char *path;
} loader;

static sf_status oom(void) { return sf_fail(SF_ERR_OUT_OF_MEMORY, "tokenizer: out of memory"); }

/* ------------------------------------------------------------------------------------------ */
/* Typed access                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* Absent and null both give the default. */
static sf_status get_bool(const loader *L, const json_t *obj, const char *key, const char *where,
                          bool dflt, bool *out) {
    const json_t *v = json_object_get(obj, key);
    *out = dflt;
    if (!v || json_is_null(v)) return SF_OK;
    if (!json_is_boolean(v)) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s.%s must be true or false", L->path, where, key);
    }
    *out = json_is_true(v);
    return SF_OK;
}

/* A string member, or NULL (absent or null) with *len = 0. */
static sf_status get_string(const loader *L, const json_t *obj, const char *key,
                            const char *where, const char **out, size_t *len) {
    const json_t *v = json_object_get(obj, key);
    *out = NULL;
    *len = 0;
    if (!v || json_is_null(v)) return SF_OK;
    if (!json_is_string(v)) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s.%s must be a string", L->path, where, key);
    }
    *out = json_string_value(v);
    *len = json_string_length(v);
    return SF_OK;
}

static sf_status get_int(const loader *L, const json_t *obj, const char *key, const char *where,
                         json_int_t dflt, json_int_t *out) {
    const json_t *v = json_object_get(obj, key);
    *out = dflt;
    if (!v || json_is_null(v)) return SF_OK;
    if (!json_is_integer(v)) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s.%s must be an integer", L->path, where, key);
    }
    *out = json_integer_value(v);
    return SF_OK;
}

static char *dup_bytes(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p) return NULL;
    if (n > 0) memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* A {"String": s} or {"Regex": r} pattern object. */
static sf_status get_pattern(const loader *L, const json_t *obj, const char *where,
                             const char **s, size_t *len, bool *is_regex) {
    const json_t *p = json_object_get(obj, "pattern");
    if (!json_is_object(p)) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s.pattern must be an object", L->path, where);
    }
    const json_t *v = json_object_get(p, "String");
    *is_regex = false;
    if (!v) {
        v = json_object_get(p, "Regex");
        *is_regex = true;
    }
    if (!json_is_string(v)) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s.pattern needs a \"String\" or \"Regex\" string",
                       L->path, where);
    }
    *s = json_string_value(v);
    *len = json_string_length(v);
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Normalizer                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static sf_status push_norm(sf_tokenizer *tok, sf_norm_step step) {
    sf_norm_step *p = realloc(tok->norm, ((size_t)tok->n_norm + 1) * sizeof *p);
    if (!p) {
        free(step.pattern);
        free(step.content);
        return oom();
    }
    tok->norm = p;
    tok->norm[tok->n_norm++] = step;
    return SF_OK;
}

static sf_status parse_normalizer(const loader *L, const json_t *n, int depth) {
    if (!n || json_is_null(n)) return SF_OK;
    if (!json_is_object(n) || depth > MAX_NESTING) {
        return sf_fail(SF_ERR_FORMAT, "%s: normalizer must be an object (nested at most %d deep)",
                       L->path, MAX_NESTING);
    }
    const char *type;
    size_t tlen;
    sf_status st = get_string(L, n, "type", "normalizer", &type, &tlen);
    if (st != SF_OK) return st;
    if (!type) return sf_fail(SF_ERR_FORMAT, "%s: normalizer has no type", L->path);
    if (strcmp(type, "Sequence") == 0) {
        const json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list)) {
            return sf_fail(SF_ERR_FORMAT, "%s: normalizer Sequence needs a normalizers array",
                           L->path);
        }
        for (size_t i = 0; i < json_array_size(list); i++) {
            st = parse_normalizer(L, json_array_get(list, i), depth + 1);
            if (st != SF_OK) return st;
        }
        return SF_OK;
    }
    sf_norm_step step = {0};
    if (strcmp(type, "Prepend") == 0) {
        const char *s;
        size_t len;
        st = get_string(L, n, "prepend", "normalizer(Prepend)", &s, &len);
        if (st != SF_OK) return st;
        if (!s) return sf_fail(SF_ERR_FORMAT, "%s: normalizer Prepend has no prepend", L->path);
        step.kind = SF_NORM_PREPEND;
        step.content = dup_bytes(s, len);
        step.content_len = len;
        if (!step.content) return oom();
        return push_norm(L->tok, step);
    }
    if (strcmp(type, "Replace") == 0) {
        const char *pat, *content;
        size_t plen, clen;
        bool is_regex;
        st = get_pattern(L, n, "normalizer(Replace)", &pat, &plen, &is_regex);
        if (st == SF_OK) st = get_string(L, n, "content", "normalizer(Replace)", &content, &clen);
        if (st != SF_OK) return st;
        if (is_regex || plen == 0 || !content) {
            return sf_fail(SF_ERR_UNSUPPORTED,
                           "%s: normalizer Replace is supported with a non-empty String pattern "
                           "and a content string only",
                           L->path);
        }
        step.kind = SF_NORM_REPLACE;
        step.pattern = dup_bytes(pat, plen);
        step.pattern_len = plen;
        step.content = dup_bytes(content, clen);
        step.content_len = clen;
        if (!step.pattern || !step.content) {
            free(step.pattern);
            free(step.content);
            return oom();
        }
        return push_norm(L->tok, step);
    }
    if (strcmp(type, "NFC") == 0) {
        step.kind = SF_NORM_NFC;
        return push_norm(L->tok, step);
    }
    return sf_fail(SF_ERR_UNSUPPORTED,
                   "%s: normalizer \"%s\" is not supported (Sequence, Prepend, Replace and NFC "
                   "are)",
                   L->path, type);
}

/* ------------------------------------------------------------------------------------------ */
/* Pre-tokenizer                                                                               */
/* ------------------------------------------------------------------------------------------ */

static sf_status push_pretok(sf_tokenizer *tok, sf_pretok_step step) {
    sf_pretok_step *p = realloc(tok->pretok, ((size_t)tok->n_pretok + 1) * sizeof *p);
    if (!p) {
        if (step.re) pcre2_code_free(step.re);
        free(step.literal);
        return oom();
    }
    tok->pretok = p;
    tok->pretok[tok->n_pretok++] = step;
    return SF_OK;
}

static sf_status parse_behavior(const loader *L, const json_t *n, sf_split_behavior *out) {
    const char *b;
    size_t len;
    sf_status st = get_string(L, n, "behavior", "pre_tokenizer(Split)", &b, &len);
    if (st != SF_OK) return st;
    static const struct {
        const char *name;
        sf_split_behavior b;
    } k_names[] = {
        {"Removed", SF_SPLIT_REMOVED},
        {"Isolated", SF_SPLIT_ISOLATED},
        {"MergedWithPrevious", SF_SPLIT_MERGED_WITH_PREVIOUS},
        {"MergedWithNext", SF_SPLIT_MERGED_WITH_NEXT},
        {"Contiguous", SF_SPLIT_CONTIGUOUS},
    };
    for (size_t i = 0; b && i < sizeof k_names / sizeof k_names[0]; i++) {
        if (strcmp(b, k_names[i].name) == 0) {
            *out = k_names[i].b;
            return SF_OK;
        }
    }
    return sf_fail(SF_ERR_FORMAT, "%s: pre_tokenizer Split has an unknown behavior \"%s\"", L->path,
                   b ? b : "(none)");
}

static sf_status parse_prepend_scheme(const loader *L, const json_t *n, const char *where,
                                      sf_prepend_scheme *out) {
    const char *s;
    size_t len;
    sf_status st = get_string(L, n, "prepend_scheme", where, &s, &len);
    if (st != SF_OK) return st;
    if (s) {
        if (strcmp(s, "always") == 0) *out = SF_PREPEND_ALWAYS;
        else if (strcmp(s, "first") == 0) *out = SF_PREPEND_FIRST;
        else if (strcmp(s, "never") == 0) *out = SF_PREPEND_NEVER;
        else return sf_fail(SF_ERR_FORMAT, "%s: %s.prepend_scheme \"%s\" is unknown", L->path, where, s);
        return SF_OK;
    }
    /* Files written before prepend_scheme existed say add_prefix_space. */
    bool add;
    st = get_bool(L, n, "add_prefix_space", where, true, &add);
    *out = add ? SF_PREPEND_ALWAYS : SF_PREPEND_NEVER;
    return st;
}

/* Metaspace's replacement is one character. */
static sf_status get_replacement(const loader *L, const json_t *n, const char *where, char out[4],
                                 int *out_len) {
    const char *s;
    size_t len;
    sf_status st = get_string(L, n, "replacement", where, &s, &len);
    if (st != SF_OK) return st;
    if (!s) {
        s = "\xE2\x96\x81"; /* U+2581, the tokenizers default */
        len = 3;
    }
    if (len == 0 || len > 4 || (size_t)sf_utf8_seq_len((unsigned char)s[0]) != len ||
        sf_utf8_validate(s, len) != len) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s.replacement must be one character", L->path, where);
    }
    memcpy(out, s, len);
    *out_len = (int)len;
    return SF_OK;
}

static sf_status parse_pretokenizer(const loader *L, const json_t *n, int depth) {
    if (!n || json_is_null(n)) return SF_OK;
    if (!json_is_object(n) || depth > MAX_NESTING) {
        return sf_fail(SF_ERR_FORMAT,
                       "%s: pre_tokenizer must be an object (nested at most %d deep)", L->path,
                       MAX_NESTING);
    }
    const char *type;
    size_t tlen;
    sf_status st = get_string(L, n, "type", "pre_tokenizer", &type, &tlen);
    if (st != SF_OK) return st;
    if (!type) return sf_fail(SF_ERR_FORMAT, "%s: pre_tokenizer has no type", L->path);
    sf_pretok_step step;
    memset(&step, 0, sizeof step);
    if (strcmp(type, "Sequence") == 0) {
        const json_t *list = json_object_get(n, "pretokenizers");
        if (!json_is_array(list)) {
            return sf_fail(SF_ERR_FORMAT, "%s: pre_tokenizer Sequence needs a pretokenizers array",
                           L->path);
        }
        for (size_t i = 0; i < json_array_size(list); i++) {
            st = parse_pretokenizer(L, json_array_get(list, i), depth + 1);
            if (st != SF_OK) return st;
        }
        return SF_OK;
    }
    if (strcmp(type, "Split") == 0) {
        const char *pat;
        size_t plen;
        bool is_regex;
        step.kind = SF_PRETOK_SPLIT;
        st = get_pattern(L, n, "pre_tokenizer(Split)", &pat, &plen, &is_regex);
        if (st == SF_OK) st = parse_behavior(L, n, &step.behavior);
        if (st == SF_OK) st = get_bool(L, n, "invert", "pre_tokenizer(Split)", false, &step.invert);
        if (st != SF_OK) return st;
        if (is_regex) {
            st = sf_regex_compile(pat, plen, L->path, &step.re);
            if (st != SF_OK) return st;
        } else {
            if (plen == 0) {
                return sf_fail(SF_ERR_UNSUPPORTED, "%s: pre_tokenizer Split with an empty pattern",
                               L->path);
            }
            step.literal = dup_bytes(pat, plen);
            step.literal_len = plen;
            if (!step.literal) return oom();
        }
        return push_pretok(L->tok, step);
    }
    if (strcmp(type, "ByteLevel") == 0) {
        bool use_regex;
        step.kind = SF_PRETOK_BYTELEVEL;
        step.behavior = SF_SPLIT_ISOLATED;
        /* tokenizers' defaults for both flags are true. */
        st = get_bool(L, n, "add_prefix_space", "pre_tokenizer(ByteLevel)", true,
                      &step.add_prefix_space);
        if (st == SF_OK) st = get_bool(L, n, "use_regex", "pre_tokenizer(ByteLevel)", true, &use_regex);
        if (st == SF_OK && use_regex) {
            st = sf_regex_compile(sf_regex_gpt2, strlen(sf_regex_gpt2), "ByteLevel", &step.re);
        }
        if (st != SF_OK) return st;
        return push_pretok(L->tok, step);
    }
    if (strcmp(type, "Digits") == 0) {
        /* Digits is a split on numeric characters: one piece per digit, or per run. */
        bool individual;
        st = get_bool(L, n, "individual_digits", "pre_tokenizer(Digits)", false, &individual);
        if (st != SF_OK) return st;
        const char *pat = individual ? "\\p{N}" : "\\p{N}+";
        step.kind = SF_PRETOK_SPLIT;
        step.behavior = SF_SPLIT_ISOLATED;
        st = sf_regex_compile(pat, strlen(pat), "Digits", &step.re);
        if (st != SF_OK) return st;
        return push_pretok(L->tok, step);
    }
    if (strcmp(type, "Metaspace") == 0) {
        step.kind = SF_PRETOK_METASPACE;
        step.behavior = SF_SPLIT_MERGED_WITH_NEXT;
        st = get_replacement(L, n, "pre_tokenizer(Metaspace)", step.replacement,
                             &step.replacement_len);
        if (st == SF_OK) st = parse_prepend_scheme(L, n, "pre_tokenizer(Metaspace)", &step.prepend_scheme);
        if (st == SF_OK) st = get_bool(L, n, "split", "pre_tokenizer(Metaspace)", true, &step.split);
        if (st != SF_OK) return st;
        /* The split is on the replacement character, kept with the piece after it. */
        step.literal = dup_bytes(step.replacement, (size_t)step.replacement_len);
        step.literal_len = (size_t)step.replacement_len;
        if (!step.literal) return oom();
        return push_pretok(L->tok, step);
    }
    return sf_fail(SF_ERR_UNSUPPORTED,
                   "%s: pre_tokenizer \"%s\" is not supported (Sequence, Split, ByteLevel, Digits "
                   "and Metaspace are)",
                   L->path, type);
}

/* ------------------------------------------------------------------------------------------ */
/* Decoder                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static sf_status set_replace(const loader *L, const char *from, size_t flen, const char *to,
                             size_t tlen) {
    sf_tokenizer *tok = L->tok;
    if (tok->dec_replace_from) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: decoder has more than one replacement", L->path);
    }
    if (flen == 0 || memchr(from, '\0', flen) || memchr(to, '\0', tlen)) {
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: decoder replacement pattern is empty or has NUL",
                       L->path);
    }
    tok->dec_replace_from = dup_bytes(from, flen);
    tok->dec_replace_to = dup_bytes(to, tlen);
    if (!tok->dec_replace_from || !tok->dec_replace_to) return oom();
    return SF_OK;
}

/* *byte_level receives whether a ByteLevel decoder was met. */
static sf_status parse_decoder(const loader *L, const json_t *n, int depth, bool *byte_level,
                               int *n_other) {
    sf_tokenizer *tok = L->tok;
    if (!json_is_object(n) || depth > MAX_NESTING) {
        return sf_fail(SF_ERR_FORMAT, "%s: decoder must be an object (nested at most %d deep)",
                       L->path, MAX_NESTING);
    }
    const char *type;
    size_t tlen;
    sf_status st = get_string(L, n, "type", "decoder", &type, &tlen);
    if (st != SF_OK) return st;
    if (!type) return sf_fail(SF_ERR_FORMAT, "%s: decoder has no type", L->path);
    if (strcmp(type, "Sequence") == 0) {
        const json_t *list = json_object_get(n, "decoders");
        if (!json_is_array(list)) {
            return sf_fail(SF_ERR_FORMAT, "%s: decoder Sequence needs a decoders array", L->path);
        }
        for (size_t i = 0; i < json_array_size(list); i++) {
            st = parse_decoder(L, json_array_get(list, i), depth + 1, byte_level, n_other);
            if (st != SF_OK) return st;
        }
        return SF_OK;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        *byte_level = true;
        return SF_OK;
    }
    (*n_other)++;
    if (strcmp(type, "Fuse") == 0) return SF_OK;
    if (strcmp(type, "ByteFallback") == 0) {
        tok->dec_byte_fallback = true;
        return SF_OK;
    }
    if (strcmp(type, "Replace") == 0) {
        const char *pat, *content;
        size_t plen, clen;
        bool is_regex;
        st = get_pattern(L, n, "decoder(Replace)", &pat, &plen, &is_regex);
        if (st == SF_OK) st = get_string(L, n, "content", "decoder(Replace)", &content, &clen);
        if (st != SF_OK) return st;
        if (is_regex || !content) {
            return sf_fail(SF_ERR_UNSUPPORTED,
                           "%s: decoder Replace is supported with a String pattern only", L->path);
        }
        return set_replace(L, pat, plen, content, clen);
    }
    if (strcmp(type, "Strip") == 0) {
        const char *content;
        size_t clen;
        json_int_t start, stop;
        st = get_string(L, n, "content", "decoder(Strip)", &content, &clen);
        if (st == SF_OK) st = get_int(L, n, "start", "decoder(Strip)", 0, &start);
        if (st == SF_OK) st = get_int(L, n, "stop", "decoder(Strip)", 0, &stop);
        if (st != SF_OK) return st;
        if (!content || clen != 1 || content[0] != ' ' || stop != 0 || start < 0 || start > 64) {
            return sf_fail(SF_ERR_UNSUPPORTED,
                           "%s: decoder Strip is supported for leading spaces only", L->path);
        }
        tok->strip_leading = (int32_t)start;
        return SF_OK;
    }
    if (strcmp(type, "Metaspace") == 0) {
        char rep[4];
        int rep_len;
        sf_prepend_scheme scheme;
        st = get_replacement(L, n, "decoder(Metaspace)", rep, &rep_len);
        if (st == SF_OK) st = parse_prepend_scheme(L, n, "decoder(Metaspace)", &scheme);
        if (st == SF_OK) st = set_replace(L, rep, (size_t)rep_len, " ", 1);
        if (st != SF_OK) return st;
        /* It drops the space the pre-tokenizer prepended to the first token. */
        if (scheme != SF_PREPEND_NEVER) tok->strip_leading = 1;
        return SF_OK;
    }
    return sf_fail(SF_ERR_UNSUPPORTED,
                   "%s: decoder \"%s\" is not supported (ByteLevel, Replace, ByteFallback, Fuse, "
                   "Strip and Metaspace are)",
                   L->path, type);
}

/* ------------------------------------------------------------------------------------------ */
/* Model                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static sf_status check_id(const loader *L, const json_t *v, const char *where, int32_t *out) {
    if (!json_is_integer(v)) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s: id must be an integer", L->path, where);
    }
    json_int_t id = json_integer_value(v);
    if (id < 0 || id >= SF_TOK_MAX_VOCAB) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s: id %lld is out of range", L->path, where,
                       (long long)id);
    }
    *out = (int32_t)id;
    return SF_OK;
}

static sf_status parse_vocab(const loader *L, const json_t *vocab, const json_t *added) {
    sf_tokenizer *tok = L->tok;
    /* The id space covers the model vocabulary and the added tokens. */
    int32_t max_id = -1, id = 0;
    const char *key;
    json_t *v;
    sf_status st;
    json_object_foreach((json_t *)vocab, key, v) {
        st = check_id(L, v, "model.vocab", &id);
        if (st != SF_OK) return st;
        if (id > max_id) max_id = id;
    }
    for (size_t i = 0; i < json_array_size(added); i++) {
        const json_t *a = json_array_get(added, i);
        if (!json_is_object(a)) {
            return sf_fail(SF_ERR_FORMAT, "%s: added_tokens[%zu] must be an object", L->path, i);
        }
        st = check_id(L, json_object_get(a, "id"), "added_tokens", &id);
        if (st != SF_OK) return st;
        if (id > max_id) max_id = id;
    }
    if (max_id < 0) return sf_fail(SF_ERR_FORMAT, "%s: the vocabulary is empty", L->path);
    st = sf_tok_alloc_ids(tok, max_id + 1);
    if (st != SF_OK) return st;
    if (!sf_strmap_init(&tok->vocab, json_object_size(vocab))) return oom();

    size_t klen;
#if JANSSON_VERSION_HEX >= 0x020E00
    json_object_keylen_foreach((json_t *)vocab, key, klen, v) {
#else
    json_object_foreach((json_t *)vocab, key, v) {
        klen = strlen(key);
#endif
        id = (int32_t)json_integer_value(v);
        if (tok->flags[id] & SF_TOKF_PRESENT) {
            return sf_fail(SF_ERR_FORMAT, "%s: model.vocab gives id %d to two tokens", L->path,
                           (int)id);
        }
        if (klen == 0) return sf_fail(SF_ERR_FORMAT, "%s: model.vocab has an empty token", L->path);
        if (sf_utf8_validate(key, klen) != klen) {
            return sf_fail(SF_ERR_FORMAT, "%s: model.vocab token %d is not valid UTF-8", L->path,
                           (int)id);
        }
        st = sf_tok_set_piece(tok, id, key, klen);
        if (st != SF_OK) return st;
        if (!sf_strmap_put(&tok->vocab, tok->arena.data, tok->piece_off[id], (uint32_t)klen, id,
                           NULL)) {
            return oom();
        }
    }
    return SF_OK;
}

static sf_status parse_merges(const loader *L, const json_t *merges) {
    sf_tokenizer *tok = L->tok;
    if (!merges || json_is_null(merges)) return SF_OK;
    if (!json_is_array(merges)) {
        return sf_fail(SF_ERR_FORMAT, "%s: model.merges must be an array", L->path);
    }
    size_t n = json_array_size(merges);
    if (n > (size_t)INT32_MAX) return sf_fail(SF_ERR_FORMAT, "%s: too many merges", L->path);
    if (!sf_pairmap_init(&tok->merges, n)) return oom();
    sf_buf cat = {0};
    sf_status st = SF_OK;
    for (size_t i = 0; i < n && st == SF_OK; i++) {
        const json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t alen, blen;
        /* Two spellings: "a b" (older files; tokens never contain a space, as spaces are Ġ or
         * ▁ by then) and ["a", "b"]. */
        if (json_is_string(m)) {
            const char *s = json_string_value(m);
            size_t len = json_string_length(m);
            const char *sp = memchr(s, ' ', len);
            if (!sp || memchr(sp + 1, ' ', len - (size_t)(sp - s) - 1)) {
                st = sf_fail(SF_ERR_FORMAT, "%s: model.merges[%zu] is not two tokens and a space",
                             L->path, i);
                break;
            }
            a = s;
            alen = (size_t)(sp - s);
            b = sp + 1;
            blen = len - alen - 1;
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            alen = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            blen = json_string_length(json_array_get(m, 1));
        } else {
            st = sf_fail(SF_ERR_FORMAT, "%s: model.merges[%zu] must be \"a b\" or [\"a\", \"b\"]",
                         L->path, i);
            break;
        }
        int32_t ia = sf_strmap_find(&tok->vocab, tok->arena.data, a, alen);
        int32_t ib = sf_strmap_find(&tok->vocab, tok->arena.data, b, blen);
        cat.len = 0;
        if (!sf_buf_append(&cat, a, alen) || !sf_buf_append(&cat, b, blen)) {
            st = oom();
            break;
        }
        int32_t im = sf_strmap_find(&tok->vocab, tok->arena.data, cat.data, cat.len);
        if (ia < 0 || ib < 0 || im < 0) {
            const char *which = ia < 0 ? a : ib < 0 ? b : cat.data;
            int wlen = (int)(ia < 0 ? alen : ib < 0 ? blen : cat.len);
            st = sf_fail(SF_ERR_FORMAT, "%s: model.merges[%zu] refers to \"%.*s\", which is not in "
                         "the vocabulary",
                         L->path, i, wlen > 200 ? 200 : wlen, which);
            break;
        }
        /* A repeated pair keeps its last rank, as tokenizers' map does. */
        if (!sf_pairmap_put(&tok->merges, ia, ib, (int32_t)i, im)) st = oom();
    }
    sf_buf_free(&cat);
    return st;
}

static sf_status parse_added(const loader *L, const json_t *added) {
    sf_tokenizer *tok = L->tok;
    for (size_t i = 0; i < json_array_size(added); i++) {
        const json_t *a = json_array_get(added, i);
        char where[48];
        snprintf(where, sizeof where, "added_tokens[%zu]", i);
        int32_t id = 0;
        const char *content;
        size_t clen;
        sf_added_token at;
        memset(&at, 0, sizeof at);
        sf_status st = check_id(L, json_object_get(a, "id"), where, &id);
        if (st == SF_OK) st = get_string(L, a, "content", where, &content, &clen);
        if (st != SF_OK) return st;
        if (!content || clen == 0 || sf_utf8_validate(content, clen) != clen) {
            return sf_fail(SF_ERR_FORMAT, "%s: %s.content must be a non-empty UTF-8 string",
                           L->path, where);
        }
        at.id = id;
        st = get_bool(L, a, "special", where, false, &at.special);
        if (st == SF_OK) st = get_bool(L, a, "lstrip", where, false, &at.lstrip);
        if (st == SF_OK) st = get_bool(L, a, "rstrip", where, false, &at.rstrip);
        if (st == SF_OK) st = get_bool(L, a, "single_word", where, false, &at.single_word);
        /* tokenizers' AddedToken default: special tokens match the raw text. */
        if (st == SF_OK) st = get_bool(L, a, "normalized", where, !at.special, &at.normalized);
        if (st != SF_OK) return st;
        if (tok->flags[id] & SF_TOKF_ADDED) {
            return sf_fail(SF_ERR_FORMAT, "%s: %s reuses id %d", L->path, where, (int)id);
        }
        /* The added token's text is what the id decodes to, even where the model vocabulary
         * has a different entry for the id (tokenizers looks added tokens up first). */
        bool same = (tok->flags[id] & SF_TOKF_PRESENT) && tok->piece_len[id] == clen &&
                    memcmp(tok->arena.data + tok->piece_off[id], content, clen) == 0;
        if (!same) {
            st = sf_tok_set_piece(tok, id, content, clen);
            if (st != SF_OK) return st;
        }
        st = sf_tok_add_token(tok, &at);
        if (st != SF_OK) return st;
    }
    return SF_OK;
}

/* The id of a token text for the config's bos/eos names: added tokens first. */
static int32_t lookup_token(const sf_tokenizer *tok, const char *s, size_t n) {
    for (int32_t i = 0; i < tok->n_added; i++) {
        int32_t id = tok->added[i].id;
        if (tok->piece_len[id] == n && memcmp(tok->arena.data + tok->piece_off[id], s, n) == 0) {
            return id;
        }
    }
    return sf_strmap_find(&tok->vocab, tok->arena.data, s, n);
}

/* The special token the post-processor puts first for a single sequence (the BOS that
 * encoding adds by default), or -1. */
static int32_t template_first_token(const sf_tokenizer *tok, const json_t *pp, int depth) {
    if (!json_is_object(pp) || depth > MAX_NESTING) return -1;
    const char *type = json_string_value(json_object_get(pp, "type"));
    if (!type) return -1;
    if (strcmp(type, "Sequence") == 0) {
        const json_t *list = json_object_get(pp, "processors");
        for (size_t i = 0; i < json_array_size(list); i++) {
            int32_t id = template_first_token(tok, json_array_get(list, i), depth + 1);
            if (id >= 0) return id;
        }
        return -1;
    }
    if (strcmp(type, "TemplateProcessing") != 0) return -1;
    const json_t *single = json_object_get(pp, "single");
    const json_t *first = json_array_get(single, 0);
    const json_t *sp = json_object_get(first, "SpecialToken");
    const json_t *name = json_object_get(sp, "id");
    if (!json_is_string(name)) return -1;
    /* special_tokens maps the name to its ids; fall back to the name as a token's text. */
    const json_t *entry = json_object_get(json_object_get(pp, "special_tokens"), json_string_value(name));
    const json_t *ids = json_object_get(entry, "ids");
    const json_t *id0 = json_array_get(ids, 0);
    if (json_is_integer(id0)) {
        json_int_t v = json_integer_value(id0);
        return v >= 0 && v < tok->n_ids ? (int32_t)v : -1;
    }
    return lookup_token(tok, json_string_value(name), json_string_length(name));
}

/* ------------------------------------------------------------------------------------------ */
/* tokenizer_config.json                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Reads a file that may be absent: *data = NULL then. */
static sf_status read_optional(const char *path, size_t max, char **data, size_t *len) {
    struct stat sb;
    *data = NULL;
    *len = 0;
    if (stat(path, &sb) != 0) {
        if (errno == ENOENT || errno == ENOTDIR) return SF_OK;
        return sf_fail(SF_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    }
    return sf_read_file(path, max, data, len);
}

/* A token named in the config: a string, or an AddedToken object with "content". */
static const json_t *config_token(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_is_string(v) ? v : NULL;
}

typedef struct config_info {
    bool has_add_bos, add_bos;
    int32_t bos, eos;
    bool has_bos, has_eos;
} config_info;

static sf_status parse_config(sf_tokenizer *tok, const char *dir, config_info *ci) {
    memset(ci, 0, sizeof *ci);
    ci->bos = ci->eos = -1;
    char *path = sf_path_join(dir, "tokenizer_config.json");
    if (!path) return oom();
    char *data;
    size_t len;
    sf_status st = read_optional(path, CONFIG_MAX_BYTES, &data, &len);
    json_t *cfg = NULL;
    if (st == SF_OK && data) {
        json_error_t err;
        /* model_max_length is often 1e30, past jansson's integers; nothing read here is a
         * number, so all numbers may as well be reals. */
        cfg = json_loadb(data, len, JSON_DECODE_INT_AS_REAL, &err);
        if (!cfg || !json_is_object(cfg)) {
            st = sf_fail(SF_ERR_FORMAT, "%s:%d:%d: %s", path, err.line, err.column,
                         cfg ? "not a JSON object" : err.text);
        }
    }
    free(data);
    if (st == SF_OK && cfg) {
        const json_t *ab = json_object_get(cfg, "add_bos_token");
        if (ab && !json_is_null(ab)) {
            if (!json_is_boolean(ab)) {
                st = sf_fail(SF_ERR_FORMAT, "%s: add_bos_token must be true or false", path);
            } else {
                ci->has_add_bos = true;
                ci->add_bos = json_is_true(ab);
            }
        }
        const json_t *b = config_token(cfg, "bos_token"), *e = config_token(cfg, "eos_token");
        if (b) {
            ci->has_bos = true;
            ci->bos = lookup_token(tok, json_string_value(b), json_string_length(b));
        }
        if (e) {
            ci->has_eos = true;
            ci->eos = lookup_token(tok, json_string_value(e), json_string_length(e));
        }
        /* chat_template: a string, or a list of named templates (take "default"). */
        const json_t *ct = json_object_get(cfg, "chat_template");
        if (st == SF_OK && json_is_array(ct)) {
            const json_t *pick = NULL;
            for (size_t i = 0; i < json_array_size(ct); i++) {
                const json_t *item = json_array_get(ct, i);
                const char *name = json_string_value(json_object_get(item, "name"));
                if (!pick || (name && strcmp(name, "default") == 0)) pick = item;
            }
            ct = json_object_get(pick, "template");
        }
        if (st == SF_OK && json_is_string(ct)) {
            tok->chat_template = dup_bytes(json_string_value(ct), strlen(json_string_value(ct)));
            if (!tok->chat_template) st = oom();
        } else if (st == SF_OK && ct && !json_is_null(ct)) {
            st = sf_fail(SF_ERR_FORMAT, "%s: chat_template must be a string or a list of "
                         "{name, template}", path);
        }
    }
    json_decref(cfg);
    free(path);
    /* transformers 5 saves the template beside the config instead of inside it. */
    if (st == SF_OK && !tok->chat_template) {
        path = sf_path_join(dir, "chat_template.jinja");
        if (!path) return oom();
        st = read_optional(path, CONFIG_MAX_BYTES, &data, &len);
        if (st == SF_OK && data) {
            if (strlen(data) != len || sf_utf8_validate(data, len) != len) {
                st = sf_fail(SF_ERR_FORMAT, "%s: not UTF-8 text", path);
                free(data);
            } else {
                tok->chat_template = data;
            }
        }
        free(path);
    }
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static sf_status load(sf_tokenizer *tok, const char *json_path, const char *config_dir) {
    loader L = {tok, json_path};
    char *data;
    size_t len;
    sf_status st = sf_read_file(json_path, TOKENIZER_JSON_MAX_BYTES, &data, &len);
    if (st != SF_OK) return st;
    json_error_t err;
    /* Duplicate keys would make the vocabulary ambiguous. */
    json_t *root = json_loadb(data, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &err);
    free(data);
    if (!root) {
        return sf_fail(SF_ERR_FORMAT, "%s:%d:%d: %s", json_path, err.line, err.column, err.text);
    }
    if (!json_is_object(root)) {
        st = sf_fail(SF_ERR_FORMAT, "%s: not a JSON object", json_path);
        goto done;
    }
    const json_t *model = json_object_get(root, "model");
    if (!json_is_object(model)) {
        st = sf_fail(SF_ERR_FORMAT, "%s: no \"model\" object", json_path);
        goto done;
    }
    const char *type;
    size_t tlen;
    st = get_string(&L, model, "type", "model", &type, &tlen);
    if (st != SF_OK) goto done;
    if (!type && json_object_get(model, "merges")) type = "BPE"; /* tokenizers infers it too */
    if (!type) {
        st = sf_fail(SF_ERR_FORMAT, "%s: model has no type", json_path);
        goto done;
    }
    if (strcmp(type, "BPE") != 0) {
        st = sf_fail(SF_ERR_UNSUPPORTED,
                     "%s: model type \"%s\" is not supported (only BPE: byte-level or "
                     "SentencePiece-style)",
                     json_path, type);
        goto done;
    }
    const json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab)) {
        st = sf_fail(SF_ERR_FORMAT, "%s: model.vocab must be an object", json_path);
        goto done;
    }
    const json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_null(added) && !json_is_array(added)) {
        st = sf_fail(SF_ERR_FORMAT, "%s: added_tokens must be an array", json_path);
        goto done;
    }
    const char *s;
    size_t slen;
    st = get_string(&L, model, "continuing_subword_prefix", "model", &s, &slen);
    if (st == SF_OK && slen == 0) st = get_string(&L, model, "end_of_word_suffix", "model", &s, &slen);
    if (st == SF_OK && slen > 0) {
        st = sf_fail(SF_ERR_UNSUPPORTED,
                     "%s: BPE with a continuing_subword_prefix or end_of_word_suffix", json_path);
    }
    if (st == SF_OK) st = parse_vocab(&L, vocab, added);
    if (st == SF_OK) st = parse_merges(&L, json_object_get(model, "merges"));
    if (st == SF_OK) st = get_bool(&L, model, "byte_fallback", "model", false, &tok->byte_fallback);
    if (st == SF_OK) st = get_bool(&L, model, "fuse_unk", "model", false, &tok->fuse_unk);
    if (st == SF_OK) st = get_bool(&L, model, "ignore_merges", "model", false, &tok->ignore_merges);
    if (st == SF_OK) st = get_string(&L, model, "unk_token", "model", &s, &slen);
    if (st == SF_OK && s) {
        tok->unk_id = sf_strmap_find(&tok->vocab, tok->arena.data, s, slen);
        if (tok->unk_id < 0) {
            st = sf_fail(SF_ERR_FORMAT, "%s: model.unk_token \"%.*s\" is not in the vocabulary",
                         json_path, (int)(slen > 200 ? 200 : slen), s);
        }
    }
    if (st == SF_OK) st = parse_added(&L, added);
    if (st == SF_OK) st = parse_normalizer(&L, json_object_get(root, "normalizer"), 0);
    if (st == SF_OK) st = parse_pretokenizer(&L, json_object_get(root, "pre_tokenizer"), 0);
    if (st != SF_OK) goto done;

    /* The byte map is applied at the end of the ByteLevel step, so nothing may follow it. */
    tok->family = SF_FAMILY_SENTENCEPIECE;
    for (int32_t i = 0; i < tok->n_pretok; i++) {
        if (tok->pretok[i].kind == SF_PRETOK_BYTELEVEL) {
            if (i + 1 != tok->n_pretok) {
                st = sf_fail(SF_ERR_UNSUPPORTED,
                             "%s: a pre-tokenizer after ByteLevel is not supported", json_path);
                goto done;
            }
            tok->family = SF_FAMILY_BYTE_LEVEL;
        }
    }

    const json_t *dec = json_object_get(root, "decoder");
    if (!dec || json_is_null(dec)) {
        st = sf_fail(SF_ERR_UNSUPPORTED, "%s: no decoder (tokens would be joined by spaces)",
                     json_path);
        goto done;
    }
    bool byte_level = false;
    int n_other = 0;
    st = parse_decoder(&L, dec, 0, &byte_level, &n_other);
    if (st != SF_OK) goto done;
    if (byte_level && n_other > 0) {
        st = sf_fail(SF_ERR_UNSUPPORTED, "%s: ByteLevel decoder combined with others", json_path);
        goto done;
    }
    tok->decode_kind = byte_level ? SF_DECODE_BYTE_LEVEL : SF_DECODE_PIECES;

    /* BOS, EOS and whether BOS is added: the config when it says, else the post-processor. */
    config_info ci;
    st = parse_config(tok, config_dir, &ci);
    if (st != SF_OK) goto done;
    int32_t tmpl = template_first_token(tok, json_object_get(root, "post_processor"), 0);
    tok->bos_id = ci.has_bos ? ci.bos : tmpl;
    tok->eos_id = ci.eos;
    tok->add_bos = ci.has_add_bos ? ci.add_bos : (tmpl >= 0 && tmpl == tok->bos_id);
    st = sf_tok_finish(tok);

done:
    json_decref(root);
    return st;
}

sf_status sf_tokenizer_load_json(const char *json_path, const char *config_dir,
                                 sf_tokenizer **out) {
    *out = NULL;
    sf_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) return oom();
    tok->unk_id = tok->bos_id = tok->eos_id = -1;
    tok->source = dup_bytes(json_path, strlen(json_path));
    if (!tok->source) {
        free(tok);
        return oom();
    }
    sf_status st = load(tok, json_path, config_dir);
    if (st != SF_OK) {
        sf_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return SF_OK;
}
