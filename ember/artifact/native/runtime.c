#define _GNU_SOURCE
/* The runtime proper: opening and checking an artifact, its constants and step libraries, the
 * KV caches, and evaluating batches as ember's ArtifactSession does (ember/artifact/session.py
 * over ember/runtime/session.py's _Feed): a batch runs as prompt steps of the artifact's prompt
 * size while that many tokens remain, then single tokens (a transformer's rest of a prompt: one
 * padded prompt step, the same logits for less work); each step's KV length is the context
 * used so far rounded up to the KV bucket; its inputs are the tokens, their positions, the cache
 * rows they write (their positions), the row whose logits come out (the last), the causal mask
 * and, for sliding-window layers (which keep the whole context in an artifact), the window's.
 * A model with recurrent layers also carries its state: per recurrent layer and state kind a
 * table of planes (f32[planes, size]; an artifact's steps have one plane) that every step reads
 * (plane state_src) and rewrites (plane state_slots[0]) like the KV caches, zero at the start:
 * the tokens of a prompt run through it in order, as in Python's session.
 *
 * Opening checks every artifact file against its sha256 unless the record of verified files
 * (verified.c) shows it unchanged since it last matched. */
#include "internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

#include "sha256.h"

#define FORMAT "ember-artifact"
/* The artifact format this runtime reads: ember.artifact.format.FORMAT_VERSION, passed by
 * build_runtime (ember/artifact/native.py) so the two never drift apart. */
#ifndef EMBER_FORMAT_VERSION
#error "build with -DEMBER_FORMAT_VERSION=<ember.artifact.format.FORMAT_VERSION>"
#endif
#define FORMAT_VERSION EMBER_FORMAT_VERSION
#define ARENA_ALIGN 64

typedef int (*graph_fn)(void **inputs, void **outputs, void **consts, uint8_t *arena, int n_threads);

/* IN_TABLE: a KV cache (its first n_kv rows) or a recurrent state's planes (all of them) */
enum role { IN_TOKENS, IN_POS, IN_SLOTS, IN_OUT_IDS, IN_MASK, IN_MASK_SWA, IN_STATE_SRC, IN_STATE_SLOTS, IN_TABLE };

typedef struct {
    int n_tokens, n_kv, n_out;
    void *library;
    graph_fn run;
    int n_in, n_outputs, n_consts;
    void **in, **out, **consts;
    uint8_t *literal;       /* per constant: 1 when its bytes came from the manifest (ours to free) */
    enum role *roles;
    int *cache_of;          /* per input: its table (IN_TABLE), else -1 */
    int *copy_to;           /* per output: the table it is copied into after a run, else -1 */
    size_t *out_bytes;
} step;

typedef struct {
    char *name;
    uint8_t *map;
    size_t map_size;
    const uint8_t *data;
    size_t bytes;
} mapped_npy;

struct ember_rt {
    char err[EMBER_ERR];
    char dir[PATH_MAX];
    json_value *manifest;
    int n_ctx, prompt_tokens, kv_bucket, n_vocab, window, n_threads, n_past;
    int recurrent;          /* some table is a recurrent state */
    uint8_t *gguf_map;
    size_t gguf_size;
    gguf_file gguf;
    mapped_npy *npy;
    int n_npy;
    void *kernels;
    step *steps;
    int n_steps;
    char **cache_names;     /* the tables: KV caches (n_ctx rows) and recurrent states (planes) */
    uint8_t **caches;
    size_t *cache_rows, *cache_row_bytes;
    uint8_t *cache_is_state;
    int n_caches;
    uint8_t *arena;
    float *logits;
    tokenizer *tok;
    double open_seconds;
    int files_hashed, files_unchanged;      /* artifact files and model header, at open */
    int *order;             /* sampling scratch: n_vocab ids */
    double *probs;
};

void ember_set_error(ember_rt *rt, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rt->err, sizeof rt->err, fmt, ap);
    va_end(ap);
}

const char *ember_error(const ember_rt *rt) { return rt->err; }
int ember_n_vocab(const ember_rt *rt) { return rt->n_vocab; }
int ember_n_ctx(const ember_rt *rt) { return rt->n_ctx; }
int ember_n_past(const ember_rt *rt) { return rt->n_past; }
double ember_open_seconds(const ember_rt *rt) { return rt->open_seconds; }

void ember_open_checks(const ember_rt *rt, int *hashed, int *unchanged) {
    *hashed = rt->files_hashed;
    *unchanged = rt->files_unchanged;
}

void ember_reset(ember_rt *rt) {
    rt->n_past = 0;
    for (int i = 0; i < rt->n_caches; i++)      /* a recurrent state starts from zero (Session.reset) */
        if (rt->cache_is_state[i]) memset(rt->caches[i], 0, rt->cache_rows[i] * rt->cache_row_bytes[i]);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- files -------------------------------------------------------------------------------- */

static uint8_t *map_file(ember_rt *rt, const char *path, size_t *size) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        ember_set_error(rt, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        ember_set_error(rt, "%s: not a regular file", path);
        return NULL;
    }
    *size = (size_t)st.st_size;
    if (*size == 0) {
        close(fd);
        ember_set_error(rt, "%s: empty file (truncated?)", path);
        return NULL;
    }
    void *map = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        ember_set_error(rt, "%s: cannot map: %s", path, strerror(errno));
        return NULL;
    }
    return map;
}

static char *read_text(ember_rt *rt, const char *path, size_t *len) {
    uint8_t *map = map_file(rt, path, len);
    if (!map) return NULL;
    char *text = malloc(*len + 1);
    if (text) {
        memcpy(text, map, *len);
        text[*len] = 0;
    }
    munmap(map, *len);
    return text;
}

