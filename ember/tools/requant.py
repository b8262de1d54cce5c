"""Requantize a GGUF model into one of llama.cpp's mixed k-quant types (Q4_K_M, Q5_K_M), the way
llama-quantize does without an importance matrix, with ember's NumPy quantizers.

    python -m ember.tools.requant IN.gguf OUT.gguf --type q5_k_m

Every 2-D weight is dequantized to f32 and quantized to the type llama.cpp's
`llama_tensor_get_type` (src/llama-quant.cpp) picks for it:
- the output matrix (or, with tied embeddings, the token embedding) q6_k;
- `attn_v` q6_k in the layers `use_more_bits` picks (the first and last eighth, and every third
  in between), `ffn_down` likewise by layer; a fused `attn_qkv` q6_k (Q5_K_M) / q5_k (Q4_K_M);
- everything else the base type (q5_k, q4_k);
- a type whose blocks do not divide a row falls back as llama.cpp's does (q4_k -> q5_0,
  q5_k -> q5_1, q6_k -> q8_0, then f16).
q5_k and q6_k use ggml's searches (ember.ir.kquant_search); q4_k, q5_0, q5_1 and q8_0 ember's
quantizers (q5_0, q5_1, q8_0 byte for byte ggml's reference ones). 1-D tensors (norms) and the
metadata are copied; general.file_type is set to the mix. Imports the IR's codecs and the gguf
package only.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import gguf
import numpy as np

from ember.ir import quant
from ember.ir.kquant_search import quantize_ggml

# llama_ftype of each mix, and the type most tensors take
MIXES = {"q4_k_m": (15, "q4_k"), "q5_k_m": (17, "q5_k")}
BLOCK = {"q4_k": 256, "q5_k": 256, "q6_k": 256, "q5_0": 32, "q5_1": 32, "q8_0": 32, "f16": 1}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q5_0": "f16", "q5_1": "f16", "q8_0": "f16"}
SEARCHED = ("q5_k", "q6_k")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class MixPlan:
    """The type of each tensor of one file in a mix (llama_tensor_get_type for Q4_K_M/Q5_K_M)."""

    def __init__(self, names: list[str], mix: str):
        if mix not in MIXES:
            raise ValueError(f"requant: unknown mix {mix!r} (have: {', '.join(MIXES)})")
        self.base = MIXES[mix][1]
        self.mix = mix
        self.has_output = "output.weight" in names
        self.attn_v = [n for n in names if n.endswith("attn_v.weight")]
        self.n_ffn_down = sum(1 for n in names if n.endswith("ffn_down.weight"))

    def choose(self, name: str, row: int) -> str:
        """The type of tensor `name` with rows of `row` values."""
        if name == "output.weight" or (not self.has_output and name == "token_embd.weight"):
            kind = "q8_0" if row % 256 else "q6_k"
        elif name.endswith("attn_v.weight"):
            i = self.attn_v.index(name)
            kind = "q6_k" if use_more_bits(i, len(self.attn_v)) else self.base
        elif name.endswith("ffn_down.weight") and _LAYER.match(name):
            i = int(_LAYER.match(name).group(1))
            kind = "q6_k" if use_more_bits(i, self.n_ffn_down) else self.base
        elif name.endswith("attn_qkv.weight"):
            kind = "q6_k" if self.mix == "q5_k_m" else "q5_k"
        else:
            kind = self.base
        while row % BLOCK[kind]:
            kind = FALLBACK[kind]
        return kind


def quantize_as(values: np.ndarray, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if kind == "f16":
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    data = quantize_ggml(values, kind) if kind in SEARCHED else quant.quantize(values, kind)
    return data, gguf.GGMLQuantizationType[kind.upper()]


def requantize(src: str | Path, dst: str | Path, mix: str = "q5_k_m", log=None) -> dict[str, str]:
    """Write dst: src's metadata and tensors with the 2-D weights requantized into mix.
    Returns {tensor name: type written}."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(MIXES[mix][0])
    plan = MixPlan([t.name for t in reader.tensors], mix)
    written = {}
    for t in reader.tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            data = np.array(t.data)
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
            written[t.name] = t.tensor_type.name.lower()
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        kind = plan.choose(t.name, values.shape[-1])
        data, gtype = quantize_as(values, kind)
        writer.add_tensor(t.name, data, raw_dtype=gtype if gtype != gguf.GGMLQuantizationType.F16 else None)
        written[t.name] = kind
        if log:
            log(f"{t.name}: {t.tensor_type.name.lower()} -> {kind}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--type", default="q5_k_m", choices=sorted(MIXES))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    written = requantize(args.src, args.dst, args.type, log=print if args.verbose else None)
    counts: dict[str, int] = {}
    for kind in written.values():
        counts[kind] = counts.get(kind, 0) + 1
    print(f"{args.dst}: {', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
