"""The CPU backend cross-compiled for aarch64 Linux (glibc) on another host, and run under
qemu-user for tests.

The C the CPU renderer writes is built by Debian's cross compiler (aarch64-linux-gnu-gcc, with
libgomp for arm64) through the same CompileCache as native builds (the compiler's identity is
part of the key). Target features: baseline NEON (-march=armv8-a), `dotprod` (SDOT/UDOT,
Armv8.2) and `i8mm` (SMMLA, Armv8.6; brings dotprod along) on top; `portable` builds with -march=armv8-a+nosimd, so
the kernels take their portable C branches, the cross-ISA reference that must match the x86
portable build ("scalar") bit for bit.

A graph compiled here is a QemuExecutable: its library and the kernel library are run by a small
C harness (harness.c, cross-built like them) under `qemu-aarch64 -L <sysroot>`, inputs and
outputs going through files. Speed under qemu means nothing; this is for correctness only.

Imports the CPU backend, the compile cache and the codegen; nothing above the backends floor.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np

from ember.backends.base import Executable, host_storage
from ember.backends.cpu.backend import CpuBackend
from ember.backends.cpu.compiler import CompileCache
from ember.codegen.cpu import CpuProgram, kernel_library_source, render_graph, tag_kernel_symbols
from ember.errors import BackendUnavailable, EmberError
from ember.ir.graph import Graph
from ember.ir.types import TensorType
from ember.target import Target, get_target

AARCH64_CC = "aarch64-linux-gnu-gcc"
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")
QEMU = "qemu-aarch64"
# target feature -> the architecture level it needs (gcc's -march=<level>+<feature>)
AARCH64_FEATURES = {"dotprod": "armv8.2-a", "i8mm": "armv8.6-a"}
# features a feature brings along: i8mm builds at armv8.6-a, where dotprod is mandatory (from
# Armv8.4) and gcc turns it on, so an i8mm build also uses SDOT, needs a CPU with both, and says so
AARCH64_IMPLIED = {"i8mm": ("dotprod",)}
# the CPU qemu-aarch64 emulates: every feature a build may use (dotprod, i8mm)
QEMU_CPU = "max"
INSTALL_HINT = ("install it with `apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross "
                "libgomp1-arm64-cross qemu-user` (.ci/install does)")
HARNESS = Path(__file__).with_name("harness.c")


def parse_features(spec) -> tuple[str, ...]:
    """Target features from "dotprod,i8mm" (or a sequence), with those they imply
    (AARCH64_IMPLIED), in the order of AARCH64_FEATURES; EmberError naming an unknown one."""
    names = [f.strip().lstrip("+") for f in (spec.split(",") if isinstance(spec, str) else spec or ())]
    names = [f for f in names if f]
    for name in names:
        if name not in AARCH64_FEATURES:
            raise EmberError(f"cpu-aarch64: unknown target feature {name!r}; known: {', '.join(AARCH64_FEATURES)}")
    names += [implied for name in names for implied in AARCH64_IMPLIED.get(name, ())]
    return tuple(f for f in AARCH64_FEATURES if f in names)


def aarch64_flags(features=(), portable: bool = False) -> tuple[str, ...]:
    """The compiler flags of a build for these features (portable: no SIMD at all)."""
    if portable:
        if features:
            raise EmberError("cpu-aarch64: a portable build takes no target features")
        return ("-march=armv8-a+nosimd",)
    levels = [AARCH64_FEATURES[f] for f in parse_features(features)]
    level = max(levels, default="armv8-a")
    return ("-march=" + "+".join([level, *parse_features(features)]),)


def cross_problem() -> str | None:
    """Why this host cannot cross-compile for aarch64, or None."""
    if shutil.which(AARCH64_CC) is None:
        return f"no aarch64 cross compiler ({AARCH64_CC} not on PATH); {INSTALL_HINT}"
    if not any(AARCH64_SYSROOT.glob("lib/libgomp.so*")):
        return f"no OpenMP runtime for aarch64 ({AARCH64_SYSROOT}/lib/libgomp.so*); {INSTALL_HINT}"
    return None


def qemu_problem() -> str | None:
    """Why this host cannot run aarch64 programs under qemu-user, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not on PATH; {INSTALL_HINT}"
    return cross_problem()


