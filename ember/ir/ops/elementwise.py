"""Elementwise ops: binary with broadcasting of the second operand, unary, gated units."""
from __future__ import annotations

import numpy as np

from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import FLOAT_ACT, broadcasts_to, expect_dtype, f32, require


def _binary_rule(name):
    def infer(ts, attrs):
        a, b = ts
        expect_dtype(name, "a", a, FLOAT_ACT)
        expect_dtype(name, "b", b, FLOAT_ACT)
        require(broadcasts_to(b.shape, a.shape),
                f"{name}: b of shape {list(b.shape)} does not broadcast to a of shape {list(a.shape)}")
        return f32(a.shape)
    return infer


def _unary_rule(name):
    def infer(ts, attrs):
        expect_dtype(name, "x", ts[0], FLOAT_ACT)
        return f32(ts[0].shape)
    return infer


def _f32(fn):
    """Evaluate in float64 for a precise definition; results are stored as float32."""
    def ref(xs, attrs):
        return np.asarray(fn(*[x.astype(np.float64) for x in xs], **attrs), dtype=np.float32)
    return ref


def _gelu(x):
    # The tanh approximation, as ggml and every GGUF model use.
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}

UNARY = {
    "neg": lambda x: -x,
    "exp": np.exp,
    "tanh": np.tanh,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "silu": lambda x: x * _sigmoid(x),
    "gelu": _gelu,
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": _sigmoid,
    "softplus": _softplus,
}

# The activation is rounded to f32 before the product, as the unfused pair rounds it, so the
# fuse-elementwise pass changes no bit.
GATED = {
    "swiglu": lambda g, u: (g * _sigmoid(g)).astype(np.float32) * u,
    "geglu": lambda g, u: _gelu(g).astype(np.float32) * u,
}

for _name, _fn in BINARY.items():
    register(OpDef(_name, ("a", "b"), _binary_rule(_name), _f32(lambda a, b, _fn=_fn: _fn(a, b)),
                   category="elementwise", doc=f"{_name}(a, b): b broadcasts to a's shape."))

for _name, _fn in UNARY.items():
    register(OpDef(_name, ("x",), _unary_rule(_name), _f32(lambda x, _fn=_fn: _fn(x)),
                   category="elementwise", doc=f"{_name}(x), elementwise."))


def _gated_rule(name):
    def infer(ts, attrs):
        g, u = ts
        expect_dtype(name, "gate", g, FLOAT_ACT)
        expect_dtype(name, "up", u, FLOAT_ACT)
        require(g.shape == u.shape, f"{name}: gate {list(g.shape)} and up {list(u.shape)} differ in shape")
        return f32(g.shape)
    return infer


for _name, _fn in GATED.items():
    register(OpDef(_name, ("gate", "up"), _gated_rule(_name), _f32(lambda g, u, _fn=_fn: _fn(g, u)),
                   category="elementwise", doc=f"{_name}(gate, up) = act(gate) * up."))

register(OpDef("scale", ("x",), _unary_rule("scale"),
               _f32(lambda x, scale, bias: x * scale + bias),
               attrs={"scale": Attr("float"), "bias": Attr("float", 0.0)},
               category="elementwise", doc="x * scale + bias."))

register(OpDef("clamp", ("x",), _unary_rule("clamp"),
               _f32(lambda x, min, max: np.clip(x, min, max)),
               attrs={"min": Attr("float"), "max": Attr("float")},
               category="elementwise", doc="x limited to [min, max]."))
