"""The compiled-binary cache every backend's compiler uses: C shared libraries, OpenCL program
binaries, SPIR-V modules. A compiler says only how to compile (and what identifies it); the
keys, the checksums and the atomic writes are here, once.

Key: the sha256 of LAYOUT_VERSION (this file's on-disk format), the compiler's own format
version, its identity (compiler and version; device and driver), the options and the source.
An entry is <directory>/<key[:2]>/<key><suffix> with a sidecar <key>.sha256 holding the sha256
of its bytes. Each file is written to a temporary file and renamed into place, the binary
first: a binary without a matching sidecar (a crash between the two renames, a truncated or
damaged file) is rebuilt, never trusted. A compile that fails writes nothing.

The checksum only says the bytes are the ones written. What they were built from is said by the
source mark (`source_mark`: the sha256 of the source), which every entry carries: inside the
binary where the compiler puts it there (a C library holds it as a string constant, so an
artifact's copy of the library carries it too), else as the entry's first line, which `get`
strips. An entry whose mark is not its source's (an entry copied over another, a binary of
another program) is rebuilt like a damaged one.

Imports only ember.files and ember.errors.
"""
from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import Callable

from ember.files import atomic_write_bytes, atomic_write_text

LAYOUT_VERSION = 1
SOURCE_MARK = b"ember-source-sha256:"


def cache_key(*parts: str) -> str:
    """sha256 of the parts, each ended by a NUL (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def source_mark(source: str) -> bytes:
    """The bytes a binary built from source carries to say so."""
    return SOURCE_MARK + hashlib.sha256(source.encode()).hexdigest().encode()


def carries_mark(data: bytes, source: str) -> bool:
    """Whether a binary that embeds its mark (a C library) was built from source."""
    return source_mark(source) in data


def marked(data: bytes, source: str) -> bytes:
    """A binary with source's mark as its first line (how a binary that cannot hold the mark
    itself is stored: a cache entry, an artifact's OpenCL program binary)."""
    return source_mark(source) + b"\n" + data


def unmarked(data: bytes, source: str) -> bytes | None:
    """The binary of marked(binary, source); None when data is not marked with source's mark."""
    head = source_mark(source) + b"\n"
    return data[len(head):] if data.startswith(head) else None


class BinaryCache(abc.ABC):
    """Binaries on disk by key. A subclass gives `suffix`, `format_version` and `identity`, may
    refine `accepts` (a sanity check of the bytes beyond the checksum), and compiles; `hits` and
    `builds` count the cache's work (a subclass whose loading can still refuse an entry, the
    OpenCL driver, counts a hit only once loaded)."""

    suffix = ".bin"
    # True for a compiler that builds source_mark(source) into each binary (the CPU's C
    # libraries); otherwise the cache stores it as the entry's first line.
    embeds_mark = False

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self.hits = 0
        self.builds = 0

    @property
    @abc.abstractmethod
    def format_version(self) -> int:
        """The version of what this compiler writes; a bump invalidates every entry. Read on
        each key, so a subclass returns its module's constant."""

    @abc.abstractmethod
    def identity(self) -> str:
        """Everything a binary depends on besides its source and options: compiler and
        version, or platform, device and driver."""

    def accepts(self, data: bytes) -> bool:
        """Whether bytes whose checksum matched look like a binary of this kind."""
        return True

    # ---- entries ---------------------------------------------------------------------------------
    def key(self, source: str, options: str = "") -> str:
        return cache_key(str(LAYOUT_VERSION), str(self.format_version), self.identity(), options, source)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}{self.suffix}"

    def get(self, key: str, source: str) -> bytes | None:
        """A valid entry's binary (its checksum matches, it carries source's mark and `accepts`
        it), else None."""
        path = self.path(key)
        try:
            data = path.read_bytes()
            expected = path.with_suffix(".sha256").read_text().strip()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            return None
        data = (data if carries_mark(data, source) else None) if self.embeds_mark else unmarked(data, source)
        return data if data is not None and self.accepts(data) else None

    def put(self, key: str, data: bytes, source: str) -> Path:
        """Store the binary built from source under key (replacing any entry); its path."""
        if not self.embeds_mark:
            data = marked(data, source)
        path = self.path(key)
        atomic_write_bytes(path, data)
        # the checksum last: until it is in place the entry is not trusted
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest())
        return path

    def discard(self, key: str) -> None:
        """Remove key's entry (one its loader refused although it looked valid)."""
        for path in (self.path(key).with_suffix(".sha256"), self.path(key)):
            path.unlink(missing_ok=True)

    def cached(self, key: str, source: str, build: Callable[[], bytes]) -> Path:
        """The path of key's entry, made by build() when missing or not valid."""
        if self.get(key, source) is not None:
            self.hits += 1
            return self.path(key)
        path = self.put(key, build(), source)
        self.builds += 1
        return path
