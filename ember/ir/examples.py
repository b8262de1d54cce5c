"""One small, typical instance of every op: for `ember ops` (asking each backend whether it
supports the op) and for smoke tests that must cover the whole op table."""
from __future__ import annotations

from ember.ir.builder import const_node, input_node, make_node
from ember.ir.node import Node


def _f32(name, *shape):
    return input_node(name, "f32", shape)


def example_node(op: str) -> Node:
    x = _f32("x", 4, 8)
    idx = input_node("idx", "i32", (4,))
    if op in ("add", "sub", "mul", "div"):
        return make_node(op, (x, _f32("b", 8)))
    if op == "ssm_conv":
        return make_node(op, (_f32("sx", 3 + 4, 8), _f32("w", 8, 4)))
    if op == "ssm_scan":
        # 2 heads of 4, state 16, one group
        return make_node(op, (_f32("s", 2, 4, 16), _f32("x", 4, 2, 4), _f32("dt", 4, 2), _f32("A", 2),
                              _f32("B", 4, 1, 16), _f32("C", 4, 1, 16)))
    if op == "gated_delta_net":
        # 4 v heads over 2 q/k heads, S_k 8, S_v 4, 3 tokens
        return make_node(op, (_f32("q", 3, 2, 8), _f32("k", 3, 2, 8), _f32("v", 3, 4, 4), _f32("g", 3, 4),
                              _f32("beta", 3, 4), _f32("state", 4, 4, 8)), {"scale": 8 ** -0.5})
    if op == "rms_norm_mul":
        return make_node(op, (x, _f32("w", 8)))
    if op in ("swiglu", "geglu"):
        return make_node(op, (x, _f32("u", 4, 8)))
    if op == "scale":
        return make_node(op, (x,), {"scale": 0.5})
    if op == "clamp":
        return make_node(op, (x,), {"min": -1.0, "max": 1.0})
    if op == "mul_mat":
        return make_node(op, (_f32("x", 4, 32), const_node("w", "q8_0", (16, 32))))
    if op == "rope":
        return make_node(op, (_f32("x", 4, 2, 8), idx))
    if op == "attention":
        q = _f32("q", 4, 4, 8)
        kv = _f32("k", 6, 2, 8)
        return make_node(op, (q, kv, _f32("v", 6, 2, 8)), {"scale": 0.35, "causal": True})
    if op == "get_rows":
        return make_node(op, (const_node("table", "q8_0", (10, 32)), idx))
    if op == "mul_mat_id":
        # 3 experts of [16, 32], 2 chosen per token
        return make_node(op, (_f32("x", 4, 32), const_node("w", "q8_0", (3, 16, 32)),
                              input_node("ids", "i32", (4, 2))))
    if op == "top_k":
        return make_node(op, (x,), {"k": 2})
    if op == "take_along":
        return make_node(op, (x, input_node("ids", "i32", (4, 2))))
    if op == "set_rows":
        return make_node(op, (input_node("dst", "f16", (10, 8)), idx, x))
    if op == "concat":
        return make_node(op, (x, x), {"axis": 0})
    if op == "view":
        return make_node(op, (x,), {"shape": (4, 4), "strides": (32, 4), "offset": 16})
    if op == "reshape":
        return make_node(op, (x,), {"shape": (8, 4)})
    if op == "permute":
        return make_node(op, (x,), {"axes": (1, 0)})
    if op == "cast":
        return make_node(op, (x,), {"dtype": "f16"})
    return make_node(op, (x,))
