"""OpenCL C source -> program, with an on-disk cache of program binaries.

The cache is ember.backends.binary_cache; the key's parts here are FORMAT_VERSION, the
device's identity (platform, device, driver, OpenCL C version) and the build options. An entry
whose bytes do not match its checksum, or that the driver refuses to load, is rebuilt from
source, never trusted.

A build failure raises CompileError naming the kernel(s) the compiler complains about, with the
template and parameters each was rendered from, and the compiler's log. A successful build's
log never reaches the terminal (PoCL's clang prints "N warnings generated." on the process's
stderr, below Python): it is captured and kept in `ProgramCache.logs`, and printed only when
the backend is verbose.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

from ember.backends.binary_cache import BinaryCache
from ember.files import default_cache_dir
from ember.codegen.opencl_plan import OpenCLProgram
from ember.errors import CompileError

FORMAT_VERSION = 1
LOG_LINE = re.compile(r"\.cl:(\d+):(\d+)\b|<source>:(\d+):(\d+)\b")
LOG_LIMIT = 60


class ProgramCache(BinaryCache):
    """Program binaries for one device (BinaryCache: `hits`, `builds`, `directory`). A binary
    the driver refuses to load is rebuilt from source like a damaged one."""

    def __init__(self, context, device, info, directory: Path | str | None = None, verbose: bool = False):
        super().__init__(directory or default_cache_dir() / "opencl")
        self.context = context
        self.device = device
        self.info = info
        self.verbose = verbose
        self.logs: list[tuple[str, str]] = []     # (program name, log) of builds that logged

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    def identity(self) -> str:
        return self.info.identity

    def build(self, program: OpenCLProgram, name: str = "graph"):
        """The built cl.Program of a rendered program (from a cached binary when valid)."""
        import pyopencl as cl
        source, options = program.source, program.build_options
        key = self.key(source, options)
        binary = self.get(key, source)
        if binary is not None:
            try:
                raw = cl._cl._Program(self.context, [self.device], [binary])
                _quiet_build(raw, options, self.device)
                self.hits += 1
                return cl.Program(raw)
            except (cl.Error, RuntimeError, ValueError):
                pass        # refused by the driver: rebuilt from source below
        raw = cl._cl._Program(self.context, source)   # the source build, without pyopencl's own cache
        try:
            printed = _quiet_build(raw, options, self.device)
        except cl.Error as e:
            try:
                log = raw.get_build_info(self.device, cl.program_build_info.LOG)
            except cl.Error:
                log = str(e)
            log = "\n".join(part for part in (log, getattr(e, "printed", "")) if part and part.strip())
            raise build_error(program, name, log or str(e)) from None
        self._keep_log(name, raw.get_build_info(self.device, cl.program_build_info.LOG) + printed)
        built = cl.Program(raw)
        self.builds += 1
        self.put(key, built.get_info(cl.program_info.BINARIES)[0], source)
        return built


    def _keep_log(self, name: str, log: str) -> None:
        if not log.strip():
            return
        self.logs.append((name, log))
        if self.verbose:
            print(f"opencl: build log of {name}:\n{log.rstrip()}", file=sys.stderr, flush=True)


def _quiet_build(raw, options: str, device) -> str:
    """Build without pyopencl's warning about a non-empty log (drivers log notes on success;
    PoCL: vector ABI notes) and with the process's stderr (file descriptor 2, where PoCL's
    clang prints "N warnings generated.") captured. Returns what was printed there; a failure's
    cl.Error carries it as `printed` (build_error reports the log)."""
    import pyopencl as cl
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as grab:
        os.dup2(grab.fileno(), 2)
        error = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", cl.CompilerWarning)
                raw.build(options.encode(), [device])
        except cl.Error as e:
            error = e
        finally:
            printed = _restore(saved, grab)
    if error is not None:
        error.printed = printed
        raise error
    return printed


def _restore(saved: int, grab) -> str:
    """Put the process's stderr back and return what was written to grab meanwhile."""
    os.dup2(saved, 2)
    os.close(saved)
    grab.seek(0)
    return grab.read().decode("utf-8", errors="replace")


def build_error(program: OpenCLProgram, name: str, log: str) -> CompileError:
    """A CompileError naming the kernels the log's errors point at (by source line), with their
    template, parameters and node; the log keeps its errors (warnings are counted, not shown:
    PoCL warns about vector ABIs in every program)."""
    lines = log.splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    culprits = []
    for line in errors or lines:
        for match in LOG_LINE.finditer(line):
            kernel = program.kernel_at_line(int(match.group(1) or match.group(3)))
            if kernel is not None and kernel not in culprits:
                culprits.append(kernel)
    described = []
    for k in culprits:
        first_use = next((launch.node for launch in program.launches if launch.kernel == k.name), "?")
        params = ", ".join(f"{p}={v}" for p, v in k.params.items())
        described.append(f"  kernel {k.name} (source lines {k.first_line}-{k.last_line}), template {k.template}, "
                         f"parameters: {params}; first used by {first_use}")
    where = "\n".join(described) if described else "  (the log names no line of a kernel: the prelude?)"
    shown = [line for line in lines if "warning" not in line.lower()]
    omitted = len(lines) - len(shown)
    if len(shown) > LOG_LIMIT:
        omitted += len(shown) - LOG_LIMIT
        shown = shown[:LOG_LIMIT]
    text = "\n".join(shown) + (f"\n({omitted} more lines, warnings, not shown)" if omitted else "")
    return CompileError(f"opencl backend: building {name} failed (profile {program.profile.name}, "
                        f"options {program.build_options!r}):\n{where}\ncompiler log:", text)
