"""falcon-h1 (TII Falcon-H1) as a step graph, after llama.cpp's models/falcon-h1.cpp: every layer
runs attention and a Mamba-2 mixer side by side on the same normed input, then a SwiGLU FFN:

    x = rms_norm(h, attn_norm);  h += attn(x) + mamba2(x);  h += ffn(rms_norm(h, ffn_norm))

So every layer has both a KV cache and conv/SSM state (HParams.attention_flags and
recurrent_layers are all true). Attention: GQA with neox rope, scale 1/sqrt(head_dim), no output
bias. Falcon-H1's muP multipliers (embedding, attention in/out, SSM in/out, key, MLP gate/down,
lm_head) are folded into the weights by llama.cpp's converter (convert_hf_to_gguf.py,
FalconH1Model), so the graph has none. The Mamba-2 group norm (ssm_norm) and the FFN biases are
optional. The FFN norm is `blk.{il}.ffn_norm`, without ".weight", as llama.cpp loads it
(tn(LLM_TENSOR_FFN_NORM, i)). Imports the IR builder (through common, hybrid_layers and mamba2)
only.
"""
from __future__ import annotations

from ember.ir.node import Node
from ember.models.common import StepGraph, build_qkv
from ember.models.hybrid_layers import HybridStack, rope_qk, swiglu_ffn
from ember.models.mamba2 import mamba2_mixer


def parallel_mixers(s: StepGraph, il: int, x: Node) -> Node:
    """Attention and the Mamba-2 mixer on the same normed x, summed."""
    return s.b.add(attention(s, il, x), mamba2_mixer(s, il, x))


def attention(s: StepGraph, il: int, x: Node) -> Node:
    b, hp = s.b, s.hp
    q, k, v = build_qkv(s, il, x)
    q, k = rope_qk(s, q, k, "neox")
    out = s.attention(il, q, k, v, scale=hp.attn_scale)
    return b.mul_mat(out, s.weight(f"blk.{il}.attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v))


FALCON_H1 = HybridStack(mixer=parallel_mixers, ffn=swiglu_ffn, ffn_norm="ffn_norm")
build_step = FALCON_H1.build_step
