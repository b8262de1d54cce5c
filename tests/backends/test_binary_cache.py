"""The compiled-binary cache (ember.backends.binary_cache), once for every compiler that uses it:
the CPU's shared libraries, OpenCL program binaries and Vulkan SPIR-V, each skipped with its
reason where its compiler or device is missing; then the key's parts on a toy compiler; the
bound (least recently used evicted) and the clean-up of a killed compile's folder."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices import make_backend
from ember.backends import binary_cache
from ember.backends.binary_cache import BinaryCache
from ember.errors import CompileError
from ember.files import STALE_AFTER_S
from ember.ir import GraphBuilder

C_SOURCE = "int ember_cache_test(void) { return 42; }\n"


def tiny_graph():
    b = GraphBuilder("cached")
    return b.build(b.neg(b.exp(b.input("x", "f32", (3, 5)))))


class CpuDriver:
    def __init__(self, tmp_path):
        from ember.backends.cpu.compiler import BASE_FLAGS
        self.cache = make_backend("cpu", tmp_path).cache
        self.key = self.cache.key(C_SOURCE, BASE_FLAGS)
        self.source = C_SOURCE

    def compile(self, broken=False):
        self.cache.build(C_SOURCE + ("int broken( {\n" if broken else ""))


class OpenCLDriver:
    def __init__(self, tmp_path):
        backend = make_backend("opencl", tmp_path)
        self.cache = backend.cache
        self.program = backend.render(tiny_graph())
        self.key = self.cache.key(self.program.source, self.program.build_options)
        self.source = self.program.source

    def compile(self, broken=False):
        program = self.program
        if broken:
            program = dataclasses.replace(program, source=program.source + "\nbroken(;\n")
        self.cache.build(program)


class VulkanDriver:
    def __init__(self, tmp_path):
        from ember.codegen.vulkan import render_graph
        backend = make_backend("vulkan", tmp_path)
        self.cache = type(backend.spirv_cache)(tmp_path / "spirv")
        self.shader = render_graph(tiny_graph(), backend.caps).shaders[0]
        self.key = self.cache.key(self.shader)
        self.source = self.shader.source

    def compile(self, broken=False):
        shader = self.shader
        if broken:
            shader = dataclasses.replace(shader, source=shader.source.replace(
                "void main()", "void main() { oops; }\nvoid unused()"))
        self.cache.compile([shader])


DRIVERS = {"cpu": CpuDriver, "opencl": OpenCLDriver, "vulkan": VulkanDriver}


@pytest.fixture(params=list(DRIVERS))
def driver(request, tmp_path):
    return DRIVERS[request.param](tmp_path)


def counts(cache: BinaryCache) -> tuple[int, int]:
    return cache.builds, cache.hits


def test_second_compile_is_a_hit(driver):
    driver.compile()
    assert counts(driver.cache) == (1, 0)
    driver.compile()
    assert counts(driver.cache) == (1, 1)
    assert driver.cache.get(driver.key, driver.source) is not None


DAMAGE = {
    "garbage": lambda path: path.write_bytes(b"\x03\x02\x23\x07 not a binary" + bytes(64)),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
    "checksum-missing": lambda path: path.with_suffix(".sha256").unlink(),
    "checksum-wrong": lambda path: path.with_suffix(".sha256").write_text("0" * 64),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_rebuilt_not_trusted(driver, damage):
    driver.compile()
    path = driver.cache.path(driver.key)
    good = path.read_bytes()
    DAMAGE[damage](path)
    assert driver.cache.get(driver.key, driver.source) is None
    driver.compile()
    assert counts(driver.cache) == (2, 0)
    assert driver.cache.get(driver.key, driver.source) is not None and len(path.read_bytes()) == len(good)


def test_a_failing_compile_leaves_no_file(driver):
    with pytest.raises(CompileError):
        driver.compile(broken=True)
    assert counts(driver.cache) == (0, 0)
    assert not driver.cache.directory.exists() or list(driver.cache.directory.rglob("*")) == []


# ---- the key, on a toy compiler -------------------------------------------------------------
class ToyCache(BinaryCache):
    """Compiles by reversing the source; its identity and format version are plain fields."""

    def __init__(self, directory, ident="toy 1.0", version=1):
        super().__init__(directory)
        self.ident, self.version = ident, version

    @property
    def format_version(self) -> int:
        return self.version

    def identity(self) -> str:
        return self.ident

    def accepts(self, data: bytes) -> bool:
        return not data.startswith(b"REFUSED")

    def build(self, source: str, options: str = "", fail: bool = False):
        def compile_it():
            if fail:
                raise CompileError("toy compiler failed", "log")
            return source[::-1].encode()
        return self.cached(self.key(source, options), source, compile_it)


@pytest.mark.parametrize("part", ["source", "options", "identity", "format-version", "layout-version"])
def test_the_key_changes_with_each_part(tmp_path, monkeypatch, part):
    cache = ToyCache(tmp_path)
    key = cache.key("src", "-O2")
    if part == "source":
        other = cache.key("src2", "-O2")
    elif part == "options":
        other = cache.key("src", "-O3")
    elif part == "identity":
        other = ToyCache(tmp_path, ident="toy 1.1").key("src", "-O2")
    elif part == "format-version":
        other = ToyCache(tmp_path, version=2).key("src", "-O2")
    else:
        monkeypatch.setattr(binary_cache, "LAYOUT_VERSION", binary_cache.LAYOUT_VERSION + 1)
        other = cache.key("src", "-O2")
    assert other != key
    assert cache.key("src", "-O2") == key or part == "layout-version"


def test_key_parts_do_not_run_together(tmp_path):
    cache = ToyCache(tmp_path)
    assert cache.key("ab", "c") != cache.key("b", "ca")


def test_entry_and_checksum_on_disk(tmp_path):
    cache = ToyCache(tmp_path)
    path = cache.build("abc")
    assert path == tmp_path / cache.key("abc")[:2] / f"{cache.key('abc')}.bin"
    stored = binary_cache.source_mark("abc") + b"\ncba"   # the source's mark, then the binary
    assert path.read_bytes() == stored and cache.get(cache.key("abc"), "abc") == b"cba"
    assert path.with_suffix(".sha256").read_text() == hashlib.sha256(stored).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.stem + ".sha256"])


def test_bytes_the_compiler_does_not_accept_are_rebuilt(tmp_path):
    cache = ToyCache(tmp_path)
    path = cache.build("abc")
    cache.put(cache.key("abc"), b"REFUSED", "abc")  # a valid checksum of bytes that are not a binary
    assert cache.get(cache.key("abc"), "abc") is None
    assert cache.build("abc") == path and cache.get(cache.key("abc"), "abc") == b"cba"
    assert counts(cache) == (2, 0)


def test_a_failing_toy_compile_writes_nothing(tmp_path):
    cache = ToyCache(tmp_path / "cache")
    with pytest.raises(CompileError):
        cache.build("abc", fail=True)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").rglob("*")) == []
    assert counts(cache) == (0, 0)


# ---- entries whose bytes and checksum agree but are wrong (issue 16) -------------------------
def test_an_entry_of_another_source_is_rebuilt_not_loaded(driver, tmp_path):
    """Another program's entry copied, checksum and all, over this one's: before, the CPU and
    Vulkan loaders crashed in the driver (SIGSEGV) and OpenCL aborted in PoCL; the source mark
    refuses it, and the compile builds from source."""
    driver.compile()
    path = driver.cache.path(driver.key)
    good = path.read_bytes()
    other = type(driver)(tmp_path / "other")
    other.source += "\n"          # another program: another mark (the key differs too)
    if isinstance(driver, CpuDriver):
        other_path = other.cache.build(other.source)
    else:
        other_path = other.cache.put(driver.key, driver.cache.get(driver.key, driver.source), other.source)
    path.write_bytes(other_path.read_bytes())
    path.with_suffix(".sha256").write_text(hashlib.sha256(other_path.read_bytes()).hexdigest())
    assert driver.cache.get(driver.key, driver.source) is None
    driver.compile()
    assert counts(driver.cache) == (2, 0)
    assert path.read_bytes() == good or driver.cache.get(driver.key, driver.source) is not None


def test_a_toy_entry_copied_under_another_key_is_refused(tmp_path):
    cache = ToyCache(tmp_path)
    a, b = cache.build("aaa"), cache.path(cache.key("bbb"))
    b.parent.mkdir(parents=True, exist_ok=True)
    b.write_bytes(a.read_bytes())
    b.with_suffix(".sha256").write_text(a.with_suffix(".sha256").read_text())
    assert cache.get(cache.key("bbb"), "bbb") is None
    cache.build("bbb")
    assert cache.get(cache.key("bbb"), "bbb") == b"bbb"


# ---- the bound: least recently used entries evicted (issue 16) -------------------------------
def entry_size(cache: ToyCache, source: str) -> int:
    path = cache.path(cache.key(source))
    return path.stat().st_size + path.with_suffix(".sha256").stat().st_size


def last_used(cache: ToyCache, ages: dict[str, float]) -> None:
    """Set each source's entry's last use to that many seconds ago."""
    now = time.time()
    for source, age in ages.items():
        os.utime(cache.path(cache.key(source)), (now - age, now - age))


def present(cache: ToyCache, *sources: str) -> list[str]:
    return [s for s in sources if cache.path(cache.key(s)).exists()]


def bounded_toy_cache(tmp_path, entries: float) -> ToyCache:
    """A toy cache holding a, b and c (a used longest ago), bounded to `entries` of their size."""
    cache = ToyCache(tmp_path)
    cache.limit = None
    for source in "abc":
        cache.build(source * 100)
    cache.limit = int(entries * entry_size(cache, "a" * 100))
    last_used(cache, {"a" * 100: 300, "b" * 100: 200, "c" * 100: 100})
    return cache


def test_eviction_removes_the_least_recently_used_first(tmp_path):
    cache = bounded_toy_cache(tmp_path, 3.5)
    cache.build("d" * 100)              # four entries: over the bound; a goes, to 3 <= 0.9 * 3.5
    assert present(cache, *(s * 100 for s in "abcd")) == [s * 100 for s in "bcd"]
    assert len(binary_cache.entries(tmp_path)) == 3


def test_a_hit_makes_an_entry_the_most_recently_used(tmp_path):
    cache = bounded_toy_cache(tmp_path, 3.5)
    before = cache.path(cache.key("a" * 100)).stat().st_mtime
    cache.build("a" * 100)              # a hit: a is now the newest
    assert counts(cache) == (3, 1) and cache.path(cache.key("a" * 100)).stat().st_mtime > before
    cache.build("d" * 100)
    assert present(cache, *(s * 100 for s in "abcd")) == [s * 100 for s in "acd"]


def test_the_limit_is_respected_while_the_cache_fills(tmp_path):
    cache = ToyCache(tmp_path)
    cache.limit = 5 * 300               # about five entries of ~250 bytes
    for i in range(40):
        cache.build(f"{i:03d}" * 50)
        assert sum(e.size for e in binary_cache.entries(tmp_path)) <= cache.limit
    assert present(cache, "039" * 50) and not present(cache, "000" * 50)
    assert 4 <= len(binary_cache.entries(tmp_path)) <= 5


def test_a_cache_over_its_bound_is_evicted_on_first_use(tmp_path):
    filler = ToyCache(tmp_path)
    filler.limit = None
    for source in "abcdef":
        filler.build(source * 100)
    last_used(filler, {s * 100: 600 - 100 * i for i, s in enumerate("abcdef")})
    size = entry_size(filler, "a" * 100)
    # another process's first use of the folder (this process counted it already)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import test_binary_cache as t; "
            f"c = t.ToyCache(sys.argv[1]); c.limit = {int(3.5 * size)}; c.get(c.key('x'), 'x')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent)], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert present(filler, *(s * 100 for s in "abcdef")) == [s * 100 for s in "def"]


def test_the_compilers_share_the_bound_of_embers_cache_folder(tmp_path, monkeypatch):
    from ember.backends.cpu.compiler import CompileCache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert CompileCache().root == tmp_path / "ember"
    assert CompileCache(tmp_path / "elsewhere").root == tmp_path / "elsewhere"


def test_clear_removes_every_entry_and_nothing_else(tmp_path):
    cache = ToyCache(tmp_path / "toy")
    for source in "abc":
        cache.build(source)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.gguf").write_bytes(b"GGUF")
    assert binary_cache.clear(tmp_path)[0] == 3
    assert binary_cache.entries(tmp_path) == [] and (tmp_path / "models" / "model.gguf").exists()
    assert cache.get(cache.key("a"), "a") is None and cache.build("a") and counts(cache) == (4, 0)


# ---- a compile killed midway leaves nothing behind (issue 16) --------------------------------
SLOW_CC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "slow-cc 1.0"; exit 0; fi
exec sleep 120
"""
OPEN_A_CACHE = ("import sys; from ember.backends.cpu.compiler import CompileCache; "
                "c = CompileCache(sys.argv[1], cc=sys.argv[2]); ")
