"""What the tiny GGUF writers of tests/support share: the spec of one file (an architecture and the
type of its 2-D weights), random weights and the tensor groups several archs have (Q/K/V, a
SwiGLU FFN, stacked experts), the metadata blocks every writer opens with or several repeat (the
model's size, head sizes and rope, the SSM sizes), the choice of the tensors that stay F32, and
the command line that writes every spec's file.

Each helper draws its values and adds its keys in the order the writers always did, so the files
are the same byte for byte. Imports gguf and numpy only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np


@dataclass(frozen=True)
class TinySpec:
    """One tiny file: an architecture and the type of its 2-D weights. A writer's subclass adds
    `config`, the architecture's settings."""
    arch: str
    weight_type: str = "f32"

    @property
    def filename(self) -> str:
        return f"{self.arch}-{self.weight_type}.gguf"

    def __str__(self) -> str:
        return self.filename


def random_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Rows of unit size (each entry of variance 1 / cols), so a matmul keeps the activations' scale."""
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


def random_norm(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """A norm weight near 1."""
    return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def random_experts(rng: np.random.Generator, n_expert: int, rows: int, cols: int) -> np.ndarray:
    """n_expert random_matrix draws stacked (one tensor, as GGUF stores experts)."""
    return (rng.standard_normal((n_expert, rows, cols)) / np.sqrt(cols)).astype(np.float32)


# The tensor groups below are drawn lazily, one (name, values) pair at a time: a writer's dict
# takes them with update(), and tiny_gguf_delta's generator (which never holds a large config's
# weights at once) with `yield from`.
Weights = Iterator[tuple[str, np.ndarray]]


def qkv_weights(rng: np.random.Generator, p: str, n_embd: int, n_q: int, n_kv: int) -> Weights:
    """Separate Q, K and V projections of layer prefix p, n_q and n_kv rows."""
    yield p + "attn_q.weight", random_matrix(rng, n_q, n_embd)
    yield p + "attn_k.weight", random_matrix(rng, n_kv, n_embd)
    yield p + "attn_v.weight", random_matrix(rng, n_kv, n_embd)


def swiglu_weights(rng: np.random.Generator, p: str, n_embd: int, n_ff: int, suffix: str = "") -> Weights:
    """A SwiGLU FFN's gate, up and down matrices of layer prefix p (suffix "_shexp": a shared expert)."""
    yield f"{p}ffn_gate{suffix}.weight", random_matrix(rng, n_ff, n_embd)
    yield f"{p}ffn_up{suffix}.weight", random_matrix(rng, n_ff, n_embd)
    yield f"{p}ffn_down{suffix}.weight", random_matrix(rng, n_embd, n_ff)


def expert_weights(rng: np.random.Generator, p: str, n_embd: int, n_expert: int, n_ff: int) -> Weights:
    """The routed experts' stacked gate, up and down matrices of layer prefix p (no router)."""
    yield p + "ffn_gate_exps.weight", random_experts(rng, n_expert, n_ff, n_embd)
    yield p + "ffn_up_exps.weight", random_experts(rng, n_expert, n_ff, n_embd)
    yield p + "ffn_down_exps.weight", random_experts(rng, n_expert, n_embd, n_ff)


def edited(weights: dict[str, np.ndarray], edit: Callable | None) -> dict[str, np.ndarray]:
    """The weights a test's edit maps a copy of them to (tests of broken files drop, add or
    reshape tensors), or the weights themselves without an edit."""
    return weights if edit is None else edit(dict(weights))


def open_writer(path: str | Path, arch: str, name: str, n_ctx: int, n_embd: int,
                n_layer: int) -> gguf.GGUFWriter:
    """A writer for path with the keys every tiny file opens with: its name and model size."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    return w


def open_spec_writer(path: str | Path, spec) -> gguf.GGUFWriter:
    """open_writer for a spec (arch, weight_type and a config with n_ctx, n_embd and n_layer):
    its file is named tiny-{arch}-{weight type}."""
    cfg = spec.config
    name = f"tiny-{spec.arch}-{spec.weight_type}"
    return open_writer(path, spec.arch, name, cfg.n_ctx, cfg.n_embd, cfg.n_layer)


def add_head_sizes(w: gguf.GGUFWriter, head_dim: int, n_rot: int, rope_base: float) -> None:
    """Attention heads of head_dim for K and V, rope over their first n_rot dims."""
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(rope_base)


def add_ssm_sizes(w: gguf.GGUFWriter, d_conv: int, d_inner: int, d_state: int, time_step_rank: int,
                  n_group: int | None = None) -> None:
    """The ssm.* sizes; n_group is left out for Mamba-1 (jamba), which has no groups."""
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(time_step_rank)
    if n_group is not None:
        w.add_ssm_group_count(n_group)


def small_tensors(weights: Iterable[str], kinds: Iterable[str]) -> frozenset[str]:
    """The tensors whose name past `blk.{il}.` is one of kinds: they stay F32 in a quantized
    file, as llama.cpp's quantizer keeps them."""
    kinds = frozenset(kinds)
    return frozenset(n for n in weights if n.split(".", 2)[-1] in kinds)


def write_all_main(script: str, specs: Iterable[TinySpec], write: Callable[[Path, TinySpec], Path]) -> None:
    """`python SCRIPT OUTDIR`: write every spec's file into OUTDIR, printing each path."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {script} OUTDIR")
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        print(write(folder / spec.filename, spec))
