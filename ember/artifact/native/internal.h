/* What the runtime's C files share (not part of the API). */
#ifndef EMBER_INTERNAL_H
#define EMBER_INTERNAL_H

#include "ember_runtime.h"
#include "gguf.h"
#include "json.h"

#define EMBER_ERR 512

typedef struct tokenizer tokenizer;

/* tokenizer.c: built from the GGUF's vocabulary and the manifest's native.tokenizer block */
tokenizer *tokenizer_new(const gguf_file *g, const json_value *block, int n_vocab, char *err, size_t err_len);
void tokenizer_free(tokenizer *t);
int tokenizer_encode(tokenizer *t, const char *text, size_t len, int add_special, int parse_special,
                     int32_t *ids, int cap);
const char *tokenizer_piece(tokenizer *t, int32_t id, int skip_special, size_t *len);
int tokenizer_is_eog(const tokenizer *t, int32_t id);

void ember_set_error(ember_rt *rt, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
