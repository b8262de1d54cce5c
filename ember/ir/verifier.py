"""The verifier: checks that a graph keeps every rule of the IR, run after each pass in tests.

`make_node` already applies the op table's rules, so a graph built through it verifies; this
catches nodes made another way (Node(...) directly, a pass that forgot a rule) and graphs whose
pieces disagree (a constant without matching data, an input node that is no graph input).
A VerifyError names the node as printed (%7) with its op, and the rule it breaks.
Imports only the IR itself.
"""
from __future__ import annotations

import numpy as np

from ember.ir.builder import check_constant_data
from ember.errors import IRError, VerifyError
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.ops import OPS, infer_type
from ember.ir.printer import value_names


def verify(graph: Graph) -> None:
    """Raise VerifyError at the first broken rule; return None when the graph is well formed."""
    for out in graph.outputs:
        if not isinstance(out, Node):
            raise VerifyError(f"graph {graph.name!r}: output {out!r} is not a node")
    for node in graph.inputs:
        if node.op != "input" or not isinstance(node.name, str):
            raise VerifyError(f"graph {graph.name!r}: input {node!r} must be an input node with a name")
    _check_acyclic(graph)   # before graph.nodes, whose walk would not end on a cycle
    nodes = graph.nodes
    names = value_names(graph)
    position = {n: i for i, n in enumerate(nodes)}

    def fail(node: Node, rule: str):
        raise VerifyError(f"%{names.get(node, '?')} ({node.op} : {node.type}): {rule}")

    for out in graph.outputs:
        if out not in position:
            raise VerifyError(f"graph {graph.name!r}: output {out!r} is not a node of the graph")
    inputs = set(graph.inputs)
    for node in nodes:
        if node.op not in OPS:
            fail(node, f"unknown op {node.op!r}")
        for operand in node.inputs:
            if position.get(operand, len(nodes)) >= position[node]:
                fail(node, f"operand %{names.get(operand, '?')} does not come before its user")
        if node.op == "input":
            _check_input(node, inputs, fail)
        elif node.op == "const":
            _check_const(graph, node, fail)
        else:
            _check_layouts(node, names, fail)
            _check_compute(node, fail)


def _check_acyclic(graph: Graph):
    """Three-colour depth-first search from the outputs (and declared nodes), without recursion."""
    done: set[Node] = set()
    on_path: set[Node] = set()
    roots = list(graph.outputs) + list(graph._order or ())
    for root in roots:
        if root in done:
            continue
        stack = [(root, iter(root.inputs))]
        on_path.add(root)
        while stack:
            node, operands = stack[-1]
            child = next(operands, None)
            if child is None:
                stack.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                raise VerifyError(f"{child.op} node {child!r} lies on a cycle (through {node.op} {node!r})")
            elif child not in done:
                on_path.add(child)
                stack.append((child, iter(child.inputs)))


def _check_input(node: Node, inputs: set, fail):
    if node.inputs:
        fail(node, "an input node takes no operands")
    if set(node.attr_dict) != {"name"} or not isinstance(node.name, str):
        fail(node, f"an input node has exactly one attribute, a str name; got {node.attr_dict}")
    if node not in inputs:
        fail(node, f"input {node.name!r} is used but is not one of the graph's inputs")


def _check_const(graph: Graph, node: Node, fail):
    if node.inputs:
        fail(node, "a const node takes no operands")
    attrs = node.attr_dict
    value = attrs.get("value")
    if len(attrs) != 1 or (value is None) == (node.name is None):
        fail(node, f"a const node has either a name or a literal value, not {attrs}")
    if value is not None:
        if node.dtype.is_quantized:
            fail(node, f"a literal cannot have quantized type {node.dtype}")
        if not isinstance(value, tuple) or len(value) != node.type.numel:
            fail(node, f"literal holds {len(value) if isinstance(value, tuple) else value!r} "
                       f"values, its type {node.type} needs {node.type.numel}")
        return
    if not isinstance(node.name, str):
        fail(node, f"constant name {node.name!r} is not a str")
    if node.name not in graph.constants:
        fail(node, f"constant {node.name!r} has no data in the graph")
    try:
        check_constant_data(node.name, node.type, np.asarray(graph.constants[node.name]))
    except IRError as e:
        fail(node, str(e))


def _check_layouts(node: Node, names: dict, fail):
    """Every operand must be in a layout its op accepts: a kernel written for one layout never
    reads bytes arranged another way (the SYCL Q8_0 reorder bug of llama.cpp)."""
    opdef = OPS[node.op]
    for k, operand in enumerate(node.inputs):
        accepted = opdef.accepted_layouts(k)
        if operand.type.layout not in accepted:
            fail(node, f"operand {opdef.operand_name(k)} (%{names.get(operand, '?')}) is in layout "
                       f"{operand.type.layout}, which {node.op} does not accept "
                       f"(accepts: {', '.join(accepted)})")


def _check_compute(node: Node, fail):
    attrs = node.attr_dict
    try:
        inferred, full = infer_type(node.op, [i.type for i in node.inputs], attrs)
    except IRError as e:
        fail(node, f"breaks its shape rule: {e}")
    if full != attrs:
        fail(node, f"attributes {attrs} are not the op's normalized attributes {full}")
    if inferred != node.type:
        fail(node, f"type {node.type} differs from the inferred type {inferred}")
