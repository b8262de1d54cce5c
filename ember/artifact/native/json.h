/* A minimal JSON reader for manifest.json: the whole text parsed into a tree of values. */
#ifndef EMBER_JSON_H
#define EMBER_JSON_H

#include <stddef.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_kind;

typedef struct json_value {
    json_kind kind;
    double number;            /* JSON_NUMBER, JSON_BOOL (0/1) */
    char *string;             /* JSON_STRING: UTF-8, NUL-terminated */
    size_t n;                 /* JSON_ARRAY, JSON_OBJECT: members */
    struct json_value *items; /* members (for an object, keys[i] names items[i]) */
    char **keys;
} json_value;

/* The tree of text (len bytes), or NULL with a one-line reason in err. */
json_value *json_parse(const char *text, size_t len, char *err, size_t err_len);
void json_free(json_value *v);
/* The member key of an object, or NULL (also when v is not an object). */
const json_value *json_get(const json_value *v, const char *key);
const char *json_str(const json_value *v);           /* NULL unless a string */
int json_is_int(const json_value *v);                 /* a number with an integer value */

#endif
