/* Growable buffers and the two hash tables the tokenizer runs on.
 *
 * Both tables use open addressing with linear probing in power-of-two arrays kept at most half
 * full: lookups are the hot path of encoding (one per initial symbol, one per candidate merge),
 * and probing a flat array beats chasing chained nodes. */
#include "tokenizer/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Buffers                                                                                     */
/* ------------------------------------------------------------------------------------------ */

bool sf_buf_reserve(sf_buf *b, size_t extra) {
    if (extra <= b->cap - b->len) return true;
    if (extra > SIZE_MAX / 2 - b->len) return false;
    size_t need = b->len + extra;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) return false;
    b->data = p;
    b->cap = cap;
    return true;
}

bool sf_buf_append(sf_buf *b, const void *data, size_t n) {
    if (n == 0) return true;
    if (!sf_buf_reserve(b, n)) return false;
    memcpy(b->data + b->len, data, n);
    b->len += n;
    return true;
}

bool sf_buf_push(sf_buf *b, char c) {
    if (!sf_buf_reserve(b, 1)) return false;
    b->data[b->len++] = c;
    return true;
}

void sf_buf_free(sf_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

bool sf_ids_push(sf_ids *v, int32_t id) {
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        if (cap > SIZE_MAX / sizeof(int32_t)) return false;
        int32_t *p = realloc(v->data, cap * sizeof(int32_t));
        if (!p) return false;
        v->data = p;
        v->cap = cap;
    }
    v->data[v->len++] = id;
    return true;
}

void sf_ids_free(sf_ids *v) {
    free(v->data);
    v->data = NULL;
    v->len = v->cap = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Hashing                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* The finaliser of SplitMix64: a cheap bijection that spreads every input bit over the
 * output, so the low bits used as the table index are well mixed. */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

uint64_t sf_hash_bytes(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = UINT64_C(0x9e3779b97f4a7c15) ^ (uint64_t)n;
    /* Eight bytes per step; memcpy is the portable unaligned load and compiles to one. */
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, p, 8);
        h = (h ^ k) * UINT64_C(0xff51afd7ed558ccd);
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t k = 0;
    for (size_t i = 0; i < n; i++) k |= (uint64_t)p[i] << (8 * i);
    h = (h ^ k) * UINT64_C(0xc4ceb9fe1a85ec53);
    return mix64(h);
}

static size_t table_capacity(size_t expected) {
    size_t cap = 16;
    while (cap < expected * 2 && cap < (SIZE_MAX >> 2)) cap *= 2;
    return cap;
}

/* ------------------------------------------------------------------------------------------ */
/* String map                                                                                  */
/* ------------------------------------------------------------------------------------------ */

bool sf_strmap_init(sf_strmap *m, size_t expected) {
    size_t cap = table_capacity(expected);
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots) return false;
    for (size_t i = 0; i < cap; i++) m->slots[i].value = -1;
    m->mask = cap - 1;
    m->count = 0;
    return true;
}

void sf_strmap_free(sf_strmap *m) {
    free(m->slots);
    m->slots = NULL;
    m->mask = m->count = 0;
}

int32_t sf_strmap_find(const sf_strmap *m, const char *arena, const char *key, size_t len) {
    if (!m->slots) return -1;
    uint64_t h = sf_hash_bytes(key, len);
    uint32_t tag = (uint32_t)h;
    for (size_t i = (size_t)(h >> 32) & m->mask;; i = (i + 1) & m->mask) {
        const sf_strmap_slot *s = &m->slots[i];
        if (s->value < 0) return -1;
        if (s->hash == tag && s->len == len && memcmp(arena + s->off, key, len) == 0) {
            return s->value;
        }
    }
}

