"""The cpu target's artifacts: what a step stores and how it is loaded.

    DIR/kernels.so             the matmul kernel library every step library links against
    DIR/steps/<shape>.c        a step's C source (symbols tagged for kernels.so)
    DIR/steps/<shape>.so       the library built from that source
    DIR/ember-run              with option runtime: the native runtime (ember.artifact.native),
                               which runs the artifact without Python
    DIR/.ember-run-verified    written by ember-run: the files it found to match their checksums,
                               as they were then on disk (ember/artifact/native/verified.c)

Loading renders each stored graph again (no passes, no compiler; ~0.1 s) and requires the
stored source byte for byte, so a library only ever runs with the program it was built from.
Libraries built with -march=native run only on the CPU model they were built on.

Target cpu-aarch64 writes the same folder with libraries cross-compiled for aarch64 Linux
(ember.backends.cpu.cross); the manifest records `isa: aarch64` and the target `features`
(dotprod, i8mm). Such an artifact loads in Python only on an aarch64 machine whose CPU has those
features; elsewhere the loader says it needs the native runtime or an aarch64 machine.
"""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

from ember.artifact.format import MANIFEST, ArtifactError, host_cpu
from ember.artifact.native import RUNTIME_FILE, build_runtime, step_abi
from ember.artifact.probe import probe_libraries
from ember.artifact.session import artifact_session, open_model, step_graph, step_key
from ember.backends.cpu.backend import CpuBackend, load_kernel_library
from ember.codegen.cpu import render_graph, tag_kernel_symbols
from ember.errors import EmberError


class Writer:
    """Writes kernels.so, and per step its C source and library.

    A target's writer (this one; ember/artifact/opencl.py and vulkan.py) has: `layout` (the
    layout pass its pipeline ends with, or None for the target's default); begin(tmp) ->
    manifest fields; supports_op(node) -> (ok, why) (asked before anything is compiled, e.g.
    of a KV cache's types); step(tmp, name, graph) -> (step entry fields, kernel count, the
    graph as compiled, names of constants stored in a form of the target's own); finish(tmp) ->
    more manifest fields. `native`: whether its steps carry what the native runtime needs (their
    `abi`, and the manifest's `native` block)."""
    layout = None
    native = True

    def __init__(self, backend: CpuBackend, runtime: bool = False, runtime_cc: str | None = None):
        if backend.profile:
            raise ArtifactError("compile: the backend renders profiling code; artifacts hold plain graphs")
        self.backend = backend
        self.runtime = runtime
        self.runtime_cc = runtime_cc      # the compiler of ember-run (a cross compiler for aarch64)

    def supports_op(self, node) -> tuple[bool, str]:
        return self.backend.supports_op(node)

    def begin(self, tmp: Path) -> dict:
        self.tag, kernels = self.backend.kernel_library()
        shutil.copyfile(kernels, tmp / "kernels.so")
        return {"isa": self.backend.isa, "features": list(self.backend.features), "host": host_cpu(),
                "kernel_library": {"file": "kernels.so", "tag": self.tag}}

    def step(self, tmp: Path, name: str, graph) -> tuple[dict, int, object, set]:
        # linked against the one library of every weight type the artifact carries
        executable = self.backend.compile(graph, kernel_library="whole")
        program = executable.program
        (tmp / f"{name}.c").write_text(tag_kernel_symbols(program.source, self.tag))
        shutil.copyfile(executable.library_path, tmp / f"{name}.so")
        entry = {"source": f"{name}.c", "library": f"{name}.so", "abi": step_abi(program)}
        return entry, program.n_kernels, program.graph, set()

    def finish(self, tmp: Path) -> dict:
        if not self.runtime:
            return {}
        build_runtime(tmp / RUNTIME_FILE, cc=self.runtime_cc)
        return {"runtime": RUNTIME_FILE}


