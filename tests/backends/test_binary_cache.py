"""The compiled-binary cache (ember.backends.binary_cache), once for every compiler that uses it:
the CPU's shared libraries, OpenCL program binaries and Vulkan SPIR-V, each skipped with its
reason where its compiler or device is missing; then the key's parts on a toy compiler."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest

from devices import make_backend
from ember.backends import binary_cache
from ember.backends.binary_cache import BinaryCache
from ember.errors import CompileError
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