/* Doubles the table; the arena is needed because slots keep only part of each hash. */
static bool strmap_rehash(sf_strmap *m, const char *arena) {
    size_t cap = (m->mask + 1) * 2;
    sf_strmap_slot *slots = malloc(cap * sizeof *slots);
    if (!slots) return false;
    for (size_t i = 0; i < cap; i++) slots[i].value = -1;
    for (size_t j = 0; j <= m->mask; j++) {
        const sf_strmap_slot *s = &m->slots[j];
        if (s->value < 0) continue;
        uint64_t h = sf_hash_bytes(arena + s->off, s->len);
        size_t i = (size_t)(h >> 32) & (cap - 1);
        while (slots[i].value >= 0) i = (i + 1) & (cap - 1);
        slots[i] = *s;
    }
    free(m->slots);
    m->slots = slots;
    m->mask = cap - 1;
    return true;
}

bool sf_strmap_put(sf_strmap *m, const char *arena, uint32_t off, uint32_t len, int32_t value,
                   int32_t *previous) {
    if (previous) *previous = -1;
    if ((m->count + 1) * 2 > m->mask + 1 && !strmap_rehash(m, arena)) return false;
    uint64_t h = sf_hash_bytes(arena + off, len);
    uint32_t tag = (uint32_t)h;
    for (size_t i = (size_t)(h >> 32) & m->mask;; i = (i + 1) & m->mask) {
        sf_strmap_slot *s = &m->slots[i];
        if (s->value < 0) {
            *s = (sf_strmap_slot){tag, value, off, len};
            m->count++;
            return true;
        }
        if (s->hash == tag && s->len == len && memcmp(arena + s->off, arena + off, len) == 0) {
            if (previous) *previous = s->value;
            s->value = value;
            return true;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Pair map                                                                                    */
/* ------------------------------------------------------------------------------------------ */

#define PAIR_EMPTY UINT64_MAX

static uint64_t pair_key(int32_t left, int32_t right) {
    return ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
}

bool sf_pairmap_init(sf_pairmap *m, size_t expected) {
    size_t cap = table_capacity(expected);
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots) return false;
    for (size_t i = 0; i < cap; i++) m->slots[i].key = PAIR_EMPTY;
    m->mask = cap - 1;
    m->count = 0;
    return true;
}

void sf_pairmap_free(sf_pairmap *m) {
    free(m->slots);
    m->slots = NULL;
    m->mask = m->count = 0;
}

const sf_pairmap_slot *sf_pairmap_find(const sf_pairmap *m, int32_t left, int32_t right) {
    if (!m->slots) return NULL;
    uint64_t key = pair_key(left, right);
    for (size_t i = (size_t)mix64(key) & m->mask;; i = (i + 1) & m->mask) {
        const sf_pairmap_slot *s = &m->slots[i];
        if (s->key == key) return s;
        if (s->key == PAIR_EMPTY) return NULL;
    }
}

static bool pairmap_rehash(sf_pairmap *m) {
    size_t cap = (m->mask + 1) * 2;
    sf_pairmap_slot *slots = malloc(cap * sizeof *slots);
    if (!slots) return false;
    for (size_t i = 0; i < cap; i++) slots[i].key = PAIR_EMPTY;
    for (size_t j = 0; j <= m->mask; j++) {
        if (m->slots[j].key == PAIR_EMPTY) continue;
        size_t i = (size_t)mix64(m->slots[j].key) & (cap - 1);
        while (slots[i].key != PAIR_EMPTY) i = (i + 1) & (cap - 1);
        slots[i] = m->slots[j];
    }
    free(m->slots);
    m->slots = slots;
    m->mask = cap - 1;
    return true;
}

bool sf_pairmap_put(sf_pairmap *m, int32_t left, int32_t right, int32_t rank, int32_t merged) {
    if ((m->count + 1) * 2 > m->mask + 1 && !pairmap_rehash(m)) return false;
    uint64_t key = pair_key(left, right);
    for (size_t i = (size_t)mix64(key) & m->mask;; i = (i + 1) & m->mask) {
        sf_pairmap_slot *s = &m->slots[i];
        if (s->key == PAIR_EMPTY) {
            *s = (sf_pairmap_slot){key, rank, merged};
            m->count++;
            return true;
        }
        if (s->key == key) {
            s->rank = rank;
            s->merged = merged;
            return true;
        }
    }
}
