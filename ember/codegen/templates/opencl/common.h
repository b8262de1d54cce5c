/* ember OpenCL prelude: put once at the top of every generated program, before the kernels.
 * OpenCL C 1.2, no extension needed: halves are only stored (vload_half / vstore_half_rte),
 * never computed with; every tensor is bytes plus byte offsets and byte strides, as in the IR.
 * Offsets are 32-bit: the renderer refuses tensors that span 2 GiB or more. */

#define EMBER_LD_f32(p, off) (*(__global const float *)((p) + (off)))
#define EMBER_LD_f16(p, off) vload_half(0, (__global const half *)((p) + (off)))
#define EMBER_LD_bf16(p, off) as_float(((uint)*(__global const ushort *)((p) + (off))) << 16)
#define EMBER_LD_i32(p, off) (*(__global const int *)((p) + (off)))
#define EMBER_ST_f32(p, off, v) (*(__global float *)((p) + (off)) = (v))
#define EMBER_ST_f16(p, off, v) vstore_half_rte((v), 0, (__global half *)((p) + (off)))
#define EMBER_ST_bf16(p, off, v) (*(__global ushort *)((p) + (off)) = ember_f32_to_bf16(v))
#define EMBER_ST_i32(p, off, v) (*(__global int *)((p) + (off)) = (v))

