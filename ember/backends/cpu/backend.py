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
from ember.backends.binary_cache import carries_mark
from ember.backends.cpu.compiler import ISA_FLAGS, CompileCache, find_compiler
from ember.codegen.cpu import (ARENA_ALIGNMENT, ENTRY_POINT, CpuProgram, kernel_library_source, render_graph,
                               supports_node, tag_kernel_symbols)
from ember.errors import BackendUnavailable, EmberError
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.types import TensorType


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask: a container's or taskset's limit,
    which os.cpu_count() ignores), one thread each."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):      # no affinity call on this OS
        return os.cpu_count() or 1


class CpuBackend(Backend):
    """Compiles graphs to shared libraries (`compile`), or loads libraries built earlier, e.g. an
    artifact's (`load_kernel_library`, then `load_executable`)."""

    name = "cpu"
    # the target features its code is built for beyond the ISA's baseline (cpu-aarch64: dotprod,
    # i8mm); recorded in artifacts
    features: tuple[str, ...] = ()

    def __init__(self, threads: int | None = None, isa: str = "native", cache_dir=None,
                 cc: str | None = None, profile: str | None = None):
        if isa not in ISA_FLAGS:
            raise EmberError(f"cpu backend: unknown isa {isa!r}; known: {', '.join(ISA_FLAGS)}")
        if threads is not None and threads < 1:
            raise EmberError(f"cpu backend: threads must be at least 1, got {threads}")
        self.threads = threads or default_threads()
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
        source = tag_kernel_symbols(program.source, tag)
        library = self.cache.build(source, ISA_FLAGS[self.isa], name=f"graph_{graph.name}")
        try:
            return self.load_executable(graph, program, library, source, options.get("threads"))
        except (OSError, LibraryGone):
            # a damaged entry whose checksum and source mark still hold (dlopen refuses it), or
            # one another process evicted from the size-limited cache since the lookup: built
            # again from source
            library = self.cache.build(source, ISA_FLAGS[self.isa], name=f"graph_{graph.name}", fresh=True)
            return self.load_executable(graph, program, library, source, options.get("threads"))

    def load_executable(self, graph: Graph, program: CpuProgram, library_path, source: str,
                        threads: int | None = None) -> "CpuExecutable":
        """The executable of a library already built from source (program's source tagged for
        a kernel library that is loaded): no rendering, no C compiler. The library must carry
        source's mark (ember.backends.binary_cache.source_mark), checked before it is loaded:
        a library of another program is refused, never run."""
        check_library(library_path, source)
        library = ctypes.CDLL(str(library_path))
        if not hasattr(library, ENTRY_POINT):
            raise EmberError(f"{library_path}: not an ember graph library (no {ENTRY_POINT})")
        executable = CpuExecutable(graph, program, library, threads or self.threads)
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
            try:
                load_kernel_library(tag, path)
            except OSError:     # refused by dlopen: built again (see compile)
                load_kernel_library(tag, self.cache.build(tag_kernel_symbols(source, tag), flags,
                                                          name="kernels", fresh=True))
        return tag


class LibraryGone(EmberError):
    """The library file is not there (any more)."""


def check_library(path, source: str) -> None:
    """Refuse a shared library that was not built from source (it lacks source's mark)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LibraryGone(f"{path}: cannot read the library: it is gone") from None
    except OSError as e:
        raise EmberError(f"{path}: cannot read the library: {e.strerror}") from None
    if not carries_mark(data, source):
        raise EmberError(f"{path}: the library was not built from the program it is loaded for "
                         f"(its source mark differs): refusing to load it")


# tag -> loaded kernel library; kept for the life of the process (graphs resolve into it)
_LOADED_KERNEL_LIBRARIES: dict[str, ctypes.CDLL] = {}


def load_kernel_library(tag: str, path, check: bool = False) -> None:
    """Load a kernel library built earlier (from the cache, or an artifact's copy) under its
    symbol tag, unless one with that tag is loaded already; check: first require that it was
    built from this ember's kernel source under that tag (an artifact's copy)."""
    if tag not in _LOADED_KERNEL_LIBRARIES:
        if check:
            check_library(path, tag_kernel_symbols(kernel_library_source(), tag))
        _LOADED_KERNEL_LIBRARIES[tag] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class CpuExecutable(Executable):
    library_path: Path | None = None   # the shared library it runs (set by the backend)
    backend_name = "cpu"

    def __init__(self, graph: Graph, program: CpuProgram, library: ctypes.CDLL, threads: int):
        self.graph = graph
        self.program = program
        self.threads = threads
        self.planned_peak_bytes = program.plan.peak_bytes
        self.status_messages = program.status_messages
        self._library = library   # keeps the code loaded while this executable lives
        self._entry = getattr(library, ENTRY_POINT)
        self._entry.restype = ctypes.c_int
        self._entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_int]
        self._lock = threading.Lock()   # one run at a time: the arena is shared
        self._declare_signature(program.graph.inputs,
                                [host_storage(TensorType(n.dtype, n.shape)) for n in program.graph.outputs])
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

    def profile(self, inputs: Mapping[str, np.ndarray] | None = None,
                repeats: int = 1) -> list[tuple[str, list[float]]]:
        """(label, seconds per thread) of every kernel call since the last call of profile, in
        graph order, then ("barrier", waits); only for a graph compiled with profile ("wall" or
        "cpu"). With inputs, the graph is run `repeats` times first (the times are their sum)."""
        labels = self.program.profile_labels
        if not labels:
            raise EmberError(f"graph {self.graph.name!r} was not compiled with a profile clock")
        if inputs is not None:
            self._read_profile()           # what earlier runs left counts for none of these
            run = self.bind(inputs)
            for _ in range(repeats):
                run()
        threads = self._read_profile()[:self.threads]
        return [(label, threads[:, i].tolist()) for i, label in enumerate(labels)]

    def _read_profile(self) -> np.ndarray:
        """The kernel library's time counters (one row per thread), reset as they are read."""
        totals = np.zeros((64, len(self.program.profile_labels)))
        getattr(self._library, "ember_graph_profile")(totals.ctypes.data_as(ctypes.c_void_p))
        return totals

    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        return self.bind(inputs, outputs)()

    def bind(self, inputs: Mapping[str, np.ndarray],
             outputs: Mapping[int, np.ndarray] | None = None) -> "CpuRun":
        """As Executable.bind; for a generation loop this leaves only the kernels and one
        foreign call per step."""
        arrays = self._checked_inputs(inputs)
        return CpuRun(self, arrays, self._checked_outputs(outputs or {}, arrays))


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
        self._pools: dict[int, list[np.ndarray]] = {}

    def __call__(self, fresh=(), inputs: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
        exe = self.executable
        for name, value in (inputs or {}).items():
            i = exe._checked_replacement(name, value)
            self.inputs[i] = value
            self._in_ptrs[i] = value.ctypes.data
        for k in fresh:
            self.outputs[k] = None
            self.outputs[k] = self._unshared(k)
            self._out_ptrs[k] = self.outputs[k].ctypes.data
        with exe._lock:
            status = exe._entry(self._in_ptrs, self._out_ptrs, exe._consts, exe._arena, exe.threads)
        exe._check_status(status)
        return list(self.outputs)

    def _unshared(self, k: int) -> np.ndarray:
        pool = self._pools.setdefault(k, [])
        for i in range(len(pool)):
            # referenced by the pool list and getrefcount's argument only: no one else has it
            if sys.getrefcount(pool[i]) == 2:
                return pool[i]
        shape, dtype = self.executable._output_specs[k]
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
