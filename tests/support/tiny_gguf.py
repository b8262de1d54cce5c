"""Tiny random-weight GGUF files of every supported architecture and weight type, for tests.

    python tests/support/tiny_gguf.py OUTDIR    # every file of SPECS (ember installed, or PYTHONPATH=.)

Each file is a legal model llama.cpp loads: 2 layers, n_embd 256, n_ff 512 (every K a multiple of
256, so every quant type fits), a 320-token vocabulary with real tokenizer metadata (SentencePiece
style for llama and gemma3, GPT-2 byte-level BPE with merges for qwen2/qwen3). Weights come from
fixed seeds, so a file's values depend only on its architecture: the F32, quantized and fused-QKV
files of one architecture hold the same values (up to quantization). The 2-D weights take the
file's weight type; norms, biases and rope factors stay F32.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType, TokenType

from ember.ir import dtypes

from tiny_gguf_common import add_head_sizes, edited, open_spec_writer, qkv_weights, swiglu_weights

WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k")
# ggml's other weight formats (ember.ir.quant_formats), written for llama files
MORE_WEIGHT_TYPES = ("q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4")
# Files whose tensors take different types by role, like llama.cpp's Q4_K_M / Q5_K_M / Q3_K_M
# (llama_tensor_get_type, simplified: every layer alike); "" is every other 2-D weight.
MIXES = {
    "q4_k_m": {"": "q4_k", "attn_v": "q6_k", "ffn_down": "q6_k", "output": "q6_k"},
    "q5_k_m": {"": "q5_k", "attn_v": "q6_k", "ffn_down": "q6_k", "output": "q6_k"},
    "q3_k_m": {"": "q3_k", "attn_v": "q5_k", "attn_output": "q4_k", "ffn_down": "q5_k", "output": "q6_k"},
    "q2_k_m": {"": "q2_k", "attn_v": "q3_k", "ffn_down": "q3_k", "output": "q6_k", "token_embd": "q4_k"},
}
ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
N_VOCAB = 320


@dataclass(frozen=True)
class Config:
    """Shapes and settings of one architecture's tiny model."""
    arch: str
    seed: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_base: float
    rms_eps: float
    n_layer: int = 2
    n_embd: int = 256
    n_ff: int = 512
    n_ctx: int = 256
    n_vocab: int = N_VOCAB
    tied_output: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_freqs: bool = False          # llama-3 frequency factors
    sliding_window: int = 0           # gemma3
    swa_pattern: tuple[bool, ...] = ()
    final_logit_softcap: float = 0.0


CONFIGS = {
    "llama": Config("llama", seed=1, n_head=4, n_head_kv=2, head_dim=64, rope_base=10000.0,
                    rms_eps=1e-5, rope_freqs=True),
    "qwen2": Config("qwen2", seed=2, n_head=4, n_head_kv=2, head_dim=64, rope_base=1e6,
                    rms_eps=1e-6, tied_output=True, qkv_bias=True),
    # Q is 4 x 128 = 512 wide, twice n_embd, as in the real Qwen3 models.
    "qwen3": Config("qwen3", seed=3, n_head=4, n_head_kv=2, head_dim=128, rope_base=1e6,
                    rms_eps=1e-6, qk_norm=True),
    # One sliding-window layer (window 3, local rope base 10000) and one global layer.
    "gemma3": Config("gemma3", seed=4, n_head=4, n_head_kv=1, head_dim=128, rope_base=1e6,
                     rms_eps=1e-6, tied_output=True, qk_norm=True, sliding_window=3,
                     swa_pattern=(True, False), final_logit_softcap=30.0),
}


@dataclass(frozen=True)
class Spec:
    """One file: an architecture, the type of its 2-D weights, fused QKV or not."""
    arch: str
    weight_type: str = "f32"
    fused_qkv: bool = False

    @property
    def config(self) -> Config:
        return CONFIGS[self.arch]

    @property
    def filename(self) -> str:
        return f"{self.arch}-{self.weight_type}{'-fused' if self.fused_qkv else ''}.gguf"


