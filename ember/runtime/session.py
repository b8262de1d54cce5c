"""A model compiled for one backend with its KV cache: evaluates batches of tokens.

Each step runs the model's step graph (ember/models/common.py has the contract). Step graphs
are made reusable by fixed shapes: the KV length is padded up to a bucket and the padding is
masked; positions, cache slots and output rows are inputs. A step graph is built, optimized
and compiled once per (n_tokens, n_kv, n_outputs) and reused through the plan cache (graph
uids), so a decode step costs one lookup plus the kernels. Prompts run in micro-batches.

Models with recurrent layers (Mamba-2: mamba2, granitehybrid, nemotron_h, falcon-h1; Mamba-1:
jamba; gated DeltaNet: qwen3next, qwen35, qwen35moe; short convolutions: lfm2) also carry
recurrent state: for
each state (conv_state.{il}, and ssm_state.{il} except for short convolutions; f32,
Model.state_kinds) a table of `state_planes` planes that, like the KV caches, stays where it is
(resident on a GPU backend's device; the step updates it in place). Which plane holds the state
after which position is the session's bookkeeping (_held): a step starts from the current plane
and writes its new state(s) into other planes, taken in turn from a ring, so the state after
each recent position survives a few steps. `truncate(n)` to a position whose state is still
held is then an index move: no copy, no bytes between host and device, no second pass. A
speculative verify batch evaluated with keep_states=True writes the state after EVERY token
(ember.models.common.StateLayout), so any accepted prefix can be kept; it needs
`reserve_state_planes(tokens + 1)` first (one plane by default: plain decoding reads and
rewrites it in place). `recurrent_state()` / `set_recurrent_state()` take and restore host
snapshots (sequences, tests).

The KV caches are stored in SessionOptions.cache's types (ember/models/kv_cache.py: f16 by
default; q8_0, q4_0, turbo3, turbo4 as rows of whole blocks, bytes on the host). A head size the
types cannot hold, or a backend without kernels for them, is refused when the session is made,
in one line, before anything is compiled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ember.backends.base import Backend, Executable
from ember.errors import EmberError
from ember.ir.builder import GraphBuilder
from ember.models.common import Model, StateLayout
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.passes import PassContext
from ember.runtime.memory import cache_array
from ember.runtime.plan_cache import UNKNOWN_UID, GraphVersion, PlanCache


@dataclass(frozen=True)
class SessionOptions:
    n_ctx: int = 2048
    ubatch: int = 512           # tokens per micro-batch of a prompt
    kv_bucket: int = 256        # the KV length is padded up to a multiple of this
    disabled_passes: frozenset = frozenset()
    reuse: bool = True          # False: build, optimize and compile the step graph every step
    plan_capacity: int = 16
    plan_budget_mb: float = 512.0   # compiled plans' arenas held at most (least recently used
                                    # evicted first; a pause never evicts anything)
    pad_tokens: bool = True     # pad a prompt step (one output row at most) up to a token bucket
                                # (token_bucket), so a new prompt length seldom compiles a new
                                # step graph (not for recurrent models: padding would run
                                # through their state)
    swa_full: bool = False      # True: sliding-window layers keep the whole context (llama.cpp's
                                # --swa-full); False: a ring of window + ubatch rows (rounded up
                                # to kv_bucket), enough for any step's keys (swa_cache_rows)
    cache: KVCacheTypes = F16_CACHE     # the KV cache's types (and the rotation of q8_0 / q4_0)


def swa_cache_rows(hp, n_ctx: int, options: SessionOptions) -> int:
    """KV rows of a sliding-window layer: a step of up to ubatch tokens at positions p..p+T-1
    writes rows (p+i) % R, and must not overwrite a key some query of the step still sees
    (one less than window back): R >= window + ubatch is enough."""
    if not hp.uses_swa or options.swa_full:
        return n_ctx
    bucket = options.kv_bucket
    return min(n_ctx, -(-(hp.sliding_window + options.ubatch) // bucket) * bucket)


def check_cache_support(supports_op, where: str, model: Model, cache: KVCacheTypes) -> None:
    """EmberError (one line, naming where: a backend, a target) when supports_op(node) -> (ok,
    why) refuses a cache write or an attention over a KV cache of these types at any of this
    model's head sizes (gemma4's differ by layer): asked before any step graph is built or
    compiled."""
    if not cache.quantized or not model.attention_layers:
        return
    hp = model.hparams
    for head_k, head_v in model.head_dims_by_layer():
        b = GraphBuilder("kv_cache_probe")
        slots = b.input("slots", "i32", (1,))
        caches = []
        for which, dt, head in (("k", cache.k, head_k), ("v", cache.v, head_v)):
            width = hp.n_head_kv * head
            stored = b.input(f"{which}_cache", dt, (1, width))
            caches.append(b.set_rows(stored, slots, b.input(f"{which}_rows", "f32", (1, width))))
        q = b.input("q", "f32", (1, hp.n_head, head_k))
        keys = b.reshape(caches[0], 1, hp.n_head_kv, head_k)
        values = b.reshape(caches[1], 1, hp.n_head_kv, head_v)
        for node in (*caches, b.attention(q, keys, values, scale=1.0)):
            ok, why = supports_op(node)
            if not ok:
                raise EmberError(f"{where}: a KV cache of {cache} is not supported: {why}")


def token_bucket(T: int, ubatch: int) -> int:
    """The rows a step of T tokens is padded to: the next power of two up to 64, then the
    next multiple of 64 (at most 64 wasted rows), never past ubatch. Rows are batch invariant,
    so padding changes no bit of the real rows."""
    bucket = 1 << (T - 1).bit_length() if T <= 64 else -(-T // 64) * 64
    return max(T, min(bucket, ubatch))


@dataclass
class SessionStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    host_seconds: float = 0.0       # outside the compiled graph: lookups, inputs, cache copies
    run_seconds: float = 0.0        # inside the compiled graph (Executable.run)
    graph_builds: int = 0
    compiles: int = 0               # step graphs compiled (builds the plan cache did not answer)
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
    costs a few NumPy writes and one call. A GPU backend's bind also keeps the caches it updates
    in place on the device (OpenCLExecutable.bind, VulkanExecutable.bind): their host arrays
    are then stale between steps, and the session's readers and writers of cache rows go
    through Session.caches_to_host / caches_from_host."""

    def __init__(self, session: "Session", executable: Executable, T: int, n_kv: int, n_out: int,
                 n_states: int = 1):
        hp = session.model.hparams
        self.kpos = np.arange(n_kv, dtype=np.int32)
        self.n_kv_swa = session.n_kv_swa(n_kv)
        self.inputs = {
            "tokens": np.zeros(T, np.int32),
            "pos": np.zeros(T, np.int32),
            "slots": np.zeros(T, np.int32),   # the cache row of a token is its position
            "out_ids": np.arange(T - n_out, T, dtype=np.int32),
            "mask": np.zeros((T, n_kv), np.float32),
        }
        if hp.uses_swa:
            self.inputs["mask_swa"] = np.zeros((T, self.n_kv_swa), np.float32)
            if self.n_kv_swa < n_kv:
                self.inputs["slots_swa"] = np.zeros(T, np.int32)
        self.window = hp.sliding_window if hp.uses_swa else 0
        # The updated caches are written where they lie when the backend can do it in place;
        # the others come back as outputs and are copied.
        in_place = executable.in_place_outputs
        self.targets, self.copies = {}, []
        for j, il in enumerate(session.attention_layers):
            rows = self.n_kv_swa if hp.is_swa(il) else n_kv
            for k, which, cache in ((1 + 2 * j, "k", session.k_cache[j]), (2 + 2 * j, "v", session.v_cache[j])):
                view = cache[:rows]
                self.inputs[f"{which}_cache.{il}"] = view
                if k in in_place:
                    self.targets[k] = view
                else:
                    self.copies.append((k, view))
        # Recurrent state planes: updated in place like the caches (resident on a GPU device);
        # state_src / state_slots say which plane the step reads and which it writes.
        first = 1 + 2 * len(session.attention_layers)
        if session.is_recurrent:
            self.inputs["state_src"] = np.zeros(1, np.int32)
            self.inputs["state_slots"] = np.zeros(n_states, np.int32)
        for r, (name, planes) in enumerate(session._planes.items()):
            self.inputs[name] = planes
            if first + r in in_place:
                self.targets[first + r] = planes
            else:
                self.copies.append((first + r, planes))
        self._run = executable.bind(self.inputs, self.targets)

    def run(self) -> list[np.ndarray]:
        """The step's outputs; logits in a new array (a caller may keep old ones)."""
        return self._run(fresh=(0,))

    def set(self, chunk: np.ndarray, n_past: int, n_out: int, swa_pos: np.ndarray) -> None:
        """Inputs for chunk at n_past, its last n_out rows giving logits; a chunk shorter than
        the graph's rows is padded (its last token again, at the next positions: rows no real
        query sees, that later tokens overwrite; their recurrent states, if kept, are never
        held). swa_pos (the position each sliding-window
        ring row holds, -1: none) is updated with the rows this step writes."""
        T, n = self.inputs["tokens"].size, chunk.size
        pos = self.inputs["pos"]
        self.inputs["tokens"][:n] = chunk
        self.inputs["tokens"][n:] = chunk[-1]
        # the graph's output rows start at the first of the n_out wanted; a padded step with a
        # row for every token (an artifact's verify step, Session._shape) has more of them
        out_ids = self.inputs["out_ids"]
        out_ids[:] = np.arange(n - n_out, n - n_out + out_ids.size, dtype=np.int32)
        pos[:] = np.arange(n_past, n_past + T, dtype=np.int32)
        self.inputs["slots"][:] = pos
        if self.window:
            ring = pos % swa_pos.size
            swa_pos[ring] = pos
            if "slots_swa" in self.inputs:
                self.inputs["slots_swa"][:] = ring
            held = swa_pos[None, :self.n_kv_swa]
            seen = (held >= 0) & (held <= pos[:, None]) & (pos[:, None] - held < self.window)
            swa = self.inputs["mask_swa"]
            swa.fill(-np.inf)
            swa[seen] = 0.0
        mask = self.inputs["mask"]
        if T == 1:     # a decode step: two slices
            mask[0, :n_past + 1] = 0.0
            mask[0, n_past + 1:] = -np.inf
            return
        mask.fill(0.0)
        mask[self.kpos[None, :] > pos[:, None]] = -np.inf    # later positions and padding


