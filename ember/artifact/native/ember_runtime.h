/* ember's native runtime: runs a cpu artifact written by `ember compile` without Python.
 *
 * An artifact folder holds manifest.json (every file's sha256, the step shapes, and per step the
 * calling convention of its library: inputs, outputs, constants, arena), the step libraries
 * (steps/<shape>.so, each exporting ember_graph_run), kernels.so they link against, derived
 * constants (constants/NNN.npy) and the path and sha256 of the GGUF whose tensors are the other
 * constants. The runtime checks the manifest and the files (those unchanged since they last
 * matched are not hashed again: verified.c), memory-maps the GGUF (weights are never copied), owns
 * the KV caches, the recurrent state planes and the arena, and evaluates batches the way ember's
 * Python ArtifactSession does (ember/artifact/session.py): prompt steps of the artifact's prompt
 * size, then single tokens (a transformer's shorter rest of a prompt as one padded prompt step,
 * which batch-invariant kernels make the same), with the same positions, cache slots, masks and
 * state planes, so logits agree bit for bit. The tokenizer (SentencePiece or byte-level BPE) is
 * ember's, in C.
 *
 * Every function that can fail returns a negative value (or NULL) and leaves one line saying why
 * in ember_error(rt) (ember_open: in err). Plain C11 + POSIX (mmap, dlopen): the same sources
 * build for x86-64 and, with a cross compiler, for aarch64. */
#ifndef EMBER_RUNTIME_H
#define EMBER_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

typedef struct ember_rt ember_rt;

/* What ember_open checks beyond its default: every artifact file's sha256 and the GGUF's
 * header's are checked, except files the record of verified files (ARTIFACT/.ember-run-verified)
 * shows unchanged since they last matched; the GGUF's size always. */
enum {
    EMBER_VERIFY_MODEL = 1,       /* also the whole GGUF's sha256 */
    EMBER_VERIFY_ARTIFACT = 2,    /* hash every file again, whatever the record says */
};

/* Open the artifact in dir. model_path: the GGUF (NULL: the manifest's path); n_threads: CPU
 * threads (<= 0: one per CPU this process may run on); verify: EMBER_VERIFY_* flags (0: the default checks; the
 * header names every tensor with its type, shape and offset). NULL on failure, the reason in err
 * (one line). */
ember_rt *ember_open(const char *dir, const char *model_path, int n_threads, int verify,
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

/* cold-start figures: seconds spent in ember_open checking checksums, loading libraries; the
 * files it hashed and those it found unchanged since they last matched (the model's header counts
 * as one file) */
double ember_open_seconds(const ember_rt *rt);
void ember_open_checks(const ember_rt *rt, int *hashed, int *unchanged);

#endif
