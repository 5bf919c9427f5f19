/* The tokenizer API: loading dispatch, added-token matching, encode, decode and streaming.
 *
 * Encoding follows the order of the tokenizers library: added tokens are found in the raw
 * text first (leftmost, then longest), the text between them is normalized, tokens marked
 * "normalized" are then found in that, and what remains is pre-tokenized and run through BPE.
 * Decoding follows transformers' decode for the two decoder shapes these families use (see
 * decode_into). */
#include "tokenizer/tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/error.h"

static sf_status oom(void) { return sf_fail(SF_ERR_OUT_OF_MEMORY, "tokenizer: out of memory"); }

/* ------------------------------------------------------------------------------------------ */
/* Construction                                                                                */
/* ------------------------------------------------------------------------------------------ */

sf_status sf_tok_alloc_ids(sf_tokenizer *tok, int32_t n_ids) {
    if (n_ids <= 0 || n_ids > SF_TOK_MAX_VOCAB) {
        return sf_fail(SF_ERR_FORMAT, "%s: vocabulary size %d is out of range", tok->source,
                       (int)n_ids);
    }
    tok->n_ids = n_ids;
    tok->piece_off = calloc((size_t)n_ids, sizeof *tok->piece_off);
    tok->piece_len = calloc((size_t)n_ids, sizeof *tok->piece_len);
    tok->flags = calloc((size_t)n_ids, sizeof *tok->flags);
    if (!tok->piece_off || !tok->piece_len || !tok->flags) return oom();
    return SF_OK;
}

sf_status sf_tok_intern(sf_tokenizer *tok, const char *s, size_t n, uint32_t *off) {
    if (n > SF_TOK_MAX_ARENA - tok->arena.len) {
        return sf_fail(SF_ERR_FORMAT, "%s: token texts exceed 4 GiB", tok->source);
    }
    *off = (uint32_t)tok->arena.len;
    if (!sf_buf_append(&tok->arena, s, n)) return oom();
    return SF_OK;
}

sf_status sf_tok_set_piece(sf_tokenizer *tok, int32_t id, const char *s, size_t n) {
    uint32_t off = 0;
    sf_status st = sf_tok_intern(tok, s, n, &off);
    if (st != SF_OK) return st;
    tok->piece_off[id] = off;
    tok->piece_len[id] = (uint32_t)n;
    tok->flags[id] |= SF_TOKF_PRESENT;
    return SF_OK;
}

sf_status sf_tok_add_token(sf_tokenizer *tok, const sf_added_token *at) {
    if (tok->n_added == INT32_MAX) return oom();
    sf_added_token *p = realloc(tok->added, ((size_t)tok->n_added + 1) * sizeof *p);
    if (!p) return oom();
    tok->added = p;
    tok->added[tok->n_added++] = *at;
    tok->flags[at->id] |= SF_TOKF_ADDED | (at->special ? SF_TOKF_SPECIAL : 0);
    return SF_OK;
}

static sf_status trie_insert(sf_trie *t, const char *s, size_t n, int32_t added) {
    if (!t->nodes) {
        t->cap = 64;
        t->nodes = malloc(t->cap * sizeof *t->nodes);
        if (!t->nodes) return oom();
        t->nodes[0] = (sf_trie_node){-1, -1, -1, 0};
        t->n = 1;
        for (int i = 0; i < 256; i++) t->root_child[i] = -1;
    }
    int32_t node = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        int32_t c = node == 0 ? t->root_child[b] : t->nodes[node].child;
        if (node != 0) {
            while (c >= 0 && t->nodes[c].byte != b) c = t->nodes[c].sibling;
        }
        if (c < 0) {
            if (t->n == t->cap) {
                sf_trie_node *p = realloc(t->nodes, 2 * t->cap * sizeof *p);
                if (!p) return oom();
                t->nodes = p;
                t->cap *= 2;
            }
            if (t->n >= INT32_MAX) return oom();
            c = (int32_t)t->n++;
            t->nodes[c] = (sf_trie_node){-1, -1, -1, b};
            if (node == 0) {
                t->root_child[b] = c;
            } else {
                t->nodes[c].sibling = t->nodes[node].child;
                t->nodes[node].child = c;
            }
        }
        node = c;
    }
    t->nodes[node].added = added;
    return SF_OK;
}

/* The index of the longest added token that starts at s[i], or -1; *end receives where it
 * ends. */
