"""NumPy codecs of the rest of ggml's weight formats people download: the legacy ``q4_1`` /
``q5_1``, the k-quants ``q2_k`` / ``q3_k`` / ``q5_k``, the non-linear ``iq4_nl`` / ``iq4_xs``
and the 4-bit float formats ``mxfp4`` / ``nvfp4``; plus a generator of random, valid blocks of
every weight format (for tests). ember.ir.quant registers these next to its own kinds.

Layouts (bytes in block order; fp16 little endian; ggml's ``ggml-common.h``):

``q4_1``  32 values / 20 bytes: ``d: fp16, m: fp16, qs[16]`` (value j < 16 the low nibble of
    ``qs[j]``, j + 16 the high nibble); ``value = d * q + m``.
``q5_1``  32 / 24: ``d, m: fp16, qh: uint32`` (bit j = bit 4 of value j), ``qs[16]``.
``q2_k``  256 / 84: ``scales[16]`` (low nibble the scale, high nibble the min of each
    16-value group), ``qs[64]``, ``d, dmin: fp16``; value ``128h + 32j + l`` (h < 2, j < 4,
    l < 32) is bits ``2j..2j+1`` of ``qs[32h + l]``; ``value = d * sc * q - dmin * m``.
``q3_k``  256 / 110: ``hmask[32], qs[64], scales[12], d: fp16``; the 2 low bits as in q2_k,
    value ``32j + l`` (j < 8) has its high bit in bit j of ``hmask[l]``; 16 six-bit scales
    (low 4 bits in nibbles of ``scales[0:8]``, top 2 bits in ``scales[8:12]``);
    ``value = d * (sc - 32) * (q - (4 if the high bit is clear else 0))``.
``q5_k``  256 / 176: ``d, dmin: fp16, scales[12]`` (as q4_k), ``qh[32], qs[128]``; sub-block s
    (32 values) takes bit s of ``qh[l]`` as bit 4 of value ``32s + l``.
``iq4_nl`` 32 / 18: ``d: fp16, qs[16]`` (nibbles as q4_0); ``value = d * IQ4_VALUES[nibble]``.
``iq4_xs`` 256 / 136: ``d: fp16, scales_h: uint16, scales_l[4], qs[128]``; sub-block s has the
    6-bit scale ``(scales_l nibble s) | (bits 2s..2s+1 of scales_h) << 4`` minus 32 and its 16
    bytes of nibbles as iq4_nl; ``value = d * ls * IQ4_VALUES[nibble]``.
``mxfp4`` 32 / 17: ``e: uint8`` (E8M0 exponent), ``qs[16]``; ``value = 2^(e - 128) *
    FP4_VALUES[nibble]`` (FP4_VALUES are E2M1 doubled, hence the half).
``nvfp4`` 64 / 36: ``d[4]`` (UE4M3 scales, one per 16 values), ``qs[32]``; sub-block s uses
    ``qs[8s .. 8s+8]``, values 0..7 the low nibbles and 8..15 the high ones;
    ``value = ue4m3(d[s]) / 2 * FP4_VALUES[nibble]`` (0x7F, E4M3's NaN, decodes as 0, as in ggml).

Dequantization does the float32 operations of ``gguf.quants.dequantize`` in the same order, so
the floats are identical (tests/ir/test_quant.py). Quantizers: ``q4_1``, ``q5_1`` and ``mxfp4``
reproduce gguf's reference ones byte for byte; the others are ember's own (round to nearest on a
scale grid; valid blocks, not ggml's error-minimising search), enough for tests and for
requantizing a model in a benchmark.
"""
from __future__ import annotations

import numpy as np

_F16 = np.dtype("<f2")

IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                      np.int8)
FP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)

LAYOUTS: dict[str, tuple[int, int]] = {
    "q4_1": (32, 20),
    "q5_1": (32, 24),
    "q2_k": (256, 84),
    "q3_k": (256, 110),
    "q5_k": (256, 176),
    "iq4_nl": (32, 18),
    "iq4_xs": (256, 136),
    "mxfp4": (32, 17),
    "nvfp4": (64, 36),
}

# Byte offsets of the fp16 fields of each block (checked for overflow after quantizing).
F16_FIELDS: dict[str, tuple[int, ...]] = {
    "q4_1": (0, 2), "q5_1": (0, 2), "q2_k": (80, 82), "q3_k": (108,), "q5_k": (0, 2),
    "iq4_nl": (0,), "iq4_xs": (0,), "mxfp4": (), "nvfp4": (),
}


