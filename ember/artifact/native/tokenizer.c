/* The tokenizer in C, giving the ids ember.models.tokenizer gives (and llama.cpp's
 * llama-vocab.cpp): special-token texts cut out first, longest first (control texts only when
 * parse_special); then each remaining fragment by the vocabulary's algorithm: SentencePiece-style
 * merging (here: the highest scoring adjacent pair whose concatenation is a piece merges first,
 * the leftmost on ties; a symbol left that is no piece falls back to its <0xXX> byte tokens), or
 * byte-level BPE (bpe.c). The vocabulary, scores, token types and merges come from the
 * memory-mapped GGUF; the flags, special ids and BPE pre-tokenizer that ember.models.tokenizer
 * derives from the metadata come from the manifest's native.tokenizer. */
#define _GNU_SOURCE
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6 };

static const char SPACE_MARK[] = "\xe2\x96\x81";   /* U+2581, SentencePiece's visible space */

typedef struct {
    uint32_t hash;              /* the piece's, so that most probes need not look at its text */
    int32_t id;                 /* -1: empty */
} slot;

struct tokenizer {
    int n;
    const char **text;
    uint32_t *len;
    float *score;
    int32_t *type;
    uint8_t *control, *eog;
    slot *table;                /* open addressing: piece -> id */
    uint32_t mask;
    int32_t *special;           /* longest text first */
    int n_special;
    int32_t byte_ids[256];
    int bos, eos, unk, add_bos, add_eos, add_space_prefix;
    bpe *bpe;                   /* byte-level BPE; NULL: SentencePiece */
    char **pieces;              /* decoded pieces, made on first use */
    size_t *piece_len;
};

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;   /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

int tokenizer_lookup(const tokenizer *t, const char *s, size_t n) {
    uint32_t h = hash(s, n);
    for (uint32_t i = h & t->mask;; i = (i + 1) & t->mask) {
        const slot *e = &t->table[i];
        if (e->id < 0) return -1;
        if (e->hash == h && t->len[e->id] == n && memcmp(t->text[e->id], s, n) == 0) return e->id;
    }
}

/* The table of the pieces, refusing a piece listed twice. The hashes come first and each slot
 * is fetched a few pieces ahead: a 262k vocabulary's table is megabytes of random accesses, and
 * waiting on each miss in turn cost most of the time an artifact took to open. */
static int index_pieces(tokenizer *t, char *err, size_t err_len) {
    uint32_t *hashes = malloc((size_t)t->n * sizeof *hashes);
    if (!hashes) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    for (int i = 0; i < t->n; i++) hashes[i] = hash(t->text[i], t->len[i]);
    memset(t->table, 0xff, ((size_t)t->mask + 1) * sizeof *t->table);
    for (int i = 0; i < t->n; i++) {
#if defined(__GNUC__)
        if (i + 16 < t->n) __builtin_prefetch(&t->table[hashes[i + 16] & t->mask], 1);
#endif
        uint32_t h = hashes[i];
        for (uint32_t k = h & t->mask;; k = (k + 1) & t->mask) {
            slot *e = &t->table[k];
            if (e->id < 0) {
                *e = (slot){h, i};
                break;
            }
            if (e->hash == h && t->len[e->id] == t->len[i] && memcmp(t->text[e->id], t->text[i], t->len[i]) == 0) {
                snprintf(err, err_len, "duplicate token %.*s in the vocabulary: ids %d and %d", (int)t->len[i],
                         t->text[i], e->id, i);
                free(hashes);
                return -1;
            }
        }
    }
    free(hashes);
    return 0;
}

static int int_of(const json_value *block, const char *key, int fallback) {
    const json_value *v = json_get(block, key);
    return json_is_int(v) ? (int)v->number : fallback;
}

static int flag_of(const json_value *block, const char *key) {
    const json_value *v = json_get(block, key);
    return v && v->kind == JSON_BOOL && v->number;
}

static const tokenizer *sort_by;
static int longer_first(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (sort_by->len[x] != sort_by->len[y]) return sort_by->len[x] > sort_by->len[y] ? -1 : 1;
    return (x > y) - (x < y);
}

