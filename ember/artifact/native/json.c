/* A minimal JSON reader (RFC 8259): enough for manifest.json, and strict, so a damaged manifest
 * is an error rather than a guess. Depth is bounded; strings are decoded to UTF-8. */
#include "json.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct {
    const char *p, *end;
    char *err;
    size_t err_len;
    int failed;
} reader;

static void fail(reader *r, const char *what) {
    if (!r->failed)
        snprintf(r->err, r->err_len, "%s", what);
    r->failed = 1;
}

static void skip_space(reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int parse_value(reader *r, json_value *out, int depth);

static int hex4(reader *r, unsigned *out) {
    if (r->end - r->p < 4) return 0;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = r->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    r->p += 4;
    *out = v;
    return 1;
}

static size_t put_utf8(char *dst, unsigned cp) {
    if (cp < 0x80) { dst[0] = (char)cp; return 1; }
    if (cp < 0x800) { dst[0] = (char)(0xC0 | (cp >> 6)); dst[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12)); dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18)); dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* A string after its opening quote; the decoded text is never longer than the source. */
static char *parse_string(reader *r) {
    const char *start = r->p;
    const char *q = start;
    while (q < r->end && *q != '"') q += (*q == '\\' && q + 1 < r->end) ? 2 : 1;
    if (q >= r->end) { fail(r, "unterminated string"); return NULL; }
    char *s = malloc((size_t)(q - start) + 1);
    if (!s) { fail(r, "out of memory"); return NULL; }
    size_t n = 0;
    while (r->p < q) {
        unsigned char c = (unsigned char)*r->p++;
        if (c < 0x20) { fail(r, "control character in a string"); free(s); return NULL; }
        if (c != '\\') { s[n++] = (char)c; continue; }
        char e = *r->p++;
        switch (e) {
        case '"': s[n++] = '"'; break;
        case '\\': s[n++] = '\\'; break;
        case '/': s[n++] = '/'; break;
        case 'b': s[n++] = '\b'; break;
        case 'f': s[n++] = '\f'; break;
        case 'n': s[n++] = '\n'; break;
        case 'r': s[n++] = '\r'; break;
        case 't': s[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (!hex4(r, &cp)) { fail(r, "bad \\u escape"); free(s); return NULL; }
            if (cp >= 0xD800 && cp < 0xDC00 && r->end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
                const char *save = r->p;
                r->p += 2;
                if (hex4(r, &lo) && lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else
                    r->p = save;
            }
            n += put_utf8(s + n, cp);    /* 6 source bytes give at most 4 */
            break;
        }
        default: fail(r, "bad escape in a string"); free(s); return NULL;
        }
    }
    r->p = q + 1;
    s[n] = 0;
    return s;
}

static int parse_number(reader *r, json_value *out) {
    const char *s = r->p;
    if (s < r->end && *s == '-') s++;
    if (s >= r->end || *s < '0' || *s > '9') { fail(r, "bad number"); return 0; }
    while (s < r->end && ((*s >= '0' && *s <= '9') || *s == '.' || *s == 'e' || *s == 'E' || *s == '+' || *s == '-'))
        s++;
    char buf[64];
    size_t len = (size_t)(s - r->p);
    if (len >= sizeof buf) { fail(r, "number too long"); return 0; }
    memcpy(buf, r->p, len);
    buf[len] = 0;
    char *stop;
    out->number = strtod(buf, &stop);
    if (*stop || !isfinite(out->number)) { fail(r, "bad number"); return 0; }
    out->kind = JSON_NUMBER;
    r->p = s;
    return 1;
}

static int literal(reader *r, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) { fail(r, "unexpected character"); return 0; }
    r->p += n;
    return 1;
}

static int push(reader *r, json_value *v, size_t *cap, int with_key) {
    if (v->n < *cap) return 1;
    size_t want = *cap ? *cap * 2 : 4;
    json_value *items = realloc(v->items, want * sizeof *items);
    if (!items) { fail(r, "out of memory"); return 0; }
    v->items = items;
    if (with_key) {
        char **keys = realloc(v->keys, want * sizeof *keys);
        if (!keys) { fail(r, "out of memory"); return 0; }
        v->keys = keys;
    }
    *cap = want;
    return 1;
}

static int parse_container(reader *r, json_value *out, int depth, int object) {
    char close = object ? '}' : ']';
    size_t cap = 0;
    out->kind = object ? JSON_OBJECT : JSON_ARRAY;
    r->p++;
    skip_space(r);
    if (r->p < r->end && *r->p == close) { r->p++; return 1; }
    for (;;) {
        if (!push(r, out, &cap, object)) return 0;
        json_value *item = &out->items[out->n];
        memset(item, 0, sizeof *item);
        if (object) {
            out->keys[out->n] = NULL;
            skip_space(r);
            if (r->p >= r->end || *r->p != '"') { fail(r, "expected a key"); return 0; }
            r->p++;
            char *key = parse_string(r);
            if (!key) return 0;
            out->keys[out->n] = key;
            skip_space(r);
            if (r->p >= r->end || *r->p != ':') { out->n++; fail(r, "expected ':'"); return 0; }
            r->p++;
        }
        out->n++;
        if (!parse_value(r, item, depth + 1)) return 0;
        skip_space(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        if (r->p < r->end && *r->p == close) { r->p++; return 1; }
        fail(r, object ? "expected ',' or '}'" : "expected ',' or ']'");
        return 0;
    }
}

static int parse_value(reader *r, json_value *out, int depth) {
    if (depth > MAX_DEPTH) { fail(r, "nested too deep"); return 0; }
    skip_space(r);
    if (r->p >= r->end) { fail(r, "unexpected end"); return 0; }
    switch (*r->p) {
    case '{': return parse_container(r, out, depth, 1);
    case '[': return parse_container(r, out, depth, 0);
    case '"':
        r->p++;
        out->kind = JSON_STRING;
        out->string = parse_string(r);
        return out->string != NULL;
    case 't': out->kind = JSON_BOOL; out->number = 1; return literal(r, "true");
    case 'f': out->kind = JSON_BOOL; out->number = 0; return literal(r, "false");
    case 'n': out->kind = JSON_NULL; return literal(r, "null");
    default: return parse_number(r, out);
    }
}

static void free_members(json_value *v) {
    for (size_t i = 0; i < v->n; i++) {
        free_members(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->string);
}

json_value *json_parse(const char *text, size_t len, char *err, size_t err_len) {
    reader r = {text, text + len, err, err_len, 0};
    json_value *v = calloc(1, sizeof *v);
    if (!v) { snprintf(err, err_len, "out of memory"); return NULL; }
    if (parse_value(&r, v, 0)) {
        skip_space(&r);
        if (r.p != r.end) fail(&r, "text after the value");
    }
    if (r.failed) {
        char what[128];
        snprintf(what, sizeof what, "%s", err);
        snprintf(err, err_len, "%s at byte %ld", what, (long)(r.p - text));
        json_free(v);
        return NULL;
    }
    return v;
}

void json_free(json_value *v) {
    if (!v) return;
    free_members(v);
    free(v);
}

const json_value *json_get(const json_value *v, const char *key) {
    if (!v || v->kind != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < v->n; i++)
        if (strcmp(v->keys[i], key) == 0) return &v->items[i];
    return NULL;
}

const char *json_str(const json_value *v) {
    return v && v->kind == JSON_STRING ? v->string : NULL;
}

int json_is_int(const json_value *v) {
    return v && v->kind == JSON_NUMBER && v->number == floor(v->number) && fabs(v->number) < 9e15;
}
