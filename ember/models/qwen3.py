"""qwen3 as a step graph, after llama.cpp's models/qwen3.cpp: the llama decoder with neox rope
and QK-norm (an rms_norm with its own weight over each head of q and k, before rope), no QKV
biases. Imports the llama decoder only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.models.common import Model
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.models.llama import build_decoder


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE) -> Graph:
    return build_decoder(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, rope_mode="neox",
                         rope_freq_factors=False, qk_norm=True)