static void sha256_of(const uint8_t *data, size_t len, char hex[65]) {
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, data, len);
    sha256_hex(&c, hex);
}

/* dir/rel for a path the manifest names: relative, no "..", no backslash, not leaving the
 * folder through a link (a manifest naming /tmp/evil.so would have it loaded). */
static int inside(ember_rt *rt, const char *rel, char *out) {
    const char *manifest = "manifest.json";
    if (!rel || !*rel || rel[0] == '/' || strchr(rel, '\\')) {
        ember_set_error(rt, "%s/%s: refused: file path '%s' does not stay inside the artifact", rt->dir, manifest,
                        rel ? rel : "(not a string)");
        return -1;
    }
    for (const char *p = rel; *p;) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.') {
            ember_set_error(rt, "%s/%s: refused: file path '%s' does not stay inside the artifact", rt->dir,
                            manifest, rel);
            return -1;
        }
        p += n + (slash != NULL);
    }
    if ((size_t)snprintf(out, PATH_MAX, "%s/%s", rt->dir, rel) >= PATH_MAX) {
        ember_set_error(rt, "%s: path too long", rel);
        return -1;
    }
    char real_dir[PATH_MAX], real_file[PATH_MAX];
    if (!realpath(rt->dir, real_dir) || !realpath(out, real_file)) {
        ember_set_error(rt, "%s: missing: the artifact is incomplete", out);
        return -1;
    }
    size_t n = strlen(real_dir);
    if (strncmp(real_file, real_dir, n) != 0 || real_file[n] != '/') {
        ember_set_error(rt, "%s/%s: refused: '%s' leads outside the artifact (to %s)", rt->dir, manifest, rel,
                        real_file);
        return -1;
    }
    return 0;
}

/* Whether the file at path (key in the record) has sha256 digest: hashed unless the record
 * shows it unchanged since it last matched (force: hashed anyway); only the first `prefix`
 * bytes when prefix > 0 (the model's header). 1: it matches, 0: it does not, -1: unreadable. */
static int matches(ember_rt *rt, verified *v, const char *key, const char *path, const char *digest, size_t prefix,
                   int force) {
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0) close(fd);
        ember_set_error(rt, "%s: missing or not a regular file: the artifact is incomplete", path);
        return -1;
    }
    if (!force && verified_unchanged(v, key, &st)) {
        close(fd);
        rt->files_unchanged++;
        return 1;
    }
    size_t size = (size_t)st.st_size, n = prefix ? prefix : size;
    char hex[65];
    if (n > size) {
        close(fd);
        return 0;
    }
    void *map = n ? mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0) : NULL;
    close(fd);
    if (map == MAP_FAILED) {
        ember_set_error(rt, "%s: cannot map: %s", path, strerror(errno));
        return -1;
    }
    sha256_of(map, n, hex);
    if (map) munmap(map, n);
    rt->files_hashed++;
    if (strcmp(hex, digest) != 0) return 0;
    verified_note(v, key, &st);
    return 1;
}

static int check_files(ember_rt *rt, const json_value *files, verified *v, int force) {
    if (!files || files->kind != JSON_OBJECT) {
        ember_set_error(rt, "%s/manifest.json: corrupt: malformed manifest (no files)", rt->dir);
        return -1;
    }
    for (size_t i = 0; i < files->n; i++) {
        char path[PATH_MAX];
        const char *digest = json_str(&files->items[i]);
        if (inside(rt, files->keys[i], path) != 0) return -1;
        if (!digest) {
            ember_set_error(rt, "%s/manifest.json: corrupt: malformed manifest (checksum of %s)", rt->dir,
                            files->keys[i]);
            return -1;
        }
        int ok = matches(rt, v, files->keys[i], path, digest, 0, force);
        if (ok < 0) return -1;
        if (!ok) {
            ember_set_error(rt, "%s: checksum mismatch: the artifact is corrupt", path);
            return -1;
        }
    }
    return 0;
}

static int listed(const json_value *files, const char *rel) {
    return json_get(files, rel) != NULL;
}

/* ---- the host ----------------------------------------------------------------------------- */