# --------------------------------------------------------------------------- helpers


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """uint8 [n, bytes] -> float32 [n, 1] from the fp16 at byte offset start."""
    return np.ascontiguousarray(raw[:, start:start + 2]).view(_F16).astype(np.float32)


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(d, np.float32).reshape(-1).astype(_F16).view(np.uint8).reshape(-1, 2)


def _nibbles(qs: np.ndarray, groups: int) -> np.ndarray:
    """uint8 [n, groups * h] -> [n, groups * 2h]: per group of h bytes the low nibbles, then the
    high ones."""
    n = qs.shape[0]
    g = qs.reshape(n, groups, 1, -1)
    return np.concatenate([g & 0x0F, g >> 4], axis=2).reshape(n, -1)


def _pack_nibbles(q: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of _nibbles: uint8 codes < 16 [n, groups * 2h] -> [n, groups * h]."""
    n = q.shape[0]
    g = q.reshape(n, groups, 2, -1)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, -1)


def _bits(raw: np.ndarray, count: int) -> np.ndarray:
    """uint8 [n, m] -> uint8 [n, count, m]: plane k holds bit k of every byte."""
    return (raw[:, None, :] >> np.arange(count, dtype=np.uint8)[None, :, None]) & 1


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [n, 12] -> 8 six-bit scales and 8 six-bit mins (ggml get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _k4_pack(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """12 packed bytes [n, 12] -> the 16 six-bit q3_k scales (unsigned, 0..63)."""
    n = s.shape[0]
    lo = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    hi = (s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3
    return lo | (hi.reshape(n, 16) << 4)


def _q3_k_pack_scales(sc: np.ndarray) -> np.ndarray:
    """Inverse of _q3_k_scales; sc uint8 [n, 16] < 64."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:8] = (sc[:, 0:8] & 0x0F) | ((sc[:, 8:16] & 0x0F) << 4)
    h = (sc >> 4).reshape(-1, 4, 4)
    out[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return out


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """The 2-bit codes of q2_k / q3_k: uint8 qs [n, 64] -> [n, 256] (value 128h + 32j + l in
    bits 2j of qs[32h + l])."""
    n = qs.shape[0]
    g = qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (g & 3).reshape(n, 256)


def _pack_crumbs(q: np.ndarray) -> np.ndarray:
    g = q.reshape(-1, 2, 4, 32)
    return (g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)).reshape(-1, 64)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """E8M0 exponent byte -> float32 2^(e - 128), the MXFP4 block scale halved (ggml
    ggml_e8m0_to_fp32_half): e < 2 are the subnormals 2^-128, 2^-127."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def _ue4m3_table() -> np.ndarray:
    """float32 [256]: UE4M3 byte -> its value halved (the kvalues convention), bit 7 ignored,
    exponent bias 7, 0x7F (NaN) as 0."""
    b = np.arange(256)
    exp = (b >> 3) & 0xF
    man = (b & 7).astype(np.float32)
    sub = man * np.float32(2.0 ** -9)
    norm = (np.float32(1) + man / np.float32(8)) * np.exp2(exp.astype(np.float32) - np.float32(7))
    val = np.where(exp == 0, sub, norm).astype(np.float32) * np.float32(0.5)
    val[(b == 0) | (b == 0x7F)] = 0
    return val.astype(np.float32)


UE4M3_HALF = _ue4m3_table()


def _nearest_code(t: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per element of t the index of the nearest entry of values (first on ties)."""
    return np.abs(t[..., None] - values.astype(np.float32)).argmin(axis=-1).astype(np.uint8)


# --------------------------------------------------------------------------- legacy: q4_1, q5_1


def _dequantize_q4_1(raw):
    return _f16(raw, 0) * _nibbles(raw[:, 4:], 1).astype(np.float32) + _f16(raw, 2)


def _dequantize_q5_1(raw):
    hi = _bits(raw[:, 4:8], 8).transpose(0, 2, 1).reshape(-1, 32)  # bit j of the uint32
    q = _nibbles(raw[:, 8:], 1) | (hi << 4)
    return _f16(raw, 0) * q.astype(np.float32) + _f16(raw, 2)


def _quantize_affine32(x, nmax):
    """ggml quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / nmax, q = (x - min) / d + 0.5
    truncated (min and d stored as fp16, the codes computed from the float32 ones)."""
    mx = x.max(axis=1, keepdims=True)
    mn = x.min(axis=1, keepdims=True)
    d = (mx - mn) / np.float32(nmax)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    q = np.trunc((x - mn) * inv + np.float32(0.5)).astype(np.uint8)
    return d, mn, np.minimum(q, nmax)


def _quantize_q4_1(x):
    d, mn, q = _quantize_affine32(x, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q, 1)], axis=1)


