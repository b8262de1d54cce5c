"""qwen35 (Qwen3.5 dense) as a step graph, after llama.cpp's models/qwen35.cpp: the Qwen3-Next
decoder (ember/models/qwen3next.py) with imrope sections, beta and alpha from their own tensors
(ssm_beta, ssm_alpha), q/k heads mapped to v heads modulo H_k (ggml's fused gated_delta_net), and
a dense SwiGLU FFN (ffn_gate, ffn_up, ffn_down). Imports the Qwen3-Next decoder and
hybrid_layers only.
"""
from __future__ import annotations

from ember.models.hybrid_layers import swiglu_ffn
from ember.models.qwen3next import decoder

QWEN35 = decoder(grouped_ba=False, repeat_heads=False, ffn=swiglu_ffn)
build_step = QWEN35.build_step
