"""What every model graph shares: the `Model` a GGUF file loads into, and `StepGraph`, the
scaffolding of one generation step (the step-graph contract below), with the pieces llama.cpp's
`llm_graph_context` provides: norms, QKV projections (`build_qkv`), attention through the KV
cache, gated FFNs and the output head.

The step-graph contract, relied on by the generation runtime:

    model.build_step(n_tokens, n_kv, n_outputs, n_kv_swa=None, cache=F16_CACHE, states=StateLayout()) -> Graph
    inputs   tokens i32[n_tokens], pos i32[n_tokens] (positions), slots i32[n_tokens] (the cache
             rows the new K/V rows go to), out_ids i32[n_outputs] (the rows that produce logits),
             mask f32[n_tokens, n_kv] (0 / -inf: causal + padding, built by the runtime),
             mask_swa f32[n_tokens, n_kv_swa] (only for models with sliding-window layers),
             slots_swa i32[n_tokens] (only when n_kv_swa < n_kv: the rows of the sliding-window
             layers' ring caches; otherwise those layers use slots and n_kv_swa = n_kv),
             then k_cache.{il} cache.k[n_kv, n_head_kv * head_dim_k], v_cache.{il}
             cache.v[n_kv, n_head_kv * head_dim_v] for each attention layer il (n_kv_swa rows for
             a sliding-window layer; cache: a KVCacheTypes, f16/f16 by default; a quantized type
             is stored as whole blocks per row, ember.ir.dtypes), then, for a model with
             recurrent layers (HParams.recurrent_layers), state_src i32[1] and state_slots
             i32[n_states] followed by the state planes {kind}_state.{il} f32[planes, state size]
             of each recurrent layer il (Model.state_kinds says which states, Model.state_shapes
             their shapes), each group in layer order. A Mamba-2 layer has conv_state.{il}
             [d_conv - 1, d_inner + 2 * n_group * d_state] and ssm_state.{il} [n_ssm_head,
             ssm_head_dim, d_state], a Mamba-1 layer (jamba) conv_state.{il} [d_conv - 1,
             d_inner] and ssm_state.{il} [d_inner, 1, d_state] (heads of one channel); a gated
             DeltaNet layer (qwen3next, qwen35, qwen35moe: ssm_n_head v heads of S = d_state,
             d_inner = H_v * S, n_group q/k heads) a conv state over q, k and v ([d_conv - 1,
             2 H_k S + H_v S]) and ssm_state the delta rule's [H_v, S_v, S_k]
             (gated_delta_net's layout); a short convolution (lfm2)
             conv_state.{il} [l_cache - 1, n_embd] only (the last rows of B*x it saw). A layer can
             have both a KV cache and a state (falcon-h1) or neither (nemotron_h's FFN-only layers).
    outputs  logits f32[n_outputs, n_vocab], then k_cache.{il}, v_cache.{il} updated with
             set_rows(cache, slots, rows) for every attention layer, then the state planes
             updated with set_rows(planes, state_slots, states), in the inputs' order.
    Attention reads the updated caches with causal=False: the masks say everything. With a
    q8_0 / q4_0 cache (and cache.rotation) the rows stored are the Walsh-Hadamard rotations of K
    and V (llama.cpp's attn_rot; ember/models/kv_cache.py): Q is rotated with K, the attention
    output rotated back, so the logits mean the same; turbo3/turbo4 rotate inside their blocks.

    Recurrent state (StateLayout): each recurrent layer keeps `planes` copies of each of its
    states, rows of a per-layer table that stays where it is (on a GPU backend, resident on the
    device like the KV caches). A step reads the state it starts from out of plane state_src
    (get_rows) and writes n_states states with set_rows into the planes state_slots names: with
    all_states (n_states = n_tokens, a speculative verify batch) the state after EVERY token, so
    the runtime can continue from any accepted prefix by pointing state_src at its plane (no
    copy, no second pass: ember.runtime.speculative); otherwise (n_states = 1) only the state
    after the last token. StepGraph.recurrent_state / write_states do this for every recurrent
    layer kind: a convolution's states (Mamba-2, gated DeltaNet, short convolution) are
    overlapping windows of the rows it saw (write_conv_states, no kernel), the scans' come out
    of ssm_scan / gated_delta_net with all_states, so an architecture never handles planes
    itself. The runtime feeds a recurrent layer the tokens of one sequence in order; positions,
    slots and masks mean nothing to it. A model with no attention layer still takes every input
    above (unused), so the runtime builds the same inputs for every model.

Weights are graph constants under their GGUF names, holding views of the memory-mapped file.
Imports the IR, the GGUF reader and the cache types (kv_cache) only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.builder import GraphBuilder
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.gguf_file import GGUFFile, ModelFileError
from ember.models.hparams import DELTA_NET_ARCHS, HParams
from ember.models.kv_cache import F16_CACHE, KVCacheTypes

STATE_DTYPE = dtypes.f32     # recurrent state stays f32, as in llama.cpp


@dataclass(frozen=True)
class StateLayout:
    """How a step graph keeps recurrent state (the contract above): `planes` copies of each
    state per layer, and whether the step writes the state after every token (all_states) or
    only after its last one."""
    planes: int = 1
    all_states: bool = False

    def n_states(self, n_tokens: int) -> int:
        return n_tokens if self.all_states else 1


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: hyper-parameters, the file's tensors (mmap views), the tokenizer
    metadata (every `tokenizer.*` key) and the builder of its step graphs."""
    arch: str
    hparams: HParams
    file: GGUFFile
    tokenizer: Mapping[str, object]
    step_builder: Callable[..., Graph]   # (model, n_tokens, n_kv, n_outputs, n_kv_swa, cache[, states])

    @property
    def path(self):
        return self.file.path

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return self.file.tensors()

    @property
    def n_vocab(self) -> int:
        return self.hparams.n_vocab

    @property
    def uses_swa(self) -> bool:
        return self.hparams.uses_swa

    def cache_shape(self, n_kv: int, which: str = "k", il: int | None = None) -> tuple[int, int]:
        """Shape of an attention layer's K or V cache of n_kv rows: layer il's (a gemma4
        sliding-window layer's heads differ in size), or, without il, a global layer's."""
        hp = self.hparams
        if il is not None:
            return (n_kv, hp.kv_width(il, which))
        return (n_kv, hp.n_embd_k_gqa if which == "k" else hp.n_embd_v_gqa)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with a KV cache (every layer of a transformer), in order."""
        return self.hparams.attention_layers

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """The layers with recurrent state ({kind}_state.{il} for each of state_kinds), in order."""
        return self.hparams.recurrent_layer_ids

    @property
    def state_kinds(self) -> tuple[str, ...]:
        """The states of each recurrent layer, in order: ("conv", "ssm") for Mamba-2 and gated
        DeltaNet layers, ("conv",) for short convolutions (lfm2)."""
        return self.hparams.state_kinds

    def state_names(self) -> list[str]:
        """Every recurrent state input of the step graph, in order: {kind}_state.{il}."""
        return [f"{kind}_state.{il}" for il in self.recurrent_layers for kind in self.state_kinds]

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every recurrent state the step graph carries, by input name (state_names' order),
        with its shape (one plane)."""
        return {f"{kind}_state.{il}": self.state_shape(kind)
                for il in self.recurrent_layers for kind in self.state_kinds}

    def state_shape(self, which: str) -> tuple[int, ...]:
        """Shape of one recurrent layer's "conv" or "ssm" state (f32)."""
        if which not in self.state_kinds:
            raise ValueError(f"state_shape: {self.arch}'s recurrent layers have states "
                             f"{self.state_kinds}, not {which!r}")
        hp = self.hparams
        return hp.conv_state_shape if which == "conv" else hp.ssm_state_shape

    def build_step(self, n_tokens: int, n_kv: int, n_outputs: int, n_kv_swa: int | None = None,
                   cache: KVCacheTypes = F16_CACHE, states: StateLayout = StateLayout()) -> Graph:
        """The step graph; with n_kv_swa < n_kv (a model with sliding-window layers), those
        layers keep a ring of n_kv_swa rows (the contract's slots_swa input). cache: the KV
        cache's types (a head size the types cannot hold is an EmberError, see check_cache);
        states: how a model with recurrent layers keeps their state (StateLayout)."""
        if n_tokens < 1 or n_kv < 1:
            raise ValueError(f"build_step: need n_tokens >= 1 and n_kv >= 1, got {n_tokens}, {n_kv}")
        if not 0 <= n_outputs <= n_tokens:
            raise ValueError(f"build_step: n_outputs {n_outputs} must be in [0, {n_tokens}]")
        if n_kv_swa is not None and not n_tokens <= n_kv_swa <= n_kv:
            raise ValueError(f"build_step: n_kv_swa {n_kv_swa} must be in [n_tokens {n_tokens}, n_kv {n_kv}]")
        self.check_cache(cache)
        if not self.recurrent_layers:
            return self.step_builder(self, n_tokens, n_kv, n_outputs, n_kv_swa, cache)
        if states.planes < 1 or (states.planes == 1 and states.n_states(n_tokens) > 1):
            raise ValueError(f"build_step: {states.n_states(n_tokens)} states per step need more than "
                             f"{states.planes} state plane(s)")
        return self.step_builder(self, n_tokens, n_kv, n_outputs, n_kv_swa, cache, states)

    def check_cache(self, cache: KVCacheTypes) -> None:
        """EmberError (one line: the file, the head size, the type) when a quantized cache type
        cannot hold this model's heads as whole blocks; where head sizes differ by layer
        (gemma4), it names the first layer of the size at fault. Nothing to check without
        attention."""
        heads = self.head_dims_by_layer()
        for head_dims, il in heads.items():
            cache.check(*head_dims, str(self.path), il if len(heads) > 1 else None)

    def head_dims_by_layer(self) -> dict[tuple[int, int], int]:
        """Each (K, V) head size of the attention layers, with the first layer that has it."""
        hp, first = self.hparams, {}
        for il in self.attention_layers:
            first.setdefault((hp.head_dim(il, "k"), hp.head_dim(il, "v")), il)
        return first

    def cache_bytes_per_row(self, cache: KVCacheTypes) -> int:
        """Bytes one token takes in one attention layer's K and V caches."""
        hp = self.hparams
        return cache.row_bytes(hp.n_embd_k_gqa, hp.n_embd_v_gqa)

    def cache_bytes_per_token(self, cache: KVCacheTypes) -> int:
        """Bytes one token takes in the K and V caches of every attention layer."""
        hp = self.hparams
        return sum(cache.row_bytes(hp.kv_width(il, "k"), hp.kv_width(il, "v")) for il in self.attention_layers)

    def __repr__(self) -> str:
        hp = self.hparams
        parts = [f"{hp.n_layer} layers", f"n_embd {hp.n_embd}"]
        if self.recurrent_layers and hp.shortconv_l_cache:
            parts.append(f"{len(self.recurrent_layers)} short convolutions (window {hp.shortconv_l_cache})")
        elif self.recurrent_layers and hp.is_mamba1:
            parts.append(f"{len(self.recurrent_layers)} Mamba-1 (d_inner {hp.ssm_d_inner}, d_state "
                         f"{hp.ssm_d_state}, dt rank {hp.ssm_dt_rank})")
        elif self.recurrent_layers:
            kind = "DeltaNet" if hp.arch in DELTA_NET_ARCHS else "Mamba-2"
            parts.append(f"{len(self.recurrent_layers)} {kind} ({hp.ssm_n_head} heads of "
                         f"{hp.ssm_head_dim}, d_state {hp.ssm_d_state})")
        if hp.n_expert:
            parts.append(f"{hp.n_expert} experts ({hp.n_expert_used} used)")
        if self.attention_layers:
            parts.append(f"{hp.n_head}/{hp.n_head_kv} heads of {hp.head_dim_k}")
        return f"<Model {self.arch} {str(self.path)!r}: {', '.join(parts)}, vocab {hp.n_vocab}>"