def _quantize_q5_1(x):
    d, mn, q = _quantize_affine32(x, 31)
    qh = np.packbits(q >> 4, axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), qh, _pack_nibbles(q & 0x0F, 1)], axis=1)


# --------------------------------------------------------------------------- k-quants


def _dequantize_q2_k(raw):
    n = raw.shape[0]
    sc = raw[:, 0:16]
    d, dmin = _f16(raw, 80), _f16(raw, 82)
    dl = (d * (sc & 0x0F).astype(np.float32))[:, :, None]
    ml = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
    q = _crumbs(raw[:, 16:80]).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, 256)


def _dequantize_q3_k(raw):
    n = raw.shape[0]
    d = _f16(raw, 108)
    sc = (_q3_k_scales(raw[:, 96:108]).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (d * sc)[:, :, None]
    hbit = _bits(raw[:, 0:32], 8).reshape(n, 256)
    q = _crumbs(raw[:, 32:96]).astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)


def _dequantize_q5_k(raw):
    n = raw.shape[0]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k4_scale_min(raw[:, 4:16])
    ds = (d * sc.astype(np.float32))[:, :, None]
    dm = (dmin * mn.astype(np.float32))[:, :, None]
    hi = _bits(raw[:, 16:48], 8)  # [n, 8, 32]: sub-block s, value l
    q = (_nibbles(raw[:, 48:], 4).reshape(n, 8, 32) | (hi << 4)).astype(np.float32)
    return (ds * q - dm).reshape(n, 256)


