"""C source -> shared library, through the system C compiler, cached on disk.

The cache (keys, checksums, atomic writes, a damaged entry rebuilt rather than loaded) is
ember.backends.binary_cache; the key's parts here are the flags and the compiler's identity and
version, and FORMAT_VERSION.
"""
from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import subprocess
import threading
from pathlib import Path

from ember.backends.binary_cache import BinaryCache, source_mark
from ember.errors import BackendUnavailable, CompileError
from ember.files import default_cache_dir

FORMAT_VERSION = 1
# -ffp-contract=off: a multiply-add is fused only where the code says so (fmaf, _mm256_fmadd_ps),
# so a kernel's scalar and vector forms of one formula round alike (batch invariance).
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")
# Optimisation tiers. "full" (BASE_FLAGS) is what graphs are meant to run with; "quick" builds a
# first version of a graph and of the kernel libraries it needs in a fraction of the time, run
# while the full one is built in the background (CpuBackend(tiered=True)). The tiers compute the
# same bits: with -ffp-contract=off and no fast-math flags, gcc and clang keep every IEEE
# operation and its order at any level (tested on whole models: ember logits, np.array_equal).
QUICK_OPT = "-O1"
BACKGROUND_NICE = 19
TIERS = ("full", "quick")
# A program rather than a library (a test harness that loads graph libraries).
PROGRAM_FLAGS = ("-O2", "-std=gnu11", "-fopenmp")
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
    nice = 0        # added to the compiler's niceness (background(): builds that must not slow a run)

    def __init__(self, directory: Path | str | None = None, cc: str | None = None):
        super().__init__(directory or default_cache_dir() / "cpu")
        self.cc = find_compiler(cc)

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    def background(self) -> "CompileCache":
        """This cache (same folder and entries) with its compilers at the lowest priority: a
        build nobody waits for takes only what the running kernels leave of the CPU."""
        other = copy.copy(self)
        other.nice = BACKGROUND_NICE
        return other

    def identity(self) -> str:
        return compiler_identity(self.cc)

    def key(self, source: str, flags=()) -> str:
        return super().key(source, " ".join(flags))

    def build(self, source: str, flags=(), name: str = "kernel", fresh: bool = False,
              program: bool = False, tier: str = "full") -> Path:
        """The path of a shared library built from source (from the cache when valid; fresh:
        built again whatever the cache holds, for an entry the dynamic loader refused); program:
        an executable program instead (its cache entry keeps the .so suffix); tier: "full" or
        "quick" (TIERS: the optimisation level)."""
        flags = self.all_flags(flags, program, tier)
        if fresh:
            self.discard(self.key(source, flags))
        return self.cached(self.key(source, flags), source, lambda: self._compile(source, flags, name))

    def lookup(self, source: str, flags=(), tier: str = "full") -> Path | None:
        """The path of the library build would give, when the cache holds it already (else
        None: nothing is compiled)."""
        return self.valid_path(self.key(source, self.all_flags(flags, False, tier)), source)

    @staticmethod
    def all_flags(flags, program: bool = False, tier: str = "full") -> tuple[str, ...]:
        """The compiler's flags for a build: the base flags of a library (or program) at the
        tier's optimisation level, then flags."""
        if tier not in TIERS:
            raise ValueError(f"cpu backend: unknown tier {tier!r}; known: {', '.join(TIERS)}")
        base = PROGRAM_FLAGS if program else BASE_FLAGS
        if tier == "quick":
            base = (QUICK_OPT,) + tuple(f for f in base if not f.startswith("-O"))
        return tuple(base) + tuple(flags)

    def _compile(self, source: str, flags: tuple, name: str) -> bytes:
        with self.build_folder() as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source + marked_source_tail(source))
            out = Path(tmp) / "out.so"
            returncode, stderr = run_compiler([self.cc, *flags, str(src), "-o", str(out), "-lm"], self.nice)
            if returncode != 0:
                raise CompileError(f"cpu backend: {self.cc} failed to build {name} "
                                   f"(flags: {' '.join(flags)})", _numbered_log(stderr, source))
            return out.read_bytes()


# The compiler processes running now: none outlives the process that wanted it (a process
# waits for its background builds at exit, ember.backends.cpu.backend; one interrupted there
# stops them).
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def run_compiler(command: list[str], nice: int = 0) -> tuple[int, str]:
    """(exit status, stderr) of a compiler run at niceness +nice; stopped if this process exits
    first."""
    if nice and shutil.which("nice"):
        # the nice program rather than preexec_fn, which may deadlock a process with threads
        command = ["nice", "-n", str(nice), *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        _, stderr = proc.communicate()
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    return proc.returncode, stderr


@atexit.register
def _stop_compilers() -> None:
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        proc.kill()


def marked_source_tail(source: str) -> str:
    """C that puts source's mark (ember.backends.binary_cache.source_mark) into the library as a
    string constant: a loader finds it in the file's bytes before loading it."""
    mark = source_mark(source).decode()
    return (f'\n__attribute__((used, visibility("default"))) '
            f'const char ember_source_mark[] = "{mark}";\n')


def _numbered_log(stderr: str, source: str, limit: int = 60) -> str:
    lines = stderr.strip().splitlines()
    return "\n".join(lines[:limit] + ([f"... ({len(lines) - limit} more lines)"] if len(lines) > limit else []))