SPECS = tuple(Spec(a, t) for a in ARCHS for t in WEIGHT_TYPES) + (
    Spec("llama", "f32", fused_qkv=True),    # fused weight
    Spec("qwen2", "f32", fused_qkv=True),    # fused weight and fused bias
    Spec("llama", "q8_0", fused_qkv=True),
) + tuple(Spec("llama", t) for t in MORE_WEIGHT_TYPES + tuple(MIXES))


# ---- weights ---------------------------------------------------------------------------------
def make_weights(cfg: Config) -> dict[str, np.ndarray]:
    """Float32 values of every tensor under its GGUF name (separate Q/K/V), from cfg.seed."""
    rng = np.random.default_rng(cfg.seed)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    n_q, n_kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    w = {"token_embd.weight": rng.standard_normal((cfg.n_vocab, cfg.n_embd)).astype(np.float32),
         "output_norm.weight": norm(cfg.n_embd)}
    if not cfg.tied_output:
        w["output.weight"] = matrix(cfg.n_vocab, cfg.n_embd)
    if cfg.rope_freqs:
        w["rope_freqs.weight"] = np.linspace(1.0, 8.0, cfg.head_dim // 2, dtype=np.float32)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = norm(cfg.n_embd)
        w.update(qkv_weights(rng, p, cfg.n_embd, n_q, n_kv))
        if cfg.qkv_bias:
            for name, n in (("q", n_q), ("k", n_kv), ("v", n_kv)):
                w[p + f"attn_{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if cfg.qk_norm:
            w[p + "attn_q_norm.weight"] = norm(cfg.head_dim)
            w[p + "attn_k_norm.weight"] = norm(cfg.head_dim)
        w[p + "attn_output.weight"] = matrix(cfg.n_embd, n_q)
        w[p + "ffn_norm.weight"] = norm(cfg.n_embd)
        w.update(swiglu_weights(rng, p, cfg.n_embd, cfg.n_ff))
        if cfg.arch == "gemma3":
            w[p + "post_attention_norm.weight"] = norm(cfg.n_embd)
            w[p + "post_ffw_norm.weight"] = norm(cfg.n_embd)
    return w


def fuse_qkv(weights: dict[str, np.ndarray], n_layer: int) -> dict[str, np.ndarray]:
    """attn_q/k/v (+ biases) of each layer replaced by attn_qkv: rows stacked Q, K, V."""
    out = dict(weights)
    for il in range(n_layer):
        p = f"blk.{il}."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{p}attn_{x}.{kind}", None) for x in "qkv"]
            if parts[0] is not None:
                out[f"{p}attn_qkv.{kind}"] = np.concatenate(parts, axis=0)
    return out


def tensor_type(name: str, weight_type: str) -> str:
    """The type tensor name takes in a file of weight_type (a type, or a mix of MIXES)."""
    if weight_type not in MIXES:
        return weight_type
    role = name.removesuffix(".weight").split(".")[-1]
    return MIXES[weight_type].get(role, MIXES[weight_type][""])


def stored(values: np.ndarray, weight_type: str, name: str = "") -> tuple[np.ndarray, GGMLQuantizationType]:
    """values in the file's storage form and GGUF type; only 2-D weights take weight_type (a
    type, or a mix of MIXES resolved by the tensor's name)."""
    weight_type = tensor_type(name, weight_type)
    if values.ndim == 1 or weight_type == "f32":
        return values.astype(np.float32), GGMLQuantizationType.F32
    dt = dtypes.dtype(weight_type)
    data = dtypes.from_float32(values, dt)      # quantize.quantize for the block types
    return data, GGMLQuantizationType[weight_type.upper()]


# ---- tokenizers ------------------------------------------------------------------------------
WORDS = ("the", "and", "that", "with", "this", "from", "model", "token", "small", "device",
         "ember", "compile", "graph", "run", "on", "in", "is", "it", "of", "to", "hello", "world")


def spm_vocab(n_vocab: int) -> dict:
    """A SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    for word in WORDS:
        for end in range(2, len(word) + 1):
            pieces += [word[:end], "\u2581" + word[:end]]
    pieces = list(dict.fromkeys(p for p in pieces if p not in tokens))
    pieces = pieces[:n_vocab - len(tokens)]
    assert len(tokens) + len(pieces) == n_vocab, "not enough pieces for the vocabulary size"
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return dict(model="llama", tokens=tokens + pieces, scores=scores,
                types=types + [TokenType.NORMAL] * len(pieces), merges=None, pre=None,
                bos=1, eos=2, unk=0, add_bos=True)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def bpe_vocab(n_vocab: int) -> dict:
    """A GPT-2 style byte-level BPE vocabulary with merges, plus Qwen's special tokens."""
    byte_chars = _byte_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = []
    known = set(tokens)
    for word in WORDS:
        text = "".join(byte_chars[b] for b in (" " + word).encode())
        for end in range(2, len(text) + 1):
            if len(tokens) + len(specials) == n_vocab:
                break
            if text[:end] not in known:
                merges.append(f"{text[:end - 1]} {text[end - 1]}")
                tokens.append(text[:end])
                known.add(text[:end])
    assert len(tokens) + len(specials) == n_vocab, "not enough merges for the vocabulary size"
    types = [TokenType.NORMAL] * len(tokens) + [TokenType.CONTROL] * len(specials)
    eos = len(tokens)
    return dict(model="gpt2", tokens=tokens + specials, scores=None, types=types, merges=merges,
                pre="qwen2", bos=eos, eos=eos, unk=None, add_bos=False)


# ---- writing ---------------------------------------------------------------------------------
def write_tiny_gguf(path: str | Path, spec: Spec, edit=None, vocab_edit=None, chat_template=None) -> Path:
    """Write spec's file; edit, when given, maps the weights dict to the one written (tests of
    broken files use it to drop, add or reshape tensors); vocab_edit maps the vocabulary dict
    (spm_vocab/bpe_vocab) to the one written; chat_template is stored as tokenizer.chat_template."""
    cfg = spec.config
    path = Path(path)
    weights = make_weights(cfg)
    if spec.fused_qkv:
        weights = fuse_qkv(weights, cfg.n_layer)
    weights = edited(weights, edit)

    w = open_spec_writer(path, spec)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    add_head_sizes(w, cfg.head_dim, cfg.head_dim, cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern(list(cfg.swa_pattern))
    if cfg.final_logit_softcap:
        w.add_final_logit_softcapping(cfg.final_logit_softcap)

    vocab = bpe_vocab(cfg.n_vocab) if cfg.arch.startswith("qwen") else spm_vocab(cfg.n_vocab)
    write_vocab(w, vocab_edit(vocab) if vocab_edit else vocab)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    write_tensors(w, weights, spec.weight_type)
    return path


def write_vocab(w: gguf.GGUFWriter, vocab: dict):
    """The tokenizer.* metadata of a vocabulary from spm_vocab or bpe_vocab."""
    w.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    w.add_token_types([int(t) for t in vocab["types"]])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab["unk"] is not None:
        w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(vocab["add_bos"])


def write_tensors(w: gguf.GGUFWriter, weights: dict[str, np.ndarray], weight_type: str,
                  keep_f32: frozenset = frozenset()):
    """Add the tensors (2-D ones in weight_type unless named in keep_f32), write the file, close."""
    for name, values in weights.items():
        add_tensor(w, name, values, "f32" if name in keep_f32 else weight_type)
    finish(w)


def add_tensor(w: gguf.GGUFWriter, name: str, values: np.ndarray, weight_type: str):
    """One tensor in its stored form (see stored)."""
    data, gtype = stored(values, weight_type, name)
    if gtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data, raw_dtype=gtype)


def finish(w: gguf.GGUFWriter):
    """Write the header, metadata and tensors added to w, and close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_all(folder: str | Path, specs=SPECS) -> dict[Spec, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {spec: write_tiny_gguf(folder / spec.filename, spec) for spec in specs}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/support/tiny_gguf.py OUTDIR")
    for spec, p in write_all(sys.argv[1]).items():
        print(p)
