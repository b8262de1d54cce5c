"""Element types of ember tensors: plain scalars, ggml's block-quantized weight formats and the
TurboQuant KV-cache formats (turbo3, turbo4: one 128-value block per attention head).

A quantized tensor is stored as whole blocks along its last (innermost) axis; its logical shape
counts values, its byte size counts blocks. Imports nothing from ember but the quant layouts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    block_size: int       # values per block (1 for scalar types)
    block_bytes: int      # bytes per block
    numpy_name: str | None  # storage dtype for scalar types; None for quantized ones

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    @property
    def is_float(self) -> bool:
        return self.name in ("f32", "f16", "bf16")

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype a tensor of this type is stored as (uint8 for quantized blocks)."""
        if self.numpy_name is None:
            return np.dtype(np.uint8)
        return np.dtype(self.numpy_name)

    def row_bytes(self, n: int) -> int:
        """Bytes taken by n consecutive values; n must be a whole number of blocks."""
        if n % self.block_size:
            raise ValueError(f"{self.name}: {n} values is not a whole number of {self.block_size}-value blocks")
        return n // self.block_size * self.block_bytes

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return self.name


f32 = DType("f32", 1, 4, "float32")
f16 = DType("f16", 1, 2, "float16")
# bf16 has no NumPy type; its bits are kept in uint16 and widened by shifting.
bf16 = DType("bf16", 1, 2, "uint16")
i32 = DType("i32", 1, 4, "int32")
i8 = DType("i8", 1, 1, "int8")
q8_0 = DType("q8_0", 32, 34, None)
q4_0 = DType("q4_0", 32, 18, None)
q5_0 = DType("q5_0", 32, 22, None)
q4_k = DType("q4_k", 256, 144, None)
q6_k = DType("q6_k", 256, 210, None)
q4_1 = DType("q4_1", 32, 20, None)
q5_1 = DType("q5_1", 32, 24, None)
q2_k = DType("q2_k", 256, 84, None)
q3_k = DType("q3_k", 256, 110, None)
q5_k = DType("q5_k", 256, 176, None)
iq4_nl = DType("iq4_nl", 32, 18, None)
iq4_xs = DType("iq4_xs", 256, 136, None)
mxfp4 = DType("mxfp4", 32, 17, None)
nvfp4 = DType("nvfp4", 64, 36, None)  # four UE4M3 scales of 16 values each
turbo3 = DType("turbo3", 128, 50, None)
turbo4 = DType("turbo4", 128, 66, None)

ALL: dict[str, DType] = {d.name: d for d in (f32, f16, bf16, i32, i8, q8_0, q4_0, q5_0, q4_k, q6_k,
                                              q4_1, q5_1, q2_k, q3_k, q5_k, iq4_nl, iq4_xs, mxfp4,
                                              nvfp4, turbo3, turbo4)}
QUANTIZED = tuple(d for d in ALL.values() if d.is_quantized)
WEIGHT_TYPES = (f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k,
                q4_1, q5_1, q2_k, q3_k, q5_k, iq4_nl, iq4_xs, mxfp4, nvfp4)
# The types a KV cache may be stored in (f16 the default); the quantized ones quantize each row
# written by set_rows and are read block by block by attention.
KV_CACHE_TYPES = (f16, f32, q8_0, q4_0, turbo3, turbo4)
KV_QUANTIZED = tuple(d for d in KV_CACHE_TYPES if d.is_quantized)


def dtype(name: str | DType) -> DType:
    """Look a dtype up by name; an unknown name is an error listing the known ones."""
    if isinstance(name, DType):
        return name
    try:
        return ALL[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(ALL)}") from None


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as ggml does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def to_float32(data: np.ndarray, dt: DType) -> np.ndarray:
    """Widen stored data of type dt to float32 values (dequantizing blocks)."""
    if dt is bf16:
        return bf16_to_f32(data)
    if dt.is_quantized:
        from ember.ir.quant import dequantize
        return dequantize(data, dt.name)
    return data.astype(np.float32)


def from_float32(values: np.ndarray, dt: DType) -> np.ndarray:
    """Store float values as type dt (quantizing into blocks)."""
    if dt is bf16:
        return f32_to_bf16(values)
    if dt.is_quantized:
        from ember.ir.quant import quantize
        return quantize(np.asarray(values, dtype=np.float32), dt.name)
    return np.asarray(values).astype(dt.numpy)
