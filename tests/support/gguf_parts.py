"""A GGUF file taken apart into its pieces and put back together, for tests of broken files
and the GGUF fuzzer: metadata entries as (key, encoded type+value), tensor infos as editable
lists, and the data section as bytes. Editing one piece and writing again gives a file that is
broken in that one way only (the header is re-laid out, the data padded to the alignment).

Written from the GGUF format description (ggml/docs/gguf.md), independently of ember's reader.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGUFValueType

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}


def encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: GGUFValueType, value, item_type: GGUFValueType | None = None) -> bytes:
    """A value's bytes after its type field (an array: item type, count, items)."""
    if vtype == GGUFValueType.STRING:
        return encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        out = struct.pack("<IQ", int(item_type), len(value))
        return out + b"".join(encode_value(item_type, v) for v in value)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def entry(vtype: GGUFValueType, value, item_type: GGUFValueType | None = None) -> bytes:
    """The encoded type and value of a metadata entry (what GGUFParts.kvs holds per key)."""
    return struct.pack("<I", int(vtype)) + encode_value(vtype, value, item_type)


def nested_array(depth: int) -> bytes:
    """An entry holding an array of arrays `depth` deep (GGUF forbids arrays of arrays)."""
    inner = struct.pack("<IQ", int(GGUFValueType.UINT8), 0)
    for _ in range(depth):
        inner = struct.pack("<IQ", int(GGUFValueType.ARRAY), 1) + inner
    return struct.pack("<I", int(GGUFValueType.ARRAY)) + inner


@dataclass
class GGUFParts:
    version: int
    kvs: list[tuple[str, bytes]]                 # (key, encoded type+value)
    tensors: list[list] = field(default_factory=list)   # [name, dims (ggml order), type id, offset]
    data: bytes = b""
    alignment: int = 32

    def to_bytes(self) -> bytes:
        head = b"GGUF" + struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs))
        head += b"".join(encode_string(k) + v for k, v in self.kvs)
        for name, dims, type_id, offset in self.tensors:
            head += encode_string(name) + struct.pack("<I", len(dims))
            head += b"".join(struct.pack("<Q", d % 2**64) for d in dims)
            head += struct.pack("<IQ", type_id % 2**32, offset % 2**64)
        head += bytes(-len(head) % self.alignment)
        return head + self.data

    def write(self, path: Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)

    def index(self, key: str) -> int:
        return next(i for i, (k, _) in enumerate(self.kvs) if k == key)

    def set(self, key: str, encoded: bytes) -> "GGUFParts":
        """Replace key's entry (or add it) with an encoded type+value."""
        try:
            self.kvs[self.index(key)] = (key, encoded)
        except StopIteration:
            self.kvs.append((key, encoded))
        return self


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8", errors="surrogateescape")

    def skip_value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            self.string()
        elif vtype == GGUFValueType.ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in SCALAR_FORMATS:
                self.pos += count * struct.calcsize(SCALAR_FORMATS[GGUFValueType(item)])
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            self.pos += struct.calcsize(SCALAR_FORMATS[GGUFValueType(vtype)])


def read_parts(path) -> GGUFParts:
    """A well-formed GGUF file's pieces."""
    return read_parts_bytes(Path(path).read_bytes())


def read_parts_bytes(buf: bytes) -> GGUFParts:
    """The pieces of a well-formed GGUF file's bytes."""
    r = _Reader(buf)
    assert buf[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kvs, alignment = [], 32
    for _ in range(n_kv):
        key = r.string()
        start = r.pos
        vtype = r.take("<I")
        r.skip_value(vtype)
        kvs.append((key, buf[start:r.pos]))
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", buf, start + 4)[0]
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        tensors.append([name, dims, r.take("<I"), r.take("<Q")])
    data_start = -(-r.pos // alignment) * alignment
    return GGUFParts(version, kvs, tensors, buf[data_start:], alignment)
