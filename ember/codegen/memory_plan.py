"""The memory planner: offsets in one arena for every intermediate value and per-node scratch.

Liveness follows the order of `graph.nodes` (the order a backend runs them in). A value is live
from the node that computes it to its last use; a view is no buffer of its own but keeps the
value it views (its *root*) live until the last use of any view of it. Inputs and constants live
outside the arena (the caller's arrays), and so do graph outputs (the executor hands kernels the
caller's output arrays). Scratch a node asks for (e.g. activations quantized for a matmul) is live
only while that node runs. Buffers are placed greedily, largest first, each into the tightest gap
left by the already placed buffers whose lifetimes overlap it (best fit), else on top of them.

Lives in codegen because the renderers place values with it. Imports only the IR.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.ops import get_op

SizeOf = Callable[[Node], int]


@dataclass(frozen=True)
class Buffer:
    """One planned block of the arena: a node's value or its scratch, live over [start, end]."""
    node: Node
    kind: str      # "value" or "scratch"
    size: int      # bytes, rounded up to the alignment
    start: int     # index in graph.nodes of the first step that needs it
    end: int       # index of the last step that needs it (inclusive)
    offset: int

    def overlaps_in_time(self, other: "Buffer") -> bool:
        return self.start <= other.end and other.start <= self.end

    def overlaps_in_space(self, other: "Buffer") -> bool:
        return self.offset < other.offset + other.size and other.offset < self.offset + self.size


@dataclass(frozen=True)
class MemoryPlan:
    offsets: dict[Node, int]          # arena offset of each planned value
    scratch_offsets: dict[Node, int]  # arena offset of each node's scratch
    peak_bytes: int                   # arena size needed
    total_bytes: int                  # sum of all planned (aligned) sizes: the arena without reuse
    alignment: int
    buffers: tuple[Buffer, ...]


def view_root(node: Node) -> Node:
    """The node whose storage a (chain of) view(s) reads."""
    while get_op(node.op).is_view:
        node = node.inputs[0]
    return node


def is_view(node: Node) -> bool:
    return node.op not in ("input", "const") and get_op(node.op).is_view


def planned_values(graph: Graph) -> list[Node]:
    """The nodes that get an arena buffer: computed values that are not views or outputs."""
    outputs = set(graph.outputs)
    return [n for n in graph.nodes
            if n.op not in ("input", "const") and not is_view(n) and n not in outputs]


def _as_size_fn(extra) -> SizeOf:
    if extra is None:
        return lambda node: 0
    if callable(extra):
        return extra
    return lambda node: int(extra.get(node, 0))


def _round_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def plan_memory(graph: Graph, size_of: SizeOf | None = None, alignment: int = 64,
                extra: SizeOf | Mapping[Node, int] | None = None) -> MemoryPlan:
    """Plan the arena for graph. size_of(node) gives a value's bytes (default: contiguous size);
    extra(node) (or a mapping) gives the scratch bytes a node needs while it runs."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    size_of = size_of or (lambda node: node.type.nbytes)
    scratch_of = _as_size_fn(extra)
    nodes = graph.nodes
    position = {n: i for i, n in enumerate(nodes)}

    last_use: dict[Node, int] = {}
    for i, node in enumerate(nodes):
        for operand in node.inputs:
            root = view_root(operand)
            last_use[root] = max(last_use.get(root, -1), i)

    wanted: list[tuple[Node, str, int, int, int]] = []
    for node in planned_values(graph):
        start = position[node]
        wanted.append((node, "value", _round_up(size_of(node), alignment), start,
                       max(start, last_use.get(node, start))))
    for node in nodes:
        if node.op in ("input", "const"):
            continue
        size = scratch_of(node)
        if size:
            wanted.append((node, "scratch", _round_up(size, alignment), position[node], position[node]))

    placed: list[Buffer] = []
    # Largest first; ties by first use, so the plan is deterministic.
    for node, kind, size, start, end in sorted(wanted, key=lambda w: (-w[2], w[3], w[1] == "scratch")):
        if size == 0:
            placed.append(Buffer(node, kind, 0, start, end, 0))
            continue
        offset = _best_fit(placed, size, start, end, alignment)
        placed.append(Buffer(node, kind, size, start, end, offset))

    buffers = tuple(sorted(placed, key=lambda b: (b.start, b.kind, b.offset)))
    return MemoryPlan(
        offsets={b.node: b.offset for b in buffers if b.kind == "value"},
        scratch_offsets={b.node: b.offset for b in buffers if b.kind == "scratch"},
        peak_bytes=max((b.offset + b.size for b in buffers), default=0),
        total_bytes=sum(b.size for b in buffers),
        alignment=alignment,
        buffers=buffers)


def _best_fit(placed: list[Buffer], size: int, start: int, end: int, alignment: int) -> int:
    """The offset of the smallest gap that holds size bytes among the buffers live at the same
    time; above them all when no gap fits."""
    busy = sorted((b.offset, b.offset + b.size) for b in placed
                  if b.size and b.start <= end and start <= b.end)
    best, best_gap = None, None
    cursor = 0
    for lo, hi in busy:
        gap = lo - cursor
        if gap >= size and (best_gap is None or gap < best_gap):
            best, best_gap = cursor, gap
        cursor = max(cursor, _round_up(hi, alignment))
    return best if best is not None else cursor
