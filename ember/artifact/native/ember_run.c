/* ember-run: generate text with an artifact, without Python.
 *
 *     ember-run ARTIFACT -p PROMPT [-n N] [--temp T] [--top-k K] [--top-p P] [--min-p M]
 *               [--seed S] [-t THREADS] [--model GGUF] [--verify-model] [--verify-artifact]
 *               [--ignore-eos] [--special]
 *     ember-run ARTIFACT --tokenize -p TEXT      (the prompt's token ids, one line; nothing run)
 *
 * The same loop as `ember run` (ember/runtime/generate.py): the prompt with BOS and special-token
 * text parsed, then up to N tokens, stopping at an end-of-generation token or a full context;
 * the text streams on stdout, a newline after it; the cold start (process start to the first
 * token printed, with the time ember_open took and the files it hashed) and the speeds on stderr.
 * --verify-model: also the whole GGUF's sha256; --verify-artifact: hash every artifact file again
 * (by default a file unchanged since it last matched is not hashed: verified.c says why that is
 * safe). Any failure: one line on stderr, exit status 1. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ember_runtime.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int fail(const char *message) {
    fprintf(stderr, "ember-run: %s\n", message);
    return 1;
}

static void usage(FILE *out) {
    fprintf(out, "usage: ember-run ARTIFACT -p PROMPT [-n N] [--temp T] [--top-k K] [--top-p P] [--min-p M]\n"
                 "                 [--seed S] [-t THREADS] [--model GGUF] [--verify-model] [--verify-artifact]\n"
                 "                 [--ignore-eos] [--special]\n"
                 "       ember-run ARTIFACT --tokenize -p TEXT\n");
}

static int number(const char *flag, const char *text, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (!*text || *end || errno || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "ember-run: %s %s: expected a number in [%g, %g]\n", flag, text, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    double start = now();
    const char *artifact = NULL, *prompt = NULL, *model = NULL;
    double n_predict = 128, threads = 0, seed = 0, top_k = 40;
    double temp = 0.8, top_p = 0.95, min_p = 0.05;
    int verify = 0, ignore_eos = 0, special = 0, tokenize_only = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--verify-model")) { verify |= EMBER_VERIFY_MODEL; continue; }
        else if (!strcmp(a, "--verify-artifact")) { verify |= EMBER_VERIFY_ARTIFACT; continue; }
        else if (!strcmp(a, "--ignore-eos")) { ignore_eos = 1; continue; }
        else if (!strcmp(a, "--special")) { special = 1; continue; }
        else if (!strcmp(a, "--tokenize")) { tokenize_only = 1; continue; }
        else if (a[0] != '-') {
            if (artifact) { usage(stderr); return fail("more than one artifact given"); }
            artifact = a;
            continue;
        }
        if (!v) { fprintf(stderr, "ember-run: %s needs a value\n", a); return 1; }
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) prompt = v;
        else if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) bad = number(a, v, 0, 1e9, &n_predict);
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) bad = number(a, v, 1, 4096, &threads);
        else if (!strcmp(a, "--temp")) bad = number(a, v, 0, 1e9, &temp);
        else if (!strcmp(a, "--top-k")) bad = number(a, v, 0, 1e9, &top_k);
        else if (!strcmp(a, "--top-p")) bad = number(a, v, 1e-300, 1, &top_p);
        else if (!strcmp(a, "--min-p")) bad = number(a, v, 0, 1, &min_p);
        else if (!strcmp(a, "--seed")) bad = number(a, v, 0, 1.8e19, &seed);
        else { usage(stderr); fprintf(stderr, "ember-run: unknown option %s\n", a); return 1; }
        if (bad) return 1;
        i++;
    }
    if (!artifact || !prompt) { usage(stderr); return fail("an artifact folder and -p PROMPT are required"); }

    char err[512];
    ember_rt *rt = ember_open(artifact, model, (int)threads, verify, err, sizeof err);
    if (!rt) return fail(err);
    size_t len = strlen(prompt);
    int cap = (int)(len + 8 > 1u << 30 ? 1u << 30 : len + 8);
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n = ids ? ember_tokenize(rt, prompt, len, 1, 1, ids, cap) : -1;
    if (n > cap) {          /* more ids than bytes: several special tokens in few bytes cannot be */
        free(ids);
        ids = malloc((size_t)n * sizeof *ids);
        n = ids ? ember_tokenize(rt, prompt, len, 1, 1, ids, n) : -1;
    }
    if (n < 0) { ember_close(rt); return fail("tokenize: out of memory"); }
    if (tokenize_only) {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
        free(ids);
        ember_close(rt);
        return 0;
    }
    if (n == 0) { ember_close(rt); return fail("the prompt is empty and the model adds no BOS token"); }

    ember_sampling sampling = {(float)temp, (float)top_p, (float)min_p, (int)top_k, (uint64_t)seed};
    ember_rng rng;
    ember_rng_seed(&rng, sampling.seed);
    const float *logits;
    double t0 = now();
    if (ember_eval(rt, ids, n, &logits) != 0) {
        fprintf(stderr, "ember-run: %s\n", ember_error(rt));
        ember_close(rt);
        return 1;
    }
    double prompt_seconds = now() - t0, decode_seconds = 0, first = 0;
    int generated = 0;
    const char *stop = "length";
    int status = 0;
    for (long i = 0; i < (long)n_predict; i++) {
        int32_t token = ember_sample(rt, logits, ember_n_vocab(rt), &sampling, &rng);
        if (token < 0) { status = 1; break; }
        if (!ignore_eos && ember_is_eog(rt, token)) { stop = "eos"; break; }
        size_t piece_len;
        const char *piece = ember_token_to_piece(rt, token, !special, &piece_len);
        fwrite(piece, 1, piece_len, stdout);
        fflush(stdout);
        generated++;
        if (i == 0) {
            int hashed, unchanged;
            first = now() - start;
            ember_open_checks(rt, &hashed, &unchanged);
            fprintf(stderr, "ember-run: cold start to the first token: %.3f s (artifact opened and checked in "
                            "%.3f s: %d files hashed, %d unchanged since verified)\n", first, ember_open_seconds(rt),
                    hashed, unchanged);
        }
        if (i + 1 == (long)n_predict) break;
        if (ember_n_past(rt) >= ember_n_ctx(rt)) { stop = "context"; break; }
        t0 = now();
        if (ember_eval(rt, &token, 1, &logits) != 0) { status = 1; break; }
        decode_seconds += now() - t0;
    }
    fputs("\n", stdout);
    fflush(stdout);
    if (status) {
        fprintf(stderr, "ember-run: %s\n", ember_error(rt));
    } else {
        fprintf(stderr, "ember-run: prompt %d tokens in %.3f s (%.1f t/s); generated %d tokens, decode %.1f t/s; "
                        "stop: %s\n", n, prompt_seconds, n / (prompt_seconds > 0 ? prompt_seconds : 1e-9), generated,
                generated > 1 && decode_seconds > 0 ? (generated - 1) / decode_seconds : 0.0, stop);
    }
    free(ids);
    ember_close(rt);
    return status;
}
