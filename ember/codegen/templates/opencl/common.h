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

inline void ember_dequant32_q4_k(__global const uchar *row, int c, float *out) {
    __global const uchar *b = row + (c / 8) * 144;
    const int s = c % 8;                       /* sub-block of 32 values */
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
    const float ds = d * (float)scale, dm = dmin * (float)minv;
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
    const float ds = d * (float)scale, dm = dmin * (float)minv;
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

inline float ember_sum16(float16 v) {
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    const float2 c = b.lo + b.hi;
    return c.x + c.y;
}
