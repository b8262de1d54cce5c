"""The CPU backend: a graph becomes one C file (ember.codegen.cpu), one shared library (built
through CompileCache) and one call per run into its entry point.

The executable keeps the constants' arrays referenced and passes their data pointers (weights are
never copied; a memory-mapped weight stays mapped), allocates its arena once, and on each run
checks the inputs, allocates the outputs and calls ember_graph_run with the GIL released.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import sys
import threading
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np

from ember.backends.base import Backend, Executable, host_storage
from ember.backends.cpu.compiler import ISA_FLAGS, CompileCache, find_compiler
from ember.backends.cpu.libraries import (KernelLibrary, LibraryGone, build_together, check_library, ensure_loaded,
                                          is_ready, load_library, loaded_path)
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
                 cc: str | None = None, profile: str | None = None, tiered: bool = False,
                 adapt_threads: bool = False):
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
        self._type_libraries: dict[tuple[str, str, str], KernelLibrary] = {}
        # JIT graphs first run at the quick tier when their full build is not cached (compile)
        self.tiered = tiered
        # up to `threads`, as many as run fastest lately (common.h's team governor: fewer when
        # another process holds a core); False: always exactly `threads`
        self.adapt_threads = adapt_threads

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
        """options: threads (overrides the backend's); kernel_library: "per-type" (default: the
        graph links against one kernel library per weight type it uses, each built once per ISA
        and cached, the missing ones while the graph's own library is built) or "whole" (one
        library of every weight type, kernel_library(): what an artifact carries).

        A tiered backend, when the cache lacks the graph's full build, returns an executable of
        the quick tier (ember.backends.cpu.compiler.QUICK_OPT: built in a fraction of the time)
        at once and builds the full tier in the background; the executable switches to it
        between two runs. Both tiers compute the same bits."""
        unknown = set(options) - {"threads", "kernel_library"}
        if unknown:
            raise EmberError(f"cpu backend: unknown compile options {sorted(unknown)}")
        linking = options.get("kernel_library", "per-type")
        if linking not in KERNEL_LIBRARY_FORMS:
            raise EmberError(f"cpu backend: kernel_library must be one of {KERNEL_LIBRARY_FORMS}, got {linking!r}")
        self.require_available()
        self.require_supported(graph)
        program = render_graph(graph, profile=self.profile)
        name, threads = f"graph_{graph.name}", options.get("threads")
        if linking == "whole":
            source = tag_kernel_symbols(program.source, self._kernel_library())
            return self._executable(graph, program, name, (source, ()), "full", threads)
        full = self._linked(program, {w: self._type_library(w) for w in program.matmul_wtypes})
        if self.tiered and self.profile is None and not self._cached(*full):
            # the quick graph links the full kernel libraries already there, else quick ones
            flags = ISA_FLAGS[self.isa]
            kernels = {w: lib if is_ready(self.cache, lib, flags) else self._type_library(w, "quick")
                       for w, lib in zip(program.matmul_wtypes, full[1])}
            executable = self._executable(graph, program, name, self._linked(program, kernels), "quick", threads)
            executable.upgrade_in_background(lambda: self._full_library(name, *full))
            return executable
        return self._executable(graph, program, name, full, "full", threads)

    @staticmethod
    def _linked(program: CpuProgram, kernels: dict[str, KernelLibrary]) -> tuple[str, tuple[KernelLibrary, ...]]:
        """(graph source tagged for them, the kernel libraries of its weight types)."""
        source = tag_kernel_symbols(program.source, {w: lib.tag for w, lib in kernels.items()})
        return source, tuple(kernels.values())

    def _cached(self, source: str, libraries) -> bool:
        """Whether the graph library of source (full tier) and its kernel libraries need no
        compiling."""
        flags = ISA_FLAGS[self.isa]
        return (all(is_ready(self.cache, lib, flags) for lib in libraries)
                and self.cache.lookup(source, flags) is not None)

    def _executable(self, graph: Graph, program: CpuProgram, name: str, linked, tier: str,
                    threads: int | None) -> "CpuExecutable":
        source, libraries = linked
        flags = ISA_FLAGS[self.isa]
        library = build_together(self.cache, source, name, libraries, flags, tier)
        try:
            executable = self.load_executable(graph, program, library, source, threads)
        except (OSError, LibraryGone):
            # a damaged entry whose checksum and source mark still hold (dlopen refuses it), or
            # one another process evicted from the size-limited cache since the lookup: built
            # again from source
            library = self.cache.build(source, flags, name=name, fresh=True, tier=tier)
            executable = self.load_executable(graph, program, library, source, threads)
        executable.tier = tier
        return executable

    def _full_library(self, name: str, source: str, libraries) -> tuple[ctypes.CDLL, Path]:
        """The full tier's graph library (built, with its kernel libraries, at the lowest
        priority: the quick tier runs meanwhile), checked and loaded."""
        path = build_together(self.cache.background(), source, name, libraries, ISA_FLAGS[self.isa], "full")
        check_library(path, source)
        return ctypes.CDLL(str(path)), Path(path)

    def _type_library(self, wtype: str, tier: str = "full") -> KernelLibrary:
        """The kernel library of one weight type at a tier (its tag tells the tiers apart)."""
        key = (self.isa, wtype, tier)
        if key not in self._type_libraries:
            source = kernel_library_source((wtype,))
            flags = ISA_FLAGS[self.isa] if tier == "full" else self.cache.all_flags(ISA_FLAGS[self.isa], tier=tier)
            tag = "k" + self.cache.key(source, flags)[:12]
            self._type_libraries[key] = KernelLibrary(tag, tag_kernel_symbols(source, tag), tier)
        return self._type_libraries[key]

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
        executable = CpuExecutable(graph, program, library, threads or self.threads, self.adapt_threads)
        executable.library_path = Path(library_path)
        return executable

    def kernel_library(self) -> tuple[str, Path]:
        """(symbol tag, path) of the matmul kernel library of every weight type, which graphs
        compiled with kernel_library="whole" link against (an artifact's); built (once, cached)
        and loaded."""
        tag = self._kernel_library()
        return tag, loaded_path(tag)

    def _kernel_library(self) -> str:
        """Build (once, cached) and load the kernel library of every weight type; its tag."""
        flags = ISA_FLAGS[self.isa]
        source = kernel_library_source()
        tag = "k" + self.cache.key(source, flags)[:12]
        ensure_loaded(self.cache, KernelLibrary(tag, tag_kernel_symbols(source, tag)), flags)
        return tag


# How a JIT-compiled graph links its matmul kernels (CpuBackend.compile's kernel_library).
KERNEL_LIBRARY_FORMS = ("per-type", "whole")


# Full-tier builds under way (CpuExecutable.upgrade_in_background). A process waits for them
# before it exits, after its work is done: stopped, they would leave only the quick tier cached,
# and every later short run (a CLI generate) would run -O1 code and start them again.
_UPGRADES: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


@atexit.register
def _finish_upgrades() -> None:
    for thread in list(_UPGRADES):
        thread.join()


def load_kernel_library(tag: str, path, check: bool = False) -> None:
    """Load a kernel library of every weight type built earlier (from the cache, or an
    artifact's copy) under its symbol tag, unless one with that tag is loaded already; check:
    first require that it was built from this ember's kernel source under that tag."""
    load_library(tag, path, tag_kernel_symbols(kernel_library_source(), tag) if check else None)


class CpuExecutable(Executable):
    library_path: Path | None = None   # the shared library it runs (set by the backend)
    backend_name = "cpu"
    tier = "full"                      # the optimisation tier of that library (compiler.TIERS)
    upgrade: threading.Thread | None = None     # building the full tier (upgrade_in_background)
    upgrade_error: Exception | None = None      # why that build failed (the quick tier stays)

    def __init__(self, graph: Graph, program: CpuProgram, library: ctypes.CDLL, threads: int,
                 adapt_threads: bool = False):
        self.graph = graph
        self.program = program
        self.threads = threads
        # ember_graph_run's n_threads: at most `threads` (the library's governor picks), or, when
        # negative, exactly that many (a profile keeps one row per thread it was asked for)
        self._team = threads if adapt_threads and not program.profile_labels else -threads
        self.planned_peak_bytes = program.plan.peak_bytes
        self.status_messages = program.status_messages
        self._library = library   # keeps the code loaded while this executable lives
        self._entry = self._entry_of(library)
        self._lock = threading.Lock()   # one run at a time: the arena is shared
        self._declare_signature(program.graph.inputs,
                                [host_storage(TensorType(n.dtype, n.shape)) for n in program.graph.outputs])
        # Constants: their own arrays, referenced, never copied (unless not contiguous).
        self._constants = [_contiguous(graph.constant_data(n)) for n in program.constants]
        self._consts = _pointer_array(self._constants)
        self._arena_storage, self._arena = _aligned(program.plan.peak_bytes, ARENA_ALIGNMENT)
        self.in_place_outputs = {k: self._inputs[i].name for k, i in (program.in_place or {}).items()}

    def upgrade_in_background(self, build) -> None:
        """Run build() -> (library, path) of the same program at the full tier in a thread of
        its own, and switch to that library once it is there (between two runs: a run holds
        the lock). If the build fails, this library stays (upgrade_error says why). The process
        waits for the build before it exits (_finish_upgrades), so the next one finds it."""
        def work():
            try:
                library, path = build()
                entry = self._entry_of(library)
            except Exception as e:      # noqa: BLE001: kept for the caller; the quick tier runs on
                self.upgrade_error = e
                return
            with self._lock:
                self._library, self._entry, self.library_path, self.tier = library, entry, path, "full"
        self.upgrade = threading.Thread(target=work, name=f"ember-upgrade-{self.graph.name}", daemon=True)
        _UPGRADES.add(self.upgrade)
        self.upgrade.start()

    @staticmethod
    def _entry_of(library: ctypes.CDLL):
        entry = getattr(library, ENTRY_POINT)
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        return entry

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
            status = exe._entry(self._in_ptrs, self._out_ptrs, exe._consts, exe._arena, exe._team)
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
