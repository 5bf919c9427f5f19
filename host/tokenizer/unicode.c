/* UTF-8 helpers and GPT-2's byte alphabet.
 *
 * Well-formedness follows the Unicode standard's table of well-formed byte sequences (Table
 * 3-7): the second byte's range depends on the lead byte, which is what excludes overlong
 * forms, UTF-16 surrogates and values past U+10FFFF. The same table drives the lossy decoder,
 * which replaces each "maximal subpart" of an ill-formed sequence with one U+FFFD, the
 * practice the standard recommends and the one transformers inherits from Rust.
 *
 * NFC (for tokenizers that declare an NFC normalizer, Qwen2) follows the three steps of UAX
 * #15: full canonical decomposition (table lookups applied recursively, Hangul syllables by
 * arithmetic), canonical ordering (each run of combining marks stably sorted by combining
 * class), and canonical composition (each mark composes with the last starter unless a mark
 * of the same or higher class, or a starter, stands between them). Text whose every
 * character is below U+0300 is already NFC, which covers ASCII and Latin-1 and keeps the
 * common case a plain copy. The tables come from make_unicode_tables.py. */
#include "tokenizer/tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>

#include "tokenizer/unicode_tables.h"

/* For a lead byte: how many continuation bytes follow, and the allowed range of the first of
 * them (later ones are always 0x80..0xBF). need = -1 marks a byte that cannot start a
 * sequence. */
typedef struct lead_info {
    int need;
    unsigned char lo, hi;
} lead_info;

static lead_info lead(unsigned char c) {
    lead_info li = {-1, 0, 0};
    if (c < 0x80) {
        li.need = 0;
    } else if (c >= 0xC2 && c <= 0xDF) {
        li = (lead_info){1, 0x80, 0xBF};
    } else if (c == 0xE0) {
        li = (lead_info){2, 0xA0, 0xBF};
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
        li = (lead_info){2, 0x80, 0xBF};
    } else if (c == 0xED) {
        li = (lead_info){2, 0x80, 0x9F};
    } else if (c == 0xF0) {
        li = (lead_info){3, 0x90, 0xBF};
    } else if (c >= 0xF1 && c <= 0xF3) {
        li = (lead_info){3, 0x80, 0xBF};
    } else if (c == 0xF4) {
        li = (lead_info){3, 0x80, 0x8F};
    }
    return li;
}

size_t sf_utf8_validate(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        lead_info li = lead(p[i]);
        if (li.need < 0 || (size_t)li.need >= n - i) return i;
        if (p[i + 1] < li.lo || p[i + 1] > li.hi) return i;
        for (int j = 2; j <= li.need; j++) {
            if (p[i + (size_t)j] < 0x80 || p[i + (size_t)j] > 0xBF) return i;
        }
        i += (size_t)li.need + 1;
    }
    return n;
}

int sf_utf8_seq_len(unsigned char c) {
    if (c < 0xC0) return 1;
    if (c < 0xE0) return 2;
    if (c < 0xF0) return 3;
    if (c < 0xF8) return 4;
    return 1;
}

