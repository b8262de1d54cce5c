"""Reading GGUF files: metadata as Python values, tensors as NumPy views of the memory map.

A tensor's data is never copied here: `GGUFFile.tensor(name)` is a read-only view of the mapped
file in ember's storage layout (shape outermost first; quantized types as uint8 [rows, row bytes];
bf16 as uint16 bits), ready to be a graph constant. Anything wrong with the file is a
`ModelFileError` naming the file and, where it applies, the tensor and byte offset.

The header is parsed here with the `gguf` package's constants rather than by `gguf.GGUFReader`:
the reader makes a memmap slice per array element, which takes 15-30 s for the 262144-entry
vocabulary of the default gemma3 model; this parser takes well under a second. Tests check that
both read the same metadata and tensor offsets. Imports numpy, gguf and ember's dtypes only.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np
from gguf.constants import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC,
                            GGMLQuantizationType, GGUFValueType, Keys)

from ember.errors import EmberError
import ember.ir.dtypes as dtypes
from ember.ir.types import MAX_RANK, TensorType

SUPPORTED_VERSIONS = (2, 3)

# GGUF tensor type -> the ember dtype that stores it byte for byte.
GGML_TO_EMBER: dict[GGMLQuantizationType, dtypes.DType] = {
    GGMLQuantizationType.F32: dtypes.f32,
    GGMLQuantizationType.F16: dtypes.f16,
    GGMLQuantizationType.BF16: dtypes.bf16,
    GGMLQuantizationType.Q8_0: dtypes.q8_0,
    GGMLQuantizationType.Q4_0: dtypes.q4_0,
    GGMLQuantizationType.Q5_0: dtypes.q5_0,
    GGMLQuantizationType.Q4_K: dtypes.q4_k,
    GGMLQuantizationType.Q6_K: dtypes.q6_k,
    GGMLQuantizationType.Q4_1: dtypes.q4_1,
    GGMLQuantizationType.Q5_1: dtypes.q5_1,
    GGMLQuantizationType.Q2_K: dtypes.q2_k,
    GGMLQuantizationType.Q3_K: dtypes.q3_k,
    GGMLQuantizationType.Q5_K: dtypes.q5_k,
    GGMLQuantizationType.IQ4_NL: dtypes.iq4_nl,
    GGMLQuantizationType.IQ4_XS: dtypes.iq4_xs,
    GGMLQuantizationType.MXFP4: dtypes.mxfp4,
    GGMLQuantizationType.NVFP4: dtypes.nvfp4,
}
EMBER_TO_GGML = {v: k for k, v in GGML_TO_EMBER.items()}
SUPPORTED_TYPE_NAMES = ", ".join(t.name for t in GGML_TO_EMBER)

_SCALARS: dict[GGUFValueType, str] = {   # struct format, little endian
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_NUMPY_OF = {t: np.dtype(f) for t, f in _SCALARS.items()}
_U64 = struct.Struct("<Q")


class ModelFileError(EmberError):
    """A model file that cannot be used: missing, not a GGUF, truncated, or holding something
    ember does not support. The message names the file and what is wrong with it."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]      # outermost first (GGUF's ne reversed)
    offset: int                 # absolute byte offset of the data in the file
    nbytes: int

    @property
    def dtype(self) -> dtypes.DType:
        return GGML_TO_EMBER[self.ggml_type]

    @property
    def type(self) -> TensorType:
        return TensorType(self.dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.name} {self.ggml_type.name}{list(self.shape)} @ {self.offset}"


