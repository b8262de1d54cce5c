"""qwen35moe (Qwen3.5 / Qwen3.6 MoE, e.g. Qwen3.6-35B-A3B) as a step graph, after llama.cpp's
models/qwen35moe.cpp: the qwen35 decoder (ember/models/qwen35.py) with qwen3next's mixture of
experts in every layer (softmax router, top-k, renormalised weights, a shared expert under a
sigmoid gate; ember/models/moe.py). Imports the Qwen3-Next decoder and the MoE FFN only.
"""
from __future__ import annotations

from ember.ir.graph import Graph
from ember.models.common import Model, StateLayout
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.models.moe import moe_ffn
from ember.models.qwen3next import QWEN3NEXT_MOE, build_decoder


def build_step(model: Model, n_tokens: int, n_kv: int, n_outputs: int,
               n_kv_swa: int | None = None, cache: KVCacheTypes = F16_CACHE,
               states: StateLayout = StateLayout()) -> Graph:
    return build_decoder(model, n_tokens, n_kv, n_outputs, n_kv_swa, cache, states, grouped_ba=False,
                         repeat_heads=False, ffn=lambda s, x, il: moe_ffn(s, x, il, QWEN3NEXT_MOE))
