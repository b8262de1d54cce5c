"""The CPU backend: a graph becomes one C file (ember.codegen.cpu), one shared library (built
through CompileCache) and one call per run into its entry point.

The executable keeps the constants' arrays referenced and passes their data pointers (weights are
never copied; a memory-mapped weight stays mapped), allocates its arena once, and on each run
checks the inputs, allocates the outputs and calls ember_graph_run with the GIL released.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from ember.backends.base import Backend, Executable, host_storage
from ember.backends.cpu.compiler import ISA_FLAGS, CompileCache, find_compiler
from ember.codegen.cpu import (ARENA_ALIGNMENT, ENTRY_POINT, CpuProgram, kernel_library_source, render_graph,
                               supports_node, tag_kernel_symbols)
from ember.errors import BackendUnavailable, EmberError
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.types import TensorType


class CpuBackend(Backend):
    """Compiles graphs to shared libraries (`compile`), or loads libraries built earlier, e.g. an
    artifact's (`load_kernel_library`, then `load_executable`)."""

    name = "cpu"

    def __init__(self, threads: int | None = None, isa: str = "native", cache_dir=None,
                 cc: str | None = None, profile: str | None = None):
        if isa not in ISA_FLAGS:
            raise EmberError(f"cpu backend: unknown isa {isa!r}; known: {', '.join(ISA_FLAGS)}")
        if threads is not None and threads < 1:
            raise EmberError(f"cpu backend: threads must be at least 1, got {threads}")
        self.threads = threads or os.cpu_count() or 1
        self.isa = isa
        self.cache_dir = cache_dir
        self.cc = cc
        # "wall" or "cpu": time every kernel call with that clock (CpuExecutable.profile)
        self.profile = profile
        self._cache: CompileCache | None = None

    def __repr__(self) -> str:
        return f"<CpuBackend threads={self.threads} isa={self.isa}>"

    @property
    def cache(self) -> CompileCache:
        """The compile cache (created on first use; `hits` and `builds` count its work)."""
        if self._cache is None:
            self.require_available()
            self._cache = CompileCache(self.cache_dir, self.cc)
        return self._cache

    def available(self) -> tuple[bool, str]:
        if self.cc is not None and shutil.which(self.cc) is None:
            return False, f"C compiler {self.cc!r} not found on PATH"
        try:
            find_compiler(self.cc)
        except BackendUnavailable as e:
            return False, str(e)
        return True, ""

    def supports_op(self, node: Node) -> tuple[bool, str]:
        return supports_node(node)

    def compile(self, graph: Graph, **options) -> "CpuExecutable":
        """options: threads (overrides the backend's)."""
        unknown = set(options) - {"threads"}
        if unknown:
            raise EmberError(f"cpu backend: unknown compile options {sorted(unknown)}")
        self.require_available()
        self.require_supported(graph)
        program = render_graph(graph, profile=self.profile)
        tag = self._kernel_library()
        library = self.cache.build(tag_kernel_symbols(program.source, tag), ISA_FLAGS[self.isa],
                                   name=f"graph_{graph.name}")
        return self.load_executable(graph, program, library, options.get("threads"))

    def load_executable(self, graph: Graph, program: CpuProgram, library_path,
                        threads: int | None = None) -> "CpuExecutable":
        """The executable of a library already built from program's source (tagged for a kernel
        library that is loaded): no rendering, no C compiler. The caller vouches that the
        library was built from that source."""
        executable = CpuExecutable(graph, program, ctypes.CDLL(str(library_path)), threads or self.threads)
        executable.library_path = Path(library_path)
        return executable

    def kernel_library(self) -> tuple[str, Path]:
        """(symbol tag, path) of the matmul kernel library graphs link against; built (once,
        cached) and loaded."""
        tag = self._kernel_library()
        return tag, Path(_LOADED_KERNEL_LIBRARIES[tag]._name)

    def _kernel_library(self) -> str:
        """Build (once, cached) and load the matmul kernel library; returns its symbol tag.

        It is loaded with RTLD_GLOBAL so graph libraries resolve its functions; the tag (from
        the library's cache key) keeps libraries of different ISAs apart in one process.
        """
        flags = ISA_FLAGS[self.isa]
        source = kernel_library_source()
        tag = "k" + self.cache.key(source, flags)[:12]
        if tag not in _LOADED_KERNEL_LIBRARIES:
            path = self.cache.build(tag_kernel_symbols(source, tag), flags, name="kernels")
            load_kernel_library(tag, path)
        return tag


