/* GGUF (ggml's file format, docs/gguf.md in ggml): magic "GGUF", version 2 or 3, tensor and
 * metadata counts, metadata key/value pairs, tensor infos, then the data section at the
 * alignment (general.alignment, default 32). Every read is checked against the file's size, so
 * a truncated or damaged file is an error, never a read past the mapping. */
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64, T_I64, T_F64 };

typedef struct {
    const uint8_t *p, *end;
    int failed;
} cursor;

static int take(cursor *c, void *out, size_t n) {
    if (c->failed || (size_t)(c->end - c->p) < n) { c->failed = 1; return 0; }
    if (out) memcpy(out, c->p, n);
    c->p += n;
    return 1;
}

static uint64_t u64(cursor *c) { uint64_t v = 0; take(c, &v, 8); return v; }
static uint32_t u32(cursor *c) { uint32_t v = 0; take(c, &v, 4); return v; }

static const uint8_t *string(cursor *c, uint64_t *len) {
    *len = u64(c);
    const uint8_t *s = c->p;
    if (*len > (uint64_t)(c->end - c->p)) { c->failed = 1; return NULL; }
    c->p += *len;
    return s;
}

static size_t scalar_size(uint32_t type) {
    switch (type) {
    case T_U8: case T_I8: case T_BOOL: return 1;
    case T_U16: case T_I16: return 2;
    case T_U32: case T_I32: case T_F32: return 4;
    case T_U64: case T_I64: case T_F64: return 8;
    default: return 0;
    }
}

static void skip_value(cursor *c, uint32_t type, int depth) {
    uint64_t len;
    if (type == T_STRING) { string(c, &len); return; }
    if (type == T_ARRAY) {
        uint32_t item = u32(c);
        uint64_t n = u64(c);
        if (depth > 2) { c->failed = 1; return; }
        size_t size = scalar_size(item);
        if (size) {
            if (n > (uint64_t)(c->end - c->p) / size) { c->failed = 1; return; }
            c->p += n * size;
            return;
        }
        for (uint64_t i = 0; i < n && !c->failed; i++) skip_value(c, item, depth + 1);
        return;
    }
    size_t size = scalar_size(type);
    if (!size) { c->failed = 1; return; }
    take(c, NULL, size);
}

static int key_is(const uint8_t *key, uint64_t len, const char *want) {
    return len == strlen(want) && memcmp(key, want, len) == 0;
}

/* block size and bytes per block of ggml's types (ggml.c type_traits) */
uint64_t gguf_tensor_bytes(uint32_t type, uint64_t n) {
    static const struct { uint32_t type, block, bytes; } traits[] = {
        {0, 1, 4}, {1, 1, 2}, {2, 32, 18}, {3, 32, 20}, {6, 32, 22}, {7, 32, 24}, {8, 32, 34},
        {9, 32, 36}, {10, 256, 84}, {11, 256, 110}, {12, 256, 144}, {13, 256, 176}, {14, 256, 210},
        {15, 256, 292}, {20, 32, 18}, {23, 256, 136}, {24, 1, 1}, {25, 1, 2}, {26, 1, 4}, {27, 1, 8},
        {28, 1, 8}, {30, 1, 2}, {39, 32, 17},
    };
    for (size_t i = 0; i < sizeof traits / sizeof traits[0]; i++)
        if (traits[i].type == type)
            return n % traits[i].block ? 0 : n / traits[i].block * traits[i].bytes;
    return 0;
}

