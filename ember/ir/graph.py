"""Graph: inputs, constants (weights), nodes and outputs, immutable.

A graph is a value: passes return new graphs. Equality is structural (hash-consed nodes make it
an identity check on the outputs) plus the identity of constant data. Constant arrays are kept
as given (a memory-mapped GGUF tensor stays mapped); nothing here copies them.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.node import Node


class Graph:
    __slots__ = ("name", "inputs", "outputs", "constants", "_order", "_users")

    def __init__(self, inputs: Iterable[Node], outputs: Iterable[Node],
                 constants: Mapping[str, np.ndarray] | None = None, name: str = "main",
                 nodes: Iterable[Node] | None = None):
        """`nodes`, when given, is the declared node list (as IR text or a builder wrote it): it
        may hold dead nodes, which stay until dead-code elimination. Without it the graph is
        exactly what the outputs reach."""
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._order = None
        self._users = None
        if nodes is not None:
            self._order = self._checked_order(nodes)
        for node in self.inputs:
            if node.op != "input":
                raise ValueError(f"graph input {node!r} is not an input node")
        names = [n.name for n in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"graph {name!r} has duplicate input names: {names}")
        # Keep only constants the graph still uses: a pass that drops a node drops its weight.
        used = {n.name for n in self.nodes if n.op == "const" and n.attr("value") is None}
        constants = dict(constants or {})
        missing = sorted(used - constants.keys())
        if missing:
            raise ValueError(f"graph {name!r}: no data for constants {missing}")
        self.constants = MappingProxyType({k: constants[k] for k in sorted(used)})

    # ---- structure -------------------------------------------------------------------------
    def _checked_order(self, nodes: Iterable[Node]) -> tuple[Node, ...]:
        order = list(self.inputs) + [n for n in nodes if n.op != "input"]
        position = {}
        for n in order:
            position.setdefault(n, len(position))
        order = list(position)
        for n in order:
            for i in n.inputs:
                if position.get(i, len(order)) >= position[n]:
                    raise ValueError(f"graph {self.name!r}: {n!r} uses {i!r}, which is not "
                                     "declared before it")
        for n in self.outputs:
            if n not in position:
                raise ValueError(f"graph {self.name!r}: output {n!r} is not among the declared nodes")
        return tuple(order)

    @property
    def live_nodes(self) -> tuple[Node, ...]:
        """The nodes the outputs depend on, plus the inputs, in declared order."""
        return Graph(self.inputs, self.outputs, self.constants, self.name).nodes \
            if self.has_dead_nodes else self.nodes

    @property
    def has_dead_nodes(self) -> bool:
        live = {self.inputs[i] for i in range(len(self.inputs))}
        stack = list(self.outputs)
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.inputs)
        return len(live) != len(self.nodes)

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node reachable from the outputs, plus the inputs, in a topological order.

        The order is deterministic: inputs first (as declared), then a depth-first post-order
        from the outputs taking operands left to right.
        """
        if self._order is None:
            order: list[Node] = list(self.inputs)
            seen = set(order)
            for out in self.outputs:
                stack = [(out, 0)]
                while stack:
                    node, i = stack.pop()
                    if node in seen:
                        continue
                    if i < len(node.inputs):
                        stack.append((node, i + 1))
                        child = node.inputs[i]
                        if child not in seen:
                            stack.append((child, 0))
                    else:
                        seen.add(node)
                        order.append(node)
            self._order = tuple(order)
        return self._order

    @property
    def users(self) -> Mapping[Node, tuple[Node, ...]]:
        """For each node, the nodes that consume it (in topological order)."""
        if self._users is None:
            users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
            for n in self.nodes:
                for i in dict.fromkeys(n.inputs):
                    users[i].append(n)
            self._users = MappingProxyType({k: tuple(v) for k, v in users.items()})
        return self._users

    def constant_data(self, node: Node) -> np.ndarray:
        """The stored data of a const node (literal constants are materialized)."""
        value = node.attr("value")
        if value is not None:
            if node.dtype is dtypes.bf16:   # a bf16 literal holds its float values, stored as bits
                return dtypes.f32_to_bf16(np.asarray(value, dtype=np.float32)).reshape(node.shape)
            return np.asarray(value, dtype=node.dtype.numpy).reshape(node.shape)
        return self.constants[node.name]

    def replace(self, outputs=None, inputs=None, constants=None, name=None) -> "Graph":
        """A new graph sharing everything not given; its nodes are what the outputs reach."""
        merged = dict(self.constants)
        merged.update(constants or {})
        return Graph(self.inputs if inputs is None else inputs,
                     self.outputs if outputs is None else outputs,
                     merged, self.name if name is None else name)

    # ---- equality --------------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        if (self.name, self.inputs, self.outputs) != (other.name, other.inputs, other.outputs):
            return False
        if self.nodes != other.nodes:   # dead nodes and declared order count too
            return False
        if self.constants.keys() != other.constants.keys():
            return False
        return all(a is other.constants[k] or (a.shape == other.constants[k].shape
                                               and np.array_equal(a, other.constants[k]))
                   for k, a in self.constants.items())

    def __hash__(self) -> int:
        return hash((self.name, self.inputs, self.outputs))

    def __repr__(self) -> str:
        return (f"<Graph {self.name!r}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, "
                f"{len(self.outputs)} outputs, {len(self.constants)} constants>")

    def __str__(self) -> str:
        from ember.ir.printer import print_ir
        return print_ir(self)
