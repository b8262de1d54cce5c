/* Reading a GGUF file in place: the header, the metadata the runtime needs (the tokenizer's
 * vocabulary and BPE merges) and the tensor table, all bounds-checked against the mapped file. */
#ifndef EMBER_GGUF_H
#define EMBER_GGUF_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char *name;   /* not NUL-terminated: name_len bytes in the mapping */
    size_t name_len;
    uint32_t type;      /* ggml type id */
    uint64_t n_elements;
    uint64_t offset;    /* from the data section */
    const uint8_t *data;
} gguf_tensor;

typedef struct {        /* an array of strings in the mapping: each a u64 length, then bytes */
    uint64_t n;
    const uint8_t *first;
} gguf_strings;

typedef struct {
    const uint8_t *base;
    size_t size;
    size_t header_bytes;    /* up to the data section (header, metadata, tensor table, padding) */
    uint64_t n_tensors;
    gguf_tensor *tensors;
    gguf_strings tokens;    /* tokenizer.ggml.tokens (n == 0: none) */
    gguf_strings merges;    /* tokenizer.ggml.merges (n == 0: none), BPE vocabularies */
    const float *scores;    /* tokenizer.ggml.scores (NULL: none), f32 */
    uint64_t n_scores;
    const int32_t *token_types;     /* tokenizer.ggml.token_type (NULL: none), i32 */
    uint64_t n_token_types;
} gguf_file;

/* Parse the mapping (base, size); 0, or -1 with a one-line reason in err. */
int gguf_parse(gguf_file *g, const uint8_t *base, size_t size, char *err, size_t err_len);
void gguf_release(gguf_file *g);
const gguf_tensor *gguf_find(const gguf_file *g, const char *name);
/* Bytes of a tensor of a ggml type with n elements; 0 for a type this table does not know. */
uint64_t gguf_tensor_bytes(uint32_t type, uint64_t n_elements);

#endif
