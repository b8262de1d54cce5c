"""fuse-elementwise: chains of elementwise work that one kernel can do become one fused op.

- rms_norm(x) * w, w one weight per column  -> rms_norm_mul(x, w)
- silu(gate) * up                           -> swiglu(gate, up)
- gelu(gate) * up                           -> geglu(gate, up)

A chain is fused only when its inner node has no other user (else its value would be computed
twice). Each fused op's reference computes exactly what the chain computes, rounding included,
so the pass changes no bit on backends whose fused kernels keep that order (the CPU's do).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ember.ir.builder import make_node
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.passes.base import Pass, PassContext
from ember.passes.rewrite import RewriteState, apply_rules

GATES = {"silu": "swiglu", "gelu": "geglu"}


def _only_user(inner: Node, outer: Node, state: RewriteState) -> bool:
    users = state.users(inner)
    return len(users) == 1 and state.origin.get(outer, outer) in (users[0], outer)


def _mul_rule(node: Node, state: RewriteState) -> Node | None:
    a, b = node.inputs
    if a.op == "rms_norm" and b.shape == (a.shape[-1],) and _only_user(a, node, state):
        return make_node("rms_norm_mul", (a.inputs[0], b), {"eps": a.attr("eps")})
    for gate, up in ((a, b), (b, a)):
        if gate.op in GATES and gate.shape == up.shape == node.shape and _only_user(gate, node, state):
            return make_node(GATES[gate.op], (gate.inputs[0], up))
    return None


@dataclass(frozen=True)
class FuseElementwise(Pass):
    name: ClassVar[str] = "fuse-elementwise"
    opt_level: ClassVar[int] = 1

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        return apply_rules(graph, {"mul": [_mul_rule]})
