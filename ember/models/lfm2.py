"""lfm2 and lfm2moe (Liquid AI LFM2, LFM2-MoE) as step graphs, after llama.cpp's models/lfm2.cpp,
which builds both: short-convolution layers and attention layers in one stack, each followed by a
SwiGLU FFN (lfm2) or, past the n_layer_dense_lead leading dense layers, a mixture of experts
(lfm2moe: the router's gating function from expert_gating_func, sigmoid in the released models,
top-k over the probabilities plus the exp_probs_b selection bias, the k weights renormalised, no
shared expert; ember/models/moe.py).

- A layer is a short convolution when its head_count_kv is 0 (HParams.recurrent_layers), else
  GQA attention with QK-norm (rms_norm per head) and neox rope, scale 1/sqrt(head_dim).
- The short convolution: shortconv.in_proj [3 n_embd, n_embd] gives B, C and x (strided views);
  B*x goes through a causal depthwise convolution of width l_cache (shortconv.conv [n_embd,
  l_cache]) carried across steps by conv_state, the last l_cache - 1 rows of B*x it saw (the same
  ssm_conv as Mamba-2's, without bias or activation); C gates the result; shortconv.out_proj.
- The final norm is `token_embd_norm.weight` (llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2); the output
  head falls back to the tied token embedding.
Imports the IR builder (through common and hybrid_layers) and the MoE FFN only.
"""
from __future__ import annotations

import ember.ir.dtypes as dtypes
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.common import Model, StepGraph, build_qkv
from ember.models.hybrid_layers import HybridStack, MixerByKind, rope_qk
from ember.models.mamba2 import f32_weight
from ember.models.moe import MoeSpec, moe_ffn

F32 = dtypes.f32.row_bytes(1)
OUTPUT_NORM = "token_embd_norm.weight"


def add_after_residual(s: StepGraph, h: Node, branch: Node) -> Node:
    """h + branch with h as the first operand: the order lfm2's graph has always had (the sum is
    the same; the IR text, and so every compiled artifact's key, keeps it)."""
    return s.b.add(h, branch)


def output_head(s: StepGraph, h: Node) -> Graph:
    """The output head after lfm2's final norm, token_embd_norm."""
    return s.finish(h, output_norm=OUTPUT_NORM)


def feed_forward(s: StepGraph, il: int, x: Node) -> Node:
    """lfm2moe's experts past its n_layer_dense_lead leading layers, else a dense SwiGLU FFN."""
    hp = s.hp
    if hp.n_expert and il >= hp.n_layer_dense_lead:
        return moe_ffn(s, x, il, moe_spec(s.model))
    return s.ffn(x, il, "swiglu")


def moe_spec(model: Model) -> MoeSpec:
    """lfm2moe's router (llama.cpp's build_moe_ffn with norm_w and the selection bias)."""
    return MoeSpec(gating=model.hparams.expert_gating, norm_weights=True, shared_expert=False,
                   selection_bias=True)


def attention_block(s: StepGraph, il: int, x: Node) -> Node:
    hp = s.hp
    p = f"blk.{il}."
    q, k, v = build_qkv(s, il, x)
    q = s.rms_norm(q, p + "attn_q_norm.weight")
    k = s.rms_norm(k, p + "attn_k_norm.weight")
    q, k = rope_qk(s, q, k, "neox")
    return s.linear(s.attention(il, q, k, v, scale=hp.attn_scale), p + "attn_output", hp.n_embd)


def shortconv_block(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's short convolution on x[T, n_embd] (already normed) -> f32[T, n_embd]; records
    the layer's new conv state(s) with s.write_conv_states."""
    b, hp = s.b, s.hp
    p = f"blk.{il}.shortconv."
    T, E, L = x.shape[0], hp.n_embd, hp.shortconv_l_cache
    bcx = b.mul_mat(x, s.weight(p + "in_proj.weight", 3 * E, E))
    row = bcx.type.strides[0]

    def chunk(i: int) -> Node:
        return b.view(bcx, shape=(T, E), strides=(row, F32), offset=i * E * F32)

    window = b.concat(s.conv_state[il], b.mul(chunk(0), chunk(2)), axis=0)    # state, then B*x
    s.write_conv_states(il, window)
    y = b.mul(chunk(1), b.ssm_conv(window, f32_weight(s, p + "conv.weight", E, L)))
    return b.mul_mat(y, s.weight(p + "out_proj.weight", E, E))


LFM2 = HybridStack(mixer=MixerByKind(recurrent=shortconv_block, attention=attention_block), ffn=feed_forward,
                   residual=add_after_residual, head=output_head)
build_step = LFM2.build_step
