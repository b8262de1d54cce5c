/* A test driver of the native runtime's tokenizer (ember/artifact/native/tokenizer.c and bpe.c),
 * built with those sources by tests/artifact/test_native_tokenizer.py, so that vocabularies
 * need no compiled artifact:
 *
 *     native_tokenize VOCAB.gguf BLOCK.json < TEXTS
 *
 * BLOCK.json: a manifest's native.tokenizer block; TEXTS: texts, each followed by a NUL byte.
 * For each text two lines of ids: with BOS/EOS and special-token texts parsed, then without
 * either; then one line per token: its piece's bytes in hex ("-" for none). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static void print_ids(tokenizer *t, const char *text, size_t len, int special) {
    int cap = (int)len + 8;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n = tokenizer_encode(t, text, len, special, special, ids, cap);
    if (n > cap) {
        free(ids);
        ids = malloc((size_t)n * sizeof *ids);
        n = tokenizer_encode(t, text, len, special, special, ids, n);
    }
    for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
    printf("\n");
    free(ids);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: native_tokenize VOCAB.gguf BLOCK.json < TEXTS\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) { perror(argv[1]); return 1; }
    uint8_t *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    char err[512];
    gguf_file g;
    if (map == MAP_FAILED || gguf_parse(&g, map, (size_t)st.st_size, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s\n", argv[1], map == MAP_FAILED ? "cannot map" : err);
        return 1;
    }
    FILE *f = fopen(argv[2], "rb");
    static char json[1 << 20];
    size_t json_len = f ? fread(json, 1, sizeof json, f) : 0;
    json_value *block = json_parse(json, json_len, err, sizeof err);
    tokenizer *t = block ? tokenizer_new(&g, block, (int)g.tokens.n, err, sizeof err) : NULL;
    if (!t) {
        fprintf(stderr, "tokenizer: %s\n", err);
        return 1;
    }
    size_t cap = 1 << 16, len = 0;
    char *text = malloc(cap);
    for (int c; (c = getchar()) != EOF;) {
        if (c) {
            if (len + 1 == cap) text = realloc(text, cap *= 2);
            text[len++] = (char)c;
            continue;
        }
        print_ids(t, text, len, 1);
        print_ids(t, text, len, 0);
        len = 0;
    }
    for (int id = 0; id < (int)g.tokens.n; id++) {
        size_t n;
        const char *piece = tokenizer_piece(t, id, 0, &n);
        if (!n) printf("-");
        for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)piece[i]);
        printf("\n");
    }
    return 0;
}

/* tokenizer.c declares the runtime's error setter in internal.h; nothing here calls it */
void ember_set_error(ember_rt *rt, const char *fmt, ...) { (void)rt; (void)fmt; }
