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
from ember.ir.ops.views import storage_layout
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

    # Optional: bind(inputs, outputs) -> run, where run(fresh=(), inputs=None) -> list of
    # outputs runs the graph on those very arrays as often as wanted (CpuExecutable.bind;
    # the session's step feed uses it when present). `fresh` names outputs that get new arrays
    # on each call; `inputs` replaces bound inputs by name. A GPU executable's bind keeps an
    # input whose in-place output is given as that very array (the KV caches) resident on the
    # device, shared by every executable of the backend (ember.backends.resident): such a
    # run moves only the other inputs and outputs, and the host array is stale until the
    # backend's sync_to_host.


class Backend(abc.ABC):
    """Optional hooks of a backend that keeps host arrays resident on its device (OpenCL,
    Vulkan; the CPU has none, its runs work on the host arrays themselves):
    sync_to_host(arrays): the host copies of those arrays (or of the arrays they view) are
    brought up to date before the host reads them; sync_to_device(arrays): the host wrote them,
    the device copies are replaced (whole). Arrays that are not resident cost nothing. Such a
    backend also counts the bytes it moves in `transfers` (ember.backends.resident.TransferStats)."""

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


def host_storage(t) -> tuple[tuple, np.dtype]:
    """(shape, NumPy dtype) of the host array holding a tensor of type t (ember.ir's storage
    rule: quantized rows as bytes)."""
    shape, _ = storage_layout(t)
    return shape, t.dtype.numpy
