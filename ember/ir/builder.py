"""Building graphs: `make_node` (type inference + checks) and the `GraphBuilder` API.

    b = GraphBuilder("block")
    x = b.input("x", "f32", (8, 64))
    w = b.weight("w", np.random.randn(64, 64), "q8_0")     # quantized on the way in
    y = b.rms_norm(b.mul_mat(x, w), eps=1e-6)
    graph = b.build(y)

Every op of the op table is a method of the builder: `b.<op>(*operands, **attrs)`.
"""
from __future__ import annotations

import functools

import numpy as np

import ember.ir.dtypes as dtypes
from ember.errors import ShapeError
from ember.ir import turbo
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.ops import OPS, get_op, infer_type
from ember.ir.ops.views import storage_layout
from ember.ir.types import TensorType

LITERAL_LIMIT = 16  # constants with at most this many values may live in the IR as literals


def make_node(op: str, inputs, attrs: dict | None = None) -> Node:
    """The node for op applied to inputs; raises ShapeError naming the op when a rule breaks."""
    opdef = get_op(op)
    if opdef.category == "source":
        raise ShapeError(f"{op}: source nodes are made with input_node / const_node")
    inputs = tuple(inputs)
    for i in inputs:
        if not isinstance(i, Node):
            raise ShapeError(f"{op}: operand {i!r} is not a node")
    out_type, full = infer_type(op, [i.type for i in inputs], dict(attrs or {}))
    return Node(op, inputs, full, out_type)


def input_node(name: str, dt, shape) -> Node:
    return Node("input", (), {"name": name}, TensorType(dtypes.dtype(dt), tuple(shape)))


def const_node(name: str, dt, shape) -> Node:
    return Node("const", (), {"name": name}, TensorType(dtypes.dtype(dt), tuple(shape)))


def literal_node(values, dt="f32", shape=None) -> Node:
    dt = dtypes.dtype(dt)
    if dt.is_quantized:
        raise ShapeError(f"const: a literal cannot be {dt}; quantized constants are named")
    # A bf16 literal holds the float values a bf16 can represent (Graph.constant_data stores bits).
    arr = np.asarray(values, dtype=np.float32 if dt is dtypes.bf16 else dt.numpy)
    shape = arr.shape if shape is None else tuple(shape)
    if arr.size > LITERAL_LIMIT:
        raise ShapeError(f"const: a literal holds at most {LITERAL_LIMIT} values, got {arr.size}")
    t = TensorType(dt, shape)
    if arr.size != t.numel:
        raise ShapeError(f"const: {arr.size} literal values do not fill {t}")
    flat = arr.reshape(-1)
    if dt is dtypes.bf16:
        flat = dtypes.bf16_to_f32(dtypes.f32_to_bf16(flat))
    return Node("const", (), {"value": tuple(v.item() for v in flat)}, t)


def check_constant_data(name: str, t: TensorType, data: np.ndarray):
    """Data for a constant must be stored exactly as its type says (shape, storage dtype)."""
    shape, _ = storage_layout(t)
    if tuple(data.shape) != shape or data.dtype != t.dtype.numpy:
        raise ShapeError(f"constant {name!r}: data {data.dtype}{list(data.shape)} does not store "
                         f"{t} (expected {t.dtype.numpy}{list(shape)})")


class GraphBuilder:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Node] = []
        self.constants: dict[str, np.ndarray] = {}

    # ---- sources -------------------------------------------------------------------------
    def input(self, name: str, dt, shape) -> Node:
        if any(n.name == name for n in self.inputs):
            raise ShapeError(f"input {name!r} declared twice")
        node = input_node(name, dt, shape)
        self.inputs.append(node)
        return node

    def const(self, name: str, data: np.ndarray, dt=None, shape=None) -> Node:
        """A constant holding data as stored (for quantized types: uint8 blocks; give shape)."""
        dt = dtypes.dtype(dt) if dt is not None else _dtype_of_array(data)
        if shape is None:
            if dt.is_quantized:
                raise ShapeError(f"constant {name!r}: give the logical shape of quantized data")
            shape = data.shape
        node = const_node(name, dt, shape)
        check_constant_data(name, node.type, data)
        if name in self.constants and self.constants[name] is not data:
            raise ShapeError(f"constant {name!r} defined twice with different data")
        self.constants[name] = data
        return node

    def weight(self, name: str, values, dt="f32") -> Node:
        """A constant from float values, converted (quantized) to dt."""
        values = np.asarray(values, dtype=np.float32)
        dt = dtypes.dtype(dt)
        return self.const(name, dtypes.from_float32(values, dt), dt, values.shape)

    def literal(self, values, dt="f32", shape=None) -> Node:
        return literal_node(values, dt, shape)

    # ---- ops -----------------------------------------------------------------------------
    def op(self, name: str, *operands, **attrs) -> Node:
        return make_node(name, [o for o in operands if o is not None], attrs)

    def __getattr__(self, name: str):
        if name in OPS and OPS[name].category != "source":
            return lambda *operands, **attrs: self.op(name, *operands, **attrs)
        raise AttributeError(name)

    # conveniences that read better than the raw op
    def reshape(self, x: Node, *shape) -> Node:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self.op("reshape", x, shape=tuple(shape))

    def permute(self, x: Node, *axes) -> Node:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return self.op("permute", x, axes=tuple(axes))

    def linear(self, x: Node, w: Node, bias: Node | None = None) -> Node:
        y = self.op("mul_mat", x, w)
        return self.op("add", y, bias) if bias is not None else y

    def hadamard(self, x: Node, block: int | None = None) -> Node:
        """x rotated by the orthonormal Walsh-Hadamard matrix over its last axis, in independent
        blocks of `block` values (default: the whole axis; a power of two). What llama.cpp applies
        to Q, K and V when the KV cache is quantized: the matrix is symmetric and its own inverse,
        so <Hq, Hk> = <q, k> and the attention output is rotated back by the same call. Built as
        a mul_mat by a constant (H is symmetric, so mul_mat's x @ w^T is x @ H): every backend
        runs it, and at head sizes (<= 256) it costs little next to the projections."""
        n = x.shape[-1]
        block = block or n
        if block & (block - 1) or n % block:
            raise ShapeError(f"hadamard: block {block} must be a power of two dividing the last axis {n}")
        h = self.const(f"hadamard.{block}", _hadamard_data(block))
        if block == n:
            return self.op("mul_mat", x, h)
        y = self.op("mul_mat", self.reshape(x, *x.shape[:-1], n // block, block), h)
        return self.reshape(y, *x.shape)

    def build(self, *outputs: Node) -> Graph:
        if len(outputs) == 1 and isinstance(outputs[0], (list, tuple)):
            outputs = tuple(outputs[0])
        return Graph(self.inputs, outputs, self.constants, self.name)


@functools.lru_cache(maxsize=None)
def _hadamard_data(n: int) -> np.ndarray:
    """One array per size, so every hadamard call of a graph shares one constant."""
    data = turbo.hadamard_matrix(n).astype(np.float32)
    data.flags.writeable = False
    return data


def _dtype_of_array(data: np.ndarray) -> dtypes.DType:
    for d in (dtypes.f32, dtypes.f16, dtypes.i32, dtypes.i8):
        if data.dtype == d.numpy:
            return d
    raise ShapeError(f"no ember dtype stores NumPy {data.dtype}; pass dt explicitly")
