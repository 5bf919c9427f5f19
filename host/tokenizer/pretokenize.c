/* Normalizers and pre-tokenizers: cutting a text segment into the pieces BPE runs on.
 *
 * The semantics are those of the tokenizers library for the step types these model families
 * declare. A segment starts as one span over the text; each step maps the list of spans to a
 * new one. Steps that only split keep pointing into the same buffer; steps that rewrite text
 * (a prefix space, Metaspace's space replacement) copy the spans into the other of two
 * buffers, so a pipeline of any length needs no more than two copies of the segment alive.
 * The byte-level alphabet is not materialised here: BPE maps each byte straight to its
 * symbol (see bpe.c), which is the same as mapping the text first. */
#include "tokenizer/tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* tokenizers' ByteLevel pre-tokenizer regex (GPT-2's). */
const char *const sf_regex_gpt2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
/* Llama-3's Split pattern (the tiktoken cl100k pattern). */
const char *const sf_regex_llama3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
/* Qwen2's: Llama-3's with single digits. */
const char *const sf_regex_qwen2 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

sf_status sf_regex_compile(const char *pattern, size_t len, const char *what, pcre2_code **out) {
    int err = 0;
    PCRE2_SIZE err_off = 0;
    /* UTF: the subject is UTF-8 and the pattern's classes are per character. UCP: \s, \d and
     * \w use Unicode properties, as Oniguruma's do on Unicode strings. */
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, len, PCRE2_UTF | PCRE2_UCP, &err,
                                   &err_off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return sf_fail(SF_ERR_UNSUPPORTED, "%s: regex does not compile at offset %zu: %s", what,
                       (size_t)err_off, (const char *)msg);
    }
    /* JIT is an optimisation: where it is unavailable the interpreter gives the same
     * matches, so a failure here is not an error. */
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    *out = re;
    return SF_OK;
}

bool sf_spans_push(sf_spans *s, size_t start, size_t end, bool first) {
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        if (cap > SIZE_MAX / sizeof(sf_span)) return false;
        sf_span *p = realloc(s->data, cap * sizeof(sf_span));
        if (!p) return false;
        s->data = p;
        s->cap = cap;
    }
    s->data[s->len++] = (sf_span){start, end, first};
    return true;
}

/* The first occurrence of needle (non-empty) in hay[0, n), or NULL; memchr finds candidate
 * first bytes quickly and keeps this portable (memmem is a GNU extension). */
static const char *find_bytes(const char *hay, size_t n, const char *needle, size_t m) {
    if (m == 0 || m > n) return NULL;
    const char *end = hay + (n - m) + 1;
    for (const char *p = hay; p < end;) {
        p = memchr(p, needle[0], (size_t)(end - p));
        if (!p) return NULL;
        if (memcmp(p, needle, m) == 0) return p;
        p++;
    }
    return NULL;
}

static sf_status oom(void) { return sf_fail(SF_ERR_OUT_OF_MEMORY, "tokenizer: out of memory"); }

/* ------------------------------------------------------------------------------------------ */
/* Normalizers                                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Replaces every non-overlapping occurrence of pattern in src, left to right, into dst. */
static bool replace_all(sf_buf *dst, const char *src, size_t n, const char *pattern,
                        size_t plen, const char *content, size_t clen) {
    dst->len = 0;
    size_t i = 0;
    while (i < n) {
        const char *hit = find_bytes(src + i, n - i, pattern, plen);
        if (!hit) break;
        size_t at = (size_t)(hit - src);
        if (!sf_buf_append(dst, src + i, at - i) || !sf_buf_append(dst, content, clen)) {
            return false;
        }
        i = at + plen;
    }
    return sf_buf_append(dst, src + i, n - i);
}