static int32_t trie_longest(const sf_trie *t, const char *s, size_t n, size_t i, size_t *end) {
    if (!t->nodes) return -1;
    int32_t c = t->root_child[(unsigned char)s[i]], best = -1;
    size_t j = i;
    while (c >= 0) {
        j++;
        if (t->nodes[c].added >= 0) {
            best = t->nodes[c].added;
            *end = j;
        }
        if (j >= n) break;
        unsigned char b = (unsigned char)s[j];
        c = t->nodes[c].child;
        while (c >= 0 && t->nodes[c].byte != b) c = t->nodes[c].sibling;
    }
    return best;
}

/* The added token whose text is exactly s[0, n), or -1. */
static int32_t trie_exact(const sf_trie *t, const char *s, size_t n) {
    if (!t->nodes || n == 0) return -1;
    int32_t c = t->root_child[(unsigned char)s[0]];
    for (size_t j = 1; j < n && c >= 0; j++) {
        c = t->nodes[c].child;
        while (c >= 0 && t->nodes[c].byte != (unsigned char)s[j]) c = t->nodes[c].sibling;
    }
    return c >= 0 ? t->nodes[c].added : -1;
}

/* tokenizers' ByteFallback decoder takes a token for a byte when it reads "<0xHH>". */
static int parse_byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                       : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Builds the per-id decode strings (see the struct). */
static sf_status build_decode_strings(sf_tokenizer *tok) {
    tok->dec_off = calloc((size_t)tok->n_ids, sizeof *tok->dec_off);
    tok->dec_len = calloc((size_t)tok->n_ids, sizeof *tok->dec_len);
    tok->byte_value = malloc((size_t)tok->n_ids * sizeof *tok->byte_value);
    if (!tok->dec_off || !tok->dec_len || !tok->byte_value) return oom();
    sf_buf tmp = {0}, clean = {0};
    sf_status st = SF_OK;
    size_t from_len = tok->dec_replace_from ? strlen(tok->dec_replace_from) : 0;
    size_t to_len = tok->dec_replace_to ? strlen(tok->dec_replace_to) : 0;
    /* Normalized added tokens decode from their normalized text (see sf_added_token). */
    int32_t *norm_of = malloc((size_t)tok->n_ids * sizeof *norm_of);
    if (!norm_of) return oom();
    for (int32_t id = 0; id < tok->n_ids; id++) norm_of[id] = -1;
    for (int32_t i = 0; i < tok->n_added; i++) {
        if (tok->added[i].normalized) norm_of[tok->added[i].id] = i;
    }
    for (int32_t id = 0; id < tok->n_ids && st == SF_OK; id++) {
        tok->byte_value[id] = -1;
        if (!(tok->flags[id] & SF_TOKF_PRESENT)) continue;
        /* The arena may move while we append to it, so copy the text out first. */
        tmp.len = 0;
        uint32_t src_off = tok->piece_off[id], src_len = tok->piece_len[id];
        if (norm_of[id] >= 0) {
            src_off = tok->added[norm_of[id]].norm_off;
            src_len = tok->added[norm_of[id]].norm_len;
        }
        if (!sf_buf_append(&tmp, tok->arena.data + src_off, src_len)) {
            st = oom();
            break;
        }
        const char *p = tmp.data;
        size_t n = tmp.len;
        clean.len = 0;
        if (tok->decode_kind == SF_DECODE_BYTE_LEVEL) {
            /* Each character back to its byte; a token with any character outside the
             * alphabet (an added token such as "<a b>") contributes its own UTF-8 bytes,
             * as tokenizers' ByteLevel decoder does. */
            bool all = sf_utf8_validate(p, n) == n;
            for (size_t i = 0; i < n && all;) {
                int cl;
                int b = sf_unicode_to_byte(sf_utf8_decode(p + i, &cl));
                if (b < 0) {
                    all = false;
                    break;
                }
                if (!sf_buf_push(&clean, (char)b)) st = oom();
                i += (size_t)cl;
            }
            if (!all) {
                clean.len = 0;
                if (!sf_buf_append(&clean, p, n)) st = oom();
            }
        } else {
            int bv = tok->dec_byte_fallback ? parse_byte_token(p, n) : -1;
            if (bv >= 0) {
                tok->byte_value[id] = (int16_t)bv;
                continue;
            }
            /* Text tokens: the replacement, then made valid UTF-8 (a GGUF file may carry
             * anything) so that decoding only ever has to worry about byte runs. */
            sf_buf rep = {0};
            bool ok = true;
            if (from_len > 0) {
                for (size_t i = 0; i < n && ok;) {
                    if (n - i >= from_len && memcmp(p + i, tok->dec_replace_from, from_len) == 0) {
                        ok = sf_buf_append(&rep, tok->dec_replace_to, to_len);
                        i += from_len;
                    } else {
                        ok = sf_buf_push(&rep, p[i]);
                        i++;
                    }
                }
            } else {
                ok = sf_buf_append(&rep, p, n);
            }
            if (ok) ok = sf_utf8_append_lossy(&clean, rep.data ? rep.data : "", rep.len, true, NULL);
            sf_buf_free(&rep);
            if (!ok) st = oom();
        }
        if (st != SF_OK) break;
        uint32_t off = 0;
        st = sf_tok_intern(tok, clean.data ? clean.data : "", clean.len, &off);
        tok->dec_off[id] = off;
        tok->dec_len[id] = (uint32_t)clean.len;
    }
    sf_buf_free(&tmp);
    sf_buf_free(&clean);
    free(norm_of);
    return st;
}

