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
from ember.runtime.session import PIPELINE_OF_BACKEND, Session, SessionOptions, _Step

FORMAT = "ember-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TARGETS = ("cpu",)
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
def compile_artifact(model, backend: CpuBackend, out_dir, n_ctx: int = DEFAULT_CTX,
                     prompt_tokens: int = DEFAULT_PROMPT_TOKENS, kv_bucket: int = 256,
                     disabled_passes=frozenset(), progress=None) -> dict:
    """Compile model's steps for backend into out_dir (replacing an artifact there); returns
    the manifest. progress(message), when given, hears about each step."""
    if backend.name not in TARGETS:
        raise ArtifactError(f"compile: target {backend.name!r} is not supported; targets: {', '.join(TARGETS)}")
    if getattr(backend, "profile", None):
        raise ArtifactError("compile: the backend renders profiling code; artifacts hold plain graphs")
    out = Path(out_dir)
    if out.exists() and not (out / MANIFEST).exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: exists and is not an ember artifact; not overwriting it")
    hp = model.hparams
    n_ctx = min(n_ctx, hp.n_ctx_train) if hp.n_ctx_train else n_ctx
    shapes = step_shapes(n_ctx, kv_bucket, prompt_tokens)
    pipeline = pipeline_for(PIPELINE_OF_BACKEND[backend.name])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "steps").mkdir()
        tag, kernels = backend.kernel_library()
        shutil.copyfile(kernels, tmp / "kernels.so")
        constants: dict[str, str] = {}
        steps = []
        for shape in shapes:
            start = time.perf_counter()
            with PassContext(disabled=frozenset(disabled_passes)):
                optimized = pipeline(model.build_step(*shape))
            executable = backend.compile(optimized)
            program = executable.program
            name = f"steps/{_shape_name(shape)}"
            (tmp / f"{name}.ir").write_text(print_ir(program.graph))
            (tmp / f"{name}.c").write_text(tag_kernel_symbols(program.source, tag))
            shutil.copyfile(executable.library_path, tmp / f"{name}.so")
            _save_derived_constants(model, program.graph, tmp, constants)
            steps.append({"n_tokens": shape[0], "n_kv": shape[1], "n_outputs": shape[2],
                          "graph": f"{name}.ir", "source": f"{name}.c", "library": f"{name}.so"})
            if progress:
                progress(f"compiled step {_shape_name(shape)} ({program.n_kernels} kernels) in "
                         f"{time.perf_counter() - start:.1f} s")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "ember_version": ember_version(),
            "target": backend.name,
            "isa": backend.isa,
            "host": host_cpu(),
            "model": {"file": Path(model.path).name, "path": str(Path(model.path).resolve()),
                      "size": Path(model.path).stat().st_size, "sha256": file_sha256(Path(model.path)),
                      "arch": model.arch},
            "n_ctx": n_ctx,
            "kv_bucket": kv_bucket,
            "prompt_tokens": prompt_tokens,
            "disabled_passes": sorted(disabled_passes),
            "kernel_library": {"file": "kernels.so", "tag": tag},
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


def _from_file(model, name: str, data: np.ndarray) -> bool:
    if name not in model.file:
        return False
    stored = model.file.tensor(name)
    return data is stored or (data.__array_interface__["data"][0] == stored.__array_interface__["data"][0]
                              and data.shape == stored.shape and data.dtype == stored.dtype)


def _save_derived_constants(model, graph, folder: Path, saved: dict[str, str]) -> None:
    """Write each constant the passes made (not a GGUF tensor) once, as .npy."""
    for name, data in graph.constants.items():
        if _from_file(model, name, data):
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
        if manifest["isa"] == "native" and manifest["host"] != host_cpu():
            raise ArtifactError(f"{path}: built with -march=native for {manifest['host']!r}; this host is "
                                f"{host_cpu()!r}: compile the model again here")
        for rel, digest in manifest["files"].items():
            file = folder / rel
            if not file.is_file():
                raise ArtifactError(f"{file}: missing: the artifact is incomplete")
            if file_sha256(file) != digest:
                raise ArtifactError(f"{file}: checksum mismatch: the artifact is corrupt")
        listed = set(manifest["files"])
        needed = [manifest["kernel_library"]["file"], *manifest["constants"].values()]
        needed += [s[k] for s in manifest["steps"] for k in ("graph", "source", "library")]
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: corrupt: malformed manifest ({e!r})") from None
    unlisted = [rel for rel in needed if rel not in listed]
    if unlisted:
        raise ArtifactError(f"{path}: corrupt: {unlisted[0]} has no checksum")
    return manifest


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
    info = manifest["model"]
    path = Path(model_path) if model_path else Path(info["path"])
    if not path.is_file():
        raise ArtifactError(f"{path}: model file not found (the artifact {folder} was compiled from "
                            f"{info['file']}); pass it with --model")
    if path.stat().st_size != info["size"] or file_sha256(path) != info["sha256"]:
        raise ArtifactError(f"{path}: not the model the artifact {folder} was compiled from "
                            f"({info['file']}, sha256 {info['sha256'][:16]}...)")
    model = load_model(path)
    backend = _PrebuiltCpuBackend(threads=threads, isa=manifest["isa"])
    library = manifest["kernel_library"]
    load_kernel_library(library["tag"], folder / library["file"])
    data = dict(model.file.tensors())
    for name, rel in manifest["constants"].items():
        data[name] = np.load(folder / rel, mmap_mode="r", allow_pickle=False)
    steps = {}
    for step in manifest["steps"]:
        graph_path = folder / step["graph"]
        graph = parse_ir(graph_path.read_text(), source=str(graph_path), constants=data)
        unknown = sorted(set(graph.constants) - set(data))
        if unknown:
            raise ArtifactError(f"{graph_path}: constant {unknown[0]!r} is neither in the model nor in "
                                "the artifact")
        program = render_graph(graph)
        source_path = folder / step["source"]
        if tag_kernel_symbols(program.source, library["tag"]) != source_path.read_text():
            raise ArtifactError(f"{source_path}: this ember renders {graph_path} differently (the "
                                "artifact comes from another code generator): compile the model again")
        key = (step["n_tokens"], step["n_kv"], step["n_outputs"])
        steps[key] = backend.load_executable(graph, program, folder / step["library"])
    options = SessionOptions(n_ctx=manifest["n_ctx"], kv_bucket=manifest["kv_bucket"],
                             disabled_passes=frozenset(manifest["disabled_passes"]))
    session = ArtifactSession(model, backend, options, steps, manifest["prompt_tokens"], folder)
    return model, session
