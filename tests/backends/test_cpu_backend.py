"""The CPU backend itself: compile cache, constants, threads, batch invariance, errors, registry.
What every executable does (input and output checks, status errors, bound runs, the memory
plan) is tested over every backend in test_executable.py."""
from __future__ import annotations

import re

import numpy as np
import pytest

from ember.backends import BACKEND_NAMES, available_backends, get_backend
from ember.backends.cpu.backend import CpuBackend
from ember.backends.cpu.libraries import is_loaded
from ember.backends.cpu.compiler import ISA_FLAGS
from ember.codegen.cpu import render_graph, tag_kernel_symbols
from ember.errors import BackendUnavailable, EmberError
from ember.ir import GraphBuilder, run_reference
from ember.ir.interpreter import random_inputs
from ember.testing import nmse


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    """A backend whose cache the tests of this module share."""
    return CpuBackend(threads=2, cache_dir=tmp_path_factory.mktemp("cpu-cache"))


@pytest.fixture
def fresh_cpu(tmp_path):
    """A backend with an empty cache of its own."""
    return CpuBackend(threads=2, cache_dir=tmp_path)


def small_graph(name="small", matmul=False):
    b = GraphBuilder(name)
    x = b.input("x", "f32", (3, 32))
    if matmul:
        x = b.mul_mat(x, b.weight("w", np.random.default_rng(0).standard_normal((8, 32)), "q8_0"))
    return b.build(b.rms_norm(b.silu(x)))


def mixed_graph():
    """Several kinds of kernel, for the thread-count and batch-invariance checks."""
    rng = np.random.default_rng(1)
    b = GraphBuilder("mixed")
    x = b.input("x", "f32", (5, 64))
    pos = b.input("pos", "i32", (5,))
    h = b.rms_norm(x)
    qkv = b.mul_mat(h, b.weight("wqkv", rng.standard_normal((3 * 64, 64)), "q4_0"))
    q, k, v = (b.view(qkv, shape=(5, 4, 16), strides=(3 * 64 * 4, 64, 4), offset=i * 64 * 4) for i in range(3))
    q, k = b.rope(q, pos, mode="neox"), b.rope(k, pos, mode="neox")
    a = b.attention(q, k, v, scale=0.25, causal=True)
    o = b.mul_mat(b.reshape(b.cont(a), 5, 64), b.weight("wo", rng.standard_normal((64, 64)), "f16"))
    y = b.add(x, o)
    return b.build(b.softmax(y, softcap=5.0), b.layer_norm(y), b.sum_rows(y))


# ---- compile cache -----------------------------------------------------------------------------
def test_second_compile_hits_the_cache(fresh_cpu):
    before = (fresh_cpu.cache.builds, fresh_cpu.cache.hits)
    graph = small_graph("hit")
    fresh_cpu.compile(graph)
    assert (fresh_cpu.cache.builds - before[0], fresh_cpu.cache.hits - before[1]) == (1, 0)
    exe = fresh_cpu.compile(graph)
    assert (fresh_cpu.cache.builds - before[0], fresh_cpu.cache.hits - before[1]) == (1, 1)
    inputs = random_inputs(graph)
    assert nmse(exe.run(inputs)[0], run_reference(graph, inputs)[0]) < 1e-7


def test_corrupted_cache_entry_is_rebuilt_not_loaded(fresh_cpu):
    before = (fresh_cpu.cache.builds, fresh_cpu.cache.hits)
    graph = small_graph("corrupt")
    library = fresh_cpu.cache.build(render_graph(graph).source, ISA_FLAGS[fresh_cpu.isa])
    assert fresh_cpu.cache.builds - before[0] == 1
    library.write_bytes(b"\x7fELF garbage" + bytes(100))   # not loaded in this process yet
    exe = fresh_cpu.compile(graph)
    assert (fresh_cpu.cache.builds - before[0], fresh_cpu.cache.hits - before[1]) == (2, 0)
    inputs = random_inputs(graph)
    assert nmse(exe.run(inputs)[0], run_reference(graph, inputs)[0]) < 1e-7


def test_an_entry_evicted_between_lookup_and_load_is_built_again(fresh_cpu, monkeypatch):
    """Another process may evict an entry from the size-limited cache after this one found it:
    the library is built again, not reported missing."""
    build = fresh_cpu.cache.build
    evicted = []

    def build_then_evict(source, flags, name="lib", fresh=False, **options):
        path = build(source, flags, name=name, fresh=fresh, **options)
        if not evicted:
            evicted.append(path)
            path.unlink()
        return path
    monkeypatch.setattr(fresh_cpu.cache, "build", build_then_evict)
    graph = small_graph("evicted")
    exe = fresh_cpu.compile(graph)
    assert evicted and exe.library_path.exists()
    inputs = random_inputs(graph)
    assert nmse(exe.run(inputs)[0], run_reference(graph, inputs)[0]) < 1e-7


