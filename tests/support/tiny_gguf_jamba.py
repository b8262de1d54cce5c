"""Tiny random-weight GGUF files of jamba (Mamba-1 + attention + mixture of experts), for tests.

    python tests/support/tiny_gguf_jamba.py OUTDIR    # the f32 and q8_0 files

5 layers: Mamba-1 at 0, 1 and 3, attention at 2 and 4 (per-layer head_count_kv [0, 0, 1, 0, 1]);
a dense SwiGLU FFN of 224 after layers 0 and 2, a mixture of 5 experts of 224 (2 used, softmax
router, no renormalisation) after layers 1, 3 and 4, so every pairing of mixer and FFN occurs.
n_embd 160 (llama.cpp's jamba needs d_inner = 2 n_embd: 320), d_state 13, dt rank 7, d_conv 4;
attention 5 heads / 1 KV head of 32 without rope; untied output; the 320-token SentencePiece-style
vocabulary of tiny_gguf. Odd sizes where the format allows (every matmul's K a multiple of 32 so
q8_0 fits, except ssm_dt's K = dt rank, which stays F32 as llama.cpp's quantizer leaves a row it
cannot block). Fixed seed; the SSM parameters are drawn like Mamba-1's initialization (A = -[1..N]
per channel, jittered; dt after softplus in [0.01, 1], wider than Mamba's [0.001, 0.1] so the
state weighs as much as the D skip). The small SSM tensors and the router stay F32, as llama.cpp's
quantizer keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiny_gguf import N_VOCAB, spm_vocab, write_tensors, write_vocab
from tiny_gguf_common import (add_ssm_sizes, edited, expert_weights, open_spec_writer, qkv_weights,
                              random_matrix, random_norm, small_tensors, swiglu_weights, write_all_main)


@dataclass(frozen=True)
class JambaConfig:
    seed: int = 31
    layers: str = "MMAMA"              # M Mamba-1, A attention
    moe_layers: tuple[int, ...] = (1, 3, 4)
    n_embd: int = 160
    n_head: int = 5
    n_head_kv: int = 1
    n_ff: int = 224
    n_expert: int = 5
    n_expert_used: int = 2
    d_inner: int = 320
    d_state: int = 13
    dt_rank: int = 7
    d_conv: int = 4
    rms_eps: float = 1e-6
    n_ctx: int = 4096
    n_vocab: int = N_VOCAB

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(il for il, kind in enumerate(self.layers) if kind == "A")

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(il for il, kind in enumerate(self.layers) if kind == "M")


JAMBA_CONFIG = JambaConfig()


@dataclass(frozen=True)
class JambaSpec:
    weight_type: str = "f32"
    arch: str = "jamba"

    @property
    def config(self) -> JambaConfig:
        return JAMBA_CONFIG

    @property
    def filename(self) -> str:
        return f"jamba-{self.weight_type}.gguf"

    def __str__(self) -> str:
        return self.filename


JAMBA_SPECS = (JambaSpec("f32"), JambaSpec("q8_0"))
SMALL_TENSORS = ("ssm_conv1d.weight", "ssm_dt.weight", "ssm_a", "ffn_gate_inp.weight")


def mamba1_weights(rng: np.random.Generator, p: str, cfg: JambaConfig) -> dict[str, np.ndarray]:
    """One Mamba-1 mixer's tensors (jamba's, with the dt/B/C norms) under prefix p."""
    E, D, N, R, K = cfg.n_embd, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    dt = np.exp(rng.uniform(np.log(1e-2), np.log(1.0), D))
    a = np.tile(np.arange(1, N + 1, dtype=np.float64), (D, 1)) * rng.uniform(0.5, 1.5, (D, N))
    return {p + "ssm_in.weight": random_matrix(rng, 2 * D, E),
            p + "ssm_conv1d.weight": (rng.standard_normal((D, K)) / np.sqrt(K)).astype(np.float32),
            p + "ssm_conv1d.bias": (0.1 * rng.standard_normal(D)).astype(np.float32),
            p + "ssm_x.weight": random_matrix(rng, R + 2 * N, D),
            p + "ssm_dt_norm.weight": random_norm(rng, R),
            p + "ssm_b_norm.weight": random_norm(rng, N),
            p + "ssm_c_norm.weight": random_norm(rng, N),
            p + "ssm_dt.weight": rng.uniform(-R ** -0.5, R ** -0.5, (D, R)).astype(np.float32),
            p + "ssm_dt.bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32),   # softplus^-1
            p + "ssm_a": (-a).astype(np.float32),
            p + "ssm_d": random_norm(rng, D),
            p + "ssm_out.weight": random_matrix(rng, E, D)}


def make_jamba_weights(cfg: JambaConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    E, HD = cfg.n_embd, cfg.head_dim
    w = {"token_embd.weight": rng.standard_normal((cfg.n_vocab, E)).astype(np.float32),
         "output_norm.weight": random_norm(rng, E),
         "output.weight": random_matrix(rng, cfg.n_vocab, E)}
    for il, kind in enumerate(cfg.layers):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = random_norm(rng, E)
        if kind == "A":
            w.update(qkv_weights(rng, p, E, cfg.n_head * HD, cfg.n_head_kv * HD))
            w[p + "attn_output.weight"] = random_matrix(rng, E, E)
        else:
            w.update(mamba1_weights(rng, p, cfg))
        w[p + "ffn_norm.weight"] = random_norm(rng, E)
        if il in cfg.moe_layers:
            X, F = cfg.n_expert, cfg.n_ff
            w[p + "ffn_gate_inp.weight"] = random_matrix(rng, X, E)
            w.update(expert_weights(rng, p, E, X, F))
        else:
            w.update(swiglu_weights(rng, p, E, cfg.n_ff))
    return w


def write_jamba_gguf(path: str | Path, spec: JambaSpec, edit=None, metadata=None) -> Path:
    """Write spec's file; edit, when given, maps the weights dict to the one written; metadata,
    when given, is called with the writer after the standard keys (to add or override some)."""
    cfg = spec.config
    path = Path(path)
    weights = edited(make_jamba_weights(cfg), edit)
    w = open_spec_writer(path, spec)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    # per layer, as convert_hf_to_gguf's JambaModel writes it: 0 marks a Mamba layer
    w.add_head_count_kv([cfg.n_head_kv if kind == "A" else 0 for kind in cfg.layers])
    add_ssm_sizes(w, cfg.d_conv, cfg.d_inner, cfg.d_state, cfg.dt_rank)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    if metadata is not None:
        metadata(w)
    write_vocab(w, spm_vocab(cfg.n_vocab))
    write_tensors(w, weights, spec.weight_type, keep_f32=small_tensors(weights, SMALL_TENSORS))
    return path


if __name__ == "__main__":
    write_all_main("tests/support/tiny_gguf_jamba.py", JAMBA_SPECS, write_jamba_gguf)