/* "<machine> <model name>", as ember.artifact.format.host_cpu has it */
static void host_cpu(char *out, size_t len) {
    struct utsname u;
    const char *machine = uname(&u) == 0 ? u.machine : "unknown";
    snprintf(out, len, "%s", machine);
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        char *colon = strchr(line, ':');
        if (!colon) continue;
        char *s = colon + 1, *e = s + strlen(s);
        while (*s == ' ' || *s == '\t') s++;
        while (e > s && (e[-1] == '\n' || e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r')) e--;
        snprintf(out, len, "%s %.*s", machine, (int)(e - s), s);
        break;
    }
    fclose(f);
}

/* Whether this CPU has a target feature of cpu-aarch64 (ember.backends.cpu.cross), from the
 * kernel's hardware capabilities (the bits of Linux's asm/hwcap.h); never on another machine. */
static int cpu_has(const char *feature) {
#if defined(__aarch64__)
    const unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
    if (strcmp(feature, "dotprod") == 0) return (hwcap & (1UL << 20)) != 0;   /* HWCAP_ASIMDDP */
    if (strcmp(feature, "i8mm") == 0) return (hwcap2 & (1UL << 13)) != 0;     /* HWCAP2_I8MM */
#else
    (void)feature;
#endif
    return 0;
}

/* The artifact's libraries use the instructions of its target features (SDOT, SMMLA): on a CPU
 * without one they would stop with SIGILL in the middle of a run, so they are refused first. */
static int check_features(ember_rt *rt, const char *path, const json_value *features) {
    if (!features) return 0;
    if (features->kind != JSON_ARRAY) {
        ember_set_error(rt, "%s: corrupt: malformed manifest (features)", path);
        return -1;
    }
    for (size_t i = 0; i < features->n; i++) {
        const char *name = json_str(&features->items[i]);
        if (!name) {
            ember_set_error(rt, "%s: corrupt: malformed manifest (features)", path);
            return -1;
        }
        if (!cpu_has(name)) {
            ember_set_error(rt, "%s: built for the aarch64 target feature %s, which this CPU lacks: compile "
                            "again with fewer --cpu-features", path, name);
            return -1;
        }
    }
    return 0;
}

/* ---- constants ---------------------------------------------------------------------------- */

/* An .npy file (NumPy's format: magic, version, header length, a dict, then the data) mapped;
 * the data must be C-ordered and exactly bytes long. */
static const uint8_t *map_npy(ember_rt *rt, const char *name, const char *rel, size_t bytes) {
    for (int i = 0; i < rt->n_npy; i++)
        if (strcmp(rt->npy[i].name, name) == 0) {
            if (rt->npy[i].bytes != bytes) break;
            return rt->npy[i].data;
        }
    char path[PATH_MAX];
    if (inside(rt, rel, path) != 0) return NULL;
    size_t size;
    uint8_t *map = map_file(rt, path, &size);
    if (!map) return NULL;
    size_t header = 0, offset = 0;
    if (size >= 10 && memcmp(map, "\x93NUMPY", 6) == 0) {
        if (map[6] == 1) {
            header = (size_t)map[8] | (size_t)map[9] << 8;
            offset = 10;
        } else if (size >= 12) {
            header = (size_t)map[8] | (size_t)map[9] << 8 | (size_t)map[10] << 16 | (size_t)map[11] << 24;
            offset = 12;
        }
    }
    if (!offset || header > size - offset || size - offset - header != bytes
        || !memmem(map + offset, header, "'fortran_order': False", 22)) {
        munmap(map, size);
        ember_set_error(rt, "%s: constant %s: not a C-ordered .npy of %zu data bytes", path, name, bytes);
        return NULL;
    }
    mapped_npy *grown = realloc(rt->npy, (size_t)(rt->n_npy + 1) * sizeof *grown);
    if (!grown) {
        munmap(map, size);
        ember_set_error(rt, "out of memory");
        return NULL;
    }
    rt->npy = grown;
    rt->npy[rt->n_npy] = (mapped_npy){strdup(name), map, size, map + offset + header, bytes};
    return rt->npy[rt->n_npy++].data;
}

static const void *constant(ember_rt *rt, const char *name, size_t bytes) {
    const json_value *derived = json_get(json_get(rt->manifest, "constants"), name);
    if (derived) return map_npy(rt, name, json_str(derived), bytes);
    const gguf_tensor *t = gguf_find(&rt->gguf, name);
    if (!t) {
        ember_set_error(rt, "constant '%s' is neither in the model nor in the artifact", name);
        return NULL;
    }
    uint64_t have = gguf_tensor_bytes(t->type, t->n_elements);
    if (have != bytes) {
        ember_set_error(rt, "tensor %s: %llu bytes in the model, the artifact was compiled for %zu", name,
                        (unsigned long long)have, bytes);
        return NULL;
    }
    return t->data;
}

/* ---- steps -------------------------------------------------------------------------------- */

static size_t item_size(const char *dtype) {
    static const struct { const char *name; size_t size; } sizes[] = {
        {"float32", 4}, {"float16", 2}, {"int32", 4}, {"uint8", 1}, {"int8", 1}, {"uint16", 2},
        {"int16", 2}, {"float64", 8}, {"int64", 8},
    };
    for (size_t i = 0; dtype && i < sizeof sizes / sizeof sizes[0]; i++)
        if (strcmp(dtype, sizes[i].name) == 0) return sizes[i].size;
    return 0;
}

/* [dtype, [d0, d1, ...]] -> bytes, and the first dimension and the bytes of one row */
static size_t storage_bytes(const json_value *dtype, const json_value *shape, size_t *rows, size_t *row_bytes) {
    size_t size = item_size(json_str(dtype));
    if (!size || !shape || shape->kind != JSON_ARRAY) return 0;
    size_t total = size, row = size;
    for (size_t d = 0; d < shape->n; d++) {
        if (!json_is_int(&shape->items[d]) || shape->items[d].number < 0) return 0;
        size_t dim = (size_t)shape->items[d].number;
        total *= dim;
        if (d) row *= dim;
    }
    *rows = shape->n ? (size_t)shape->items[0].number : 1;
    *row_bytes = row;
    return total;
}

/* The table (KV cache or recurrent state planes) of this name, made zero on first sight: rows
 * rows of row_bytes; -1 when a step before saw it with another shape. */
static int table_index(ember_rt *rt, const char *name, size_t rows, size_t row_bytes, int is_state) {
    for (int i = 0; i < rt->n_caches; i++)
        if (strcmp(rt->cache_names[i], name) == 0)
            return rt->cache_row_bytes[i] == row_bytes && rt->cache_rows[i] == rows ? i : -1;
    int n = rt->n_caches + 1;
    char **names = realloc(rt->cache_names, (size_t)n * sizeof *names);
    if (names) rt->cache_names = names;
    uint8_t **tables = realloc(rt->caches, (size_t)n * sizeof *tables);
    if (tables) rt->caches = tables;
    size_t *all_rows = realloc(rt->cache_rows, (size_t)n * sizeof *all_rows);
    if (all_rows) rt->cache_rows = all_rows;
    size_t *all_row_bytes = realloc(rt->cache_row_bytes, (size_t)n * sizeof *all_row_bytes);
    if (all_row_bytes) rt->cache_row_bytes = all_row_bytes;
    uint8_t *states = realloc(rt->cache_is_state, (size_t)n);
    if (states) rt->cache_is_state = states;
    if (!names || !tables || !all_rows || !all_row_bytes || !states) return -1;
    /* zero bytes are an empty cache of every type (ember.runtime.memory.cache_array) and the
     * state a recurrent layer starts from */
    uint8_t *data = calloc(rows, row_bytes);
    char *copy = strdup(name);
    if (!data || !copy) {
        free(data);
        free(copy);
        return -1;
    }
    rt->cache_names[rt->n_caches] = copy;
    rt->caches[rt->n_caches] = data;
    rt->cache_rows[rt->n_caches] = rows;
    rt->cache_row_bytes[rt->n_caches] = row_bytes;
    rt->cache_is_state[rt->n_caches] = (uint8_t)is_state;
    rt->recurrent |= is_state;
    return rt->n_caches++;
}

#define MALFORMED(what) do { ember_set_error(rt, "%s/manifest.json: corrupt: malformed manifest (step %d: %s)", \
                                             rt->dir, index, what); return -1; } while (0)