tokenizer *tokenizer_new(const gguf_file *g, const json_value *block, int n_vocab, char *err, size_t err_len) {
    const char *kind = json_str(json_get(block, "kind"));
    if (!kind) {
        snprintf(err, err_len, "the manifest has no native.tokenizer block");
        return NULL;
    }
    if (strcmp(kind, "spm") != 0 && strcmp(kind, "bpe") != 0) {
        snprintf(err, err_len, "a %s tokenizer: the native runtime has SentencePiece (spm) and byte-level BPE (bpe)",
                 kind);
        return NULL;
    }
    if (g->tokens.n != (uint64_t)n_vocab) {
        snprintf(err, err_len, "tokenizer.ggml.tokens has %llu tokens, the model's vocabulary %d",
                 (unsigned long long)g->tokens.n, n_vocab);
        return NULL;
    }
    if ((g->scores && g->n_scores < (uint64_t)n_vocab) || (g->token_types && g->n_token_types < (uint64_t)n_vocab)) {
        snprintf(err, err_len, "tokenizer.ggml.scores / token_type are shorter than tokenizer.ggml.tokens");
        return NULL;
    }
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) goto oom;
    int n = t->n = n_vocab;
    uint32_t slots = 1;
    while (slots < 2u * (uint32_t)n) slots <<= 1;
    t->mask = slots - 1;
    t->text = malloc((size_t)n * sizeof *t->text);
    t->len = malloc((size_t)n * sizeof *t->len);
    t->score = malloc((size_t)n * sizeof *t->score);
    t->type = malloc((size_t)n * sizeof *t->type);
    t->control = calloc((size_t)n, 1);
    t->eog = calloc((size_t)n, 1);
    t->table = malloc((size_t)slots * sizeof *t->table);
    t->special = malloc((size_t)n * sizeof *t->special);
    t->pieces = calloc((size_t)n, sizeof *t->pieces);
    t->piece_len = calloc((size_t)n, sizeof *t->piece_len);
    if (!t->text || !t->len || !t->score || !t->type || !t->control || !t->eog || !t->table || !t->special
        || !t->pieces || !t->piece_len)
        goto oom;
    const uint8_t *p = g->tokens.first;       /* bounds checked by gguf_parse */
    for (int i = 0; i < n; i++) {
        uint64_t len;
        memcpy(&len, p, 8);
        t->text[i] = (const char *)p + 8;
        t->len[i] = (uint32_t)len;
        p += 8 + len;
        if (g->scores) memcpy(&t->score[i], (const uint8_t *)g->scores + 4 * (size_t)i, 4);
        else t->score[i] = 0.0f;
        if (g->token_types) memcpy(&t->type[i], (const uint8_t *)g->token_types + 4 * (size_t)i, 4);
        else t->type[i] = NORMAL;
        t->control[i] = t->type[i] == CONTROL;
    }
    if (index_pieces(t, err, err_len) != 0) {
        tokenizer_free(t);
        return NULL;
    }
    const json_value *extra = json_get(block, "extra_control"), *eog = json_get(block, "eog");
    for (size_t i = 0; extra && extra->kind == JSON_ARRAY && i < extra->n; i++)
        if (json_is_int(&extra->items[i]) && extra->items[i].number >= 0 && extra->items[i].number < n)
            t->control[(int)extra->items[i].number] = 1;
    for (size_t i = 0; eog && eog->kind == JSON_ARRAY && i < eog->n; i++)
        if (json_is_int(&eog->items[i]) && eog->items[i].number >= 0 && eog->items[i].number < n)
            t->eog[(int)eog->items[i].number] = 1;
    t->bos = int_of(block, "bos", -1);
    t->eos = int_of(block, "eos", -1);
    t->unk = int_of(block, "unk", -1);
    t->add_bos = flag_of(block, "add_bos");
    t->add_eos = flag_of(block, "add_eos");
    t->add_space_prefix = flag_of(block, "add_space_prefix");
    if (t->bos >= n || t->eos >= n || t->unk >= n || (t->add_bos && t->bos < 0) || (t->add_eos && t->eos < 0)) {
        snprintf(err, err_len, "special token ids outside the vocabulary");
        tokenizer_free(t);
        return NULL;
    }
    for (int i = 0; i < n; i++)
        if (t->control[i] || t->type[i] == USER_DEFINED || t->type[i] == UNKNOWN) t->special[t->n_special++] = i;
    sort_by = t;
    qsort(t->special, (size_t)t->n_special, sizeof *t->special, longer_first);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        int id = tokenizer_lookup(t, name, 6);
        if (id < 0 && b < 0x80) {
            char c = (char)b;
            id = tokenizer_lookup(t, &c, 1);
        }
        t->byte_ids[b] = id >= 0 ? id : t->unk;
    }
    if (strcmp(kind, "bpe") == 0) {
        t->bpe = bpe_new(&g->merges, block, err, err_len);
        if (!t->bpe) {
            tokenizer_free(t);
            return NULL;
        }
    }
    return t;
oom:
    tokenizer_free(t);
    snprintf(err, err_len, "out of memory");
    return NULL;
}