def writer(target: str, backend: CpuBackend | None = None, progress=None, **options) -> Writer:
    """options: runtime (bool): also build the native runtime `ember-run` into the artifact (for
    cpu-aarch64 with the cross compiler); cpu-aarch64 also takes features ("dotprod,i8mm")."""
    runtime = bool(options.pop("runtime", False))
    if target == "cpu-aarch64":
        from ember.backends.cpu.cross import AARCH64_CC, Aarch64Backend
        features = options.pop("features", None)
        if options:
            raise ArtifactError(f"compile: target cpu-aarch64 takes no options {sorted(options)}")
        if backend is None:
            backend = Aarch64Backend(features or ())
        elif features is not None and tuple(backend.features) != Aarch64Backend(features).features:
            raise ArtifactError(f"compile: the backend builds for features {list(backend.features)}, "
                                f"not {features!r}")
        backend.require_available()
        return Writer(backend, runtime=runtime, runtime_cc=AARCH64_CC)
    if options:
        raise ArtifactError(f"compile: target cpu takes no options {sorted(options)}")
    return Writer(backend or CpuBackend(), runtime=runtime)


def cpu_features() -> set[str]:
    """This aarch64 host's CPU features by the names of cpu-aarch64 (from /proc/cpuinfo)."""
    names = {"asimddp": "dotprod", "i8mm": "i8mm"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("Features"):
                return {names[f] for f in line.split(":", 1)[1].split() if f in names}
    except OSError:
        pass
    return set()


def check_host(manifest: dict, path: Path) -> None:
    if manifest["isa"].startswith("aarch64"):
        features = list(manifest.get("features", []))
        what = f"an aarch64 artifact (target features: {', '.join(features) or 'baseline NEON'})"
        if platform.machine() not in ("aarch64", "arm64"):
            raise ArtifactError(f"{path}: {what}: it runs on an aarch64 machine, or with ember's native "
                                f"runtime there, not in Python on this {platform.machine()} host")
        missing = [f for f in features if f not in cpu_features()]
        if missing:
            raise ArtifactError(f"{path}: {what}: this CPU lacks {', '.join(missing)}: compile again "
                                f"with fewer --cpu-features")
        return
    if manifest["isa"] == "native" and manifest["host"] != host_cpu():
        raise ArtifactError(f"{path}: built with -march=native for {manifest['host']!r}; this host is "
                            f"{host_cpu()!r}: compile the model again here")


def manifest_files(manifest: dict) -> list[str]:
    return [manifest["kernel_library"]["file"]]


class _PrebuiltCpuBackend(CpuBackend):
    """The CPU backend for running an artifact's libraries: needs no C compiler, compiles nothing."""

    def available(self) -> tuple[bool, str]:
        return True, ""

    def compile(self, graph, **options):
        raise ArtifactError(f"graph {graph.name!r}: an artifact session does not compile")


def load(folder: Path, manifest: dict, model_path=None, threads: int | None = None):
    model, data = open_model(folder, manifest, model_path)
    backend = _PrebuiltCpuBackend(threads=threads, isa="native" if manifest["isa"].startswith("aarch64")
                                  else manifest["isa"])
    library = manifest["kernel_library"]
    probe_libraries(folder / library["file"], [folder / step["library"] for step in manifest["steps"]])
    try:
        load_kernel_library(library["tag"], folder / library["file"], check=True)
    except EmberError as e:
        raise ArtifactError(str(e)) from None
    except OSError as e:
        raise ArtifactError(f"{folder / library['file']}: cannot be loaded: {e}") from None
    steps = {}
    for step in manifest["steps"]:
        graph_path = folder / step["graph"]
        graph = step_graph(folder, step, data)
        program = render_graph(graph)
        source_path = folder / step["source"]
        source = tag_kernel_symbols(program.source, library["tag"])
        if source.encode() != source_path.read_bytes():
            raise ArtifactError(f"{source_path}: this ember renders {graph_path} differently (the "
                                "artifact comes from another code generator): compile the model again")
        try:
            steps[step_key(step)] = backend.load_executable(graph, program, folder / step["library"], source)
        except EmberError as e:
            raise ArtifactError(f"{folder / MANIFEST}: step {step_key(step)}: {e}") from None
        except OSError as e:       # the dynamic loader refused the library
            raise ArtifactError(f"{folder / step['library']}: cannot be loaded: {e}") from None
    return model, artifact_session(folder, manifest, model, backend, steps)
