"""The quantized KV-cache formats as kernels see them, for every dialect (cpu, opencl, vulkan).

A cache row of a q8_0, q4_0, turbo3 or turbo4 cache is whole blocks (ember.ir.quant, ember.ir.turbo
give the byte layouts). Kernels need the block geometry and, for the turbo formats, the tables of
ember.ir.turbo: the two sign vectors of the rotation, the Lloyd-Max codebooks, their cell boundaries
and the 1/sqrt(128) factor. This module is the one place they are taken from: `turbo_tables()`
holds every table as float32 values, and a dialect writes them with its own literal form
(`c_hex`: exact C / OpenCL C hex floats; `glsl_bits`: the IEEE bits, read with uintBitsToFloat,
as GLSL has no hex floats). No kernel carries a hand-copied table.

Exactness: a kernel that quantizes writes the bytes ember.ir.quant.quantize writes when it does
the float64 steps of the turbo quantizer (sums of squares, the norm's square root, the corrected
norm) and the float32 divisions of every format in double precision and rounds to float32 (for
one operation on float32 operands, rounding a double result to float32 is the correctly rounded
float32 result). A device without fp64 runs the same steps in float32: its bytes may then differ
where a value lies within float32 rounding of a cell boundary or of an fp16 rounding point.

Imports NumPy and ember.ir only.
"""
from __future__ import annotations

import functools

import numpy as np

from ember.ir import dtypes, turbo

KV_QUANTIZED = tuple(d.name for d in dtypes.KV_QUANTIZED)
TURBO_BITS = {"turbo3": 3, "turbo4": 4}


def is_turbo(dtype_name: str) -> bool:
    return dtype_name in TURBO_BITS


@functools.lru_cache(maxsize=None)
def turbo_tables() -> dict[str, tuple[np.float32, ...]]:
    """Every TurboQuant table a kernel reads, as float32 values: d1, d2 (the sign vectors), cb3,
    cb4 (the codebooks), b3, b4 (the cell boundaries; an index counts the boundaries strictly
    below its value) and inv (1/sqrt(128), one value)."""
    tables = {"d1": turbo.SIGNS_D1, "d2": turbo.SIGNS_D2, "cb3": turbo.CODEBOOKS[3],
              "cb4": turbo.CODEBOOKS[4], "b3": turbo.BOUNDARIES[3], "b4": turbo.BOUNDARIES[4],
              "inv": [turbo.INV_SQRT_BLOCK]}
    return {name: tuple(np.float32(v) for v in values) for name, values in tables.items()}


def c_hex(v) -> str:
    """A float32 value as an exact C (and OpenCL C) hex-float literal."""
    return float(np.float32(v)).hex() + "f"


def glsl_bits(v) -> str:
    """A float32 value's IEEE bits as a GLSL uint literal (uintBitsToFloat reads it back)."""
    return f"0x{int(np.float32(v).view(np.uint32)):08x}u"


def sign_words(signs) -> list[int]:
    """A +-1 sign vector as 32-bit words: bit j % 32 of word j // 32 set where sign j is -1."""
    words = [0] * (len(signs) // 32)
    for j, s in enumerate(signs):
        if s < 0:
            words[j // 32] |= 1 << (j % 32)
    return words


def turbo_literals(literal) -> dict[str, list[str]]:
    """turbo_tables() written with a dialect's literal function (inv: a one-item list)."""
    return {name: [literal(v) for v in values] for name, values in turbo_tables().items()}
