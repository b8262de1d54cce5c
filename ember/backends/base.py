"""The backend interface: a few nouns, as in IREE's HAL and ggml's backend_i.

A `Backend` says whether it can run here (`available`) and which nodes it can run
(`supports_op`), and compiles a whole graph into an `Executable`: a graph specialised to its
shapes, with its constants bound, that runs on NumPy inputs and returns NumPy outputs. What
every executable checks and how it reports a kernel's status is written here once; optional
capabilities (bind, profile, the host-sync hooks, threads, transfer counts) are declared here
with defaults, so callers use them without probing. Each backend lives in its own folder
(ember/backends/<name>/) and is listed in the registry in ember/backends/__init__.py. Imports
only the IR, ember.errors, NumPy and TransferStats from ember.backends.resident.
"""
from __future__ import annotations

import abc
from typing import Callable, Mapping, Sequence

import numpy as np

from ember.backends.resident import TransferStats
from ember.errors import BackendUnavailable, EmberError
from ember.passes import Pipeline, pipeline_for
from ember.target import Target, target_of
from ember.ir.graph import Graph
from ember.ir.ops.views import storage_layout
from ember.ir.node import Node
from ember.ir.printer import value_names


class Executable(abc.ABC):
    """A compiled graph. `run` may be called any number of times; `bind` fixes the arrays once.

    The whole contract lives here, written once for every backend: the checks of the inputs
    (names, shapes, dtypes; arrays that are not contiguous are copied), of the arrays given for
    outputs (shape, dtype, writable, contiguous, and no overlap with an input unless that output
    updates that very input in place), the status word a kernel sets when it refuses its input
    (an index out of range) turned into an error naming the node, the default `bind`, and the
    optional `profile`. A subclass calls _declare_signature in its __init__, implements `run`
    and may override `bind` and `profile`."""

    graph: Graph
    planned_peak_bytes: int   # bytes of device memory for intermediates (the arena), as planned
    backend_name: str = ""    # the backend's registry name, for error messages

    # output index -> name of the input whose buffer that output may share (set_rows updating
    # a cache where it lies); a backend that cannot update in place leaves it empty.
    in_place_outputs: Mapping[int, str] = {}
    # status code a kernel writes -> what went wrong, naming the node (the renderer's table)
    status_messages: Mapping[int, str] = {}
    # the bytes the runs move between host and device, counted into the backend's
    # TransferStats (ember.backends.resident); None where the runs work on host memory (CPU)
    transfers: TransferStats | None = None

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        """The graph's outputs, as contiguous arrays the caller owns (stored as the IR stores
        them: bf16 as uint16 bits, quantized as uint8 blocks). `outputs` may give arrays to
        write outputs into, by output index; one may be the very buffer of an input only where
        `in_place_outputs` allows it."""

    def bind(self, inputs: Mapping[str, np.ndarray],
             outputs: Mapping[int, np.ndarray] | None = None) -> "Callable[..., list[np.ndarray]]":
        """The inputs and outputs checked once: a callable run(fresh=(), inputs=None) -> list of
        outputs that runs the graph on those very arrays as often as wanted (the caller may
        change their contents between calls). `fresh` names outputs that get arrays no one else
        holds on each call; `inputs` replaces bound inputs by name (checked as here; they stay
        bound for later calls).

        This default goes through `run` on every call (every output not given is fresh). The
        backends override it to keep their per-call work small: the CPU's leaves one foreign
        call per step; a GPU executable's keeps an input whose in-place output is given as that
        very array (the KV caches) resident on the device, shared by every executable of the
        backend (ember.backends.resident): such a run moves only the other inputs and outputs,
        and the host array is stale until the backend's sync_to_host."""
        arrays = self._checked_inputs(inputs)
        given = dict(outputs or {})
        self._checked_outputs(given, arrays)
        return BoundRun(self, arrays, given)

    def profile(self, inputs: Mapping[str, np.ndarray] | None = None, repeats: int = 1) -> list[tuple]:
        """Per-kernel times, in the backend's own form (see its override): a backend that
        cannot time its kernels says so."""
        raise EmberError(f"{self.backend_name} backend: graph {self.graph.name!r}: "
                         "this executable does not time its kernels")

    # ---- the checks, shared by every backend ------------------------------------------------
    def _declare_signature(self, inputs: Sequence[Node], output_specs: Sequence[tuple]) -> None:
        """The graph's input nodes (in order) and the (shape, NumPy dtype) of each output's
        host array: what the checks compare against."""
        self._inputs = list(inputs)
        self._input_specs = [(n.name, *host_storage(n.type)) for n in self._inputs]
        self._input_index = {n.name: i for i, n in enumerate(self._inputs)}
        self._output_specs = list(output_specs)

    def _checked_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The inputs in graph order, each of its type's storage shape and dtype and contiguous
        (a view that is not is copied); EmberError naming what is missing, unknown or wrong."""
        specs = self._input_specs
        if len(inputs) != len(specs) or any(name not in inputs for name, _, _ in specs):
            names = [name for name, _, _ in specs]
            missing = [n for n in names if n not in inputs]
            unknown = [n for n in inputs if n not in names]
            parts = ([f"missing input(s) {missing}"] if missing else []) + \
                    ([f"unknown input(s) {unknown}"] if unknown else [])
            raise EmberError(f"graph {self.graph.name!r}: {'; '.join(parts)} (expected {names})")
        arrays = []
        for node, (name, shape, dtype) in zip(self._inputs, specs):
            value = np.asarray(inputs[name])
            if value.shape != shape or value.dtype != dtype:
                raise EmberError(f"graph {self.graph.name!r}: input {name!r} must be "
                                 f"{node.type} (NumPy {dtype}{list(shape)}), got "
                                 f"{value.dtype}{list(value.shape)}")
            arrays.append(value if value.flags.c_contiguous else np.ascontiguousarray(value))
        return arrays

    def _checked_replacement(self, name: str, value: np.ndarray) -> int:
        """The index of the bound input a bound run replaces by name; the new array must be
        exactly what the input takes (no copy is made: the run uses that very array)."""
        i = self._input_index.get(name)
        if i is None:
            raise EmberError(f"graph {self.graph.name!r}: unknown input {name!r}")
        _, shape, dtype = self._input_specs[i]
        if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype \
                or not value.flags.c_contiguous:
            raise EmberError(f"graph {self.graph.name!r}: input {name!r} must be a contiguous "
                             f"NumPy {dtype}{list(shape)} array")
        return i

    def _checked_outputs(self, given: Mapping[int, np.ndarray], inputs: list[np.ndarray]) -> list[np.ndarray]:
        """The output arrays: those given (checked), new ones for the rest. A given array may
        share memory with an input only when it is that very input's whole buffer and the
        output updates that input in place."""
        arrays = []
        for k, (shape, dtype) in enumerate(self._output_specs):
            out = given.get(k)
            if out is None:
                arrays.append(np.empty(shape, dtype))
                continue
            if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable:
                raise EmberError(f"graph {self.graph.name!r}: output {k} must be a writable contiguous "
                                 f"{dtype}{list(shape)} array, got {out.dtype}{list(out.shape)}")
            arrays.append(out)
        if given and inputs:
            # Byte ranges (every array here is contiguous): one vectorized test for all pairs.
            lo = np.array([a.__array_interface__["data"][0] for a in inputs], np.uint64)
            hi = lo + np.array([a.nbytes for a in inputs], np.uint64)
            for k, out in given.items():
                start = np.uint64(out.__array_interface__["data"][0])
                stop = start + np.uint64(out.nbytes)
                for i in np.flatnonzero((lo < stop) & (start < hi) & (hi > lo) & (stop > start)):
                    node, arr = self._inputs[i], inputs[i]
                    same = lo[i] == start and arr.nbytes == out.nbytes
                    if not (same and self.in_place_outputs.get(k) == node.name):
                        raise EmberError(f"graph {self.graph.name!r}: output {k} overlaps input "
                                         f"{node.name!r}, which it may not update in place")
        return arrays

    def _check_status(self, status: int) -> None:
        """A kernel's non-zero status word as an error naming the node that set it."""
        if status:
            message = self.status_messages.get(status, f"kernel status {status}")
            raise EmberError(f"{self.backend_name} backend: graph {self.graph.name!r}: {message}")


