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

The cache is bounded (ember.files.cache_limit: $EMBER_CACHE_LIMIT, 2 GiB by default) with
least-recently-used eviction: a hit touches its entry (its mtime is its last use), and when the
entries under the cache's root pass the limit the oldest are removed until they fill
EVICT_TO of it. The root is ember's cache folder for a cache inside it (the CPU, OpenCL and
Vulkan entries share one bound), else the cache's own folder. A process counts the root once,
on its first use of it (removing stale temporaries a killed process left: ember.files), then
adds what it writes; another process's writes are counted on that process's own start. The
entry just used is the last to go (a bound smaller than what runs at once makes processes
rebuild each other's entries); a library already loaded stays mapped.
Compilers build in `build_folder()`, a temporary folder inside the cache named after its owner,
so a compile killed midway leaves nothing that outlives the next start's clean-up.

Imports only ember.files and ember.errors.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from ember.files import (atomic_write_bytes, atomic_write_text, cache_limit, default_cache_dir,
                         remove_stale_temporaries, temporary_prefix)

LAYOUT_VERSION = 1
SOURCE_MARK = b"ember-source-sha256:"
EVICT_TO = 0.9          # eviction leaves the entries at this fraction of the limit
ENTRY_NAME = re.compile(r"^[0-9a-f]{64}$")
SHARD_NAME = re.compile(r"^[0-9a-f]{2}$")
ENTRY_DEPTH = 3         # an entry lies at most this deep under a root (vulkan/spirv/<xx>/<key>)


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


# bytes of entries under each root this process has counted (on its first use) plus written since
_COUNTED: dict[Path, int] = {}
_COUNTED_LOCK = threading.Lock()


# ---- the cache folder as a whole: entries, their size and last use, eviction ---------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path          # the binary; its checksum is path.with_suffix(".sha256")
    size: int           # bytes of the binary and its checksum
    used: float         # last use: the binary's mtime (written, or touched by a hit)


def entries(root: Path | str) -> list[Entry]:
    """Every entry under root (<shard>/<key><suffix> with <key>.sha256 beside it, at most
    ENTRY_DEPTH deep), least recently used first."""
    found = []
    for folder, names, files in _walk(Path(root), ENTRY_DEPTH):
        if not SHARD_NAME.match(folder.name):
            continue
        for name in files:
            path = folder / name
            if (path.suffix == ".sha256" or not ENTRY_NAME.match(path.stem)
                    or not path.stem.startswith(folder.name)):
                continue
            try:
                st = path.stat()
                size = st.st_size + path.with_suffix(".sha256").stat().st_size
            except OSError:
                continue    # a binary without its checksum is no entry (get rebuilds it)
            found.append(Entry(path, size, st.st_mtime))
    return sorted(found, key=lambda e: (e.used, str(e.path)))


def _walk(root: Path, depth: int) -> Iterator[tuple[Path, list[str], list[str]]]:
    try:
        children = list(os.scandir(root))
    except OSError:
        return
    dirs = [c.name for c in children if c.is_dir(follow_symlinks=False) and not c.name.startswith(".")]
    files = [c.name for c in children if c.is_file(follow_symlinks=False)]
    yield root, dirs, files
    if depth > 0:
        for name in dirs:
            yield from _walk(root / name, depth - 1)


def remove_entry(path: Path) -> None:
    """Remove an entry, its checksum first (a binary without one is never trusted)."""
    for p in (path.with_suffix(".sha256"), path):
        p.unlink(missing_ok=True)


def evict(root: Path | str, limit: int | None, keep: Path | None = None) -> tuple[int, int]:
    """Remove the least recently used entries under root until they fill at most EVICT_TO of
    limit (nothing when they are within limit, or limit is None); keep is never removed.
    The entries' count and bytes left."""
    found = entries(root)
    total = sum(e.size for e in found)
    if limit is None or total <= limit:
        return len(found), total
    left = len(found)
    for entry in found:
        if total <= limit * EVICT_TO:
            break
        if keep is not None and entry.path == keep:
            continue
        remove_entry(entry.path)
        total -= entry.size
        left -= 1
    return left, total


def clear(root: Path | str) -> tuple[int, int]:
    """Remove every entry under root (and stale temporaries); the count and bytes removed. A
    process using an entry that vanished rebuilds it."""
    remove_stale_temporaries(root)
    with _COUNTED_LOCK:
        _COUNTED.pop(Path(root), None)
    found = entries(root)
    for entry in found:
        remove_entry(entry.path)
    for folder, _, _ in sorted(_walk(Path(root), ENTRY_DEPTH), key=lambda w: -len(w[0].parts)):
        if SHARD_NAME.match(folder.name):
            with contextlib.suppress(OSError):
                folder.rmdir()      # an emptied shard (one another process writes into stays)
    return len(found), sum(e.size for e in found)


def cache_root(directory: Path) -> Path:
    """The folder a cache in directory shares its bound with: ember's cache folder when the
    directory lies inside it, else the directory itself."""
    base = default_cache_dir()
    return base if directory.resolve().is_relative_to(base.resolve()) else directory


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
        self.root = cache_root(self.directory)
        self.limit = cache_limit()        # bytes, None for no bound
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
        it), else None. A valid entry is touched: it is now the most recently used."""
        self._start()
        path = self.path(key)
        try:
            data = path.read_bytes()
            expected = path.with_suffix(".sha256").read_text().strip()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            return None
        data = (data if carries_mark(data, source) else None) if self.embeds_mark else unmarked(data, source)
        if data is None or not self.accepts(data):
            return None
        with contextlib.suppress(OSError):      # a read-only cache still serves its entries
            os.utime(path)
        return data

    def put(self, key: str, data: bytes, source: str) -> Path:
        """Store the binary built from source under key (replacing any entry); its path."""
        self._start()
        if not self.embeds_mark:
            data = marked(data, source)
        path = self.path(key)
        atomic_write_bytes(path, data)
        # the checksum last: until it is in place the entry is not trusted
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest())
        self._grew(len(data) + 64, path)
        return path

    @contextlib.contextmanager
    def build_folder(self) -> Iterator[Path]:
        """A temporary folder for a compiler's files, inside the cache and named after this
        process (a killed compile's folder is removed by a later start), removed on exit."""
        self.directory.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.directory, prefix=temporary_prefix("build")))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- the bound ---------------------------------------------------------------------------------
    def _start(self) -> None:
        """On this process's first use of the root: remove stale temporaries, count the entries
        and evict down to the limit."""
        if self.root in _COUNTED:
            return
        with _COUNTED_LOCK:
            if self.root not in _COUNTED:
                remove_stale_temporaries(self.root)
                _COUNTED[self.root] = evict(self.root, self.limit)[1]

    def _grew(self, size: int, written: Path) -> None:
        with _COUNTED_LOCK:
            _COUNTED[self.root] = _COUNTED.get(self.root, 0) + size
            if self.limit is not None and _COUNTED[self.root] > self.limit:
                _COUNTED[self.root] = evict(self.root, self.limit, keep=written)[1]

    def discard(self, key: str) -> None:
        """Remove key's entry (one its loader refused although it looked valid)."""
        for path in (self.path(key).with_suffix(".sha256"), self.path(key)):
            path.unlink(missing_ok=True)

    def valid_path(self, key: str, source: str) -> Path | None:
        """The path of key's entry when it is valid (a hit), else None."""
        if self.get(key, source) is None:
            return None
        self.hits += 1
        return self.path(key)

    def cached(self, key: str, source: str, build: Callable[[], bytes]) -> Path:
        """The path of key's entry, made by build() when missing or not valid."""
        found = self.valid_path(key, source)
        if found is not None:
            return found
        path = self.put(key, build(), source)
        self.builds += 1
        return path
