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

The q8_0 / q4_0 / q5_0 quantizers reproduce ggml's reference quantizers
(``quantize_row_*_ref``) bit for bit.  The q4_k / q6_k quantizers are simpler
than ggml's (a min/max or abs-max start followed by a few least-squares
refinement steps instead of ggml's weighted grid search), so their bytes differ
from llama.cpp's, but they produce valid blocks of comparable accuracy.

All work is vectorised over blocks; large inputs are processed in chunks of
blocks to bound temporary memory.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_LAYOUTS", "quantize", "dequantize"]

BLOCK_LAYOUTS: dict[str, tuple[int, int]] = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q5_0": (32, 22),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
}

# Values processed per chunk (a multiple of every block size).  Keeps each
# float32 temporary at ~4 MiB, which is both cache friendly and memory bounded.
_CHUNK_VALUES = 1 << 20

_F16 = np.dtype("<f2")
_U32 = np.dtype("<u4")


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


def _fit_affine(x: np.ndarray, L: np.ndarray, scale: np.ndarray, off: np.ndarray):
    """Least-squares ``x ~= scale * L + off`` per sub-block (last axis) with
    ``off <= 0`` and ``scale > 0``; keeps the previous fit where degenerate."""
    k = np.float32(x.shape[-1])
    sl = L.sum(axis=-1, keepdims=True)
    sl2 = (L * L).sum(axis=-1, keepdims=True)
    sx = x.sum(axis=-1, keepdims=True)
    sxl = (x * L).sum(axis=-1, keepdims=True)
    det = k * sl2 - sl * sl
    ok = det > 0
    safe = np.where(ok, det, np.float32(1))
    new_scale = (k * sxl - sl * sx) / safe
    new_off = (sl2 * sx - sl * sxl) / safe
    # constrained fit (off = 0) where the free fit wants a positive offset
    pos = new_off > 0
    new_scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, np.float32(1)), new_scale)
    new_off = np.where(pos, np.float32(0), new_off)
    good = ok & (new_scale > 0)
    return np.where(good, new_scale, scale), np.where(good, new_off, off)


