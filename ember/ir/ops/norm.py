"""Normalizations and softmax, all along the last axis."""
from __future__ import annotations

import numpy as np

from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import F32_OR_F16, FLOAT_ACT, broadcasts_to, expect_dtype, f32, require, require_finite


def _norm_infer(name):
    def infer(ts, attrs):
        expect_dtype(name, "x", ts[0], FLOAT_ACT)
        require(ts[0].rank >= 1, f"{name}: x must be at least 1-D")
        if "eps" in attrs:   # a negative or NaN eps gives NaN rows, not an error
            require(attrs["eps"] >= 0 and attrs["eps"] < float("inf"),
                    f"{name}: eps {attrs['eps']} must be finite and >= 0")
        return f32(ts[0].shape)
    return infer


def _rms_norm(xs, attrs):
    x = xs[0].astype(np.float64)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + attrs["eps"])).astype(np.float32)


def _layer_norm(xs, attrs):
    x = xs[0].astype(np.float64)
    centered = x - x.mean(axis=-1, keepdims=True)
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    return (centered / np.sqrt(var + attrs["eps"])).astype(np.float32)


def _l2_norm(xs, attrs):
    x = xs[0].astype(np.float64)
    return (x / np.maximum(np.sqrt(np.sum(x * x, axis=-1, keepdims=True)), attrs["eps"])).astype(np.float32)


register(OpDef("rms_norm", ("x",), _norm_infer("rms_norm"), _rms_norm,
               attrs={"eps": Attr("float", 1e-6)},
               doc="x / sqrt(mean(x^2) + eps) over the last axis (no weight: multiply after)."))
register(OpDef("layer_norm", ("x",), _norm_infer("layer_norm"), _layer_norm,
               attrs={"eps": Attr("float", 1e-5)},
               doc="(x - mean) / sqrt(var + eps) over the last axis (no weight or bias)."))
register(OpDef("l2_norm", ("x",), _norm_infer("l2_norm"), _l2_norm,
               attrs={"eps": Attr("float", 1e-6)},
               doc="x / max(sqrt(sum(x^2)), eps) over the last axis (ggml_l2_norm: the q and k "
                   "heads of a gated delta net)."))


def _rms_norm_mul_infer(ts, attrs):
    x, w = ts
    expect_dtype("rms_norm_mul", "x", x, FLOAT_ACT)
    expect_dtype("rms_norm_mul", "w", w, FLOAT_ACT)
    require(x.rank >= 1 and w.shape == (x.shape[-1],),
            f"rms_norm_mul: w {list(w.shape)} must be [{x.shape[-1] if x.rank else '?'}] (one weight per column)")
    return f32(x.shape)


def _rms_norm_mul(xs, attrs):
    # Rounded to f32 after the normalization, as the unfused pair is, so fusing changes no bit.
    normed = _rms_norm(xs[:1], attrs)
    return (normed * xs[1].astype(np.float32)).astype(np.float32)


register(OpDef("rms_norm_mul", ("x", "w"), _rms_norm_mul_infer, _rms_norm_mul,
               attrs={"eps": Attr("float", 1e-6)},
               doc="rms_norm(x, eps) * w, with w one weight per column: the fused form of the "
                   "pair every pre-norm transformer uses (made by the fuse-elementwise pass)."))


def _softmax_infer(ts, attrs):
    x = ts[0]
    expect_dtype("softmax", "x", x, FLOAT_ACT)
    require_finite("softmax", attrs, "scale", "softcap")
    if len(ts) > 1:
        expect_dtype("softmax", "mask", ts[1], F32_OR_F16)
        require(broadcasts_to(ts[1].shape, x.shape),
                f"softmax: mask {list(ts[1].shape)} does not broadcast to x {list(x.shape)}")
    return f32(x.shape)


def softmax_reference(x, mask, scale, softcap):
    z = x.astype(np.float64) * scale
    if softcap:
        z = softcap * np.tanh(z / softcap)
    if mask is not None:
        z = z + mask.astype(np.float64)
    peak = np.max(z, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    e = np.exp(z - peak)
    total = e.sum(axis=-1, keepdims=True)
    # A row masked out entirely gives zeros, not NaN (the flash-attention convention).
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0).astype(np.float32)


register(OpDef("softmax", ("x",), _softmax_infer,
               lambda xs, a: softmax_reference(xs[0], xs[1] if len(xs) > 1 else None,
                                               a["scale"], a["softcap"]),
               optional=("mask",),
               attrs={"scale": Attr("float", 1.0), "softcap": Attr("float", 0.0)},
               doc="softmax over the last axis of z = x*scale, soft-capped as "
                   "softcap*tanh(z/softcap) when softcap > 0, plus mask (broadcast)."))
