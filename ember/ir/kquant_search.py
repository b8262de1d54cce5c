"""ggml's own k-quant quantizers for q5_k and q6_k, vectorised over blocks in NumPy: the
iterative scale searches of ggml-quants.c that llama-quantize runs without an importance
matrix (quantize_row_q5_K_ref, quantize_row_q6_K_ref), so a model requantized here holds the
blocks llama.cpp would write: the same bytes (tests/ir/test_kquant_search.py compares them with
ggml_quantize_chunk), since every sum is accumulated in C's order with C's products.

- q5_k (256 values: 8 sub-blocks of 32, 5-bit codes, 6-bit scales and mins): per sub-block,
  make_qkx2_quants fits x ~= scale * L - min (L in 0..31, min >= 0) weighting each value by
  rms(sub-block) + |x|: a min/max start, then 16 candidate steps (nmax - 0.5 + 0.1 i) / range,
  each refitted by weighted least squares of scale and min, keeping the least weighted error
  (the range is taken from the best fit so far, so the candidates depend on the order).
  The sub-block scales and mins are then rounded to 6 bits of fp16 super-block steps (the
  largest / 63) and the codes recomputed against the stored values.
- q6_k (256 values: 16 sub-blocks of 16, 6-bit codes, int8 scales): per sub-block,
  make_qx_quants starts from "the largest-magnitude value maps to -32", then tries 18 nearby
  steps -(32 +- 0.1 i) / max, each with its x^2-weighted least-squares scale, keeping the best;
  the scales are rounded to int8 multiples of an fp16 step (the largest-magnitude scale maps
  to -128) and the codes recomputed.

ember.ir.quant's ``q6_k`` quantizer (its own search) stays the default for ``quantize``; this
module's are what ``quantize_ggml`` and the requantizer (ember.tools.requant) use. Imports
NumPy and ember.ir.quant_formats (the shared block packing) only.
"""
from __future__ import annotations

import numpy as np

from ember.ir.quant_formats import _f16_bytes, _k4_pack, _pack_nibbles

_F16 = np.dtype("<f2")
GROUP_MAX_EPS = np.float32(1e-15)        # ggml: a sub-block below this is all zeros
_CHUNK_BLOCKS = 1 << 14                  # blocks per vectorised pass (bounds temporaries)


def _div(a, b) -> np.ndarray:
    """a / b where b != 0, else 0 (float32; a division, not a reciprocal product, as in C)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    out = np.zeros(a.shape, np.float32)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _sum(a: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as ggml's loops add (NumPy's pairwise
    sum rounds differently and can flip a near-tie between two candidate scales)."""
    return np.cumsum(a, axis=1, dtype=np.float32)[:, -1]


def _recip(x: np.ndarray) -> np.ndarray:
    return _div(np.float32(1), x)


def _to_f16_f32(x: np.ndarray) -> np.ndarray:
    """The float32 value of x stored as fp16 (ggml's GGML_FP32_TO_FP16 then back)."""
    return x.astype(_F16).astype(np.float32)


# ---- make_qkx2_quants (q5_k) -------------------------------------------------------------------
def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants (squared error) on every row of x [n, m] with weights w [n, m]:
    returns (scale [n], the_min [n] >= 0, codes L [n, m] in 0..nmax) with x ~= scale * L - the_min."""
    f32 = np.float32
    lo = np.minimum(x.min(axis=1), f32(0))
    hi = x.max(axis=1)
    sum_w = _sum(w)
    sum_x = _sum(w * x)
    flat = hi == lo
    lo = np.where(flat, hi - f32(1), lo)         # any range: these rows are zeroed at the end

    def codes(iscale, lo):
        return np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)

    iscale = _div(f32(nmax), hi - lo)
    scale = _recip(iscale)
    L = codes(iscale, lo)
    best = _sum(w * np.square(scale[:, None] * L + lo[:, None] - x))
    for step in range(nstep + 1):
        # ggml moves min (and with it the range) to each better fit as the search goes on
        La = codes(_div(f32(rmin) + f32(rdelta) * f32(step) + f32(nmax), hi - lo), lo)
        wl = w * La
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * La), _sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        D = np.where(ok, D, f32(0))
        this_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        clamp = this_min > 0
        this_min = np.where(clamp, f32(0), this_min)
        this_scale = np.where(clamp, _div(sum_xl, sum_l2), this_scale)
        err = _sum(w * np.square(this_scale[:, None] * La + this_min[:, None] - x))
        better = ok & (err < best)
        L = np.where(better[:, None], La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat[:, None], f32(0), L)
    return scale.astype(f32), np.where(flat, -np.minimum(hi, f32(0)), -lo).astype(f32), L.astype(np.uint8)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref on float32 blocks x [n, 256] -> uint8 [n, 176]."""
    f32 = np.float32
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    av = np.sqrt(_sum(xs * xs) / f32(32))
    weights = av[:, None] + np.abs(xs)
    scales, mins, L = make_qkx2_quants(xs, weights, 31, -0.5, 0.1, 15)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))     # ggml's running max starts at 0
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = _div(f32(63), max_scale)
    inv_min = _div(f32(63), max_min)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(_F16)
    dmin = (max_min / f32(63)).astype(_F16)
    ds = d.astype(f32)[:, None] * ls.astype(f32)               # [n, 8]
    dm = dmin.astype(f32)[:, None] * lm.astype(f32)
    xb = x.reshape(n, 8, 32)
    q = np.clip(np.rint(_div(xb + dm[:, :, None], ds[:, :, None])), 0, 31).astype(np.uint8)
    # ggml keeps the search's codes where the stored scale is 0
    q = np.where((ds == 0)[:, :, None], L.reshape(n, 8, 32), q)
    qh = np.packbits(q >> 4, axis=1, bitorder="little").reshape(n, 32)
    qs = _pack_nibbles((q & 0x0F).reshape(n, 256), 4)
    return np.concatenate([_f16_bytes(d.astype(f32)), _f16_bytes(dmin.astype(f32)), _k4_pack(ls, lm), qh, qs],
                          axis=1)