START = OPEN_A_CACHE + "c.get(c.key('int x;'), 'int x;')"     # a process's first use: the clean-up
COMPILE = OPEN_A_CACHE + "c.build('int x;')"


def test_a_killed_compiles_folder_is_removed_once_stale_never_while_its_owner_lives(tmp_path):
    cc = tmp_path / "slow-cc"
    cc.write_text(SLOW_CC)
    cc.chmod(0o755)
    folder = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    compile_ = subprocess.Popen([sys.executable, "-c", COMPILE, str(folder), str(cc)], env=env,
                                start_new_session=True)

    def start():          # another process starts on the folder
        subprocess.run([sys.executable, "-c", START, str(folder), str(cc)], env=env, check=True)

    try:
        deadline = time.time() + 60
        while not (builds := list(folder.glob(".build.pid*"))) and time.time() < deadline:
            time.sleep(0.1)
        assert len(builds) == 1 and f".pid{compile_.pid}." in builds[0].name
        old = time.time() - STALE_AFTER_S - 60
        os.utime(builds[0], (old, old))
        start()
        assert builds[0].exists()                 # its owner compiles still, however long
    finally:
        os.killpg(compile_.pid, signal.SIGKILL)   # the compile (and its compiler) killed midway
        compile_.wait()
    assert builds[0].exists() and compile_.returncode == -signal.SIGKILL
    start()
    assert not builds[0].exists() and list(folder.iterdir()) == []


def test_a_compile_builds_inside_the_cache_and_cleans_up(tmp_path):
    driver = CpuDriver(tmp_path)
    driver.compile()
    assert driver.cache.path(driver.key).exists()
    assert [p for p in driver.cache.directory.rglob("*") if p.name.startswith(".")] == []