bool sf_normalize_into(const sf_tokenizer *tok, const char *text, size_t len, sf_buf *out,
                       sf_buf *tmp) {
    sf_buf *cur = out;
    cur->len = 0;
    if (!sf_buf_append(cur, text, len)) return false;
    for (int32_t s = 0; s < tok->n_norm; s++) {
        const sf_norm_step *st = &tok->norm[s];
        if (st->kind == SF_NORM_PREPEND) {
            /* tokenizers' Prepend leaves an empty string empty. */
            if (cur->len == 0) continue;
            tmp->len = 0;
            if (!sf_buf_append(tmp, st->content, st->content_len) ||
                !sf_buf_append(tmp, cur->data, cur->len)) {
                return false;
            }
        } else if (st->kind == SF_NORM_NFC) {
            tmp->len = 0;
            if (!sf_nfc_append(tmp, cur->data, cur->len)) return false;
        } else if (!replace_all(tmp, cur->data, cur->len, st->pattern, st->pattern_len,
                                st->content, st->content_len)) {
            return false;
        }
        /* The result is in tmp: swap the two buffers' storage. */
        sf_buf swap = *cur;
        *cur = *tmp;
        *tmp = swap;
    }
    return true;
}

sf_status sf_normalize(sf_encode_ctx *ctx, const char *text, size_t len, bool first) {
    (void)first; /* no supported normalizer depends on the position */
    if (!sf_normalize_into(ctx->tok, text, len, &ctx->norm, &ctx->bufs[0])) return oom();
    return SF_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Splitting                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* One segment of a span: a match of the split pattern or the gap before it. */
typedef struct seg {
    size_t start, end;
    bool match;
} seg;

typedef struct segs {
    seg *data;
    size_t len, cap;
} segs;

static bool segs_push(segs *s, size_t start, size_t end, bool match) {
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        seg *p = realloc(s->data, cap * sizeof(seg));
        if (!p) return false;
        s->data = p;
        s->cap = cap;
    }
    s->data[s->len++] = (seg){start, end, match};
    return true;
}

/* Finds the matches of the step's pattern in subject[0, n) as alternating gap and match
 * segments (empty gaps omitted, as tokenizers does). */
static sf_status find_matches(sf_encode_ctx *ctx, const sf_pretok_step *st, const char *subject,
                              size_t n, segs *out) {
    out->len = 0;
    size_t prev = 0, off = 0;
    while (off <= n) {
        size_t ms, me;
        if (st->re) {
            int rc = pcre2_match(st->re, (PCRE2_SPTR)subject, n, off, PCRE2_NO_UTF_CHECK,
                                 ctx->md, NULL);
            if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
                /* JIT backtracking ran out of its stack (a huge run of spaces can do it); the
                 * interpreter keeps its frames on the heap and gives the same answer. */
                rc = pcre2_match(st->re, (PCRE2_SPTR)subject, n, off,
                                 PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, ctx->md, NULL);
            }
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) {
                PCRE2_UCHAR msg[256];
                pcre2_get_error_message(rc, msg, sizeof msg);
                return sf_fail(SF_ERR_UNSUPPORTED, "tokenizer: pre-tokenizer regex failed: %s",
                               (const char *)msg);
            }
            const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(ctx->md);
            ms = ov[0];
            me = ov[1];
        } else {
            const char *hit = find_bytes(subject + off, n - off, st->literal, st->literal_len);
            if (!hit) break;
            ms = (size_t)(hit - subject);
            me = ms + st->literal_len;
        }
        if (ms > prev && !segs_push(out, prev, ms, false)) return oom();
        if (!segs_push(out, ms, me, true)) return oom();
        prev = me;
        /* An empty match still marks a boundary; step past one character so the search
         * moves on. */
        off = me > ms ? me : me + (me < n ? (size_t)sf_utf8_seq_len((unsigned char)subject[me]) : 1);
    }
    if (prev < n && !segs_push(out, prev, n, false)) return oom();
    return SF_OK;
}