sf_status sf_tok_finish(sf_tokenizer *tok) {
    sf_status st = SF_OK;
    sf_buf norm = {0}, scratch = {0};
    for (int32_t i = 0; i < tok->n_added && st == SF_OK; i++) {
        int32_t id = tok->added[i].id;
        const char *s = tok->arena.data + tok->piece_off[id];
        size_t n = tok->piece_len[id];
        if (tok->added[i].normalized) {
            /* Matched in normalized text, so its own text is normalized first (as tokenizers
             * does): with a Prepend normalizer "hello" is looked for as "▁hello". */
            if (!sf_normalize_into(tok, s, n, &norm, &scratch)) {
                st = oom();
                break;
            }
            s = norm.data;
            n = norm.len;
            st = sf_tok_intern(tok, norm.data ? norm.data : "", norm.len, &tok->added[i].norm_off);
            if (st != SF_OK) break;
            tok->added[i].norm_len = (uint32_t)norm.len;
        }
        if (n == 0) continue; /* an empty added token can never match */
        st = trie_insert(tok->added[i].normalized ? &tok->trie_norm : &tok->trie_raw, s, n, i);
    }
    sf_buf_free(&norm);
    sf_buf_free(&scratch);
    if (st != SF_OK) return st;
    char tmp[8];
    for (int b = 0; b < 256; b++) {
        int n = sf_utf8_encode(sf_byte_to_unicode((unsigned char)b), tmp);
        tok->byte_ids[b] = sf_strmap_find(&tok->vocab, tok->arena.data, tmp, (size_t)n);
        snprintf(tmp, sizeof tmp, "<0x%02X>", b);
        tok->fallback_ids[b] = sf_strmap_find(&tok->vocab, tok->arena.data, tmp, 6);
        if (b < 128) {
            tmp[0] = (char)b;
            tok->ascii_ids[b] = sf_strmap_find(&tok->vocab, tok->arena.data, tmp, 1);
        }
    }
    /* A byte-level vocabulary may lack some bytes' symbols (SmolLM2 has no token for most
     * control characters): like tokenizers, BPE then maps such a byte to the unknown token,
     * or drops it when there is none. A vocabulary without a single one is no byte-level
     * vocabulary at all. */
    if (tok->family == SF_FAMILY_BYTE_LEVEL) {
        int have = 0;
        for (int b = 0; b < 256; b++) have += tok->byte_ids[b] >= 0;
        if (have == 0) {
            return sf_fail(SF_ERR_FORMAT,
                           "%s: a ByteLevel pre-tokenizer, but no byte symbols in the vocabulary",
                           tok->source);
        }
    }
    tok->split_at_metaspace = false;
    if (tok->family == SF_FAMILY_SENTENCEPIECE && !tok->ignore_merges &&
        sf_strmap_find(&tok->vocab, tok->arena.data, "\xE2\x96\x81", 3) >= 0) {
        bool crossing = false;
        for (size_t i = 0; i <= tok->vocab.mask && !crossing; i++) {
            const sf_strmap_slot *sl = &tok->vocab.slots[i];
            if (sl->value < 0) continue;
            const char *p = tok->arena.data + sl->off;
            for (uint32_t k = 1; k + 3 <= sl->len; k++) {
                if (memcmp(p + k, "\xE2\x96\x81", 3) == 0 &&
                    !(k >= 3 && memcmp(p + k - 3, "\xE2\x96\x81", 3) == 0)) {
                    crossing = true;
                    break;
                }
            }
        }
        tok->split_at_metaspace = !crossing;
    }
    if (tok->bos_id >= tok->n_ids || tok->eos_id >= tok->n_ids) {
        return sf_fail(SF_ERR_FORMAT, "%s: BOS %d or EOS %d is outside the vocabulary (%d)",
                       tok->source, (int)tok->bos_id, (int)tok->eos_id, (int)tok->n_ids);
    }
    return build_decode_strings(tok);
}