void tokenizer_free(tokenizer *t) {
    if (!t) return;
    for (int i = 0; t->pieces && i < t->n; i++) free(t->pieces[i]);
    free(t->text); free(t->len); free(t->score); free(t->type); free(t->control); free(t->eog);
    free(t->table); free(t->special); free(t->pieces); free(t->piece_len);
    bpe_free(t->bpe);
    free(t);
}

int tokenizer_is_eog(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n && t->eog[id];
}

/* ---- the heap of merge candidates (SentencePiece here, BPE in bpe.c) ------------------------- */

/* the heap's order: the lowest key first, then the leftmost pair (Python's tuples compare so) */
static int before(const merge_pair *a, const merge_pair *b) {
    if (a->key != b->key) return a->key < b->key;
    if (a->left != b->left) return a->left < b->left;
    if (a->right != b->right) return a->right < b->right;
    return a->size < b->size;
}

int merge_heap_push(merge_heap *h, merge_pair p) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 64;
        merge_pair *items = realloc(h->items, cap * sizeof *items);
        if (!items) return -1;
        h->items = items;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i && before(&p, &h->items[(i - 1) / 2])) {
        h->items[i] = h->items[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->items[i] = p;
    return 0;
}

merge_pair merge_heap_pop(merge_heap *h) {
    merge_pair top = h->items[0], last = h->items[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && before(&h->items[c + 1], &h->items[c])) c++;
        if (!before(&h->items[c], &last)) break;
        h->items[i] = h->items[c];
        i = c;
    }
    if (h->n) h->items[i] = last;
    return top;
}

/* ---- SentencePiece merging ---------------------------------------------------------------- */

/* bytes of the UTF-8 character at s (1 for a byte that starts no valid sequence) */
static size_t char_len(const uint8_t *s, size_t left) {
    size_t n = s[0] < 0x80 ? 1 : (s[0] >> 5) == 6 ? 2 : (s[0] >> 4) == 14 ? 3 : (s[0] >> 3) == 30 ? 4 : 1;
    if (n > left) return 1;
    for (size_t i = 1; i < n; i++)
        if ((s[i] & 0xC0) != 0x80) return 1;
    return n;
}

static int spm(tokenizer *t, const char *text, size_t len, out_ids *o) {
    if (!len) return 0;
    size_t *start = malloc(len * sizeof *start), *size = malloc(len * sizeof *size);
    int *prev = malloc(len * sizeof *prev), *next = malloc(len * sizeof *next);
    merge_heap h = {0};
    int status = -1, n = 0;
    if (!start || !size || !prev || !next) goto done;
    for (size_t i = 0; i < len; n++) {
        start[n] = i;
        size[n] = char_len((const uint8_t *)text + i, len - i);
        i += size[n];
    }
    for (int i = 0; i < n; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < n ? i + 1 : -1;
    }
#define TRY_PAIR(l, r) do { \
        if ((l) >= 0 && (r) >= 0) { \
            int id_ = tokenizer_lookup(t, text + start[l], size[l] + size[r]); \
            if (id_ >= 0 && merge_heap_push(&h, (merge_pair){-(double)t->score[id_], (l), (r), size[l] + size[r]}) != 0) \
                goto done; \
        } } while (0)
    for (int i = 1; i < n; i++) TRY_PAIR(i - 1, i);
    while (h.n) {
        merge_pair p = merge_heap_pop(&h);
        /* symbols only grow rightwards: a stale pair shows as an emptied side or a new size */
        if (!size[p.left] || !size[p.right] || size[p.left] + size[p.right] != p.size) continue;
        size[p.left] += size[p.right];
        size[p.right] = 0;
        next[p.left] = next[p.right];
        if (next[p.right] >= 0) prev[next[p.right]] = p.left;
        TRY_PAIR(prev[p.left], p.left);
        TRY_PAIR(p.left, next[p.left]);
    }
#undef TRY_PAIR
    for (int i = 0; i != -1 && n; i = next[i]) {
        int id = tokenizer_lookup(t, text + start[i], size[i]);
        if (id >= 0) {
            emit(o, id);
            continue;
        }
        for (size_t b = 0; b < size[i]; b++) {
            int byte_id = t->byte_ids[(uint8_t)text[start[i] + b]];
            if (byte_id >= 0) emit(o, byte_id);
        }
    }
    status = 0;
done:
    free(start); free(size); free(prev); free(next); free(h.items);
    return status;
}

/* ---- encode ------------------------------------------------------------------------------- */

typedef struct {
    int32_t token;      /* a special token, or -1 for text[start, start + len) */
    size_t start, len;
} fragment;

