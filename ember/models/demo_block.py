"""A small random-weight transformer block: the built-in demo and a test workload.

It is written with the builder as a model would be: pre-norm attention with rope and GQA, then
a gated FFN. Weights are random (fixed seed) in a chosen weight dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ember.ir.builder import GraphBuilder
from ember.ir.graph import Graph


@dataclass(frozen=True)
class BlockConfig:
    tokens: int = 16
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 512
    weight_dtype: str = "q8_0"
    seed: int = 0


def transformer_block(cfg: BlockConfig = BlockConfig()) -> Graph:
    rng = np.random.default_rng(cfg.seed)
    b = GraphBuilder("block")

    def weight(name, rows, cols):
        return b.weight(name, rng.standard_normal((rows, cols)) / np.sqrt(cols), cfg.weight_dtype)

    def norm_weight(name, n):
        return b.weight(name, 1.0 + 0.1 * rng.standard_normal(n))

    T, hd = cfg.tokens, cfg.head_dim
    x = b.input("x", "f32", (T, cfg.n_embd))
    pos = b.input("pos", "i32", (T,))

    h = b.mul(b.rms_norm(x, eps=1e-6), norm_weight("attn_norm", cfg.n_embd))
    q = b.reshape(b.mul_mat(h, weight("wq", cfg.n_head * hd, cfg.n_embd)), T, cfg.n_head, hd)
    k = b.reshape(b.mul_mat(h, weight("wk", cfg.n_head_kv * hd, cfg.n_embd)), T, cfg.n_head_kv, hd)
    v = b.reshape(b.mul_mat(h, weight("wv", cfg.n_head_kv * hd, cfg.n_embd)), T, cfg.n_head_kv, hd)
    q = b.rope(q, pos, mode="neox", freq_base=10000.0)
    k = b.rope(k, pos, mode="neox", freq_base=10000.0)
    attn = b.attention(q, k, v, scale=1.0 / np.sqrt(hd), causal=True)
    attn = b.mul_mat(b.reshape(attn, T, cfg.n_head * hd), weight("wo", cfg.n_embd, cfg.n_head * hd))
    x = b.add(x, attn)

    h = b.mul(b.rms_norm(x, eps=1e-6), norm_weight("ffn_norm", cfg.n_embd))
    gate = b.mul_mat(h, weight("w_gate", cfg.n_ff, cfg.n_embd))
    up = b.mul_mat(h, weight("w_up", cfg.n_ff, cfg.n_embd))
    x = b.add(x, b.mul_mat(b.swiglu(gate, up), weight("w_down", cfg.n_embd, cfg.n_ff)))
    return b.build(x)


def block_inputs(cfg: BlockConfig = BlockConfig()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed + 1)
    return {"x": rng.standard_normal((cfg.tokens, cfg.n_embd)).astype(np.float32),
            "pos": np.arange(cfg.tokens, dtype=np.int32)}