void sf_tokenizer_free(sf_tokenizer *tok) {
    if (!tok) return;
    free(tok->source);
    free(tok->piece_off);
    free(tok->piece_len);
    free(tok->flags);
    sf_buf_free(&tok->arena);
    sf_strmap_free(&tok->vocab);
    sf_pairmap_free(&tok->merges);
    free(tok->added);
    free(tok->trie_raw.nodes);
    free(tok->trie_norm.nodes);
    for (int32_t i = 0; i < tok->n_norm; i++) {
        free(tok->norm[i].pattern);
        free(tok->norm[i].content);
    }
    free(tok->norm);
    for (int32_t i = 0; i < tok->n_pretok; i++) {
        if (tok->pretok[i].re) pcre2_code_free(tok->pretok[i].re);
        free(tok->pretok[i].literal);
    }
    free(tok->pretok);
    free(tok->dec_off);
    free(tok->dec_len);
    free(tok->byte_value);
    free(tok->dec_replace_from);
    free(tok->dec_replace_to);
    free(tok->chat_template);
    free(tok);
}

/* ------------------------------------------------------------------------------------------ */
/* Loading                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    if (m > n) return false;
    for (size_t i = 0; i < m; i++) {
        char a = s[n - m + i], b = suffix[i];
        if (a >= 'A' && a <= 'Z') a = (char)(a - 'A' + 'a');
        if (a != b) return false;
    }
    return true;
}

sf_status sf_tokenizer_load(const char *path, sf_tokenizer **out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_tokenizer_load: out is NULL");
    *out = NULL;
    if (!path) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_tokenizer_load: path is NULL");
    if (ends_with(path, ".gguf")) return sf_tokenizer_load_gguf(path, out);
    struct stat sb;
    if (stat(path, &sb) != 0) {
        return sf_fail(SF_ERR_IO, "%s: no such file or directory", path);
    }
    if (S_ISDIR(sb.st_mode)) {
        size_t n = strlen(path);
        char *json = malloc(n + sizeof "/tokenizer.json");
        if (!json) return oom();
        memcpy(json, path, n);
        memcpy(json + n, "/tokenizer.json", sizeof "/tokenizer.json");
        sf_status st = sf_tokenizer_load_json(json, path, out);
        free(json);
        return st;
    }
    /* A tokenizer.json given directly: its config, if any, sits in the same directory. */
    char *dir = malloc(strlen(path) + 2);
    if (!dir) return oom();
    strcpy(dir, path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        if (dir[0] == '\0') strcpy(dir, "/");
    } else {
        strcpy(dir, ".");
    }
    sf_status st = sf_tokenizer_load_json(path, dir, out);
    free(dir);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Queries                                                                                     */
/* ------------------------------------------------------------------------------------------ */

int32_t sf_tokenizer_vocab_size(const sf_tokenizer *tok) { return tok ? tok->n_ids : 0; }
int32_t sf_tokenizer_bos_id(const sf_tokenizer *tok) { return tok ? tok->bos_id : -1; }
int32_t sf_tokenizer_eos_id(const sf_tokenizer *tok) { return tok ? tok->eos_id : -1; }
bool sf_tokenizer_adds_bos(const sf_tokenizer *tok) { return tok && tok->add_bos && tok->bos_id >= 0; }
const char *sf_tokenizer_chat_template(const sf_tokenizer *tok) {
    return tok ? tok->chat_template : NULL;
}

