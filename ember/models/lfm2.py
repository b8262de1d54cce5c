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
Imports the IR builder (through common) and the MoE FFN only.
"""
from __future__ import annotations

import ember.ir.dtypes as dtypes
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.models.common import Model, StateLayout, StepGraph, build_qkv, embed_tokens
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.models.mamba2 import f32_weight
from ember.models.moe import MoeSpec, moe_ffn

F32 = dtypes.f32.row_bytes(1)
OUTPUT_NORM = "token_embd_norm.weight"


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE,
               states: StateLayout = StateLayout()) -> Graph:
    s = StepGraph(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, states)
    b, hp = s.b, s.hp
    h = embed_tokens(s)
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        x = s.rms_norm(h, p + "attn_norm.weight")
        cur = shortconv_block(s, il, x) if hp.is_recurrent(il) else attention_block(s, il, x)
        if il == hp.n_layer - 1:
            cur, h = s.select_outputs(cur), s.select_outputs(h)
        h = b.add(h, cur)
        x = s.rms_norm(h, p + "ffn_norm.weight")
        if hp.n_expert and il >= hp.n_layer_dense_lead:
            h = b.add(h, moe_ffn(s, x, il, moe_spec(model)))
        else:
            h = b.add(h, s.ffn(x, il, "swiglu"))
    return s.finish(h, output_norm=OUTPUT_NORM)


def moe_spec(model: Model) -> MoeSpec:
    """lfm2moe's router (llama.cpp's build_moe_ffn with norm_w and the selection bias)."""
    return MoeSpec(gating=model.hparams.expert_gating, norm_weights=True, shared_expert=False,
                   selection_bias=True)


def attention_block(s: StepGraph, il: int, x: Node) -> Node:
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    q, k, v = build_qkv(s, il, x)
    q = s.rms_norm(q, p + "attn_q_norm.weight")
    k = s.rms_norm(k, p + "attn_k_norm.weight")
    rope = dict(n_dims=hp.n_rot, mode="neox", freq_base=hp.rope_freq_base, freq_scale=hp.rope_freq_scale)
    q, k = b.rope(q, s.pos, None, **rope), b.rope(k, s.pos, None, **rope)
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
