"""Rotary position embedding, ggml's normal (adjacent pairs) and neox (split halves) modes."""
from __future__ import annotations

import math

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import FLOAT_ACT, expect_dtype, f32, require


def _rope_infer(ts, attrs):
    x, pos = ts[0], ts[1]
    expect_dtype("rope", "x", x, FLOAT_ACT)
    expect_dtype("rope", "pos", pos, (dtypes.i32,))
    require(x.rank == 3, f"rope: x must be [tokens, heads, head_dim], got {list(x.shape)}")
    require(pos.shape == (x.shape[0],), f"rope: pos {list(pos.shape)} must be [{x.shape[0]}] (one per token)")
    n_dims = attrs["n_dims"] or x.shape[2]
    require(n_dims % 2 == 0 and 0 < n_dims <= x.shape[2],
            f"rope: n_dims {n_dims} must be even and in (0, head_dim {x.shape[2]}]")
    # freq_base^(-2i/n) and pos * freq_scale must be finite numbers: a base of 0 once rendered
    # `inf` into C and failed in the compiler
    for name in ("freq_base", "freq_scale"):
        require(math.isfinite(attrs[name]) and attrs[name] > 0,
                f"rope: {name} {attrs[name]} must be finite and positive")
    if len(ts) > 2:
        expect_dtype("rope", "freq_factors", ts[2], FLOAT_ACT)
        require(ts[2].shape == (n_dims // 2,),
                f"rope: freq_factors {list(ts[2].shape)} must be [{n_dims // 2}]")
    return f32(x.shape)


def rope_angles(pos, n_dims, freq_base, freq_scale, freq_factors=None):
    """theta[t, i] for pair i of token t, in float64."""
    inv_freq = freq_base ** (-np.arange(0, n_dims, 2, dtype=np.float64) / n_dims)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    return pos.astype(np.float64)[:, None] * freq_scale * inv_freq[None, :]


def _rope_ref(xs, attrs):
    x = xs[0].astype(np.float64)
    n_dims = attrs["n_dims"] or x.shape[2]
    theta = rope_angles(xs[1], n_dims, attrs["freq_base"], attrs["freq_scale"],
                        xs[2] if len(xs) > 2 else None)[:, None, :]   # [T, 1, n_dims/2]
    cos, sin = np.cos(theta), np.sin(theta)
    out = x.copy()
    if attrs["mode"] == "normal":
        a, b = x[..., 0:n_dims:2], x[..., 1:n_dims:2]
        out[..., 0:n_dims:2] = a * cos - b * sin
        out[..., 1:n_dims:2] = a * sin + b * cos
    else:
        half = n_dims // 2
        a, b = x[..., :half], x[..., half:n_dims]
        out[..., :half] = a * cos - b * sin
        out[..., half:n_dims] = a * sin + b * cos
    return out.astype(np.float32)


register(OpDef("rope", ("x", "pos"), _rope_infer, _rope_ref, optional=("freq_factors",),
               attrs={"n_dims": Attr("int", 0), "mode": Attr("str", "normal", ("normal", "neox")),
                      "freq_base": Attr("float", 10000.0), "freq_scale": Attr("float", 1.0)},
               doc="Rotate pairs of x[tokens, heads, head_dim] by pos * freq_scale * "
                   "freq_base^(-2i/n_dims) / freq_factors[i]; n_dims 0 means head_dim; dims past "
                   "n_dims pass through. mode normal pairs (2i, 2i+1), neox pairs (i, i + n_dims/2)."))