class BoundRun:
    """The default bound run (Executable.bind): the checked inputs and the given output arrays,
    run through Executable.run on each call."""

    def __init__(self, executable: Executable, inputs: list[np.ndarray], outputs: dict[int, np.ndarray]):
        self.executable = executable
        self.inputs, self.outputs = inputs, outputs

    def __call__(self, fresh=(), inputs: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        exe = self.executable
        for name, value in (inputs or {}).items():
            self.inputs[exe._checked_replacement(name, value)] = value
        named = {node.name: array for node, array in zip(exe._inputs, self.inputs)}
        # an output asked for fresh gets a new array even where one was bound
        return exe.run(named, {k: out for k, out in self.outputs.items() if k not in fresh})


class Backend(abc.ABC):
    """A device and its compiler. Besides the abstract methods, the members every caller may
    read without asking whether they are there (a backend overrides what it has):
    threads: the CPU threads a run uses (1 where the host does not run the kernels);
    transfers: the bytes moved between host and device (ember.backends.resident.TransferStats),
    None where runs work on host memory;
    sync_to_host(arrays) / sync_to_device(arrays): for a backend that keeps host arrays resident
    on its device between runs (OpenCL, Vulkan: the KV caches of bound runs), bring the host
    copies up to date before the host reads them / replace the device copies (whole) after the
    host wrote them. Arrays that are not resident cost nothing; on the CPU, whose runs work on
    the host arrays themselves, both do nothing;
    target() / pipeline(): the target this backend runs (ember.target) and the pass pipeline
    every graph goes through before compile, with the device's own options (an OpenCL Adreno
    profile's layout thresholds). Callers compile `pipeline()(graph)` under their PassContext;
    compile itself runs no pass."""

    name: str = ""
    threads: int = 1
    transfers: TransferStats | None = None

    def target(self) -> Target:
        return target_of(self.name)

    def pipeline(self) -> Pipeline:
        return pipeline_for(self.target().name)

    def sync_to_host(self, arrays) -> None:
        """The device wrote arrays (or the arrays they view): bring the host copies up to date."""

    def sync_to_device(self, arrays) -> None:
        """The host wrote arrays: replace their device copies (whole)."""

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
