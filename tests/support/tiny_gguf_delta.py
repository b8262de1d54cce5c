"""Tiny random-weight GGUF files of the gated-DeltaNet hybrids (qwen3next, qwen35, qwen35moe),
for tests.

    python tests/support/tiny_gguf_delta.py OUTDIR    # every file of DELTA_SPECS

Odd sizes throughout: n_embd 96, attention 3 heads / 1 KV head of 24 with partial rope, DeltaNet
2 q/k heads and 6 v heads of 24 (state 24 x 24 per v head), d_conv 4, 7 experts of which 3 are
used, and the 320-token byte-level BPE vocabulary of tiny_gguf. Layers: qwen3next and qwen35moe
have 4 (full attention every 2nd: recurrent, attention, recurrent, attention), qwen35 has 3
(every 3rd). qwen35moe's rope sections leave half the pairs of each head to the e section (which
text tokens do not turn). Weights come from fixed seeds. The "q8_0" files store the FFN weights (routed
and shared experts, qwen35's dense FFN) as Q8_0; the routers stay F32 as llama.cpp's quantizer
keeps them, and so does everything else. The decay is drawn so some heads remember for many tokens, others for a few.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from tiny_gguf import N_VOCAB, add_tensor, bpe_vocab, finish, write_vocab
from tiny_gguf_common import (TinySpec, add_head_sizes, add_ssm_sizes, edited, expert_weights, open_writer,
                              qkv_weights, swiglu_weights, write_all_main)

DELTA_ARCHS = ("qwen3next", "qwen35", "qwen35moe")


@dataclass(frozen=True)
class DeltaConfig:
    arch: str
    seed: int
    n_layer: int
    full_attention_interval: int
    n_rot: int
    rope_sections: tuple[int, ...] = ()
    n_embd: int = 96
    n_head: int = 3
    n_head_kv: int = 1
    head_dim: int = 24
    d_state: int = 24          # S: the head size of q, k and v in the DeltaNet layers
    n_k_heads: int = 2
    n_v_heads: int = 6
    d_conv: int = 4
    n_ff: int = 160            # dense FFN (qwen35)
    n_expert: int = 7
    n_expert_used: int = 3
    n_ff_exp: int = 64
    n_ff_shexp: int = 96
    n_ctx: int = 4096
    n_vocab: int = N_VOCAB
    rms_eps: float = 1e-6
    rope_base: float = 1e7

    @property
    def moe(self) -> bool:
        return self.arch != "qwen35"

    @property
    def conv_channels(self) -> int:
        return (2 * self.n_k_heads + self.n_v_heads) * self.d_state

    def is_recurrent(self, il: int) -> bool:
        return (il + 1) % self.full_attention_interval != 0


DELTA_CONFIGS = {
    "qwen3next": DeltaConfig("qwen3next", seed=21, n_layer=4, full_attention_interval=2, n_rot=8),
    "qwen35": DeltaConfig("qwen35", seed=22, n_layer=3, full_attention_interval=3, n_rot=12,
                          rope_sections=(2, 2, 2, 0)),
    # sections t, h, w, e = 1, 1, 1, 3 over 6 pairs: pairs 3-5 fall to e, which text tokens do
    # not turn; a low rope base makes those pairs turn fast enough to notice
    "qwen35moe": DeltaConfig("qwen35moe", seed=23, n_layer=4, full_attention_interval=2, n_rot=12,
                             rope_sections=(1, 1, 1, 3), rope_base=100.0),
}


class DeltaSpec(TinySpec):
    @property
    def config(self) -> DeltaConfig:
        return DELTA_CONFIGS[self.arch]


DELTA_SPECS = tuple(DeltaSpec(a, t) for a in DELTA_ARCHS for t in ("f32", "q8_0"))


def make_delta_weights(cfg: DeltaConfig) -> dict[str, np.ndarray]:
    return dict(delta_weights(cfg))


def delta_weights(cfg: DeltaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(name, f32 values) of every tensor, drawn one at a time from the config's seed (a large
    config never holds all its weights at once)."""
    rng = np.random.default_rng(cfg.seed)

    def matrix(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm(*shape):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    E, S, Hk, Hv = cfg.n_embd, cfg.d_state, cfg.n_k_heads, cfg.n_v_heads
    yield "token_embd.weight", rng.standard_normal((cfg.n_vocab, E)).astype(np.float32)
    yield "output_norm.weight", norm(E)
    yield "output.weight", matrix(cfg.n_vocab, E)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        yield p + "attn_norm.weight", norm(E)
        yield p + "post_attention_norm.weight", norm(E)
        if cfg.is_recurrent(il):
            yield p + "attn_qkv.weight", matrix(cfg.conv_channels, E)
            yield p + "attn_gate.weight", matrix(Hv * S, E)
            if cfg.arch == "qwen3next":
                yield p + "ssm_ba.weight", matrix(2 * Hv, E)
            else:
                yield p + "ssm_beta.weight", matrix(Hv, E)
                yield p + "ssm_alpha.weight", matrix(Hv, E)
            yield p + "ssm_conv1d.weight", matrix(cfg.conv_channels, cfg.d_conv)
            dt = np.exp(rng.uniform(np.log(1e-2), np.log(0.5), Hv))
            yield p + "ssm_dt.bias", (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # softplus^-1
            yield p + "ssm_a", -np.exp(rng.uniform(np.log(0.1), np.log(2.0), Hv)).astype(np.float32)
            yield p + "ssm_norm.weight", norm(S)
            yield p + "ssm_out.weight", matrix(E, Hv * S)
        else:
            hd = cfg.head_dim
            # attn_q holds a query and a gate per head
            yield from qkv_weights(rng, p, E, 2 * cfg.n_head * hd, cfg.n_head_kv * hd)
            yield p + "attn_q_norm.weight", norm(hd)
            yield p + "attn_k_norm.weight", norm(hd)
            yield p + "attn_output.weight", matrix(E, cfg.n_head * hd)
        if cfg.moe:
            X, F, Fs = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp
            yield p + "ffn_gate_inp.weight", matrix(X, E)
            yield from expert_weights(rng, p, E, X, F)
            yield p + "ffn_gate_inp_shexp.weight", matrix(E)
            yield from swiglu_weights(rng, p, E, Fs, suffix="_shexp")
        else:
            yield from swiglu_weights(rng, p, E, cfg.n_ff)


def quantized(cfg: DeltaConfig, name: str, values: np.ndarray) -> bool:
    """Whether a "q8_0" file stores this tensor as Q8_0: the FFN weights (the routed and shared
    experts; qwen35's dense FFN). The rest stays F32 so that the comparison with llama.cpp (which
    rounds activations to 8 bits for Q8_0 weights) is not swamped by top-k flips of near-tied
    experts downstream of quantized attention and DeltaNet weights."""
    kind = name.split(".", 2)[-1]
    return values.ndim >= 2 and kind.startswith("ffn_") and not kind.startswith("ffn_gate_inp")


def write_delta_gguf(path: str | Path, spec: DeltaSpec, edit=None) -> Path:
    """Write spec's file; edit, when given, maps the weights dict to the one written (tests of
    broken files use it to drop or reshape tensors)."""
    cfg = spec.config
    weights = edited(make_delta_weights(cfg), edit)
    return write_delta_model(path, cfg, weights.items(), spec.weight_type,
                             f"tiny-{cfg.arch}-{spec.weight_type}")


def write_delta_model(path: str | Path, cfg: DeltaConfig, weights: Iterable[tuple[str, np.ndarray]],
                      weight_type: str, name: str,
                      quantize: Callable[[DeltaConfig, str, np.ndarray], bool] = quantized) -> Path:
    """A GGUF of cfg holding weights, (name, f32 values) pairs taken one at a time (only their
    stored form is kept); the tensors for which quantize(cfg, name, values) holds are stored in
    weight_type, the rest in F32."""
    path = Path(path)
    w = open_writer(path, cfg.arch, name, cfg.n_ctx, cfg.n_embd, cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    add_head_sizes(w, cfg.head_dim, cfg.n_rot, cfg.rope_base)
    if cfg.rope_sections:
        w.add_rope_dimension_sections(list(cfg.rope_sections))
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    add_ssm_sizes(w, cfg.d_conv, cfg.n_v_heads * cfg.d_state, cfg.d_state, cfg.n_v_heads, cfg.n_k_heads)
    w.add_full_attention_interval(cfg.full_attention_interval)
    if cfg.moe:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_used)
        w.add_expert_feed_forward_length(cfg.n_ff_exp)
        w.add_expert_shared_feed_forward_length(cfg.n_ff_shexp)
    write_vocab(w, bpe_vocab(cfg.n_vocab))
    for tensor, values in weights:
        add_tensor(w, tensor, values, weight_type if quantize(cfg, tensor, values) else "f32")
    finish(w)
    return path


if __name__ == "__main__":
    write_all_main("tests/support/tiny_gguf_delta.py", DELTA_SPECS, write_delta_gguf)