/* "{kind}_state.{il}": a recurrent state's planes (ember.models.common.Model.state_names) */
static int is_state_name(const char *name) {
    const char *dot = strstr(name, "_state.");
    return dot && dot > name && dot[7];
}

/* The step's inputs: their roles and buffers; tables[] gets the inputs that are tables, in order
 * (the step's outputs after the logits are their new contents, in that order). */
static int load_inputs(ember_rt *rt, step *s, const json_value *inputs, int index, int *tables, int *n_tables) {
    static const char *names[] = {"tokens", "pos", "slots", "out_ids", "mask", "mask_swa", "state_src", "state_slots"};
    *n_tables = 0;
    for (size_t i = 0; i < inputs->n; i++) {
        const json_value *in = &inputs->items[i];
        if (in->kind != JSON_ARRAY || in->n != 3 || !json_str(&in->items[0])) MALFORMED("input");
        const char *name = json_str(&in->items[0]);
        size_t rows, row_bytes, bytes = storage_bytes(&in->items[1], &in->items[2], &rows, &row_bytes);
        if (!bytes) MALFORMED("input type");
        s->cache_of[i] = -1;
        int role = -1;
        for (int r = 0; r < (int)(sizeof names / sizeof names[0]); r++)
            if (strcmp(name, names[r]) == 0) role = r;
        int kv = strncmp(name, "k_cache.", 8) == 0 || strncmp(name, "v_cache.", 8) == 0;
        if (role < 0 && (kv || is_state_name(name))) {
            /* a KV cache: n_ctx rows, the step sees its first n_kv; a state: all its planes */
            if (kv && rows != (size_t)s->n_kv) MALFORMED("cache rows");
            int t = table_index(rt, name, kv ? (size_t)rt->n_ctx : rows, row_bytes, !kv);
            if (t < 0) MALFORMED("cache or state type");
            s->roles[i] = IN_TABLE;
            s->cache_of[i] = t;
            s->in[i] = rt->caches[t];
            tables[(*n_tables)++] = (int)i;
            continue;
        }
        if (role < 0) {
            ember_set_error(rt, "%s/manifest.json: step %d: input '%s' is not supported by the native runtime "
                            "(a sliding-window ring?)", rt->dir, index, name);
            return -1;
        }
        /* one state plane is read and one written: a step of an artifact keeps no per-token states */
        size_t want = (role == IN_MASK || role == IN_MASK_SWA) ? (size_t)s->n_tokens * (size_t)s->n_kv * 4
                      : role == IN_OUT_IDS || role == IN_STATE_SRC || role == IN_STATE_SLOTS ? 4
                      : (size_t)s->n_tokens * 4;
        if (bytes != want) MALFORMED("input shape");
        s->roles[i] = (enum role)role;
        s->in[i] = calloc(1, bytes);
        if (!s->in[i]) { ember_set_error(rt, "out of memory"); return -1; }
    }
    return 0;
}

/* The step's outputs: the logits, then each table's new contents, written in place or copied */
static int load_outputs(ember_rt *rt, step *s, const json_value *outputs, int index, const int *tables,
                        int n_tables) {
    if ((size_t)n_tables != outputs->n - 1) MALFORMED("outputs and caches");
    for (size_t k = 0; k < outputs->n; k++) {
        const json_value *out = &outputs->items[k];
        if (out->kind != JSON_ARRAY || out->n != 3 || !json_is_int(&out->items[2])) MALFORMED("output");
        size_t rows, row_bytes, bytes = storage_bytes(&out->items[0], &out->items[1], &rows, &row_bytes);
        int in_place = (int)out->items[2].number;
        s->copy_to[k] = -1;
        s->out_bytes[k] = bytes;
        if (!bytes) MALFORMED("output type");
        if (k == 0) {
            if (bytes != (size_t)rt->n_vocab * 4) MALFORMED("logits shape");
            s->out[0] = rt->logits;
            continue;
        }
        int input = tables[k - 1], t = s->cache_of[input];
        size_t seen = rt->cache_is_state[t] ? rt->cache_rows[t] : (size_t)s->n_kv;     /* rows the step sees */
        if (bytes != seen * rt->cache_row_bytes[t]) MALFORMED("cache or state output shape");
        if (in_place >= 0) {
            if (in_place != input) MALFORMED("in-place output");
            s->out[k] = s->in[input];
        } else {
            s->copy_to[k] = t;
            s->out[k] = malloc(bytes);
            if (!s->out[k]) { ember_set_error(rt, "out of memory"); return -1; }
        }
    }
    return 0;
}

