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
Imports the IR builder (through common and mamba2) only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.common import Model, StateLayout, StepGraph, build_qkv, embed_tokens
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.models.mamba2 import mamba2_mixer


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE,
               states: StateLayout = StateLayout()) -> Graph:
    s = StepGraph(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, states)
    b, hp = s.b, s.hp
    h = embed_tokens(s)
    if hp.embedding_scale:
        h = b.scale(h, scale=hp.embedding_scale)
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        x = s.rms_norm(h, p + "attn_norm.weight")
        cur = mamba2_mixer(s, il, x) if hp.is_recurrent(il) else attention_layer(s, il, x)
        if il == hp.n_layer - 1:
            cur, h = s.select_outputs(cur), s.select_outputs(h)
        h = b.add(residual(s, cur), h)
        h = b.add(residual(s, s.ffn(s.rms_norm(h, p + "ffn_norm.weight"), il, "swiglu")), h)
    return s.finish(h, logit_scale=hp.logit_scale)


def residual(s: StepGraph, x: Node) -> Node:
    return s.b.scale(x, scale=s.hp.residual_scale) if s.hp.residual_scale else x


def attention_layer(s: StepGraph, il: int, x: Node) -> Node:
    b, hp = s.b, s.hp
    q, k, v = build_qkv(s, il, x)
    if hp.use_rope:
        factors = s.vector("rope_freqs.weight", hp.n_rot // 2, required=False)
        rope = dict(n_dims=hp.n_rot, mode="normal", freq_base=hp.rope_freq_base,
                    freq_scale=hp.rope_freq_scale)
        q, k = b.rope(q, s.pos, factors, **rope), b.rope(k, s.pos, factors, **rope)
    return s.linear(s.attention(il, q, k, v, scale=hp.attn_scale), f"blk.{il}.attn_output", hp.n_embd)