# tag -> loaded kernel library; kept for the life of the process (graphs resolve into it)
_LOADED_KERNEL_LIBRARIES: dict[str, ctypes.CDLL] = {}


def load_kernel_library(tag: str, path) -> None:
    """Load a kernel library built earlier (from the cache, or an artifact's copy) under its
    symbol tag, unless one with that tag is loaded already."""
    if tag not in _LOADED_KERNEL_LIBRARIES:
        _LOADED_KERNEL_LIBRARIES[tag] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class CpuExecutable(Executable):
    library_path: Path | None = None   # the shared library it runs (set by the backend)

    def __init__(self, graph: Graph, program: CpuProgram, library: ctypes.CDLL, threads: int):
        self.graph = graph
        self.program = program
        self.threads = threads
        self.planned_peak_bytes = program.plan.peak_bytes
        self._library = library   # keeps the code loaded while this executable lives
        self._entry = getattr(library, ENTRY_POINT)
        self._entry.restype = ctypes.c_int
        self._entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_int]
        self._lock = threading.Lock()   # one run at a time: the arena is shared
        self._inputs = program.graph.inputs
        self._input_specs = [(n.name, *host_storage(n.type)) for n in self._inputs]
        self._outputs = [host_storage(TensorType(n.dtype, n.shape)) for n in program.graph.outputs]
        # Constants: their own arrays, referenced, never copied (unless not contiguous).
        self._constants = [_contiguous(graph.constant_data(n)) for n in program.constants]
        self._consts = _pointer_array(self._constants)
        self._arena_storage, self._arena = _aligned(program.plan.peak_bytes, ARENA_ALIGNMENT)
        self.in_place_outputs = {k: self._inputs[i].name for k, i in (program.in_place or {}).items()}

    def __repr__(self) -> str:
        return (f"<CpuExecutable {self.graph.name!r}: {self.program.n_kernels} kernels, "
                f"{self.program.n_barriers} barriers, arena {self.planned_peak_bytes} bytes>")

    @property
    def source(self) -> str:
        return self.program.source

    def profile(self) -> list[tuple[str, list[float]]]:
        """(label, seconds per thread) of every kernel call since the last call of profile, in
        graph order, then ("barrier", waits); only for a graph compiled with profile ("wall" or "cpu")."""
        labels = self.program.profile_labels
        if not labels:
            raise EmberError(f"graph {self.graph.name!r} was not compiled with a profile clock")
        totals = np.zeros((64, len(labels)))
        getattr(self._library, "ember_graph_profile")(totals.ctypes.data_as(ctypes.c_void_p))
        threads = totals[:self.threads]
        return [(label, threads[:, i].tolist()) for i, label in enumerate(labels)]

    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        return self.bind(inputs, outputs)()

    def bind(self, inputs: Mapping[str, np.ndarray],
             outputs: Mapping[int, np.ndarray] | None = None) -> "CpuRun":
        """The inputs and outputs checked once: a callable that runs the graph on those very
        arrays, as often as wanted (the caller may change their contents between calls). For a
        generation loop this leaves only the kernels and one foreign call per step."""
        arrays = self._checked_inputs(inputs)
        return CpuRun(self, arrays, self._output_arrays(outputs or {}, arrays))

    def _output_arrays(self, given: Mapping[int, np.ndarray], inputs: list[np.ndarray]) -> list[np.ndarray]:
        arrays = []
        for k, (shape, dtype) in enumerate(self._outputs):
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

    def _checked_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._input_specs) or any(name not in inputs for name, _, _ in self._input_specs):
            names = [name for name, _, _ in self._input_specs]
            missing = [n for n in names if n not in inputs]
            unknown = [n for n in inputs if n not in names]
            parts = ([f"missing input(s) {missing}"] if missing else []) + \
                    ([f"unknown input(s) {unknown}"] if unknown else [])
            raise EmberError(f"graph {self.graph.name!r}: {'; '.join(parts)} "
                             f"(expected {names})")
        arrays = []
        for node, (name, shape, dtype) in zip(self._inputs, self._input_specs):
            value = np.asarray(inputs[name])
            if value.shape != shape or value.dtype != dtype:
                raise EmberError(f"graph {self.graph.name!r}: input {name!r} must be "
                                 f"{node.type} (NumPy {dtype}{list(shape)}), got "
                                 f"{value.dtype}{list(value.shape)}")
            arrays.append(_contiguous(value))
        return arrays


