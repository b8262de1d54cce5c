"""qwen3next (Qwen3-Next) as a step graph, after llama.cpp's models/qwen3next.cpp; its layer stack
`decoder` also serves qwen35 and qwen35moe (ember/models/qwen35.py, qwen35moe.py).

Each layer: h += mixer(rms_norm(h, attn_norm)); h += ffn(rms_norm(h, post_attention_norm)).
The mixer is a gated DeltaNet (ember/models/delta_net_layer.py) in the recurrent layers
(HParams.recurrent_layers: all but every full_attention_interval-th) and gated full attention in
the others:
- attn_q gives 2 head_dim values per head: the query, then a gate (interleaved per head);
- q and k take an rms norm per head (attn_q_norm, attn_k_norm), then rope over the first n_rot
  dims of each head (partial rope; neox pairs; qwen35's imrope reduces to neox for text, where
  the t, h and w positions are the token's position and the e section's position is 0);
- the attention output times sigmoid(gate), then attn_output.
qwen3next's FFN is a mixture of experts with a gated shared expert (ember/models/moe.py), its
DeltaNet takes beta/alpha from one ssm_ba tensor and repeats q/k heads in a row.
Imports the IR builder (through common, hybrid_layers and the layer modules) only.
"""
from __future__ import annotations

from functools import partial

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.node import Node
from ember.models.common import StepGraph
from ember.models.delta_net_layer import delta_net_layer
from ember.models.hybrid_layers import HybridStack, LayerPiece, MixerByKind, rope_qk
from ember.models.moe import MoeSpec, moe_ffn

F32 = dtypes.f32.row_bytes(1)
QWEN3NEXT_MOE = MoeSpec(gating="softmax", norm_weights=True, shared_expert=True, shared_gate=True)


def decoder(*, grouped_ba: bool, repeat_heads: bool, ffn: LayerPiece) -> HybridStack:
    """The Qwen3-Next / Qwen3.5 layer stack: the DeltaNet's beta/alpha and head options
    (delta_net_layer), ffn the layer's FFN; the FFN's pre-norm is post_attention_norm."""
    delta_net = partial(delta_net_layer, grouped_ba=grouped_ba, repeat_heads=repeat_heads)
    return HybridStack(mixer=MixerByKind(recurrent=delta_net, attention=gated_attention), ffn=ffn,
                       ffn_norm="post_attention_norm.weight")


def experts(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's mixture of experts with its gated shared expert (QWEN3NEXT_MOE)."""
    return moe_ffn(s, x, il, QWEN3NEXT_MOE)


def gated_attention(s: StepGraph, il: int, x: Node) -> Node:
    """Layer il's gated full attention on x[T, n_embd] -> f32[T, n_embd]."""
    b, hp = s.b, s.hp
    p = f"blk.{il}."
    T, D = x.shape
    H, H_kv, hd = hp.n_head, hp.n_head_kv, hp.head_dim_k
    q_full = b.mul_mat(x, s.weight(p + "attn_q.weight", 2 * H * hd, D))     # per head: q, gate
    row = q_full.type.strides[0]
    q = b.view(q_full, shape=(T, H, hd), strides=(row, 2 * hd * F32, F32))
    gate = b.view(q_full, shape=(T, H, hd), strides=(row, 2 * hd * F32, F32), offset=hd * F32)
    k = b.reshape(b.mul_mat(x, s.weight(p + "attn_k.weight", H_kv * hd, D)), T, H_kv, hd)
    v = b.reshape(b.mul_mat(x, s.weight(p + "attn_v.weight", H_kv * hd, D)), T, H_kv, hd)
    q = s.rms_norm(q, p + "attn_q_norm.weight")
    k = s.rms_norm(k, p + "attn_k_norm.weight")
    factors = imrope_factors(hp.rope_sections, hp.n_rot)
    factors = b.literal(factors) if factors is not None else None
    q, k = rope_qk(s, q, k, "neox", factors)
    attn = s.attention(il, q, k, v, scale=hp.attn_scale)                       # [T, H * hd]
    attn = b.mul(attn, b.sigmoid(b.reshape(b.cont(gate), T, H * hd)))
    return b.mul_mat(attn, s.weight(p + "attn_output.weight", D, H * hd))


def imrope_factors(sections: tuple[int, ...], n_rot: int) -> np.ndarray | None:
    """Frequency factors that make ggml's imrope (ggml_rope_multi, interleaved sections) of a text
    token equal to neox rope: pair i takes section (i % sum) cyclically t, h, w while each has
    pairs left, else e; text tokens have t = h = w = their position and e = 0, so pairs of the e
    section do not turn (factor inf: angle 0). None when every pair turns (or no sections)."""
    if not sections:
        return None
    t, h, w = sections[:3]
    total = sum(sections[:4])
    turning = []
    for i in range(n_rot // 2):
        sector = i % total
        turning.append((sector % 3 == 0 and sector < 3 * t) or (sector % 3 == 1 and sector < 3 * h)
                       or (sector % 3 == 2 and sector < 3 * w))
    if all(turning):
        return None
    return np.where(turning, 1.0, np.inf).astype(np.float32)


QWEN3NEXT = decoder(grouped_ba=True, repeat_heads=True, ffn=experts)
build_step = QWEN3NEXT.build_step
