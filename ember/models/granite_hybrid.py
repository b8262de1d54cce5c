"""granitehybrid (IBM Granite 4.0 "H" models, Bamba) as a step graph, after llama.cpp's
models/granite-hybrid.cpp: Mamba-2 layers (ember.models.mamba2.mamba2_mixer) and attention layers
in one stack, each followed by a SwiGLU FFN.

- A layer is recurrent when its head_count_kv is 0 (HParams.recurrent_layers); only the
  attention layers have KV caches, only the recurrent ones conv/SSM state.
- Granite's multipliers: embeddings times embedding_scale, both residual branches times
  residual_scale, attention scores times attention.scale (instead of 1/sqrt(head_dim)), logits
  divided by logit_scale; each only when the file sets it.
- Rope (normal mode, optional rope_freqs factors) only when rope.scaling.finetuned is true (its
  default); the Granite 4.0 hybrids set it false and attend without positions.
- Optional biases on Q/K/V, the attention output and the FFN, as llama.cpp loads them.
The mixture-of-experts variant is refused when the hyper-parameters are read.
Imports the IR builder (through common, hybrid_layers and mamba2) only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.common import StepGraph, build_qkv, embed_tokens
from ember.models.hybrid_layers import HybridStack, MixerByKind, rope_qk, swiglu_ffn
from ember.models.mamba2 import mamba2_mixer


def scaled_embeddings(s: StepGraph) -> Node:
    """The token embeddings times embedding_scale (when the file sets it)."""
    h = embed_tokens(s)
    return s.b.scale(h, scale=s.hp.embedding_scale) if s.hp.embedding_scale else h


def add_scaled_branch(s: StepGraph, h: Node, branch: Node) -> Node:
    """h + branch * residual_scale (the branch alone when the file sets no residual_scale)."""
    if s.hp.residual_scale:
        branch = s.b.scale(branch, scale=s.hp.residual_scale)
    return s.b.add(branch, h)


def scaled_logits(s: StepGraph, h: Node) -> Graph:
    """The output head, its logits divided by logit_scale (when the file sets it)."""
    return s.finish(h, logit_scale=s.hp.logit_scale)


def attention_layer(s: StepGraph, il: int, x: Node) -> Node:
    hp = s.hp
    q, k, v = build_qkv(s, il, x)
    if hp.use_rope:
        factors = s.vector("rope_freqs.weight", hp.n_rot // 2, required=False)
        q, k = rope_qk(s, q, k, "normal", factors)
    return s.linear(s.attention(il, q, k, v, scale=hp.attn_scale), f"blk.{il}.attn_output", hp.n_embd)


GRANITE_HYBRID = HybridStack(mixer=MixerByKind(recurrent=mamba2_mixer, attention=attention_layer),
                             ffn=swiglu_ffn, residual=add_scaled_branch, embed=scaled_embeddings,
                             head=scaled_logits)
build_step = GRANITE_HYBRID.build_step
