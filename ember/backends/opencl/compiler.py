"""OpenCL C source -> program, with an on-disk cache of program binaries.

The cache key is the sha256 of FORMAT_VERSION, the device's identity (platform, device, driver,
OpenCL C version), the build options and the source. A binary is written to a temporary file and
renamed into place, with a sidecar holding the sha256 of its bytes; an entry whose bytes do not
match, or that the driver refuses to load, is rebuilt from source, never trusted.

A build failure raises CompileError naming the kernel(s) the compiler complains about, with the
template and parameters each was rendered from, and the compiler's log.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path

from ember.files import default_cache_dir
from ember.codegen.opencl_plan import OpenCLProgram
from ember.errors import CompileError

FORMAT_VERSION = 1
LOG_LINE = re.compile(r"\.cl:(\d+):(\d+)\b|<source>:(\d+):(\d+)\b")
LOG_LIMIT = 60


class ProgramCache:
    def __init__(self, context, device, info, directory: Path | str | None = None):
        self.context = context
        self.device = device
        self.info = info
        self.directory = Path(directory) if directory else default_cache_dir() / "opencl"
        self.hits = 0
        self.builds = 0

    def key(self, source: str, options: str) -> str:
        h = hashlib.sha256()
        for part in (str(FORMAT_VERSION), self.info.identity, options, source):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def path(self, source: str, options: str) -> Path:
        key = self.key(source, options)
        return self.directory / key[:2] / f"{key}.bin"

    def build(self, program: OpenCLProgram, name: str = "graph"):
        """The built cl.Program of a rendered program (from a cached binary when valid)."""
        import pyopencl as cl
        source, options = program.source, program.build_options
        binary_path = self.path(source, options)
        binary = _valid_bytes(binary_path)
        if binary is not None:
            try:
                raw = cl._cl._Program(self.context, [self.device], [binary])
                _quiet_build(raw, options, self.device)
                self.hits += 1
                return cl.Program(raw)
            except cl.Error:
                pass        # refused by the driver: rebuilt from source below
        raw = cl._cl._Program(self.context, source)   # the source build, without pyopencl's own cache
        try:
            _quiet_build(raw, options, self.device)
        except cl.Error as e:
            try:
                log = raw.get_build_info(self.device, cl.program_build_info.LOG)
            except cl.Error:
                log = str(e)
            raise build_error(program, name, log or str(e)) from None
        built = cl.Program(raw)
        self.builds += 1
        _write_atomically(binary_path, built.get_info(cl.program_info.BINARIES)[0])
        return built


def _quiet_build(raw, options: str, device) -> None:
    """Build without pyopencl's warning about a non-empty log: drivers log notes on success
    (PoCL: vector ABI notes); a failure's log is reported by build_error."""
    import pyopencl as cl
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cl.CompilerWarning)
        raw.build(options.encode(), [device])


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


def _valid_bytes(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        expected = path.with_suffix(".sha256").read_text().strip()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == expected else None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        sidecar = tmp + ".sha256"
        Path(sidecar).write_text(hashlib.sha256(data).hexdigest())
        # The binary first, then its checksum: a binary without a matching sidecar is never
        # trusted, so a crash between the two renames only costs a rebuild.
        os.replace(tmp, path)
        os.replace(sidecar, path.with_suffix(".sha256"))
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)
