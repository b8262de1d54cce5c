"""llama as a step graph (Llama 1-3 and the many GGUFs that reuse the arch), after llama.cpp's
models/llama.cpp: pre-norm attention with normal (adjacent-pair) rope, llama-3 frequency factors
when the file has `rope_freqs.weight`, a SwiGLU FFN. `build_decoder` also serves qwen2 and qwen3,
which differ only in settings. Imports the IR builder (through common) only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.models.common import Model, StepGraph, build_qkv, embed_tokens
from ember.models.kv_cache import F16_CACHE, KVCacheTypes


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE) -> Graph:
    return build_decoder(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, rope_mode="normal",
                         rope_freq_factors=True, qk_norm=False)


def build_decoder(model: Model, n_tokens: int, n_kv: int, n_outputs: int, n_kv_swa: int | None,
                  cache: KVCacheTypes, *, rope_mode: str,
                  rope_freq_factors: bool, qk_norm: bool) -> Graph:
    """The llama-family decoder: h += attn(norm(h)); h += ffn(norm(h)); logits of the outputs.

    qk_norm applies an rms_norm with weight per head to q and k before rope (qwen3)."""
    s = StepGraph(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache)
    b, hp = s.b, s.hp
    factors = s.vector("rope_freqs.weight", hp.n_rot // 2, required=False) if rope_freq_factors else None
    h = embed_tokens(s)
    for il in range(hp.n_layer):
        p = f"blk.{il}."
        x = s.rms_norm(h, p + "attn_norm.weight")
        q, k, v = build_qkv(s, il, x)
        if qk_norm:
            q = s.rms_norm(q, p + "attn_q_norm.weight")
            k = s.rms_norm(k, p + "attn_k_norm.weight")
        rope = dict(n_dims=hp.n_rot, mode=rope_mode, freq_base=hp.rope_freq_base,
                    freq_scale=hp.rope_freq_scale)
        q = b.rope(q, s.pos, factors, **rope)
        k = b.rope(k, s.pos, factors, **rope)
        attn = s.linear(s.attention(il, q, k, v, scale=hp.attn_scale), p + "attn_output", hp.n_embd)
        if il == hp.n_layer - 1:
            attn, h = s.select_outputs(attn), s.select_outputs(h)
        h = b.add(attn, h)
        h = b.add(s.ffn(s.rms_norm(h, p + "ffn_norm.weight"), il, "swiglu"), h)
    return s.finish(h)
