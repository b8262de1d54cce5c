"""qwen2 as a step graph, after llama.cpp's models/qwen2.cpp: the llama decoder with neox rope
and biases on the Q, K and V projections (picked up by build_qkv when the file has them), usually
with the output tied to the token embedding. Imports the llama decoder only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.models.common import Model
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.models.llama import build_decoder


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE) -> Graph:
    return build_decoder(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, rope_mode="neox",
                         rope_freq_factors=False, qk_norm=False)
