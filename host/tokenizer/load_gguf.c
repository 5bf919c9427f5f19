/* Loading a tokenizer from a GGUF file's tokenizer.ggml.* metadata.
 *
 * Two models: "gpt2" (byte-level BPE: tokens, merges, and a pre-tokenizer named by
 * tokenizer.ggml.pre) and "llama" (SentencePiece: tokens with scores, no merges). A GGUF file
 * carries no normalizer, pre-tokenizer regex or decoder, so each is reconstructed from the
 * model name and `pre` the way llama.cpp interprets them, mapped onto the same engine that
 * runs tokenizer.json files:
 *   - the known `pre` names become their regex splits; an unknown name is refused, since a
 *     wrong regex would silently change token boundaries;
 *   - SentencePiece's merge order (merge the adjacent pair whose joined text is the
 *     highest-scoring token, leftmost first) becomes a BPE merge table in which each way of
 *     splitting a token into two tokens is a merge ranked by that token's score.
 * Token types: CONTROL and UNKNOWN tokens are special added tokens, USER_DEFINED ones are
 * added tokens matched even without parse_special (as llama.cpp does). */
#include "tokenizer/tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "io/gguf.h"

/* llama.cpp's token types. */
enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER_DEFINED = 4, TT_UNUSED = 5, TT_BYTE = 6 };

static sf_status oom(void) { return sf_fail(SF_ERR_OUT_OF_MEMORY, "tokenizer: out of memory"); }

/* An array metadata value of the given element type and length n (n = 0: any length). */
static sf_status get_array(const sf_gguf *g, const char *key, sf_gguf_type elem, uint64_t n,
                           bool required, const sf_gguf_kv **out) {
    const sf_gguf_kv *kv = sf_gguf_find(g, key);
    *out = NULL;
    if (!kv) {
        if (!required) return SF_OK;
        return sf_fail(SF_ERR_NOT_FOUND, "%s: no %s", sf_gguf_path(g), key);
    }
    if (kv->type != SF_GGUF_ARRAY || kv->v.arr.type != elem) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s has the wrong type", sf_gguf_path(g), key);
    }
    if (n > 0 && kv->v.arr.n != n) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s has %llu entries, the vocabulary %llu",
                       sf_gguf_path(g), key, (unsigned long long)kv->v.arr.n,
                       (unsigned long long)n);
    }
    if (elem == SF_GGUF_STRING && kv->v.arr.n > 0 && !kv->v.arr.strings) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s has no strings", sf_gguf_path(g), key);
    }
    *out = kv;
    return SF_OK;
}

/* An optional integer that must name a token; -1 when absent. */
static sf_status get_token_id(const sf_gguf *g, const char *key, int32_t n_ids, int32_t *out) {
    int64_t v;
    *out = -1;
    sf_status st = sf_gguf_get_int(g, key, &v);
    if (st == SF_ERR_NOT_FOUND) return SF_OK;
    if (st != SF_OK) return st;
    if (v < 0 || v >= n_ids) {
        return sf_fail(SF_ERR_FORMAT, "%s: %s = %lld is outside the vocabulary (%d)",
                       sf_gguf_path(g), key, (long long)v, (int)n_ids);
    }
    *out = (int32_t)v;
    return SF_OK;
}

static sf_status get_bool_default(const sf_gguf *g, const char *key, bool dflt, bool *out) {
    *out = dflt;
    sf_status st = sf_gguf_get_bool(g, key, out);
    if (st == SF_ERR_NOT_FOUND) {
        *out = dflt;
        return SF_OK;
    }
    return st;
}

static sf_status add_split(sf_tokenizer *tok, const char *pattern) {
    sf_pretok_step step;
    memset(&step, 0, sizeof step);
    step.kind = SF_PRETOK_SPLIT;
    step.behavior = SF_SPLIT_ISOLATED;
    sf_status st = sf_regex_compile(pattern, strlen(pattern), tok->source, &step.re);
    if (st != SF_OK) return st;
    sf_pretok_step *p = realloc(tok->pretok, ((size_t)tok->n_pretok + 1) * sizeof *p);
    if (!p) {
        pcre2_code_free(step.re);
        return oom();
    }
    tok->pretok = p;
    tok->pretok[tok->n_pretok++] = step;
    return SF_OK;
}

/* The pre-tokenizer llama.cpp runs for a `pre` name, for the names of the supported families.
 * "default" and "gpt2" are what tokenizers' ByteLevel(use_regex) does. */
