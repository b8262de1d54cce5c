/* Byte-level BPE (GGUF tokenizer.ggml.model "gpt2": llama-3, qwen2, ...), giving the ids of
 * ember.models.tokenizers.bpe (and llama.cpp's llm_tokenizer_bpe_session).
 *
 * A text fragment (special tokens are already cut out, tokenizer.c) is split into words by the
 * pre-tokenizer: the manifest's native.tokenizer.pre_split names, in order, the regexes
 * ember.models.tokenizers.bpe applies for the GGUF's tokenizer.ggml.pre, each written here as a
 * matcher that follows the regex's alternation and backtracking (leftmost alternative first,
 * greedy runs); each pattern splits every piece the one before left, text between matches
 * staying a piece of its own, as split_words does. A word's UTF-8 bytes are mapped to GPT-2's
 * printable characters and the adjacent pair with the lowest merge rank (tokenizer.ggml.merges,
 * the first rank of a pair listed twice) merges first, the leftmost on ties; a symbol left that
 * is no token falls back to its ASCII characters' tokens. With ignore_merges (llama-3), a word
 * that is a token already is that token.
 *
 * Text is decoded as Python's surrogateescape does: a byte that starts no valid UTF-8 sequence
 * is a character of no class (a surrogate U+DC80..U+DCFF in Python) that maps back to itself.
 * The classes (\p{L}, \p{N}, \p{P}, \s) come from unicode_classes.h, generated from the `regex`
 * module's (ember/artifact/native_unicode.py). */
#define _GNU_SOURCE
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode_classes.h"

enum { LETTER = 1, NUMBER = 2, PUNCT = 4, SPACE = 8 };

typedef struct {            /* one decoded fragment: per character its code point, classes, offset */
    const char *text;
    uint32_t *cp;
    uint8_t *cls;
    size_t *off;            /* byte offset of each character; off[n] = the fragment's length */
    size_t n;
} chars;

/* characters i.. of c up to end: the length of the pattern's match at i, 0 for none */
typedef size_t (*matcher)(const chars *c, size_t i, size_t end);

#define MAX_SPLITS 8

struct bpe {
    matcher split[MAX_SPLITS];
    int n_split, ignore_merges;
    const char **merge;     /* the merges, in rank order */
    uint32_t *merge_len, *merge_at;     /* bytes, and where the space between the pair lies */
    int32_t *table;         /* open addressing: pair -> rank */
    uint32_t mask;
};

/* ---- Unicode ------------------------------------------------------------------------------ */

static uint8_t classes_of(uint32_t cp) {
    size_t lo = 0, hi = sizeof UNICODE_RUNS / sizeof UNICODE_RUNS[0];
    while (hi - lo > 1) {       /* the last run starting at or before cp */
        size_t mid = (lo + hi) / 2;
        if (UNICODE_RUNS[mid] >> 4 <= cp) lo = mid;
        else hi = mid;
    }
    return (uint8_t)(UNICODE_RUNS[lo] & 15);
}

/* The code point of the valid (shortest-form, no surrogate, <= U+10FFFF) UTF-8 sequence at s,
 * its length in *n; else the byte alone as U+DC80 + (byte - 0x80), as surrogateescape does. */
static uint32_t decode(const uint8_t *s, size_t left, size_t *n) {
    uint8_t b = s[0];
    *n = 1;
    if (b < 0x80) return b;
    size_t len = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (!len || len > left) return 0xDC00 + b;
    uint8_t lo = 0x80, hi = 0xBF;       /* the second byte's range excludes overlongs and surrogates */
    if (b == 0xE0) lo = 0xA0;
    else if (b == 0xED) hi = 0x9F;
    else if (b == 0xF0) lo = 0x90;
    else if (b == 0xF4) hi = 0x8F;
    if (s[1] < lo || s[1] > hi) return 0xDC00 + b;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0xDC00 + b;
    uint32_t cp = b & (0x7F >> len);
    for (size_t i = 1; i < len; i++) cp = cp << 6 | (s[i] & 0x3F);
    *n = len;
    return cp;
}

