"""A mixture-of-experts FFN built with ember's IR (llama.cpp's build_moe_ffn, as ember composes it:
see ember/ir/ops/moe.py) and the same FFN in plain NumPy, for tests of the MoE ops."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ember.ir import GraphBuilder, dtypes


@dataclass(frozen=True)
class MoeShape:
    T: int = 9          # tokens
    D: int = 64         # model width
    F: int = 32         # expert FFN width
    E: int = 7          # experts (not a power of two)
    k: int = 3          # experts used per token
    gating: str = "softmax"     # softmax | sigmoid
    renorm: bool = True
    shared: bool = True         # a shared expert scaled by a sigmoid gate (qwen3next)


def moe_weights(shape: MoeShape, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = shape

    def w(*dims):
        return (rng.standard_normal(dims) / np.sqrt(dims[-1])).astype(np.float32)
    return dict(router=w(s.E, s.D), gate=w(s.E, s.F, s.D), up=w(s.E, s.F, s.D), down=w(s.E, s.D, s.F),
                sh_gate=w(s.F, s.D), sh_up=w(s.F, s.D), sh_down=w(s.D, s.F), sh_scale=w(1, s.D))


QUANTIZED_WEIGHTS = ("gate", "up", "down", "sh_gate", "sh_up", "sh_down")   # stored as wtype


def as_stored(weights: dict, wtype: str) -> dict[str, np.ndarray]:
    """The weights as the graph holds them: those in QUANTIZED_WEIGHTS rounded through wtype."""
    dt = dtypes.dtype(wtype)
    return {k: dtypes.to_float32(dtypes.from_float32(v, dt), dt).reshape(v.shape) if k in QUANTIZED_WEIGHTS
            else v for k, v in weights.items()}


def build_moe_ffn(shape: MoeShape, weights: dict, wtype: str = "f32", T: int | None = None):
    """The graph x [T, D] -> y [T, D] of one MoE FFN."""
    s, T = shape, T or shape.T
    b = GraphBuilder("moe_ffn")
    x = b.input("x", "f32", (T, s.D))
    logits = b.mul_mat(x, b.weight("router", weights["router"]))              # [T, E]
    probs = b.softmax(logits) if s.gating == "softmax" else b.sigmoid(logits)
    ids = b.top_k(probs, k=s.k)                                                   # [T, k] i32
    wts = b.take_along(probs, ids)                                                # [T, k]
    if s.renorm:
        wts = b.div(wts, b.sum_rows(wts))
    gate = b.mul_mat_id(x, b.weight("gate", weights["gate"], wtype), ids)        # [T, k, F]
    up = b.mul_mat_id(x, b.weight("up", weights["up"], wtype), ids)
    down = b.mul_mat_id(b.swiglu(gate, up), b.weight("down", weights["down"], wtype), ids)   # [T, k, D]
    weighted = b.mul(down, b.reshape(wts, T, s.k, 1))
    y = b.reshape(b.sum_rows(b.permute(weighted, 0, 2, 1)), T, s.D)            # sum over the k experts
    if s.shared:
        h = b.swiglu(b.mul_mat(x, b.weight("sh_gate", weights["sh_gate"], wtype)),
                     b.mul_mat(x, b.weight("sh_up", weights["sh_up"], wtype)))
        sh = b.mul_mat(h, b.weight("sh_down", weights["sh_down"], wtype))
        y = b.add(y, b.mul(sh, b.sigmoid(b.mul_mat(x, b.weight("sh_scale", weights["sh_scale"])))))
    return b.build(y)


def numpy_moe_ffn(shape: MoeShape, weights: dict, x: np.ndarray) -> np.ndarray:
    """The same FFN, one token and one expert at a time, in float64."""
    s = shape
    x = x.astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in weights.items()}

    def silu(a):
        return a / (1.0 + np.exp(-a))
    y = np.zeros((x.shape[0], s.D))
    for t, xt in enumerate(x):
        logits = w["router"] @ xt
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() \
            if s.gating == "softmax" else 1.0 / (1.0 + np.exp(-logits))
        chosen = sorted(range(s.E), key=lambda e: (-probs[e], e))[:s.k]
        gates = probs[chosen] / (probs[chosen].sum() if s.renorm else 1.0)
        for e, g in zip(chosen, gates):
            y[t] += g * (w["down"][e] @ (silu(w["gate"][e] @ xt) * (w["up"][e] @ xt)))
        if s.shared:
            sh = w["sh_down"] @ (silu(w["sh_gate"] @ xt) * (w["sh_up"] @ xt))
            y[t] += sh / (1.0 + np.exp(-(w["sh_scale"] @ xt)))
    return y.astype(np.float32)