class Aarch64Backend(CpuBackend):
    """The CPU backend's code built for aarch64. `compile` gives a QemuExecutable (running it
    needs qemu-aarch64); `kernel_library` builds, never loads; the artifact writer of target
    cpu-aarch64 takes the libraries as they are."""

    name = "cpu-aarch64"

    def __init__(self, features=(), portable: bool = False, threads: int | None = None, cache_dir=None):
        super().__init__(threads=threads or 4, isa="scalar", cache_dir=cache_dir)
        self.features = parse_features(features)
        self.portable = portable
        self.isa = "aarch64-portable" if portable else "aarch64"
        self.flags = aarch64_flags(self.features, portable)

    def __repr__(self) -> str:
        return f"<Aarch64Backend {self.flags[0]} threads={self.threads}>"

    @property
    def cache(self) -> CompileCache:
        if self._cache is None:
            self.require_available()
            self._cache = CompileCache(self.cache_dir, AARCH64_CC)
        return self._cache

    def available(self) -> tuple[bool, str]:
        why = cross_problem()
        return (False, why) if why else (True, "")

    def target(self) -> Target:
        return get_target("cpu-aarch64")

    def kernel_library(self) -> tuple[str, Path]:
        """(symbol tag, path) of the aarch64 kernel library: built (cached), not loaded."""
        source = kernel_library_source()
        tag = "k" + self.cache.key(source, self.flags)[:12]
        return tag, self.cache.build(tag_kernel_symbols(source, tag), self.flags, name="kernels")

    def compile(self, graph: Graph, **options) -> "QemuExecutable":
        """options: threads (overrides the backend's); kernel_library: "whole", the only form
        here (the graph links against kernel_library(), as an artifact's do)."""
        unknown = set(options) - {"threads", "kernel_library"}
        if unknown:
            raise EmberError(f"cpu-aarch64 backend: unknown compile options {sorted(unknown)}")
        if options.get("kernel_library", "whole") != "whole":
            raise EmberError("cpu-aarch64 backend: graphs link against the whole kernel library "
                             f"(kernel_library='whole'), not {options['kernel_library']!r}")
        self.require_available()
        self.require_supported(graph)
        program = render_graph(graph)
        tag, kernels = self.kernel_library()
        source = tag_kernel_symbols(program.source, tag)
        library = self.cache.build(source, self.flags, name=f"graph_{graph.name}")
        return QemuExecutable(graph, program, kernels, library, options.get("threads") or self.threads,
                              self.cache)


@functools.lru_cache(maxsize=None)
def _harness(cache_dir: Path) -> Path:
    """The harness program, cross-built (cached) and executable."""
    cache = CompileCache(cache_dir, AARCH64_CC)
    path = cache.build(HARNESS.read_text(), ("-march=armv8-a",), name="harness", program=True)
    path.chmod(0o755)
    return path


class QemuExecutable(Executable):
    """An aarch64 graph library run under qemu-aarch64 through the harness, one process per
    run. The constants are written to a temporary folder once (kept while the executable
    lives); inputs and outputs go through files of each run."""

    backend_name = "cpu-aarch64"

    def __init__(self, graph: Graph, program: CpuProgram, kernels: Path, library: Path, threads: int,
                 cache: CompileCache):
        self.graph = graph
        self.program = program
        self.threads = threads
        self.kernels_path = Path(kernels)
        self.library_path = Path(library)
        self.status_messages = program.status_messages
        self.planned_peak_bytes = program.plan.peak_bytes
        self.in_place_outputs = {}
        self._cache = cache
        self._declare_signature(program.graph.inputs,
                                [host_storage(TensorType(n.dtype, n.shape)) for n in program.graph.outputs])
        self._folder = Path(tempfile.mkdtemp(prefix="ember-qemu-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)
        self._const_lines = []
        for i, node in enumerate(program.constants):
            data = np.ascontiguousarray(graph.constant_data(node))
            path = self._folder / f"const{i}.bin"
            data.tofile(path)
            self._const_lines.append(f"const {path} {data.nbytes}")

    def __repr__(self) -> str:
        return f"<QemuExecutable {self.graph.name!r}: {self.program.n_kernels} kernels>"

    @property
    def source(self) -> str:
        return self.program.source

    def run(self, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[int, np.ndarray] | None = None) -> list[np.ndarray]:
        why = qemu_problem()
        if why:
            raise BackendUnavailable(f"cpu-aarch64 backend: cannot run graph {self.graph.name!r}: {why}")
        arrays = self._checked_inputs(inputs)
        results = self._checked_outputs(outputs or {}, arrays)
        with tempfile.TemporaryDirectory(dir=self._folder) as tmp:
            lines = [f"threads {self.threads}", f"arena {self.program.plan.peak_bytes}"]
            for i, a in enumerate(arrays):
                path = Path(tmp) / f"in{i}.bin"
                a.tofile(path)
                lines.append(f"in {path} {a.nbytes}")
            lines += self._const_lines
            lines += [f"out {Path(tmp) / f'out{k}.bin'} {r.nbytes}" for k, r in enumerate(results)]
            spec = Path(tmp) / "spec.txt"
            spec.write_text("\n".join(lines) + "\n")
            proc = subprocess.run([QEMU, "-cpu", QEMU_CPU, "-L", str(AARCH64_SYSROOT), str(_harness(self._cache.directory)),
                                   str(self.kernels_path), str(self.library_path), str(spec)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "passive"})
            status = _status(proc.stdout)
            if proc.returncode not in (0, 3) or status is None:
                raise EmberError(f"cpu-aarch64 backend: graph {self.graph.name!r}: the harness under "
                                 f"{QEMU} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            self._check_status(status)
            for k, r in enumerate(results):
                r.reshape(-1).view(np.uint8)[:] = np.fromfile(Path(tmp) / f"out{k}.bin", np.uint8)
        return results


def _status(stdout: str) -> int | None:
    for line in stdout.splitlines():
        if line.startswith("status "):
            return int(line.split()[1])
    return None