uint32_t sf_utf8_decode(const char *s, int *len) {
    const unsigned char *p = (const unsigned char *)s;
    int n = sf_utf8_seq_len(p[0]);
    *len = n;
    switch (n) {
    case 2: return ((uint32_t)(p[0] & 0x1F) << 6) | (p[1] & 0x3F);
    case 3: return ((uint32_t)(p[0] & 0x0F) << 12) | ((uint32_t)(p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    case 4:
        return ((uint32_t)(p[0] & 0x07) << 18) | ((uint32_t)(p[1] & 0x3F) << 12) |
               ((uint32_t)(p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    default: return p[0];
    }
}

int sf_utf8_encode(uint32_t cp, char *out) {
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

static const char k_replacement[3] = {(char)0xEF, (char)0xBF, (char)0xBD}; /* U+FFFD */

bool sf_utf8_append_lossy(sf_buf *out, const char *s, size_t n, bool final, size_t *consumed) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    /* Worst case every byte becomes a 3-byte replacement; reserving once keeps the loop free
     * of allocation failures. */
    if (n > (SIZE_MAX - out->len) / 3 || !sf_buf_reserve(out, 3 * n)) return false;
    while (i < n) {
        /* Copy runs of ASCII at once: most text is mostly ASCII. */
        size_t j = i;
        while (j < n && p[j] < 0x80) j++;
        if (j > i) {
            memcpy(out->data + out->len, s + i, j - i);
            out->len += j - i;
            i = j;
            continue;
        }
        lead_info li = lead(p[i]);
        if (li.need < 0) {
            memcpy(out->data + out->len, k_replacement, 3);
            out->len += 3;
            i++;
            continue;
        }
        int k = 1;
        bool bad = false, incomplete = false;
        for (; k <= li.need; k++) {
            if (i + (size_t)k >= n) {
                incomplete = true;
                break;
            }
            unsigned char b = p[i + (size_t)k];
            unsigned char lo = k == 1 ? li.lo : 0x80, hi = k == 1 ? li.hi : 0xBF;
            if (b < lo || b > hi) {
                bad = true;
                break;
            }
        }
        if (incomplete) {
            if (!final) break; /* leave it for the next call */
            memcpy(out->data + out->len, k_replacement, 3);
            out->len += 3;
            i = n;
            break;
        }
        if (bad) {
            /* The maximal subpart is the k bytes read so far; the byte that broke it starts
             * the next attempt. */
            memcpy(out->data + out->len, k_replacement, 3);
            out->len += 3;
            i += (size_t)k;
            continue;
        }
        memcpy(out->data + out->len, s + i, (size_t)li.need + 1);
        out->len += (size_t)li.need + 1;
        i += (size_t)li.need + 1;
    }
    if (consumed) *consumed = i;
    return true;
}

/* The printable bytes that GPT-2's alphabet keeps as themselves: '!'..'~', U+00A1..U+00AC and
 * U+00AE..U+00FF. The 68 others (controls, space, DEL, the C1 range, NBSP and the soft hyphen)
 * are moved, in byte order, to U+0100 onwards. */
static bool byte_is_kept(unsigned b) {
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

uint32_t sf_byte_to_unicode(unsigned char b) {
    if (byte_is_kept(b)) return b;
    /* Rank of b among the moved bytes: 0x00..0x20 are 0..32, 0x7F..0xA0 are 33..66, 0xAD 67. */
    if (b <= 0x20) return 256u + b;
    if (b >= 0x7F && b <= 0xA0) return 256u + 33u + (uint32_t)(b - 0x7F);
    return 256u + 67u; /* 0xAD */
}

int sf_unicode_to_byte(uint32_t cp) {
    if (cp < 256) return byte_is_kept(cp) ? (int)cp : -1;
    if (cp >= 256 + 68) return -1;
    uint32_t r = cp - 256;
    if (r <= 32) return (int)r;
    if (r <= 66) return (int)(0x7F + (r - 33));
    return 0xAD;
}

/* ------------------------------------------------------------------------------------------ */
/* NFC                                                                                         */
/* ------------------------------------------------------------------------------------------ */

/* Hangul syllable arithmetic (Unicode chapter 3.12). */
enum {
    S_BASE = 0xAC00,
    L_BASE = 0x1100,
    V_BASE = 0x1161,
    T_BASE = 0x11A7,
    L_COUNT = 19,
    V_COUNT = 21,
    T_COUNT = 28,
    N_COUNT = V_COUNT * T_COUNT,
    S_COUNT = L_COUNT * N_COUNT,
};

static uint8_t ccc(uint32_t cp) {
    if (cp < 0x300) return 0;
    size_t lo = 0, hi = sizeof k_ccc_ranges / sizeof k_ccc_ranges[0];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < k_ccc_ranges[mid].first) hi = mid;
        else if (cp > k_ccc_ranges[mid].last) lo = mid + 1;
        else return k_ccc_ranges[mid].ccc;
    }
    return 0;
}

static const decomposition *find_decomposition(uint32_t cp) {
    size_t lo = 0, hi = sizeof k_decompositions / sizeof k_decompositions[0];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < k_decompositions[mid].cp) hi = mid;
        else if (cp > k_decompositions[mid].cp) lo = mid + 1;
        else return &k_decompositions[mid];
    }
    return NULL;
}

/* The primary composite of a and b, or 0. */
static uint32_t compose(uint32_t a, uint32_t b) {
    if (a >= L_BASE && a < L_BASE + L_COUNT && b >= V_BASE && b < V_BASE + V_COUNT) {
        return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT;
    }
    if (a >= S_BASE && a < S_BASE + S_COUNT && (a - S_BASE) % T_COUNT == 0 && b > T_BASE &&
        b < T_BASE + T_COUNT) {
        return a + (b - T_BASE);
    }
    size_t lo = 0, hi = sizeof k_compositions / sizeof k_compositions[0];
    uint64_t key = ((uint64_t)a << 32) | b;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        uint64_t k = ((uint64_t)k_compositions[mid].a << 32) | k_compositions[mid].b;
        if (key < k) hi = mid;
        else if (key > k) lo = mid + 1;
        else return k_compositions[mid].cp;
    }
    return 0;
}

