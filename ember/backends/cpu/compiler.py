"""C source -> shared library, through the system C compiler, with an on-disk cache.

The cache key is the sha256 of the source, the flags, the compiler's identity and version, and
FORMAT_VERSION. Entries are written to a temporary file and renamed into place, and each library
has a sidecar holding the sha256 of its bytes: an entry whose bytes do not match (a crash
mid-write, disk corruption) is rebuilt, never loaded.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

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


class CompileCache:
    def __init__(self, directory: Path | str | None = None, cc: str | None = None):
        self.directory = Path(directory) if directory else default_cache_dir() / "cpu"
        self.cc = find_compiler(cc)
        self.hits = 0
        self.builds = 0

    def key(self, source: str, flags) -> str:
        h = hashlib.sha256()
        for part in (str(FORMAT_VERSION), compiler_identity(self.cc), " ".join(flags), source):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def build(self, source: str, flags=(), name: str = "kernel") -> Path:
        """The path of a shared library built from source (from the cache when valid)."""
        flags = tuple(BASE_FLAGS) + tuple(flags)
        key = self.key(source, flags)
        folder = self.directory / key[:2]
        lib = folder / f"{key}.so"
        if self._valid(lib):
            self.hits += 1
            return lib
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            out = Path(tmp) / "out.so"
            proc = subprocess.run([self.cc, *flags, str(src), "-o", str(out), "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"cpu backend: {self.cc} failed to build {name} "
                                   f"(flags: {' '.join(flags)})", _numbered_log(proc.stderr, source))
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            sidecar = Path(tmp) / "out.sha256"
            sidecar.write_text(digest)
            # The library first, then its checksum: a library without a matching sidecar is
            # never trusted, so a crash between the two renames only costs a rebuild.
            os.replace(out, lib)
            os.replace(sidecar, lib.with_suffix(".sha256"))
        self.builds += 1
        return lib

    @staticmethod
    def _valid(lib: Path) -> bool:
        sidecar = lib.with_suffix(".sha256")
        try:
            expected = sidecar.read_text().strip()
            return hashlib.sha256(lib.read_bytes()).hexdigest() == expected
        except OSError:
            return False


def _numbered_log(stderr: str, source: str, limit: int = 60) -> str:
    lines = stderr.strip().splitlines()
    return "\n".join(lines[:limit] + ([f"... ({len(lines) - limit} more lines)"] if len(lines) > limit else []))