int tokenizer_encode(tokenizer *t, const char *text, size_t len, int add_special, int parse_special, int32_t *ids,
                     int cap) {
    out_ids o = {ids, 0, cap};
    size_t n_frag = len ? 1 : 0, cap_frag = 16;
    fragment *frags = malloc(cap_frag * sizeof *frags);
    char *buf = malloc(3 * len + 4);
    int status = -1;
    if (!frags || !buf) goto done;
    frags[0] = (fragment){-1, 0, len};
    for (int s = 0; s < t->n_special && n_frag; s++) {
        int tok = t->special[s];
        if (!parse_special && (t->control[tok] || t->type[tok] == UNKNOWN)) continue;
        const char *piece = t->text[tok];
        size_t plen = t->len[tok];
        if (!plen || !memmem(text, len, piece, plen)) continue;
        for (size_t f = 0; f < n_frag; f++) {
            if (frags[f].token >= 0) continue;
            const char *at = memmem(text + frags[f].start, frags[f].len, piece, plen);
            if (!at) continue;
            /* cut fragment f at its first match: [before] tok [after], and look at [after] next */
            size_t before = (size_t)(at - text) - frags[f].start, after = frags[f].len - before - plen;
            size_t add = (before ? 1 : 0) + (after ? 1 : 0);
            if (n_frag + add >= cap_frag) {
                cap_frag = 2 * (n_frag + add);
                fragment *grown = realloc(frags, cap_frag * sizeof *frags);
                if (!grown) goto done;
                frags = grown;
            }
            fragment tail = {-1, (size_t)(at - text) + plen, after};
            memmove(&frags[f + 1 + add], &frags[f + 1], (n_frag - f - 1) * sizeof *frags);
            size_t k = f;
            if (before) frags[k++] = (fragment){-1, frags[f].start, before};
            frags[k++] = (fragment){tok, 0, 0};
            if (after) frags[k] = tail;
            n_frag += add;
            f = k - 1;      /* the loop's f++ visits the tail */
        }
    }
    if (add_special && t->add_bos) emit(&o, t->bos);
    int prev_special = 1;   /* the first fragment gets the space prefix */
    for (size_t f = 0; f < n_frag; f++) {
        if (frags[f].token >= 0) {
            emit(&o, frags[f].token);
            prev_special = 1;
            continue;
        }
        if (t->bpe) {
            if (bpe_encode(t->bpe, t, text + frags[f].start, frags[f].len, &o) != 0) goto done;
            continue;
        }
        size_t n = 0;
        if (t->add_space_prefix && prev_special) {
            memcpy(buf, SPACE_MARK, 3);
            n = 3;
        }
        for (size_t i = 0; i < frags[f].len; i++) {
            char c = text[frags[f].start + i];
            if (c == ' ') {
                memcpy(buf + n, SPACE_MARK, 3);
                n += 3;
            } else {
                buf[n++] = c;
            }
        }
        if (spm(t, buf, n, &o) != 0) goto done;
        prev_special = 0;
    }
    if (add_special && t->add_eos) emit(&o, t->eos);
    status = o.n;
done:
    free(frags);
    free(buf);
    return status;
}

/* ---- decode ------------------------------------------------------------------------------- */

static int hex_digit(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* SentencePiece's visible spaces back to spaces (out: at least len bytes) */
static size_t spm_piece(const char *text, size_t len, char *out) {
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        if (len - i >= 3 && memcmp(text + i, SPACE_MARK, 3) == 0) {
            out[n++] = ' ';
            i += 3;
        } else {
            out[n++] = text[i++];
        }
    }
    return n;
}

const char *tokenizer_piece(tokenizer *t, int32_t id, int skip_special, size_t *len) {
    int kind = t->type[id];
    *len = 0;
    if (skip_special && (t->control[id] || kind == UNKNOWN)) return "";
    if (t->control[id] || kind == UNKNOWN || kind == USER_DEFINED) {
        *len = t->len[id];
        return t->text[id];
    }
    if (kind == BYTE) {
        static char bytes[256];
        int hi = t->len[id] >= 6 ? hex_digit(t->text[id][3]) : -1, lo = t->len[id] >= 6 ? hex_digit(t->text[id][4]) : -1;
        if (hi < 0 || lo < 0) return "";
        bytes[hi * 16 + lo] = (char)(hi * 16 + lo);
        *len = 1;
        return &bytes[hi * 16 + lo];
    }
    if (kind != NORMAL) return "";     /* unused and undefined tokens render as nothing */
    if (!t->pieces[id]) {
        char *piece = malloc(t->len[id] + 1);
        if (!piece) return "";
        t->pieces[id] = piece;
        t->piece_len[id] = t->bpe ? bpe_piece(t->text[id], t->len[id], piece) : spm_piece(t->text[id], t->len[id], piece);
    }
    *len = t->piece_len[id];
    return t->pieces[id];
}
