"""nemotron_h (NVIDIA Nemotron-H) as a step graph, after llama.cpp's models/nemotron-h.cpp: one
stack of three kinds of layer, each h += block(rms_norm(h)) with its own attn_norm:

- Mamba-2 layers (ember.models.mamba2.mamba2_mixer): no KV heads and no feed_forward_length;
- attention layers (KV heads, no feed_forward_length): GQA without rope (llama.cpp's
  LLAMA_ROPE_TYPE_NONE), scale 1/sqrt(head_dim), optional Q/K/V and output biases;
- FFN-only layers (a feed_forward_length): down(relu(up(x))^2), no gate, optional biases (the
  squared ReLU is relu then a product with itself, as ggml's relu and sqr).
HParams.recurrent_layers and attention_flags say which layer is which. The mixture-of-experts
variant (nemotron_h_moe) is another architecture. Imports the IR builder (through common,
hybrid_layers and mamba2) only.
"""
from __future__ import annotations

from ember.ir.node import Node
from ember.models.common import StepGraph, build_qkv
from ember.models.hybrid_layers import HybridStack, MixerByKind
from ember.models.mamba2 import mamba2_mixer


def attention(s: StepGraph, il: int, x: Node) -> Node:
    q, k, v = build_qkv(s, il, x)
    return s.linear(s.attention(il, q, k, v, scale=s.hp.attn_scale), f"blk.{il}.attn_output", s.hp.n_embd)


def relu_squared_ffn(s: StepGraph, il: int, x: Node) -> Node:
    """llama.cpp's build_ffn with LLM_FFN_RELU_SQR and no gate."""
    b, p = s.b, f"blk.{il}."
    up = b.relu(s.linear(x, p + "ffn_up", s.hp.n_ff))
    return s.linear(b.mul(up, up), p + "ffn_down", s.hp.n_embd)


# each layer is one block (no FFN after it): Mamba-2, attention, or the FFN alone
NEMOTRON_H = HybridStack(mixer=MixerByKind(recurrent=mamba2_mixer, attention=attention,
                                           ffn_only=relu_squared_ffn))
build_step = NEMOTRON_H.build_step
