"""Rewrites as data: a table of rules per op, applied by one shared walker.

A rule is a function `(node, ctx) -> Node | None`: it returns a replacement (a node of the same
type) or None to decline. The walker visits nodes in topological order, rebuilds each node on
its operands' replacements, then offers the rebuilt node to the rules for its op (and to the
rules under "*"), again and again until every rule declines (rules must make progress).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ember.ir.builder import make_node
from ember.ir.graph import Graph
from ember.ir.node import Node

Rule = Callable[[Node, "RewriteState"], "Node | None"]
MAX_REWRITES_PER_NODE = 64


@dataclass
class RewriteState:
    """What rules may read or add while a walk runs."""
    graph: Graph
    new_constants: dict = field(default_factory=dict)
    position: dict = field(default_factory=dict)   # node -> index of the node it replaced
    origin: dict = field(default_factory=dict)     # node -> the original node it replaced

    def users(self, node: Node) -> tuple[Node, ...]:
        """The users, in the original graph, of the node that `node` replaced."""
        return self.graph.users.get(self.origin.get(node, node), ())

    def rank(self, node: Node) -> int:
        """A stable order of the values seen so far (declared order of what they replace)."""
        return self.position.get(node, len(self.position))

    def constant_data(self, node: Node):
        if node.op == "const" and node.attr("value") is None and node.name in self.new_constants:
            return self.new_constants[node.name]
        return self.graph.constant_data(node)

    def fresh_constant_name(self, base: str) -> str:
        k = 0
        while f"{base}.{k}" in self.graph.constants or f"{base}.{k}" in self.new_constants:
            k += 1
        return f"{base}.{k}"


def rebuild(node: Node, inputs: tuple[Node, ...]) -> Node:
    if inputs == node.inputs or not node.inputs:
        return node
    return make_node(node.op, inputs, node.attr_dict)


def apply_rules(graph: Graph, rules: dict[str, list[Rule]], state: RewriteState | None = None,
                substitute: Callable[[Node, dict], "Node | None"] | None = None) -> Graph:
    """The graph with every rule applied to a fixed point; `graph` itself when nothing fired.

    `substitute(original, mapping)`, when given, may replace a node of the original graph
    outright (before it is rebuilt); `mapping` takes original nodes to their replacements so
    far, so a substitute can be built on its operands' replacements.
    """
    state = state or RewriteState(graph)
    mapping: dict[Node, Node] = {}
    changed = False
    for index, node in enumerate(graph.nodes):
        new = substitute(node, mapping) if substitute else None
        if new is None:
            new = rebuild(node, tuple(mapping[i] for i in node.inputs))
        for _ in range(MAX_REWRITES_PER_NODE):
            replacement = None
            for rule in (*rules.get(new.op, ()), *rules.get("*", ())):
                replacement = rule(new, state)
                if replacement is not None and replacement is not new:
                    if replacement.type.shape != new.type.shape or replacement.dtype != new.dtype:
                        raise AssertionError(f"rule {rule.__name__} changed the type of {new!r} "
                                             f"to {replacement.type}")
                    break
                replacement = None
            if replacement is None:
                break
            new = replacement
        else:
            raise RuntimeError(f"rules did not settle on {node!r} after {MAX_REWRITES_PER_NODE} rewrites")
        changed |= new is not node
        mapping[node] = new
        state.position.setdefault(new, index)
        state.origin.setdefault(new, node)
    if not changed:
        return graph
    constants = dict(graph.constants)
    constants.update(state.new_constants)
    # Keep the declared order (dead nodes included: removing them is dead-code elimination's
    # job), with any node a rule created placed just before its first user.
    order: dict[Node, None] = {}
    for node in graph.nodes:
        _add_with_operands(mapping[node], order)
    return Graph(graph.inputs, [mapping[o] for o in graph.outputs], constants, graph.name,
                 nodes=order)


def _add_with_operands(root: Node, order: dict) -> None:
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in order:
            continue
        if expanded:
            order[node] = None
        else:
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(node.inputs) if i not in order)
