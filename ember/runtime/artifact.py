"""Compiled artifacts: a model's step graphs compiled once for a target, kept in a folder, and
run later without the passes or the C compiler (the GGUF still supplies the weights).

    DIR/manifest.json          format and its version, ember's version, the target and host, the
                               model (file name, path, size, sha256), the context, the compiled
                               step shapes, the kernel library's symbol tag, the constants the
                               passes made, and the sha256 of every other file
    DIR/kernels.so             the matmul kernel library every step library links against
    DIR/steps/<shape>.ir       an optimized step graph, as rendered (IR text)
    DIR/steps/<shape>.c        its C source (symbols tagged for kernels.so)
    DIR/steps/<shape>.so       the library built from that source
    DIR/constants/<n>.npy      constants the passes made (fused Q+K, gate+up), not in the GGUF

Shapes: for each KV bucket of the context, the decode step (1 token) and one prompt step
(`prompt_tokens`, default 32), each with one output row. `ArtifactSession` cuts a prompt into
prompt steps and single tokens; any other shape is an error, never a compile.

Loading checks every file against its sha256, renders each graph again (no passes, no compiler;
~0.1 s) and requires the stored source byte for byte, so a library only ever runs with the
program it was built from. The folder is written under a temporary name and renamed into place.

The GPU targets (opencl-generic, opencl-adreno, vulkan) share the manifest, the steps, the
constants, the checksums and the atomic replacement with the CPU; what they store per step
instead of C and libraries is described in ember/runtime/artifact_gpu.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from ember.backends.cpu.backend import CpuBackend, load_kernel_library
from ember.codegen.cpu import render_graph, tag_kernel_symbols
from ember.errors import EmberError
from ember.ir.parser import parse_ir
from ember.ir.printer import print_ir
from ember.models import load_model
from ember.passes import PassContext, pipeline_for
from ember.runtime.session import Session, SessionOptions, _Step

FORMAT = "ember-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TARGETS = ("cpu", "opencl-generic", "opencl-adreno", "vulkan")
GPU_TARGETS = TARGETS[1:]
DEFAULT_CTX = 256
DEFAULT_PROMPT_TOKENS = 32


class ArtifactError(EmberError):
    """An artifact that cannot be used: missing, incomplete, corrupt or for another version/host."""


def ember_version() -> str:
    try:
        return metadata.version("ember")
    except metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def host_cpu() -> str:
    """The CPU this host runs on (code built with -march=native is only run on the same model)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{platform.machine()} {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.machine() or "unknown"


def kv_buckets(n_ctx: int, kv_bucket: int) -> list[int]:
    """The KV lengths a session of n_ctx pads to (as Session._step does)."""
    return sorted({min(n_ctx, b) for b in range(kv_bucket, n_ctx + kv_bucket, kv_bucket)})


def step_shapes(n_ctx: int, kv_bucket: int, prompt_tokens: int) -> list[tuple[int, int, int]]:
    """(n_tokens, n_kv, n_outputs) of every step compiled into an artifact."""
    shapes = []
    for n_kv in kv_buckets(n_ctx, kv_bucket):
        shapes.append((1, n_kv, 1))
        if 1 < prompt_tokens <= n_kv:
            shapes.append((prompt_tokens, n_kv, 1))
    return shapes


def _shape_name(shape: tuple[int, int, int]) -> str:
    return "t{}_kv{}_o{}".format(*shape)


# ---- writing -----------------------------------------------------------------------------------
def compile_artifact(model, backend, out_dir, n_ctx: int = DEFAULT_CTX,
                     prompt_tokens: int = DEFAULT_PROMPT_TOKENS, kv_bucket: int = 256,
                     disabled_passes=frozenset(), progress=None, **target_options) -> dict:
    """Compile model's steps into out_dir (replacing an artifact there); returns the manifest.
    backend: a CpuBackend, or a target name of TARGETS (the GPU targets make their own backend;
    target_options go to it, see ember.runtime.artifact_gpu). progress(message), when given,
    hears about each step."""
    target = backend if isinstance(backend, str) else backend.name
    if target not in TARGETS:
        raise ArtifactError(f"compile: target {target!r} is not supported; targets: {', '.join(TARGETS)}")
    if target in GPU_TARGETS:
        from ember.runtime.artifact_gpu import gpu_writer
        writer = gpu_writer(target, progress=progress, **target_options)
    else:
        if target_options:
            raise ArtifactError(f"compile: target cpu takes no options {sorted(target_options)}")
        writer = _CpuWriter(CpuBackend() if isinstance(backend, str) else backend)
    out = Path(out_dir)
    if out.exists() and not (out / MANIFEST).exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: exists and is not an ember artifact; not overwriting it")
    hp = model.hparams
    n_ctx = min(n_ctx, hp.n_ctx_train) if hp.n_ctx_train else n_ctx
    shapes = step_shapes(n_ctx, kv_bucket, prompt_tokens)
    pipeline = pipeline_for(writer.pipeline)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "steps").mkdir()
        fields = writer.begin(tmp)
        constants: dict[str, str] = {}
        steps = []
        for shape in shapes:
            start = time.perf_counter()
            with PassContext(disabled=frozenset(disabled_passes)):
                optimized = pipeline(model.build_step(*shape))
            name = f"steps/{_shape_name(shape)}"
            # graph: the step as the target compiled it (the renderer may have dropped dead nodes);
            # stored_as: constants the target keeps in a form of its own (Adreno SoA weights),
            # whose plain copy this step does not need
            entry, n_kernels, graph, stored_as = writer.step(tmp, name, optimized)
            (tmp / f"{name}.ir").write_text(print_ir(graph))
            _save_derived_constants(model, graph, tmp, constants, skip=stored_as)
            steps.append({"n_tokens": shape[0], "n_kv": shape[1], "n_outputs": shape[2],
                          "graph": f"{name}.ir", **entry})
            if progress:
                progress(f"compiled step {_shape_name(shape)} ({n_kernels} kernels) in "
                         f"{time.perf_counter() - start:.1f} s")
        fields.update(writer.finish(tmp))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ember_version": ember_version(),
            "target": target,
            **fields,
            "model": {"file": Path(model.path).name, "path": str(Path(model.path).resolve()),
                      "size": Path(model.path).stat().st_size, "sha256": file_sha256(Path(model.path)),
                      "arch": model.arch},
            "n_ctx": n_ctx,
            "kv_bucket": kv_bucket,
            "prompt_tokens": prompt_tokens,
            "disabled_passes": sorted(disabled_passes),
            "steps": steps,
            "constants": constants,
            "files": {f: file_sha256(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class _CpuWriter:
    """The CPU part of an artifact: kernels.so, and per step its C source and library.

    A target's writer (this one; the GPU ones in artifact_gpu) has: `pipeline` (the pass
    pipeline's name); begin(tmp) -> manifest fields; step(tmp, name, graph) -> (step entry
    fields, kernel count, the graph as compiled, names of constants stored in a form of the
    target's own); finish(tmp) -> more manifest fields."""
    pipeline = "cpu"

    def __init__(self, backend: CpuBackend):
        if backend.profile:
            raise ArtifactError("compile: the backend renders profiling code; artifacts hold plain graphs")
        self.backend = backend

    def begin(self, tmp: Path) -> dict:
        self.tag, kernels = self.backend.kernel_library()
        shutil.copyfile(kernels, tmp / "kernels.so")
        return {"isa": self.backend.isa, "host": host_cpu(),
                "kernel_library": {"file": "kernels.so", "tag": self.tag}}

    def step(self, tmp: Path, name: str, graph) -> tuple[dict, int, object, set]:
        executable = self.backend.compile(graph)
        program = executable.program
        (tmp / f"{name}.c").write_text(tag_kernel_symbols(program.source, self.tag))
        shutil.copyfile(executable.library_path, tmp / f"{name}.so")
        return {"source": f"{name}.c", "library": f"{name}.so"}, program.n_kernels, program.graph, set()

    def finish(self, tmp: Path) -> dict:
        return {}


def _from_file(model, name: str, data: np.ndarray) -> bool:
    if name not in model.file:
        return False
    stored = model.file.tensor(name)
    return data is stored or (data.__array_interface__["data"][0] == stored.__array_interface__["data"][0]
                              and data.shape == stored.shape and data.dtype == stored.dtype)


def _save_derived_constants(model, graph, folder: Path, saved: dict[str, str], skip=frozenset()) -> None:
    """Write each constant the passes made (not a GGUF tensor) once, as .npy; not those in skip."""
    for name, data in graph.constants.items():
        if name in skip or _from_file(model, name, data):
            continue
        if name in saved:
            if not np.array_equal(np.load(folder / saved[name], mmap_mode="r"), data):
                raise ArtifactError(f"compile: constant {name!r} differs between step graphs")
            continue
        rel = f"constants/{len(saved):03d}.npy"
        (folder / "constants").mkdir(exist_ok=True)
        np.save(folder / rel, np.ascontiguousarray(data), allow_pickle=False)
        saved[name] = rel


def _replace_folder(new: Path, out: Path) -> None:
    """Put new at out; an artifact already there is swapped out, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "artifact")
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- reading -----------------------------------------------------------------------------------
def read_manifest(folder) -> dict:
    """The manifest, after checking the format, the versions, the host and every file's sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: {folder} is not an ember artifact, or an incomplete one")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an ember artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')!r}; this "
                            f"ember reads version {FORMAT_VERSION}: compile the model again")
    if manifest.get("ember_version") != ember_version():
        raise ArtifactError(f"{path}: built by ember {manifest.get('ember_version')!r}, this is ember "
                            f"{ember_version()}: compile the model again")
    try:
        if manifest["target"] not in TARGETS:
            raise ArtifactError(f"{path}: target {manifest['target']!r} is not supported here")
        if manifest["target"] == "cpu" and manifest["isa"] == "native" and manifest["host"] != host_cpu():
            raise ArtifactError(f"{path}: built with -march=native for {manifest['host']!r}; this host is "
                                f"{host_cpu()!r}: compile the model again here")
        for rel, digest in manifest["files"].items():
            file = folder / rel
            if not file.is_file():
                raise ArtifactError(f"{file}: missing: the artifact is incomplete")
            if file_sha256(file) != digest:
                raise ArtifactError(f"{file}: checksum mismatch: the artifact is corrupt")
        listed = set(manifest["files"])
        needed = _needed_files(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: corrupt: malformed manifest ({e!r})") from None
    unlisted = [rel for rel in needed if rel not in listed]
    if unlisted:
        raise ArtifactError(f"{path}: corrupt: {unlisted[0]} has no checksum")
    return manifest


# Keys of a step entry that name a file, or a list of files, of the artifact (which ones a step
# has depends on the target).
STEP_FILE_KEYS = ("graph", "source", "library", "plan", "binary")
STEP_FILE_LISTS = ("shaders", "aux")


def _needed_files(manifest: dict) -> list[str]:
    """Every file the manifest refers to (each must have a checksum)."""
    needed = [*manifest["constants"].values()]
    needed += [s[k] for s in manifest["steps"] for k in STEP_FILE_KEYS if k in s]
    needed += [f for s in manifest["steps"] for k in STEP_FILE_LISTS for f in s.get(k, [])]
    if manifest["target"] == "cpu":
        needed.append(manifest["kernel_library"]["file"])
    for weight in manifest.get("relaid_weights", {}).values():
        needed += [weight["q"], weight["d"]]
    return needed


class _PrebuiltCpuBackend(CpuBackend):
    """The CPU backend for running an artifact's libraries: needs no C compiler, compiles nothing."""

    def available(self) -> tuple[bool, str]:
        return True, ""

    def compile(self, graph, **options):
        raise ArtifactError(f"graph {graph.name!r}: an artifact session does not compile")


class ArtifactSession(Session):
    """A Session over an artifact's executables. A prompt runs as prompt steps, then single
    tokens; every row's logits (all_logits) come from single-token steps."""

    def __init__(self, model, backend, options: SessionOptions, steps: dict, prompt_tokens: int, folder: Path):
        super().__init__(model, backend, options)
        # the session's own step records (no graph version: the plan cache is not used)
        self._prebuilt = {key: _Step(None, exe) for key, exe in steps.items()}
        self.shapes = sorted(steps)      # (n_tokens, n_kv, n_outputs) of each compiled step
        self.prompt_tokens = prompt_tokens
        self.folder = folder

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size <= 1:
            return super().eval(tokens, all_logits)
        if self.n_past + tokens.size > self.n_ctx:
            raise EmberError(f"context full: {self.n_past} + {tokens.size} tokens > n_ctx {self.n_ctx} "
                             f"(the artifact {self.folder} was compiled for {self.n_ctx})")
        s = self.stats
        before = (s.prompt_tokens, s.prompt_seconds, s.decode_tokens, s.decode_seconds)
        seconds, rows, i = 0.0, [], 0
        while i < tokens.size:
            take = self.prompt_tokens if not all_logits and tokens.size - i >= self.prompt_tokens else 1
            rows.append(super().eval(tokens[i:i + take], all_logits))
            seconds += self.last_eval_seconds
            i += take
        # the pieces count as one prompt evaluation, not as decode steps
        s.prompt_tokens, s.prompt_seconds, s.decode_tokens, s.decode_seconds = before
        s.prompt_tokens += tokens.size
        s.prompt_seconds += seconds
        self.last_eval_seconds = seconds
        return np.concatenate(rows) if all_logits else rows[-1]

    def _plan(self, T: int, n_kv: int, n_out: int):
        step = self._prebuilt.get((T, n_kv, n_out))
        if step is None:
            shapes = ", ".join(_shape_name(k) for k in self.shapes)
            raise ArtifactError(f"{self.folder}: no compiled step for {T} tokens over {n_kv} KV rows "
                                f"with {n_out} outputs (it has {shapes})")
        return step


def load_artifact(folder, model_path=None, threads: int | None = None):
    """(model, session) from an artifact folder; the model from model_path or the manifest's
    path, checked against the manifest's sha256."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["target"] in GPU_TARGETS:
        from ember.runtime.artifact_gpu import load_gpu_artifact
        return load_gpu_artifact(folder, manifest, model_path)
    model, data = open_model(folder, manifest, model_path)
    backend = _PrebuiltCpuBackend(threads=threads, isa=manifest["isa"])
    library = manifest["kernel_library"]
    load_kernel_library(library["tag"], folder / library["file"])
    steps = {}
    for step in manifest["steps"]:
        graph_path = folder / step["graph"]
        graph = step_graph(folder, step, data)
        program = render_graph(graph)
        source_path = folder / step["source"]
        if tag_kernel_symbols(program.source, library["tag"]) != source_path.read_text():
            raise ArtifactError(f"{source_path}: this ember renders {graph_path} differently (the "
                                "artifact comes from another code generator): compile the model again")
        key = (step["n_tokens"], step["n_kv"], step["n_outputs"])
        steps[key] = backend.load_executable(graph, program, folder / step["library"])
    return model, artifact_session(folder, manifest, model, backend, steps)


def open_model(folder: Path, manifest: dict, model_path=None):
    """(model, constants by name: the GGUF's tensors and the artifact's own) of an artifact; the
    model from model_path or the manifest's path, checked against the manifest's sha256."""
    info = manifest["model"]
    path = Path(model_path) if model_path else Path(info["path"])
    if not path.is_file():
        raise ArtifactError(f"{path}: model file not found (the artifact {folder} was compiled from "
                            f"{info['file']}); pass it with --model")
    if path.stat().st_size != info["size"] or file_sha256(path) != info["sha256"]:
        raise ArtifactError(f"{path}: not the model the artifact {folder} was compiled from "
                            f"({info['file']}, sha256 {info['sha256'][:16]}...)")
    model = load_model(path)
    data = dict(model.file.tensors())
    for name, rel in manifest["constants"].items():
        data[name] = np.load(folder / rel, mmap_mode="r", allow_pickle=False)
    return model, data


def step_graph(folder: Path, step: dict, data: dict):
    """A step's stored graph, parsed, its constants bound to data."""
    graph_path = folder / step["graph"]
    graph = parse_ir(graph_path.read_text(), source=str(graph_path), constants=data)
    unknown = sorted(set(graph.constants) - set(data))
    if unknown:
        raise ArtifactError(f"{graph_path}: constant {unknown[0]!r} is neither in the model nor in "
                            "the artifact")
    return graph


def artifact_session(folder: Path, manifest: dict, model, backend, steps: dict) -> "ArtifactSession":
    # An artifact has exactly its compiled step shapes, built by model.build_step(T, n_kv,
    # n_out): a prompt step is never padded, and sliding-window layers keep the whole context.
    options = SessionOptions(n_ctx=manifest["n_ctx"], kv_bucket=manifest["kv_bucket"],
                             disabled_passes=frozenset(manifest["disabled_passes"]),
                             pad_tokens=False, swa_full=True)
    return ArtifactSession(model, backend, options, steps, manifest["prompt_tokens"], folder)