static int is(const chars *c, size_t i, int cls) { return (c->cls[i] & cls) != 0; }
static int crlf(const chars *c, size_t i) { return c->cp[i] == '\r' || c->cp[i] == '\n'; }
/* [^\s\p{L}\p{N}] */
static int other(const chars *c, size_t i) { return !(c->cls[i] & (SPACE | LETTER | NUMBER)); }

static size_t run_of(const chars *c, size_t i, size_t end, int cls) {
    size_t j = i;
    while (j < end && is(c, j, cls)) j++;
    return j - i;
}

/* ---- the pre-tokenizer's patterns (ember.models.tokenizers.bpe) ---------------------------- */

/* 's|'t|'re|'ve|'m|'ll|'d; any_case: llama.cpp's '[sS]|'[tT]|'[rR][eE]|... */
static size_t contraction(const chars *c, size_t i, size_t end, int any_case) {
    if (c->cp[i] != '\'' || i + 1 >= end) return 0;
    uint32_t a = c->cp[i + 1], b = i + 2 < end ? c->cp[i + 2] : 0;
    if (any_case) {
        a = a >= 'A' && a <= 'Z' ? a + 32 : a;
        b = b >= 'A' && b <= 'Z' ? b + 32 : b;
    }
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

/* \s+(?!\S): a run of white space, less its last character when a non-space follows */
static size_t spaces_not_before_text(const chars *c, size_t i, size_t end) {
    size_t n = run_of(c, i, end, SPACE);
    if (!n || i + n == end) return n;
    return n >= 2 ? n - 1 : 0;
}

/* LLAMA3_PATTERN (digits 3) and QWEN2_PATTERN (digits 1):
 * contractions|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static size_t llama3_like(const chars *c, size_t i, size_t end, size_t digits) {
    size_t n = contraction(c, i, end, 1);
    if (n) return n;
    if (is(c, i, LETTER)) return run_of(c, i, end, LETTER);
    if (!is(c, i, NUMBER) && !crlf(c, i) && i + 1 < end && is(c, i + 1, LETTER))
        return 1 + run_of(c, i + 1, end, LETTER);
    if (is(c, i, NUMBER)) {
        n = run_of(c, i, end, NUMBER);
        return n < digits ? n : digits;
    }
    size_t j = c->cp[i] == ' ' && i + 1 < end && other(c, i + 1) ? i + 1 : i;
    if (other(c, j)) {
        while (j < end && other(c, j)) j++;
        while (j < end && crlf(c, j)) j++;
        return j - i;
    }
    n = run_of(c, i, end, SPACE);
    if (!n) return 0;
    for (size_t k = i + n; k > i; k--)      /* \s*[\r\n]+: up to the run's last line break */
        if (crlf(c, k - 1)) return k - i;
    size_t m = spaces_not_before_text(c, i, end);
    return m ? m : n;
}

static size_t llama3(const chars *c, size_t i, size_t end) { return llama3_like(c, i, end, 3); }
static size_t qwen2(const chars *c, size_t i, size_t end) { return llama3_like(c, i, end, 1); }

/* GPT2_PATTERN: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S) */
static size_t gpt2(const chars *c, size_t i, size_t end) {
    size_t n = contraction(c, i, end, 0);
    if (n) return n;
    size_t j = c->cp[i] == ' ' && i + 1 < end ? i + 1 : i;     /* the optional space */
    if (is(c, j, LETTER)) return j - i + run_of(c, j, end, LETTER);
    if (is(c, j, NUMBER)) return j - i + run_of(c, j, end, NUMBER);
    if (other(c, j)) {
        size_t k = j;
        while (k < end && other(c, k)) k++;
        return k - i;
    }
    return spaces_not_before_text(c, i, end);
}

/* \p{N} */
static size_t number(const chars *c, size_t i, size_t end) { return is(c, i, NUMBER) ? 1 : 0; }
/* \p{N}+ */
static size_t numbers(const chars *c, size_t i, size_t end) { return run_of(c, i, end, NUMBER); }