/* Applies a split to every span of src, appending the resulting non-empty spans to out. */
static sf_status split_spans(sf_encode_ctx *ctx, const sf_pretok_step *st, const char *src,
                             const sf_spans *in, sf_spans *out) {
    segs sg = {0};
    sf_status status = SF_OK;
    for (size_t k = 0; k < in->len && status == SF_OK; k++) {
        const sf_span sp = in->data[k];
        status = find_matches(ctx, st, src + sp.start, sp.end - sp.start, &sg);
        if (status != SF_OK) break;
        if (st->invert) {
            for (size_t i = 0; i < sg.len; i++) sg.data[i].match = !sg.data[i].match;
        }
        /* Fold the segments into pieces by the split behaviour, as tokenizers'
         * NormalizedString::split does. Offsets are relative to the span here. */
        size_t first_out = out->len;
        switch (st->behavior) {
        case SF_SPLIT_REMOVED:
            for (size_t i = 0; i < sg.len; i++) {
                if (!sg.data[i].match && !sf_spans_push(out, sg.data[i].start, sg.data[i].end, false)) {
                    status = oom();
                }
            }
            break;
        case SF_SPLIT_ISOLATED:
            for (size_t i = 0; i < sg.len; i++) {
                if (!sf_spans_push(out, sg.data[i].start, sg.data[i].end, false)) status = oom();
            }
            break;
        case SF_SPLIT_MERGED_WITH_PREVIOUS: {
            /* A match joins the piece before it unless that piece was itself a match. */
            bool prev_match = false;
            for (size_t i = 0; i < sg.len; i++) {
                const seg g = sg.data[i];
                if (g.match && !prev_match && out->len > first_out) {
                    out->data[out->len - 1].end = g.end;
                } else if (!sf_spans_push(out, g.start, g.end, false)) {
                    status = oom();
                }
                prev_match = g.match;
            }
            break;
        }
        case SF_SPLIT_MERGED_WITH_NEXT: {
            /* Mirror image: walk backwards, a match joins the piece after it unless that one
             * was a match; the pieces come out reversed and are turned round below. */
            bool next_match = false;
            for (size_t i = sg.len; i-- > 0;) {
                const seg g = sg.data[i];
                if (g.match && !next_match && out->len > first_out) {
                    out->data[out->len - 1].start = g.start;
                } else if (!sf_spans_push(out, g.start, g.end, false)) {
                    status = oom();
                }
                next_match = g.match;
            }
            if (status == SF_OK) {
                for (size_t a = first_out, b = out->len; a + 1 < b; a++, b--) {
                    sf_span t = out->data[a];
                    out->data[a] = out->data[b - 1];
                    out->data[b - 1] = t;
                }
            }
            break;
        }
        case SF_SPLIT_CONTIGUOUS: {
            /* Runs of adjacent matches become one piece. */
            bool prev_match = false;
            for (size_t i = 0; i < sg.len; i++) {
                const seg g = sg.data[i];
                if (g.match && prev_match && out->len > first_out) {
                    out->data[out->len - 1].end = g.end;
                } else if (!sf_spans_push(out, g.start, g.end, false)) {
                    status = oom();
                }
                prev_match = g.match;
            }
            break;
        }
        }
        if (status != SF_OK) break;
        /* Back to buffer offsets; drop empty pieces; only a piece at the span's start can
         * still be the start of the input. */
        size_t w = first_out;
        for (size_t i = first_out; i < out->len; i++) {
            sf_span p = out->data[i];
            if (p.end == p.start) continue;
            p.first = sp.first && p.start == 0;
            p.start += sp.start;
            p.end += sp.start;
            out->data[w++] = p;
        }
        out->len = w;
    }
    free(sg.data);
    return status;
}

/* Copies every span of src into dst, rewritten: spaces become `space_to` (when set), and
 * `prefix` is prepended where `prefix_when` says. */
typedef enum prefix_rule { PREFIX_NONE, PREFIX_ALWAYS, PREFIX_FIRST } prefix_rule;

