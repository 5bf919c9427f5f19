/* The BPE merge loop for one pre-tokenized piece.
 *
 * The piece starts as a list of symbols (bytes through the GPT-2 alphabet, or characters with
 * <0xNN> fallback); then, repeatedly, the adjacent pair with the lowest merge rank is merged,
 * the leftmost one when ranks tie, until no adjacent pair has a merge. That is the order
 * tokenizers' BPE model applies, and it decides the result whenever merges overlap.
 *
 * Rescanning all pairs after every merge would be quadratic, which matters for
 * SentencePiece-style tokenizers with no pre-tokenizer, where a whole paragraph is one piece.
 * Instead every candidate pair goes into a binary min-heap keyed by (rank, position); symbols
 * form a doubly linked list so a merge is O(1); and a merge pushes only the two pairs it
 * creates. Entries made stale by earlier merges are recognised when popped (one of their two
 * symbols has changed) and dropped, so the loop is O(n log n) in the piece length. */
#include "tokenizer/tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* Word-cache limits: short pieces repeat (words, spaces, punctuation); long ones rarely do and
 * would only fill the cache. */
#define CACHE_MAX_KEY 64
#define CACHE_MAX_ENTRIES 65536

static sf_status oom(void) { return sf_fail(SF_ERR_OUT_OF_MEMORY, "tokenizer: out of memory"); }

/* ------------------------------------------------------------------------------------------ */
/* Heap                                                                                        */
/* ------------------------------------------------------------------------------------------ */

static bool heap_push(sf_encode_ctx *ctx, sf_bpe_entry e) {
    if (ctx->heap_len == ctx->heap_cap) {
        size_t cap = ctx->heap_cap ? ctx->heap_cap * 2 : 256;
        sf_bpe_entry *p = realloc(ctx->heap, cap * sizeof *p);
        if (!p) return false;
        ctx->heap = p;
        ctx->heap_cap = cap;
    }
    sf_bpe_entry *h = ctx->heap;
    size_t i = ctx->heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (h[parent].key <= e.key) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = e;
    return true;
}

static sf_bpe_entry heap_pop(sf_encode_ctx *ctx) {
    sf_bpe_entry *h = ctx->heap;
    sf_bpe_entry top = h[0];
    sf_bpe_entry last = h[--ctx->heap_len];
    size_t n = ctx->heap_len, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1].key < h[c].key) c++;
        if (last.key <= h[c].key) break;
        h[i] = h[c];
        i = c;
    }
    if (n > 0) h[i] = last;
    return top;
}

/* Pushes the pair (pos, its next) if it merges. */
static bool push_pair(sf_encode_ctx *ctx, int32_t pos) {
    const sf_bpe_sym *s = ctx->syms;
    int32_t nx = s[pos].next;
    if (nx < 0) return true;
    const sf_pairmap_slot *m = sf_pairmap_find(&ctx->tok->merges, s[pos].id, s[nx].id);
    if (!m) return true;
    sf_bpe_entry e = {((uint64_t)(uint32_t)m->rank << 32) | (uint32_t)pos, s[pos].id, s[nx].id,
                      m->merged};
    return heap_push(ctx, e);
}

/* ------------------------------------------------------------------------------------------ */
/* Initial symbols                                                                             */
/* ------------------------------------------------------------------------------------------ */

static bool reserve_syms(sf_encode_ctx *ctx, size_t n) {
    if (n <= ctx->syms_cap) return true;
    size_t cap = ctx->syms_cap ? ctx->syms_cap : 64;
    while (cap < n) cap *= 2;
    sf_bpe_sym *p = realloc(ctx->syms, cap * sizeof *p);
    if (!p) return false;
    ctx->syms = p;
    ctx->syms_cap = cap;
    return true;
}

/* Appends a symbol, or handles a character the vocabulary lacks: tokenizers maps it to the
 * unknown token (one per run of them with fuse_unk), or drops it when there is none. */
static void add_sym(sf_encode_ctx *ctx, int32_t *n, int32_t id, bool *last_unk) {
    const sf_tokenizer *tok = ctx->tok;
    if (id < 0) {
        if (tok->unk_id < 0) return;
        if (tok->fuse_unk && *last_unk) return;
        id = tok->unk_id;
        *last_unk = true;
    } else {
        *last_unk = false;
    }
    ctx->syms[*n].id = id;
    (*n)++;
}

