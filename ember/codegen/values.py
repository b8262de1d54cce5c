"""What every renderer (cpu, opencl, vulkan) does alike with a graph's values: where each one
lives (`Place`), and how a node is named in comments and error messages. Launch plans name places
too, so this module stays free of jinja2: it imports the IR and is_view of the memory planner only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.printer import format_value
from ember.codegen.memory_plan import is_view


@dataclass(frozen=True)
class Place:
    """Bytes of a region at an offset. Regions: in, out, const, arena; Vulkan adds aux (tables
    the renderer makes) and status (one u32 an erring kernel sets)."""
    region: str
    index: int = 0
    offset: int = 0

    def shifted(self, by: int) -> "Place":
        return Place(self.region, self.index, self.offset + by)


def describe_node(names: Mapping[Node, str], node: Node) -> str:
    """The node as the IR printer writes it: `%y = op(%a, %b, attr=v) : type`."""
    args = ", ".join(f"%{names[i]}" for i in node.inputs)
    attrs = "".join(f", {k}={format_value(v)}" for k, v in node.attrs)
    return f"%{names[node]} = {node.op}({args}{attrs}) : {node.type}"


def place_values(graph: Graph, arena_offsets: Mapping[Node, int],
                 output_place: Callable[[Node, int], Place]) -> tuple[dict[Node, Place], list[Node]]:
    """(places, constants): inputs in their slots, constants in order of first use, a view at
    an offset into what it views (no copy), a graph output where output_place(node, k) puts it
    (k: its first output index), everything else in the arena at the memory plan's offset."""
    first_output: dict[Node, int] = {}
    for k, out in enumerate(graph.outputs):
        first_output.setdefault(out, k)
    places = {node: Place("in", i) for i, node in enumerate(graph.inputs)}
    constants: list[Node] = []
    for node in graph.nodes:
        if node in places:
            continue
        if node.op == "const":
            places[node] = Place("const", len(constants))
            constants.append(node)
        elif is_view(node):
            offset = node.attr("offset", 0) if node.op == "view" else 0
            places[node] = places[node.inputs[0]].shifted(offset)
        elif node in first_output:
            places[node] = output_place(node, first_output[node])
        else:
            places[node] = Place("arena", 0, arena_offsets[node])
    return places, constants