/* [0-9][0-9][0-9] */
static size_t digits3(const chars *c, size_t i, size_t end) {
    if (end - i < 3) return 0;
    for (size_t k = i; k < i + 3; k++)
        if (c->cp[k] < '0' || c->cp[k] > '9') return 0;
    return 3;
}

/* [\p{P}\$\+<=>\^~\|]+ */
static int punctuation_or_sign(const chars *c, size_t i) {
    uint32_t cp = c->cp[i];
    return is(c, i, PUNCT) || cp == '$' || cp == '+' || cp == '<' || cp == '=' || cp == '>' || cp == '^'
           || cp == '~' || cp == '|';
}

static size_t punctuation(const chars *c, size_t i, size_t end) {
    size_t j = i;
    while (j < end && punctuation_or_sign(c, j)) j++;
    return j - i;
}

static const struct { const char *name; matcher match; } SPLITS[] = {
    {"llama3", llama3}, {"qwen2", qwen2}, {"gpt2", gpt2}, {"number", number}, {"numbers", numbers},
    {"digits3", digits3}, {"punctuation", punctuation},
};

/* ---- merges ------------------------------------------------------------------------------- */

static uint32_t fnv(uint32_t h, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* the rank of merging a (na bytes) with b (nb bytes), or -1; a merge's key is "a b" */
static int rank_of(const bpe *m, const char *a, size_t na, const char *b, size_t nb) {
    if (!m->table) return -1;
    uint32_t h = fnv(fnv(fnv(2166136261u, a, na), " ", 1), b, nb);
    for (uint32_t i = h & m->mask;; i = (i + 1) & m->mask) {
        int32_t r = m->table[i];
        if (r < 0) return -1;
        if (m->merge_at[r] == na && m->merge_len[r] == na + 1 + nb && memcmp(m->merge[r], a, na) == 0
            && memcmp(m->merge[r] + na + 1, b, nb) == 0)
            return r;
    }
}

static int read_merges(bpe *m, const gguf_strings *merges) {
    uint64_t n = merges->n;
    if (!n) return 0;
    uint32_t slots = 1;
    while (slots < 2 * n) slots <<= 1;
    m->mask = slots - 1;
    m->merge = malloc(n * sizeof *m->merge);
    m->merge_len = malloc(n * sizeof *m->merge_len);
    m->merge_at = malloc(n * sizeof *m->merge_at);
    m->table = malloc((size_t)slots * sizeof *m->table);
    if (!m->merge || !m->merge_len || !m->merge_at || !m->table) return -1;
    memset(m->table, 0xff, (size_t)slots * sizeof *m->table);
    const uint8_t *p = merges->first;       /* bounds checked by gguf_parse */
    for (uint64_t r = 0; r < n; r++) {
        uint64_t len;
        memcpy(&len, p, 8);
        const char *s = (const char *)p + 8;
        p += 8 + len;
        m->merge[r] = s;
        m->merge_len[r] = (uint32_t)len;
        /* the pair splits at the first space after the first character (a space is one byte and
         * never inside a UTF-8 sequence, so "after the first byte" finds the same one) */
        const char *space = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        if (!space) continue;
        size_t at = (size_t)(space - s);
        m->merge_at[r] = (uint32_t)at;
        if (rank_of(m, s, at, space + 1, len - at - 1) >= 0) continue;     /* the first rank stays */
        uint32_t i = fnv(2166136261u, s, len) & m->mask;
        while (m->table[i] >= 0) i = (i + 1) & m->mask;
        m->table[i] = (int32_t)r;
    }
    return 0;
}

bpe *bpe_new(const gguf_strings *merges, const json_value *block, char *err, size_t err_len) {
    const json_value *split = json_get(block, "pre_split");
    if (!split || split->kind != JSON_ARRAY || !split->n || split->n > MAX_SPLITS) {
        const char *pre = json_str(json_get(block, "pre"));
        snprintf(err, err_len, "the BPE pre-tokenizer '%s' has no matcher in the native runtime", pre ? pre : "?");
        return NULL;
    }
    bpe *m = calloc(1, sizeof *m);
    if (!m) goto oom;
    for (size_t i = 0; i < split->n; i++) {
        const char *name = json_str(&split->items[i]);
        for (size_t k = 0; name && k < sizeof SPLITS / sizeof SPLITS[0]; k++)
            if (strcmp(name, SPLITS[k].name) == 0) m->split[m->n_split] = SPLITS[k].match;
        if (!m->split[m->n_split]) {
            snprintf(err, err_len, "pre_split '%s' is no pattern of the native runtime", name ? name : "?");
            bpe_free(m);
            return NULL;
        }
        m->n_split++;
    }
    const json_value *ignore = json_get(block, "ignore_merges");
    m->ignore_merges = ignore && ignore->kind == JSON_BOOL && ignore->number;
    if (read_merges(m, merges) != 0) goto oom;
    return m;
oom:
    bpe_free(m);
    snprintf(err, err_len, "out of memory");
    return NULL;
}

void bpe_free(bpe *m) {
    if (!m) return;
    free(m->merge); free(m->merge_len); free(m->merge_at); free(m->table);
    free(m);
}

/* ---- a word ------------------------------------------------------------------------------- */

/* GPT-2's table: bytes 0x21-0x7E, 0xA1-0xAC and 0xAE-0xFF stand for themselves, the 68 others
 * (0x00-0x20, 0x7F-0xA0, 0xAD) for U+0100 onwards in byte order */
static uint32_t byte_char(uint8_t b) {
    if (b <= 0x20) return 0x100 + b;
    if (b >= 0x7F && b <= 0xA0) return 0x121 + (b - 0x7F);
    if (b == 0xAD) return 0x143;
    return b;
}

/* the byte a character of byte_char stands for, or -1 */
static int char_byte(uint32_t cp) {
    if (cp < 0x100) return byte_char((uint8_t)cp) == cp ? (int)cp : -1;
    if (cp <= 0x120) return (int)(cp - 0x100);
    if (cp <= 0x142) return (int)(0x7F + cp - 0x121);
    return cp == 0x143 ? 0xAD : -1;
}

typedef struct {            /* scratch of one encode, grown as words need */
    char *buf;
    size_t *start, *size;
    int *prev, *next;
    size_t cap;
    merge_heap heap;
} word_scratch;

static int grow(word_scratch *w, size_t bytes) {
    if (bytes <= w->cap) return 0;
    size_t cap = 2 * bytes;
    char *buf = realloc(w->buf, 2 * cap);
    size_t *start = realloc(w->start, cap * sizeof *start), *size = realloc(w->size, cap * sizeof *size);
    int *prev = realloc(w->prev, cap * sizeof *prev), *next = realloc(w->next, cap * sizeof *next);
    if (buf) w->buf = buf;
    if (start) w->start = start;
    if (size) w->size = size;
    if (prev) w->prev = prev;
    if (next) w->next = next;
    if (!buf || !start || !size || !prev || !next) return -1;
    w->cap = cap;
    return 0;
}

/* the ids of one word: text[0..len) as bytes */
static int word(const bpe *m, const tokenizer *t, const char *text, size_t len, word_scratch *w, out_ids *o) {
    if (!len) return 0;
    if (grow(w, len) != 0) return -1;
    size_t n_bytes = 0;
    int n = 0;
    for (size_t i = 0; i < len; i++, n++) {     /* each byte's character, UTF-8 (1 or 2 bytes) */
        uint32_t ch = byte_char((uint8_t)text[i]);
        w->start[n] = n_bytes;
        if (ch < 0x80) {
            w->buf[n_bytes++] = (char)ch;
        } else {
            w->buf[n_bytes++] = (char)(0xC0 | ch >> 6);
            w->buf[n_bytes++] = (char)(0x80 | (ch & 0x3F));
        }
        w->size[n] = n_bytes - w->start[n];
        w->prev[n] = n - 1;
        w->next[n] = n + 1 < (int)len ? n + 1 : -1;
    }
    const char *s = w->buf;
    if (m->ignore_merges) {
        int id = tokenizer_lookup(t, s, n_bytes);
        if (id >= 0) {
            emit(o, id);
            return 0;
        }
    }
    merge_heap *h = &w->heap;
    h->n = 0;
#define TRY_PAIR(l, r) do { \
        if ((l) >= 0 && (r) >= 0) { \
            int rank_ = rank_of(m, s + w->start[l], w->size[l], s + w->start[r], w->size[r]); \
            if (rank_ >= 0 && merge_heap_push(h, (merge_pair){rank_, (l), (r), w->size[l] + w->size[r]}) != 0) \
                return -1; \
        } } while (0)
    for (int i = 1; i < n; i++) TRY_PAIR(i - 1, i);
    while (h->n) {
        merge_pair p = merge_heap_pop(h);
        /* symbols only grow rightwards: a stale pair shows as an emptied side or a new size */
        if (!w->size[p.left] || !w->size[p.right] || w->size[p.left] + w->size[p.right] != p.size) continue;
        w->size[p.left] += w->size[p.right];
        w->size[p.right] = 0;
        w->next[p.left] = w->next[p.right];
        if (w->next[p.right] >= 0) w->prev[w->next[p.right]] = p.left;
        TRY_PAIR(w->prev[p.left], p.left);
        TRY_PAIR(p.left, w->next[p.left]);
    }
#undef TRY_PAIR
    for (int i = 0; i != -1; i = w->next[i]) {
        int id = tokenizer_lookup(t, s + w->start[i], w->size[i]);
        if (id >= 0) {
            emit(o, id);
            continue;
        }
        /* as llama.cpp: each byte looked up as a one-byte token, so only ASCII is found */
        for (size_t b = 0; b < w->size[i]; b++) {
            const char *ch = s + w->start[i] + b;
            int byte_id = (uint8_t)*ch < 0x80 ? tokenizer_lookup(t, ch, 1) : -1;
            if (byte_id >= 0) emit(o, byte_id);
        }
    }
    return 0;
}