static sf_status rewrite_spans(const char *src, const sf_spans *in, sf_buf *dst, sf_spans *out,
                               const char *space_to, int space_len, const char *prefix,
                               int prefix_len, prefix_rule rule) {
    dst->len = 0;
    out->len = 0;
    for (size_t k = 0; k < in->len; k++) {
        const sf_span sp = in->data[k];
        const char *s = src + sp.start;
        size_t n = sp.end - sp.start;
        size_t start = dst->len;
        /* The prefix is added unless the text (after replacement) already starts with it. */
        bool starts_with_prefix;
        if (space_to && n > 0 && s[0] == ' ') {
            starts_with_prefix = (size_t)space_len == (size_t)prefix_len &&
                                 memcmp(space_to, prefix, (size_t)prefix_len) == 0;
        } else {
            starts_with_prefix = n >= (size_t)prefix_len && memcmp(s, prefix, (size_t)prefix_len) == 0;
        }
        bool add = rule == PREFIX_ALWAYS || (rule == PREFIX_FIRST && sp.first);
        if (add && !starts_with_prefix && !sf_buf_append(dst, prefix, (size_t)prefix_len)) {
            return oom();
        }
        if (space_to) {
            for (size_t i = 0; i < n; i++) {
                bool ok = s[i] == ' ' ? sf_buf_append(dst, space_to, (size_t)space_len)
                                      : sf_buf_push(dst, s[i]);
                if (!ok) return oom();
            }
        } else if (!sf_buf_append(dst, s, n)) {
            return oom();
        }
        if (!sf_spans_push(out, start, dst->len, sp.first)) return oom();
    }
    return SF_OK;
}

sf_status sf_pretokenize_and_encode(sf_encode_ctx *ctx, const char *text, size_t len,
                                    bool first) {
    const sf_tokenizer *tok = ctx->tok;
    /* src is the text the current spans point into: the caller's, or one of the two
     * buffers. */
    const char *src = text;
    int src_buf = -1;
    sf_spans *in = &ctx->spans[0], *out = &ctx->spans[1];
    in->len = 0;
    if (len == 0) return SF_OK;
    if (!sf_spans_push(in, 0, len, first)) return oom();

    for (int32_t s = 0; s < tok->n_pretok; s++) {
        const sf_pretok_step *st = &tok->pretok[s];
        sf_status status = SF_OK;
        out->len = 0;
        if (st->kind == SF_PRETOK_SPLIT) {
            status = split_spans(ctx, st, src, in, out);
        } else {
            bool rewrite = st->kind == SF_PRETOK_METASPACE || st->add_prefix_space;
            if (rewrite) {
                int dst_buf = src_buf == 0 ? 1 : 0;
                sf_buf *dst = &ctx->bufs[dst_buf];
                if (st->kind == SF_PRETOK_METASPACE) {
                    prefix_rule rule = st->prepend_scheme == SF_PREPEND_ALWAYS ? PREFIX_ALWAYS
                                       : st->prepend_scheme == SF_PREPEND_FIRST ? PREFIX_FIRST
                                                                                : PREFIX_NONE;
                    status = rewrite_spans(src, in, dst, out, st->replacement,
                                           st->replacement_len, st->replacement,
                                           st->replacement_len, rule);
                } else {
                    status = rewrite_spans(src, in, dst, out, NULL, 0, " ", 1, PREFIX_ALWAYS);
                }
                src = dst->data;
                src_buf = dst_buf;
                sf_spans *t = in;
                in = out;
                out = t;
                out->len = 0;
            }
            bool split = st->kind == SF_PRETOK_METASPACE ? st->split : st->re != NULL;
            if (status == SF_OK && split) {
                status = split_spans(ctx, st, src, in, out);
            } else if (status == SF_OK) {
                /* No split: the spans stay as they are. */
                sf_spans *t = in;
                in = out;
                out = t;
            }
        }
        if (status != SF_OK) return status;
        sf_spans *t = in;
        in = out;
        out = t;
    }
    for (size_t k = 0; k < in->len; k++) {
        const sf_span sp = in->data[k];
        sf_status status = sf_bpe_encode_piece(ctx, src + sp.start, sp.end - sp.start);
        if (status != SF_OK) return status;
    }
    return SF_OK;
}