def _fit_grid(amax_sub: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales s >= 0 [n, S] -> (fp16 super-block step d [n, 1], integer codes
    round(s / d) in 0..top): d = max(s) / top."""
    d = (amax_sub.max(axis=1, keepdims=True) / np.float32(top)).astype(_F16).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    return d, np.clip(np.rint(amax_sub * inv), 0, top).astype(np.uint8)


def _affine_k(x, sub, nmax, smax):
    """Affine k-quant blocks: x [n, 256] in sub-blocks of sub values, codes 0..nmax,
    scales and mins integers 0..smax times fp16 d / dmin. Returns (d, dmin, sc, mn, q)."""
    n = x.shape[0]
    xs = x.reshape(n, 256 // sub, sub)
    lo = np.minimum(xs.min(axis=2), np.float32(0))
    step = (xs.max(axis=2) - lo) / np.float32(nmax)
    d, sc = _fit_grid(step, smax)
    dmin, mn = _fit_grid(-lo, smax)
    ds = (d * sc.astype(np.float32))[:, :, None]
    dm = (dmin * mn.astype(np.float32))[:, :, None]
    inv = np.zeros_like(ds)
    np.divide(np.float32(1), ds, out=inv, where=ds != 0)
    q = np.clip(np.rint((xs + dm) * inv), 0, nmax).astype(np.uint8).reshape(n, 256)
    return d, dmin, sc, mn, q


def _quantize_q2_k(x):
    d, dmin, sc, mn, q = _affine_k(x, 16, 3, 15)
    return np.concatenate([sc | (mn << 4), _pack_crumbs(q), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _quantize_q5_k(x):
    n = x.shape[0]
    d, dmin, sc, mn, q = _affine_k(x, 32, 31, 63)
    qh = np.packbits((q >> 4).reshape(n, 8, 32), axis=1, bitorder="little").reshape(n, 32)
    qs = _pack_nibbles((q & 0x0F).reshape(n, 256), 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k4_pack(sc, mn), qh, qs], axis=1)


def _quantize_q3_k(x):
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    idx = np.abs(xs).argmax(axis=2)[..., None]
    peak = np.take_along_axis(xs, idx, axis=2)[..., 0]  # signed, maps to code -4
    s = peak / np.float32(-4)
    smax_idx = np.abs(s).argmax(axis=1)[:, None]
    top = np.take_along_axis(s, smax_idx, axis=1)  # signed; maps to scale -32
    d = (top / np.float32(-32)).astype(_F16).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    ls = np.clip(np.rint(s * inv), -32, 31)
    dl = (d * ls)[:, :, None]
    inv_l = np.zeros_like(dl)
    np.divide(np.float32(1), dl, out=inv_l, where=dl != 0)
    q = (np.clip(np.rint(xs * inv_l), -4, 3) + 4).astype(np.uint8).reshape(n, 256)
    hmask = np.packbits((q >> 2).reshape(n, 8, 32), axis=1, bitorder="little").reshape(n, 32)
    scales = _q3_k_pack_scales((ls + 32).astype(np.uint8))
    return np.concatenate([hmask, _pack_crumbs(q & 3), scales, _f16_bytes(d)], axis=1)


# --------------------------------------------------------------------------- iq4_nl, iq4_xs


def _dequantize_iq4_nl(raw):
    return _f16(raw, 0) * IQ4_VALUES[_nibbles(raw[:, 2:], 1)].astype(np.float32)


def _dequantize_iq4_xs(raw):
    n = raw.shape[0]
    d = _f16(raw, 0)
    sh = raw[:, 2].astype(np.uint16) | (raw[:, 3].astype(np.uint16) << 8)
    hi = ((sh[:, None] >> (2 * np.arange(8, dtype=np.uint16))[None]) & 3).astype(np.uint8)
    lo = np.stack([raw[:, 4:8] & 0x0F, raw[:, 4:8] >> 4], axis=2).reshape(n, 8)
    ls = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (d * ls)[:, :, None]
    q = IQ4_VALUES[_nibbles(raw[:, 8:], 8)].astype(np.float32).reshape(n, 8, 32)
    return (dl * q).reshape(n, 256)


def _iq4_codes(xs: np.ndarray, dl: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(dl)
    np.divide(np.float32(1), dl, out=inv, where=dl != 0)
    return _nearest_code(xs * inv, IQ4_VALUES)


def _signed_peak(xs: np.ndarray) -> np.ndarray:
    idx = np.abs(xs).argmax(axis=-1)[..., None]
    return np.take_along_axis(xs, idx, axis=-1)


def _quantize_iq4_nl(x):
    d = (_signed_peak(x) / np.float32(-127)).astype(_F16).astype(np.float32)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(_iq4_codes(x, d), 1)], axis=1)


def _quantize_iq4_xs(x):
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    s = _signed_peak(xs)[..., 0] / np.float32(-127)  # [n, 8]
    top = _signed_peak(s)  # [n, 1], maps to scale -32
    d = (top / np.float32(-32)).astype(_F16).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    ls = np.clip(np.rint(s * inv), -32, 31)
    q = _iq4_codes(xs, (d * ls)[:, :, None]).reshape(n, 256)
    u = (ls + 32).astype(np.uint16)
    sh = ((u >> 4) << (2 * np.arange(8, dtype=np.uint16))[None]).sum(axis=1).astype("<u2")
    sl = (u[:, 0::2] & 0x0F) | ((u[:, 1::2] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), sh.view(np.uint8).reshape(n, 2), sl.astype(np.uint8),
                           _pack_nibbles(q, 8)], axis=1)


# --------------------------------------------------------------------------- mxfp4, nvfp4


def _dequantize_mxfp4(raw):
    return e8m0_half(raw[:, 0:1]) * FP4_VALUES[_nibbles(raw[:, 1:], 1)].astype(np.float32)


def _quantize_mxfp4(x):
    """gguf's MXFP4 reference: e = floor(log2(amax)) - 2 + 127, nearest E2M1 value (first on
    ties) against the float32 block scale."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.uint8)
    d = e8m0_half(e)
    q = np.abs(d[:, :, None] * FP4_VALUES.astype(np.float32) - x[:, :, None]).argmin(axis=-1)
    return np.concatenate([e, _pack_nibbles(q.astype(np.uint8), 1)], axis=1)


def _dequantize_nvfp4(raw):
    n = raw.shape[0]
    d = UE4M3_HALF[raw[:, 0:4]][:, :, None]
    q = FP4_VALUES[_nibbles(raw[:, 4:], 4)].reshape(n, 4, 16).astype(np.float32)
    return (d * q).reshape(n, 64)


# UE4M3 encodings in increasing order of value (0x7F, NaN, and the bit-7 aliases left out).
_UE4M3_CODES = np.argsort(UE4M3_HALF[:0x7F], kind="stable").astype(np.uint8)
_UE4M3_SORTED = UE4M3_HALF[_UE4M3_CODES]


