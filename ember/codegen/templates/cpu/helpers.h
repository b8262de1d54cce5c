/* ember CPU kernel helpers: included once per generated file, after common.h.
 * Strided loads (strides are in bytes, as in the IR), fixed-order reductions and work splits.
 * Every reduction here has an order fixed by the code, never by the thread count, so a row's
 * result does not depend on how many rows are computed with it (batch invariance). */

#define EMBER_AT(type, p, off) (*(const type *)((const uint8_t *)(p) + (off)))
#define EMBER_AT_W(type, p, off) (*(type *)((uint8_t *)(p) + (off)))
#define EMBER_LOAD_f32(p, off) EMBER_AT(float, p, off)
#define EMBER_LOAD_f16(p, off) ember_f16_to_f32(EMBER_AT(ember_f16, p, off))
#define EMBER_LOAD_bf16(p, off) ember_bf16_to_f32(EMBER_AT(ember_bf16, p, off))
#define EMBER_LOAD_i32(p, off) EMBER_AT(int32_t, p, off)
#define EMBER_STORE_f32(p, off, v) (EMBER_AT_W(float, p, off) = (v))
#define EMBER_STORE_f16(p, off, v) (EMBER_AT_W(ember_f16, p, off) = ember_f32_to_f16(v))
#define EMBER_STORE_bf16(p, off, v) (EMBER_AT_W(ember_bf16, p, off) = ember_f32_to_bf16(v))

/* Sum of 8 double lanes, in a fixed tree order. */
EMBER_INLINE double ember_lanes8_sum(const double *l) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

/* The tanh approximation of GELU that ggml and GGUF models use. */
EMBER_INLINE float ember_gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* Like ember_split, but every share except the last is a multiple of `quantum` items (so two
 * threads never write the same cache line of a contiguous f32 output). */
EMBER_INLINE void ember_split_quantum(int64_t n, int ith, int nth, int64_t quantum,
                                      int64_t *begin, int64_t *end) {
    int64_t chunks = (n + quantum - 1) / quantum;
    int64_t per = (chunks + nth - 1) / nth * quantum;
    *begin = EMBER_MIN(n, per * ith);
    *end = EMBER_MIN(n, *begin + per);
}

/* Report a failure (first writer wins is not needed: any failing kernel's code is enough). */
EMBER_INLINE void ember_fail(int *status, int code) {
    #pragma omp atomic write
    *status = code;
}

/* n f16 values at byte stride `step` -> contiguous f32 (8 at a time with F16C when packed). */
static inline void ember_f16_row_to_f32(const uint8_t *EMBER_RESTRICT src, int64_t step,
                                        float *EMBER_RESTRICT dst, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
    if (step == 2)
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * j))));
#endif
    for (; j < n; j++) dst[j] = EMBER_LOAD_f16(src, j * step);
}

/* n f32 values at byte stride `step` -> contiguous f32. */
static inline void ember_f32_row_to_f32(const uint8_t *EMBER_RESTRICT src, int64_t step,
                                        float *EMBER_RESTRICT dst, int64_t n) {
    for (int64_t j = 0; j < n; j++) dst[j] = EMBER_LOAD_f32(src, j * step);
}

/* GCC vector extensions: SIMD where the ISA has it, plain code where not, the same order. */
typedef float ember_f32x8 __attribute__((vector_size(32)));

EMBER_INLINE ember_f32x8 ember_load8(const float *p) {
    ember_f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The sum of a[j] * b[j] for j < n in a fixed order: four vectors of 8 lanes over the first
 * n - n % 32 items, a fixed tree over the 32 lanes, then the tail in order. Four independent
 * accumulators keep the multiply-adds from waiting on each other. */
EMBER_INLINE float ember_dot_f32(const float *EMBER_RESTRICT a, const float *EMBER_RESTRICT b, int64_t n) {
    ember_f32x8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        s0 += ember_load8(a + j) * ember_load8(b + j);
        s1 += ember_load8(a + j + 8) * ember_load8(b + j + 8);
        s2 += ember_load8(a + j + 16) * ember_load8(b + j + 16);
        s3 += ember_load8(a + j + 24) * ember_load8(b + j + 24);
    }
    const ember_f32x8 s = (s0 + s1) + (s2 + s3);
    float t = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}
