"""Running an artifact: the session over its prebuilt step executables, the step shapes an
artifact holds, and the model and constants it runs with."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.artifact.format import ArtifactError, file_sha256
from ember.errors import EmberError
from ember.ir.parser import parse_ir
from ember.models import load_model
from ember.models.common import StateLayout
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.runtime.session import Session, SessionOptions, _Step


def kv_buckets(n_ctx: int, kv_bucket: int) -> list[int]:
    """The KV lengths a session of n_ctx pads to (as Session._step does)."""
    return sorted({min(n_ctx, b) for b in range(kv_bucket, n_ctx + kv_bucket, kv_bucket)})


def verify_tokens(draft_max: int) -> list[int]:
    """Tokens of the verify steps an artifact compiled for speculation with up to draft_max
    drafts holds: 1 + d for d = 1, 2, 4, ... below draft_max, and 1 + draft_max. A verify batch
    runs in the smallest that fits, padded (as token_bucket pads a session's prompt steps), so
    a short batch computes at most about twice its rows, and the steps per KV bucket grow with
    log2(draft_max) rather than draft_max (8: 2, 3, 5 and 9 tokens)."""
    sizes, d = {1 + draft_max}, 1
    while d < draft_max:
        sizes.add(1 + d)
        d *= 2
    return sorted(sizes)


def step_shapes(n_ctx: int, kv_bucket: int, prompt_tokens: int,
                draft_max: int = 0) -> list[tuple[int, int, int]]:
    """(n_tokens, n_kv, n_outputs) of every step compiled into an artifact: per KV bucket the
    decode step, a prompt step and, with draft_max (compiled for speculation), the verify steps,
    which give logits for every row."""
    shapes = []
    for n_kv in kv_buckets(n_ctx, kv_bucket):
        shapes.append((1, n_kv, 1))
        if 1 < prompt_tokens <= n_kv:
            shapes.append((prompt_tokens, n_kv, 1))
        shapes += [(T, n_kv, T) for T in (verify_tokens(draft_max) if draft_max else ()) if T <= n_kv]
    return shapes


def step_states(shape: tuple[int, int, int], state_planes: int) -> StateLayout:
    """How a step of an artifact keeps recurrent state: state_planes planes in every step (the
    manifest's, 1 without speculation); a verify step (several output rows) writes the state
    after every token, so a speculative round keeps any accepted prefix by an index move."""
    return StateLayout(state_planes, all_states=shape[2] > 1)


def shape_name(shape: tuple[int, int, int]) -> str:
    return "t{}_kv{}_o{}".format(*shape)


def step_key(step: dict) -> tuple[int, int, int]:
    """(n_tokens, n_kv, n_outputs) of a manifest's step entry."""
    return step["n_tokens"], step["n_kv"], step["n_outputs"]


class ArtifactSession(Session):
    """A Session over an artifact's executables. A prompt runs as prompt steps, then single
    tokens. Every row's logits (all_logits: a speculative verify batch) come from a verify step
    when the artifact was compiled for speculation (the manifest's `spec`: draft_max, the
    verify steps' tokens, the recurrent state planes every step keeps), else from single-token
    steps. A recurrent artifact without verify steps has one state plane, so it speculates with
    --spec-rollback redecode (host checkpoints) only."""

    def __init__(self, model, backend, options: SessionOptions, steps: dict, prompt_tokens: int, folder: Path,
                 spec: dict | None = None):
        super().__init__(model, backend, options)
        # the session's own step records (no graph version: the plan cache is not used)
        self._prebuilt = {key: _Step(None, exe) for key, exe in steps.items()}
        self.shapes = sorted(steps)      # (n_tokens, n_kv, n_outputs) of each compiled step
        self.prompt_tokens = prompt_tokens
        self.folder = folder
        spec = spec or {}
        self.draft_max = int(spec.get("draft_max", 0))        # 0: compiled without --spec
        self.verify_tokens = sorted(int(t) for t in spec.get("verify_tokens", ()))
        planes = int(spec.get("state_planes", 1))
        if self.is_recurrent and planes > 1:
            self._allocate_planes(planes)          # the planes every compiled step takes

    def prepare_speculation(self, draft_max: int, rollback: str) -> None:
        """Refuse, in one line, speculation the compiled steps cannot run."""
        if self.draft_max and draft_max > self.draft_max:
            raise ArtifactError(f"{self.folder}: compiled for speculation with --draft-max {self.draft_max} "
                                f"at most, not {draft_max}: pass a smaller --draft-max, or compile it "
                                f"again with --spec --draft-max {draft_max}")
        if self.is_recurrent and rollback == "states" and not self.draft_max:
            raise ArtifactError(f"{self.folder}: compiled without --spec, its steps keep one recurrent state "
                                "plane, too few to keep a verify batch's states: compile it with --spec, "
                                "or use --spec-rollback redecode")

    def reserve_state_planes(self, planes: int) -> None:
        """The compiled steps take the planes they were compiled for: more is a one-line error."""
        if self.is_recurrent and planes > self.state_planes:
            raise ArtifactError(f"{self.folder}: its steps keep {self.state_planes} recurrent state "
                                f"plane(s), not {planes}: compile it with --spec --draft-max {max(1, planes - 2)}")

    def verify_rows(self, n: int) -> int | None:
        """The tokens of the verify step a batch of n tokens runs in (padded up to them) at the
        current position, or None (no verify steps, n too many, or the padding would pass the
        context: then single-token steps)."""
        for T in self.verify_tokens:
            if T >= n and self.n_past + T <= self.n_ctx:
                return T
        return None

    def eval(self, tokens, all_logits: bool = False, keep_states: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size <= 1:
            return super().eval(tokens, all_logits, keep_states)
        if self.n_past + tokens.size > self.n_ctx:
            raise EmberError(f"context full: {self.n_past} + {tokens.size} tokens > n_ctx {self.n_ctx} "
                             f"(the artifact {self.folder} was compiled for {self.n_ctx})")
        if all_logits and self.verify_rows(tokens.size):
            # one verify step; a recurrent model's verify steps keep the state after every token
            return super().eval(tokens, all_logits=True, keep_states=self.is_recurrent)
        s = self.stats
        before = (s.prompt_tokens, s.prompt_seconds, s.decode_tokens, s.decode_seconds)
        seconds, rows, i = 0.0, [], 0
        while i < tokens.size:
            # a prompt step keeps one state: states kept per token come from single-token steps
            whole = not all_logits and not keep_states and tokens.size - i >= self.prompt_tokens
            take = self.prompt_tokens if whole else 1
            rows.append(super().eval(tokens[i:i + take], all_logits, keep_states))
            seconds += self.last_eval_seconds
            i += take
        # the pieces count as one prompt evaluation, not as decode steps
        s.prompt_tokens, s.prompt_seconds, s.decode_tokens, s.decode_seconds = before
        s.prompt_tokens += tokens.size
        s.prompt_seconds += seconds
        self.last_eval_seconds = seconds
        return np.concatenate(rows) if all_logits else rows[-1]

    def _shape(self, n: int, n_out: int) -> tuple[int, int]:
        if n_out > 1:
            T = self.verify_rows(n)
            if T is not None:
                return T, T
        return n, n_out

    def _plan(self, T: int, n_kv: int, n_out: int):
        step = self._prebuilt.get((T, n_kv, n_out))     # the artifact has one cache type
        if step is not None and self.is_recurrent and T > 1 and self._layout.all_states != (n_out > 1):
            step = None                  # its states are kept otherwise (step_states)
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
    return ArtifactSession(model, backend, options, steps, manifest["prompt_tokens"], folder,
                           manifest.get("spec"))
