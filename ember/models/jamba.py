"""jamba (AI21 Jamba) as a step graph, after llama.cpp's models/jamba.cpp: Mamba-1 layers
(ember.models.mamba1.mamba1_mixer) and attention layers in one stack, each followed by a SwiGLU
FFN that is dense or a mixture of experts:

    x = rms_norm(h, attn_norm);  h += mamba1(x) or attn(x)
    h += ffn(rms_norm(h, ffn_norm))          dense, or routed to experts

- A layer is recurrent when its head_count_kv is 0 (HParams.recurrent_layers); only the
  attention layers have KV caches, only the Mamba-1 layers conv and SSM state.
- Attention: GQA without rope, scale 1/sqrt(head_dim), Q and the output projection n_embd wide.
- A layer's FFN is a mixture of experts when the file has its router ffn_gate_inp (llama.cpp
  decides the same way): softmax over the experts, the top expert_used_count, their weights not
  renormalised, each expert a SwiGLU FFN of feed_forward_length; no shared expert.
Imports the IR builder (through common, hybrid_layers, mamba1 and moe) only.
"""
from __future__ import annotations

from gguf.constants import Keys

from ember.ir.node import Node
from ember.models.common import StepGraph, build_qkv
from ember.models.gguf_file import ModelFileError
from ember.models.hybrid_layers import HybridStack, MixerByKind
from ember.models.mamba1 import mamba1_mixer
from ember.models.moe import MoeSpec, moe_ffn

JAMBA_MOE = MoeSpec(gating="softmax", norm_weights=False, shared_expert=False)


def attention(s: StepGraph, il: int, x: Node) -> Node:
    hp = s.hp
    q, k, v = build_qkv(s, il, x)
    out = s.attention(il, q, k, v, scale=hp.attn_scale)
    return s.b.mul_mat(out, s.weight(f"blk.{il}.attn_output.weight", hp.n_embd, hp.n_embd))


def feed_forward(s: StepGraph, il: int, x: Node) -> Node:
    """The layer's mixture of experts when it has a router, else its dense SwiGLU FFN."""
    router = f"blk.{il}.ffn_gate_inp.weight"
    if not s.has(router):
        return s.ffn(x, il, "swiglu")
    if not s.hp.n_expert:
        raise ModelFileError(f"{s.file.path}: tensor {router!r} routes layer {il} to experts, but "
                             f"metadata {Keys.LLM.EXPERT_COUNT.format(arch=s.hp.arch)!r} is missing or 0")
    return moe_ffn(s, x, il, JAMBA_MOE)


JAMBA = HybridStack(mixer=MixerByKind(recurrent=mamba1_mixer, attention=attention), ffn=feed_forward)
build_step = JAMBA.build_step
