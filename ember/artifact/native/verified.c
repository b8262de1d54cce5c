/* The record of verified files (ARTIFACT/.ember-run-verified): which files were last found to
 * match their sha256, with what they were then on disk, so that a start hashes only what has
 * changed since (the checksums' purpose is to find a corrupt or incomplete artifact; hashing
 * 40+ MB of derived constants at every start cost most of the cold start).
 *
 * An entry holds a file's device, inode, size, mtime and ctime (in ns) when it was hashed. Every
 * write through the filesystem changes the mtime and the ctime, and nothing in user space can set
 * the ctime back (utime sets it to now); truncating changes the size; replacing or copying a
 * file (rename, cp, unpacking, copying the folder) gives it a new inode or a new ctime. So a file
 * whose five values equal its entry has not been written since its bytes matched. What the
 * record cannot see is damage beneath the filesystem (a failing medium), which the stat does not
 * show: `ember-run --verify-artifact` hashes everything again. A file changed within 2 seconds of
 * being hashed could keep its timestamps (they tick coarsely: jiffies, or 2 s on FAT), so such a
 * file is not recorded and is hashed again next time (git's "racy clean" rule).
 *
 * The record is bound to the manifest (its sha256 is the first line: another manifest, another
 * set of checksums, and nothing recorded counts) and carries the sha256 of its own text (a
 * damaged record counts as none). Checksums detect corruption, not tampering: whoever can write
 * the folder can write the manifest and this record too. It is written to a temporary file and
 * renamed into place; a folder that cannot be written just gets no record (every start hashes). */
#define _GNU_SOURCE
#include "internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "sha256.h"

#define RECORD ".ember-run-verified"
#define HEADER "ember-run verified files 1"
#define RACY_NS 2000000000LL

typedef struct {
    char *key;                  /* a path of the manifest, or an absolute path (the model) */
    unsigned long long dev, ino, size;
    long long mtime, ctime;     /* ns */
} entry;

struct verified {
    char path[4096];
    char manifest[65];
    entry *entries;
    int n, cap, changed;
};

static long long ns(struct timespec t) { return (long long)t.tv_sec * 1000000000LL + t.tv_nsec; }

static entry of_stat(const struct stat *st) {
    return (entry){NULL, (unsigned long long)st->st_dev, (unsigned long long)st->st_ino,
                   (unsigned long long)st->st_size, ns(st->st_mtim), ns(st->st_ctim)};
}

static int add(verified *v, const char *key, entry e) {
    if (v->n == v->cap) {
        int cap = v->cap ? 2 * v->cap : 16;
        entry *grown = realloc(v->entries, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        v->entries = grown;
        v->cap = cap;
    }
    e.key = strdup(key);
    if (!e.key) return -1;
    v->entries[v->n++] = e;
    return 0;
}

/* the sha256 of text's first len bytes, as hex */
static void digest(const char *text, size_t len, char hex[65]) {
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, text, len);
    sha256_hex(&c, hex);
}

/* the entries of the record's text, if it is whole and for this manifest */
static void parse(verified *v, char *text, size_t len) {
    char *end = NULL;
    for (char *p = text + len; p > text; p--)        /* the last line: "end <sha256 of the text before>" */
        if (p[-1] == '\n' && strncmp(p, "end ", 4) == 0) { end = p; break; }
    char hex[65], want[65];
    if (!end || sscanf(end, "end %64s", want) != 1) return;
    digest(text, (size_t)(end - text), hex);
    if (strcmp(hex, want) != 0) return;
    *end = 0;
    char *line = text, *next;
    for (int first = 1; line && *line; line = next, first = 0) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        if (first) {
            char manifest[65];
            if (sscanf(line, HEADER " %64s", manifest) != 1 || strcmp(manifest, v->manifest) != 0) return;
            continue;
        }
        entry e;
        int key_at = 0;
        if (sscanf(line, "%llu %llu %llu %lld %lld %n", &e.dev, &e.ino, &e.size, &e.mtime, &e.ctime, &key_at) != 5
            || !key_at || !line[key_at] || add(v, line + key_at, e) != 0)
            break;
    }
}

verified *verified_read(const char *dir, const char *manifest_text, size_t manifest_len) {
    verified *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    snprintf(v->path, sizeof v->path, "%s/%s", dir, RECORD);
    digest(manifest_text, manifest_len, v->manifest);
    int fd = open(v->path, O_RDONLY | O_NONBLOCK);    /* whatever is there: a fifo must not block */
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        if (fd >= 0) close(fd);
        return v;
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return v;
    }
    char *text = malloc(1 << 20);
    size_t len = text ? fread(text, 1, (1 << 20) - 1, f) : 0;
    fclose(f);
    if (text) {
        text[len] = 0;
        parse(v, text, len);
        free(text);
    }
    return v;
}

int verified_unchanged(const verified *v, const char *key, const struct stat *st) {
    entry now = of_stat(st);
    for (int i = 0; v && i < v->n; i++) {
        const entry *e = &v->entries[i];
        if (strcmp(e->key, key) == 0)
            return e->dev == now.dev && e->ino == now.ino && e->size == now.size && e->mtime == now.mtime
                   && e->ctime == now.ctime;
    }
    return 0;
}

void verified_note(verified *v, const char *key, const struct stat *st) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    entry e = of_stat(st);
    if (!v || strchr(key, '\n') || ns(t) - e.mtime < RACY_NS || ns(t) - e.ctime < RACY_NS) return;
    for (int i = 0; i < v->n; i++)
        if (strcmp(v->entries[i].key, key) == 0) {
            e.key = v->entries[i].key;
            v->entries[i] = e;
            v->changed = 1;
            return;
        }
    if (add(v, key, e) == 0) v->changed = 1;
}

void verified_write(verified *v) {
    if (!v || !v->changed) return;
    size_t cap = 128, len = 0;
    for (int i = 0; i < v->n; i++) cap += strlen(v->entries[i].key) + 128;
    char *text = malloc(cap);
    if (!text) return;
    len += (size_t)snprintf(text + len, cap - len, HEADER " %s\n", v->manifest);
    for (int i = 0; i < v->n; i++) {
        const entry *e = &v->entries[i];
        len += (size_t)snprintf(text + len, cap - len, "%llu %llu %llu %lld %lld %s\n", e->dev, e->ino, e->size,
                                e->mtime, e->ctime, e->key);
    }
    char hex[65], tmp[4200];
    digest(text, len, hex);
    len += (size_t)snprintf(text + len, cap - len, "end %s\n", hex);
    snprintf(tmp, sizeof tmp, "%s.pid%ld", v->path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (f) {
        int ok = fwrite(text, 1, len, f) == len;
        ok = fclose(f) == 0 && ok;
        if (!ok || rename(tmp, v->path) != 0) unlink(tmp);
    }
    free(text);
}

void verified_free(verified *v) {
    for (int i = 0; v && i < v->n; i++) free(v->entries[i].key);
    if (v) free(v->entries);
    free(v);
}
