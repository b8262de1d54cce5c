"""Running an artifact: the session over its prebuilt step executables, the step shapes an
artifact holds, and the model and constants it runs with."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.artifact.format import ArtifactError, file_sha256
from ember.errors import EmberError
from ember.ir.parser import parse_ir
from ember.models import load_model
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.runtime.session import Session, SessionOptions, _Step


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


def shape_name(shape: tuple[int, int, int]) -> str:
    return "t{}_kv{}_o{}".format(*shape)


def step_key(step: dict) -> tuple[int, int, int]:
    """(n_tokens, n_kv, n_outputs) of a manifest's step entry."""
    return step["n_tokens"], step["n_kv"], step["n_outputs"]


class ArtifactSession(Session):
    """A Session over an artifact's executables. A prompt runs as prompt steps, then single
    tokens; every row's logits (all_logits) come from single-token steps. Its steps were
    compiled for one recurrent state plane, so a recurrent artifact speculates with
    --spec-rollback redecode (host checkpoints) only."""

    fixed_state_planes = True

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
        step = self._prebuilt.get((T, n_kv, n_out))     # the artifact has one cache type
        if step is None:
            shapes = ", ".join(shape_name(k) for k in self.shapes)
            raise ArtifactError(f"{self.folder}: no compiled step for {T} tokens over {n_kv} KV rows "
                                f"with {n_out} outputs (it has {shapes})")
        return step


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
        data[name] = load_array(folder / rel)
    return model, data


def load_array(path: Path) -> np.ndarray:
    """A stored array, memory-mapped; a file that is not a plain .npy array (pickled objects,
    a damaged header) is an ArtifactError naming it, never a NumPy traceback."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{path}: corrupt: not a NumPy array file ({reason})") from None


def step_graph(folder: Path, step: dict, data: dict):
    """A step's stored graph, parsed, its constants bound to data."""
    graph_path = folder / step["graph"]
    try:
        text = graph_path.read_text()
    except UnicodeDecodeError:
        raise ArtifactError(f"{graph_path}: corrupt: not IR text") from None
    graph = parse_ir(text, source=str(graph_path), constants=data)
    unknown = sorted(set(graph.constants) - set(data))
    if unknown:
        raise ArtifactError(f"{graph_path}: constant {unknown[0]!r} is neither in the model nor in "
                            "the artifact")
    return graph


def cache_types(manifest: dict) -> KVCacheTypes:
    """The KV cache types an artifact was compiled for (f16/f16 when the manifest names none)."""
    entry = manifest.get("kv_cache")
    return F16_CACHE if entry is None else KVCacheTypes.from_manifest(entry)


def check_cache_request(folder: Path, manifest: dict, requested: dict) -> None:
    """ArtifactError (one line) when a requested cache setting ("k", "v": type names,
    "rotation": bool; None or absent: as the artifact) differs from the artifact's: its step
    graphs were compiled for its types, and a run never compiles."""
    have = cache_types(manifest).manifest()
    for key, want in requested.items():
        if want is not None and want != have[key]:
            what = {"k": "K cache type", "v": "V cache type", "rotation": "cache rotation"}[key]
            said = {True: "on", False: "off"} if key == "rotation" else {}
            raise ArtifactError(f"{folder}: the artifact was compiled with {what} "
                                f"{said.get(have[key], have[key])}, not {said.get(want, want)}; "
                                "compile it again with the cache settings you want")


def artifact_session(folder: Path, manifest: dict, model, backend, steps: dict) -> ArtifactSession:
    # An artifact has exactly its compiled step shapes, built by model.build_step(T, n_kv,
    # n_out, cache=...): a prompt step is never padded, and sliding-window layers keep the whole
    # context.
    options = SessionOptions(n_ctx=manifest["n_ctx"], kv_bucket=manifest["kv_bucket"],
                             disabled_passes=frozenset(manifest["disabled_passes"]),
                             pad_tokens=False, swa_full=True, cache=cache_types(manifest))
    return ArtifactSession(model, backend, options, steps, manifest["prompt_tokens"], folder)
