"""The compiled-binary cache every backend's compiler uses: C shared libraries, OpenCL program
binaries, SPIR-V modules. A compiler says only how to compile (and what identifies it); the
keys, the checksums and the atomic writes are here, once.

Key: the sha256 of LAYOUT_VERSION (this file's on-disk format), the compiler's own format
version, its identity (compiler and version; device and driver), the options and the source.
An entry is <directory>/<key[:2]>/<key><suffix> with a sidecar <key>.sha256 holding the sha256
of its bytes. Each file is written to a temporary file and renamed into place, the binary
first: a binary without a matching sidecar (a crash between the two renames, a truncated or
damaged file) is rebuilt, never trusted. A compile that fails writes nothing.

Imports only ember.files and ember.errors.
"""
from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import Callable

from ember.files import atomic_write_bytes, atomic_write_text

LAYOUT_VERSION = 1


def cache_key(*parts: str) -> str:
    """sha256 of the parts, each ended by a NUL (so ("ab", "c") and ("a", "bc") differ)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class BinaryCache(abc.ABC):
    """Binaries on disk by key. A subclass gives `suffix`, `format_version` and `identity`, may
    refine `accepts` (a sanity check of the bytes beyond the checksum), and compiles; `hits` and
    `builds` count the cache's work (a subclass whose loading can still refuse an entry, the
    OpenCL driver, counts a hit only once loaded)."""

    suffix = ".bin"

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

    def get(self, key: str) -> bytes | None:
        """A valid entry's bytes (its checksum matches and `accepts` them), else None."""
        path = self.path(key)
        try:
            data = path.read_bytes()
            expected = path.with_suffix(".sha256").read_text().strip()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != expected or not self.accepts(data):
            return None
        return data

    def put(self, key: str, data: bytes) -> Path:
        """Store data under key (replacing any entry) and return its path."""
        path = self.path(key)
        atomic_write_bytes(path, data)
        # the checksum last: until it is in place the entry is not trusted
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest())
        return path

    def cached(self, key: str, build: Callable[[], bytes]) -> Path:
        """The path of key's entry, made by build() when missing or not valid."""
        if self.get(key) is not None:
            self.hits += 1
            return self.path(key)
        path = self.put(key, build())
        self.builds += 1
        return path
