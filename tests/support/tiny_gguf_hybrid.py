"""Tiny random-weight GGUF files of the short-convolution and Mamba-2 hybrids, for tests.

    python tests/support/tiny_gguf_hybrid.py OUTDIR    # every file of HYBRID_SPECS

Odd sizes throughout (no head count, state size or width a power of two; every matmul's K a
multiple of 32 so q8_0 fits), the 320-token SentencePiece-style vocabulary of tiny_gguf, fixed
seeds (the f32 and q8_0 files of one architecture hold the same values up to quantization):
- lfm2: 5 layers, short convolutions at 0, 1, 3 (window l_cache 3), GQA attention with QK-norm at
  2 and 4 (6 heads / 3 KV heads of 32), n_embd 192, SwiGLU FFN 288 in every layer, tied output,
  the final norm under LFM2's name token_embd_norm.
- lfm2moe: 5 layers, short convolutions at 0, 2, 3 (l_cache 3), attention at 1 and 4 (5 heads / 1
  KV head of 32), n_embd 160; layers 0-1 keep a dense SwiGLU FFN 224 (leading_dense_block_count
  2), layers 2-4 route to 3 of 7 experts of width 96 (sigmoid gating, a selection bias exp_probs_b
  large enough to change which experts win, renormalised weights, no shared expert), tied output.
  Its seed is one whose q8_0 file routes every token of the peer tests as the f32 file does
  (with seed 24 a near-tie flips an expert of the first token: NMSE 3e-2 against llama.cpp).
- nemotron_h: 5 layers Mamba-2 / FFN / attention / Mamba-2 / FFN (per-layer head_count_kv and
  feed_forward_length say which), n_embd 160, 6 SSM heads of 32 in 3 groups, d_state 24, attention
  5 heads / 1 KV head of 32 without rope, squared-ReLU FFN 352, untied output.
- falcon-h1: 3 layers of attention (6 heads / 2 KV heads of 32, neox rope) beside Mamba-2 (5 SSM
  heads of 32, one group, d_state 20, no group norm), SwiGLU FFN 320, n_embd 192, untied output.
The 2-D weights take the file's weight type except the small SSM and convolution tensors, which
stay F32 as llama.cpp's quantizer keeps them, and so does lfm2moe's router.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tiny_gguf import N_VOCAB, spm_vocab, write_tensors, write_vocab
from tiny_gguf_common import (TinySpec, add_head_sizes, add_ssm_sizes, edited, expert_weights,
                              open_spec_writer, qkv_weights, random_matrix, random_norm, small_tensors,
                              swiglu_weights, write_all_main)
from tiny_gguf_ssm import SMALL_SSM_TENSORS, mamba2_weights

HYBRID_ARCHS = ("lfm2", "nemotron_h", "falcon-h1", "lfm2moe")
SHORTCONV_ARCHS = ("lfm2", "lfm2moe")


@dataclass(frozen=True)
class HybridConfig:
    arch: str
    seed: int
    layers: str               # one letter a layer: C short conv, M Mamba-2, A attention, F FFN-only,
                              # P attention beside Mamba-2 (falcon-h1)
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int = 32
    n_ff: int = 0
    l_cache: int = 0          # lfm2, lfm2moe
    n_expert: int = 0         # lfm2moe
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_dense_lead: int = 0
    d_inner: int = 0          # Mamba-2
    d_state: int = 0
    n_ssm_head: int = 0
    n_group: int = 1
    d_conv: int = 4
    ssm_norm: bool = True
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    n_ctx: int = 4096
    n_vocab: int = N_VOCAB
    tied_output: bool = False

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def conv_channels(self) -> int:
        return self.d_inner + 2 * self.n_group * self.d_state

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(il for il, kind in enumerate(self.layers) if kind in "AP")

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(il for il, kind in enumerate(self.layers) if kind in "CMP")


HYBRID_CONFIGS = {
    "lfm2": HybridConfig("lfm2", seed=21, layers="CCACA", n_embd=192, n_head=6, n_head_kv=3,
                         n_ff=288, l_cache=3, rope_base=1e6, tied_output=True),
    "lfm2moe": HybridConfig("lfm2moe", seed=27, layers="CACCA", n_embd=160, n_head=5, n_head_kv=1,
                            n_ff=224, l_cache=3, n_expert=7, n_expert_used=3, n_ff_exp=96,
                            n_dense_lead=2, rope_base=1e6, tied_output=True),
    "nemotron_h": HybridConfig("nemotron_h", seed=22, layers="MFAMF", n_embd=160, n_head=5,
                               n_head_kv=1, n_ff=352, d_inner=192, d_state=24, n_ssm_head=6,
                               n_group=3),
    "falcon-h1": HybridConfig("falcon-h1", seed=23, layers="PPP", n_embd=192, n_head=6, n_head_kv=2,
                              n_ff=320, d_inner=160, d_state=20, n_ssm_head=5, ssm_norm=False,
                              rope_base=1e5),
}


class HybridSpec(TinySpec):
    @property
    def config(self) -> HybridConfig:
        return HYBRID_CONFIGS[self.arch]


HYBRID_SPECS = tuple(HybridSpec(a, t) for a in HYBRID_ARCHS for t in ("f32", "q8_0"))
SMALL_TENSORS = SMALL_SSM_TENSORS + ("shortconv.conv.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")


def make_hybrid_weights(cfg: HybridConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    E, D = cfg.n_embd, cfg.head_dim
    n_q, n_kv = cfg.n_head * D, cfg.n_head_kv * D
    w = {"token_embd.weight": rng.standard_normal((cfg.n_vocab, E)).astype(np.float32),
         ("token_embd_norm.weight" if cfg.arch in SHORTCONV_ARCHS else "output_norm.weight"): random_norm(rng, E)}
    if not cfg.tied_output:
        w["output.weight"] = random_matrix(rng, cfg.n_vocab, E)
    for il, kind in enumerate(cfg.layers):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = random_norm(rng, E)
        if kind in "AP":
            w.update(qkv_weights(rng, p, E, n_q, n_kv))
            if cfg.arch in SHORTCONV_ARCHS:
                w[p + "attn_q_norm.weight"] = random_norm(rng, D)
                w[p + "attn_k_norm.weight"] = random_norm(rng, D)
            w[p + "attn_output.weight"] = random_matrix(rng, E, n_q)
        if kind in "MP":
            w.update(mamba2_weights(rng, p, cfg, norm_weight=cfg.ssm_norm))
        if kind == "C":
            w[p + "shortconv.in_proj.weight"] = random_matrix(rng, 3 * E, E)
            w[p + "shortconv.conv.weight"] = (rng.standard_normal((E, cfg.l_cache))
                                              / np.sqrt(cfg.l_cache)).astype(np.float32)
            w[p + "shortconv.out_proj.weight"] = random_matrix(rng, E, E)
        if kind == "F":                    # nemotron_h: up, squared ReLU, down
            w[p + "ffn_up.weight"] = random_matrix(rng, cfg.n_ff, E)
            w[p + "ffn_down.weight"] = random_matrix(rng, E, cfg.n_ff)
        if cfg.arch == "lfm2moe" and il >= cfg.n_dense_lead:
            X, F = cfg.n_expert, cfg.n_ff_exp
            w[p + "ffn_norm.weight"] = random_norm(rng, E)
            w[p + "ffn_gate_inp.weight"] = random_matrix(rng, X, E)
            w[p + "exp_probs_b.bias"] = (0.3 * rng.standard_normal(X)).astype(np.float32)
            w.update(expert_weights(rng, p, E, X, F))
        elif cfg.arch != "nemotron_h":     # a SwiGLU FFN after every block
            # falcon-h1's FFN norm has no ".weight" (llama.cpp loads it as tn(FFN_NORM, i))
            w[p + ("ffn_norm" if cfg.arch == "falcon-h1" else "ffn_norm.weight")] = random_norm(rng, E)
            w.update(swiglu_weights(rng, p, E, cfg.n_ff))
    return w


def write_hybrid_gguf(path: str | Path, spec: HybridSpec, edit=None) -> Path:
    """Write spec's file; edit, when given, maps the weights dict to the one written."""
    cfg = spec.config
    path = Path(path)
    weights = edited(make_hybrid_weights(cfg), edit)
    w = open_spec_writer(path, spec)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_head_count(cfg.n_head)
    add_head_sizes(w, cfg.head_dim, cfg.head_dim, cfg.rope_base)
    if cfg.arch == "falcon-h1":
        w.add_head_count_kv(cfg.n_head_kv)
    else:                                    # per layer: 0 marks a layer without attention
        w.add_head_count_kv([cfg.n_head_kv if kind == "A" else 0 for kind in cfg.layers])
    if cfg.arch == "nemotron_h":             # per layer: set on the FFN-only layers
        w.add_feed_forward_length([cfg.n_ff if kind == "F" else 0 for kind in cfg.layers])
        w.add_layer_norm_eps(cfg.rms_eps)    # llama.cpp 0.3.36 requires it (unused: RMS norms only)
    else:
        w.add_feed_forward_length(cfg.n_ff)
    if cfg.arch in SHORTCONV_ARCHS:
        w.add_shortconv_l_cache(cfg.l_cache)
    else:
        add_ssm_sizes(w, cfg.d_conv, cfg.d_inner, cfg.d_state, cfg.n_ssm_head, cfg.n_group)
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_used)
        w.add_expert_feed_forward_length(cfg.n_ff_exp)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_leading_dense_block_count(cfg.n_dense_lead)
    write_vocab(w, spm_vocab(cfg.n_vocab))
    write_tensors(w, weights, spec.weight_type, keep_f32=small_tensors(weights, SMALL_TENSORS))
    return path


if __name__ == "__main__":
    write_all_main("tests/support/tiny_gguf_hybrid.py", HYBRID_SPECS, write_hybrid_gguf)
