/* ember's native runtime: runs a cpu artifact written by `ember compile` without Python.
 *
 * An artifact folder holds manifest.json (every file's sha256, the step shapes, and per step the
 * calling convention of its library: inputs, outputs, constants, arena), the step libraries
 * (steps/<shape>.so, each exporting ember_graph_run), kernels.so they link against, derived
 * constants (constants/NNN.npy) and the path and sha256 of the GGUF whose tensors are the other
 * constants. The runtime checks the manifest and the files, memory-maps the GGUF (weights are
 * never copied), owns the KV caches and the arena, and evaluates batches the way ember's Python
 * ArtifactSession does (ember/artifact/session.py): prompt steps of the artifact's prompt size,
 * then single tokens, with the same positions, cache slots and masks, so logits agree bit for bit.
 *
 * Every function that can fail returns a negative value (or NULL) and leaves one line saying why
 * in ember_error(rt) (ember_open: in err). Plain C11 + POSIX (mmap, dlopen): the same sources
 * build for x86-64 and, with a cross compiler, for aarch64. */
#ifndef EMBER_RUNTIME_H
#define EMBER_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

typedef struct ember_rt ember_rt;

/* Open the artifact in dir. model_path: the GGUF (NULL: the manifest's path); n_threads: CPU
 * threads (<= 0: one per CPU this process may run on); verify_model: also check the GGUF's
 * sha256 (its size and the sha256 of its header, which names every tensor with its type, shape
 * and offset, are always checked). NULL on failure, the reason in err (one line). */
ember_rt *ember_open(const char *dir, const char *model_path, int n_threads, int verify_model,
                     char *err, size_t err_len);
void ember_close(ember_rt *rt);
const char *ember_error(const ember_rt *rt);

int ember_n_vocab(const ember_rt *rt);
int ember_n_ctx(const ember_rt *rt);
int ember_n_past(const ember_rt *rt);     /* tokens in the KV cache */
void ember_reset(ember_rt *rt);           /* an empty cache */

/* Token ids of text (len bytes, UTF-8): BOS first when add_special and the model adds one;
 * parse_special: control-token text (e.g. <start_of_turn>) becomes its id. Writes at most cap
 * ids; returns how many there are (more than cap: call again with a larger buffer), or -1. */
int ember_tokenize(ember_rt *rt, const char *text, size_t len, int add_special, int parse_special,
                   int32_t *ids, int cap);
/* The bytes of one token (maybe part of a UTF-8 sequence), *len set; skip_special: control and
 * unknown tokens give no bytes. NULL for an id out of range. */
const char *ember_token_to_piece(ember_rt *rt, int32_t id, int skip_special, size_t *len);
int ember_is_eog(const ember_rt *rt, int32_t id);

/* Evaluate n tokens after the cache's; *logits: the last token's n_vocab logits (valid until the
 * next call). Returns 0 or -1. */
int ember_eval(ember_rt *rt, const int32_t *tokens, int n, const float **logits);

/* Sampling: greedy when temperature <= 0 (argmax, lowest id on ties); else llama.cpp's chain as
 * ember.runtime.sampling has it: top-k -> top-p -> min-p -> temperature -> a seeded draw. The
 * draws come from xoshiro256** (not NumPy's generator: seeded runs differ from `ember run`). */
typedef struct {
    float temperature, top_p, min_p;
    int top_k;
    uint64_t seed;
} ember_sampling;
typedef struct { uint64_t s[4]; } ember_rng;
void ember_rng_seed(ember_rng *rng, uint64_t seed);
/* The next token from n logits; -1 (and the reason in ember_error) for non-finite logits. */
int32_t ember_sample(ember_rt *rt, const float *logits, int n, const ember_sampling *p, ember_rng *rng);

/* cold-start figures: seconds spent in ember_open checking checksums, loading libraries */
double ember_open_seconds(const ember_rt *rt);

#endif