/* ------------------------------------------------------------------------------------------ */
/* Word cache                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static bool cache_find(sf_encode_ctx *ctx, const char *piece, size_t len) {
    sf_word_cache *c = &ctx->cache;
    if (c->n == 0 || len > CACHE_MAX_KEY) return false;
    int32_t v = sf_strmap_find(&c->map, c->keys.data, piece, len);
    if (v < 0) return false;
    for (uint32_t i = 0; i < c->range_len[v]; i++) {
        if (!sf_ids_push(&ctx->out, c->ids.data[c->range_off[v] + i])) return false;
    }
    return true;
}

/* Remembers that piece became out[from, end). Failure to cache is not an error. */
static void cache_put(sf_encode_ctx *ctx, const char *piece, size_t len, size_t from) {
    sf_word_cache *c = &ctx->cache;
    if (len > CACHE_MAX_KEY || c->n >= CACHE_MAX_ENTRIES) return;
    if (!c->map.slots && !sf_strmap_init(&c->map, 1024)) return;
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 1024;
        uint32_t *o = realloc(c->range_off, cap * sizeof *o);
        if (!o) return;
        c->range_off = o;
        uint32_t *l = realloc(c->range_len, cap * sizeof *l);
        if (!l) return;
        c->range_len = l;
        c->cap = cap;
    }
    size_t key_off = c->keys.len, ids_off = c->ids.len, n_ids = ctx->out.len - from;
    if (key_off > UINT32_MAX - len || ids_off + n_ids > UINT32_MAX) return;
    if (!sf_buf_append(&c->keys, piece, len)) return;
    for (size_t i = 0; i < n_ids; i++) {
        if (!sf_ids_push(&c->ids, ctx->out.data[from + i])) {
            c->keys.len = key_off;
            c->ids.len = ids_off;
            return;
        }
    }
    if (!sf_strmap_put(&c->map, c->keys.data, (uint32_t)key_off, (uint32_t)len, (int32_t)c->n,
                       NULL)) {
        c->keys.len = key_off;
        c->ids.len = ids_off;
        return;
    }
    c->range_off[c->n] = (uint32_t)ids_off;
    c->range_len[c->n] = (uint32_t)n_ids;
    c->n++;
}

/* ------------------------------------------------------------------------------------------ */
/* The merge loop                                                                              */
/* ------------------------------------------------------------------------------------------ */

