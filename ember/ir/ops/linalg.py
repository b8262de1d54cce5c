"""Matrix multiply and row reductions."""
from __future__ import annotations

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.ops import OpDef, register
from ember.ir.ops.rules import F32_OR_F16, FLOAT_ACT, expect_dtype, f32, require
from ember.ir.types import TensorType


def _mul_mat_infer(ts, attrs):
    x, w = ts
    expect_dtype("mul_mat", "x", x, F32_OR_F16)
    expect_dtype("mul_mat", "w", w, dtypes.WEIGHT_TYPES)
    require(x.rank >= 1 and w.rank >= 2, f"mul_mat: w must be at least 2-D, got {list(w.shape)}")
    require(x.shape[-1] == w.shape[-1],
            f"mul_mat: inner sizes differ: x {list(x.shape)} vs w {list(w.shape)} (both end in K)")
    xb, wb = x.shape[:-2], w.shape[:-2]
    require(len(xb) == len(wb) or not wb,
            f"mul_mat: batch ranks differ: x {list(x.shape)} vs w {list(w.shape)}")
    for xs, ws in zip(xb, wb):
        require(ws > 0 and xs % ws == 0,
                f"mul_mat: batch size {xs} of x is not a multiple of w's {ws}")
    if w.dtype.is_quantized:
        require(w.strides[-1] == w.dtype.block_bytes,
                "mul_mat: a quantized weight must keep its blocks contiguous")
    return f32(x.shape[:-1] + (w.shape[-2],))


def _mul_mat_ref(xs, attrs, wtype=None):
    x, w = xs
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    if w.ndim > 2 and x.ndim == w.ndim:
        # ggml broadcasting: batch index i of x uses batch index i // (x_size / w_size) of w.
        for axis in range(w.ndim - 2):
            rep = x.shape[axis] // w.shape[axis]
            if rep > 1:
                w = np.repeat(w, rep, axis=axis)
    return np.matmul(x, np.swapaxes(w, -1, -2)).astype(np.float32)


register(OpDef("mul_mat", ("x", "w"), _mul_mat_infer, _mul_mat_ref, layouts={"w": ("adreno_soa",)},
               doc="x[..., T, K] times w[..., N, K] transposed -> f32[..., T, N]. w may be any "
                   "weight dtype (quantized weights are dequantized by the reference)."))


def _rows_rule(name, keep):
    def infer(ts, attrs):
        expect_dtype(name, "x", ts[0], FLOAT_ACT)
        require(ts[0].rank >= 1, f"{name}: x must be at least 1-D")
        shape = ts[0].shape[:-1]
        return f32(shape + (1,)) if keep else TensorType(dtypes.i32, shape)
    return infer


register(OpDef("sum_rows", ("x",), _rows_rule("sum_rows", True),
               lambda xs, a: xs[0].astype(np.float64).sum(axis=-1, keepdims=True).astype(np.float32),
               doc="Sum over the last axis, kept as size 1."))
register(OpDef("argmax", ("x",), _rows_rule("argmax", False),
               lambda xs, a: np.argmax(xs[0], axis=-1).astype(np.int32),
               doc="Index of the largest value along the last axis (first one on ties) -> i32."))
