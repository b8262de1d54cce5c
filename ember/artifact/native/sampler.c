/* Choosing the next token, by ember.runtime.sampling's rules: greedy is an argmax with the lowest
 * id winning ties; otherwise the candidates are the top k ids by logit (ties: lowest id first),
 * cut to the smallest prefix whose probability reaches top_p, then to those at least min_p times
 * the most likely one's, and drawn at the temperature from a cumulative sum with one uniform
 * double. The generator is xoshiro256** seeded through splitmix64 (Blackman and Vigna). */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

int *ember_scratch_ids(ember_rt *rt);
double *ember_scratch_probs(ember_rt *rt);

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void ember_rng_seed(ember_rng *rng, uint64_t seed) {
    for (int i = 0; i < 4; i++) rng->s[i] = splitmix64(&seed);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static double uniform(ember_rng *rng) {
    uint64_t *s = rng->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(result >> 11) * 0x1.0p-53;   /* [0, 1) */
}

static const float *by_logit;
/* a before b: the larger logit, then the lower id */
static int better(int a, int b) {
    return by_logit[a] > by_logit[b] || (by_logit[a] == by_logit[b] && a < b);
}
static int compare(const void *x, const void *y) {
    int a = *(const int *)x, b = *(const int *)y;
    return a == b ? 0 : better(a, b) ? -1 : 1;
}

/* the k best ids into ids[0..k), best first: a heap of the k best so far, worst on top */
static void top_k(const float *logits, int n, int k, int *ids) {
    by_logit = logits;
    int size = 0;
    for (int i = 0; i < n; i++) {
        if (size == k && !better(i, ids[0])) continue;
        int j;
        if (size < k) {
            j = size++;
            while (j && better(ids[(j - 1) / 2], i)) { ids[j] = ids[(j - 1) / 2]; j = (j - 1) / 2; }
        } else {
            j = 0;
            for (;;) {
                int c = 2 * j + 1;
                if (c >= size) break;
                if (c + 1 < size && better(ids[c], ids[c + 1])) c++;
                if (!better(ids[c], i)) break;
                ids[j] = ids[c];
                j = c;
            }
        }
        ids[j] = i;
    }
    qsort(ids, (size_t)size, sizeof *ids, compare);
}

static void softmax(const float *logits, const int *ids, int n, double scale, double *p) {
    double max = -INFINITY, sum = 0.0;
    for (int i = 0; i < n; i++) if ((double)logits[ids[i]] / scale > max) max = (double)logits[ids[i]] / scale;
    for (int i = 0; i < n; i++) sum += p[i] = exp((double)logits[ids[i]] / scale - max);
    for (int i = 0; i < n; i++) p[i] /= sum;
}

int32_t ember_sample(ember_rt *rt, const float *logits, int n, const ember_sampling *s, ember_rng *rng) {
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i])) {
            ember_set_error(rt, "the logits after %d tokens are not finite (token %d: %g): the model's computation "
                            "overflowed; refusing to sample from them", ember_n_past(rt), i, (double)logits[i]);
            return -1;
        }
    if (s->temperature <= 0.0f) {
        int best = 0;
        for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }
    int *ids = ember_scratch_ids(rt);
    double *p = ember_scratch_probs(rt);
    int count = s->top_k > 0 && s->top_k < n ? s->top_k : n;
    top_k(logits, n, count, ids);
    softmax(logits, ids, count, 1.0, p);
    if (s->top_p < 1.0f) {
        double cum = 0.0;
        int keep = count;
        for (int i = 0; i < count; i++) {
            cum += p[i];
            if (cum >= (double)s->top_p) { keep = i + 1; break; }
        }
        count = keep;
    }
    if (s->min_p > 0.0f) {
        double floor_p = (double)s->min_p * p[0];
        int keep = 0;
        for (int i = 0; i < count; i++) if (p[i] >= floor_p) ids[keep++] = ids[i];
        count = keep;
    }
    softmax(logits, ids, count, (double)s->temperature, p);
    double cum = 0.0;
    for (int i = 0; i < count; i++) p[i] = cum += p[i];
    double u = uniform(rng) * p[count - 1];
    for (int i = 0; i < count; i++) if (p[i] > u) return ids[i];
    return ids[count - 1];
}
