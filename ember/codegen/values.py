"""What every renderer (cpu, opencl, vulkan) does alike with a graph's values: where each one
lives, and how a node is named in comments and error messages. Imports the IR (and is_view of
the memory planner) only."""
from __future__ import annotations

from typing import Callable, Mapping

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.printer import format_value
from ember.codegen.memory_plan import is_view


def describe_node(names: Mapping[Node, str], node: Node) -> str:
    """The node as the IR printer writes it: `%y = op(%a, %b, attr=v) : type`."""
    args = ", ".join(f"%{names[i]}" for i in node.inputs)
    attrs = "".join(f", {k}={format_value(v)}" for k, v in node.attrs)
    return f"%{names[node]} = {node.op}({args}{attrs}) : {node.type}"


def place_values(graph: Graph, arena_offsets: Mapping[Node, int], place: Callable,
                 output_place: Callable[[Node, int], object]) -> tuple[dict, list[Node]]:
    """(places, constants): inputs in their slots, constants in order of first use, a view at
    an offset into what it views (no copy), a graph output where output_place(node, k) puts it
    (k: its first output index), everything else in the arena at the memory plan's offset.
    place(region, index, offset=0) makes the renderer's own Place."""
    first_output: dict[Node, int] = {}
    for k, out in enumerate(graph.outputs):
        first_output.setdefault(out, k)
    places = {node: place("in", i) for i, node in enumerate(graph.inputs)}
    constants: list[Node] = []
    for node in graph.nodes:
        if node in places:
            continue
        if node.op == "const":
            places[node] = place("const", len(constants))
            constants.append(node)
        elif is_view(node):
            offset = node.attr("offset", 0) if node.op == "view" else 0
            places[node] = places[node.inputs[0]].shifted(offset)
        elif node in first_output:
            places[node] = output_place(node, first_output[node])
        else:
            places[node] = place("arena", 0, arena_offsets[node])
    return places, constants