class CpuRun:
    """A CpuExecutable bound to its input and output arrays (CpuExecutable.bind). Calling it
    runs the graph and returns the output arrays; outputs listed in `fresh` get arrays no one
    else holds first (so a caller may keep the previous ones, e.g. logits), and `inputs` may
    replace some bound inputs by name (checked like bind's; they stay bound for later calls).

    A fresh output comes from a small pool: an array of the pool that nobody but the pool
    references any more (CPython reference counts) is reused, so a generation loop does not
    allocate, and page-fault in, a new logits array every step."""

    POOL = 4   # arrays kept per fresh output

    def __init__(self, executable: CpuExecutable, inputs: list[np.ndarray], outputs: list[np.ndarray]):
        self.executable = executable
        self.inputs, self.outputs = inputs, outputs   # referenced: the pointers stay valid
        self._in_ptrs = _pointer_array(inputs)
        self._out_ptrs = _pointer_array(outputs)
        self._index = {name: i for i, (name, _, _) in enumerate(executable._input_specs)}
        self._pools: dict[int, list[np.ndarray]] = {}

    def __call__(self, fresh=(), inputs: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        exe = self.executable
        for name, value in (inputs or {}).items():
            i = self._index.get(name)
            if i is None:
                raise EmberError(f"graph {exe.graph.name!r}: unknown input {name!r}")
            if value is self.inputs[i]:
                continue
            _, shape, dtype = exe._input_specs[i]
            if not isinstance(value, np.ndarray) or value.shape != shape or value.dtype != dtype \
                    or not value.flags.c_contiguous:
                raise EmberError(f"graph {exe.graph.name!r}: input {name!r} must be a contiguous "
                                 f"NumPy {dtype}{list(shape)} array")
            self.inputs[i] = value
            self._in_ptrs[i] = value.ctypes.data
        for k in fresh:
            self.outputs[k] = None
            self.outputs[k] = self._unshared(k)
            self._out_ptrs[k] = self.outputs[k].ctypes.data
        with exe._lock:
            status = exe._entry(self._in_ptrs, self._out_ptrs, exe._consts, exe._arena, exe.threads)
        if status:
            message = exe.program.status_messages.get(status, f"kernel status {status}")
            raise EmberError(f"cpu backend: graph {exe.graph.name!r}: {message}")
        return list(self.outputs)

    def _unshared(self, k: int) -> np.ndarray:
        pool = self._pools.setdefault(k, [])
        for i in range(len(pool)):
            # referenced by the pool list and getrefcount's argument only: no one else has it
            if sys.getrefcount(pool[i]) == 2:
                return pool[i]
        shape, dtype = self.executable._outputs[k]
        array = np.empty(shape, dtype)
        if len(pool) < self.POOL:
            pool.append(array)
        return array



def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _pointer_array(arrays) -> ctypes.Array:
    return (ctypes.c_void_p * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])


def _aligned(nbytes: int, alignment: int) -> tuple[np.ndarray, int]:
    """A buffer of nbytes whose start is aligned; returns (owner, address)."""
    storage = np.empty(nbytes + alignment, np.uint8)
    address = storage.ctypes.data
    return storage, address + (-address) % alignment
