"""NumPy implementations of ggml's block-quantized weight formats.

The byte layouts are exactly the ones ggml / llama.cpp use in memory and in
GGUF files, so ``quantize`` output can be written into a GGUF tensor as-is and
``dequantize`` accepts raw tensor bytes read from a GGUF file.

Supported kinds (``BLOCK_LAYOUTS[kind] == (values per block, bytes per block)``):

``q8_0``  32 values / 34 bytes
    ``d: fp16`` then ``qs: int8[32]``; ``value[j] = d * qs[j]``.
``q4_0``  32 values / 18 bytes
    ``d: fp16`` then ``qs: uint8[16]``; value ``j`` (j < 16) is the low nibble
    of ``qs[j]``, value ``j + 16`` the high nibble; ``value = (nibble - 8) * d``.
``q5_0``  32 values / 22 bytes
    ``d: fp16``, ``qh: uint32`` (little endian, bit ``j`` is bit 4 of value
    ``j``), ``qs: uint8[16]`` (nibbles as in q4_0);
    ``value = ((nibble | highbit << 4) - 16) * d``.
``q4_k``  256 values / 144 bytes
    ``d: fp16``, ``dmin: fp16``, ``scales: uint8[12]`` (eight 6-bit scales and
    eight 6-bit mins, packed as in ggml's ``get_scale_min_k4``),
    ``qs: uint8[128]`` (four 32-byte groups; group ``g`` holds values
    ``64g .. 64g+31`` in its low nibbles and ``64g+32 .. 64g+63`` in its high
    nibbles); value in sub-block ``s`` (32 values each) is
    ``d * sc[s] * q - dmin * m[s]``.
``q6_k``  256 values / 210 bytes
    ``ql: uint8[128]``, ``qh: uint8[64]``, ``scales: int8[16]``, ``d: fp16``;
    ``value = d * scales[j // 16] * (q - 32)`` with ``q`` a 6-bit value (low
    4 bits in ``ql``, high 2 bits in ``qh``; see ``_pack_q6_k``).
``q4_1``, ``q5_1``, ``q2_k``, ``q3_k``, ``q5_k``, ``iq4_nl``, ``iq4_xs``, ``mxfp4``, ``nvfp4``
    ggml's other weight formats; layouts and codecs in ember.ir.quant_formats.
``turbo3`` 128 values / 50 bytes, ``turbo4`` 128 values / 66 bytes
    TurboQuant KV-cache blocks (one attention head each): an fp16 corrected norm and
    Lloyd-Max indices of the rotated unit vector; layouts and constants in ember.ir.turbo.

``dequantize`` follows ggml's ``dequantize_row_*`` arithmetic (same float32
operations in the same order as ``gguf.quants.dequantize``), so it returns the
same floats.  The q8_0 / q4_0 / q5_0 quantizers reproduce ggml's reference
quantizers (``quantize_row_*_ref``) bit for bit.  The q4_k / q6_k quantizers are
our own (a few least-squares-refined starting grids per sub-block, then the
sub-block scales snapped to the 6-bit / int8 grid), so their bytes differ from
llama.cpp's, but the blocks are valid and, on Gaussian data, within ~0.5% of the
error of ggml's reference q4_K quantizer and ~6% below its q6_K error (q6_k also
copes with tiny weights, |x| ~ 1e-5, where ggml's fp16 super-block scale flushes
to zero).

Kind names are case-insensitive.  All work is vectorised over blocks; large
inputs are processed in chunks of blocks to bound temporary memory.
"""

from __future__ import annotations

import numpy as np

from ember.ir import quant_formats, turbo

__all__ = ["BLOCK_LAYOUTS", "quantize", "dequantize"]

BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q5_0": (32, 22),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
    "turbo3": (turbo.BLOCK, turbo.BLOCK_BYTES[3]),
    "turbo4": (turbo.BLOCK, turbo.BLOCK_BYTES[4]),
    **quant_formats.LAYOUTS,
}

