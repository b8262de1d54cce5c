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

/* n contiguous f32 -> f16, round to nearest even (8 at a time with F16C; the same bits). */
static inline void ember_f32_row_to_f16(const float *EMBER_RESTRICT src, ember_f16 *EMBER_RESTRICT dst,
                                        int64_t n) {
    int64_t j = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; j++) dst[j] = ember_f32_to_f16(src[j]);
}

/* ---- vector math with a scalar twin -----------------------------------------------------------
 * Each function below comes as a scalar form and an 8-lane form that give the SAME bits for
 * every input: both do the same IEEE operations (fused multiply-adds written out as fmaf /
 * _mm256_fmadd_ps, rounding by the same rule), so a value's result never depends on whether it
 * fell in a vector body or a scalar tail, i.e. on the batch or the split. */
#if defined(__AVX2__) && defined(__FMA__)
#define EMBER_V8_AVX2 1
#endif

EMBER_INLINE ember_f32x8 ember_splat8(float v) {
    ember_f32x8 r = {v, v, v, v, v, v, v, v};
    return r;
}

EMBER_INLINE void ember_store8(float *p, ember_f32x8 v) {
    memcpy(p, &v, sizeof v);
}

EMBER_INLINE ember_f32x8 ember_fma8(ember_f32x8 a, ember_f32x8 b, ember_f32x8 c) {
#if defined(EMBER_V8_AVX2)
    return (ember_f32x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    ember_f32x8 r;
    for (int l = 0; l < 8; l++) r[l] = fmaf(a[l], b[l], c[l]);
    return r;
#endif
}

/* Sum of the 8 lanes as ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) (the order of two hadds and
 * one add of the halves). */
EMBER_INLINE float ember_hsum8(ember_f32x8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* exp(x) in f32 (Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two steps, a degree-5
 * polynomial, times 2^n); within 2 ulp. Above 88.376 gives +inf, below -87.336 gives 0 (no
 * subnormal results), NaN stays NaN. */
#define EMBER_EXP_HI 88.3762626647949f
#define EMBER_EXP_LO (-87.3365447505531f)
#define EMBER_EXP_POLY(P, R, FMA) \
    P = FMA(P, R, 1.3981999507E-3f); P = FMA(P, R, 8.3334519073E-3f); \
    P = FMA(P, R, 4.1665795894E-2f); P = FMA(P, R, 1.6666665459E-1f); \
    P = FMA(P, R, 5.0000001201E-1f)

EMBER_INLINE float ember_expf(float x) {
    float xc = x > EMBER_EXP_LO ? x : EMBER_EXP_LO;   /* NaN -> LO; restored below */
    xc = xc < EMBER_EXP_HI ? xc : EMBER_EXP_HI;
    const float magic = 12582912.0f;                   /* 1.5 * 2^23: round to nearest even */
    const float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = fmaf(n, -0.693359375f, xc);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500E-4f;
    EMBER_EXP_POLY(p, r, fmaf);
    const float y = fmaf(p, r * r, r) + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    float e = y * scale;
    if (x < EMBER_EXP_LO) e = 0.0f;
    if (x > EMBER_EXP_HI) e = INFINITY;
    return x != x ? x : e;
}

EMBER_INLINE ember_f32x8 ember_exp8(ember_f32x8 x) {
#if defined(EMBER_V8_AVX2)
    const __m256 vx = (__m256)x;
    __m256 xc = _mm256_max_ps(vx, _mm256_set1_ps(EMBER_EXP_LO));   /* NaN -> LO */
    xc = _mm256_min_ps(xc, _mm256_set1_ps(EMBER_EXP_HI));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
#define EMBER_FMA_PS_(a, b, c) _mm256_fmadd_ps(a, b, _mm256_set1_ps(c))
    EMBER_EXP_POLY(p, r, EMBER_FMA_PS_);
#undef EMBER_FMA_PS_
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
    e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(vx, _mm256_set1_ps(EMBER_EXP_LO), _CMP_LT_OQ));
    e = _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(vx, _mm256_set1_ps(EMBER_EXP_HI), _CMP_GT_OQ));
    return (ember_f32x8)_mm256_blendv_ps(e, vx, _mm256_cmp_ps(vx, vx, _CMP_UNORD_Q));
#else
    ember_f32x8 r;
    for (int l = 0; l < 8; l++) r[l] = ember_expf(x[l]);
    return r;
#endif
}

/* The tanh approximation of GELU that ggml and GGUF models use,
 * 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as x / (1 + exp(-2u))
 * (the same function; no cancellation for negative x). */
EMBER_INLINE float ember_gelu(float x) {
    const float u2 = -1.5957691216057308f * fmaf(0.044715f * x, x * x, x);
    return x / (1.0f + ember_expf(u2));
}

