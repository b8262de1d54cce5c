"""Loading the CPU backend's shared libraries: the source-mark check every library passes before
it is loaded, and the matmul kernel libraries graph libraries link against.

A kernel library is loaded once per process, with RTLD_GLOBAL, under its symbol tag (a hash of
its cache key: source, ISA flags, tier), so graph libraries resolve its functions and libraries
of different ISAs, optimisation tiers or versions sit side by side. A JIT-compiled graph links
one library per weight type it uses (a first start compiles only the kernels its model needs);
an artifact carries one library of every weight type.

`build_together` compiles what a graph needs at once: its own library in the calling thread and
each missing kernel library in a thread of its own (the C compiler runs outside the GIL), so a
cold start waits for the longest compile rather than for their sum. One thread at a time builds
and loads a given kernel library; another that needs it meanwhile waits for it.

Imports ember.backends.binary_cache (the mark) and ember.errors.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

from ember.backends.binary_cache import carries_mark
from ember.errors import EmberError


class LibraryGone(EmberError):
    """The library file is not there (any more)."""


def check_library(path, source: str) -> None:
    """Refuse a shared library that was not built from source (it lacks source's mark)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LibraryGone(f"{path}: cannot read the library: it is gone") from None
    except OSError as e:
        raise EmberError(f"{path}: cannot read the library: {e.strerror}") from None
    if not carries_mark(data, source):
        raise EmberError(f"{path}: the library was not built from the program it is loaded for "
                         f"(its source mark differs): refusing to load it")


@dataclass(frozen=True)
class KernelLibrary:
    """A kernel library to link against: its symbol tag, its C source (tagged) and its
    optimisation tier (ember.backends.cpu.compiler.TIERS)."""
    tag: str
    source: str
    tier: str = "full"


# tag -> loaded kernel library; kept for the life of the process (graphs resolve into it)
LOADED: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()
_TAG_LOCKS: dict[str, threading.Lock] = {}


def is_loaded(tag: str) -> bool:
    return tag in LOADED


def loaded_path(tag: str) -> Path:
    return Path(LOADED[tag]._name)


def load_library(tag: str, path, source: str | None = None) -> None:
    """Load the kernel library at path under tag, unless one with that tag is loaded already;
    with source, first require that it was built from it (an artifact's copy)."""
    with _tag_lock(tag):
        if tag not in LOADED:
            if source is not None:
                check_library(path, source)
            LOADED[tag] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def is_ready(cache, library: KernelLibrary, flags) -> bool:
    """Whether library is loaded, or needs no compiling to be (the cache holds it)."""
    return is_loaded(library.tag) or cache.lookup(library.source, flags, library.tier) is not None


def ensure_loaded(cache, library: KernelLibrary, flags) -> None:
    """Build library (from cache when it holds it) and load it, unless it is loaded; an entry
    the dynamic loader refuses is built again (a damaged file whose checksum still holds)."""
    with _tag_lock(library.tag):
        if library.tag in LOADED:
            return
        path = cache.build(library.source, flags, name="kernels", tier=library.tier)
        try:
            LOADED[library.tag] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            path = cache.build(library.source, flags, name="kernels", fresh=True, tier=library.tier)
            LOADED[library.tag] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def build_together(cache, source: str, name: str, libraries, flags, tier: str = "full") -> Path:
    """The path of the graph library built from source at tier (cached), once the kernel
    libraries it links against are loaded; the missing ones are built while the graph's is."""
    errors: list[BaseException] = []

    def build(library: KernelLibrary) -> None:
        try:
            ensure_loaded(cache, library, flags)
        except BaseException as e:      # noqa: BLE001: raised again by the caller's thread
            errors.append(e)
    # daemon threads, not a pool: a pool's threads are joined when the process exits, which
    # would wait for a background build's compilers (compiler.run_compiler stops them instead)
    threads = [threading.Thread(target=build, args=(lib,), daemon=True)
               for lib in libraries if not is_loaded(lib.tag)]
    for thread in threads:
        thread.start()
    try:
        path = cache.build(source, flags, name=name, tier=tier)
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return path


def _tag_lock(tag: str) -> threading.Lock:
    with _LOCK:
        return _TAG_LOCKS.setdefault(tag, threading.Lock())