def _quantize_nvfp4(x):
    n = x.shape[0]
    xs = x.reshape(n, 4, 16)
    want = np.abs(xs).max(axis=2) / np.float32(12)  # the halved scale putting amax on +-12
    pos = np.clip(np.searchsorted(_UE4M3_SORTED, want), 0, len(_UE4M3_SORTED) - 1)
    d = _UE4M3_CODES[pos]  # the smallest scale at least as large (no clipping of amax)
    dv = UE4M3_HALF[d][:, :, None]
    inv = np.zeros_like(dv)
    np.divide(np.float32(1), dv, out=inv, where=dv != 0)
    q = _nearest_code(xs * inv, FP4_VALUES).reshape(n, 64)
    return np.concatenate([d, _pack_nibbles(q, 4)], axis=1)


DEQUANTIZERS = {
    "q4_1": _dequantize_q4_1, "q5_1": _dequantize_q5_1, "q2_k": _dequantize_q2_k,
    "q3_k": _dequantize_q3_k, "q5_k": _dequantize_q5_k, "iq4_nl": _dequantize_iq4_nl,
    "iq4_xs": _dequantize_iq4_xs, "mxfp4": _dequantize_mxfp4, "nvfp4": _dequantize_nvfp4,
}
QUANTIZERS = {
    "q4_1": _quantize_q4_1, "q5_1": _quantize_q5_1, "q2_k": _quantize_q2_k,
    "q3_k": _quantize_q3_k, "q5_k": _quantize_q5_k, "iq4_nl": _quantize_iq4_nl,
    "iq4_xs": _quantize_iq4_xs, "mxfp4": _quantize_mxfp4, "nvfp4": _quantize_nvfp4,
}


# --------------------------------------------------------------------------- random blocks

# Per kind: (byte offset, kind of field) of the block-scale fields a random block must keep
# finite and moderate; every other byte may take any value. "f16" fields get a normal value
# times the amplitude over the largest code product of the format, "f16+" the same but
# non-negative (k-quant d / dmin keep the sign conventions of real files).
_SCALE_FIELDS = {
    "q8_0": ((0, "f16", 127),), "q4_0": ((0, "f16", 8),), "q5_0": ((0, "f16", 16),),
    "q4_1": ((0, "f16+", 15), (2, "f16", 1)), "q5_1": ((0, "f16+", 31), (2, "f16", 1)),
    "q4_k": ((0, "f16+", 15 * 63), (2, "f16+", 63)), "q5_k": ((0, "f16+", 31 * 63), (2, "f16+", 63)),
    "q6_k": ((208, "f16", 32 * 127),), "q2_k": ((80, "f16+", 3 * 15), (82, "f16+", 15)),
    "q3_k": ((108, "f16", 4 * 32),), "iq4_nl": ((0, "f16", 127),), "iq4_xs": ((0, "f16", 127 * 32),),
    "mxfp4": ((0, "e8m0", 12),), "nvfp4": ((0, "ue4m3", 12), (1, "ue4m3", 12), (2, "ue4m3", 12),
                                           (3, "ue4m3", 12)),
}


def random_blocks(kind: str, nblocks: int, rng: np.random.Generator, amplitude: float = 1.0) -> np.ndarray:
    """uint8 [nblocks, block_bytes]: random but valid blocks of weight format kind whose values
    stay within about +-amplitude (codes, packed scales and bits uniformly random; the float
    block scales drawn so that the largest code times the largest scale is about amplitude)."""
    from ember.ir.quant import BLOCK_LAYOUTS
    nbytes = BLOCK_LAYOUTS[kind][1]
    raw = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for off, field, top in _SCALE_FIELDS[kind]:
        step = np.float32(amplitude / top)
        if field in ("f16", "f16+"):
            d = rng.standard_normal(nblocks).astype(np.float32) * step
            raw[:, off:off + 2] = _f16_bytes(np.abs(d) if field == "f16+" else d)
        elif field == "e8m0":
            centre = int(np.floor(np.log2(step))) + 128
            raw[:, off] = rng.integers(centre - 3, centre + 1, nblocks).astype(np.uint8)
        else:  # ue4m3: the codes whose halved value lies within [step / 8, step]
            ok = _UE4M3_CODES[(_UE4M3_SORTED >= step / 8) & (_UE4M3_SORTED <= step)]
            raw[:, off] = rng.choice(ok, nblocks)
    return raw
