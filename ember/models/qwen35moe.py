"""qwen35moe (Qwen3.5 / Qwen3.6 MoE, e.g. Qwen3.6-35B-A3B) as a step graph, after llama.cpp's
models/qwen35moe.cpp: the qwen35 decoder (ember/models/qwen35.py) with qwen3next's mixture of
experts in every layer (softmax router, top-k, renormalised weights, a shared expert under a
sigmoid gate; ember/models/moe.py). Imports the Qwen3-Next decoder only.
"""
from __future__ import annotations

from ember.models.qwen3next import decoder, experts

QWEN35MOE = decoder(grouped_ba=False, repeat_heads=False, ffn=experts)
build_step = QWEN35MOE.build_step
