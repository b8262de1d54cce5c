"""The backend interface: a few nouns, as in IREE's HAL and ggml's backend_i.

A `Backend` says whether it can run here (`available`) and which nodes it can run
(`supports_op`), and compiles a whole graph into an `Executable`: a graph specialised to its
shapes, with its constants bound, that runs on NumPy inputs and returns NumPy outputs. Each
backend lives in its own folder (ember/backends/<name>/) and is listed in the registry in
ember/backends/__init__.py. Imports only the IR and NumPy.
"""
from __future__ import annotations

import abc
from typing import Mapping

import numpy as np

from ember.errors import BackendUnavailable, EmberError
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.printer import value_names


class Executable(abc.ABC):
    """A compiled graph. `run` may be called any number of times."""

    graph: Graph
    planned_peak_bytes: int   # bytes of device memory for intermediates (the arena), as planned

    # output index -> name of the input whose buffer that output may share (set_rows updating
    # a cache where it lies); a backend that cannot update in place leaves it empty.
    in_place_outputs: Mapping[int, str] = {}

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        """The graph's outputs, as contiguous arrays the caller owns (stored as the IR stores
        them: bf16 as uint16 bits, quantized as uint8 blocks). `outputs` may give arrays to
        write outputs into, by output index; one may be the very buffer of an input only where
        `in_place_outputs` allows it."""


class Backend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") when this backend can compile and run here, else (False, why not)."""

    @abc.abstractmethod
    def supports_op(self, node: Node) -> tuple[bool, str]:
        """(True, "") when compile can handle node, else (False, reason), e.g.
        (False, "mul_mat: w dtype q6_k unsupported")."""

    @abc.abstractmethod
    def compile(self, graph: Graph, **options) -> Executable:
        """Compile graph for this backend. Raises BackendUnavailable when the device or compiler
        is missing, EmberError naming the first unsupported node."""

    # ---- shared checks -------------------------------------------------------------------
    def require_available(self):
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"{self.name} backend unavailable: {reason}")

    def require_supported(self, graph: Graph):
        """EmberError naming the first node (as printed, with its op) this backend cannot run."""
        names = None
        for node in graph.nodes:
            if node.op in ("input", "const"):
                continue
            ok, reason = self.supports_op(node)
            if not ok:
                names = names or value_names(graph)
                raise EmberError(f"{self.name} backend: graph {graph.name!r}: %{names[node]} "
                                 f"({node.op} : {node.type}) is not supported: {reason}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
