"""Row gather and scatter (embedding lookup, KV-cache writes; a write into a quantized cache
quantizes each row as it lands)."""
from __future__ import annotations

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.ops import OpDef, register
from ember.ir.ops.rules import FLOAT_ACT, expect_dtype, f32, require
from ember.ir.types import TensorType


def _get_rows_infer(ts, attrs):
    table, idx = ts
    expect_dtype("get_rows", "table", table, dtypes.WEIGHT_TYPES)
    expect_dtype("get_rows", "idx", idx, (dtypes.i32,))
    require(table.rank == 2 and idx.rank == 1,
            f"get_rows: table must be [rows, D] and idx [T]; got {list(table.shape)} and {list(idx.shape)}")
    return f32((idx.shape[0], table.shape[1]))


def _get_rows_ref(xs, attrs, its, ot):
    table, idx = xs
    if np.any((idx < 0) | (idx >= table.shape[0])):
        raise IndexError(f"get_rows: index out of range [0, {table.shape[0]})")
    return dtypes.to_float32(np.ascontiguousarray(table[idx]), its[0].dtype)


register(OpDef("get_rows", ("table", "idx"), _get_rows_infer, _get_rows_ref, raw=True,
               layouts={"table": ("adreno_soa",)},   # a tied embedding shares the matmul's layout
               doc="Rows idx of table (any weight dtype, dequantized) -> f32[T, D]."))

SET_ROWS_DST = (dtypes.f32, dtypes.f16, dtypes.bf16) + dtypes.KV_QUANTIZED


def _set_rows_infer(ts, attrs):
    dst, idx, src = ts
    expect_dtype("set_rows", "dst", dst, SET_ROWS_DST)
    expect_dtype("set_rows", "idx", idx, (dtypes.i32,))
    expect_dtype("set_rows", "src", src, FLOAT_ACT)
    require(dst.rank == 2 and idx.rank == 1 and src.rank == 2,
            "set_rows: dst must be [rows, D], idx [T], src [T, D]")
    require(src.shape == (idx.shape[0], dst.shape[1]),
            f"set_rows: src {list(src.shape)} must be [{idx.shape[0]}, {dst.shape[1]}]")
    if dst.dtype.is_quantized:
        require(dst.strides[-1] == dst.dtype.block_bytes,
                f"set_rows: a {dst.dtype} dst must keep its blocks contiguous")
    return TensorType(dst.dtype, dst.shape)


def _set_rows_ref(xs, attrs, its, ot):
    dst, idx, src = xs
    if np.any((idx < 0) | (idx >= dst.shape[0])):
        raise IndexError(f"set_rows: index out of range [0, {dst.shape[0]})")
    out = np.array(dst, copy=True, order="C")
    out[idx] = dtypes.from_float32(src.astype(np.float32), ot.dtype)
    return out


register(OpDef("set_rows", ("dst", "idx", "src"), _set_rows_infer, _set_rows_ref, raw=True,
               doc="dst with rows idx replaced by src (converted to dst's dtype; a quantized dst "
                   "(q8_0, q4_0, turbo3, turbo4) quantizes each written row, block by block). "
                   "Backends may update dst in place when nothing else reads the old dst."))
