"""A model compiled for one backend with its KV cache: evaluates batches of tokens.

Each step runs the model's step graph (ember/models/common.py has the contract). Step graphs
are made reusable by fixed shapes: the KV length is padded up to a bucket and the padding is
masked; positions, cache slots and output rows are inputs. A step graph is built, optimized
and compiled once per (n_tokens, n_kv, n_outputs) and reused through the plan cache (graph
uids), so a decode step costs one lookup plus the kernels. Prompts run in micro-batches.
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


class Session:
    def __init__(self, model: Model, backend: Backend, options: SessionOptions = SessionOptions()):
        backend.require_available()
        self.model, self.backend, self.options = model, backend, options
        hp = model.hparams
        self.n_ctx = min(options.n_ctx, hp.n_ctx_train) if hp.n_ctx_train else options.n_ctx
        self.k_cache = [np.zeros(model.cache_shape(self.n_ctx, "k"), np.float16) for _ in range(hp.n_layer)]
        self.v_cache = [np.zeros(model.cache_shape(self.n_ctx, "v"), np.float16) for _ in range(hp.n_layer)]
        self.n_past = 0
        self.stats = SessionStats()
        self.last_eval_seconds = 0.0
        self.plans: PlanCache[_Step] = PlanCache(capacity=options.plan_capacity)
        self._versions: dict[tuple, GraphVersion] = {}
        self.pipeline = pipeline_for(PIPELINE_OF_BACKEND.get(backend.name, backend.name))

    # ---- public --------------------------------------------------------------------------
    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n_past: int) -> None:
        """Forget every position from n_past on (rows past n_past are masked from then on)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"truncate: {n_past} is outside [0, {self.n_past}]")
        self.n_past = n_past

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
        inputs = self._inputs(chunk, n_kv, n_out)
        hp = self.model.hparams
        # The updated caches are written where they lie when the backend can do it in place.
        in_place = step.executable.in_place_outputs
        targets = {}
        for il in range(hp.n_layer):
            for k, cache in ((1 + 2 * il, self.k_cache[il]), (2 + 2 * il, self.v_cache[il])):
                if k in in_place:
                    targets[k] = cache[:n_kv]
        t1 = time.perf_counter()
        outputs = step.executable.run(inputs, targets)
        t2 = time.perf_counter()
        self.stats.run_seconds += t2 - t1
        for il in range(hp.n_layer):
            for k, cache in ((1 + 2 * il, self.k_cache[il]), (2 + 2 * il, self.v_cache[il])):
                if k not in targets:
                    cache[:n_kv] = outputs[k]
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

    def _inputs(self, chunk: np.ndarray, n_kv: int, n_out: int) -> dict[str, np.ndarray]:
        T = chunk.size
        pos = np.arange(self.n_past, self.n_past + T, dtype=np.int32)
        kpos = np.arange(n_kv, dtype=np.int32)
        visible = kpos[None, :] <= pos[:, None]
        inputs = {
            "tokens": chunk,
            "pos": pos,
            "slots": pos.copy(),          # the cache row of a token is its position
            "out_ids": np.arange(T - n_out, T, dtype=np.int32),
            "mask": np.where(visible, 0.0, -np.inf).astype(np.float32),
        }
        hp = self.model.hparams
        if hp.uses_swa:
            in_window = pos[:, None] - kpos[None, :] < hp.sliding_window
            inputs["mask_swa"] = np.where(visible & in_window, 0.0, -np.inf).astype(np.float32)
        for il in range(hp.n_layer):
            inputs[f"k_cache.{il}"] = self.k_cache[il][:n_kv]
            inputs[f"v_cache.{il}"] = self.v_cache[il][:n_kv]
        return inputs