typedef struct cps {
    uint32_t *data;
    size_t len, cap;
} cps;

static bool cps_push(cps *v, uint32_t cp) {
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        uint32_t *p = realloc(v->data, cap * sizeof *p);
        if (!p) return false;
        v->data = p;
        v->cap = cap;
    }
    v->data[v->len++] = cp;
    return true;
}

/* Appends the full canonical decomposition of cp. Decompositions nest only a few levels
 * (at most 4 code points come out of one), so the recursion is shallow. */
static bool decompose(cps *out, uint32_t cp, int depth) {
    if (cp >= S_BASE && cp < S_BASE + S_COUNT) {
        uint32_t s = cp - S_BASE;
        bool ok = cps_push(out, L_BASE + s / N_COUNT) && cps_push(out, V_BASE + (s % N_COUNT) / T_COUNT);
        if (ok && s % T_COUNT != 0) ok = cps_push(out, T_BASE + s % T_COUNT);
        return ok;
    }
    const decomposition *d = cp >= 0xC0 && depth < 8 ? find_decomposition(cp) : NULL;
    if (!d) return cps_push(out, cp);
    if (!decompose(out, d->a, depth + 1)) return false;
    return d->b == 0 || decompose(out, d->b, depth + 1);
}

bool sf_nfc_append(sf_buf *out, const char *s, size_t n) {
    /* U+0300 encodes as CC 80: a text with no byte >= 0xCC has no character at or above it. */
    size_t i = 0;
    while (i < n && (unsigned char)s[i] < 0xCC) i++;
    if (i == n) return sf_buf_append(out, s, n);

    cps d = {0};
    bool ok = true;
    for (i = 0; i < n && ok;) {
        int len;
        uint32_t cp = sf_utf8_decode(s + i, &len);
        i += (size_t)len;
        ok = decompose(&d, cp, 0);
    }
    /* Canonical ordering: insertion sort inside each run of non-starters (runs are short). */
    for (size_t k = 1; ok && k < d.len; k++) {
        uint32_t c = d.data[k];
        uint8_t cc = ccc(c);
        if (cc == 0) continue;
        size_t j = k;
        while (j > 0) {
            uint8_t pc = ccc(d.data[j - 1]);
            if (pc == 0 || pc <= cc) break;
            d.data[j] = d.data[j - 1];
            j--;
        }
        d.data[j] = c;
    }
    /* Canonical composition, in place: w is the write position, starter the index of the last
     * starter written (-1: none yet), last_cc the class of the last character written after
     * it (-1: nothing written after it). */
    size_t w = 0;
    ptrdiff_t starter = -1;
    int last_cc = -1;
    for (size_t k = 0; ok && k < d.len; k++) {
        uint32_t c = d.data[k];
        int cc = ccc(c);
        if (starter >= 0 && (last_cc == -1 || (last_cc < cc && cc != 0))) {
            uint32_t comp = compose(d.data[starter], c);
            if (comp) {
                d.data[starter] = comp;
                continue;
            }
        }
        if (cc == 0) {
            starter = (ptrdiff_t)w;
            last_cc = -1;
        } else {
            last_cc = cc;
        }
        d.data[w++] = c;
    }
    if (ok && !sf_buf_reserve(out, 4 * w)) ok = false;
    for (size_t k = 0; ok && k < w; k++) {
        out->len += (size_t)sf_utf8_encode(d.data[k], out->data + out->len);
    }
    free(d.data);
    return ok;
}
