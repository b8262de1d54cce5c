"""Attention as one op: backends implement it with the flash-attention algorithm. K and V may be
a quantized KV cache (q8_0, q4_0, turbo3, turbo4), read dequantized.

Against a q8_0 or q4_0 K the query is itself rounded through q8_0 (per 32 values: ggml's q8_0
quantizer) before its dot with the keys. That is what ggml's CPU flash attention does (ggml-cpu
ops.cpp, ggml_compute_forward_flash_attn_ext_f16_one_chunk: Q is converted to the K type's
vec_dot_type, q8_0 for both, and the dots are block integer dots), and llama.cpp's perplexity
with these caches follows it: kept in f32, the query gave figures 0.7-1% from llama.cpp's. It
also lets a backend take the dots as integer dots of the two q8_0 rows."""
from __future__ import annotations

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.norm import softmax_reference
from ember.ir.ops.rules import F32_OR_F16, FLOAT_ACT, expect_dtype, f32, require, require_finite


def _attention_infer(ts, attrs):
    q, k, v = ts[:3]
    expect_dtype("attention", "q", q, FLOAT_ACT)
    require_finite("attention", attrs, "scale", "softcap")
    expect_dtype("attention", "k", k, KV_TYPES)
    expect_dtype("attention", "v", v, KV_TYPES)
    for what, t in (("k", k), ("v", v)):
        if t.dtype.is_quantized and t.rank == 3:
            require_whole_blocks("attention", f"{what} head size", t.dtype, t.shape[-1])
            require(t.strides[-1] == t.dtype.block_bytes,
                    f"attention: {what} ({t.dtype}) must keep each head's blocks contiguous")
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


KV_TYPES = F32_OR_F16 + dtypes.KV_QUANTIZED


def require_whole_blocks(op: str, what: str, dt: dtypes.DType, n: int):
    """A quantized cache holds each head as whole blocks: n values must fill them."""
    require(n % dt.block_size == 0,
            f"{op}: {what} {n} is not a multiple of the {dt} block size {dt.block_size}"
            + (" (a turbo cache row is one 128-value block per head)" if dt.name.startswith("turbo") else ""))


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


Q_DOT_ROUNDED = (dtypes.q8_0, dtypes.q4_0)   # K types whose dots take the query rounded to q8_0


def q8_0_round(x: np.ndarray) -> np.ndarray:
    """x (float, last axis a multiple of 32) as it reads back from ggml's q8_0 blocks."""
    from ember.ir.quant import dequantize, quantize
    return dequantize(quantize(np.asarray(x, np.float32), "q8_0"), "q8_0")


def _widen(x: np.ndarray, t) -> np.ndarray:
    if t.dtype.is_quantized or t.dtype is dtypes.bf16:
        return dtypes.to_float32(np.ascontiguousarray(x), t.dtype)
    return x


def _attention_ref(xs, attrs, its, ot):
    xs = [_widen(x, t) for x, t in zip(xs, its)]
    if its[1].dtype in Q_DOT_ROUNDED:
        xs[0] = q8_0_round(xs[0])
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


register(OpDef("attention", ("q", "k", "v"), _attention_infer, _attention_ref, optional=("mask",), raw=True,
               attrs={"scale": Attr("float"), "softcap": Attr("float", 0.0),
                      "causal": Attr("bool", False), "window": Attr("int", 0)},
               doc="softmax(q k^T * scale, soft-capped, + mask) v per head; q[Tq, Hq, D], "
                   "k[Tk, Hkv, D], v[Tk, Hkv, Dv], GQA when Hkv < Hq. Query i sits at position "
                   "Tk - Tq + i: causal hides later keys, window > 0 hides keys window or more "
                   "positions back. Fully masked rows give zeros. k and v may be f32, f16 or a "
                   "quantized cache (q8_0, q4_0, turbo3, turbo4; head size a multiple of the block "
                   "size), read dequantized; against a q8_0 or q4_0 k, q is rounded through q8_0 "
                   "first, as ggml's CPU flash attention does."))
