"""fold-constants: evaluate at compile time what depends on constants alone.

A compute node whose operands are all constant-valued (constants, or views of them) is replaced
by a constant holding its value, computed by the reference interpreter (the definition of each
op, so folding cannot change numerics beyond the reference's own rounding to the stored dtype).
Views are not folded: they cost nothing and folding one would copy its data. Results larger
than `max_bytes` are left alone so folding never multiplies the size of the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ember.ir.builder import LITERAL_LIMIT, const_node, literal_node
from ember.ir.graph import Graph
from ember.ir.interpreter import evaluate
from ember.ir.node import Node
from ember.ir.ops import get_op
from ember.passes.base import Pass, PassContext
from ember.passes.rewrite import RewriteState, apply_rules


def _constant_valued(node: Node) -> bool:
    while get_op(node.op).is_view:
        node = node.inputs[0]
    return node.op == "const"


def _value_of(node: Node, state: RewriteState) -> np.ndarray:
    """Evaluate node on its constant operands with the reference interpreter."""
    consts = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op == "const" and n.attr("value") is None:
            consts[n.name] = state.constant_data(n)
        stack.extend(n.inputs)
    return evaluate(Graph((), (node,), consts), {})[node]


@dataclass(frozen=True)
class FoldConstants(Pass):
    name: ClassVar[str] = "fold-constants"
    max_bytes: int = 1 << 20

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        def fold(node: Node, state: RewriteState) -> Node | None:
            opdef = get_op(node.op)
            if opdef.category in ("source", "view") or not node.inputs:
                return None
            if not all(_constant_valued(i) for i in node.inputs):
                return None
            if node.type.nbytes > self.max_bytes:
                return None
            value = np.ascontiguousarray(_value_of(node, state))
            if node.dtype.name == "f32" and value.size <= LITERAL_LIMIT:
                return literal_node(value.reshape(-1), node.dtype, node.shape)
            name = state.fresh_constant_name(f"folded.{node.op}")
            state.new_constants[name] = value
            return const_node(name, node.dtype, node.shape)

        return apply_rules(graph, {"*": [fold]})