int32_t sf_tokenizer_token_id(const sf_tokenizer *tok, const char *piece) {
    if (!tok || !piece) return -1;
    size_t n = strlen(piece);
    /* Added tokens first: like tokenizers' token_to_id, their ids win over the model's. (The
     * normalized trie holds normalized texts, so those are compared directly.) */
    int32_t a = trie_exact(&tok->trie_raw, piece, n);
    if (a >= 0) return tok->added[a].id;
    for (int32_t i = 0; i < tok->n_added; i++) {
        int32_t id = tok->added[i].id;
        if (tok->added[i].normalized && tok->piece_len[id] == n &&
            memcmp(tok->arena.data + tok->piece_off[id], piece, n) == 0) {
            return id;
        }
    }
    return sf_strmap_find(&tok->vocab, tok->arena.data, piece, n);
}

bool sf_tokenizer_is_special(const sf_tokenizer *tok, int32_t id) {
    return tok && id >= 0 && id < tok->n_ids && (tok->flags[id] & SF_TOKF_SPECIAL);
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Rust's char::is_whitespace (the Unicode White_Space property), which tokenizers uses for an
 * added token's lstrip and rstrip. */
static bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* For single_word: whether the character is part of a word. ASCII letters, digits and '_'
 * are; every non-ASCII character is counted as a letter, which is right for the scripts that
 * need the flag (none of the supported files sets it). */
static bool is_word_char(uint32_t c) {
    return c >= 0x80 || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
           (c >= 'A' && c <= 'Z') || c == '_';
}

static size_t prev_char(const char *s, size_t i) {
    do {
        i--;
    } while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80);
    return i;
}

typedef sf_status (*segment_fn)(sf_encode_ctx *ctx, const char *text, size_t len, bool first);

/* Finds the added tokens of trie in text, calling on_text for the text between them and
 * emitting the tokens' ids, with tokenizers' matching rules: scan for the leftmost match, take
 * the longest there, and continue after it. A special token met while parse_special is off,
 * or a single_word token inside a word, stays text, and its match still consumes its span (so
 * a shorter token inside it cannot match instead), as in tokenizers. */
static sf_status split_added(sf_encode_ctx *ctx, const sf_trie *trie, const char *text,
                             size_t len, bool first, segment_fn on_text) {
    const sf_tokenizer *tok = ctx->tok;
    size_t seg = 0, i = 0;
    sf_status st;
    while (i < len && trie->nodes) {
        if (trie->root_child[(unsigned char)text[i]] < 0) {
            i++;
            continue;
        }
        size_t end = i;
        int32_t a = trie_longest(trie, text, len, i, &end);
        if (a < 0) {
            i++;
            continue;
        }
        const sf_added_token *at = &tok->added[a];
        if (at->special && !ctx->parse_special) {
            i = end;
            continue;
        }
        if (at->single_word) {
            int cl;
            bool before = i > 0 && is_word_char(sf_utf8_decode(text + prev_char(text, i), &cl));
            bool after = end < len && is_word_char(sf_utf8_decode(text + end, &cl));
            if (before || after) {
                i = end;
                continue;
            }
        }
        size_t s = i, e = end;
        if (at->lstrip) {
            /* Absorb the whitespace before the token, but not text an earlier match took. */
            while (s > seg) {
                size_t p = prev_char(text, s);
                int cl;
                if (!is_white_space(sf_utf8_decode(text + p, &cl))) break;
                s = p;
            }
        }
        if (at->rstrip) {
            while (e < len) {
                int cl;
                if (!is_white_space(sf_utf8_decode(text + e, &cl))) break;
                e += (size_t)cl;
            }
        }
        if (s > seg) {
            st = on_text(ctx, text + seg, s - seg, first && seg == 0);
            if (st != SF_OK) return st;
        }
        if (!sf_ids_push(&ctx->out, at->id)) return oom();
        seg = i = e;
    }
    if (seg < len) return on_text(ctx, text + seg, len - seg, first && seg == 0);
    return SF_OK;
}

/* A segment between raw added tokens: normalize it, find the normalized added tokens, and
 * encode the rest. */
static sf_status encode_segment(sf_encode_ctx *ctx, const char *text, size_t len, bool first) {
    const sf_tokenizer *tok = ctx->tok;
    const char *norm = text;
    size_t norm_len = len;
    if (tok->n_norm > 0) {
        sf_status st = sf_normalize(ctx, text, len, first);
        if (st != SF_OK) return st;
        norm = ctx->norm.data;
        norm_len = ctx->norm.len;
    }
    if (tok->trie_norm.nodes) {
        return split_added(ctx, &tok->trie_norm, norm, norm_len, first, sf_pretokenize_and_encode);
    }
    return sf_pretokenize_and_encode(ctx, norm, norm_len, first);
}