def _quantize_q4_k(x: np.ndarray, refine_steps: int = 2) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    f15 = np.float32(15)

    # 1. per sub-block affine fit: start from min/max, refine by least squares
    off = np.minimum(xs.min(axis=-1, keepdims=True), np.float32(0))  # <= 0
    scale = (xs.max(axis=-1, keepdims=True) - off) / f15
    for _ in range(refine_steps):
        L = np.clip(np.rint((xs - off) * _safe_recip(scale)), 0, f15)
        scale, off = _fit_affine(xs, L, scale, off)

    # 2. 6-bit scales / mins relative to the super-block maxima (as ggml does)
    scale = scale[:, :, 0]
    mins = -off[:, :, 0]  # >= 0
    max_scale = scale.max(axis=1, keepdims=True)
    max_min = mins.max(axis=1, keepdims=True)
    inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0)
    inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0)
    ls = np.clip(np.rint(inv_scale * scale), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(inv_min * mins), 0, 63).astype(np.uint8)
    d16 = (max_scale / np.float32(63)).astype(_F16)
    dmin16 = (max_min / np.float32(63)).astype(_F16)

    # 3. final codes against the values the decoder will actually use
    ds = (d16.astype(np.float32) * ls.astype(np.float32))[:, :, None]
    dm = (dmin16.astype(np.float32) * lm.astype(np.float32))[:, :, None]
    L = np.clip(np.rint((xs + dm) * _safe_recip(ds)), 0, f15).astype(np.uint8)

    out = np.empty((n, 144), np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(n, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(n, 2)
    out[:, 4:16] = _pack_scale_min_k4(ls, lm)
    L = L.reshape(n, 4, 2, 32)
    out[:, 16:] = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
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
    """6-bit codes uint8 [n, 256] -> (ql [n, 128], qh [n, 64]).

    Within each 128-value half h: for l < 32, ``ql[64h + l]`` holds values l (low
    nibble) and l+64 (high nibble), ``ql[64h + 32 + l]`` values l+32 and l+96;
    ``qh[32h + l]`` holds the top two bits of values l, l+32, l+64, l+96 at bit
    offsets 0, 2, 4, 6."""
    n = L.shape[0]
    g = L.reshape(n, 2, 4, 32)
    lo = g & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    h = g >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    return ql.reshape(n, 128), qh.reshape(n, 64)


def _quantize_q6_k(x: np.ndarray, refine_steps: int = 2) -> np.ndarray:
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    lo_q, hi_q = np.float32(-32), np.float32(31)

    # 1. per sub-block scale: signed abs-max maps to -32, then least squares
    scale = _signed_absmax(xs) / np.float32(-32)
    for _ in range(refine_steps):
        L = np.clip(np.rint(xs * _safe_recip(scale)), lo_q, hi_q)
        sxl = (xs * L).sum(axis=-1, keepdims=True)
        sl2 = (L * L).sum(axis=-1, keepdims=True)
        new = sxl / np.where(sl2 > 0, sl2, np.float32(1))
        scale = np.where(sl2 > 0, new, scale)

    # 2. int8 scales relative to the super-block's largest-magnitude scale
    scale = scale[:, :, 0]
    max_scale = _signed_absmax(scale)  # [n, 1]
    nz = np.abs(max_scale) >= np.float32(1e-15)  # ggml GROUP_MAX_EPS
    iscale = np.where(nz, np.float32(-128) / np.where(nz, max_scale, 1), 0).astype(np.float32)
    d16 = np.where(nz, np.float32(1) / np.where(nz, iscale, 1), 0).astype(_F16)
    sc = np.clip(np.rint(iscale * scale), -128, 127).astype(np.int8)

    # 3. final codes against the decoder's scales
    ds = (d16.astype(np.float32) * sc.astype(np.float32))[:, :, None]
    L = np.clip(np.rint(xs * _safe_recip(ds)), lo_q, hi_q) + np.float32(32)
    ql, qh = _pack_q6_k(L.astype(np.uint8).reshape(n, 256))

    out = np.empty((n, 210), np.uint8)
    out[:, 0:128] = ql
    out[:, 128:192] = qh
    out[:, 192:208] = sc.view(np.uint8)
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
}

_DEQUANTIZERS = {
    "q8_0": _dequantize_q8_0,
    "q4_0": _dequantize_q4_0,
    "q5_0": _dequantize_q5_0,
    "q4_k": _dequantize_q4_k,
    "q6_k": _dequantize_q6_k,
}


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """Quantize ``values`` (float array ``[..., K]``) to ggml block format ``kind``.

    ``K`` must be a multiple of the kind's block size.  Each row of ``K`` values
    becomes ``K // block * block_bytes`` bytes, so the result is a uint8 array of
    shape ``[..., K // block * block_bytes]`` whose rows are exactly the bytes
    ggml stores for that row.  Values must be finite.
    """
    key, block, nbytes = _layout(kind)
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError(f"cannot quantize a 0-d array to {key}; need shape [..., K]")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
            or values.dtype == np.bool_):
        raise TypeError(f"cannot quantize array of dtype {values.dtype} to {key}")
    k = values.shape[-1]
    if k % block != 0:
        raise ValueError(
            f"cannot quantize to {key}: last dimension K={k} is not a multiple of "
            f"the {key} block size {block}"
        )
    lead = values.shape[:-1]
    out_shape = (*lead, k // block * nbytes)
    x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, block)
    nblocks = x.shape[0]
    out = np.empty((nblocks, nbytes), np.uint8)
    fn = _QUANTIZERS[key]
    step = max(1, _CHUNK_VALUES // block)
    for start in range(0, nblocks, step):
        chunk = x[start:start + step]
        if not np.isfinite(chunk).all():
            raise ValueError(f"cannot quantize to {key}: input contains NaN or infinity")
        out[start:start + step] = fn(chunk)
    return out.reshape(out_shape)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Decode ggml block format ``kind``: uint8 ``[..., nbytes]`` -> float32 ``[..., n]``.

    ``nbytes`` must be a multiple of the kind's block size in bytes; the result
    has ``nbytes // block_bytes * block`` values per row.
    """
    key, block, nbytes = _layout(kind)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"dequantize({key}) expects a uint8 array, got dtype {raw.dtype}")
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
    nblocks = r.shape[0]
    out = np.empty((nblocks, block), np.float32)
    fn = _DEQUANTIZERS[key]
    step = max(1, _CHUNK_VALUES // block)
    for start in range(0, nblocks, step):
        out[start:start + step] = fn(r[start:start + step])
    return out.reshape(out_shape)
