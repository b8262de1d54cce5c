/* ember OpenCL prelude for the Adreno profile, after common.h. The renderer defines
 * EMBER_FP16 (1: half arithmetic through cl_khr_fp16; 0: halves only stored, each half
 * operation computed in float and rounded to half, which gives the same bits because float
 * has more than 2 * 11 + 2 significand bits) and EMBER_SUBGROUPS (1: cl_khr_subgroups;
 * 0: the kernels share values through local memory instead).
 * Qualcomm's qcom_reqd_sub_group_size attribute is used only where the driver announces
 * cl_qcom_reqd_sub_group_size, so any other OpenCL C compiler (clang's, PoCL's) accepts it. */

#if EMBER_FP16
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
typedef half ember_h;
typedef half4 ember_h4;
typedef half8 ember_h8;
#define EMBER_H_LOAD(i, p) ((p)[i])
#define EMBER_H4_LOAD(i, p) vload4((i), (p))
#define EMBER_H8_LOAD(i, p) vload8((i), (p))
#define EMBER_H(x) ((half)(x))
#define EMBER_HMUL(a, b) ((a) * (b))
#define EMBER_HADD(a, b) ((a) + (b))
#define EMBER_HTOF(h) convert_float(h)
#define EMBER_H8TOF(h) convert_float8(h)
#else
typedef float ember_h;
typedef float4 ember_h4;
typedef float8 ember_h8;
#define EMBER_H_LOAD(i, p) vload_half((i), (p))
#define EMBER_H4_LOAD(i, p) vload_half4((i), (p))
#define EMBER_H8_LOAD(i, p) vload_half8((i), (p))
#define EMBER_H(x) ((float)(x))
#define EMBER_HMUL(a, b) ember_round_half((a) * (b))
#define EMBER_HADD(a, b) ember_round_half((a) + (b))
#define EMBER_HTOF(h) (h)
#define EMBER_H8TOF(h) (h)
/* Round to the nearest half (ties to even), kept as a float: the significand rounded to 11
 * bits, in the subnormal range to a multiple of 2^-24, past 65504 infinity: what a conversion
 * to half and back gives, in a few integer operations (vstore_half_rte to private memory and
 * back costs PoCL minutes of compile time when inlined a hundred times). */
inline float8 ember_round_half8(float8 x) {
    const uint8 u = as_uint8(x);
    const float8 normal = as_float8((u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u);
    const float8 tiny = rint(x * 16777216.0f) * 5.9604644775390625e-8f;
    const float8 r = select(normal, tiny, isless(fabs(x), 6.103515625e-05f));
    return select(select(r, copysign((float8)INFINITY, x), isgreater(fabs(r), 65504.0f)), x, isnan(x));
}
inline float ember_round_half(float x) {
    const uint u = as_uint(x);
    const float normal = as_float((u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u);
    const float r = fabs(x) < 6.103515625e-05f ? rint(x * 16777216.0f) * 5.9604644775390625e-8f : normal;
    return isnan(x) ? x : fabs(r) > 65504.0f ? copysign(INFINITY, x) : r;
}
inline float8 ember_hmul8(float8 a, float8 b) { return ember_round_half8(a * b); }
inline float8 ember_hadd8(float8 a, float8 b) { return ember_round_half8(a + b); }
#endif

#if EMBER_FP16
#define EMBER_HMUL8(a, b) ((a) * (b))
#define EMBER_HADD8(a, b) ((a) + (b))
#else
#define EMBER_HMUL8(a, b) ember_hmul8((a), (b))
#define EMBER_HADD8(a, b) ember_hadd8((a), (b))
#endif

#if EMBER_SUBGROUPS
#pragma OPENCL EXTENSION cl_khr_subgroups : enable
#endif

#ifdef cl_qcom_reqd_sub_group_size
#pragma OPENCL EXTENSION cl_qcom_reqd_sub_group_size : enable
#define EMBER_REQD_SUBGROUP(size) __attribute__((qcom_reqd_sub_group_size(size)))
#else
#define EMBER_REQD_SUBGROUP(size)
#endif