/* split characters [from, to) of c by patterns k.. and encode the words */
static int split(const bpe *m, const tokenizer *t, int k, const chars *c, size_t from, size_t to, word_scratch *w,
                 out_ids *o) {
    if (from == to) return 0;
    if (k == m->n_split) return word(m, t, c->text + c->off[from], c->off[to] - c->off[from], w, o);
    size_t gap = from;      /* text no match took since the last match */
    for (size_t i = from; i < to;) {
        size_t n = m->split[k](c, i, to);
        if (!n) {
            i++;
            continue;
        }
        if (split(m, t, k + 1, c, gap, i, w, o) != 0 || split(m, t, k + 1, c, i, i + n, w, o) != 0) return -1;
        i += n;
        gap = i;
    }
    return split(m, t, k + 1, c, gap, to, w, o);
}

int bpe_encode(const bpe *m, const tokenizer *t, const char *text, size_t len, out_ids *o) {
    if (!len) return 0;
    chars c = {text, malloc(len * sizeof *c.cp), malloc(len), malloc((len + 1) * sizeof *c.off), 0};
    word_scratch w = {0};
    int status = -1;
    if (!c.cp || !c.cls || !c.off) goto done;
    for (size_t i = 0; i < len; c.n++) {
        size_t n;
        c.off[c.n] = i;
        c.cp[c.n] = decode((const uint8_t *)text + i, len - i, &n);
        c.cls[c.n] = classes_of(c.cp[c.n]);
        i += n;
    }
    c.off[c.n] = len;
    status = split(m, t, 0, &c, 0, c.n, &w, o);
done:
    free(c.cp); free(c.cls); free(c.off);
    free(w.buf); free(w.start); free(w.size); free(w.prev); free(w.next); free(w.heap.items);
    return status;
}

/* ---- decode ------------------------------------------------------------------------------- */

size_t bpe_piece(const char *text, size_t len, char *out) {
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        size_t k;
        uint32_t cp = decode((const uint8_t *)text + i, len - i, &k);
        int byte = char_byte(cp);
        if (byte >= 0) {
            out[n++] = (char)byte;
        } else {
            memcpy(out + n, text + i, k);       /* no byte's character: its own bytes */
            n += k;
        }
        i += k;
    }
    return n;
}