# ---- kernel libraries --------------------------------------------------------------------------
def test_a_graph_links_one_kernel_library_per_weight_type_it_uses(fresh_cpu):
    """A cold compile builds the graph's library and the missing libraries of its weight types
    (q4_0, f16) together, and no other type's."""
    graph = mixed_graph()
    tags = {w: fresh_cpu._type_library(w).tag for w in ("q4_0", "f16")}
    missing = [t for t in tags.values() if not is_loaded(t)]
    exe = fresh_cpu.compile(graph)
    assert fresh_cpu.cache.builds == 1 + len(missing)
    assert all(is_loaded(t) for t in tags.values())
    inputs = random_inputs(graph, seed=2)
    for got, want in zip(exe.run(inputs), run_reference(graph, inputs)):
        assert nmse(got, want) < 1e-3
    with pytest.raises(EmberError, match="kernel_library"):
        fresh_cpu.compile(graph, kernel_library="some")


def test_a_tiered_backend_runs_the_quick_tier_until_the_full_one_is_built(tmp_path):
    """A cold compile gives the quick tier at once and builds the full one in the background;
    both compute the same bits; another backend on that cache then gets the full tier at once."""
    graph = mixed_graph()
    inputs = random_inputs(graph, seed=3)
    exe = CpuBackend(threads=2, cache_dir=tmp_path, tiered=True).compile(graph)
    assert exe.tier == "quick"
    quick = exe.run(inputs)
    exe.upgrade.join()
    assert exe.upgrade_error is None and exe.tier == "full"
    for a, b in zip(quick, exe.run(inputs)):
        np.testing.assert_array_equal(a, b)
    again = CpuBackend(threads=2, cache_dir=tmp_path, tiered=True).compile(graph)
    assert again.tier == "full" and again.upgrade is None


def test_kernel_names_take_their_weight_types_tags():
    source = render_graph(mixed_graph()).source
    tagged = tag_kernel_symbols(source, {"q4_0": "kAAA", "f16": "kBBB"})
    names = set(re.findall(r"\b(?:ember_mm|ember_dequant_row)_\w+", tagged))
    assert "ember_mm_kAAA_q4_0" in names and "ember_mm_kBBB_f16" in names
    assert "ember_mm_kBBB_chunk_rows_of" in names          # the first type's (f16 < q4_0)
    assert all(n.split("_")[2 if n.startswith("ember_mm") else 3] in ("kAAA", "kBBB") for n in names)
    assert tag_kernel_symbols(source, "kCCC") == source.replace("ember_mm_", "ember_mm_kCCC_") \
        .replace("ember_dequant_row_", "ember_dequant_row_kCCC_")
    with pytest.raises(EmberError, match="ember_mm_q4_0"):
        tag_kernel_symbols(source, {"f16": "kBBB"})


def test_missing_compiler_is_backend_unavailable(tmp_path):
    backend = CpuBackend(cc="ember-no-such-cc", cache_dir=tmp_path)
    ok, reason = backend.available()
    assert not ok and "ember-no-such-cc" in reason
    with pytest.raises(BackendUnavailable, match="ember-no-such-cc"):
        backend.compile(small_graph())


def test_unknown_isa_and_bad_threads():
    with pytest.raises(EmberError, match="isa"):
        CpuBackend(isa="avx9000")
    with pytest.raises(EmberError, match="threads"):
        CpuBackend(threads=0)


# ---- running -----------------------------------------------------------------------------------
def test_constants_are_not_copied(cpu, tmp_path):
    weights = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float32, shape=(8, 32))
    weights[:] = np.random.default_rng(3).standard_normal((8, 32))
    b = GraphBuilder("mapped")
    x = b.input("x", "f32", (2, 32))
    graph = b.build(b.mul_mat(x, b.const("w", weights)))
    exe = cpu.compile(graph)
    held = [a for a in exe._constants if a.ctypes.data == weights.ctypes.data]
    assert held and isinstance(held[0], np.memmap)
    inputs = random_inputs(graph)
    assert nmse(exe.run(inputs)[0], run_reference(graph, inputs)[0]) < 1e-10


def test_thread_counts_give_bit_identical_outputs(tmp_path):
    graph = mixed_graph()
    inputs = random_inputs(graph, seed=4)
    results = [CpuBackend(threads=t, cache_dir=tmp_path, adapt_threads=False).compile(graph).run(inputs)
               for t in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    for got, want in zip(results[0], run_reference(graph, inputs)):
        assert nmse(got, want) < 1e-3


def test_the_team_governor_changes_no_bits(tmp_path):
    """With the governor on, a graph run again and again gives the same bits every time (on a
    busy machine its probes, one thread less, come from run 24 of 2 threads; common.h; the
    thread-count test above covers every team size)."""
    graph = mixed_graph()
    run = CpuBackend(threads=2, cache_dir=tmp_path, adapt_threads=True).compile(graph).bind(random_inputs(graph, seed=5))
    first = [a.copy() for a in run()]
    for _ in range(40):
        for a, b in zip(first, run()):
            np.testing.assert_array_equal(a, b)


def test_row_results_do_not_depend_on_the_batch(cpu):
    """Batch invariance of the row kernels: row 0 alone equals row 0 among 7 rows, bit for bit."""
    def build(T):
        b = GraphBuilder("rows")
        x = b.input("x", "f32", (T, 4, 64))
        k = b.input("k", "f32", (9, 2, 64))
        flat = b.reshape(x, T, 256)
        return b.build(b.rms_norm(flat), b.layer_norm(flat), b.softmax(flat, scale=0.3), b.sum_rows(flat),
                       b.attention(x, k, k, scale=0.125))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 4, 64)).astype(np.float32)
    k = rng.standard_normal((9, 2, 64)).astype(np.float32)
    many = cpu.compile(build(7)).run({"x": x, "k": k})
    one = cpu.compile(build(1)).run({"x": x[:1], "k": k})
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a[0], b[0])