int gguf_parse(gguf_file *g, const uint8_t *base, size_t size, char *err, size_t err_len) {
    memset(g, 0, sizeof *g);
    g->base = base;
    g->size = size;
    cursor c = {base, base + size, 0};
    char magic[4];
    if (!take(&c, magic, 4) || memcmp(magic, "GGUF", 4) != 0) {
        snprintf(err, err_len, "not a GGUF file (no GGUF magic)");
        return -1;
    }
    uint32_t version = u32(&c);
    if (version != 2 && version != 3) {
        snprintf(err, err_len, "GGUF version %u is not supported (2 or 3)", version);
        return -1;
    }
    g->n_tensors = u64(&c);
    uint64_t n_kv = u64(&c);
    uint64_t alignment = 32;
    for (uint64_t i = 0; i < n_kv && !c.failed; i++) {
        uint64_t klen;
        const uint8_t *key = string(&c, &klen);
        uint32_t type = u32(&c);
        if (c.failed) break;
        if (type == T_ARRAY && (key_is(key, klen, "tokenizer.ggml.tokens") || key_is(key, klen, "tokenizer.ggml.scores")
                                || key_is(key, klen, "tokenizer.ggml.token_type")
                                || key_is(key, klen, "tokenizer.ggml.merges"))) {
            const uint8_t *save = c.p;
            uint32_t item = u32(&c);
            uint64_t n = u64(&c);
            const uint8_t *first = c.p;
            c.p = save;
            if (key_is(key, klen, "tokenizer.ggml.tokens") && item == T_STRING) {
                g->tokens.n = n;
                g->tokens.first = first;
            } else if (key_is(key, klen, "tokenizer.ggml.merges") && item == T_STRING) {
                g->merges.n = n;
                g->merges.first = first;
            } else if (key_is(key, klen, "tokenizer.ggml.scores") && item == T_F32) {
                g->scores = (const float *)first;
                g->n_scores = n;
            } else if (key_is(key, klen, "tokenizer.ggml.token_type") && item == T_I32) {
                g->token_types = (const int32_t *)first;
                g->n_token_types = n;
            }
        }
        if (type == T_U32 && key_is(key, klen, "general.alignment")) {
            const uint8_t *save = c.p;
            alignment = u32(&c);
            c.p = save;
        }
        skip_value(&c, type, 0);
    }
    if (c.failed) {
        snprintf(err, err_len, "truncated or damaged GGUF metadata");
        return -1;
    }
    if (alignment == 0 || (alignment & (alignment - 1)) || g->n_tensors > (uint64_t)(c.end - c.p) / 24) {
        snprintf(err, err_len, "damaged GGUF header (alignment %llu, %llu tensors)",
                 (unsigned long long)alignment, (unsigned long long)g->n_tensors);
        return -1;
    }
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->tensors) { snprintf(err, err_len, "out of memory"); return -1; }
    for (uint64_t i = 0; i < g->n_tensors && !c.failed; i++) {
        gguf_tensor *t = &g->tensors[i];
        uint64_t len;
        t->name = (const char *)string(&c, &len);
        t->name_len = len;
        uint32_t n_dims = u32(&c);
        if (n_dims > 8) { c.failed = 1; break; }
        t->n_elements = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            uint64_t dim = u64(&c);
            if (dim && t->n_elements > UINT64_MAX / dim) c.failed = 1;
            t->n_elements *= dim;
        }
        t->type = u32(&c);
        t->offset = u64(&c);
    }
    if (c.failed) {
        gguf_release(g);
        snprintf(err, err_len, "truncated or damaged GGUF tensor table");
        return -1;
    }
    uint64_t data_start = ((uint64_t)(c.p - base) + alignment - 1) / alignment * alignment;
    if (data_start > size && !g->n_tensors) data_start = size;     /* a vocabulary-only file may end unpadded */
    if (data_start > size) {
        gguf_release(g);
        snprintf(err, err_len, "truncated GGUF (no data section)");
        return -1;
    }
    g->header_bytes = (size_t)data_start;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        uint64_t bytes = gguf_tensor_bytes(t->type, t->n_elements);
        if (t->offset > size || data_start > size - t->offset || bytes > size - data_start - t->offset) {
            snprintf(err, err_len, "tensor %.*s lies outside the file (truncated?)", (int)t->name_len, t->name);
            gguf_release(g);
            return -1;
        }
        t->data = base + data_start + t->offset;
    }
    return 0;
}

void gguf_release(gguf_file *g) {
    free(g->tensors);
    g->tensors = NULL;
}

const gguf_tensor *gguf_find(const gguf_file *g, const char *name) {
    size_t len = strlen(name);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (g->tensors[i].name_len == len && memcmp(g->tensors[i].name, name, len) == 0)
            return &g->tensors[i];
    return NULL;
}
