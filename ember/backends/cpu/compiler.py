"""C source -> shared library, through the system C compiler, cached on disk.

The cache (keys, checksums, atomic writes, a damaged entry rebuilt rather than loaded) is
ember.backends.binary_cache; the key's parts here are the flags and the compiler's identity and
version, and FORMAT_VERSION.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ember.backends.binary_cache import BinaryCache, source_mark
from ember.errors import BackendUnavailable, CompileError
from ember.files import default_cache_dir

FORMAT_VERSION = 1
# -ffp-contract=off: a multiply-add is fused only where the code says so (fmaf, _mm256_fmadd_ps),
# so a kernel's scalar and vector forms of one formula round alike (batch invariance).
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
# The ISA levels the CPU backend builds for. "scalar" is the portable path: plain x86-64 (or the
# host's default elsewhere), so the kernels' non-SIMD branches are compiled and tested.
ISA_FLAGS = {
    "native": ("-march=native",),
    "scalar": ("-march=x86-64", "-mno-sse3", "-Wno-psabi") if os.uname().machine == "x86_64" else (),
}


@functools.lru_cache(maxsize=None)
def find_compiler(preferred: str | None = None) -> str:
    for name in ([preferred] if preferred else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    raise BackendUnavailable(
        "cpu backend: no C compiler found (looked for cc, gcc, clang); "
        "install one, e.g. `apt-get install gcc`")


@functools.lru_cache(maxsize=None)
def compiler_identity(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise BackendUnavailable(f"cpu backend: cannot run C compiler {cc}: {e}") from e
    return f"{cc}\n{out.stdout.splitlines()[0] if out.stdout else ''}"


class CompileCache(BinaryCache):
    """Shared libraries built from C source (BinaryCache: `hits`, `builds`, `directory`)."""

    suffix = ".so"
    embeds_mark = True

    def __init__(self, directory: Path | str | None = None, cc: str | None = None):
        super().__init__(directory or default_cache_dir() / "cpu")
        self.cc = find_compiler(cc)

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    def identity(self) -> str:
        return compiler_identity(self.cc)

    def key(self, source: str, flags=()) -> str:
        return super().key(source, " ".join(flags))

    def build(self, source: str, flags=(), name: str = "kernel", fresh: bool = False) -> Path:
        """The path of a shared library built from source (from the cache when valid; fresh:
        built again whatever the cache holds, for an entry the dynamic loader refused)."""
        flags = tuple(BASE_FLAGS) + tuple(flags)
        if fresh:
            self.discard(self.key(source, flags))
        return self.cached(self.key(source, flags), source, lambda: self._compile(source, flags, name))

    def _compile(self, source: str, flags: tuple, name: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="ember-cpu-build-") as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source + marked_source_tail(source))
            out = Path(tmp) / "out.so"
            proc = subprocess.run([self.cc, *flags, str(src), "-o", str(out), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"cpu backend: {self.cc} failed to build {name} "
                                   f"(flags: {' '.join(flags)})", _numbered_log(proc.stderr, source))
            return out.read_bytes()


def marked_source_tail(source: str) -> str:
    """C that puts source's mark (ember.backends.binary_cache.source_mark) into the library as a
    string constant: a loader finds it in the file's bytes before loading it."""
    mark = source_mark(source).decode()
    return (f'\n__attribute__((used, visibility("default"))) '
            f'const char ember_source_mark[] = "{mark}";\n')


def _numbered_log(stderr: str, source: str, limit: int = 60) -> str:
    lines = stderr.strip().splitlines()
    return "\n".join(lines[:limit] + ([f"... ({len(lines) - limit} more lines)"] if len(lines) > limit else []))