class StepGraph:
    """One step graph under construction: the contract's inputs, the weights, the per-layer
    cache updates; `finish` adds the output head and returns the Graph."""

    def __init__(self, model: Model, n_tokens: int, n_kv: int, n_outputs: int, n_kv_swa: int | None = None,
                 cache: KVCacheTypes = F16_CACHE, states: StateLayout = StateLayout()):
        self.model, self.hp, self.file = model, model.hparams, model.file
        self.states = states
        self.n_states = states.n_states(n_tokens)
        self.n_tokens, self.n_kv, self.n_outputs = n_tokens, n_kv, n_outputs
        self.cache = cache
        # Sliding-window layers read a ring of n_kv_swa rows (slots_swa, mask_swa) when it is
        # shorter than the other layers' n_kv; otherwise they share slots with them.
        ring = self.hp.uses_swa and n_kv_swa is not None and n_kv_swa < n_kv
        self.n_kv_swa = n_kv_swa if ring else n_kv
        b = self.b = GraphBuilder(f"{model.arch}_step")
        self.tokens = b.input("tokens", "i32", (n_tokens,))
        self.pos = b.input("pos", "i32", (n_tokens,))
        self.slots = b.input("slots", "i32", (n_tokens,))
        self.out_ids = b.input("out_ids", "i32", (n_outputs,))
        self.mask = b.input("mask", "f32", (n_tokens, n_kv))
        self.mask_swa = b.input("mask_swa", "f32", (n_tokens, self.n_kv_swa)) if self.hp.uses_swa else None
        self.slots_swa = b.input("slots_swa", "i32", (n_tokens,)) if ring else self.slots
        self.k_cache: dict[int, Node] = {}
        self.v_cache: dict[int, Node] = {}
        for il in model.attention_layers:
            rows = self.cache_rows(il)
            self.k_cache[il] = b.input(f"k_cache.{il}", cache.k, model.cache_shape(rows, "k", il))
            self.v_cache[il] = b.input(f"v_cache.{il}", cache.v, model.cache_shape(rows, "v", il))
        self.k_updated: list[Node | None] = [None] * self.hp.n_layer
        self.v_updated: list[Node | None] = [None] * self.hp.n_layer
        # recurrent state: plane tables by name, the state each step starts from, the states written
        self.state_planes: dict[str, Node] = {}
        self.state_read: dict[str, Node] = {}
        self.state_written: dict[str, Node] = {}
        if model.recurrent_layers:
            self.state_src = b.input("state_src", "i32", (1,))
            self.state_slots = b.input("state_slots", "i32", (self.n_states,))
        for name, shape in model.state_shapes().items():
            self.state_planes[name] = b.input(name, STATE_DTYPE, (states.planes, int(np.prod(shape))))
        # the state each recurrent layer starts from, by kind (no ssm_state for a short convolution)
        self.conv_state = {il: self.recurrent_state(f"conv_state.{il}") for il in model.recurrent_layers}
        self.ssm_state = {il: self.recurrent_state(f"ssm_state.{il}") for il in model.recurrent_layers
                          if "ssm" in model.state_kinds}

    # ---- recurrent state (the contract's planes) ------------------------------------------
    def recurrent_state(self, name: str) -> Node:
        """The state `name` the step starts from (plane state_src), in its own shape."""
        if name not in self.state_read:
            shape = self.model.state_shapes()[name]
            row = self.b.get_rows(self.state_planes[name], self.state_src)
            self.state_read[name] = self.b.reshape(row, *shape)
        return self.state_read[name]

    def write_states(self, name: str, states: Node) -> None:
        """Record the states the step leaves for `name`: states[n_states, state size], the state
        after each token (all_states) or after the last one; finish writes them to the planes
        state_slots names."""
        expected = (self.n_states, self.state_planes[name].shape[1])
        if states.shape != expected:
            raise ValueError(f"write_states: {name} states are {list(states.shape)}, expected {list(expected)}")
        self.state_written[name] = states

    def write_conv_states(self, il: int, window: Node) -> None:
        """Layer il's conv states from the convolution's window[K - 1 + T, C] (the state rows,
        then the step's rows): the state after token t is rows t + 1 .. t + K - 1, so the
        n_states states are overlapping row ranges of the window, one strided view (no copy
        kernel: set_rows reads them straight from the window)."""
        rows, C = window.shape
        T = self.n_tokens
        K1, n, F32 = rows - T, self.n_states, dtypes.f32.row_bytes(1)
        self.write_states(f"conv_state.{il}", self.b.view(window, shape=(n, K1 * C), strides=(C * F32, F32),
                                                          offset=(T - n + 1) * C * F32))

    def write_scan_states(self, il: int, out: Node, n_outputs: int) -> None:
        """Layer il's ssm states from a scan's flat result (ssm_scan, gated_delta_net with
        all_states=self.states.all_states): n_outputs output elements, then the n_states states."""
        F32 = dtypes.f32.row_bytes(1)
        size = self.state_planes[f"ssm_state.{il}"].shape[1]
        self.write_states(f"ssm_state.{il}", self.b.view(out, shape=(self.n_states, size),
                                                         strides=(size * F32, F32), offset=n_outputs * F32))

    # ---- weights --------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.file

    def weight(self, name: str, *shape: int) -> Node:
        """The tensor as a constant (mmap data); shape, when given, is checked (outermost first)."""
        if name not in self.file:
            raise ModelFileError(f"{self.file.path}: tensor {name!r} is missing "
                                 f"({self.model.arch} needs it)")
        info = self.file.tensor_infos[name]
        if shape and info.shape != tuple(shape):
            raise ModelFileError(f"{self.file.path}: tensor {name!r} has shape {list(info.shape)}, "
                                 f"expected {list(shape)}")
        return self.b.const(name, self.file.tensor(name), info.dtype, info.shape)

    def optional(self, name: str, *shape: int) -> Node | None:
        return self.weight(name, *shape) if name in self.file else None

    def vector(self, name: str, n: int, required: bool = True) -> Node | None:
        """A 1-D tensor (norm weight, bias, freq factors) as f32, ready for elementwise ops."""
        if not required and name not in self.file:
            return None
        w = self.weight(name, n)
        if w.dtype is not dtypes.f32:
            if w.dtype not in (dtypes.f16, dtypes.bf16):
                raise ModelFileError(f"{self.file.path}: tensor {name!r} is {w.dtype}; a vector "
                                     "must be f32, f16 or bf16")
            w = self.b.cast(w, dtype="f32")
        return w

    # ---- pieces ---------------------------------------------------------------------------
    def rms_norm(self, x: Node, weight_name: str) -> Node:
        """llama.cpp's build_norm(LLM_NORM_RMS): normalize the last axis, times the weight."""
        n = x.shape[-1]
        return self.b.mul(self.b.rms_norm(x, eps=self.hp.rms_eps), self.vector(weight_name, n))

    def linear(self, x: Node, prefix: str, n_out: int) -> Node:
        """x times {prefix}.weight [n_out, K], plus {prefix}.bias when the file has one."""
        y = self.b.mul_mat(x, self.weight(f"{prefix}.weight", n_out, x.shape[-1]))
        bias = self.vector(f"{prefix}.bias", n_out, required=False)
        return self.b.add(y, bias) if bias is not None else y

    def ffn(self, x: Node, il: int, gate_op: str) -> Node:
        """The parallel gated FFN: down(act(gate(x)) * up(x)); gate_op is swiglu or geglu."""
        p, n_ff = f"blk.{il}.", self.hp.ff_width(il)
        gate = self.linear(x, p + "ffn_gate", n_ff)
        up = self.linear(x, p + "ffn_up", n_ff)
        return self.linear(self.b.op(gate_op, gate, up), p + "ffn_down", self.hp.n_embd)

    def attention(self, il: int, q: Node, k: Node | None, v: Node | None, scale: float,
                  softcap: float = 0.0, swa: bool = False) -> Node:
        """Write this step's K/V rows into layer il's caches, attend over the updated caches,
        and return the heads flattened: f32[n_tokens, n_head * head_dim_v]. A q8_0 / q4_0
        cache rotates Q and K (V, and the output back) as llama.cpp does (ember.models.kv_cache).
        A layer that shares an earlier layer's cache (HParams.kv_source, gemma4) passes no k
        and v: it attends over that layer's cache as this step updated it."""
        b, hp = self.b, self.hp
        if swa != hp.is_swa(il):
            raise ValueError(f"attention: layer {il} is {'' if hp.is_swa(il) else 'not '}a "
                             f"sliding-window layer, called with swa={swa}")
        src = hp.kv_source(il)
        if (src == il) != (k is not None and v is not None):
            raise ValueError(f"attention: layer {il} reads the cache of layer {src}: it takes "
                             f"{'k and v' if src == il else 'no k and v'}")
        head_k, head_v = hp.head_dim(il, "k"), hp.head_dim(il, "v")
        k_rot, v_rot = self.cache.k_rotation(head_k), self.cache.v_rotation(head_v)
        if k_rot:
            q = rotate(b, q, k_rot)
        if src == il:
            if k_rot:
                k = rotate(b, k, k_rot)
            if v_rot:
                v = rotate(b, v, v_rot)
            slots = self.slots_swa if swa else self.slots
            self.k_updated[il] = b.set_rows(self.k_cache[il], slots, flatten_heads(b, k))
            self.v_updated[il] = b.set_rows(self.v_cache[il], slots, flatten_heads(b, v))
        elif self.k_updated[src] is None:
            raise ValueError(f"attention: layer {il} reads layer {src}'s cache before it is written")
        rows = self.cache_rows(il)
        keys = b.reshape(self.k_updated[src], rows, hp.n_head_kv, head_k)
        values = b.reshape(self.v_updated[src], rows, hp.n_head_kv, head_v)
        mask = self.mask_swa if swa else self.mask
        out = b.attention(q, keys, values, mask, scale=scale, softcap=softcap, causal=False)
        if v_rot:
            out = b.hadamard(out, v_rot)
        return b.reshape(out, self.n_tokens, hp.n_head * head_v)

    def cache_rows(self, il: int) -> int:
        """The rows of layer il's KV cache in this step: n_kv_swa for a sliding-window layer."""
        return self.n_kv_swa if self.hp.is_swa(il) else self.n_kv

    def select_outputs(self, x: Node) -> Node:
        """Only the rows that produce logits (llama.cpp does this in the last layer, so the last
        FFN runs on those rows alone)."""
        return self.b.get_rows(x, self.out_ids)

    def finish(self, h: Node, output_name: str = "output.weight", softcap: float = 0.0,
               logit_scale: float = 0.0, output_norm: str = "output_norm.weight") -> Graph:
        """Final norm (output_norm: its weight) and output matmul on h[n_outputs, n_embd]
        (already selected rows); the output falls back to the tied token embedding; logits are
        divided by logit_scale when it is set (granite). Returns the step graph."""
        b, hp = self.b, self.hp
        if h.shape[0] != self.n_outputs:
            raise ValueError(f"finish: h has {h.shape[0]} rows, expected n_outputs={self.n_outputs}")
        h = self.rms_norm(h, output_norm)
        name = output_name if output_name in self.file else "token_embd.weight"
        logits = b.mul_mat(h, self.weight(name, hp.n_vocab, hp.n_embd))
        bias = self.vector("output.bias", hp.n_vocab, required=False)
        if bias is not None:
            logits = b.add(logits, bias)
        if logit_scale:
            logits = b.scale(logits, scale=1.0 / logit_scale)
        if softcap:
            logits = b.scale(b.tanh(b.scale(logits, scale=1.0 / softcap)), scale=softcap)
        missing = [il for il in self.k_cache if self.k_updated[il] is None]
        if missing:
            raise ValueError(f"finish: layers {missing} never wrote their KV cache")
        missing = [name for name in self.state_planes if name not in self.state_written]
        if missing:
            raise ValueError(f"finish: states {missing} were never written")
        caches = [c for il in self.k_cache for c in (self.k_updated[il], self.v_updated[il])]
        states = [b.set_rows(planes, self.state_slots, self.state_written[name])
                  for name, planes in self.state_planes.items()]
        return b.build(logits, *caches, *states)


