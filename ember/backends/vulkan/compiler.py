"""GLSL -> SPIR-V through `glslc`, with an on-disk cache; `spirv-val` for tests; and the export
of a graph's SPIR-V blobs with its launch plan (what an artifact stores, so that a deployed
runtime needs no shader compiler).

The cache is ember.backends.binary_cache; the key's parts here are FORMAT_VERSION, glslc's
version and the options. An entry that does not match its checksum, or is not SPIR-V, is
rebuilt, never used. Missing shaders of a graph are compiled by one glslc call per core (process
start-up costs more than a small shader); when that fails, each is compiled alone so that the
error names the template, its parameters and glslc's message.

Imports no Vulkan library: this runs wherever glslc does.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ember.backends.binary_cache import BinaryCache
from ember.files import default_cache_dir
from ember.codegen.vulkan import render_graph
from ember.codegen.vulkan_plan import DeviceCaps, Shader, VulkanProgram
from ember.errors import BackendUnavailable, CompileError, EmberError
from ember.ir.graph import Graph

FORMAT_VERSION = 1
TARGET_ENV = "vulkan1.1"
GLSLC_OPTIONS = ("-fshader-stage=compute", f"--target-env={TARGET_ENV}", "-O")
SPIRV_MAGIC = b"\x03\x02\x23\x07"
GLSLC_HINT = "install it (Debian/Ubuntu: `apt-get install glslc`; or the Vulkan SDK)"


def find_glslc(preferred: str | None = None) -> str | None:
    return shutil.which(preferred or "glslc")


@functools.lru_cache(maxsize=None)
def glslc_version(glslc: str) -> str:
    try:
        out = subprocess.run([glslc, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise BackendUnavailable(f"vulkan backend: cannot run {glslc}: {e}") from e
    return out.stdout.strip()


class SpirvCache(BinaryCache):
    """SPIR-V of shaders, compiled by glslc on a miss (BinaryCache: `hits`, `builds`,
    `directory`); an entry must also start with SPIR-V's magic number."""

    suffix = ".spv"

    def __init__(self, directory: Path | str | None = None, glslc: str | None = None):
        super().__init__(directory or default_cache_dir() / "vulkan" / "spirv")
        self.glslc = find_glslc(glslc)

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION

    def identity(self) -> str:
        return glslc_version(self.require_glslc())

    def accepts(self, data: bytes) -> bool:
        return data.startswith(SPIRV_MAGIC)

    def require_glslc(self) -> str:
        if self.glslc is None:
            raise BackendUnavailable(f"vulkan backend: the shader compiler glslc was not found; {GLSLC_HINT}")
        return self.glslc

    def key(self, shader: Shader) -> str:
        return super().key(shader.source, " ".join(GLSLC_OPTIONS))

    def compile(self, shaders: list[Shader]) -> list[bytes]:
        """The SPIR-V of each shader, from the cache or built."""
        keys = [self.key(s) for s in shaders]
        blobs: list[bytes | None] = [self.get(k, s.source) for k, s in zip(keys, shaders)]
        self.hits += sum(b is not None for b in blobs)
        missing = {k: s for k, s, b in zip(keys, shaders, blobs) if b is None}
        if missing:
            built = self._build(missing)
            blobs = [b if b is not None else built[k] for k, b in zip(keys, blobs)]
        return blobs

    def _build(self, shaders: dict[str, Shader]) -> dict[str, bytes]:
        """Compile the missing shaders together (one glslc per core: process start-up costs
        more than a small shader) and store each."""
        glslc = self.require_glslc()
        with tempfile.TemporaryDirectory(prefix="ember-spirv-build-") as tmp:
            sources = {}
            for key, shader in shaders.items():
                src = Path(tmp) / f"{key}.comp"
                src.write_text(shader.source)
                sources[key] = src
            paths = [str(p) for p in sources.values()]
            jobs = max(1, min(os.cpu_count() or 1, len(paths)))
            procs = [subprocess.Popen([glslc, *GLSLC_OPTIONS, "-c", *paths[j::jobs]], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=tmp) for j in range(jobs)]
            results = [(p, *p.communicate()) for p in procs]
            failed = [err for p, _, err in results if p.returncode != 0]
            if failed:
                for key, shader in shaders.items():   # find the failing shader and report it
                    one = subprocess.run([glslc, *GLSLC_OPTIONS, "-c", str(sources[key])],
                                         capture_output=True, text=True, cwd=tmp)
                    if one.returncode != 0:
                        raise CompileError(f"vulkan backend: glslc failed to compile {shader.describe()}",
                                           _numbered_log(one.stderr, shader.source))
                raise CompileError("vulkan backend: glslc failed", "\n".join(failed))
            out = {key: Path(f"{src}.spv").read_bytes() for key, src in sources.items()}
        for key, blob in out.items():
            self.put(key, blob, shaders[key].source)
        self.builds += len(out)
        return out


def _numbered_log(stderr: str, source: str, limit: int = 40) -> str:
    """glslc's messages, each followed by the source line it names."""
    lines = source.splitlines()
    out = []
    for line in stderr.strip().splitlines()[:limit]:
        out.append(line)
        parts = line.split(":")
        if len(parts) > 2 and parts[1].strip().isdigit():
            number = int(parts[1])
            if 0 < number <= len(lines):
                out.append(f"    {number:4d} | {lines[number - 1]}")
    return "\n".join(out)


def validate_spirv(blob: bytes, spirv_val: str | None = None) -> tuple[bool, str]:
    """(True, "") when spirv-val accepts the module for the target environment."""
    tool = shutil.which(spirv_val or "spirv-val")
    if tool is None:
        raise BackendUnavailable("spirv-val not found (Debian/Ubuntu: `apt-get install spirv-tools`)")
    with tempfile.NamedTemporaryFile(suffix=".spv") as f:
        f.write(blob)
        f.flush()
        proc = subprocess.run([tool, "--target-env", TARGET_ENV, f.name], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def program_spirv(program: VulkanProgram, cache: SpirvCache) -> dict[str, bytes]:
    """The SPIR-V of every shader of a program, by the shader's sha256."""
    blobs = cache.compile(list(program.shaders))
    return {s.sha256: b for s, b in zip(program.shaders, blobs)}


def export_graph(graph: Graph, caps: DeviceCaps, cache: SpirvCache | None = None) -> tuple[dict[str, bytes], dict]:
    """(blobs, plan) for graph on a device with caps: blobs maps file names to bytes
    ("spirv/<sha256>.spv" for each shader, "aux/<j>.bin" for each table the renderer made);
    plan is the JSON-able launch plan naming them (each shader's entry gains "file" and
    "spirv_sha256"). An artifact writer stores both; the Vulkan backend's `load_executable`
    runs them without glslc."""
    program = render_graph(graph, caps)
    spirv = program_spirv(program, cache or SpirvCache())
    blobs = {f"spirv/{sha}.spv": blob for sha, blob in spirv.items()}
    blobs.update({f"aux/{j}.bin": a.tobytes() for j, a in enumerate(program.aux)})
    plan = program.launch_plan()
    for entry in plan["shaders"]:
        entry["file"] = f"spirv/{entry['sha256']}.spv"
        entry["spirv_sha256"] = hashlib.sha256(spirv[entry["sha256"]]).hexdigest()
    for j, entry in enumerate(plan["regions"]["aux"]):
        entry["file"] = f"aux/{j}.bin"
    if not all(f"spirv/{s.sha256}.spv" in blobs for s in program.shaders):
        raise EmberError("vulkan: export lost a shader")
    return blobs, plan
