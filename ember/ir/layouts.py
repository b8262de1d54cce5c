"""Storage layouts: how a tensor's bytes are arranged, when not in ggml's row order.

Every tensor has a layout (TensorType.layout). "row" is the IR's ordinary storage: rows of
values (or of quantized blocks) one after another, with the byte strides of the type. Any other
layout is named here, with the dtypes it applies to, the shapes it can hold, and how its bytes
are packed from and unpacked to the row layout (NumPy), so the reference interpreter can run it
and a pass can produce it. A layout other than "row" is always stored contiguously, as one flat
uint8 array of `nbytes`.

Ops declare which layouts each operand accepts (OpDef.layouts); the verifier rejects any node
reading a layout its op does not accept, so a kernel never meets bytes it cannot decode (as
when llama.cpp's SYCL backend once reordered Q8_0 weights for its GEMV but left its GEMM reading the old layout). Backends additionally refuse layouts they have no
kernels for.

Imports NumPy and ember.ir.dtypes only (ember.ir.types imports this module).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from ember.ir.dtypes import DType

ROW = "row"


@dataclass(frozen=True)
class Layout(abc.ABC):
    """A named storage layout. Subclasses define the packing; this base is the contract."""
    name: str
    dtypes: tuple[str, ...]      # dtype names the layout applies to
    doc: str = ""

    def problem(self, dt: DType, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of this dtype and shape cannot be held in the layout, or None."""
        if dt.name not in self.dtypes:
            return f"layout {self.name} applies to {', '.join(self.dtypes)}, not {dt.name}"
        return None

    @abc.abstractmethod
    def nbytes(self, dt: DType, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of this dtype and shape in the layout."""

    @abc.abstractmethod
    def pack(self, row: np.ndarray, dt: DType, shape: tuple[int, ...]) -> np.ndarray:
        """Row-layout storage -> this layout's storage (flat uint8)."""

    @abc.abstractmethod
    def unpack(self, data: np.ndarray, dt: DType, shape: tuple[int, ...]) -> np.ndarray:
        """This layout's storage -> row-layout storage (as the row type stores it)."""


@dataclass(frozen=True)
class AdrenoSoA(Layout):
    """Q8_0/Q4_0 matrices [M, K] for Adreno's GEMV/GEMM (llama.cpp PR #21938, ggml-opencl): blocks split
    into scales and quants, both transposed so neighbouring rows are adjacent in memory.

    Storage, flat: quants q as uint32 [K / per_u32, M] (per_u32 values per uint32), then the
    scales d as the fp16 bits, uint16 [K / 32, M]. Same byte count as the row layout. The GEMM
    tiles 4 rows per work item, hence M % 4 == 0."""
    per_u32: tuple[tuple[str, int], ...] = (("q8_0", 4), ("q4_0", 8))

    def values_per_u32(self, dt: DType) -> int:
        return dict(self.per_u32)[dt.name]

    def problem(self, dt, shape):
        why = super().problem(dt, shape)
        if why:
            return why
        if len(shape) != 2:
            return f"layout {self.name} holds 2-D matrices [M, K], not shape {list(shape)}"
        if shape[0] % 4:
            return f"layout {self.name} needs rows M % 4 == 0, got M = {shape[0]}"
        return None

    def nbytes(self, dt, shape):
        M, K = shape
        return M * K // self.values_per_u32(dt) * 4 + M * K // 32 * 2

    def parts(self, data: np.ndarray, dt: DType, shape) -> dict[str, np.ndarray]:
        """Views of the storage: {"q": uint32 [K/per_u32, M], "d": uint16 [K/32, M]}."""
        M, K = shape
        q_bytes = M * K // self.values_per_u32(dt) * 4
        flat = np.ascontiguousarray(data).reshape(-1)
        return {"q": flat[:q_bytes].view(np.uint32).reshape(-1, M),
                "d": flat[q_bytes:].view(np.uint16).reshape(-1, M)}

    def pack(self, row, dt, shape):
        M, K = shape
        blocks = np.ascontiguousarray(row).reshape(M, K // 32, dt.block_bytes)
        d = np.ascontiguousarray(blocks[:, :, :2]).view(np.uint16).reshape(M, K // 32)
        q = np.ascontiguousarray(blocks[:, :, 2:]).reshape(M, -1).view(np.uint32)
        return np.concatenate([np.ascontiguousarray(q.T).view(np.uint8).reshape(-1),
                               np.ascontiguousarray(d.T).view(np.uint8).reshape(-1)])

    def unpack(self, data, dt, shape):
        M, K = shape
        parts = self.parts(data, dt, shape)
        q = np.ascontiguousarray(parts["q"].T).view(np.uint8).reshape(M, K // 32, -1)
        d = np.ascontiguousarray(parts["d"].T).view(np.uint8).reshape(M, K // 32, 2)
        return np.concatenate([d, q], axis=2).reshape(M, -1)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (
        AdrenoSoA("adreno_soa", ("q8_0", "q4_0"),
                  doc="Q8_0/Q4_0 split into scales and quants, transposed (Adreno GEMV/GEMM)"),
    )
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join((ROW,) + tuple(LAYOUTS))}") from None


def to_row(data: np.ndarray, t) -> np.ndarray:
    """Storage of a tensor of type t, unpacked to the row layout (t's data itself when row)."""
    if t.layout == ROW:
        return data
    return get_layout(t.layout).unpack(data, t.dtype, t.shape)


def from_row(data: np.ndarray, t) -> np.ndarray:
    """Row-layout storage of a tensor, packed into t's layout (the data itself when row)."""
    if t.layout == ROW:
        return data
    return get_layout(t.layout).pack(data, t.dtype, t.shape)


def unsupported_layout(node, supported=(ROW,)) -> str | None:
    """Why node cannot run on a target that reads only the `supported` layouts (naming the
    operand and its layout), or None. Meant for a backend's supports_op, whose caller names the
    node: `require_supported` then raises an EmberError naming node, operand and layout."""
    for k, operand in enumerate(node.inputs):
        if operand.type.layout not in supported:
            return (f"{node.op}: operand {k} ({operand.op} : {operand.type}) is in layout "
                    f"{operand.type.layout}; this target reads only {', '.join(supported)}")
    if node.type.layout not in supported:
        return f"{node.op}: its result is in layout {node.type.layout}; this target reads only " \
               f"{', '.join(supported)}"
    return None