static sf_status encode_word(sf_encode_ctx *ctx, const char *piece, size_t len) {
    const sf_tokenizer *tok = ctx->tok;
    if (len == 0) return SF_OK;
    /* Positions go into the low 32 bits of heap keys. */
    if (len > (size_t)INT32_MAX) {
        return sf_fail(SF_ERR_OUT_OF_RANGE, "tokenizer: a %zu-byte piece is too long", len);
    }
    size_t from = ctx->out.len;
    if (cache_find(ctx, piece, len)) return SF_OK;
    if (ctx->out.len != from) return oom(); /* cache hit, but the output could not grow */

    /* ignore_merges: a piece that is a token in its own right is taken whole, before any
     * merge could split it differently. */
    if (tok->ignore_merges) {
        int32_t id;
        if (tok->family == SF_FAMILY_BYTE_LEVEL) {
            ctx->mapped.len = 0;
            if (!sf_buf_reserve(&ctx->mapped, 2 * len)) return oom();
            for (size_t i = 0; i < len; i++) {
                ctx->mapped.len += (size_t)sf_utf8_encode(
                    sf_byte_to_unicode((unsigned char)piece[i]), ctx->mapped.data + ctx->mapped.len);
            }
            id = sf_strmap_find(&tok->vocab, tok->arena.data, ctx->mapped.data, ctx->mapped.len);
        } else {
            id = sf_strmap_find(&tok->vocab, tok->arena.data, piece, len);
        }
        if (id >= 0) {
            if (!sf_ids_push(&ctx->out, id)) return oom();
            cache_put(ctx, piece, len, from);
            return SF_OK;
        }
    }

    /* Initial symbols. A character can expand to up to 4 byte-fallback symbols, but never to
     * more symbols than it has bytes, so len bounds the count. */
    if (!reserve_syms(ctx, len)) return oom();
    int32_t n = 0;
    bool last_unk = false;
    if (tok->family == SF_FAMILY_BYTE_LEVEL) {
        for (size_t i = 0; i < len; i++) add_sym(ctx, &n, tok->byte_ids[(unsigned char)piece[i]], &last_unk);
    } else {
        size_t i = 0;
        while (i < len) {
            unsigned char c = (unsigned char)piece[i];
            int cl = c < 0x80 ? 1 : sf_utf8_seq_len(c);
            if ((size_t)cl > len - i) cl = (int)(len - i); /* cannot happen on validated text */
            int32_t id = c < 0x80 ? tok->ascii_ids[c]
                                  : sf_strmap_find(&tok->vocab, tok->arena.data, piece + i, (size_t)cl);
            if (id < 0 && tok->byte_fallback) {
                /* Every byte of the character needs its <0xNN> token, else the character is
                 * unknown as a whole. */
                bool all = true;
                for (int k = 0; k < cl; k++) all = all && tok->fallback_ids[(unsigned char)piece[i + (size_t)k]] >= 0;
                if (all) {
                    for (int k = 0; k < cl; k++) {
                        add_sym(ctx, &n, tok->fallback_ids[(unsigned char)piece[i + (size_t)k]], &last_unk);
                    }
                    i += (size_t)cl;
                    continue;
                }
            }
            add_sym(ctx, &n, id, &last_unk);
            i += (size_t)cl;
        }
    }
    sf_bpe_sym *s = ctx->syms;
    for (int32_t i = 0; i < n; i++) {
        s[i].prev = i - 1;
        s[i].next = i + 1 < n ? i + 1 : -1;
    }

    if (n > 1) {
        ctx->heap_len = 0;
        for (int32_t i = 0; i + 1 < n; i++) {
            if (!push_pair(ctx, i)) return oom();
        }
        while (ctx->heap_len > 0) {
            sf_bpe_entry e = heap_pop(ctx);
            int32_t pos = (int32_t)(uint32_t)e.key;
            /* Stale if either symbol has changed since the entry was made: a merged-away
             * symbol has id -1, and a symbol that absorbed its neighbour has a new id. */
            if (s[pos].id != e.left) continue;
            int32_t nx = s[pos].next;
            if (nx < 0 || s[nx].id != e.right) continue;
            s[pos].id = e.merged;
            s[pos].next = s[nx].next;
            if (s[nx].next >= 0) s[s[nx].next].prev = pos;
            s[nx].id = -1;
            if (s[pos].prev >= 0 && !push_pair(ctx, s[pos].prev)) return oom();
            if (!push_pair(ctx, pos)) return oom();
        }
    }
    for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = s[i].next) {
        if (!sf_ids_push(&ctx->out, s[i].id)) return oom();
    }
    cache_put(ctx, piece, len, from);
    return SF_OK;
}

sf_status sf_bpe_encode_piece(sf_encode_ctx *ctx, const char *piece, size_t len) {
    if (!ctx->tok->split_at_metaspace) return encode_word(ctx, piece, len);
    /* Cut before every U+2581 that follows another character (see split_at_metaspace). A
     * byte-wise scan is safe: E2 starts a character, and the sequence E2 96 81 is U+2581. */
    size_t start = 0;
    for (size_t i = 1; i + 3 <= len; i++) {
        if ((unsigned char)piece[i] == 0xE2 && (unsigned char)piece[i + 1] == 0x96 &&
            (unsigned char)piece[i + 2] == 0x81 &&
            !(i >= 3 && (unsigned char)piece[i - 3] == 0xE2 && (unsigned char)piece[i - 2] == 0x96 &&
              (unsigned char)piece[i - 1] == 0x81)) {
            sf_status st = encode_word(ctx, piece + start, i - start);
            if (st != SF_OK) return st;
            start = i;
        }
    }
    return encode_word(ctx, piece + start, len - start);
}

void sf_encode_ctx_free(sf_encode_ctx *ctx) {
    sf_ids_free(&ctx->out);
    if (ctx->md) pcre2_match_data_free(ctx->md);
    for (int i = 0; i < 2; i++) {
        sf_buf_free(&ctx->bufs[i]);
        free(ctx->spans[i].data);
    }
    sf_buf_free(&ctx->norm);
    sf_buf_free(&ctx->mapped);
    free(ctx->syms);
    free(ctx->heap);
    sf_strmap_free(&ctx->cache.map);
    sf_buf_free(&ctx->cache.keys);
    sf_ids_free(&ctx->cache.ids);
    free(ctx->cache.range_off);
    free(ctx->cache.range_len);
    memset(ctx, 0, sizeof *ctx);
}
