"""The types a model's KV cache is stored in, and the rotation a quantized cache gets.

`KVCacheTypes(k, v, rotation)` is the one value the CLI, the session, the step graphs and the
artifacts pass around: the element type of the K and V caches (ember.ir.dtypes.KV_CACHE_TYPES:
f16 by default, f32, q8_0, q4_0, turbo3, turbo4) and whether a q8_0 / q4_0 cache is rotated.

Rotation follows llama.cpp (src/llama-kv-cache.cpp `attn_rot_k` / `attn_rot_v`, PR #21038):
when the K cache has a ggml block type and the K head size is a multiple of 64, Q and K are
multiplied by an orthonormal Walsh-Hadamard matrix over blocks of the largest power of two
(>= 64) that divides the head size, before K is written; <Hq, Hk> = <q, k>, so the scores are
unchanged but the outliers a block scale must cover are spread over the block. Likewise a
q8_0 / q4_0 V cache rotates V in blocks of 64 and the attention output is rotated back by the
same matrix (H is its own inverse). `rotation=False` is llama.cpp's LLAMA_ATTN_ROT_DISABLE=1.

turbo3 / turbo4 rotate inside their quantizer (ember.ir.turbo: signs, Walsh-Hadamard, signs
over each 128-value head), and attention reads them dequantized, i.e. rotated back (the
reference's definition), so the graph adds no rotation for them.

Imports the IR's dtypes and the errors only.
"""
from __future__ import annotations

from dataclasses import dataclass

import ember.ir.dtypes as dtypes
from ember.errors import EmberError

CACHE_TYPE_NAMES = tuple(d.name for d in dtypes.KV_CACHE_TYPES)   # f16 first: the default
ROTATED_TYPES = (dtypes.q8_0, dtypes.q4_0)      # the ggml types llama.cpp rotates
MIN_ROTATION = 64                               # llama.cpp rotates heads in blocks of >= 64 values
V_ROTATION = 64                                 # and V always in blocks of 64


@dataclass(frozen=True)
class KVCacheTypes:
    k: dtypes.DType = dtypes.f16
    v: dtypes.DType = dtypes.f16
    rotation: bool = True

    @staticmethod
    def of(k: str | dtypes.DType = "f16", v: str | dtypes.DType = "f16",
           rotation: bool = True) -> "KVCacheTypes":
        """From type names; an unknown or non-cache type is an EmberError listing the known."""
        types = []
        for which, name in (("K", k), ("V", v)):
            dt = dtypes.ALL.get(name) if isinstance(name, str) else name
            if dt not in dtypes.KV_CACHE_TYPES:
                raise EmberError(f"unknown {which} cache type {name!r}; cache types: "
                                 f"{', '.join(CACHE_TYPE_NAMES)}")
            types.append(dt)
        return KVCacheTypes(types[0], types[1], rotation)

    @property
    def quantized(self) -> bool:
        return self.k.is_quantized or self.v.is_quantized

    def k_rotation(self, head_dim: int) -> int:
        """Values per Hadamard block applied to Q and K (0: none)."""
        if not (self.rotation and self.k in ROTATED_TYPES and head_dim % MIN_ROTATION == 0):
            return 0
        block = MIN_ROTATION
        while head_dim % (2 * block) == 0:
            block *= 2
        return block

    def v_rotation(self, head_dim: int) -> int:
        """Values per Hadamard block applied to V and to the attention output (0: none)."""
        ok = self.rotation and self.v in ROTATED_TYPES and head_dim % V_ROTATION == 0
        return V_ROTATION if ok else 0

    def check(self, head_dim_k: int, head_dim_v: int, where: str, layer: int | None = None) -> None:
        """A quantized cache holds each head as whole blocks: an EmberError naming where (the
        model file), the head size and the type when it does not, and the layer whose heads
        these are when the model's head sizes differ by layer (gemma4)."""
        whose = "this model's" if layer is None else f"layer {layer}'s"
        for which, dt, n in (("K", self.k, head_dim_k), ("V", self.v, head_dim_v)):
            if dt.is_quantized and n % dt.block_size:
                raise EmberError(f"{where}: {which} cache type {dt} needs a head size that is a "
                                 f"multiple of {dt.block_size}; {whose} {which} head size is {n}")

    def row_bytes(self, width_k: int, width_v: int) -> int:
        """Bytes of one cache row (one token) of a layer: K and V, width_k / width_v values."""
        return self.k.row_bytes(width_k) + self.v.row_bytes(width_v)

    def manifest(self) -> dict:
        """As an artifact's manifest records it."""
        return {"k": self.k.name, "v": self.v.name, "rotation": self.rotation}

    @staticmethod
    def from_manifest(entry: dict) -> "KVCacheTypes":
        return KVCacheTypes.of(entry["k"], entry["v"], bool(entry["rotation"]))

    def __str__(self) -> str:
        off = not self.rotation and (self.k in ROTATED_TYPES or self.v in ROTATED_TYPES)
        return f"K {self.k}, V {self.v}" + (", no rotation" if off else "")


F16_CACHE = KVCacheTypes()
