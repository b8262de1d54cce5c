"""Index arithmetic every dialect shares: walking a tensor by byte strides, merging the dims all
operands walk alike, broadcasting, the batch offsets of a matmul, and the fixed 4-D (ne, stride)
form of the Vulkan shaders. Offsets come out as C expressions (valid OpenCL C and C alike) or as
plain integers; nothing here knows which dialect renders them.

Imports the IR and ember.errors only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ember.errors import EmberError
from ember.ir import dtypes
from ember.ir.types import TensorType


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def offset_expr(var: str, sizes, strides) -> str:
    """The byte offset of flat (row-major) index `var` over dims `sizes` with byte `strides`,
    as a C expression."""
    total = math.prod(sizes)
    terms, inner = [], 1
    for size, stride in reversed(list(zip(sizes, strides))):
        if size > 1 and stride != 0:
            index = var if inner == 1 else f"{var} / {inner}"
            if inner * size != total:
                index = f"({index}) % {size}"
            terms.append(f"({index}) * {stride}")
        inner *= size
    return "(" + " + ".join(terms) + ")" if terms else "0"


def coalesce(shape, strides_list, keep_last: bool = False):
    """Merge adjacent dims that every operand walks as one (and drop size-1 dims). Returns
    (sizes, [strides per operand]); with keep_last the last dim stays last and separate (the
    axis a row op reduces over)."""
    dims = list(zip(shape, zip(*strides_list))) if shape else []
    last = dims.pop() if keep_last and dims else None
    merged: list[tuple[int, tuple]] = []
    for size, strides in dims:
        if size == 1:
            continue
        if merged and all(o == size * i for o, i in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    if last is not None:
        merged.append(last)
    if not merged:
        merged = [(1, tuple(0 for _ in strides_list))]
    sizes = [m[0] for m in merged]
    return sizes, [[m[1][k] for m in merged] for k in range(len(strides_list))]


@dataclass(frozen=True)
class RowLoop:
    """A loop nest over `rows` rows of `n` items: per operand, the C byte offset of row r and the
    byte stride of the items."""
    rows: int
    n: int
    row: list[str]
    step: list[int]


def row_loop(shape, strides_list, keep_last: bool = False) -> RowLoop:
    sizes, strides = coalesce(shape, strides_list, keep_last)
    outer = sizes[:-1]
    return RowLoop(math.prod(outer), sizes[-1], [offset_expr("r", outer, s[:-1]) for s in strides],
                   [s[-1] for s in strides])


def broadcast_strides(small: TensorType, shape) -> tuple[int, ...]:
    """Strides that read `small` as if broadcast to `shape` (zero along broadcast dims)."""
    pad = len(shape) - small.rank
    return tuple(0 for _ in range(pad)) + tuple(
        0 if s == 1 and big != 1 else st for s, st, big in zip(small.shape, small.strides, shape[pad:]))


def span_bytes(t: TensorType) -> int:
    """Bytes a tensor's data spans (TensorType.span_bytes, extended to rank 0)."""
    return t.dtype.block_bytes if not t.shape else t.span_bytes


def storage_bytes(t: TensorType) -> int:
    """Bytes a buffer holding the tensor contiguously needs (at least one block)."""
    return t.dtype.block_bytes if not t.shape else t.nbytes


def item_unit(dt) -> int:
    """The size of the items a kernel addresses a tensor by: its element, or a byte of blocks."""
    return 1 if dt.is_quantized else dt.block_bytes


def bytes_type(t: TensorType, row_bytes: int) -> TensorType:
    """A quantized tensor's storage as bytes: blocks copy as opaque data."""
    return TensorType(dtypes.i8, t.shape[:-1] + (row_bytes,), t.strides[:-1] + (1,))


def dims4(shape, strides, unit: int, dialect: str = "vulkan"):
    """(ne0..ne3, s0..s3): sizes innermost first, padded to 4, strides in units of `unit` bytes."""
    if len(shape) > 4:
        raise EmberError(f"{dialect}: rank {len(shape)} > 4")
    for s in strides:
        if s % unit:
            raise EmberError(f"{dialect}: stride {s} is not a multiple of the item size {unit}")
    ne = list(reversed(shape)) + [1] * (4 - len(shape))
    st = [s // unit for s in reversed(strides)] + [0] * (4 - len(strides))
    return ne, st


# ---- matmul batches ----------------------------------------------------------------------------
def matmul_operands(node) -> tuple[TensorType, TensorType]:
    """The types of a mul_mat's x and w, a vector x read as one row of K."""
    x, w = node.inputs[0].type, node.inputs[1].type
    if x.rank == 1:
        K = w.shape[-1]
        x = TensorType(x.dtype, (1, K), (x.strides[0] * K, x.strides[0]))
    return x, w


@dataclass(frozen=True)
class MatmulBatches:
    """The batch loop of a mul_mat: `batches` iterations of b, with the C byte offsets of x's and
    w's matrices for batch b (w broadcast over x's batch dims), and T, x_row after folding."""
    batches: int
    T: int
    x_row: int
    x_batch: str
    w_batch: str


def matmul_batches(x: TensorType, w: TensorType) -> MatmulBatches:
    batch, T = x.shape[:-2], x.shape[-2]
    x_bs, x_row = x.strides[:-2], x.strides[-2]
    w_batch_shape, w_bs = w.shape[:-2], w.strides[:-2]
    # With no batch of w to follow, the batch dims of x fold into T when x walks them as one.
    if all(s == 1 for s in w_batch_shape):
        sizes, (strides,) = coalesce(batch + (T,), [x_bs + (x_row,)])
        if len(sizes) == 1:
            batch, T, x_row, x_bs = (), sizes[0], strides[0] if sizes[0] > 1 else x_row, ()
    terms, inner = [], 1
    for i in reversed(range(len(batch))):
        if w_batch_shape and w_batch_shape[i] > 1 and w_bs[i]:
            ratio = batch[i] // w_batch_shape[i]
            index = f"(b / {inner}) % {batch[i]}"
            terms.append(f"(({index}) / {ratio}) * {w_bs[i]}" if ratio > 1 else f"({index}) * {w_bs[i]}")
        inner *= batch[i]
    w_batch = "(" + " + ".join(terms) + ")" if terms else "0"
    return MatmulBatches(math.prod(batch), T, x_row, offset_expr("b", batch, x_bs), w_batch)
