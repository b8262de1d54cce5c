/* What the runtime's C files share (not part of the API). */
#ifndef EMBER_INTERNAL_H
#define EMBER_INTERNAL_H

#include "ember_runtime.h"
#include "gguf.h"
#include "json.h"

#define EMBER_ERR 512

typedef struct tokenizer tokenizer;

/* The ids an encode makes: stored while they fit in cap, counted beyond it. */
typedef struct {
    int32_t *ids;
    int n, cap;
} out_ids;

static inline void emit(out_ids *o, int32_t id) {
    if (o->n < o->cap) o->ids[o->n] = id;
    o->n++;
}

/* Candidate merges of adjacent symbols, popped lowest key first, then the leftmost pair (SPM:
 * key -score, the best piece first; BPE: key rank); size: the merged symbol's bytes. */
typedef struct {
    double key;
    int left, right;
    size_t size;
} merge_pair;

typedef struct {
    merge_pair *items;
    size_t n, cap;
} merge_heap;

int merge_heap_push(merge_heap *h, merge_pair p);       /* 0, or -1 out of memory */
merge_pair merge_heap_pop(merge_heap *h);

/* tokenizer.c: built from the GGUF's vocabulary and the manifest's native.tokenizer block */
tokenizer *tokenizer_new(const gguf_file *g, const json_value *block, int n_vocab, char *err, size_t err_len);
void tokenizer_free(tokenizer *t);
int tokenizer_encode(tokenizer *t, const char *text, size_t len, int add_special, int parse_special,
                     int32_t *ids, int cap);
const char *tokenizer_piece(tokenizer *t, int32_t id, int skip_special, size_t *len);
int tokenizer_is_eog(const tokenizer *t, int32_t id);
int tokenizer_lookup(const tokenizer *t, const char *s, size_t n);     /* the id of a piece, or -1 */

/* bpe.c: byte-level BPE, its pre-tokenizer from the native.tokenizer block (pre_split,
 * ignore_merges) and its merges from the GGUF */
typedef struct bpe bpe;
bpe *bpe_new(const gguf_strings *merges, const json_value *block, char *err, size_t err_len);
void bpe_free(bpe *m);
/* appends the ids of a fragment without special tokens; 0, or -1 out of memory */
int bpe_encode(const bpe *m, const tokenizer *t, const char *text, size_t len, out_ids *o);
/* a token's bytes: GPT-2's byte characters turned back into bytes (out: at least len bytes) */
size_t bpe_piece(const char *text, size_t len, char *out);

/* verified.c: the record of the files found to match their checksums (ARTIFACT/.ember-run-verified) */
typedef struct verified verified;
struct stat;
/* the record for this manifest (an empty one when there is none, or it is damaged or for
 * another manifest); NULL only when out of memory, which every function below accepts */
verified *verified_read(const char *dir, const char *manifest_text, size_t manifest_len);
/* whether the file key (a manifest path, or the model's absolute path) is as it was when it matched */
int verified_unchanged(const verified *v, const char *key, const struct stat *st);
/* key (st: as it was before it was read) matched its checksum now */
void verified_note(verified *v, const char *key, const struct stat *st);
void verified_write(verified *v);          /* when something new was noted; failure leaves no record */
void verified_free(verified *v);

void ember_set_error(ember_rt *rt, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
