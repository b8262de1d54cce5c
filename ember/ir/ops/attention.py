"""Attention as one op: backends implement it with the flash-attention algorithm."""
from __future__ import annotations

import numpy as np

from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.norm import softmax_reference
from ember.ir.ops.rules import F32_OR_F16, FLOAT_ACT, expect_dtype, f32, require


def _attention_infer(ts, attrs):
    q, k, v = ts[:3]
    expect_dtype("attention", "q", q, FLOAT_ACT)
    expect_dtype("attention", "k", k, F32_OR_F16)
    expect_dtype("attention", "v", v, F32_OR_F16)
    require(q.rank == 3 and k.rank == 3 and v.rank == 3,
            "attention: q, k, v must be [tokens, heads, head_dim]")
    tq, hq, d = q.shape
    tk, hkv, dk = k.shape
    require(dk == d, f"attention: q head_dim {d} != k head_dim {dk}")
    require(v.shape[:2] == (tk, hkv), f"attention: v {list(v.shape)} must be [{tk}, {hkv}, *]")
    require(hkv > 0 and hq % hkv == 0, f"attention: q heads {hq} not a multiple of kv heads {hkv}")
    if len(ts) > 3:
        expect_dtype("attention", "mask", ts[3], F32_OR_F16)
        require(ts[3].shape == (tq, tk), f"attention: mask {list(ts[3].shape)} must be [{tq}, {tk}]")
    require(attrs["window"] >= 0, "attention: window must be >= 0")
    return f32((tq, hq, v.shape[2]))


def causal_window_mask(tq: int, tk: int, causal: bool, window: int) -> np.ndarray:
    """0 where query i (at position tk - tq + i) may see key j, -inf elsewhere."""
    qpos = np.arange(tq)[:, None] + (tk - tq)
    kpos = np.arange(tk)[None, :]
    allowed = np.ones((tq, tk), dtype=bool)
    if causal:
        allowed &= kpos <= qpos
    if window:
        allowed &= qpos - kpos < window
    return np.where(allowed, 0.0, -np.inf)


def _attention_ref(xs, attrs):
    q, k, v = (x.astype(np.float64) for x in xs[:3])
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    mask = causal_window_mask(tq, tk, attrs["causal"], attrs["window"])
    if len(xs) > 3:
        mask = mask + xs[3].astype(np.float64)
    group = hq // hkv
    kh = np.repeat(k, group, axis=1).transpose(1, 0, 2)   # [hq, tk, d]
    vh = np.repeat(v, group, axis=1).transpose(1, 0, 2)
    scores = np.matmul(q.transpose(1, 0, 2), kh.transpose(0, 2, 1))   # [hq, tq, tk]
    p = softmax_reference(scores, mask[None], attrs["scale"], attrs["softcap"]).astype(np.float64)
    return np.matmul(p, vh).transpose(1, 0, 2).astype(np.float32)


register(OpDef("attention", ("q", "k", "v"), _attention_infer, _attention_ref, optional=("mask",),
               attrs={"scale": Attr("float"), "softcap": Attr("float", 0.0),
                      "causal": Attr("bool", False), "window": Attr("int", 0)},
               doc="softmax(q k^T * scale, soft-capped, + mask) v per head; q[Tq, Hq, D], "
                   "k[Tk, Hkv, D], v[Tk, Hkv, Dv], GQA when Hkv < Hq. Query i sits at position "
                   "Tk - Tq + i: causal hides later keys, window > 0 hides keys window or more "
                   "positions back. Fully masked rows give zeros."))