EMBER_INLINE ember_f32x8 ember_gelu8(ember_f32x8 x) {
    const ember_f32x8 u2 = ember_splat8(-1.5957691216057308f) * ember_fma8(ember_splat8(0.044715f) * x, x * x, x);
    return x / (ember_splat8(1.0f) + ember_exp8(u2));
}

/* x * sigmoid(x) */
EMBER_INLINE float ember_silu(float x) {
    return x / (1.0f + ember_expf(-x));
}

EMBER_INLINE ember_f32x8 ember_silu8(ember_f32x8 x) {
    return x / (ember_splat8(1.0f) + ember_exp8(-x));
}

/* ---- attention pieces (templates/cpu/attention.c.j2) -------------------------------------- */
/* out[r * os + c] = dot(q_r, k_c) for R query rows (R <= 4) and C key rows (C <= 4, R * C <= 8),
 * each dot in one fixed order whatever R and C: an 8-lane fma chain over the first D - D % 8
 * values, ember_hsum8, then the rest one fmaf at a time. R * C chains run side by side: with
 * fewer than 8 the multiply-adds wait on each other (4-cycle latency, 2 per cycle), so callers
 * with one or two rows take 4 keys at a time. */
EMBER_INLINE void ember_att_dots(const int R, const int C, const float *q, int64_t qs,
                                 const float *k, int64_t ks, int64_t D, float *out, int64_t os) {
    ember_f32x8 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = ember_splat8(0.0f);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        ember_f32x8 kv[4];
        for (int c = 0; c < C; c++) kv[c] = ember_load8(k + c * ks + d);
        for (int r = 0; r < R; r++) {
            const ember_f32x8 qv = ember_load8(q + r * qs + d);
            for (int c = 0; c < C; c++) acc[r][c] = ember_fma8(qv, kv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float t = ember_hsum8(acc[r][c]);
            for (int64_t e = d; e < D; e++) t = fmaf(q[r * qs + e], k[c * ks + e], t);
            out[r * os + c] = t;
        }
}

/* acc_r[d] = fma(w_r[j], v_j[d], acc_r[d]) for j = 0 .. nk-1 in order, for R rows (R <= 4):
 * every value sees the same sequence whatever R and however many values go side by side (one
 * or two rows take 32 at a time, so 8 independent chains hide the multiply-add latency). */
EMBER_INLINE void ember_att_values(const int R, const float *w, int64_t ws, const float *v, int64_t vs,
                                   int64_t nk, float *acc, int64_t as, int64_t Dv) {
    int64_t d = 0;
    if (R <= 2)
        for (; d + 32 <= Dv; d += 32) {
            ember_f32x8 a[2][4];
            for (int r = 0; r < R; r++)
                for (int h = 0; h < 4; h++) a[r][h] = ember_load8(acc + r * as + d + 8 * h);
            for (int64_t j = 0; j < nk; j++) {
                ember_f32x8 vj[4];
                for (int h = 0; h < 4; h++) vj[h] = ember_load8(v + j * vs + d + 8 * h);
                for (int r = 0; r < R; r++) {
                    const ember_f32x8 wr = ember_splat8(w[r * ws + j]);
                    for (int h = 0; h < 4; h++) a[r][h] = ember_fma8(wr, vj[h], a[r][h]);
                }
            }
            for (int r = 0; r < R; r++)
                for (int h = 0; h < 4; h++) ember_store8(acc + r * as + d + 8 * h, a[r][h]);
        }
    for (; d + 16 <= Dv; d += 16) {
        ember_f32x8 a[4][2];
        for (int r = 0; r < R; r++) {
            a[r][0] = ember_load8(acc + r * as + d);
            a[r][1] = ember_load8(acc + r * as + d + 8);
        }
        for (int64_t j = 0; j < nk; j++) {
            const ember_f32x8 v0 = ember_load8(v + j * vs + d), v1 = ember_load8(v + j * vs + d + 8);
            for (int r = 0; r < R; r++) {
                const ember_f32x8 wr = ember_splat8(w[r * ws + j]);
                a[r][0] = ember_fma8(wr, v0, a[r][0]);
                a[r][1] = ember_fma8(wr, v1, a[r][1]);
            }
        }
        for (int r = 0; r < R; r++) {
            ember_store8(acc + r * as + d, a[r][0]);
            ember_store8(acc + r * as + d + 8, a[r][1]);
        }
    }
    for (; d < Dv; d++)
        for (int r = 0; r < R; r++) {
            float t = acc[r * as + d];
            for (int64_t j = 0; j < nk; j++) t = fmaf(w[r * ws + j], v[j * vs + d], t);
            acc[r * as + d] = t;
        }
}