sf_status sf_tokenizer_encode(const sf_tokenizer *tok, const char *text, size_t len,
                              bool add_bos, bool parse_special, int32_t *ids, int32_t capacity,
                              int32_t *n_ids) {
    if (n_ids) *n_ids = 0;
    if (!tok || !n_ids || (!text && len > 0) || capacity < 0 || (!ids && capacity > 0)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_tokenizer_encode: NULL tokenizer, text, ids or n_ids, or negative "
                       "capacity");
    }
    if (!text) text = "";
    size_t bad = sf_utf8_validate(text, len);
    if (bad != len) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_tokenizer_encode: invalid UTF-8 at byte offset %zu (byte 0x%02X)", bad,
                       (unsigned)(unsigned char)text[bad]);
    }
    sf_encode_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.tok = tok;
    ctx.parse_special = parse_special;
    sf_status st = SF_OK;
    ctx.md = pcre2_match_data_create(1, NULL);
    if (!ctx.md) st = oom();
    if (st == SF_OK && add_bos && tok->bos_id >= 0 && !sf_ids_push(&ctx.out, tok->bos_id)) {
        st = oom();
    }
    if (st == SF_OK) {
        if (tok->trie_raw.nodes) {
            st = split_added(&ctx, &tok->trie_raw, text, len, true, encode_segment);
        } else {
            st = encode_segment(&ctx, text, len, true);
        }
    }
    if (st == SF_OK && ctx.out.len > (size_t)INT32_MAX) {
        st = sf_fail(SF_ERR_OUT_OF_RANGE, "sf_tokenizer_encode: more than 2^31 ids");
    }
    if (st == SF_OK) {
        *n_ids = (int32_t)ctx.out.len;
        size_t k = ctx.out.len < (size_t)capacity ? ctx.out.len : (size_t)capacity;
        if (k > 0) memcpy(ids, ctx.out.data, k * sizeof(int32_t));
        if (ctx.out.len > (size_t)capacity) {
            st = sf_fail(SF_ERR_OUT_OF_RANGE,
                         "sf_tokenizer_encode: the text needs %zu ids, capacity is %d",
                         ctx.out.len, (int)capacity);
        }
    }
    sf_encode_ctx_free(&ctx);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static const char k_fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* transformers decodes by mapping ids to tokens (dropping special ones when asked), then
 * running the file's decoder over the token list:
 *  - ByteLevel: every token's characters back to bytes, all concatenated, then
 *    from_utf8_lossy over the whole;
 *  - Replace/ByteFallback/Fuse/Strip: the replacement on each token; each run of consecutive
 *    <0xNN> tokens becomes its bytes if they are valid UTF-8, else one U+FFFD per token; all
 *    fused; then up to strip_leading leading spaces removed.
 * Ids without a token (gaps in a vocabulary) are skipped, as tokenizers does. */
static sf_status decode_into(const sf_tokenizer *tok, const int32_t *ids, int32_t n,
                             bool skip_special, sf_buf *out) {
    sf_buf raw = {0};
    size_t run_tokens = 0;
    sf_status st = SF_OK;
    for (int32_t k = 0; k < n; k++) {
        int32_t id = ids[k];
        if (id < 0 || id >= tok->n_ids) {
            st = sf_fail(SF_ERR_INVALID_ARGUMENT,
                         "sf_tokenizer_decode: id %d at position %d is outside the vocabulary "
                         "(%d)",
                         (int)id, (int)k, (int)tok->n_ids);
            break;
        }
        if (!(tok->flags[id] & SF_TOKF_PRESENT)) continue;
        if (skip_special && (tok->flags[id] & SF_TOKF_SPECIAL)) continue;
        const char *d = tok->arena.data + tok->dec_off[id];
        if (tok->decode_kind == SF_DECODE_BYTE_LEVEL) {
            if (!sf_buf_append(&raw, d, tok->dec_len[id])) st = oom();
        } else if (tok->byte_value[id] >= 0) {
            if (!sf_buf_push(&raw, (char)tok->byte_value[id])) st = oom();
            run_tokens++;
        } else {
            if (run_tokens > 0) {
                bool ok = true;
                if (sf_utf8_validate(raw.data, raw.len) == raw.len) {
                    ok = sf_buf_append(out, raw.data, raw.len);
                } else {
                    for (size_t r = 0; r < run_tokens && ok; r++) ok = sf_buf_append(out, k_fffd, 3);
                }
                raw.len = 0;
                run_tokens = 0;
                if (!ok) st = oom();
            }
            if (st == SF_OK && !sf_buf_append(out, d, tok->dec_len[id])) st = oom();
        }
        if (st != SF_OK) break;
    }
    if (st == SF_OK) {
        if (tok->decode_kind == SF_DECODE_BYTE_LEVEL) {
            if (!sf_utf8_append_lossy(out, raw.data ? raw.data : "", raw.len, true, NULL)) st = oom();
        } else if (run_tokens > 0) {
            bool ok = true;
            if (sf_utf8_validate(raw.data, raw.len) == raw.len) {
                ok = sf_buf_append(out, raw.data, raw.len);
            } else {
                for (size_t r = 0; r < run_tokens && ok; r++) ok = sf_buf_append(out, k_fffd, 3);
            }
            if (!ok) st = oom();
        }
    }
    if (st == SF_OK && tok->decode_kind == SF_DECODE_PIECES) {
        size_t strip = 0;
        while (strip < (size_t)tok->strip_leading && strip < out->len && out->data[strip] == ' ') {
            strip++;
        }
        if (strip > 0) {
            memmove(out->data, out->data + strip, out->len - strip);
            out->len -= strip;
        }
    }
    sf_buf_free(&raw);
    return st;
}

