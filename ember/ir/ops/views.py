"""View ops (no data moves: a new shape and byte strides over the operand's storage) and the
ops that make or convert contiguous copies (cont, cast, concat)."""
from __future__ import annotations

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.ops import Attr, OpDef, register
from ember.ir.ops.rules import require
from ember.ir.types import TensorType


# ---- storage helpers used by the references of raw ops -------------------------------------
def storage_layout(t: TensorType) -> tuple[tuple, tuple]:
    """NumPy shape and strides of a tensor's storage (quantized: bytes along the last axis; a
    layout other than row: one flat uint8 array)."""
    if t.layout != "row":
        return (t.nbytes,), (1,)
    if t.dtype.is_quantized:
        return t.shape[:-1] + (t.dtype.row_bytes(t.shape[-1]),), t.strides[:-1] + (1,)
    return t.shape, t.strides


def root_of(a: np.ndarray) -> tuple[np.ndarray, int]:
    """The ndarray that owns a's memory, and a's byte offset inside it."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root, a.__array_interface__["data"][0] - root.__array_interface__["data"][0]


def storage_view(a: np.ndarray, offset: int, t: TensorType) -> np.ndarray:
    root, base = root_of(a)
    shape, strides = storage_layout(t)
    return np.ndarray(shape, dtype=t.dtype.numpy, buffer=root, offset=base + offset, strides=strides)


# ---- view ------------------------------------------------------------------------------------
def _view_infer(ts, attrs):
    x = ts[0]
    shape, strides, offset = attrs["shape"], attrs["strides"], attrs["offset"]
    require(len(shape) == len(strides), f"view: shape {list(shape)} and strides {list(strides)} differ in rank")
    require(offset >= 0, f"view: negative offset {offset}")
    t = TensorType(x.dtype, shape, strides)
    if x.dtype.is_quantized:
        require(strides[-1] == x.dtype.block_bytes, f"view: a {x.dtype} view must keep its blocks contiguous")
    # Kernels index a view as base + offset + i * stride with unsigned sizes: a negative stride
    # would read below the buffer, so it is refused, and the bound is the real byte extent.
    require(all(s >= 0 for s in strides), f"view: negative stride in {list(strides)}")
    # kernels address whole elements (GPU buffers are typed): byte offsets and strides that split
    # one gave wrong values on OpenCL (found by the IR fuzzer)
    unit = x.dtype.block_bytes
    require(offset % unit == 0 and all(s % unit == 0 for s in strides),
            f"view: offset {offset} and strides {list(strides)} must be multiples of the {unit}-byte "
            f"{x.dtype} {'block' if x.dtype.is_quantized else 'element'}")
    lo, hi = t.byte_extent
    _, x_hi = x.byte_extent
    require(offset + lo >= 0 and offset + hi <= x_hi,
            f"view: bytes [{offset + lo}, {offset + hi}) fall outside the operand's {x_hi} bytes")
    return t


register(OpDef("view", ("x",), _view_infer,
               lambda xs, a, its, ot: storage_view(xs[0], a["offset"], ot),
               attrs={"shape": Attr("ints"), "strides": Attr("ints"), "offset": Attr("int", 0)},
               category="view", raw=True,
               doc="A view of x's storage at a byte offset with the given shape and byte strides."))


def nocopy_reshape_strides(shape, strides, new_shape) -> tuple[int, ...] | None:
    """Byte strides that give a strided tensor a new shape without moving data, or None.

    Groups of old axes whose sizes multiply to a group of new axes must be contiguous with
    each other; the new axes of the group then take strides from the group's innermost one.
    (The same rule as NumPy's no-copy reshape.)
    """
    old = [(d, s) for d, s in zip(shape, strides) if d != 1]
    out = [0] * len(new_shape)
    oi = ni = 0
    while ni < len(new_shape) and oi < len(old):
        nsize, osize = new_shape[ni], old[oi][0]
        nj, oj = ni + 1, oi + 1
        while nsize != osize:
            if nsize < osize:
                nsize *= new_shape[nj]
                nj += 1
            else:
                osize *= old[oj][0]
                oj += 1
        for k in range(oi, oj - 1):
            if old[k][1] != old[k + 1][0] * old[k + 1][1]:
                return None
        out[nj - 1] = old[oj - 1][1]
        for k in range(nj - 1, ni, -1):
            out[k - 1] = out[k] * new_shape[k]
        ni, oi = nj, oj
    for k in range(ni, len(new_shape)):   # trailing size-1 axes
        out[k] = out[ni - 1] if ni else strides[-1]
    return tuple(out)


def _reshape_infer(ts, attrs):
    x, shape = ts[0], attrs["shape"]
    if x.dtype.is_quantized and shape:
        require(shape[-1] % x.dtype.block_size == 0,
                f"reshape: the last axis {shape[-1]} of a {x.dtype} result is not a multiple of the "
                f"{x.dtype} block size {x.dtype.block_size} (each row holds whole blocks: a KV cache "
                f"needs a head size that is a multiple of it)")
    t = TensorType(x.dtype, shape)
    require(t.numel == x.numel, f"reshape: {list(x.shape)} has {x.numel} values, {list(shape)} has {t.numel}")
    if x.is_contiguous or t.numel == 0:
        return t
    require(not x.dtype.is_quantized, f"reshape: a strided {x.dtype} operand cannot be reshaped (use cont first)")
    strides = nocopy_reshape_strides(x.shape, x.strides, shape)
    require(strides is not None,
            f"reshape: operand {x} cannot take shape {list(shape)} without a copy (use cont first)")
    return TensorType(x.dtype, shape, strides)


register(OpDef("reshape", ("x",), _reshape_infer,
               lambda xs, a, its, ot: storage_view(xs[0], 0, ot),
               attrs={"shape": Attr("ints")}, category="view", raw=True,
               doc="The same data under a new shape; a strided operand keeps its strides where "
                   "no copy is needed (as NumPy's reshape), else the op is refused."))


def _permute_infer(ts, attrs):
    x, axes = ts[0], attrs["axes"]
    require(sorted(axes) == list(range(x.rank)), f"permute: axes {list(axes)} are not a permutation of 0..{x.rank - 1}")
    if x.dtype.is_quantized:
        require(axes[-1] == x.rank - 1, f"permute: a {x.dtype} tensor must keep its last axis last")
    return TensorType(x.dtype, tuple(x.shape[i] for i in axes), tuple(x.strides[i] for i in axes))


register(OpDef("permute", ("x",), _permute_infer,
               lambda xs, a, its, ot: storage_view(xs[0], 0, ot),
               attrs={"axes": Attr("ints")}, category="view", raw=True,
               doc="Axes reordered: result axis i is operand axis axes[i]."))


def _transpose_infer(ts, attrs):
    x = ts[0]
    require(x.rank >= 2, f"transpose: operand must be at least 2-D, got {list(x.shape)}")
    require(not x.dtype.is_quantized, f"transpose: {x.dtype} blocks cannot be transposed")
    axes = tuple(range(x.rank - 2)) + (x.rank - 1, x.rank - 2)
    return TensorType(x.dtype, tuple(x.shape[i] for i in axes), tuple(x.strides[i] for i in axes))


register(OpDef("transpose", ("x",), _transpose_infer,
               lambda xs, a, its, ot: storage_view(xs[0], 0, ot),
               category="view", raw=True, doc="The last two axes swapped."))


# ---- copies ----------------------------------------------------------------------------------
register(OpDef("cont", ("x",), lambda ts, a: TensorType(ts[0].dtype, ts[0].shape),
               lambda xs, a, its, ot: np.asarray(xs[0], order="C"),
               raw=True, doc="A contiguous copy of a (possibly strided) tensor."))

CASTABLE = (dtypes.f32, dtypes.f16, dtypes.bf16)


def _cast_infer(ts, attrs):
    x, target = ts[0], dtypes.dtype(attrs["dtype"])
    require(x.dtype in CASTABLE and target in CASTABLE,
            f"cast: only between {', '.join(d.name for d in CASTABLE)}; got {x.dtype} -> {target}")
    return TensorType(target, x.shape)


register(OpDef("cast", ("x",), _cast_infer,
               lambda xs, a, its, ot: dtypes.from_float32(dtypes.to_float32(xs[0], its[0].dtype), ot.dtype),
               attrs={"dtype": Attr("dtype")}, raw=True,
               doc="Convert between float types (round to nearest even)."))


def _concat_infer(ts, attrs):
    a, b = ts
    axis = attrs["axis"]
    require(a.dtype == b.dtype, f"concat: dtypes differ: {a.dtype} vs {b.dtype}")
    require(a.rank == b.rank and -a.rank <= axis < a.rank,
            f"concat: ranks {a.rank}, {b.rank} and axis {axis} do not fit")
    axis %= a.rank
    require(all(x == y for i, (x, y) in enumerate(zip(a.shape, b.shape)) if i != axis),
            f"concat: shapes {list(a.shape)} and {list(b.shape)} differ off axis {axis}")
    if a.dtype.is_quantized:
        require(axis != a.rank - 1, f"concat: {a.dtype} tensors join along an outer axis only")
    shape = list(a.shape)
    shape[axis] += b.shape[axis]
    return TensorType(a.dtype, tuple(shape))


register(OpDef("concat", ("a", "b"), _concat_infer,
               lambda xs, a, its, ot: np.concatenate(xs, axis=a["axis"] % len(ot.shape)),
               attrs={"axis": Attr("int", 0)}, raw=True,
               doc="a and b joined along axis (quantized: outer axes only, whole blocks)."))