def rotate(b: GraphBuilder, x: Node, block: int) -> Node:
    """x [T, H, D] times the orthonormal Hadamard matrix over blocks of D (a strided view, the
    fused-QKV split, is made contiguous first)."""
    return b.hadamard(x if x.type.is_contiguous else b.cont(x), block)


def flatten_heads(b: GraphBuilder, x: Node) -> Node:
    """[T, H, D] -> [T, H * D]; a strided view (the fused-QKV split) is made contiguous first."""
    if not x.type.is_contiguous:
        x = b.cont(x)
    return b.reshape(x, x.shape[0], x.shape[1] * x.shape[2])


def build_qkv(s: StepGraph, il: int, x: Node) -> tuple[Node, Node, Node]:
    """Q, K, V of layer il as f32[T, heads, head_dim], after llama.cpp's build_qkv.

    A fused `attn_qkv.weight` [n_q + n_k + n_v, n_embd] (+ a fused bias, or the three separate
    biases concatenated) is one matmul whose result is split by three strided views at byte
    offsets 0, row_size(n_q), row_size(n_q + n_k) with the fused row stride. Otherwise Q, K and V
    are three matmuls (each with its optional bias) reshaped to 3-D.
    """
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T = x.shape[0]
    n_q, n_k, n_v = hp.n_head * hp.head_dim_k, hp.n_embd_k_gqa, hp.n_embd_v_gqa
    if s.has(p + "attn_qkv.weight"):
        qkv = b.mul_mat(x, s.weight(p + "attn_qkv.weight", n_q + n_k + n_v, x.shape[-1]))
        bias = s.vector(p + "attn_qkv.bias", n_q + n_k + n_v, required=False)
        if bias is None and all(s.has(f"{p}attn_{w}.bias") for w in "qkv"):
            bias = b.concat(b.concat(s.vector(p + "attn_q.bias", n_q), s.vector(p + "attn_k.bias", n_k),
                                     axis=0), s.vector(p + "attn_v.bias", n_v), axis=0)
        if bias is not None:
            qkv = b.add(qkv, bias)
        row_stride = qkv.type.strides[0]
        item = qkv.dtype.row_bytes(1)   # offsets in bytes of the result type (f32), not of w

        def split(offset_values: int, heads: int, head_dim: int) -> Node:
            return b.view(qkv, shape=(T, heads, head_dim), strides=(row_stride, head_dim * item, item),
                          offset=qkv.dtype.row_bytes(offset_values))

        return (split(0, hp.n_head, hp.head_dim_k),
                split(n_q, hp.n_head_kv, hp.head_dim_k),
                split(n_q + n_k, hp.n_head_kv, hp.head_dim_v))
    q = s.linear(x, p + "attn_q", n_q)
    k = s.linear(x, p + "attn_k", n_k)
    v = s.linear(x, p + "attn_v", n_v)
    return (b.reshape(q, T, hp.n_head, hp.head_dim_k),
            b.reshape(k, T, hp.n_head_kv, hp.head_dim_k),
            b.reshape(v, T, hp.n_head_kv, hp.head_dim_v))


def embed_tokens(s: StepGraph) -> Node:
    """The token embedding rows, f32[n_tokens, n_embd]."""
    hp = s.hp
    return s.b.get_rows(s.weight("token_embd.weight", hp.n_vocab, hp.n_embd), s.tokens)
