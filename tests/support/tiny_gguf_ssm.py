"""Tiny random-weight GGUF files of the architectures with Mamba-2 layers, for tests.

    python tests/support/tiny_gguf_ssm.py OUTDIR    # every file of SSM_SPECS

- mamba2: 2 recurrent layers, tied output (as the released Mamba-2 models).
- granitehybrid: 3 layers, recurrent / attention / recurrent (head_count_kv [0, 2, 0]), a SwiGLU
  FFN in every layer, Granite's four multipliers, no rope (rope.scaling.finetuned false, as the
  Granite 4.0 "H" models), untied output.
n_embd 256 and d_inner 512 (granitehybrid requires d_inner = 2 n_embd), 8 SSM heads of 64,
d_conv 4, and the 320-token SentencePiece-style vocabulary of tiny_gguf. Weights come from fixed
seeds; the SSM parameters are drawn like Mamba-2's initialization (A in -[1, 16], dt after
softplus in [0.01, 1], wider than Mamba-2's [0.001, 0.1] so the state weighs as much as the D
skip): some heads remember for many tokens, others for a few. The 2-D weights take the
file's weight type except the small SSM tensors, which stay F32 as llama.cpp's quantizer keeps
them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiny_gguf import N_VOCAB, spm_vocab, write_tensors, write_vocab
from tiny_gguf_common import (TinySpec, add_ssm_sizes, edited, open_spec_writer, qkv_weights, random_matrix,
                              random_norm, small_tensors, swiglu_weights, write_all_main)

SSM_ARCHS = ("mamba2", "granitehybrid")


@dataclass(frozen=True)
class SsmConfig:
    arch: str
    seed: int
    n_layer: int
    attention_layers: tuple[int, ...] = ()
    n_embd: int = 256
    d_inner: int = 512
    d_state: int = 16
    n_ssm_head: int = 8
    n_group: int = 2
    d_conv: int = 4
    n_head: int = 4           # attention layers
    n_head_kv: int = 2
    n_ff: int = 512
    n_ctx: int = 4096
    n_vocab: int = N_VOCAB
    rms_eps: float = 1e-5
    tied_output: bool = False
    embedding_scale: float = 0.0
    residual_scale: float = 0.0
    attention_scale: float = 0.0
    logit_scale: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def conv_channels(self) -> int:
        return self.d_inner + 2 * self.n_group * self.d_state


SSM_CONFIGS = {
    "mamba2": SsmConfig("mamba2", seed=11, n_layer=2, tied_output=True),
    "granitehybrid": SsmConfig("granitehybrid", seed=12, n_layer=3, attention_layers=(1,),
                               d_state=32, n_group=1, embedding_scale=12.0, residual_scale=0.22,
                               attention_scale=0.015625, logit_scale=8.0),
}


class SsmSpec(TinySpec):
    @property
    def config(self) -> SsmConfig:
        return SSM_CONFIGS[self.arch]


SSM_SPECS = tuple(SsmSpec(a, t) for a in SSM_ARCHS for t in ("f32", "q8_0"))
SMALL_SSM_TENSORS = ("ssm_conv1d.weight", "ssm_a", "ssm_d", "ssm_norm.weight")


def make_ssm_weights(cfg: SsmConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)

    def matrix(rows, cols):
        return random_matrix(rng, rows, cols)

    def norm(*shape):
        return random_norm(rng, *shape)

    E = cfg.n_embd
    # embeddings of unit size after embedding_scale (else they drown the layers' residuals)
    embd_std = 1.0 / cfg.embedding_scale if cfg.embedding_scale else 1.0
    w = {"token_embd.weight": (embd_std * rng.standard_normal((cfg.n_vocab, E))).astype(np.float32),
         "output_norm.weight": norm(E)}
    if not cfg.tied_output:
        w["output.weight"] = matrix(cfg.n_vocab, E)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(E)
        if il in cfg.attention_layers:
            n_q, n_kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
            w.update(qkv_weights(rng, p, E, n_q, n_kv))
            w[p + "attn_output.weight"] = matrix(E, n_q)
        else:
            w.update(mamba2_weights(rng, p, cfg))
        if cfg.arch == "granitehybrid":
            w[p + "ffn_norm.weight"] = norm(E)
            w.update(swiglu_weights(rng, p, E, cfg.n_ff))
    return w


def mamba2_weights(rng: np.random.Generator, p: str, cfg, norm_weight: bool = True) -> dict[str, np.ndarray]:
    """One Mamba-2 mixer's tensors under prefix p; cfg has n_embd, d_inner, d_state, n_ssm_head,
    n_group, d_conv and conv_channels (SsmConfig and the hybrid configs of tiny_gguf_hybrid)."""
    E, H, G = cfg.n_embd, cfg.n_ssm_head, cfg.n_group
    d_in_proj = 2 * cfg.d_inner + 2 * G * cfg.d_state + H
    dt = np.exp(rng.uniform(np.log(1e-2), np.log(1.0), H))
    w = {p + "ssm_in.weight": random_matrix(rng, d_in_proj, E),
         p + "ssm_conv1d.weight": (rng.standard_normal((cfg.conv_channels, cfg.d_conv))
                                   / np.sqrt(cfg.d_conv)).astype(np.float32),
         p + "ssm_conv1d.bias": (0.1 * rng.standard_normal(cfg.conv_channels)).astype(np.float32),
         p + "ssm_dt.bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32),   # softplus^-1
         p + "ssm_a": -rng.uniform(1.0, 16.0, (H, 1)).astype(np.float32),
         p + "ssm_d": random_norm(rng, H, 1)}
    if norm_weight:
        w[p + "ssm_norm.weight"] = random_norm(rng, G, cfg.d_inner // G)
    w[p + "ssm_out.weight"] = random_matrix(rng, E, cfg.d_inner)
    return w


def write_ssm_gguf(path: str | Path, spec: SsmSpec, edit=None) -> Path:
    """Write spec's file; edit, when given, maps the weights dict to the one written."""
    cfg = spec.config
    path = Path(path)
    weights = edited(make_ssm_weights(cfg), edit)
    w = open_spec_writer(path, spec)
    add_ssm_sizes(w, cfg.d_conv, cfg.d_inner, cfg.d_state, cfg.n_ssm_head, cfg.n_group)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.arch == "mamba2":                       # as convert_hf_to_gguf writes them
        w.add_feed_forward_length(0)
        w.add_head_count(0)
    else:
        w.add_feed_forward_length(cfg.n_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv([cfg.n_head_kv if il in cfg.attention_layers else 0
                             for il in range(cfg.n_layer)])
        w.add_rope_scaling_finetuned(False)
        w.add_embedding_scale(cfg.embedding_scale)
        w.add_residual_scale(cfg.residual_scale)
        w.add_attention_scale(cfg.attention_scale)
        w.add_logit_scale(cfg.logit_scale)
    write_vocab(w, spm_vocab(cfg.n_vocab))
    write_tensors(w, weights, spec.weight_type, keep_f32=small_tensors(weights, SMALL_SSM_TENSORS))
    return path


if __name__ == "__main__":
    write_all_main("tests/support/tiny_gguf_ssm.py", SSM_SPECS, write_ssm_gguf)
