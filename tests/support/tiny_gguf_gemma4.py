"""Tiny random-weight gemma4 GGUF files (the dense architecture of llama.cpp's models/gemma4.cpp),
for tests.

    python tests/support/tiny_gguf_gemma4.py OUTDIR    # every file of GEMMA4_SPECS

One fixed seed; odd sizes where gemma4 allows them, every matmul's K a multiple of 64 so nvfp4
(blocks of 64) fits: n_embd 192, 3 heads / 1 KV head, head size 64 in the sliding-window layers
and 128 in the global ones (rope over all of a head; the global layers' rope_freqs leave the
second half of their pairs unrotated, as gemma4's partial rotary does), 5 layers
sliding/sliding/global/sliding/global with a window of 5, the last 2 layers sharing the caches
of layers 1 and 2 (shared_kv_layers 2), layer 2 without attn_v (V is its K projection), FFN
widths 320, 320, 320, 448, 448 (the shared layers wider, as E2B's), per-layer embeddings of
64, a learned output scale per layer, soft-capped logits of the tied embedding, the 320-token
SentencePiece-style vocabulary of tiny_gguf. The 2-D weights take the file's weight type; norms,
rope factors and output scales stay F32. Gemma4Spec(head_swa=128) doubles both head sizes (128 and
256, as E2B's 256 and 512 are, whole blocks of the 128-value turbo3/turbo4 KV cache types).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiny_gguf import N_VOCAB, spm_vocab, write_tensors, write_vocab
from tiny_gguf_common import edited, open_writer, random_matrix, random_norm, swiglu_weights, write_all_main

SEED = 41
N_EMBD = 192
N_HEAD, N_HEAD_KV = 3, 1
HEAD_SWA, HEAD_FULL = 64, 128
SWA = (True, True, False, True, False)
SHARED_KV_LAYERS = 2
WINDOW = 5
FF_WIDTHS = (320, 320, 320, 448, 448)
N_EMBD_PER_LAYER = 64
NO_V_LAYERS = (2,)
ROPE_BASE, ROPE_BASE_SWA = 1e6, 1e4
RMS_EPS = 1e-6
SOFTCAP = 30.0
N_CTX = 4096
# gemma4 does not scale its queries: with unit QK-norm weights a head's logits would have a spread
# of sqrt(head size) and every softmax would be nearly one-hot, so that an 8-bit rounding of the
# activations (llama.cpp's quantized matmuls) flips which key wins. Learned norms keep the logits
# moderate; these weights (about 0.3) give logits of spread ~2-3.
QK_NORM = 0.3


@dataclass(frozen=True)
class Gemma4Spec:
    weight_type: str = "f32"
    head_swa: int = HEAD_SWA        # the sliding-window layers' head size; the global layers' is twice it

    @property
    def head_full(self) -> int:
        return 2 * self.head_swa

    def head_dim(self, il: int) -> int:
        return self.head_swa if SWA[il] else self.head_full

    @property
    def filename(self) -> str:
        heads = "" if self.head_swa == HEAD_SWA else f"-h{self.head_swa}"
        return f"gemma4-{self.weight_type}{heads}.gguf"

    def __str__(self) -> str:
        return self.filename


GEMMA4_SPECS = tuple(Gemma4Spec(t) for t in ("f32", "q8_0", "nvfp4"))


def rope_factors(head_full: int = HEAD_FULL) -> np.ndarray:
    """One factor per rotated pair of a global head: the first half rotate (factors 1 .. 2), the
    second half do not (a huge factor, llama.cpp's rendering of partial rotary)."""
    half = head_full // 4
    return np.concatenate([np.linspace(1.0, 2.0, half), np.full(half, 1e30)]).astype(np.float32)


def make_gemma4_weights(spec: Gemma4Spec = Gemma4Spec()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    n_layer, E, n_pl = len(SWA), N_EMBD, N_EMBD_PER_LAYER
    first_shared = n_layer - SHARED_KV_LAYERS
    w = {"token_embd.weight": (rng.standard_normal((N_VOCAB, E)) / np.sqrt(E)).astype(np.float32),
         "output_norm.weight": random_norm(rng, E),
         "rope_freqs.weight": rope_factors(spec.head_full),
         "per_layer_token_embd.weight": (0.5 * rng.standard_normal((N_VOCAB, n_layer * n_pl))).astype(np.float32),
         "per_layer_model_proj.weight": random_matrix(rng, n_layer * n_pl, E),
         "per_layer_proj_norm.weight": random_norm(rng, n_pl)}
    for il in range(n_layer):
        p, D, F = f"blk.{il}.", spec.head_dim(il), FF_WIDTHS[il]
        w[p + "attn_norm.weight"] = random_norm(rng, E)
        w[p + "attn_q.weight"] = random_matrix(rng, N_HEAD * D, E)
        w[p + "attn_q_norm.weight"] = QK_NORM * random_norm(rng, D)
        if il < first_shared:
            w[p + "attn_k.weight"] = random_matrix(rng, N_HEAD_KV * D, E)
            w[p + "attn_k_norm.weight"] = QK_NORM * random_norm(rng, D)
            if il not in NO_V_LAYERS:
                w[p + "attn_v.weight"] = random_matrix(rng, N_HEAD_KV * D, E)
        w[p + "attn_output.weight"] = random_matrix(rng, E, N_HEAD * D)
        w[p + "post_attention_norm.weight"] = random_norm(rng, E)
        w[p + "ffn_norm.weight"] = random_norm(rng, E)
        w.update(swiglu_weights(rng, p, E, F))
        w[p + "post_ffw_norm.weight"] = random_norm(rng, E)
        w[p + "inp_gate.weight"] = random_matrix(rng, n_pl, E)
        w[p + "proj.weight"] = random_matrix(rng, E, n_pl)
        w[p + "post_norm.weight"] = random_norm(rng, E)
        w[p + "layer_output_scale.weight"] = np.array([0.6 + 0.2 * il], np.float32)
    return w


def write_gemma4_gguf(path: str | Path, spec: Gemma4Spec, edit=None,
                      shared_kv_layers: int = SHARED_KV_LAYERS) -> Path:
    """Write spec's file; edit maps the weights dict to the one written (tests of broken files
    use it, and another shared_kv_layers)."""
    path = Path(path)
    weights = edited(make_gemma4_weights(spec), edit)
    w = open_writer(path, "gemma4", f"tiny-{spec.filename.removesuffix('.gguf')}", N_CTX, N_EMBD, len(SWA))
    w.add_feed_forward_length(list(FF_WIDTHS))
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(spec.head_full)
    w.add_value_length(spec.head_full)
    w.add_key_length_swa(spec.head_swa)
    w.add_value_length_swa(spec.head_swa)
    w.add_rope_dimension_count(spec.head_full)
    w.add_rope_dimension_count_swa(spec.head_swa)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_rope_freq_base_swa(ROPE_BASE_SWA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_sliding_window(WINDOW)
    w.add_sliding_window_pattern(list(SWA))
    w.add_shared_kv_layers(shared_kv_layers)
    w.add_embedding_length_per_layer_input(N_EMBD_PER_LAYER)
    w.add_final_logit_softcapping(SOFTCAP)
    write_vocab(w, spm_vocab(N_VOCAB))
    write_tensors(w, weights, spec.weight_type)
    return path


if __name__ == "__main__":
    write_all_main("tests/support/tiny_gguf_gemma4.py", GEMMA4_SPECS, write_gemma4_gguf)
