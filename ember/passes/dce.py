"""dce: drop nodes (and the constants only they used) that no output depends on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ember.ir.graph import Graph
from ember.passes.base import Pass, PassContext


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name: ClassVar[str] = "dce"

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        if not graph.has_dead_nodes:
            return graph
        # Graph inputs stay even when unused: they are the graph's calling convention.
        live = set(Graph(graph.inputs, graph.outputs, graph.constants, graph.name).nodes)
        return Graph(graph.inputs, graph.outputs, graph.constants, graph.name,
                     nodes=[n for n in graph.nodes if n in live])
