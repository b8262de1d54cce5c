"""A model compiled for one backend with its KV cache: evaluates batches of tokens.

Each step runs the model's step graph (ember/models/common.py has the contract). Step graphs
are made reusable by fixed shapes: the KV length is padded up to a bucket and the padding is
masked; positions, cache slots and output rows are inputs. A step graph is built, optimized
and compiled once per (n_tokens, n_kv, n_outputs) and reused through the plan cache (graph
uids), so a decode step costs one lookup plus the kernels. Prompts run in micro-batches.

Models with Mamba-2 layers (mamba2, granitehybrid) also carry a recurrent state per layer
(conv_state.{il}, ssm_state.{il}, f32): zeros at reset, passed to each step and replaced by the
step's returned state. It is the state after the last evaluated token only, so it cannot be
truncated; `recurrent_state()` / `set_recurrent_state()` take and restore snapshots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ember.backends.base import Backend, Executable
from ember.errors import EmberError
from ember.models.common import Model
from ember.passes import PassContext, pipeline_for
from ember.runtime.plan_cache import UNKNOWN_UID, GraphVersion, PlanCache

PIPELINE_OF_BACKEND = {"cpu": "cpu", "opencl": "opencl-generic", "vulkan": "vulkan"}


@dataclass(frozen=True)
class SessionOptions:
    n_ctx: int = 2048
    ubatch: int = 512           # tokens per micro-batch of a prompt
    kv_bucket: int = 256        # the KV length is padded up to a multiple of this
    disabled_passes: frozenset = frozenset()
    reuse: bool = True          # False: build, optimize and compile the step graph every step
    plan_capacity: int = 16


@dataclass
class SessionStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    host_seconds: float = 0.0       # outside the compiled graph: lookups, inputs, cache copies
    run_seconds: float = 0.0        # inside the compiled graph (Executable.run)
    graph_builds: int = 0
    compile_seconds: float = 0.0


@dataclass
class _Step:
    version: GraphVersion
    executable: Executable
    feed: "_Feed | None" = None    # its input arrays, bound to the executable on first use


class _Feed:
    """The arrays one step graph runs on, made once per compiled step: the small inputs
    (rewritten in place every step), the caches' first n_kv rows, and the run itself; a
    backend that can bind arrays (CpuExecutable.bind) checks them once, so a decode step
    costs a few NumPy writes and one call."""

    def __init__(self, session: "Session", executable: Executable, T: int, n_kv: int, n_out: int):
        hp = session.model.hparams
        self.kpos = np.arange(n_kv, dtype=np.int32)
        self.inputs = {
            "tokens": np.zeros(T, np.int32),
            "pos": np.zeros(T, np.int32),
            "slots": np.zeros(T, np.int32),   # the cache row of a token is its position
            "out_ids": np.arange(T - n_out, T, dtype=np.int32),
            "mask": np.zeros((T, n_kv), np.float32),
        }
        if hp.uses_swa:
            self.inputs["mask_swa"] = np.zeros((T, n_kv), np.float32)
        self.window = hp.sliding_window if hp.uses_swa else 0
        # The updated caches are written where they lie when the backend can do it in place;
        # the others come back as outputs and are copied.
        in_place = executable.in_place_outputs
        self.targets, self.copies = {}, []
        for j, il in enumerate(session.attention_layers):
            for k, which, cache in ((1 + 2 * j, "k", session.k_cache[j]), (2 + 2 * j, "v", session.v_cache[j])):
                view = cache[:n_kv]
                self.inputs[f"{which}_cache.{il}"] = view
                if k in in_place:
                    self.targets[k] = view
                else:
                    self.copies.append((k, view))
        # Recurrent state: new arrays in and out every step (the session keeps snapshots).
        first = 1 + 2 * len(session.attention_layers)
        self.states = [(first + r, name) for r, name in enumerate(session._state)]
        self.inputs.update(session._state)
        self.fresh = (0,) + tuple(k for k, _ in self.states)
        bind = getattr(executable, "bind", None)
        if bind is not None:
            self._run = bind(self.inputs, self.targets)
        else:
            self._run = lambda fresh, inputs: executable.run({**self.inputs, **inputs}, self.targets)

    def run(self, state: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The step's outputs; logits and states in new arrays (a caller may keep old ones)."""
        return self._run(fresh=self.fresh, inputs=state)

    def set(self, chunk: np.ndarray, n_past: int) -> None:
        T = chunk.size
        pos = self.inputs["pos"]
        self.inputs["tokens"][:] = chunk
        pos[:] = np.arange(n_past, n_past + T, dtype=np.int32)
        self.inputs["slots"][:] = pos
        if T == 1:     # a decode step: two slices per mask
            for name, lo in (("mask", 0), ("mask_swa", n_past - self.window + 1)):
                if name in self.inputs:
                    row = self.inputs[name][0]
                    lo = max(lo, 0)
                    row[:lo] = -np.inf
                    row[lo:n_past + 1] = 0.0
                    row[n_past + 1:] = -np.inf
            return
        ahead = self.kpos[None, :] > pos[:, None]        # later positions and padding
        mask = self.inputs["mask"]
        mask.fill(0.0)
        mask[ahead] = -np.inf
        if self.window:
            swa = self.inputs["mask_swa"]
            swa.fill(0.0)
            swa[ahead | (pos[:, None] - self.kpos[None, :] >= self.window)] = -np.inf