/* the bytes hex spells (exactly bytes of them), in a buffer of their own; NULL when malformed */
static void *literal_bytes(const char *hex, size_t bytes) {
    if (!hex || strlen(hex) != 2 * bytes) return NULL;
    uint8_t *out = malloc(bytes ? bytes : 1);
    for (size_t i = 0; out && i < bytes; i++) {
        unsigned byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) {
            free(out);
            return NULL;
        }
        out[i] = (uint8_t)byte;
    }
    return out;
}

static int load_step(ember_rt *rt, const json_value *entry, int index, size_t *arena_bytes) {
    step *s = &rt->steps[index];
    const json_value *abi = json_get(entry, "abi");
    const json_value *n_tokens = json_get(entry, "n_tokens"), *n_kv = json_get(entry, "n_kv");
    const json_value *n_out = json_get(entry, "n_outputs");
    if (!abi) {
        ember_set_error(rt, "%s/manifest.json: step %d has no calling convention (abi): the artifact comes "
                        "from an older ember; compile it again", rt->dir, index);
        return -1;
    }
    if (!json_is_int(n_tokens) || !json_is_int(n_kv) || !json_is_int(n_out) || n_tokens->number < 1
        || n_kv->number < n_tokens->number || n_kv->number > rt->n_ctx || n_out->number != 1)
        MALFORMED("shape");
    s->n_tokens = (int)n_tokens->number;
    s->n_kv = (int)n_kv->number;
    s->n_out = 1;
    const json_value *inputs = json_get(abi, "inputs"), *outputs = json_get(abi, "outputs");
    const json_value *consts = json_get(abi, "consts"), *arena = json_get(abi, "arena");
    if (!inputs || inputs->kind != JSON_ARRAY || !outputs || outputs->kind != JSON_ARRAY || !outputs->n
        || !consts || consts->kind != JSON_ARRAY || !json_is_int(arena) || arena->number < 0)
        MALFORMED("abi");
    if ((size_t)arena->number > *arena_bytes) *arena_bytes = (size_t)arena->number;
    s->n_in = (int)inputs->n;
    s->n_outputs = (int)outputs->n;
    s->n_consts = (int)consts->n;
    s->in = calloc(inputs->n + 1, sizeof(void *));
    s->out = calloc(outputs->n + 1, sizeof(void *));
    s->consts = calloc(consts->n + 1, sizeof(void *));
    s->literal = calloc(consts->n + 1, 1);
    s->roles = calloc(inputs->n + 1, sizeof(enum role));
    s->cache_of = calloc(inputs->n + 1, sizeof(int));
    s->copy_to = calloc(outputs->n + 1, sizeof(int));
    s->out_bytes = calloc(outputs->n + 1, sizeof(size_t));
    int *tables = malloc((inputs->n + 1) * sizeof *tables), n_tables = 0;
    if (!s->in || !s->out || !s->consts || !s->literal || !s->roles || !s->cache_of || !s->copy_to || !s->out_bytes
        || !tables) {
        free(tables);
        ember_set_error(rt, "out of memory");
        return -1;
    }
    int status = load_inputs(rt, s, inputs, index, tables, &n_tables);
    if (status == 0) status = load_outputs(rt, s, outputs, index, tables, n_tables);
    free(tables);
    if (status != 0) return -1;
    for (size_t j = 0; j < consts->n; j++) {
        const json_value *c = &consts->items[j];
        if (c->kind != JSON_ARRAY || (c->n != 2 && c->n != 3) || !json_is_int(&c->items[1]))
            MALFORMED("constant");
        size_t bytes = (size_t)c->items[1].number;
        if (c->n == 3) {        /* a literal of the IR: [null, bytes, its bytes in hex] */
            s->consts[j] = literal_bytes(json_str(&c->items[2]), bytes);
            s->literal[j] = 1;
            if (!s->consts[j]) MALFORMED("literal constant");
            continue;
        }
        if (!json_str(&c->items[0])) MALFORMED("constant");
        s->consts[j] = (void *)constant(rt, json_str(&c->items[0]), bytes);
        if (!s->consts[j]) return -1;
    }
    char path[PATH_MAX];
    const char *library = json_str(json_get(entry, "library"));
    if (!library || !listed(json_get(rt->manifest, "files"), library)) MALFORMED("library without a checksum");
    if (inside(rt, library, path) != 0) return -1;
    s->library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!s->library) {
        ember_set_error(rt, "%s: cannot be loaded: %s", path, dlerror());
        return -1;
    }
    *(void **)&s->run = dlsym(s->library, "ember_graph_run");
    if (!s->run) {
        ember_set_error(rt, "%s: not an ember graph library (no ember_graph_run)", path);
        return -1;
    }
    return 0;
}

/* ---- open / close ------------------------------------------------------------------------- */