/* Copies text into a caller's buffer of cap bytes with a NUL, or reports the size needed. */
static sf_status deliver(const char *what, const char *text, size_t n, char *out, size_t cap,
                         size_t *len) {
    *len = n;
    if (n >= cap) {
        if (out && cap > 0) out[0] = '\0';
        return sf_fail(SF_ERR_OUT_OF_RANGE, "%s: %zu bytes do not fit in a %zu-byte buffer", what,
                       n + 1, cap);
    }
    if (n > 0) memcpy(out, text, n);
    out[n] = '\0';
    return SF_OK;
}

sf_status sf_tokenizer_decode(const sf_tokenizer *tok, const int32_t *ids, int32_t n,
                              bool skip_special, char *out, size_t cap, size_t *len) {
    if (len) *len = 0;
    if (!tok || !len || n < 0 || (!ids && n > 0) || (!out && cap > 0)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_tokenizer_decode: NULL tokenizer, ids, out or len, or negative count");
    }
    sf_buf text = {0};
    sf_status st = decode_into(tok, ids, n, skip_special, &text);
    if (st == SF_OK) st = deliver("sf_tokenizer_decode", text.data, text.len, out, cap, len);
    sf_buf_free(&text);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Streaming                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* The detokenizer holds the bytes of a character that is not complete yet (at most 3), and
 * emits everything before them. Byte-level decoding is the lossy UTF-8 decode of one long
 * byte stream, and the maximal-subpart rule decides each replacement from bytes already seen,
 * so emitting eagerly gives exactly the full decode. Pieces decoding differs only for byte
 * runs that are not valid UTF-8 (transformers replaces such a run token by token, which needs
 * the whole run): here valid characters are emitted as soon as they complete and only the
 * broken bytes are replaced; on well-formed output the two agree. */
struct sf_detokenizer {
    const sf_tokenizer *tok;
    bool skip_special;
    char pending[4];
    size_t n_pending;
    int32_t strip_left; /* pieces: leading spaces still to strip from the output's start */
    bool started;       /* pieces: something has been emitted */
    sf_buf in, out;     /* scratch */
};

sf_status sf_detokenizer_create(const sf_tokenizer *tok, bool skip_special, sf_detokenizer **out) {
    if (!out) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_detokenizer_create: out is NULL");
    *out = NULL;
    if (!tok) return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_detokenizer_create: tok is NULL");
    sf_detokenizer *d = calloc(1, sizeof *d);
    if (!d) return oom();
    d->tok = tok;
    d->skip_special = skip_special;
    d->strip_left = tok->decode_kind == SF_DECODE_PIECES ? tok->strip_leading : 0;
    *out = d;
    return SF_OK;
}

void sf_detokenizer_free(sf_detokenizer *d) {
    if (!d) return;
    sf_buf_free(&d->in);
    sf_buf_free(&d->out);
    free(d);
}

/* Strips leading spaces from the start of the whole output (pieces decoding). Returns how
 * many bytes of d->out to drop, and what strip_left / started become. */
static size_t strip_count(const sf_detokenizer *d, int32_t *strip_left, bool *started) {
    size_t drop = 0;
    *strip_left = d->strip_left;
    *started = d->started;
    if (d->started) return 0;
    while (*strip_left > 0 && drop < d->out.len && d->out.data[drop] == ' ') {
        drop++;
        (*strip_left)--;
    }
    if (drop < d->out.len) {
        *started = true;
        *strip_left = 0;
    }
    return drop;
}

/* Commits the computed output: copies it (less the stripped spaces) or reports the size
 * needed without changing the state, so that a caller can retry with a larger buffer. */
static sf_status commit(sf_detokenizer *d, const char *what, const char *pending, size_t n_pending,
                        char *out, size_t cap, size_t *len) {
    int32_t strip_left;
    bool started;
    size_t drop = strip_count(d, &strip_left, &started);
    /* (out.data is NULL until something is appended: no arithmetic on it then) */
    const char *text = d->out.len ? d->out.data + drop : "";
    sf_status st = deliver(what, text, d->out.len - drop, out, cap, len);
    if (st != SF_OK) return st;
    if (n_pending > 0) memmove(d->pending, pending, n_pending);
    d->n_pending = n_pending;
    d->strip_left = strip_left;
    d->started = started;
    return SF_OK;
}

sf_status sf_detokenizer_push(sf_detokenizer *d, int32_t id, char *out, size_t cap, size_t *len) {
    if (len) *len = 0;
    if (!d || !len || (!out && cap > 0)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_detokenizer_push: NULL argument");
    }
    const sf_tokenizer *tok = d->tok;
    if (id < 0 || id >= tok->n_ids) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT,
                       "sf_detokenizer_push: id %d is outside the vocabulary (%d)", (int)id,
                       (int)tok->n_ids);
    }
    d->out.len = 0;
    d->in.len = 0;
    if (!(tok->flags[id] & SF_TOKF_PRESENT) || (d->skip_special && (tok->flags[id] & SF_TOKF_SPECIAL))) {
        return deliver("sf_detokenizer_push", "", 0, out, cap, len);
    }
    const char *dec = tok->arena.data + tok->dec_off[id];
    size_t consumed = 0;
    if (tok->decode_kind == SF_DECODE_BYTE_LEVEL || tok->byte_value[id] >= 0) {
        /* Bytes join the held ones; emit every complete (or hopelessly broken) character. */
        char b = tok->byte_value[id] >= 0 ? (char)tok->byte_value[id] : 0;
        bool ok = sf_buf_append(&d->in, d->pending, d->n_pending);
        if (tok->decode_kind == SF_DECODE_BYTE_LEVEL) {
            ok = ok && sf_buf_append(&d->in, dec, tok->dec_len[id]);
        } else {
            ok = ok && sf_buf_push(&d->in, b);
        }
        ok = ok && sf_utf8_append_lossy(&d->out, d->in.data, d->in.len, false, &consumed);
        if (!ok) return oom();
        return commit(d, "sf_detokenizer_push", d->in.data + consumed, d->in.len - consumed, out,
                      cap, len);
    }
    /* A text token ends a byte run: held bytes can no longer complete, and transformers
     * replaces each of them. */
    for (size_t r = 0; r < d->n_pending; r++) {
        if (!sf_buf_append(&d->out, k_fffd, 3)) return oom();
    }
    if (!sf_buf_append(&d->out, dec, tok->dec_len[id])) return oom();
    return commit(d, "sf_detokenizer_push", NULL, 0, out, cap, len);
}

sf_status sf_detokenizer_flush(sf_detokenizer *d, char *out, size_t cap, size_t *len) {
    if (len) *len = 0;
    if (!d || !len || (!out && cap > 0)) {
        return sf_fail(SF_ERR_INVALID_ARGUMENT, "sf_detokenizer_flush: NULL argument");
    }
    d->out.len = 0;
    if (d->n_pending > 0) {
        /* Byte-level: the lossy decode of an incomplete tail is one U+FFFD. Pieces: one per
         * held byte token, as transformers replaces a broken run. */
        size_t reps = d->tok->decode_kind == SF_DECODE_BYTE_LEVEL ? 1 : d->n_pending;
        for (size_t r = 0; r < reps; r++) {
            if (!sf_buf_append(&d->out, k_fffd, 3)) return oom();
        }
    }
    return commit(d, "sf_detokenizer_flush", NULL, 0, out, cap, len);
}