class Session:
    def __init__(self, model: Model, backend: Backend, options: SessionOptions = SessionOptions()):
        backend.require_available()
        self.model, self.backend, self.options = model, backend, options
        hp = model.hparams
        self.n_ctx = min(options.n_ctx, hp.n_ctx_train) if hp.n_ctx_train else options.n_ctx
        # KV caches of the attention layers (every layer of a transformer), in layer order
        self.attention_layers = model.attention_layers
        self.k_cache = [np.zeros(model.cache_shape(self.n_ctx, "k"), np.float16) for _ in self.attention_layers]
        self.v_cache = [np.zeros(model.cache_shape(self.n_ctx, "v"), np.float16) for _ in self.attention_layers]
        self._state: dict[str, np.ndarray] = {}
        self._zero_recurrent_state()
        self.n_past = 0
        self.stats = SessionStats()
        self.last_eval_seconds = 0.0
        self.plans: PlanCache[_Step] = PlanCache(capacity=options.plan_capacity)
        self._versions: dict[tuple, GraphVersion] = {}
        self.pipeline = pipeline_for(PIPELINE_OF_BACKEND.get(backend.name, backend.name))

    # ---- public --------------------------------------------------------------------------
    def reset(self) -> None:
        self.n_past = 0
        self._zero_recurrent_state()

    def truncate(self, n_past: int) -> None:
        """Forget every position from n_past on (rows past n_past are masked from then on).
        A model with recurrent layers can only be truncated to 0 (a reset) or to where it is:
        restore a snapshot with set_recurrent_state(arrays, n_past) instead."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"truncate: {n_past} is outside [0, {self.n_past}]")
        if self._state and n_past not in (0, self.n_past):
            raise EmberError(f"truncate: {self.model.arch} has recurrent layers, whose state after "
                             f"position {n_past} is gone; restore a snapshot with "
                             "set_recurrent_state(arrays, n_past) instead")
        if n_past == 0:
            self._zero_recurrent_state()
        self.n_past = n_past

    @property
    def is_recurrent(self) -> bool:
        """Whether the model has recurrent (Mamba-2) layers."""
        return bool(self._state)

    def recurrent_state(self) -> dict[str, np.ndarray]:
        """The recurrent state after the last evaluated token: conv_state.{il} and ssm_state.{il}
        of every recurrent layer (empty for a transformer). The session never writes into these
        arrays (each step replaces them), so the dict is a snapshot as it stands; with the
        position (n_past) and the KV cache rows before it, it is all a checkpoint needs."""
        return dict(self._state)

    def set_recurrent_state(self, arrays: dict[str, np.ndarray], n_past: int | None = None) -> None:
        """Replace the recurrent state by arrays (as recurrent_state() returns them: every name,
        same shapes, f32; they are used as given, not copied, and never written into). With
        n_past, also move the position there (the KV cache rows past it are masked from then
        on), as restoring a checkpoint needs."""
        if set(arrays) != set(self._state):
            raise ValueError(f"set_recurrent_state: expected arrays {sorted(self._state)}, got {sorted(arrays)}")
        checked = {}
        for name, current in self._state.items():
            a = np.asarray(arrays[name])
            if a.shape != current.shape or a.dtype != current.dtype:
                raise ValueError(f"set_recurrent_state: {name} is {a.dtype}{list(a.shape)}, expected "
                                 f"{current.dtype}{list(current.shape)}")
            checked[name] = np.ascontiguousarray(a)
        if n_past is not None:
            if not 0 <= n_past <= self.n_ctx:
                raise ValueError(f"set_recurrent_state: n_past {n_past} is outside [0, {self.n_ctx}]")
            self.n_past = n_past
        self._state = checked

    def _zero_recurrent_state(self) -> None:
        self._state = {}
        for il in self.model.recurrent_layers:
            self._state[f"conv_state.{il}"] = np.zeros(self.model.state_shape("conv"), np.float32)
            self._state[f"ssm_state.{il}"] = np.zeros(self.model.state_shape("ssm"), np.float32)

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Run tokens after the current position. Returns logits f32[rows, n_vocab]: every
        token's row when all_logits, else only the last token's."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size == 0:
            raise ValueError("eval: no tokens")
        if self.n_past + tokens.size > self.n_ctx:
            raise EmberError(f"context full: {self.n_past} + {tokens.size} tokens > n_ctx {self.n_ctx}")
        vocab = self.model.hparams.n_vocab
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise EmberError(f"token id out of range [0, {vocab}): {int(tokens.max())}")
        start = time.perf_counter()
        compile_before = self.stats.compile_seconds
        pieces = []
        for begin in range(0, tokens.size, self.options.ubatch):
            chunk = tokens[begin:begin + self.options.ubatch]
            last = begin + chunk.size == tokens.size
            n_out = chunk.size if all_logits else (1 if last else 0)
            logits = self._step(chunk, n_out)
            if n_out:
                pieces.append(logits)
        # compiling a new step graph is reported on its own, not as evaluation time
        seconds = time.perf_counter() - start - (self.stats.compile_seconds - compile_before)
        self.last_eval_seconds = seconds
        if tokens.size == 1:
            self.stats.decode_tokens += 1
            self.stats.decode_seconds += seconds
        else:
            self.stats.prompt_tokens += tokens.size
            self.stats.prompt_seconds += seconds
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    # ---- one step ------------------------------------------------------------------------
    def _step(self, chunk: np.ndarray, n_out: int) -> np.ndarray:
        t0 = time.perf_counter()
        compile_before = self.stats.compile_seconds
        T = chunk.size
        end = self.n_past + T
        n_kv = min(self.n_ctx, -(-end // self.options.kv_bucket) * self.options.kv_bucket)
        step = self._plan(T, n_kv, n_out)
        if step.feed is None:
            step.feed = _Feed(self, step.executable, T, n_kv, n_out)
        feed = step.feed
        feed.set(chunk, self.n_past)
        t1 = time.perf_counter()
        outputs = feed.run(self._state)
        t2 = time.perf_counter()
        for k, cache in feed.copies:
            cache[...] = outputs[k]
        for k, name in feed.states:
            self._state[name] = outputs[k]
        self.n_past = end
        self.stats.host_seconds += (t1 - t0) + (time.perf_counter() - t2) - (self.stats.compile_seconds - compile_before)
        return outputs[0]

    def _plan(self, T: int, n_kv: int, n_out: int) -> _Step:
        key = (T, n_kv, n_out)
        if self.options.reuse and key in self._versions:
            return self.plans.get(self._versions[key], self._compile, key=key)
        start = time.perf_counter()
        graph = self.model.build_step(T, n_kv, n_out)
        self.stats.graph_builds += 1
        if not self.options.reuse:
            return self._compile(graph, GraphVersion(graph, UNKNOWN_UID), start)
        version = GraphVersion.of(graph)
        self._versions[key] = version
        return self.plans.get(version, lambda g: self._compile(g, version, start), key=key)

    def _compile(self, graph, version=None, start=None) -> _Step:
        start = start or time.perf_counter()
        with PassContext(disabled=self.options.disabled_passes):
            optimized = self.pipeline(graph)
        executable = self.backend.compile(optimized)
        self.stats.compile_seconds += time.perf_counter() - start
        return _Step(version, executable)
