"""The NumPy reference interpreter: runs a graph with each op's reference function.

This is the definition every backend is tested against; it favours clarity and float64
internals over speed. A tensor stored in another layout than "row" (ember.ir.layouts) is
unpacked to rows where it is read, so every op's reference sees the row layout only.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

import ember.ir.dtypes as dtypes
from ember.errors import IRError
from ember.ir.graph import Graph
from ember.ir.layouts import ROW, to_row
from ember.ir.node import Node
from ember.ir.ops import get_op


def evaluate(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[Node, np.ndarray]:
    """Every node's value (storage arrays; views share memory with their operands)."""
    values: dict[Node, np.ndarray] = {}
    rows: dict[Node, np.ndarray] = {}

    def unpacked(node: Node) -> np.ndarray:
        if node not in rows:
            rows[node] = to_row(values[node], node.type)
        return rows[node]

    for node in graph.nodes:
        if node.op == "input":
            if node.name not in inputs:
                raise IRError(f"graph {graph.name!r}: no value given for input {node.name!r}")
            values[node] = _checked_input(node, inputs[node.name])
        elif node.op == "const":
            values[node] = graph.constant_data(node)
        else:
            opdef = get_op(node.op)
            args = [values[i] if i.type.layout == ROW else unpacked(i) for i in node.inputs]
            types = [i.type.row for i in node.inputs]
            attrs = node.attr_dict
            try:
                if opdef.raw:
                    out = opdef.reference(args, attrs, types, node.type)
                else:
                    args = [a if not (t.dtype.is_quantized or t.dtype is dtypes.bf16)
                            else dtypes.to_float32(np.ascontiguousarray(a), t.dtype)
                            for a, t in zip(args, types)]
                    out = opdef.reference(args, attrs)
            except (ValueError, IndexError, FloatingPointError) as e:
                raise IRError(f"{node.op} ({node.type}): {e}") from e
            if not opdef.is_view:
                # Compute results own fresh contiguous storage, as on every backend.
                out = np.asarray(out, dtype=node.dtype.numpy, order="C")   # keeps 0-d arrays 0-d
            values[node] = out
    return values


def run_reference(graph: Graph, inputs: Mapping[str, np.ndarray] | None = None,
                  seed: int | None = 0) -> list[np.ndarray]:
    """The graph's outputs as contiguous arrays; random inputs from `seed` when none are given."""
    if inputs is None:
        inputs = random_inputs(graph, seed)
    values = evaluate(graph, inputs)
    return [np.asarray(values[o], order="C") for o in graph.outputs]


def random_inputs(graph: Graph, seed: int | None = 0) -> dict[str, np.ndarray]:
    """Inputs drawn from a seeded generator: floats ~ N(0, 1); integer inputs in a range valid
    for every op that reads them as indices."""
    rng = np.random.default_rng(seed)
    out = {}
    for node in graph.inputs:
        t = node.type
        if t.dtype is dtypes.i32 or t.dtype is dtypes.i8:
            out[node.name] = rng.integers(0, _index_bound(graph, node), size=t.shape).astype(t.dtype.numpy)
        else:
            out[node.name] = dtypes.from_float32(rng.standard_normal(t.shape).astype(np.float32), t.dtype)
    return out


def _index_bound(graph: Graph, node: Node) -> int:
    bound = 128
    for user in graph.users.get(node, ()):
        if user.op == "get_rows" and user.inputs[1] is node:
            bound = min(bound, user.inputs[0].shape[0])
        elif user.op == "set_rows" and user.inputs[1] is node:
            bound = min(bound, user.inputs[0].shape[0])
        elif user.op == "mul_mat_id" and user.inputs[2] is node:
            bound = min(bound, user.inputs[1].shape[0])
        elif user.op == "take_along" and user.inputs[1] is node:
            bound = min(bound, user.inputs[0].shape[-1])
    return max(bound, 1)


def _checked_input(node: Node, value) -> np.ndarray:
    from ember.ir.ops.views import storage_layout
    arr = np.asarray(value)
    shape, _ = storage_layout(node.type)
    if arr.shape != shape:
        raise IRError(f"input {node.name!r}: expected shape {list(node.shape)}, got {list(arr.shape)}")
    if arr.dtype != node.dtype.numpy:
        raise IRError(f"input {node.name!r}: expected {node.dtype} data, got NumPy {arr.dtype}")
    return arr
