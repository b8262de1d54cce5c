"""qwen35 (Qwen3.5 dense) as a step graph, after llama.cpp's models/qwen35.cpp: the Qwen3-Next
decoder (ember/models/qwen3next.py) with imrope sections, beta and alpha from their own tensors
(ssm_beta, ssm_alpha), q/k heads mapped to v heads modulo H_k (ggml's fused gated_delta_net), and
a dense SwiGLU FFN (ffn_gate, ffn_up, ffn_down). Imports the Qwen3-Next decoder only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.models.common import Model, StateLayout
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.models.qwen3next import build_decoder


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE,
               states: StateLayout = StateLayout()) -> Graph:
    return build_decoder(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, states, grouped_ba=False,
                         repeat_heads=False, ffn=lambda s, x, il: s.ffn(x, il, "swiglu"))
