/* SHA-256 (FIPS 180-4), to check an artifact's files against their manifest checksums. */
#ifndef EMBER_SHA256_H
#define EMBER_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t bytes;
    uint8_t block[64];
    size_t fill;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t len);
void sha256_hex(sha256_ctx *c, char out[65]);   /* finishes c */

#endif
