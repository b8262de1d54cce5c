"""gemma3 as a step graph, after llama.cpp's models/gemma3.cpp.

- Embeddings are scaled by sqrt(n_embd).
- Norm weights are used as stored: llama.cpp's converter already added Gemma's +1
  (convert_hf_to_gguf, Gemma3Model.norm_shift), so the GGUF holds 1 + w.
- Each layer: pre- and post-norms around attention and around the FFN; QK-norm per head before
  rope; neox rope; a GeGLU FFN (tanh-approximated gelu).
- Sliding-window layers (HParams.swa_layers) attend with mask_swa and rotate with their own base
  (rope.freq_base_swa, default 10000) and scale 1; global layers use rope.freq_base and the
  file's rope scaling.
- Queries are scaled by HParams.attn_scale (1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the
  27B model), applied here as the attention's scale instead of a separate multiply.
- The output is the tied token embedding unless the file has output.weight; the logits are
  soft-capped when final_logit_softcapping is set.
Imports the IR builder (through common) only.
"""
from __future__ import annotations

import math

from ember.ir.graph import Graph
from ember.models.common import Model, StepGraph, build_qkv, embed_tokens
from ember.models.kv_cache import F16_CACHE, KVCacheTypes


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE) -> Graph:
    s = StepGraph(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache)
    b, hp = s.b, s.hp
    h = b.scale(embed_tokens(s), scale=math.sqrt(hp.n_embd))
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        x = s.rms_norm(h, p + "attn_norm.weight")
        q, k, v = build_qkv(s, il, x)
        rope = dict(n_dims=hp.n_rot, mode="neox", freq_base=hp.rope_base(il),
                    freq_scale=hp.rope_scale(il))
        q = b.rope(s.rms_norm(q, p + "attn_q_norm.weight"), s.pos, **rope)
        k = b.rope(s.rms_norm(k, p + "attn_k_norm.weight"), s.pos, **rope)
        attn = s.attention(il, q, k, v, scale=hp.attn_scale, swa=hp.is_swa(il))
        attn = s.linear(attn, p + "attn_output", hp.n_embd)
        if il == hp.n_layer - 1:
            attn, h = s.select_outputs(attn), s.select_outputs(h)
        h = b.add(s.rms_norm(attn, p + "post_attention_norm.weight"), h)
        x = s.ffn(s.rms_norm(h, p + "ffn_norm.weight"), il, "geglu")
        h = b.add(s.rms_norm(x, p + "post_ffw_norm.weight"), h)
    return s.finish(h, softcap=hp.final_logit_softcap)