class Session:
    def __init__(self, model: Model, backend: Backend, options: SessionOptions = SessionOptions()):
        backend.require_available()
        self.model, self.backend, self.options = model, backend, options
        self.cache = options.cache
        model.check_cache(self.cache)
        check_cache_support(backend.supports_op, f"{backend.name} backend", model, self.cache)
        hp = model.hparams
        self.n_ctx = min(options.n_ctx, hp.n_ctx_train) if hp.n_ctx_train else options.n_ctx
        # KV caches of the attention layers (every layer of a transformer), in layer order
        self.attention_layers = model.attention_layers
        # sliding-window layers keep a ring of swa_rows rows; swa_pos: the position each ring row
        # holds (-1: none; empty for a model without sliding-window layers)
        self.swa_rows = swa_cache_rows(hp, self.n_ctx, options)
        self.swa_pos = np.full(self.swa_rows if hp.uses_swa else 0, -1, np.int64)
        rows = {il: self.swa_rows if hp.is_swa(il) else self.n_ctx for il in self.attention_layers}
        self.k_cache = [cache_array(self.cache.k, *model.cache_shape(n, "k", il)) for il, n in rows.items()]
        self.v_cache = [cache_array(self.cache.v, *model.cache_shape(n, "v", il)) for il, n in rows.items()]
        # recurrent state planes (module doc): name -> f32[planes, state size]
        self.state_planes = 1
        self._planes: dict[str, np.ndarray] = {}
        self._plane = 0                   # the plane holding the state after n_past
        self._held: dict[int, int] = {}   # position -> plane holding the state after it
        self._ring = 0                    # the next plane a step writes (skipping the current one)
        self._layout_epoch = 0            # bumped when the planes are reallocated: feeds rebind
        self._allocate_planes(1)
        self.n_past = 0
        self.stats = SessionStats()
        self.last_eval_seconds = 0.0
        self.plans: PlanCache[_Step] = PlanCache(
            capacity=options.plan_capacity, budget_bytes=int(options.plan_budget_mb * 2**20),
            size_of=lambda step: step.executable.planned_peak_bytes)
        self._versions: dict[tuple, GraphVersion] = {}
        self.pipeline = backend.pipeline()    # the backend's target's, with its device's options
        # on_compile(message): told before each step graph is compiled (a cold start compiles
        # several, for seconds each: the CLI shows them on stderr)
        self.on_compile = None
        self._layout = StateLayout()      # the recurrent state layout of the step being built

    # ---- public --------------------------------------------------------------------------
    def reset(self) -> None:
        self.n_past = 0
        self.swa_pos.fill(-1)
        self._zero_recurrent_state()

    def caches_to_host(self) -> None:
        """Make the host KV caches current before the host reads them: a GPU backend keeps them
        on the device between steps (Backend.sync_to_host); nothing to do on the CPU."""
        self.backend.sync_to_host(self.k_cache + self.v_cache)

    def caches_from_host(self) -> None:
        """Hand host writes of the KV caches to the device copies (Backend.sync_to_device); call
        caches_to_host before writing only some rows, as the whole cache is sent."""
        self.backend.sync_to_device(self.k_cache + self.v_cache)

    def n_kv_swa(self, n_kv: int) -> int:
        """The ring rows a step over n_kv rows of the other layers reads."""
        return min(n_kv, self.swa_rows)

    def build_step(self, T: int, n_kv: int, n_out: int):
        """The model's step graph for this session's caches (and recurrent state layout)."""
        return self.model.build_step(T, n_kv, n_out, self.n_kv_swa(n_kv), self.cache, self._layout)

    def _forget_from(self, n_past: int) -> None:
        self.swa_pos[self.swa_pos >= n_past] = -1
        self.n_past = n_past

    def truncate(self, n_past: int) -> None:
        """Forget every position from n_past on (rows past n_past are masked from then on).
        A model with recurrent layers can be truncated to 0 (a reset), to where it is, or to a
        position whose state a plane still holds (holds(n_past): a recent step wrote it);
        otherwise restore a snapshot with set_recurrent_state(arrays, n_past)."""
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"truncate: {n_past} is outside [0, {self.n_past}]")
        if self.is_recurrent and n_past not in (0, self.n_past):
            if n_past not in self._held:
                raise EmberError(f"truncate: {self.model.arch} has recurrent layers, whose state after "
                                 f"position {n_past} is gone; restore a snapshot with "
                                 "set_recurrent_state(arrays, n_past) instead")
            self._plane = self._held[n_past]
        if n_past == 0:
            self._zero_recurrent_state()
        self._forget_from(n_past)
        # states after later positions belong to the forgotten tail (never to be restored)
        self._held = {p: plane for p, plane in self._held.items() if p <= n_past}

    def holds(self, n_past: int) -> bool:
        """Whether truncate(n_past) is possible without a snapshot."""
        return not self.is_recurrent or n_past in (0, self.n_past) or \
            (n_past <= self.n_past and n_past in self._held)

    @property
    def is_recurrent(self) -> bool:
        """Whether the model has recurrent (Mamba-1/2, gated DeltaNet or short-convolution) layers."""
        return bool(self._planes)

    @property
    def state_bytes(self) -> int:
        """Bytes of one copy of the recurrent state (every layer, one plane)."""
        return sum(planes[0].nbytes for planes in self._planes.values())

    def reserve_state_planes(self, planes: int) -> None:
        """Keep at least `planes` planes of recurrent state (a verify batch of T tokens with
        keep_states needs T + 1). The current state stays; the steps compiled for fewer planes
        are not used again (their shapes differ). Nothing for a transformer."""
        if self.is_recurrent and planes > self.state_planes:
            current = self.recurrent_state()
            self.plans.clear()            # their feeds hold the old tables (on the device too)
            self._allocate_planes(planes)
            self._write_plane(0, current)
            self._plane, self._held, self._ring = 0, {self.n_past: 0}, 1

    def prepare_speculation(self, draft_max: int, rollback: str) -> None:
        """Make room for speculative rounds of up to draft_max drafts (ember.runtime.speculative):
        the recurrent state planes its rollback needs, the round's start plus a verify batch's
        draft_max + 1 states ("states") or the start plus the one state a verify writes
        ("redecode"); nothing for a transformer (rollback ""). An artifact's session, whose steps
        are fixed, checks instead that it holds what the rounds need."""
        if rollback:
            self.reserve_state_planes(draft_max + 2 if rollback == "states" else 2)

    def recurrent_state(self) -> dict[str, np.ndarray]:
        """A host copy of the recurrent state after the last evaluated token: conv_state.{il}
        and ssm_state.{il} of every recurrent layer in their own shapes (empty for a
        transformer). With the position (n_past) and the KV cache rows before it, it is all a
        snapshot needs. On a GPU backend this reads the planes back from the device."""
        self.backend.sync_to_host(list(self._planes.values()))
        shapes = self.model.state_shapes()
        return {name: planes[self._plane].reshape(shapes[name]).copy() for name, planes in self._planes.items()}

    def set_recurrent_state(self, arrays: dict[str, np.ndarray], n_past: int | None = None) -> None:
        """Replace the recurrent state by arrays (as recurrent_state() returns them: every name,
        same shapes, f32; copied into a plane). With n_past, also move the position there (the
        KV cache rows past it are masked from then on), as restoring a checkpoint needs."""
        shapes = self.model.state_shapes()
        if set(arrays) != set(shapes):
            raise ValueError(f"set_recurrent_state: expected arrays {sorted(shapes)}, got {sorted(arrays)}")
        for name, shape in shapes.items():
            a = np.asarray(arrays[name])
            if a.shape != shape or a.dtype != np.float32:
                raise ValueError(f"set_recurrent_state: {name} is {a.dtype}{list(a.shape)}, expected "
                                 f"float32{list(shape)}")
        if n_past is not None and not 0 <= n_past <= self.n_ctx:
            raise ValueError(f"set_recurrent_state: n_past {n_past} is outside [0, {self.n_ctx}]")
        plane = self._next_planes(1)[0]
        self._write_plane(plane, arrays)
        if n_past is not None:
            if n_past < self.n_past:
                self._forget_from(n_past)
            self.n_past = n_past
        self._plane, self._held = plane, {self.n_past: plane}

    def _allocate_planes(self, planes: int) -> None:
        self.state_planes = planes
        self._planes = {name: np.zeros((planes, int(np.prod(shape))), np.float32)
                        for name, shape in self.model.state_shapes().items()}
        self._plane, self._held, self._ring = 0, {0: 0}, 0
        self._layout_epoch += 1

    def _write_plane(self, plane: int, arrays: dict[str, np.ndarray]) -> None:
        """Host writes of one plane, sent to the device copies (whole, after bringing them back)."""
        tables = list(self._planes.values())
        self.backend.sync_to_host(tables)
        for name, planes in self._planes.items():
            planes[plane] = np.asarray(arrays[name], np.float32).reshape(-1)
        self.backend.sync_to_device(tables)

    def _zero_recurrent_state(self) -> None:
        if self._planes:
            self._write_plane(self._plane, {name: np.zeros(planes.shape[1], np.float32)
                                            for name, planes in self._planes.items()})
        self._held = {0: self._plane}

    def _next_planes(self, n: int) -> list[int]:
        """n planes for a step's new states, in ring order, never the current plane (a state
        the step starts from stays restorable) unless there is only one."""
        if self.state_planes == 1:
            if n > 1:
                raise EmberError(f"{n} recurrent states per step need {n + 1} state planes; "
                                 "call reserve_state_planes first")
            return [0]
        if n + 1 > self.state_planes:
            raise EmberError(f"{n} recurrent states per step need {n + 1} state planes, the session "
                             f"has {self.state_planes}; call reserve_state_planes first")
        out = []
        while len(out) < n:
            plane, self._ring = self._ring, (self._ring + 1) % self.state_planes
            if plane != self._plane:
                out.append(plane)
        return out

    def eval(self, tokens, all_logits: bool = False, keep_states: bool = False) -> np.ndarray:
        """Run tokens after the current position. Returns logits f32[rows, n_vocab]: every
        token's row when all_logits, else only the last token's. keep_states (a recurrent
        model): keep the state after every token, so truncate can go back to any of them (the
        tokens must fit one micro-batch, and state_planes must be more than their number)."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size == 0:
            raise ValueError("eval: no tokens")
        if self.n_past + tokens.size > self.n_ctx:
            raise EmberError(f"context full: {self.n_past} + {tokens.size} tokens > n_ctx {self.n_ctx}")
        vocab = self.model.hparams.n_vocab
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise EmberError(f"token id out of range [0, {vocab}): {int(tokens.max())}")
        keep_states = keep_states and self.is_recurrent
        if keep_states and tokens.size > self.options.ubatch:
            raise EmberError(f"eval: keep_states needs at most ubatch {self.options.ubatch} tokens, "
                             f"got {tokens.size}")
        start = time.perf_counter()
        compile_before = self.stats.compile_seconds
        pieces = []
        for begin in range(0, tokens.size, self.options.ubatch):
            chunk = tokens[begin:begin + self.options.ubatch]
            last = begin + chunk.size == tokens.size
            n_out = chunk.size if all_logits else (1 if last else 0)
            logits = self._step(chunk, n_out, keep_states)
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
    def _step(self, chunk: np.ndarray, n_out: int, keep_states: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        compile_before = self.stats.compile_seconds
        end = self.n_past + chunk.size
        T, rows_out = self._shape(chunk.size, n_out)
        n_kv = min(self.n_ctx, -(-(self.n_past + T) // self.options.kv_bucket) * self.options.kv_bucket)
        if self.is_recurrent and T > chunk.size and not keep_states:
            # the one state written would be the one after the padding
            raise EmberError(f"{self.model.arch}: a padded step of a recurrent model must keep its states")
        self._layout = StateLayout(self.state_planes, keep_states)
        step = self._plan(T, n_kv, rows_out)
        n_states = self._layout.n_states(T)
        if step.feed is None or step.feed.epoch != self._layout_epoch:
            step.feed = _Feed(self, step.executable, T, n_kv, rows_out, n_states)
            step.feed.epoch = self._layout_epoch
        feed = step.feed
        feed.set(chunk, self.n_past, n_out, self.swa_pos)
        if self.is_recurrent:
            written = self._next_planes(n_states)
            feed.inputs["state_src"][0] = self._plane
            feed.inputs["state_slots"][:] = written
        t1 = time.perf_counter()
        outputs = feed.run()
        t2 = time.perf_counter()
        self.stats.run_seconds += t2 - t1
        for k, cache in feed.copies:
            cache[...] = outputs[k]
        if self.is_recurrent:
            # the planes written now hold the states after these positions, no longer older ones
            positions = range(self.n_past + 1, end + 1) if keep_states else (end,)
            self._held = {p: plane for p, plane in self._held.items() if plane not in written}
            self._held.update(zip(positions, written))
            # the state after the last real token (padding rows, kept or not, come after it)
            self._plane = written[len(positions) - 1]
        self._forget_from(end)          # the padding rows hold nothing
        self.stats.host_seconds += (t1 - t0) + (time.perf_counter() - t2) - (self.stats.compile_seconds - compile_before)
        return outputs[0] if rows_out == n_out else outputs[0][:n_out]

    def _shape(self, n: int, n_out: int) -> tuple[int, int]:
        """(rows, output rows) of the step graph that runs n tokens with logits for their last
        n_out: padded rows (_rows) with the outputs asked for. An artifact's session pads a
        verify batch to its compiled verify steps, which give logits for every row."""
        return self._rows(n, n_out), n_out

    def _rows(self, n: int, n_out: int) -> int:
        """The step graph's rows for n tokens (token_bucket when padding applies). A step with
        several output rows (a speculative verify batch, teacher forcing) is keyed by its exact
        n_out anyway, so padding it would only add rows to compute."""
        if not self.options.pad_tokens or self.is_recurrent or n_out > 1:
            return n
        T = token_bucket(n, self.options.ubatch)
        return T if self.n_past + T <= self.n_ctx else n

    def _plan(self, T: int, n_kv: int, n_out: int) -> _Step:
        shape = (T, n_kv, n_out) if self._layout == StateLayout() else (T, n_kv, n_out, self._layout)
        key = (*shape, self.cache)     # the plan cache's key: what determines the step graph
        if self.options.reuse and shape in self._versions:
            return self.plans.get(self._versions[shape], self._compile, key=key)
        start = time.perf_counter()
        graph = self.build_step(T, n_kv, n_out)
        self.stats.graph_builds += 1
        if not self.options.reuse:
            return self._compile(graph, GraphVersion(graph, UNKNOWN_UID), start)
        version = GraphVersion.of(graph)
        self._versions[shape] = version
        return self.plans.get(version, lambda g: self._compile(g, version, start), key=key)

    def _compile(self, graph, version=None, start=None) -> _Step:
        start = start or time.perf_counter()
        # The backend compiles under the same context: what it renders is what the pipeline
        # (with the user's disabled passes) made, and no renderer runs a pass of its own.
        if self.on_compile is not None:
            self.on_compile(f"compiling step graph {graph.name} ({self.stats.compiles + 1} so far)")
        with PassContext(disabled=self.options.disabled_passes):
            executable = self.backend.compile(self.pipeline(graph))
        self.stats.compile_seconds += time.perf_counter() - start
        self.stats.compiles += 1
        return _Step(version, executable)