static int open_model(ember_rt *rt, const char *model_path, int verify, verified *v) {
    const json_value *model = json_get(rt->manifest, "model");
    const char *path = model_path ? model_path : json_str(json_get(model, "path"));
    const char *file = json_str(json_get(model, "file")), *digest = json_str(json_get(model, "sha256"));
    const char *header_digest = json_str(json_get(model, "header_sha256"));
    const json_value *size = json_get(model, "size");
    if (!path || !file || !digest || !json_is_int(size)) {
        ember_set_error(rt, "%s/manifest.json: corrupt: malformed manifest (model)", rt->dir);
        return -1;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        ember_set_error(rt, "%s: model file not found (the artifact %s was compiled from %s); pass it with --model",
                        path, rt->dir, file);
        return -1;
    }
    rt->gguf_map = map_file(rt, path, &rt->gguf_size);
    if (!rt->gguf_map) return -1;
    char err[256];
    int bad = (double)rt->gguf_size != size->number;
    if (!bad && gguf_parse(&rt->gguf, rt->gguf_map, rt->gguf_size, err, sizeof err) != 0) {
        ember_set_error(rt, "%s: %s", path, err);
        return -1;
    }
    char hex[65], real[PATH_MAX];
    if (!bad && header_digest) {
        /* the record's key: the model's absolute path (no artifact path is absolute) */
        int ok = matches(rt, v, realpath(path, real) ? real : path, path, header_digest, rt->gguf.header_bytes,
                         verify & EMBER_VERIFY_ARTIFACT);
        if (ok < 0) return -1;
        bad = !ok;
    }
    if (!bad && (verify & EMBER_VERIFY_MODEL)) {
        sha256_of(rt->gguf_map, rt->gguf_size, hex);
        bad = strcmp(hex, digest) != 0;
    }
    if (bad) {
        ember_set_error(rt, "%s: not the model the artifact %s was compiled from (%s, sha256 %.16s...)", path,
                        rt->dir, file, digest);
        return -1;
    }
    return 0;
}

static int int_field(ember_rt *rt, const json_value *obj, const char *key, int lo, int *out) {
    const json_value *v = json_get(obj, key);
    if (!json_is_int(v) || v->number < lo || v->number > INT_MAX) {
        ember_set_error(rt, "%s/manifest.json: corrupt: malformed manifest (%s)", rt->dir, key);
        return -1;
    }
    *out = (int)v->number;
    return 0;
}

/* kernels.so, then every step's library, buffers and constants, and the arena */
static int load_libraries(ember_rt *rt, const char *path) {
    const json_value *m = rt->manifest;
    const json_value *library = json_get(m, "kernel_library");
    const char *kernels = json_str(json_get(library, "file"));
    if (!kernels || !listed(json_get(m, "files"), kernels)) {
        ember_set_error(rt, "%s: corrupt: malformed manifest (kernel_library)", path);
        return -1;
    }
    char kpath[PATH_MAX];
    if (inside(rt, kernels, kpath) != 0) return -1;
    rt->kernels = dlopen(kpath, RTLD_NOW | RTLD_GLOBAL);   /* the step libraries resolve into it */
    if (!rt->kernels) {
        ember_set_error(rt, "%s: cannot be loaded: %s", kpath, dlerror());
        return -1;
    }
    const json_value *steps = json_get(m, "steps");
    if (!steps || steps->kind != JSON_ARRAY || steps->n == 0) {
        ember_set_error(rt, "%s: corrupt: malformed manifest (steps)", path);
        return -1;
    }
    rt->logits = calloc((size_t)rt->n_vocab, sizeof(float));
    rt->order = malloc((size_t)rt->n_vocab * sizeof(int));
    rt->probs = malloc((size_t)rt->n_vocab * sizeof(double));
    rt->steps = calloc(steps->n, sizeof(step));
    if (!rt->logits || !rt->order || !rt->probs || !rt->steps) {
        ember_set_error(rt, "out of memory");
        return -1;
    }
    size_t arena = 0;
    for (size_t i = 0; i < steps->n; i++) {
        /* a verify step (a logits row per token: compiled with --spec) serves speculation,
         * which this runtime does not do: it is left unloaded */
        const json_value *n_out = json_get(&steps->items[i], "n_outputs");
        if (json_is_int(n_out) && n_out->number > 1) continue;
        int index = rt->n_steps++;        /* counted first: ember_close frees a half-loaded step */
        if (load_step(rt, &steps->items[i], index, &arena) != 0) return -1;
    }
    if (rt->n_steps == 0) {
        ember_set_error(rt, "%s: corrupt: malformed manifest (no step with one output row)", path);
        return -1;
    }
    if (posix_memalign((void **)&rt->arena, ARENA_ALIGN, arena ? arena : ARENA_ALIGN) != 0) {
        ember_set_error(rt, "out of memory (arena of %zu bytes)", arena);
        return -1;
    }
    return 0;
}

/* The manifest is one this runtime reads: an ember artifact of its format version, for a cpu
 * target, built for this CPU when built with -march=native, with a native block. */
static int check_manifest(ember_rt *rt, const char *path) {
    const json_value *m = rt->manifest;
    const char *format = json_str(json_get(m, "format")), *target = json_str(json_get(m, "target"));
    if (!format || strcmp(format, FORMAT) != 0) {
        ember_set_error(rt, "%s: not an ember artifact manifest", path);
        return -1;
    }
    const json_value *version = json_get(m, "format_version");
    if (!json_is_int(version) || version->number != FORMAT_VERSION) {
        ember_set_error(rt, "%s: artifact format version is not %d, the one this runtime reads: compile the model "
                        "again", path, FORMAT_VERSION);
        return -1;
    }
    if (!target || strncmp(target, "cpu", 3) != 0) {
        ember_set_error(rt, "%s: target %s: the native runtime runs cpu artifacts only", path, target ? target : "?");
        return -1;
    }
    const char *isa = json_str(json_get(m, "isa")), *host = json_str(json_get(m, "host"));
    char here[512];
    host_cpu(here, sizeof here);
    if (isa && strcmp(isa, "native") == 0 && (!host || strcmp(host, here) != 0)) {
        ember_set_error(rt, "%s: built with -march=native for '%s'; this host is '%s': compile the model again here",
                        path, host ? host : "?", here);
        return -1;
    }
    if (check_features(rt, path, json_get(m, "features")) != 0) return -1;
    if (!json_get(m, "native")) {
        ember_set_error(rt, "%s: no native block: the artifact comes from an older ember; compile it again", path);
        return -1;
    }
    return 0;
}