class _Cursor:
    """Reads little-endian header fields, turning a read past the end into a ModelFileError."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(f"{self.path}: truncated header: {what} at offset {self.pos} needs "
                                 f"{n} bytes but the file ends at {self.size}")

    def scalar(self, vtype: GGUFValueType, what: str):
        fmt = _SCALARS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        # Token texts may hold partial UTF-8 sequences; surrogateescape keeps their bytes.
        return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        """count strings, as `string` reads them one by one (same checks, same messages), in
        one tight loop: a vocabulary has 262,144 of them, and the messages' text is made only
        for a file that is truncated."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            append(buf[pos:pos + n].decode("utf-8", errors="surrogateescape"))
            pos += n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what} has unknown value type {raw} "
                                 f"(at offset {self.pos - 4})") from None

    def value(self, vtype: GGUFValueType, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            item_type = self.value_type(f"items of {what}")
            if item_type == GGUFValueType.ARRAY:
                # gguf.cpp refuses arrays of arrays (a 2000-deep nest once overflowed the stack)
                raise ModelFileError(f"{self.path}: {what} is an array of arrays, which GGUF "
                                     f"does not allow (at offset {self.pos - 4})")
            count = self.u64(f"length of {what}")
            if item_type in _NUMPY_OF:
                dt = _NUMPY_OF[item_type]
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr
            if count > self.size - self.pos:   # every item takes at least one byte
                self.need(count, what)
            if item_type == GGUFValueType.STRING:
                return self.strings(count, what)
            return [self.value(item_type, f"{what}[{i}]") for i in range(count)]
        return self.scalar(vtype, what)


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensor_infos` (name -> TensorInfo) and
    `tensor(name)`, a read-only view of the mapped data. Numeric metadata arrays are NumPy
    arrays, string arrays are lists of str."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelFileError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: not a regular file")
        self.size = self.path.stat().st_size
        if self.size < 4:
            raise ModelFileError(f"{self.path}: not a GGUF file ({self.size} bytes, too short "
                                 "for the GGUF magic)")
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # Every tensor view hangs off this one array, whose base is the mmap.
        self.bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        self._read_header()
        self._arrays: dict[str, np.ndarray] = {}

    # ---- header ---------------------------------------------------------------------------
    def _read_header(self):
        cur = _Cursor(self._mmap, self.size, self.path)
        magic = bytes(self._mmap[:4])
        if struct.unpack("<I", magic)[0] != GGUF_MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.u32("version")
        if version & 0xFFFF == 0 and version != 0:
            raise ModelFileError(f"{self.path}: a big-endian GGUF file; ember reads little-endian "
                                 "files only")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(f"{self.path}: GGUF version {version} is not supported "
                                 f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in metadata:
                # gguf.cpp refuses a repeated key; a reader keeping the last one would read
                # another value than llama.cpp does
                raise ModelFileError(f"{self.path}: metadata {key!r} appears twice")
            vtype = cur.value_type(f"metadata {key!r}")
            metadata[key] = cur.value(vtype, f"metadata {key!r}")
        self.metadata: Mapping[str, Any] = MappingProxyType(metadata)

        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"rank of tensor {name!r}")
            if n_dims > MAX_RANK:
                raise ModelFileError(f"{self.path}: tensor {name!r} has {n_dims} dimensions "
                                     f"(at most {MAX_RANK} are supported)")
            ne = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            raw_type = cur.u32(f"type of tensor {name!r}")
            offset = cur.u64(f"data offset of tensor {name!r}")
            raw_infos.append((name, ne, raw_type, offset))

        alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise ModelFileError(f"{self.path}: metadata {Keys.General.ALIGNMENT!r} = {alignment!r} "
                                 "is not a power of two")
        self.alignment = alignment
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment

        infos: dict[str, TensorInfo] = {}
        expected = 0
        for name, ne, raw_type, offset in raw_infos:
            if name in infos:
                raise ModelFileError(f"{self.path}: tensor {name!r} appears twice")
            info = self._tensor_info(name, ne, raw_type, offset)
            # gguf.cpp: each tensor's data follows the previous one's, padded to the alignment;
            # an offset elsewhere would overlap another tensor or leave bytes unread.
            if offset != expected:
                raise ModelFileError(f"{self.path}: tensor {name!r} data offset {offset} is not "
                                     f"{expected}, where the previous tensor's data ends (padded "
                                     f"to {self.alignment} bytes): overlapping or misplaced data")
            expected += -(-info.nbytes // self.alignment) * self.alignment
            infos[name] = info
        self.tensor_infos: Mapping[str, TensorInfo] = MappingProxyType(infos)

    def _tensor_info(self, name: str, ne: list[int], raw_type: int, offset: int) -> TensorInfo:
        try:
            gtype = GGMLQuantizationType(raw_type)
        except ValueError:
            gtype = None
        if gtype not in GGML_TO_EMBER:
            type_name = gtype.name if gtype is not None else f"unknown type id {raw_type}"
            raise ModelFileError(f"{self.path}: tensor {name!r} has type {type_name}, which ember "
                                 f"does not support; supported types: {SUPPORTED_TYPE_NAMES}")
        block, block_bytes = GGML_QUANT_SIZES[gtype]
        if ne and ne[0] % block:
            raise ModelFileError(f"{self.path}: tensor {name!r} ({gtype.name}) has rows of "
                                 f"{ne[0]} values, not a whole number of {block}-value blocks")
        # Python integers: a uint64 product wraps ([256, 2**56] gave 0 bytes); gguf.cpp bounds
        # each dimension and the element count by INT64_MAX.
        n = 1
        for d in ne:
            n *= d
        if any(d >= 2**63 for d in ne) or n >= 2**63:
            raise ModelFileError(f"{self.path}: tensor {name!r} dimensions {list(reversed(ne))} "
                                 "overflow a 64-bit element count")
        nbytes = n // block * block_bytes
        start = self.data_offset + offset
        if start % self.alignment:
            raise ModelFileError(f"{self.path}: tensor {name!r} data at offset {start} is not "
                                 f"aligned to {self.alignment} bytes")
        if start + nbytes > self.size:
            raise ModelFileError(f"{self.path}: tensor {name!r} ({gtype.name}{list(reversed(ne))}) "
                                 f"data [{start}, {start + nbytes}) runs past the end of the file "
                                 f"({self.size} bytes): the file is truncated")
        return TensorInfo(name, gtype, tuple(int(d) for d in reversed(ne)), start, nbytes)

    # ---- access ---------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise ModelFileError(f"{self.path}: metadata has no {Keys.General.ARCHITECTURE!r}")
        return arch

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_infos

    def tensor(self, name: str) -> np.ndarray:
        """The tensor's data as stored, a read-only view of the memory map (no copy)."""
        array = self._arrays.get(name)
        if array is None:
            try:
                info = self.tensor_infos[name]
            except KeyError:
                raise ModelFileError(f"{self.path}: no tensor {name!r}") from None
            dt = info.dtype
            shape = info.shape or (1,)
            if dt.is_quantized:
                storage = shape[:-1] + (dt.row_bytes(shape[-1]),)
            else:
                storage = shape
            array = self.bytes[info.offset:info.offset + info.nbytes].view(dt.numpy).reshape(storage)
            self._arrays[name] = array
        return array

    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor by name, as views of the memory map."""
        return {name: self.tensor(name) for name in self.tensor_infos}

    def __repr__(self) -> str:
        return (f"<GGUFFile {str(self.path)!r} v{self.version}: {len(self.metadata)} keys, "
                f"{len(self.tensor_infos)} tensors>")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