static sf_status set_pre(sf_tokenizer *tok, const char *pre, size_t len) {
#define IS(name) (len == sizeof(name) - 1 && memcmp(pre, name, len) == 0)
    if (IS("default") || IS("gpt2")) return add_split(tok, sf_regex_gpt2);
    if (IS("llama-bpe") || IS("llama3")) {
        /* llama.cpp also takes a piece that is a whole token as is, like tokenizer.json's
         * ignore_merges for Llama-3. */
        tok->ignore_merges = true;
        return add_split(tok, sf_regex_llama3);
    }
    if (IS("qwen2")) return add_split(tok, sf_regex_qwen2);
    if (IS("smollm")) {
        /* SmolLM's tokenizer.json: Digits(individual_digits) then ByteLevel. */
        sf_status st = add_split(tok, "\\p{N}");
        return st != SF_OK ? st : add_split(tok, sf_regex_gpt2);
    }
#undef IS
    return sf_fail(SF_ERR_UNSUPPORTED,
                   "%s: tokenizer.ggml.pre \"%.*s\" is not supported (default, gpt2, llama-bpe, "
                   "qwen2 and smollm are)",
                   tok->source, (int)(len > 100 ? 100 : len), pre);
}

static sf_status add_norm(sf_tokenizer *tok, sf_norm_kind kind, const char *pattern,
                          const char *content) {
    sf_norm_step step;
    memset(&step, 0, sizeof step);
    step.kind = kind;
    step.content_len = strlen(content);
    step.content = malloc(step.content_len + 1);
    if (pattern) {
        step.pattern_len = strlen(pattern);
        step.pattern = malloc(step.pattern_len + 1);
    }
    sf_norm_step *p = realloc(tok->norm, ((size_t)tok->n_norm + 1) * sizeof *p);
    if (p) tok->norm = p;
    if (!p || !step.content || (pattern && !step.pattern)) {
        free(step.content);
        free(step.pattern);
        return oom();
    }
    memcpy(step.content, content, step.content_len + 1);
    if (pattern) memcpy(step.pattern, pattern, step.pattern_len + 1);
    tok->norm[tok->n_norm++] = step;
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* SentencePiece scores -> merges                                                              */
/* ------------------------------------------------------------------------------------------ */

typedef struct scored {
    float score;
    int32_t id;
} scored;

static int by_score_desc(const void *a, const void *b) {
    const scored *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static sf_status build_spm_merges(sf_tokenizer *tok, const float *scores, const int32_t *types) {
    int32_t n = tok->n_ids;
    scored *order = malloc((size_t)n * sizeof *order);
    int32_t *rank = malloc((size_t)n * sizeof *rank);
    if (!order || !rank || !sf_pairmap_init(&tok->merges, (size_t)n * 4)) {
        free(order);
        free(rank);
        return oom();
    }
    for (int32_t i = 0; i < n; i++) {
        /* NaN would break the sort's ordering; treat it as the lowest score. */
        float s = scores[i];
        order[i] = (scored){s == s ? s : -3.0e38f, i};
    }
    qsort(order, (size_t)n, sizeof *order, by_score_desc);
    /* Equal scores share a rank, so that the leftmost pair wins between them, as in
     * SentencePiece. */
    int32_t r = 0;
    for (int32_t i = 0; i < n; i++) {
        if (i > 0 && order[i].score != order[i - 1].score) r++;
        rank[order[i].id] = r;
    }
    free(order);
    sf_status st = SF_OK;
    for (int32_t id = 0; id < n && st == SF_OK; id++) {
        if (types && types[id] != TT_NORMAL) continue;
        const char *p = tok->arena.data + tok->piece_off[id];
        uint32_t len = tok->piece_len[id];
        if (len < 2) continue; /* nothing to split */
        /* Every split into two tokens at a character boundary is a way to build this one. */
        for (uint32_t k = (uint32_t)sf_utf8_seq_len((unsigned char)p[0]); k < len;
             k += (uint32_t)sf_utf8_seq_len((unsigned char)p[k])) {
            int32_t a = sf_strmap_find(&tok->vocab, tok->arena.data, p, k);
            if (a < 0) continue;
            int32_t b = sf_strmap_find(&tok->vocab, tok->arena.data, p + k, len - k);
            if (b < 0) continue;
            if (!sf_pairmap_put(&tok->merges, a, b, rank[id], id)) {
                st = oom();
                break;
            }
        }
    }
    free(rank);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Entry                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static sf_status load(sf_tokenizer *tok, const sf_gguf *g) {
    const char *path = sf_gguf_path(g);
    sf_gguf_string model;
    sf_status st = sf_gguf_get_string(g, "tokenizer.ggml.model", &model);
    if (st != SF_OK) return st;
    bool is_gpt2 = model.len == 4 && memcmp(model.data, "gpt2", 4) == 0;
    bool is_llama = model.len == 5 && memcmp(model.data, "llama", 5) == 0;
    if (!is_gpt2 && !is_llama) {
        return sf_fail(SF_ERR_UNSUPPORTED,
                       "%s: tokenizer.ggml.model \"%.*s\" is not supported (gpt2 and llama are)",
                       path, (int)(model.len > 100 ? 100 : model.len), model.data);
    }

    const sf_gguf_kv *tokens, *types_kv, *scores_kv, *merges_kv;
    st = get_array(g, "tokenizer.ggml.tokens", SF_GGUF_STRING, 0, true, &tokens);
    if (st != SF_OK) return st;
    if (tokens->v.arr.n == 0 || tokens->v.arr.n > SF_TOK_MAX_VOCAB) {
        return sf_fail(SF_ERR_FORMAT, "%s: tokenizer.ggml.tokens has %llu entries", path,
                       (unsigned long long)tokens->v.arr.n);
    }
    int32_t n = (int32_t)tokens->v.arr.n;
    st = get_array(g, "tokenizer.ggml.token_type", SF_GGUF_INT32, (uint64_t)n, false, &types_kv);
    if (st == SF_OK) {
        st = get_array(g, "tokenizer.ggml.scores", SF_GGUF_FLOAT32, (uint64_t)n, is_llama,
                       &scores_kv);
    }
    if (st == SF_OK) {
        st = get_array(g, "tokenizer.ggml.merges", SF_GGUF_STRING, 0, is_gpt2, &merges_kv);
    }
    if (st != SF_OK) return st;

    st = sf_tok_alloc_ids(tok, n);
    if (st != SF_OK) return st;
    /* Numeric arrays point into the map with no alignment promise: copy them out. */
    int32_t *types = NULL;
    float *scores = NULL;
    if (types_kv) {
        types = malloc((size_t)n * sizeof *types);
        if (!types) return oom();
        memcpy(types, types_kv->v.arr.data, (size_t)n * sizeof *types);
    }
    if (scores_kv) {
        scores = malloc((size_t)n * sizeof *scores);
        if (!scores) {
            free(types);
            return oom();
        }
        memcpy(scores, scores_kv->v.arr.data, (size_t)n * sizeof *scores);
    }
    if (!sf_strmap_init(&tok->vocab, (size_t)n)) st = oom();
    for (int32_t id = 0; id < n && st == SF_OK; id++) {
        const sf_gguf_string *s = &tokens->v.arr.strings[id];
        if (s->len > UINT32_MAX || sf_utf8_validate(s->data, (size_t)s->len) != s->len) {
            st = sf_fail(SF_ERR_FORMAT, "%s: token %d is not valid UTF-8", path, (int)id);
            break;
        }
        st = sf_tok_set_piece(tok, id, s->data, (size_t)s->len);
        if (st != SF_OK) break;
        /* Some converters pad vocabularies with empty strings: such an id decodes to nothing
         * and can never be produced. */
        if (s->len == 0) continue;
        int32_t t = types ? types[id] : TT_NORMAL;
        if (t == TT_CONTROL || t == TT_UNKNOWN || t == TT_USER_DEFINED) {
            sf_added_token at = {id, t != TT_USER_DEFINED, false, false, false, false, 0, 0};
            st = sf_tok_add_token(tok, &at);
        }
        /* Every token but the unused ones can be looked up by text (as in tokenizer.json,
         * whose vocab lists special tokens too); merges only ever build NORMAL ones. */
        if (st == SF_OK && t != TT_UNUSED &&
            !sf_strmap_put(&tok->vocab, tok->arena.data, tok->piece_off[id], (uint32_t)s->len, id, NULL)) {
            st = oom();
        }
    }

    if (st == SF_OK && is_gpt2) {
        tok->family = SF_FAMILY_BYTE_LEVEL;
        tok->decode_kind = SF_DECODE_BYTE_LEVEL;
        uint64_t nm = merges_kv->v.arr.n;
        if (nm > (uint64_t)INT32_MAX) st = sf_fail(SF_ERR_FORMAT, "%s: too many merges", path);
        if (st == SF_OK && !sf_pairmap_init(&tok->merges, (size_t)nm)) st = oom();
        sf_buf cat = {0};
        for (uint64_t i = 0; i < nm && st == SF_OK; i++) {
            const sf_gguf_string *m = &merges_kv->v.arr.strings[i];
            const char *sp = m->len > 0 ? memchr(m->data, ' ', (size_t)m->len) : NULL;
            if (!sp || memchr(sp + 1, ' ', (size_t)m->len - (size_t)(sp - m->data) - 1)) {
                st = sf_fail(SF_ERR_FORMAT, "%s: merge %llu is not two tokens and a space", path,
                             (unsigned long long)i);
                break;
            }
            size_t alen = (size_t)(sp - m->data), blen = (size_t)m->len - alen - 1;
            int32_t a = sf_strmap_find(&tok->vocab, tok->arena.data, m->data, alen);
            int32_t b = sf_strmap_find(&tok->vocab, tok->arena.data, sp + 1, blen);
            cat.len = 0;
            if (!sf_buf_append(&cat, m->data, alen) || !sf_buf_append(&cat, sp + 1, blen)) {
                st = oom();
                break;
            }
            int32_t c = sf_strmap_find(&tok->vocab, tok->arena.data, cat.data, cat.len);
            if (a < 0 || b < 0 || c < 0) {
                st = sf_fail(SF_ERR_FORMAT, "%s: merge %llu refers to a token not in the vocabulary",
                             path, (unsigned long long)i);
                break;
            }
            if (!sf_pairmap_put(&tok->merges, a, b, (int32_t)i, c)) st = oom();
        }
        sf_buf_free(&cat);
        sf_gguf_string pre = {"default", 7};
        if (st == SF_OK) {
            st = sf_gguf_get_string(g, "tokenizer.ggml.pre", &pre);
            if (st == SF_ERR_NOT_FOUND) {
                pre = (sf_gguf_string){"default", 7};
                st = SF_OK;
            }
        }
        if (st == SF_OK) st = set_pre(tok, pre.data, (size_t)pre.len);
    } else if (st == SF_OK) {
        /* SentencePiece: a space prefix (unless the file turns it off), spaces as U+2581,
         * <0xNN> fallback, and a decoder that undoes both. */
        bool prefix;
        tok->family = SF_FAMILY_SENTENCEPIECE;
        tok->decode_kind = SF_DECODE_PIECES;
        st = get_bool_default(g, "tokenizer.ggml.add_space_prefix", true, &prefix);
        if (st == SF_OK && prefix) st = add_norm(tok, SF_NORM_PREPEND, NULL, "\xE2\x96\x81");
        if (st == SF_OK) st = add_norm(tok, SF_NORM_REPLACE, " ", "\xE2\x96\x81");
        if (st == SF_OK) {
            tok->dec_replace_from = malloc(4);
            tok->dec_replace_to = malloc(2);
            if (!tok->dec_replace_from || !tok->dec_replace_to) {
                st = oom();
            } else {
                memcpy(tok->dec_replace_from, "\xE2\x96\x81", 4);
                memcpy(tok->dec_replace_to, " ", 2);
            }
        }
        tok->dec_byte_fallback = true;
        tok->byte_fallback = true;
        tok->strip_leading = prefix ? 1 : 0;
        if (st == SF_OK) st = build_spm_merges(tok, scores, types);
        if (st == SF_OK) st = get_token_id(g, "tokenizer.ggml.unknown_token_id", n, &tok->unk_id);
        if (st == SF_OK && tok->unk_id < 0) {
            tok->unk_id = sf_strmap_find(&tok->vocab, tok->arena.data, "<unk>", 5);
        }
    }
    free(types);
    free(scores);
    if (st != SF_OK) return st;

    st = get_token_id(g, "tokenizer.ggml.bos_token_id", n, &tok->bos_id);
    if (st == SF_OK) st = get_token_id(g, "tokenizer.ggml.eos_token_id", n, &tok->eos_id);
    /* llama.cpp's defaults: SentencePiece models add BOS, byte-level ones do not. */
    if (st == SF_OK) st = get_bool_default(g, "tokenizer.ggml.add_bos_token", is_llama, &tok->add_bos);
    if (st != SF_OK) return st;
    sf_gguf_string tmpl;
    st = sf_gguf_get_string(g, "tokenizer.chat_template", &tmpl);
    if (st == SF_OK) {
        tok->chat_template = malloc((size_t)tmpl.len + 1);
        if (!tok->chat_template) return oom();
        memcpy(tok->chat_template, tmpl.data, (size_t)tmpl.len);
        tok->chat_template[tmpl.len] = '\0';
    } else if (st != SF_ERR_NOT_FOUND) {
        return st;
    }
    return sf_tok_finish(tok);
}

sf_status sf_tokenizer_load_gguf(const char *path, sf_tokenizer **out) {
    *out = NULL;
    sf_gguf *g = NULL;
    sf_status st = sf_gguf_open(path, &g);
    if (st != SF_OK) return st;
    sf_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) {
        sf_gguf_close(g);
        return oom();
    }
    tok->unk_id = tok->bos_id = tok->eos_id = -1;
    tok->source = malloc(strlen(path) + 1);
    if (!tok->source) {
        st = oom();
    } else {
        strcpy(tok->source, path);
        st = load(tok, g);
    }
    sf_gguf_close(g);
    if (st != SF_OK) {
        sf_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return SF_OK;
}
