"""falcon-h1 (TII Falcon-H1) as a step graph, after llama.cpp's models/falcon-h1.cpp: every layer
runs attention and a Mamba-2 mixer side by side on the same normed input, then a SwiGLU FFN:

    x = rms_norm(h, attn_norm);  h += attn(x) + mamba2(x);  h += ffn(rms_norm(h, ffn_norm))

So every layer has both a KV cache and conv/SSM state (HParams.attention_flags and
recurrent_layers are all true). Attention: GQA with neox rope, scale 1/sqrt(head_dim), no output
bias. Falcon-H1's muP multipliers (embedding, attention in/out, SSM in/out, key, MLP gate/down,
lm_head) are folded into the weights by llama.cpp's converter (convert_hf_to_gguf.py,
FalconH1Model), so the graph has none. The Mamba-2 group norm (ssm_norm) and the FFN biases are
optional. The FFN norm is `blk.{il}.ffn_norm`, without ".weight", as llama.cpp loads it
(tn(LLM_TENSOR_FFN_NORM, i)). Imports the IR builder (through common and mamba2) only.
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
        p = f"blk.{il}."
        x = s.rms_norm(h, p + "attn_norm.weight")
        cur = b.add(attention(s, il, x), mamba2_mixer(s, il, x))
        if il == hp.n_layer - 1:
            cur, h = s.select_outputs(cur), s.select_outputs(h)
        h = b.add(cur, h)
        h = b.add(s.ffn(s.rms_norm(h, p + "ffn_norm"), il, "swiglu"), h)
    return s.finish(h)


def attention(s: StepGraph, il: int, x: Node) -> Node:
    b, hp = s.b, s.hp
    q, k, v = build_qkv(s, il, x)
    rope = dict(n_dims=hp.n_rot, mode="neox", freq_base=hp.rope_freq_base, freq_scale=hp.rope_freq_scale)
    q, k = b.rope(q, s.pos, None, **rope), b.rope(k, s.pos, None, **rope)
    out = s.attention(il, q, k, v, scale=hp.attn_scale)
    return b.mul_mat(out, s.weight(f"blk.{il}.attn_output.weight", hp.n_embd, hp.n_head * hp.head_dim_v))
