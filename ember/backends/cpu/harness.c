/* ember graph harness: runs one compiled graph library outside Python, for cross-built
 * (aarch64) libraries under qemu-user in tests (ember/backends/cpu/cross.py).
 *
 *     harness KERNELS.so GRAPH.so SPEC
 *
 * SPEC is a text file, one item a line: `threads N`, `arena BYTES`, then `in PATH BYTES`,
 * `const PATH BYTES` and `out PATH BYTES` in the entry point's order. Input and constant files
 * are read into 64-byte aligned buffers; the kernel library is loaded with RTLD_GLOBAL first (the
 * graph library resolves its tagged symbols there); ember_graph_run runs once and each output
 * buffer is written to its file. Prints `status N` (the entry point's return code) on stdout.
 * Exit status: 0, 2 for a usage or I/O error, 3 for a non-zero return code of the graph. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUFFERS 4096

typedef int (*graph_run)(void **inputs, void **outputs, void **consts, uint8_t *arena, int n_threads);

static void *aligned_buffer(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    memset(p, 0, bytes ? bytes : 64);
    return p;
}

static int read_file(const char *path, void *data, size_t bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t got = fread(data, 1, bytes, f);
    fclose(f);
    return got == bytes ? 0 : -1;
}

static int write_file(const char *path, const void *data, size_t bytes) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t put = fwrite(data, 1, bytes, f);
    return (fclose(f) == 0 && put == bytes) ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s KERNELS.so GRAPH.so SPEC\n", argv[0]);
        return 2;
    }
    if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
        fprintf(stderr, "harness: %s\n", dlerror());
        return 2;
    }
    void *graph = dlopen(argv[2], RTLD_NOW);
    if (!graph) {
        fprintf(stderr, "harness: %s\n", dlerror());
        return 2;
    }
    graph_run run = (graph_run)dlsym(graph, "ember_graph_run");
    if (!run) {
        fprintf(stderr, "harness: %s: no ember_graph_run\n", argv[2]);
        return 2;
    }
    FILE *spec = fopen(argv[3], "r");
    if (!spec) {
        fprintf(stderr, "harness: cannot open %s\n", argv[3]);
        return 2;
    }
    static void *inputs[MAX_BUFFERS], *outputs[MAX_BUFFERS], *consts[MAX_BUFFERS];
    static char *out_paths[MAX_BUFFERS];
    static size_t out_bytes[MAX_BUFFERS];
    int n_in = 0, n_out = 0, n_const = 0, threads = 1;
    size_t arena_bytes = 0;
    char kind[16], path[4096];
    unsigned long long bytes;
    while (fscanf(spec, "%15s", kind) == 1) {
        if (!strcmp(kind, "threads") && fscanf(spec, "%d", &threads) == 1) continue;
        if (!strcmp(kind, "arena") && fscanf(spec, "%llu", &bytes) == 1) {
            arena_bytes = (size_t)bytes;
            continue;
        }
        if (fscanf(spec, "%4095s %llu", path, &bytes) != 2 || n_in >= MAX_BUFFERS || n_out >= MAX_BUFFERS
            || n_const >= MAX_BUFFERS) {
            fprintf(stderr, "harness: %s: bad line at `%s`\n", argv[3], kind);
            return 2;
        }
        void *data = aligned_buffer((size_t)bytes);
        if (!data) {
            fprintf(stderr, "harness: out of memory (%llu bytes)\n", bytes);
            return 2;
        }
        if (!strcmp(kind, "out")) {
            out_paths[n_out] = strdup(path);
            out_bytes[n_out] = (size_t)bytes;
            outputs[n_out++] = data;
            continue;
        }
        if (read_file(path, data, (size_t)bytes) != 0) {
            fprintf(stderr, "harness: cannot read %llu bytes from %s\n", bytes, path);
            return 2;
        }
        if (!strcmp(kind, "in")) inputs[n_in++] = data;
        else if (!strcmp(kind, "const")) consts[n_const++] = data;
        else {
            fprintf(stderr, "harness: %s: unknown item `%s`\n", argv[3], kind);
            return 2;
        }
    }
    fclose(spec);
    uint8_t *arena = aligned_buffer(arena_bytes);
    int status = run(inputs, outputs, consts, arena, threads);
    printf("status %d\n", status);
    if (status != 0) return 3;
    for (int i = 0; i < n_out; i++) {
        if (write_file(out_paths[i], outputs[i], out_bytes[i]) != 0) {
            fprintf(stderr, "harness: cannot write %s\n", out_paths[i]);
            return 2;
        }
    }
    return 0;
}
