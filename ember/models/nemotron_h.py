"""nemotron_h (NVIDIA Nemotron-H) as a step graph, after llama.cpp's models/nemotron-h.cpp: one
stack of three kinds of layer, each h += block(rms_norm(h)) with its own attn_norm:

- Mamba-2 layers (ember.models.mamba2.mamba2_mixer): no KV heads and no feed_forward_length;
- attention layers (KV heads, no feed_forward_length): GQA without rope (llama.cpp's
  LLAMA_ROPE_TYPE_NONE), scale 1/sqrt(head_dim), optional Q/K/V and output biases;
- FFN-only layers (a feed_forward_length): down(relu(up(x))^2), no gate, optional biases (the
  squared ReLU is relu then a product with itself, as ggml's relu and sqr).
HParams.recurrent_layers and attention_flags say which layer is which. The mixture-of-experts
variant (nemotron_h_moe) is another architecture. Imports the IR builder (through common and
mamba2) only.
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
    for il in range(hp.n_layer):
        x = s.rms_norm(h, f"blk.{il}.attn_norm.weight")
        if hp.is_recurrent(il):
            cur = mamba2_mixer(s, il, x)
        elif hp.has_attention(il):
            q, k, v = build_qkv(s, il, x)
            cur = s.linear(s.attention(il, q, k, v, scale=hp.attn_scale), f"blk.{il}.attn_output", hp.n_embd)
        else:
            cur = relu_squared_ffn(s, il, x)
        if il == hp.n_layer - 1:
            cur, h = s.select_outputs(cur), s.select_outputs(h)
        h = b.add(cur, h)
    return s.finish(h)


def relu_squared_ffn(s: StepGraph, il: int, x: Node) -> Node:
    """llama.cpp's build_ffn with LLM_FFN_RELU_SQR and no gate."""
    b, p = s.b, f"blk.{il}."
    up = b.relu(s.linear(x, p + "ffn_up", s.hp.n_ff))
    return s.linear(b.mul(up, up), p + "ffn_down", s.hp.n_embd)
