"""cse: make equal computations one node.

Nodes are hash-consed, so two identical expressions are already one object; what remains for
this pass is what hash-consing cannot see:
- constants with different names but identical data (a weight stored twice, tied tensors);
- operands of commutative ops in different order (a + b and b + a, same shapes);
- views and copies that are identities (reshape to the same shape, the identity permutation,
  cont of a contiguous tensor), which stand for the same value as their operand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ember.ir.builder import make_node
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.passes.base import Pass, PassContext
from ember.passes.rewrite import RewriteState, apply_rules

COMMUTATIVE = ("add", "mul")


def _same_value_as_operand(node: Node, state: RewriteState) -> Node | None:
    x = node.inputs[0]
    if node.type == x.type:   # same dtype, shape and strides: the view or copy changes nothing
        return x
    return None


def _commute(node: Node, state: RewriteState) -> Node | None:
    a, b = node.inputs
    if a.type.shape == b.type.shape and a.dtype == b.dtype and state.rank(b) < state.rank(a):
        return make_node(node.op, (b, a), node.attr_dict)
    return None


def _fingerprint(data: np.ndarray) -> bytes:
    """A cheap summary of a constant's bytes: its size and up to 64 evenly spread 64-byte
    samples. Equal data give equal fingerprints; a match is confirmed by a full comparison."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if flat.size <= 4096:
        return flat.tobytes()
    starts = np.linspace(0, flat.size - 64, 64).astype(np.int64)
    return flat.size.to_bytes(8, "little") + b"".join(flat[i:i + 64].tobytes() for i in starts)


def _duplicate_constants(graph: Graph) -> dict[str, str]:
    """name -> the first-declared name holding the same type and bytes (weights are never
    hashed whole: a model's constants are hundreds of megabytes)."""
    candidates: dict[tuple, list[str]] = {}
    alias: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "const" or node.attr("value") is not None:
            continue
        data = graph.constants[node.name]
        same = candidates.setdefault((node.type, _fingerprint(data)), [])
        for other in same:
            earlier = graph.constants[other]
            if earlier is data or np.array_equal(earlier, data):
                alias[node.name] = other
                break
        else:
            same.append(node.name)
    return alias


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name: ClassVar[str] = "cse"

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        alias = _duplicate_constants(graph)
        const_nodes = {n.name: n for n in graph.nodes if n.op == "const" and n.name}

        def merge_constant(node: Node, state: RewriteState) -> Node | None:
            target = alias.get(node.name) if node.attr("value") is None else None
            return const_nodes[target] if target else None

        rules = {
            "const": [merge_constant],
            "reshape": [_same_value_as_operand],
            "permute": [_same_value_as_operand],
            "cont": [_same_value_as_operand],
            **{op: [_commute] for op in COMMUTATIVE},
        }
        return apply_rules(graph, rules)