static int open_checked(ember_rt *rt, const char *model_path, int verify, verified **v) {
    char path[PATH_MAX], err[256];
    snprintf(path, sizeof path, "%s/manifest.json", rt->dir);
    struct stat st;
    if (stat(rt->dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        ember_set_error(rt, "%s: no such artifact folder", rt->dir);
        return -1;
    }
    size_t len;
    char *text = read_text(rt, path, &len);
    if (!text) {
        ember_set_error(rt, "%s: missing: %s is not an ember artifact, or an incomplete one", path, rt->dir);
        return -1;
    }
    rt->manifest = json_parse(text, len, err, sizeof err);
    *v = verified_read(rt->dir, text, len);
    free(text);
    if (!rt->manifest) {
        ember_set_error(rt, "%s: corrupt: not valid JSON (%s)", path, err);
        return -1;
    }
    const json_value *m = rt->manifest, *native = json_get(m, "native");
    if (check_manifest(rt, path) != 0) return -1;
    if (int_field(rt, m, "n_ctx", 1, &rt->n_ctx) || int_field(rt, m, "prompt_tokens", 1, &rt->prompt_tokens)
        || int_field(rt, m, "kv_bucket", 1, &rt->kv_bucket) || int_field(rt, native, "n_vocab", 1, &rt->n_vocab)
        || int_field(rt, native, "sliding_window", 0, &rt->window))
        return -1;
    if (check_files(rt, json_get(m, "files"), *v, verify & EMBER_VERIFY_ARTIFACT) != 0) return -1;
    if (open_model(rt, model_path, verify, *v) != 0) return -1;
    rt->tok = tokenizer_new(&rt->gguf, json_get(native, "tokenizer"), rt->n_vocab, err, sizeof err);
    if (!rt->tok) {
        ember_set_error(rt, "%s: tokenizer: %s", path, err);
        return -1;
    }
    return load_libraries(rt, path);
}

/* open_checked, then the record of verified files updated with what it hashed and found whole
 * (also when a later check failed: what matched, matched) */
static int open_artifact(ember_rt *rt, const char *model_path, int verify) {
    verified *v = NULL;
    int status = open_checked(rt, model_path, verify, &v);
    verified_write(v);
    verified_free(v);
    return status;
}

/* One thread per CPU this process may run on (its affinity mask: a container's or taskset's
 * limit), else per online CPU. */
static int default_threads(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    return cpus > 0 ? (int)cpus : 1;
}

ember_rt *ember_open(const char *dir, const char *model_path, int n_threads, int verify, char *err,
                     size_t err_len) {
    double start = now();
    ember_rt *rt = calloc(1, sizeof *rt);
    if (!rt) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    snprintf(rt->dir, sizeof rt->dir, "%s", dir);
    size_t n = strlen(rt->dir);
    while (n > 1 && rt->dir[n - 1] == '/') rt->dir[--n] = 0;
    rt->n_threads = n_threads > 0 ? n_threads : default_threads();
    if (open_artifact(rt, model_path, verify) != 0) {
        snprintf(err, err_len, "%s", rt->err);
        ember_close(rt);
        return NULL;
    }
    rt->open_seconds = now() - start;
    return rt;
}

void ember_close(ember_rt *rt) {
    if (!rt) return;
    for (int i = 0; i < rt->n_steps; i++) {
        step *s = &rt->steps[i];
        for (int j = 0; s->in && j < s->n_in; j++)
            if (s->roles[j] != IN_TABLE) free(s->in[j]);
        for (int k = 1; s->out && k < s->n_outputs; k++)
            if (s->copy_to[k] >= 0) free(s->out[k]);
        for (int j = 0; s->literal && j < s->n_consts; j++)
            if (s->literal[j]) free(s->consts[j]);
        free(s->in); free(s->out); free(s->consts); free(s->literal); free(s->roles); free(s->cache_of);
        free(s->copy_to);
        free(s->out_bytes);
        /* the libraries stay loaded: libgomp's threads may still run their code at exit */
    }
    free(rt->steps);
    for (int i = 0; i < rt->n_caches; i++) {
        free(rt->caches[i]);
        free(rt->cache_names[i]);
    }
    free(rt->caches); free(rt->cache_names); free(rt->cache_rows); free(rt->cache_row_bytes); free(rt->cache_is_state);
    for (int i = 0; i < rt->n_npy; i++) {
        munmap(rt->npy[i].map, rt->npy[i].map_size);
        free(rt->npy[i].name);
    }
    free(rt->npy);
    tokenizer_free(rt->tok);
    gguf_release(&rt->gguf);
    if (rt->gguf_map) munmap(rt->gguf_map, rt->gguf_size);
    json_free(rt->manifest);
    free(rt->arena); free(rt->logits); free(rt->order); free(rt->probs);
    free(rt);
}

/* ---- evaluation --------------------------------------------------------------------------- */

static step *find_step(ember_rt *rt, int T, int n_kv) {
    for (int i = 0; i < rt->n_steps; i++)
        if (rt->steps[i].n_tokens == T && rt->steps[i].n_kv == n_kv) return &rt->steps[i];
    return NULL;
}

/* One step of T tokens at n_past (as ember.runtime.session._Feed.set, with no padding). */
/* the KV rows a step of T rows at n_past reads: the context so far rounded up to the bucket */
static int kv_rows(const ember_rt *rt, int T) {
    long long rounded = ((long long)rt->n_past + T + rt->kv_bucket - 1) / rt->kv_bucket * rt->kv_bucket;
    return rounded < rt->n_ctx ? (int)rounded : rt->n_ctx;
}

/* One step of T rows at n_past for the n <= T tokens given (as ember.runtime.session._Feed.set):
 * rows past n are padding (the last token again) whose K/V rows lie past the context and are
 * masked until real tokens overwrite them; the logits are the last real token's. */
static int run_step(ember_rt *rt, const int32_t *tokens, int n, int T) {
    int n_kv = kv_rows(rt, T);
    step *s = find_step(rt, T, n_kv);
    if (!s) {
        ember_set_error(rt, "%s: no compiled step for %d tokens over %d KV rows", rt->dir, T, n_kv);
        return -1;
    }
    for (int i = 0; i < s->n_in; i++) {
        void *p = s->in[i];
        switch (s->roles[i]) {
        case IN_TOKENS:
            for (int t = 0; t < T; t++) ((int32_t *)p)[t] = tokens[t < n ? t : n - 1];
            break;
        case IN_POS:
        case IN_SLOTS:
            for (int t = 0; t < T; t++) ((int32_t *)p)[t] = rt->n_past + t;
            break;
        case IN_OUT_IDS: ((int32_t *)p)[0] = n - 1; break;
        case IN_MASK:
        case IN_MASK_SWA: {
            /* row t sees keys 0..pos; a sliding-window row only the last `window` of them */
            int window = s->roles[i] == IN_MASK_SWA ? rt->window : 0;
            float *mask = p;
            for (int t = 0; t < T; t++) {
                int pos = rt->n_past + t;
                for (int j = 0; j < s->n_kv; j++) {
                    int seen = j <= pos && (!window || pos - j < window);
                    mask[(size_t)t * s->n_kv + j] = seen ? 0.0f : -INFINITY;
                }
            }
            break;
        }
        case IN_STATE_SRC:          /* the one plane: read from and written to */
        case IN_STATE_SLOTS: ((int32_t *)p)[0] = 0; break;
        case IN_TABLE: break;
        }
    }
    /* a negative count pins the team at that size: the graph library's governor (common.h) is
     * opt-in, as in the Python session, since it cost quiet decodes ~12% (BENCHMARKS.md) */
    int status = s->run(s->in, s->out, s->consts, rt->arena, -rt->n_threads);
    if (status != 0) {
        ember_set_error(rt, "step t%d_kv%d: a kernel found a bad index (code %d)", T, n_kv, status);
        return -1;
    }
    for (int k = 1; k < s->n_outputs; k++)
        if (s->copy_to[k] >= 0) memcpy(rt->caches[s->copy_to[k]], s->out[k], s->out_bytes[k]);
    rt->n_past += n;
    return 0;
}

int ember_eval(ember_rt *rt, const int32_t *tokens, int n, const float **logits) {
    if (n <= 0) {
        ember_set_error(rt, "eval: no tokens");
        return -1;
    }
    if ((long long)rt->n_past + n > rt->n_ctx) {
        ember_set_error(rt, "context full: %d + %d tokens > n_ctx %d (the artifact %s was compiled for %d)",
                        rt->n_past, n, rt->n_ctx, rt->dir, rt->n_ctx);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= rt->n_vocab) {
            ember_set_error(rt, "token id out of range [0, %d): %d", rt->n_vocab, tokens[i]);
            return -1;
        }
    for (int i = 0; i < n;) {
        int left = n - i, P = rt->prompt_tokens;
        int take = left >= P && n > 1 ? P : 1, rows = take;
        /* The rest of a prompt after its whole prompt steps runs as one prompt step padded to P
         * rows rather than token by token (each token's step computing logits that are thrown
         * away): the kernels are batch invariant, so the logits are the same bits. Not through
         * recurrent state, which padding would run on. */
        if (take == 1 && left > 1 && P > left && !rt->recurrent && rt->n_past + P <= rt->n_ctx
            && find_step(rt, P, kv_rows(rt, P))) {
            take = left;
            rows = P;
        }
        if (run_step(rt, tokens + i, take, rows) != 0) return -1;
        i += take;
    }
    *logits = rt->logits;
    return 0;
}

/* ---- text --------------------------------------------------------------------------------- */

int ember_tokenize(ember_rt *rt, const char *text, size_t len, int add_special, int parse_special, int32_t *ids,
                   int cap) {
    int n = tokenizer_encode(rt->tok, text, len, add_special, parse_special, ids, cap);
    if (n < 0) ember_set_error(rt, "tokenize: out of memory");
    return n;
}

const char *ember_token_to_piece(ember_rt *rt, int32_t id, int skip_special, size_t *len) {
    if (id < 0 || id >= rt->n_vocab) return NULL;
    return tokenizer_piece(rt->tok, id, skip_special, len);
}

int ember_is_eog(const ember_rt *rt, int32_t id) { return tokenizer_is_eog(rt->tok, id); }

/* sampler.c needs the scratch */
int *ember_scratch_ids(ember_rt *rt) { return rt->order; }
double *ember_scratch_probs(ember_rt *rt) { return rt->probs; }
