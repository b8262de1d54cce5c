/* ember CPU runtime header: included once at the top of every generated C file.
 * Conversions between f32 and the 16-bit float types, and the attributes kernels share.
 * Kernels are called by every thread of one OpenMP team with (ith, nth) and may use
 * `#pragma omp barrier` inside; nothing here allocates. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#define EMBER_RESTRICT __restrict__
#define EMBER_INLINE static inline __attribute__((always_inline))
#define EMBER_MIN(a, b) ((a) < (b) ? (a) : (b))
#define EMBER_MAX(a, b) ((a) > (b) ? (a) : (b))

typedef uint16_t ember_f16;   /* IEEE binary16 bits */
typedef uint16_t ember_bf16;  /* bfloat16 bits */

EMBER_INLINE float ember_f16_to_f32(ember_f16 h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

EMBER_INLINE ember_f16 ember_f32_to_f16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    /* round to nearest even, with subnormals, inf and nan */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffff;
    if (absx > 0x7f800000u) return (ember_f16)(sign | 0x7e00);          /* nan */
    if (absx >= 0x477ff000u) return (ember_f16)(sign | 0x7c00);         /* overflow -> inf */
    if (absx < 0x38800000u) {                                           /* subnormal or zero */
        if (absx < 0x33000000u) return (ember_f16)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;                                       /* 14..24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (ember_f16)(sign | half);
    }
    uint32_t r = absx + 0xfff + ((absx >> 13) & 1) - (112u << 23);
    return (ember_f16)(sign | (r >> 13));
#endif
}

EMBER_INLINE float ember_bf16_to_f32(ember_bf16 h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

EMBER_INLINE ember_bf16 ember_f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000u) return (ember_bf16)((x >> 16) | 64);  /* quiet nan */
    x += 0x7fff + ((x >> 16) & 1);
    return (ember_bf16)(x >> 16);
}

/* The share [*begin, *end) of n items that thread ith of nth works on. */
EMBER_INLINE void ember_split(int64_t n, int ith, int nth, int64_t *begin, int64_t *end) {
    int64_t per = (n + nth - 1) / nth;
    *begin = EMBER_MIN(n, per * ith);
    *end = EMBER_MIN(n, *begin + per);
}