# Values processed per chunk (a multiple of every block size).  Keeps each
# float32 temporary at 1 MiB: cache friendly and memory bounded, while the
# per-sub-block arrays stay large enough to amortise NumPy's per-call overhead.
# (Threads over chunks were tried and were slower: too many small GIL-holding ops.)
_CHUNK_VALUES = 1 << 18

_F16 = np.dtype("<f2")


def _layout(kind: str) -> tuple[str, int, int]:
    if not isinstance(kind, str):
        raise TypeError(f"quantization kind must be a str, got {type(kind).__name__}")
    key = kind.lower()
    if key not in BLOCK_LAYOUTS:
        raise ValueError(
            f"unknown quantization kind {kind!r}; expected one of {sorted(BLOCK_LAYOUTS)}"
        )
    block, nbytes = BLOCK_LAYOUTS[key]
    return key, block, nbytes


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def _roundf(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero (float32 in, float32 out)."""
    a = np.abs(x)
    f = np.floor(a)
    # a - f is exact for floats, so the >= 0.5 comparison is exact too.
    r = f + (a - f >= np.float32(0.5)).astype(np.float32)
    return np.copysign(r, x)


def _safe_recip(d: np.ndarray) -> np.ndarray:
    """``d ? 1/d : 0`` elementwise, float32."""
    out = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=out, where=d != 0)
    return out


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 [n] -> uint8 [n, 2] holding little-endian fp16 (round to nearest even)."""
    return d.astype(_F16).view(np.uint8).reshape(-1, 2)


def _read_f16(raw: np.ndarray, start: int) -> np.ndarray:
    """uint8 [n, bytes] -> float32 [n, 1] from the fp16 at byte offset ``start``."""
    return np.ascontiguousarray(raw[:, start:start + 2]).view(_F16).astype(np.float32)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row (last axis) the value with the largest magnitude; first one on ties
    (matching ggml's ``if (amax < fabsf(v))`` scan).  Returns shape ``x.shape[:-1] + (1,)``."""
    idx = np.abs(x).argmax(axis=-1)[..., None]
    return np.take_along_axis(x, idx, axis=-1)


# --------------------------------------------------------------------------- #
# q8_0
# --------------------------------------------------------------------------- #


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    amax = np.abs(x).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    q = _roundf(x * _safe_recip(d)).astype(np.int8)
    out = np.empty((n, 34), np.uint8)
    out[:, :2] = _f16_bytes(d[:, 0])
    out[:, 2:] = q.view(np.uint8)
    return out


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    d = _read_f16(raw, 0)
    return d * raw[:, 2:].view(np.int8).astype(np.float32)


# --------------------------------------------------------------------------- #
# q4_0 / q5_0
# --------------------------------------------------------------------------- #


def _quantize_sym(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared part of q4_0 (half=8) and q5_0 (half=16): returns (d [n], q uint8 [n, 32])."""
    mx = _signed_absmax(x)
    d = mx / np.float32(-half)
    t = x * _safe_recip(d) + np.float32(half + 0.5)
    # ggml: MIN(2*half-1, (int8_t)(t)); t >= ~0 so truncation == floor.
    q = np.minimum(np.trunc(t), np.float32(2 * half - 1)).astype(np.uint8)
    return d[:, 0], q


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _quantize_sym(x, 8)
    out = np.empty((x.shape[0], 18), np.uint8)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def _dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    d = _read_f16(raw, 0)
    qs = raw[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _quantize_sym(x, 16)
    out = np.empty((x.shape[0], 22), np.uint8)
    out[:, :2] = _f16_bytes(d)
    # bit j of the little-endian uint32 qh is bit 4 of value j
    out[:, 2:6] = np.packbits(q >> 4, axis=1, bitorder="little")
    lo = q & 0x0F
    out[:, 6:] = lo[:, :16] | (lo[:, 16:] << 4)
    return out


def _dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    d = _read_f16(raw, 0)
    hi = np.unpackbits(raw[:, 2:6], axis=1, bitorder="little")
    qs = raw[:, 6:]
    lo = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    q = (lo | (hi << 4)).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


# --------------------------------------------------------------------------- #
# q4_k
# --------------------------------------------------------------------------- #


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes [n, 12] -> (scales [n, 8], mins [n, 8]) as uint8 (ggml get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _pack_scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of ``_unpack_scale_min_k4``; sc, mn uint8 [n, 8] with values < 64."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    d = _read_f16(raw, 0)
    dmin = _read_f16(raw, 2)
    sc, mn = _unpack_scale_min_k4(raw[:, 4:16])
    ds = (d * sc.astype(np.float32))[:, :, None]  # [n, 8, 1]
    dm = (dmin * mn.astype(np.float32))[:, :, None]
    qs = raw[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (ds * q - dm).reshape(n, 256)


def _affine_codes(xt: np.ndarray, scale: np.ndarray, off: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = clip(rint((xt - off) / scale), 0, 15)`` (0 where scale == 0), in place."""
    np.subtract(xt, off, out=out)
    out *= _safe_recip(scale)
    np.rint(out, out=out)
    np.clip(out, 0, 15, out=out)
    return out


def _dot1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of ``a * b`` over axis 1 of 3-d arrays, keeping the axis."""
    return np.einsum("ijk,ijk->ik", a, b)[:, None, :]


def _fit_affine(xt, L, sx, sx2, scale, off):
    """Least-squares ``x ~= scale * L + off`` per sub-block (axis 1 of ``xt``) under
    the q4_k constraint ``off <= 0``; keeps the previous fit where degenerate (all
    codes equal) or where the fitted scale is not positive.

    Returns (scale, off, squared error of the fit for these codes, sum of L^2).
    Sums of integer codes are exact in float32, so float32 is enough here."""
    k = np.float32(xt.shape[1])
    sl = L.sum(axis=1, keepdims=True)
    sl2 = _dot1(L, L)
    sxl = _dot1(xt, L)
    det = k * sl2 - sl * sl
    inv_det = _safe_recip(det)
    new_scale = (k * sxl - sl * sx) * inv_det
    new_off = (sl2 * sx - sl * sxl) * inv_det
    # where the free fit wants a positive offset, fit the scale alone (off = 0)
    pos = new_off > 0
    if pos.any():
        new_scale = np.where(pos, sxl * _safe_recip(sl2), new_scale)
        new_off = np.where(pos, np.float32(0), new_off)
    good = (det > 0) & (new_scale > 0)
    s = np.where(good, new_scale, scale)
    o = np.where(good, new_off, off)
    err = sx2 + s * (s * sl2 - 2 * sxl) + o * (k * o - 2 * sx + 2 * s * sl)
    return s, o, err, sl2


def _pick(best: list | None, err: np.ndarray, *vals: np.ndarray) -> list:
    """Keep, per element, the candidate with the smaller ``err``."""
    if best is None:
        return [err, *vals]
    better = err < best[0]
    return [np.where(better, new, old) for old, new in zip(best, (err, *vals))]


def _snap_scales(vals, weight, limit, cands, lo, hi):
    """Quantize the sub-block scales ``vals`` [S, 1, n] (S sub-blocks per super-block)
    to integers in [lo, hi] times one fp16 super-block step ``d``.

    ``d = limit / c`` is tried for every ``c`` in ``cands`` and, per super-block, the
    one with the least ``weight``-weighted squared scale error wins.
    Returns (d as fp16 [1, 1, n], integer-valued float32 [S, 1, n])."""
    c = np.asarray(cands, np.float32).reshape(-1, 1, 1, 1)
    d16 = (limit[None] / c).astype(_F16)  # [C, 1, 1, n]
    d = d16.astype(np.float32)
    q = np.clip(np.rint(vals[None] * _safe_recip(d)), lo, hi)  # [C, S, 1, n]
    err = (weight[None] * np.square(q * d - vals[None])).sum(axis=1, keepdims=True)
    idx = err.argmin(axis=0)[None]  # [1, 1, 1, n]
    d16 = np.take_along_axis(d16, idx, axis=0)[0]
    q = np.take_along_axis(q, np.broadcast_to(idx, (1, *q.shape[1:])), axis=0)[0]
    return d16, q


# Search settings (see _quantize_q4_k / _quantize_q6_k).
# q4_k starting grids: step = range / (15 * m); grid anchored at the sub-block
# minimum (centring 0) or centred on the range (centring 0.5).
_Q4K_STARTS = ((1.0, 0.0), (0.95, 0.0), (1.05, 0.5))  # (m, centring)
_Q4K_STEPS = 2
_Q4K_GRID = tuple(63.49 - 0.5 * np.arange(9))
_Q6K_STARTS = (1.0, 1.03, 0.97)  # q6_k starts: the abs-max value lands on code -32 * m
_Q6K_STEPS = 2
# The coarse tail (d = limit / 96 ... / 8) only wins when d would underflow fp16
# (tiny weights, |x| below ~1e-3): a larger, representable d beats a flushed one.
_Q6K_GRID = tuple(128.0 - 0.5 * np.arange(9)) + (96.0, 64.0, 48.0, 32.0, 16.0, 8.0)


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """q4_k quantizer.

    Per 32-value sub-block an affine fit ``x ~= scale * L + off`` (L in 0..15,
    off <= 0) is searched: a few starting grids derived from the sub-block's
    min/max are each refined by alternating code assignment and least squares,
    and the fit with the least squared error is kept.  Scales and mins are then
    snapped to 6-bit multiples of fp16 ``d`` / ``dmin`` (trying a few choices of
    ``d``), and the codes are recomputed against the decoder's exact values.
    Work happens in a transposed [value, block] layout so that per-sub-block
    reductions and broadcasts run over long contiguous rows.
    """
    n = x.shape[0]
    xt = np.ascontiguousarray(x.T).reshape(8, 32, n)  # [sub-block, value, block]
    sx = xt.sum(axis=1, keepdims=True)
    sx2 = _dot1(xt, xt)
    lo = np.minimum(xt.min(axis=1, keepdims=True), np.float32(0))
    rng = xt.max(axis=1, keepdims=True) - lo
    L = np.empty_like(xt)

    best = None
    for mult, centre in _Q4K_STARTS:
        scale = rng / np.float32(15 * mult)
        off = lo + np.float32(centre) * (rng - 15 * scale)
        for _ in range(_Q4K_STEPS):
            _affine_codes(xt, scale, off, L)
            scale, off, err, sl2 = _fit_affine(xt, L, sx, sx2, scale, off)
        best = _pick(best, err, scale, off, sl2)
    _, scale, off, sl2 = best
    mins = np.maximum(-off, np.float32(0))

    d16, ls = _snap_scales(scale, sl2, scale.max(axis=0, keepdims=True), _Q4K_GRID, 0, 63)
    dmin16, lm = _snap_scales(mins, np.ones_like(mins), mins.max(axis=0, keepdims=True), _Q4K_GRID, 0, 63)
    ds = d16.astype(np.float32) * ls
    dm = dmin16.astype(np.float32) * lm
    Lq = _affine_codes(xt, ds, -dm, L).astype(np.uint8).reshape(4, 2, 32, n)

    out = np.empty((n, 144), np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(n, 2)
    out[:, 4:16] = _pack_scale_min_k4(
        np.ascontiguousarray(ls.astype(np.uint8).reshape(8, n).T),
        np.ascontiguousarray(lm.astype(np.uint8).reshape(8, n).T),
    )
    out[:, 16:] = (Lq[:, 0] | (Lq[:, 1] << 4)).reshape(128, n).T
    return out


# --------------------------------------------------------------------------- #
# q6_k
# --------------------------------------------------------------------------- #


def _dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    ql = raw[:, 0:128].reshape(n, 2, 64)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    sc = raw[:, 192:208].view(np.int8).astype(np.float32)
    d = _read_f16(raw, 208)
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, 2, 128]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    hi = ((qh >> shifts) & 3).reshape(n, 2, 128)
    q = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    return ((d * sc)[:, :, None] * q.reshape(n, 16, 16)).reshape(n, 256)


def _pack_q6_k(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-bit codes in transposed layout, uint8 [256, n] -> (ql [n, 128], qh [n, 64]).

    Within each 128-value half h: for l < 32, ``ql[64h + l]`` holds values l (low
    nibble) and l+64 (high nibble), ``ql[64h + 32 + l]`` values l+32 and l+96;
    ``qh[32h + l]`` holds the top two bits of values l, l+32, l+64, l+96 at bit
    offsets 0, 2, 4, 6."""
    n = L.shape[-1]
    g = L.reshape(2, 4, 32, n)
    lo = g & 0x0F
    ql = np.concatenate([lo[:, 0] | (lo[:, 2] << 4), lo[:, 1] | (lo[:, 3] << 4)], axis=1)
    h = g >> 4
    qh = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return ql.reshape(128, n).T, qh.reshape(64, n).T


def _sym_codes(xt: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = clip(rint(xt / scale), -32, 31)`` (0 where scale == 0), in place."""
    np.multiply(xt, _safe_recip(scale.astype(np.float32)), out=out)
    np.rint(out, out=out)
    np.clip(out, -32, 31, out=out)
    return out


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """q6_k quantizer.

    Per 16-value sub-block a scale is searched: starting from "largest-magnitude
    value maps to -32" (and two slightly shrunk / stretched variants), codes and
    least-squares scale are alternated and the best fit kept.  The 16 scales are
    snapped to int8 multiples of an fp16 ``d`` (a few choices of ``d`` tried) and
    the codes recomputed against the decoder's exact values.
    """
    n = x.shape[0]
    xt = np.ascontiguousarray(x.T).reshape(16, 16, n)  # [sub-block, value, block]
    sx2 = _dot1(xt, xt)
    xmax = xt.max(axis=1, keepdims=True)
    xmin = xt.min(axis=1, keepdims=True)
    peak = np.where(-xmin > xmax, xmin, xmax)  # signed largest-magnitude value
    L = np.empty_like(xt)

    best = None
    for mult in _Q6K_STARTS:
        scale = peak / np.float32(-32 * mult)
        for _ in range(_Q6K_STEPS):
            _sym_codes(xt, scale, L)
            sxl = _dot1(xt, L)
            sl2 = _dot1(L, L)
            inv = _safe_recip(sl2)
            scale = np.where(sl2 > 0, sxl * inv, scale)
            err = sx2 - sxl * sxl * inv
        best = _pick(best, err, scale, sl2)
    _, scale, sl2 = best

    # super-block step: the largest-magnitude scale maps to about -128
    amax = np.abs(scale).max(axis=0, keepdims=True)
    smax = np.where((scale == amax).any(axis=0, keepdims=True), amax, -amax)
    limits = np.where(amax >= np.float32(1e-15), -smax, np.float32(0))  # ggml GROUP_MAX_EPS
    d16, sc = _snap_scales(scale, sl2, limits, _Q6K_GRID, -128, 127)
    ds = d16.astype(np.float32) * sc
    Lq = _sym_codes(xt, ds, L)
    Lq += np.float32(32)
    ql, qh = _pack_q6_k(Lq.astype(np.uint8).reshape(256, n))

    out = np.empty((n, 210), np.uint8)
    out[:, 0:128] = ql
    out[:, 128:192] = qh
    out[:, 192:208] = sc.astype(np.int8).reshape(16, n).T.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8).reshape(n, 2)
    return out


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #

_QUANTIZERS = {
    "q8_0": _quantize_q8_0,
    "q4_0": _quantize_q4_0,
    "q5_0": _quantize_q5_0,
    "q4_k": _quantize_q4_k,
    "q6_k": _quantize_q6_k,
    "turbo3": turbo.quantize_turbo3,
    "turbo4": turbo.quantize_turbo4,
    **quant_formats.QUANTIZERS,
}

# Byte offsets of the fp16 scale fields inside one block, per kind.
_F16_FIELDS = {
    "q8_0": (0,),
    "q4_0": (0,),
    "q5_0": (0,),
    "q4_k": (0, 2),
    "q6_k": (208,),
    "turbo3": (0,),
    "turbo4": (0,),
    **quant_formats.F16_FIELDS,
}

_DEQUANTIZERS = {
    "q8_0": _dequantize_q8_0,
    "q4_0": _dequantize_q4_0,
    "q5_0": _dequantize_q5_0,
    "q4_k": _dequantize_q4_k,
    "q6_k": _dequantize_q6_k,
    "turbo3": turbo.dequantize_turbo3,
    "turbo4": turbo.dequantize_turbo4,
    **quant_formats.DEQUANTIZERS,
}


def _run_chunks(work, nblocks: int, step: int) -> None:
    """Call ``work(start, stop)`` for consecutive block ranges of at most ``step``."""
    for start in range(0, nblocks, step):
        work(start, min(start + step, nblocks))


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """Quantize ``values`` (float array ``[..., K]``) to ggml block format ``kind``.

    ``K`` must be a multiple of the kind's block size.  Each row of ``K`` values
    becomes ``K // block * block_bytes`` bytes, so the result is a uint8 array of
    shape ``[..., K // block * block_bytes]`` whose rows are exactly the bytes
    ggml stores for that row.  Values are converted to float32 first (as ggml
    quantizes from f32) and must be finite.
    """
    key, block, nbytes = _layout(kind)
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError(f"cannot quantize a 0-d array to {key}; need shape [..., K]")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise TypeError(f"cannot quantize an array of dtype {values.dtype} to {key}")
    k = values.shape[-1]
    if k % block != 0:
        raise ValueError(
            f"cannot quantize to {key}: last dimension K={k} is not a multiple of "
            f"the {key} block size {block}"
        )
    out_shape = (*values.shape[:-1], k // block * nbytes)
    x = np.ascontiguousarray(values).reshape(-1, block)
    out = np.empty((x.shape[0], nbytes), np.uint8)
    fn = _QUANTIZERS[key]

    def work(start: int, stop: int) -> None:
        chunk = x[start:stop].astype(np.float32, copy=False)
        if not np.isfinite(chunk).all():
            raise ValueError(f"cannot quantize to {key}: input contains NaN or infinity")
        # Overflow / invalid warnings can only come from values too large for the
        # fp16 scales, which the check below turns into a clear error.
        with np.errstate(over="ignore", invalid="ignore"):
            res = fn(chunk)
        for off in _F16_FIELDS[key]:
            if not np.isfinite(np.ascontiguousarray(res[:, off:off + 2]).view(_F16)).all():
                raise ValueError(
                    f"cannot quantize to {key}: values too large for the format's fp16 "
                    f"block scales (largest |value| {float(np.abs(chunk).max()):.4g})"
                )
        out[start:stop] = res

    _run_chunks(work, x.shape[0], max(1, _CHUNK_VALUES // block))
    return out.reshape(out_shape)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Decode ggml block format ``kind``: uint8 ``[..., nbytes]`` -> float32 ``[..., n]``.

    ``nbytes`` must be a multiple of the kind's block size in bytes; the result
    has ``nbytes // block_bytes * block`` values per row.  Decoding follows
    ggml's ``dequantize_row_*`` arithmetic, so the floats are the ones ggml (and
    ``gguf.quants.dequantize``) produce.
    """
    key, block, nbytes = _layout(kind)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"dequantize({key!r}) expects a uint8 array, got dtype {raw.dtype}")
    if raw.ndim == 0:
        raise ValueError(f"cannot dequantize a 0-d array from {key}; need shape [..., nbytes]")
    nb = raw.shape[-1]
    if nb % nbytes != 0:
        raise ValueError(
            f"cannot dequantize {key}: last dimension of {nb} bytes is not a multiple "
            f"of the {key} block size of {nbytes} bytes"
        )
    out_shape = (*raw.shape[:-1], nb // nbytes * block)
    r = np.ascontiguousarray(raw).reshape(-1, nbytes)
    out = np.empty((r.shape[0], block), np.float32)
    fn = _DEQUANTIZERS[key]

    def work(start: int, stop: int) -> None:
        out[start:stop] = fn(r[start:stop])

    _run_chunks(work, r.shape[0], max(1, _CHUNK_VALUES // block))
    return out.reshape(out_shape)
