"""TensorType: dtype, shape and byte strides of a value in the IR.

Shapes are written outermost first (NumPy order): the last axis is the contiguous one, and a
quantized tensor packs its last axis into blocks. Strides are in bytes, as in ggml, so a view
at a byte offset with its own row stride (the fused-QKV split) is an ordinary type. For a
quantized type the last stride is the block size in bytes (ggml's nb[0]).

A type also names its storage layout (ember.ir.layouts): "row" is the order above; another
layout (the Adreno SoA split of Q8_0, say) is part of the type, so equal types read the same
bytes the same way, and is printed in braces after the shape: `q8_0[512, 512]{adreno_soa}`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ember.ir.dtypes import DType, dtype as to_dtype
from ember.ir.layouts import ROW, get_layout

MAX_RANK = 4


def contiguous_strides(dt: DType, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return ()
    strides = [dt.block_bytes]
    row = dt.row_bytes(shape[-1]) if dt.is_quantized else shape[-1] * dt.block_bytes
    for size in reversed(shape[:-1]):
        strides.append(row)
        row *= size
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: tuple[int, ...]
    strides: tuple[int, ...] = None  # None means contiguous; normalized in __post_init__
    layout: str = ROW

    def __post_init__(self):
        object.__setattr__(self, "dtype", to_dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) > MAX_RANK:
            raise ValueError(f"rank {len(self.shape)} > {MAX_RANK}: {self.shape}")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        if self.dtype.is_quantized and not self.shape:
            raise ValueError(f"{self.dtype}: a quantized type packs its last axis into blocks; "
                             f"it needs at least one axis")
        if self.dtype.is_quantized and self.shape[-1] % self.dtype.block_size:
            raise ValueError(f"{self.dtype}: last dimension {self.shape[-1]} is not a multiple "
                             f"of the block size {self.dtype.block_size}")
        if self.strides is None:
            object.__setattr__(self, "strides", contiguous_strides(self.dtype, self.shape))
        else:
            object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
            if len(self.strides) != len(self.shape):
                raise ValueError(f"strides {self.strides} do not match shape {self.shape}")
            # Kernels index base + i * stride with unsigned sizes: a negative stride reads
            # below its buffer, so no type carries one.
            if any(s < 0 for s in self.strides):
                raise ValueError(f"negative stride in {self.strides}")
        if self.layout != ROW:
            why = get_layout(self.layout).problem(self.dtype, self.shape)
            if why:
                raise ValueError(why)
            # A re-laid-out tensor has no row strides to speak of: it is one packed array.
            if not self.is_contiguous:
                raise ValueError(f"a tensor in layout {self.layout} must be contiguous, got strides {self.strides}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of a contiguous tensor of this shape."""
        if self.layout != ROW:
            return get_layout(self.layout).nbytes(self.dtype, self.shape)
        if not self.shape:
            return self.dtype.block_bytes
        return self.dtype.row_bytes(self.shape[-1]) * (self.numel // max(self.shape[-1], 1)) \
            if self.shape[-1] else 0

    @property
    def span_bytes(self) -> int:
        """Bytes from the first to one past the last byte this (possibly strided) tensor touches."""
        if self.numel == 0:
            return 0
        if self.layout != ROW:
            return self.nbytes
        last = sum((s - 1) * st for s, st in zip(self.shape[:-1], self.strides[:-1]))
        return last + self.dtype.row_bytes(self.shape[-1]) if self.dtype.is_quantized \
            else last + (self.shape[-1] - 1) * self.strides[-1] + self.dtype.block_bytes

    @property
    def byte_extent(self) -> tuple[int, int]:
        """(lowest, one past the highest) byte offset this tensor touches from its base, for any
        strides: a negative stride reaches below the base, which span_bytes cannot say."""
        if self.numel == 0:
            return 0, 0
        if self.layout != ROW:
            return 0, self.nbytes
        lo = hi = 0
        outer = self.shape[:-1] if self.dtype.is_quantized else self.shape
        for size, stride in zip(outer, self.strides):
            reach = (size - 1) * stride
            lo, hi = lo + min(reach, 0), hi + max(reach, 0)
        last = self.dtype.row_bytes(self.shape[-1]) if self.dtype.is_quantized else self.dtype.block_bytes
        return lo, hi + last

    @property
    def is_contiguous(self) -> bool:
        return self.strides == contiguous_strides(self.dtype, self.shape)

    @property
    def row(self) -> "TensorType":
        """This type in the row layout (what unpacking a re-laid-out tensor gives)."""
        return self if self.layout == ROW else TensorType(self.dtype, self.shape, self.strides)

    def with_layout(self, layout: str) -> "TensorType":
        return TensorType(self.dtype, self.shape, self.strides, layout)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dt) -> "TensorType":
        return TensorType(to_dtype(dt), self.shape)

    def __str__(self) -> str:
        text = f"{self.dtype.name}[{', '.join(map(str, self.shape))}]"
        if not self.is_contiguous:
            text += "{" + ", ".join(map(str, self.strides)) + "}"
        if self.layout != ROW:
            text += "{" + self.layout + "}"   # never with strides: such a type is contiguous
        return text


def tensor_type(dt, *shape) -> TensorType:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return TensorType(to_dtype(dt), tuple(shape))