/* Round to nearest even, as ggml (and the reference) does; no special case for NaN. */
inline ushort ember_f32_to_bf16(float v) {
    const uint b = as_uint(v);
    return (ushort)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

/* The tanh approximation of GELU that ggml and GGUF models use. */
inline float ember_gelu(float x) {
    return 0.5f * x * (1.0f + tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

inline float ember_half_at(__global const uchar *p) {
    return vload_half(0, (__global const half *)p);
}

/* ---- 32 values of a quantized row, dequantized (ggml's dequantize_row_* arithmetic) ------
 * row: the first block of the row; c: which 32 values (c * 32 is the first value's index).
 * K-quants hold 256 values per block, so c picks a block and a part of it. */
inline void ember_dequant32_q8_0(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 34;
    const float d = ember_half_at(b);
    for (int j = 0; j < 32; j++) out[j] = d * (float)(char)b[2 + j];
}

inline void ember_dequant32_q4_0(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 18;
    const float d = ember_half_at(b);
    for (int j = 0; j < 16; j++) {
        const uchar q = b[2 + j];
        out[j] = d * (float)((int)(q & 15) - 8);
        out[j + 16] = d * (float)((int)(q >> 4) - 8);
    }
}

inline void ember_dequant32_q5_0(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 22;
    const float d = ember_half_at(b);
    const uint qh = (uint)b[2] | ((uint)b[3] << 8) | ((uint)b[4] << 16) | ((uint)b[5] << 24);
    for (int j = 0; j < 16; j++) {
        const uchar q = b[6 + j];
        out[j] = d * (float)((int)((q & 15) | (((qh >> j) & 1u) << 4)) - 16);
        out[j + 16] = d * (float)((int)((q >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16);
    }
}

/* q4_k / q5_k: sub-block s's scale d * scale and minimum dmin * min, from the block's two
 * halves and its 12 bytes of 6-bit scales and minima (ggml's get_scale_min_k4). */
inline void ember_k4_scale_min(__global const uchar *b, int s, float *ds, float *dm) {
    const float d = ember_half_at(b), dmin = ember_half_at(b + 2);
    __global const uchar *sc = b + 4;
    uint scale, minv;
    if (s < 4) {
        scale = sc[s] & 63;
        minv = sc[s + 4] & 63;
    } else {
        scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
        minv = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    *ds = d * (float)scale;
    *dm = dmin * (float)minv;
}

inline void ember_dequant32_q4_k(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 144;
    const int s = c % 8;                       /* sub-block of 32 values */
    float ds, dm;
    ember_k4_scale_min(b, s, &ds, &dm);
    __global const uchar *qs = b + 16 + (s / 2) * 32;
    const int shift = (s % 2) * 4;
    for (int j = 0; j < 32; j++) out[j] = ds * (float)((qs[j] >> shift) & 15) - dm;
}

inline void ember_dequant32_q6_k(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 210;
    const int part = c % 8;                    /* values 32 * part .. of the block */
    const int h = part / 4, g = part % 4;      /* 128-value half, 32-value group in it */
    const float d = ember_half_at(b + 208);
    __global const uchar *ql = b + 64 * h + (g % 2) * 32;
    __global const uchar *qh = b + 128 + 32 * h;
    __global const char *scales = (__global const char *)(b + 192);
    const int lo_shift = (g / 2) * 4, hi_shift = 2 * g;
    for (int l = 0; l < 32; l++) {
        const int q = (int)(((ql[l] >> lo_shift) & 15) | (((qh[l] >> hi_shift) & 3) << 4)) - 32;
        out[l] = d * (float)scales[(128 * h + 32 * g + l) / 16] * (float)q;
    }
}

/* ---- the same 32 values as two float16 vectors (values 0-15, 16-31), for the dot products
 * of mul_mat: the arithmetic of ember_dequant32_*, vectorized. */
inline void ember_dequant32v_q8_0(__global const uchar *row, int c, float16 *w0, float16 *w1) {
    __global const uchar *b = row + c * 34;
    const float d = ember_half_at(b);
    *w0 = d * convert_float16(vload16(0, (__global const char *)(b + 2)));
    *w1 = d * convert_float16(vload16(1, (__global const char *)(b + 2)));
}

inline void ember_dequant32v_q4_0(__global const uchar *row, int c, float16 *w0, float16 *w1) {
    __global const uchar *b = row + c * 18;
    const float d = ember_half_at(b);
    const int16 q = convert_int16(vload16(0, b + 2));
    *w0 = d * convert_float16((q & 15) - 8);
    *w1 = d * convert_float16((q >> 4) - 8);
}

inline void ember_dequant32v_q5_0(__global const uchar *row, int c, float16 *w0, float16 *w1) {
    __global const uchar *b = row + c * 22;
    const float d = ember_half_at(b);
    const uint qh = (uint)b[2] | ((uint)b[3] << 8) | ((uint)b[4] << 16) | ((uint)b[5] << 24);
    const uint16 bit = (uint16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint16 q = convert_uint16(vload16(0, b + 6));
    const uint16 h0 = ((uint16)(qh) >> bit) & 1u, h1 = ((uint16)(qh) >> (bit + 16u)) & 1u;
    *w0 = d * convert_float16(convert_int16((q & 15u) | (h0 << 4)) - 16);
    *w1 = d * convert_float16(convert_int16((q >> 4) | (h1 << 4)) - 16);
}

inline void ember_dequant32v_q4_k(__global const uchar *row, int c, float16 *w0, float16 *w1) {
    __global const uchar *b = row + (c / 8) * 144;
    const int s = c % 8;
    float ds, dm;
    ember_k4_scale_min(b, s, &ds, &dm);
    __global const uchar *qs = b + 16 + (s / 2) * 32;
    const uint shift = (s % 2) * 4;
    *w0 = ds * convert_float16((convert_uint16(vload16(0, qs)) >> shift) & 15u) - dm;
    *w1 = ds * convert_float16((convert_uint16(vload16(1, qs)) >> shift) & 15u) - dm;
}

inline void ember_dequant32v_q6_k(__global const uchar *row, int c, float16 *w0, float16 *w1) {
    __global const uchar *b = row + (c / 8) * 210;
    const int part = c % 8, h = part / 4, g = part % 4;
    const float d = ember_half_at(b + 208);
    __global const uchar *ql = b + 64 * h + (g % 2) * 32;
    __global const uchar *qh = b + 128 + 32 * h;
    __global const char *scales = (__global const char *)(b + 192) + 8 * h + 2 * g;
    const uint lo_shift = (g / 2) * 4, hi_shift = 2 * g;
    for (int half_ = 0; half_ < 2; half_++) {
        const uint16 lo = (convert_uint16(vload16(half_, ql)) >> lo_shift) & 15u;
        const uint16 hi = (convert_uint16(vload16(half_, qh)) >> hi_shift) & 3u;
        const float16 v = (d * (float)scales[half_]) * convert_float16(convert_int16(lo | (hi << 4)) - 32);
        if (half_ == 0) *w0 = v; else *w1 = v;
    }
}

/* ---- ggml's other weight formats (ember.ir.quant_formats): one decoder each, 32 values of
 * a row in ggml's dequantize_row_* arithmetic; the float16 forms of mul_mat come from it
 * (EMBER_DEQUANT32V below), so each layout is written once. */
__constant char ember_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
__constant char ember_fp4_values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* E8M0 exponent -> 2^(e - 128) (the MXFP4 scale halved, the code book being E2M1 times 2). */
inline float ember_e8m0_half(uint e) {
    return as_float(e < 2u ? 0x00200000u << e : (e - 1u) << 23);
}

/* UE4M3 byte (bit 7 ignored, bias 7) -> its value halved; 0x7F (NaN) reads as 0. */
inline float ember_ue4m3_half(uint b) {
    const uint exp = (b >> 3) & 15u, man = b & 7u;
    if (b == 0u || b == 0x7Fu) return 0.0f;
    if (exp == 0u) return (float)man * (1.0f / 1024.0f);
    return as_float((exp - 8u + 127u) << 23 | man << 20);
}

inline void ember_dequant32_q4_1(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 20;
    const float d = ember_half_at(b), m = ember_half_at(b + 2);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)(b[4 + j] & 15) + m;
        out[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
}

inline void ember_dequant32_q5_1(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 24;
    const float d = ember_half_at(b), m = ember_half_at(b + 2);
    const uint qh = (uint)b[4] | ((uint)b[5] << 8) | ((uint)b[6] << 16) | ((uint)b[7] << 24);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)((b[8 + j] & 15) | (((qh >> j) & 1u) << 4)) + m;
        out[j + 16] = d * (float)((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) + m;
    }
}

inline void ember_dequant32_iq4_nl(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 18;
    const float d = ember_half_at(b);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)ember_iq4_values[b[2 + j] & 15];
        out[j + 16] = d * (float)ember_iq4_values[b[2 + j] >> 4];
    }
}

inline void ember_dequant32_mxfp4(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + c * 17;
    const float d = ember_e8m0_half(b[0]);
    for (int j = 0; j < 16; j++) {
        out[j] = d * (float)ember_fp4_values[b[1 + j] & 15];
        out[j + 16] = d * (float)ember_fp4_values[b[1 + j] >> 4];
    }
}

/* nvfp4: 64-value blocks; 32-value chunk c is half c & 1 of block c / 2 (sub-blocks of 16, each
 * with its UE4M3 scale: qs[8s ..] low nibbles values 0..7, high nibbles 8..15). */
inline void ember_dequant32_nvfp4(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 2) * 36;
    const int h = c & 1;
    __global const uchar *qs = b + 4 + 16 * h;
    for (int s = 0; s < 2; s++) {
        const float d = ember_ue4m3_half(b[2 * h + s]);
        for (int l = 0; l < 8; l++) {
            out[16 * s + l] = d * (float)ember_fp4_values[qs[8 * s + l] & 15];
            out[16 * s + 8 + l] = d * (float)ember_fp4_values[qs[8 * s + l] >> 4];
        }
    }
}

/* q2_k: chunk c is values 32k .. of block c / 8 (k = c % 8): bits 2 (k % 4) of qs[32 (k / 4) + l];
 * its two 16-value groups 2k, 2k + 1 have 4-bit scales and mins. */
inline void ember_dequant32_q2_k(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 84;
    const int k = c % 8;
    const float d = ember_half_at(b + 80), dmin = ember_half_at(b + 82);
    __global const uchar *qs = b + 16 + 32 * (k / 4);
    const int shift = 2 * (k % 4);
    for (int g = 0; g < 2; g++) {
        const uchar sc = b[2 * k + g];
        const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        for (int l = 16 * g; l < 16 * g + 16; l++) out[l] = dl * (float)((qs[l] >> shift) & 3) - ml;
    }
}

/* q3_k: as q2_k's low bits (at b + 32), the high bit k of hmask[l] (clear: minus 4), six-bit
 * scales minus 32 (low nibbles in bytes 96..103, top 2 bits in 104..107). */
inline void ember_dequant32_q3_k(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 110;
    const int k = c % 8;
    const float d = ember_half_at(b + 108);
    __global const uchar *qs = b + 32 + 32 * (k / 4);
    const int shift = 2 * (k % 4);
    for (int g = 0; g < 2; g++) {
        const int s = 2 * k + g;
        const int lo = s < 8 ? b[96 + s] & 15 : b[96 + s - 8] >> 4;
        const int hi = (b[104 + s % 4] >> (2 * (s / 4))) & 3;
        const float dl = d * (float)((lo | (hi << 4)) - 32);
        for (int l = 16 * g; l < 16 * g + 16; l++) {
            const int q = ((qs[l] >> shift) & 3) - (((b[l] >> k) & 1) ? 0 : 4);
            out[l] = dl * (float)q;
        }
    }
}

/* q5_k: q4_k's scales and nibbles plus bit s of qh[l] (b + 16) as bit 4 of sub-block s. */
inline void ember_dequant32_q5_k(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 176;
    const int s = c % 8;
    float ds, dm;
    ember_k4_scale_min(b, s, &ds, &dm);
    __global const uchar *qs = b + 48 + (s / 2) * 32;
    const int shift = (s % 2) * 4;
    for (int l = 0; l < 32; l++) out[l] = ds * (float)(((qs[l] >> shift) & 15) | (((b[16 + l] >> s) & 1) << 4)) - dm;
}

/* iq4_xs: sub-block s of block c / 8 (s = c % 8): scale (scales_l nibble | scales_h bits) - 32. */
inline void ember_dequant32_iq4_xs(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 136;
    const int s = c % 8;
    const uint sh = (uint)b[2] | ((uint)b[3] << 8);
    const int ls = (int)(((b[4 + s / 2] >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3u) << 4)) - 32;
    const float dl = ember_half_at(b) * (float)ls;
    __global const uchar *qs = b + 8 + 16 * s;
    for (int l = 0; l < 16; l++) {
        out[l] = dl * (float)ember_iq4_values[qs[l] & 15];
        out[l + 16] = dl * (float)ember_iq4_values[qs[l] >> 4];
    }
}

/* The float16 pair of mul_mat from the scalar decoder of these formats. */
#define EMBER_DEQUANT32V(wtype) \
    inline void ember_dequant32v_##wtype(__global const uchar *row, int c, float16 *w0, float16 *w1) { \
        float v[32]; \
        ember_dequant32_##wtype(row, c, v); \
        *w0 = vload16(0, v); \
        *w1 = vload16(1, v); \
    }
EMBER_DEQUANT32V(q4_1)
EMBER_DEQUANT32V(q5_1)
EMBER_DEQUANT32V(iq4_nl)
EMBER_DEQUANT32V(mxfp4)
EMBER_DEQUANT32V(nvfp4)
EMBER_DEQUANT32V(q2_k)
EMBER_DEQUANT32V(q3_k)
EMBER_DEQUANT32V(q5_k)
EMBER_DEQUANT32V(iq4_xs)

inline float ember_sum16(float16 v) {
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    const float2 c = b.lo + b.hi;
    return c.x + c.y;
}
