"""The layer stack the hybrid architectures share (mamba2, jamba, granitehybrid, falcon-h1,
nemotron_h, lfm2 / lfm2moe, qwen3next, qwen35 / qwen35moe), after the loop of their llama.cpp
graphs (src/models/*.cpp): one residual stream h, and in every layer

    h = residual(h, mixer(rms_norm(h, blk.{il}.attn_norm)))
    h = residual(h, ffn(rms_norm(h, blk.{il}.<ffn_norm>)))      (only an arch with an FFN per layer)

The mixer is the piece the layer's kind asks for (MixerByKind: a recurrent mixer, attention, or
nemotron_h's FFN alone). In the last layer only the rows that produce logits go on
(StepGraph.select_outputs), so the last FFN runs on those rows alone, as in llama.cpp.

An arch file states only what is its own, as a HybridStack (its pieces, its FFN norm's name, how
it adds a branch, its embedding and output head), and registers `HybridStack.build_step`.
Imports the IR builder (through common) only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.common import Model, StateLayout, StepGraph, embed_tokens
from ember.models.kv_cache import F16_CACHE, KVCacheTypes

# (s, il, x) -> layer il's branch on its normed input x[T, n_embd]: a mixer or an FFN
LayerPiece = Callable[[StepGraph, int, Node], Node]
# (s, h, branch) -> the residual stream with the branch added
Residual = Callable[[StepGraph, Node, Node], Node]


def add_branch(s: StepGraph, h: Node, branch: Node) -> Node:
    """h + branch, with the branch as the first operand (most archs' graphs print it so)."""
    return s.b.add(branch, h)


def plain_head(s: StepGraph, h: Node) -> Graph:
    """The output norm and head with no arch-specific option (StepGraph.finish's defaults)."""
    return s.finish(h)


def swiglu_ffn(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's dense SwiGLU FFN (StepGraph.ffn) as a LayerPiece."""
    return s.ffn(x, il, "swiglu")


def rope_qk(s: StepGraph, q: Node, k: Node, mode: str, factors: Node | None = None) -> tuple[Node, Node]:
    """q and k rotated over the model's first n_rot dims with its rope base and scale."""
    hp = s.hp
    rope = dict(n_dims=hp.n_rot, mode=mode, freq_base=hp.rope_freq_base, freq_scale=hp.rope_freq_scale)
    return s.b.rope(q, s.pos, factors, **rope), s.b.rope(k, s.pos, factors, **rope)


@dataclass(frozen=True)
class MixerByKind:
    """A mixer that runs, in each layer, the piece the layer's kind asks for
    (HParams.recurrent_layers and attention_flags): the recurrent mixer in a recurrent layer,
    else attention; with ffn_only (nemotron_h), a layer with neither runs an FFN alone."""
    recurrent: LayerPiece
    attention: LayerPiece
    ffn_only: LayerPiece | None = None

    def __call__(self, s: StepGraph, il: int, x: Node) -> Node:
        if s.hp.is_recurrent(il):
            return self.recurrent(s, il, x)
        if self.ffn_only is None or s.hp.has_attention(il):
            return self.attention(s, il, x)
        return self.ffn_only(s, il, x)


@dataclass(frozen=True)
class HybridStack:
    """What an arch's step graph is made of: its mixer, its FFN (None: the mixer is the whole
    layer), the name of its FFN's pre-norm weight in blk.{il}, how a branch joins the residual
    stream, the embedding and the output head (which take the arch's multipliers and names)."""
    mixer: LayerPiece
    ffn: LayerPiece | None = None
    ffn_norm: str = "ffn_norm.weight"
    residual: Residual = add_branch
    embed: Callable[[StepGraph], Node] = embed_tokens
    head: Callable[[StepGraph, Node], Graph] = plain_head

    def build_step(self, model: Model, n_tokens: int, n_kv: int, n_outputs: int,
                   n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE,
                   states: StateLayout = StateLayout()) -> Graph:
        """The step graph (the contract in ember/models/common.py)."""
        s = StepGraph(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, states)
        h = self.embed(s)
        for il in range(s.hp.n_layer):
            h = self.layer(s, il, h)
        return self.head(s, h)

    def layer(self, s: StepGraph, il: int, h: Node) -> Node:
        """Layer il on the residual stream h; the last layer returns the output rows only."""
        p = f"blk.{il}."
        branch = self.mixer(s, il, s.rms_norm(h, p + "attn_norm.weight"))
        if il == s.hp.n_layer - 1:
            branch, h = s.select_outputs(branch), s.select_outputs(h)
        h = self.residual(s, h, branch)
        if self.ffn is not None:
            h = self.residual(s, h, self.ffn(s, il, s.rms_norm(h, p + self.ffn_norm)))
        return h