# ---- make_qx_quants (q6_k) ---------------------------------------------------------------------
def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 (weights x^2) on every row of x [n, m]: returns
    (scale [n], codes L [n, m] in 0..2 nmax - 1) with x ~= scale * (L - nmax)."""
    f32 = np.float32
    idx = np.abs(x).argmax(axis=1)[:, None]                 # first of equal magnitudes, as ggml
    peak = np.take_along_axis(x, idx, axis=1)[:, 0]
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)
    w = x * x

    def fit(iscale):
        l = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return l, _sum(w * x * l), _sum(w * l * l)         # ggml's w*x[i]*l, w*l*l

    l, sumlx, suml2 = fit(f32(-nmax) / peak)
    scale = _div(sumlx, suml2)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        la, sx, s2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (s2 > 0) & (sx * sx > best * s2)
        l = np.where(better[:, None], la, l)
        scale = np.where(better, _div(sx, s2), scale)
        best = np.where(better, scale * sx, best)
    scale = np.where(zero, f32(0), scale)
    l = np.where(zero[:, None], f32(0), l)
    return scale.astype(f32), (l + nmax).astype(np.uint8)


def _pack_q6_k(L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes uint8 [n, 256] (0..63) -> (ql [n, 128], qh [n, 64]) in ggml's q6_K order: per half
    h of 128 values, ql[64h + l] holds values l, l + 64 (low, high nibble), ql[64h + 32 + l]
    values l + 32, l + 96, and qh[32h + l] the top 2 bits of l, l + 32, l + 64, l + 96."""
    n = L.shape[0]
    g = L.reshape(n, 2, 4, 32)
    lo = g & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    h = g >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    return ql.reshape(n, 128), qh.reshape(n, 64)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref on float32 blocks x [n, 256] -> uint8 [n, 210]."""
    f32 = np.float32
    n = x.shape[0]
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    idx = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, idx, axis=1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.where(empty, f32(0), _div(f32(-128), max_scale))
    d = _recip(iscale).astype(_F16)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    dl = d.astype(f32)[:, None] * sc.astype(f32)              # [n, 16]
    q = np.clip(np.rint(_div(x.reshape(n, 16, 16), dl[:, :, None])), -32, 31) + 32
    q = np.where((dl == 0)[:, :, None], L, q.astype(np.uint8))  # ggml keeps the search's codes
    q = np.where(empty[:, None, None], np.uint8(0), q)         # and zeroes an empty block
    sc = np.where(empty[:, None], np.int8(0), sc)
    ql, qh = _pack_q6_k(q.reshape(n, 256))
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d.astype(f32))], axis=1)


QUANTIZERS = {"q5_k": (quantize_q5_k, 176), "q6_k": (quantize_q6_k, 210)}


def quantize_ggml(values: np.ndarray, kind: str) -> np.ndarray:
    """values [..., K] (K a multiple of 256) -> uint8 [..., K / 256 * block bytes] with ggml's
    search for kind ("q5_k" or "q6_k"), in chunks of blocks."""
    if kind not in QUANTIZERS:
        raise ValueError(f"quantize_ggml: no ggml search quantizer for {kind!r} "
                         f"(have: {', '.join(QUANTIZERS)})")
    fn, nbytes = QUANTIZERS[kind]
    values = np.asarray(values, dtype=np.float32)
    k = values.shape[-1]
    if k % 256:
        raise ValueError(f"quantize_ggml: K = {k} is not a multiple of {kind}'s 256-value blocks")
    if not np.isfinite(values).all():
        raise ValueError(f"quantize_ggml: cannot quantize NaN or infinity to {kind}")
    x = np.ascontiguousarray(values).reshape(-1, 256)
    out = np.empty((x.shape[0], nbytes), np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, x.shape[0], _CHUNK_BLOCKS):
            out[start:start + _CHUNK_BLOCKS] = fn(x[start:start + _CHUNK_BLOCKS])
    return out.reshape(*values.shape[:-1], k // 256 * nbytes)
