"""Read the key/value metadata of a GGUF file, and nothing else, quickly.

`gguf.GGUFReader` builds a NumPy view per array element and parses every tensor record; on a
262144-token vocabulary that takes tens of seconds. A tokenizer needs only the metadata, so this
reader walks the header with `struct` and turns numeric arrays into NumPy arrays in one call.
Values come back as the natural Python types: str, int, float, bool, list[str], np.ndarray.
Imports only the standard library and NumPy.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from ember.errors import EmberError

# GGUF value type codes (gguf.GGUFValueType), with their struct format or NumPy dtype.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING = 8
_ARRAY = 9


class GGUFMetadataError(EmberError):
    """The file is not a GGUF file this reader understands; the message names the file."""


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def unpack(self, fmt: str):
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFMetadataError(f"{self.path}: metadata truncated at byte {self.pos}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFMetadataError(f"{self.path}: string runs past the end of the file at byte {self.pos}")
        # surrogateescape keeps tokens that are not valid UTF-8 distinct and reversible
        s = self.buf[self.pos:end].decode("utf-8", errors="surrogateescape")
        self.pos = end
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            return self.array(item_type, count)
        raise GGUFMetadataError(f"{self.path}: unknown value type {vtype} at byte {self.pos}")

    def array(self, item_type: int, count: int):
        if item_type == _STRING:
            return [self.string() for _ in range(count)]
        if item_type in _SCALAR_FORMATS:
            dtype = np.dtype(_SCALAR_FORMATS[item_type])
            nbytes = dtype.itemsize * count
            if self.pos + nbytes > len(self.buf):
                raise GGUFMetadataError(f"{self.path}: array runs past the end of the file")
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += nbytes
            return out
        return [self.value(item_type) for _ in range(count)]


def read_gguf_metadata(path: str | Path) -> dict[str, object]:
    """All key/value pairs of a GGUF (version 2 or 3) file, in file order."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise GGUFMetadataError(f"{path}: empty file, not GGUF") from e
    try:
        cur = _Cursor(buf, path)
        if len(buf) < 24 or buf[:4] != b"GGUF":
            raise GGUFMetadataError(f"{path}: not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFMetadataError(f"{path}: GGUF version {version} is not supported (2 or 3 are)")
        cur.unpack("<Q")  # tensor count: tensors are not read here
        n_kv = cur.unpack("<Q")
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        return meta
    finally:
        buf.close()