def test_attention_decode_row_equals_its_prefill_row(cpu):
    """A query decoded alone (one row, the cache padded and masked) gives the bits it gets in a
    prompt batch: GQA over f16 K/V with a causal mask as input, as a model step graph has it."""
    def build(T, Tk=48):
        b = GraphBuilder("att")
        q = b.input("q", "f32", (T, 4, 64))
        k = b.input("k", "f16", (Tk, 1, 64))
        v = b.input("v", "f16", (Tk, 1, 64))
        m = b.input("m", "f32", (T, Tk))
        return b.build(b.attention(q, k, v, m, scale=0.125))
    rng = np.random.default_rng(6)
    q = rng.standard_normal((33, 4, 64)).astype(np.float32)
    k, v = (rng.standard_normal((48, 1, 64)).astype(np.float16) for _ in range(2))
    mask = np.where(np.arange(48)[None, :] <= np.arange(33)[:, None], 0.0, -np.inf).astype(np.float32)
    batch = cpu.compile(build(33)).run({"q": q, "k": k, "v": v, "m": mask})[0]
    one = cpu.compile(build(1))
    for i in (0, 15, 16, 32):
        got = one.run({"q": q[i:i + 1], "k": k, "v": v, "m": mask[i:i + 1]})[0]
        np.testing.assert_array_equal(got[0], batch[i])


@pytest.mark.parametrize("op", ["exp", "silu", "gelu", "sigmoid", "swiglu", "geglu", "scale"])
def test_vector_body_and_scalar_tail_agree(cpu, op):
    """Elementwise kernels go 8 values at a time and finish row tails one at a time: a value
    gives the same bits in either place."""
    b = GraphBuilder("tail")
    # rows of 9 inside rows of 16: 8 values in a vector, the 9th in the tail
    x = b.view(b.input("x", "f32", (64, 16)), shape=(64, 9), strides=(64, 4))
    g = b.view(b.input("g", "f32", (64, 16)), shape=(64, 9), strides=(64, 4))
    if op in ("swiglu", "geglu"):
        y = b.op(op, x, g)
    elif op == "scale":
        y = b.scale(x, scale=0.3, bias=0.7)
    else:
        y = b.op(op, x)
    rng = np.random.default_rng(7)
    xs = (rng.standard_normal((64, 16)) * 6).astype(np.float32)
    gs = rng.standard_normal((64, 16)).astype(np.float32)
    lane = rng.integers(0, 8, 64)
    xs[:, 8], gs[:, 8] = xs[np.arange(64), lane], gs[np.arange(64), lane]
    out = cpu.compile(b.build(y)).run({"x": xs, "g": gs})[0]
    np.testing.assert_array_equal(out[:, 8].view(np.uint32), out[np.arange(64), lane].view(np.uint32))


# ---- errors and registry -----------------------------------------------------------------------
class NoMatmulBackend(CpuBackend):
    def supports_op(self, node):
        if node.op == "mul_mat":
            return False, f"mul_mat: w dtype {node.inputs[1].dtype} unsupported"
        return super().supports_op(node)


def test_unsupported_node_is_named(tmp_path):
    with pytest.raises(EmberError, match=r"%\d+ \(mul_mat : f32\[3, 8\]\).*w dtype q8_0 unsupported"):
        NoMatmulBackend(cache_dir=tmp_path).compile(small_graph(matmul=True))


def test_registry():
    assert "cpu" in BACKEND_NAMES and "cpu" in available_backends()
    backend = get_backend("cpu", threads=1, isa="scalar")
    assert isinstance(backend, CpuBackend) and backend.threads == 1 and backend.isa == "scalar"
    with pytest.raises(EmberError, match="unknown backend 'nope'; known: cpu"):
        get_backend("nope")


def test_source_is_one_file_with_one_parallel_region():
    program = render_graph(mixed_graph())
    src = program.source
    assert src.count("#pragma omp parallel") == 1
    assert len(re.findall(r"^int ember_graph_run\(", src, re.M)) == 1
    kernels = re.findall(r"^/\* (k\d+_\w+): .*\n \* template (\w+\.c\.j2): ", src, re.M)
    assert len(kernels) == program.n_kernels >= 8
    assert src.count("ember_barrier_wait(&ember_bar, nth);") >= program.n_barriers
