"""Quantized KV caches (q8_0, q4_0, turbo3, turbo4) on every backend: set_rows writes the bytes
ember.ir.quant.quantize writes, bit for bit; attention reads K and V caches of any of these types
(mixed K/V types too) within the per-op bound of the reference, and a query row's result does not
depend on the rows computed with it. The conformance suite runs the same ops at a few more shapes;
each test here is one graph (one compile) per backend."""
from __future__ import annotations

import numpy as np
import pytest

from devices import make_backend
from ember.codegen.opencl_plan import generic_profile
from ember.ir import GraphBuilder, dtypes, quant
from ember.ir.interpreter import run_reference
from ember.testing import nmse

KINDS = [d.name for d in dtypes.KV_QUANTIZED]
F32_MATH = 1e-7          # attention's per-op bound (tests/backends/test_conformance.py)
R, WIDTH = 12, 512       # cache rows; a row of 4 turbo blocks, 16 q8_0 / q4_0 blocks


def _rows(rng, T: int) -> np.ndarray:
    """Rows to write: normal, tiny and huge scales, a zero row, a constant row, a one-hot row and
    a row whose largest magnitude appears twice with both signs (q4_0 keeps the first)."""
    x = rng.standard_normal((T, WIDTH)).astype(np.float32)
    x[1] *= np.float32(1e-4)
    x[2] *= np.float32(3e3)
    x[3] = 0.0
    x[4] = 0.25
    x[5] = 0.0
    x[5, 7] = 1.0
    x[6, 3], x[6, 9] = -2.5, 2.5
    x[6, 3 + 128], x[6, 9 + 128] = 4.0, -4.0
    return x


def _set_rows_graph(kinds):
    b = GraphBuilder("kv_set_rows")
    slots = b.input("slots", "i32", (9,))
    src = b.input("src", "f32", (9, WIDTH))
    return b.build([b.set_rows(b.input(f"cache_{k}", k, (R, WIDTH)), slots, src) for k in kinds])


def _set_rows_inputs(kinds, seed=0):
    rng = np.random.default_rng(seed)
    data = {"slots": np.array([0, 3, 5, 7, 2, 11, 9, 3, 10], np.int32),   # 3 repeats: the last wins
            "src": _rows(rng, 9)}
    for k in kinds:
        data[f"cache_{k}"] = dtypes.from_float32(rng.standard_normal((R, WIDTH)).astype(np.float32), dtypes.dtype(k))
    return data


def _expected_cache(data, kind):
    expect = data[f"cache_{kind}"].copy()
    for t, slot in enumerate(data["slots"]):
        expect[slot] = quant.quantize(data["src"][t:t + 1], kind)[0]
    return expect


def test_set_rows_writes_the_reference_quantizer_bytes(backend):
    """Every cache type, rows of every kind above: the exact bytes of ember.ir.quant.quantize
    (ggml's reference quantizers for q8_0 / q4_0, ember.ir.turbo for turbo3 / turbo4)."""
    data = _set_rows_inputs(KINDS)
    got = backend.compile(_set_rows_graph(KINDS)).run(data)
    for kind, cache in zip(KINDS, got):
        expect = _expected_cache(data, kind)
        bad = np.argwhere((cache != expect).any(axis=1)).ravel().tolist()
        assert not bad, f"{backend.name}: {kind}: rows {bad} differ from the reference quantizer"


@pytest.mark.parametrize("which", ["opencl-no-fp64", "vulkan-baseline"])
def test_set_rows_without_fp64_stays_within_rounding_of_the_reference(which, backend_cache):
    """A device without fp64 runs the quantizer's float64 steps in float: a norm may move by an
    ulp, which may move an fp16 norm or a cell by one step, nothing more."""
    if which == "opencl-no-fp64":
        backend = make_backend("opencl", backend_cache, profile=generic_profile(fp64=False))
    else:
        backend = make_backend("vulkan", backend_cache, features="baseline")
    data = _set_rows_inputs(KINDS, seed=1)
    got = backend.compile(_set_rows_graph(KINDS)).run(data)
    for kind, cache in zip(KINDS, got):
        expect = _expected_cache(data, kind)
        block_bytes = dtypes.dtype(kind).block_bytes
        same = (cache.reshape(-1, block_bytes) == expect.reshape(-1, block_bytes)).all(axis=1).mean()
        assert same >= 0.95, f"{kind}: only {same:.1%} of the blocks are the reference's"
        err = nmse(quant.dequantize(cache, kind), quant.dequantize(expect, kind))
        assert err <= 1e-6, f"{kind}: NMSE {err:.3g} against the reference quantizer's values"


def test_a_long_batch_into_a_two_block_turbo_head_is_written_and_read_back(backend):
    """The default model's shape: one KV head of 256 values (two turbo blocks) and a prompt batch
    of 300 tokens (a repeated slot: the last token wins), written by set_rows and read by
    attention in one graph. Every block is the reference quantizer's and attention is within its
    bound. (Vulkan's turbo set_rows once looped over the tokens in one work group; lavapipe wrote
    wrong blocks from the 230th token on.)"""
    T, D, HQ = 300, 256, 4
    rng = np.random.default_rng(11)
    slots = rng.permutation(T).astype(np.int32)
    slots[T - 5] = slots[40]            # two tokens for one row: the later one is kept
    b = GraphBuilder("kv_long_batch")
    q = b.input("q", "f32", (3, HQ, D))
    idx = b.input("slots", "i32", (T,))
    outs = []
    data = {"slots": slots, "q": rng.standard_normal((3, HQ, D)).astype(np.float32)}
    for kind in ("turbo4", "turbo3"):
        src = b.input(f"src_{kind}", "f32", (T, D))
        cache = b.input(f"cache_{kind}", kind, (T, D))
        kv = b.set_rows(cache, idx, src)
        heads = b.reshape(kv, T, 1, D)
        outs += [kv, b.attention(q, heads, heads, scale=D ** -0.5, causal=True)]
        # a shared offset, as real keys have, on normal values
        data[f"src_{kind}"] = (rng.standard_normal((T, D)) + 2 * rng.standard_normal(D)).astype(np.float32)
        data[f"cache_{kind}"] = dtypes.from_float32(np.zeros((T, D), np.float32), dtypes.dtype(kind))
    graph = b.build(outs)
    got, expected = backend.compile(graph).run(data), run_reference(graph, data)
    for n, kind in enumerate(("turbo4", "turbo3")):
        cache, out = got[2 * n], got[2 * n + 1]
        bad = np.argwhere((cache != expected[2 * n]).any(axis=1)).ravel().tolist()
        assert not bad, f"{backend.name}: {kind}: rows {bad[:8]} ({len(bad)}) differ from the reference quantizer"
        err = nmse(out, expected[2 * n + 1])
        assert err <= F32_MATH, f"{backend.name}: {kind}: attention NMSE {err:.3g} > {F32_MATH:g}"


# ---- attention over the caches -----------------------------------------------------------------
# Every kind as K and as V, turbo on either side, q8_0 K with turbo4 V (the safe setting) and
# plain caches beside quantized ones; the whole matrix of pairs is the slow variant.
PAIRS = [("q8_0", "turbo4"), ("turbo4", "q4_0"), ("q4_0", "turbo3"), ("turbo3", "q8_0"), ("f16", "turbo4")]
ALL_PAIRS = [(k, v) for k in KINDS for v in KINDS] + [("f16", "turbo4"), ("turbo3", "f16"), ("q8_0", "f32")]
TQ, TK, HQ, HKV, D = 3, 19, 4, 2, 128


def _cache_data(rng, pairs, b, shape):
    """One input per cache type of pairs, filled with quantized normal values."""
    nodes = {dt: b.input(f"kv_{dt}", dt, shape) for dt in dict.fromkeys(x for p in pairs for x in p)}
    data = {node.name: dtypes.from_float32(rng.standard_normal(shape).astype(np.float32), dtypes.dtype(dt))
            for dt, node in nodes.items()}
    return nodes, data


def _check_pairs(backend, pairs):
    b = GraphBuilder("kv_attention")
    q = b.input("q", "f32", (TQ, HQ, D))
    rng = np.random.default_rng(2)
    caches, data = _cache_data(rng, pairs, b, (TK, HKV, D))
    data["q"] = rng.standard_normal((TQ, HQ, D)).astype(np.float32)
    graph = b.build([b.attention(q, caches[k], caches[v], scale=D ** -0.5, causal=True) for k, v in pairs])
    got = backend.compile(graph).run(data)
    expected = run_reference(graph, data)
    for (k, v), g, e in zip(pairs, got, expected):
        err = nmse(g, e)
        assert err <= F32_MATH, f"{backend.name}: K {k}, V {v}: NMSE {err:.3g} > {F32_MATH:g}"


def test_attention_reads_mixed_cache_types(backend):
    """K and V of different cache types, GQA, causal, in one graph: within attention's bound of
    the reference, which dequantizes the caches."""
    _check_pairs(backend, PAIRS)


@pytest.mark.slow
def test_attention_reads_every_pair_of_cache_types(backend):
    _check_pairs(backend, ALL_PAIRS)


def test_attention_over_a_quantized_cache_is_batch_invariant(backend):
    """A decode row (one query over the keys up to its position) equals the same row of a batch
    of 17 queries, bit for bit, with each cache type as K or as V (turbo on both sides): the
    cache is read per row, never per batch."""
    Tq, Tk, pairs = 17, 40, [("turbo3", "q4_0"), ("q8_0", "turbo4")]
    b = GraphBuilder("kv_invariance")
    q = b.input("q", "f32", (Tq, HQ, D))
    rng = np.random.default_rng(7)
    caches, data = _cache_data(rng, pairs, b, (Tk, HKV, D))
    data["q"] = rng.standard_normal((Tq, HQ, D)).astype(np.float32)
    last = b.view(q, shape=(1, HQ, D), strides=q.type.strides, offset=(Tq - 1) * q.type.strides[0])
    outs = []
    for k_dt, v_dt in pairs:    # the last query sits at position Tk - 1 alone and in the batch
        outs += [b.attention(q, caches[k_dt], caches[v_dt], scale=0.09, causal=True),
                 b.attention(last, caches[k_dt], caches[v_dt], scale=0.09, causal=True)]
    got = backend.compile(b.build(outs)).run(data)
    for n, (k_dt, v_dt) in enumerate(pairs):
        batch, one = got[2 * n:2 * n + 2]
        np.testing.assert_array_equal(one[0], batch[-1], err_msg=f"K {k_dt}, V {v_dt}")


def test_simd_cache_loads_equal_the_portable_ones(backend_cache, scalar_cpu):
    """The CPU's AVX2 block loads (codebooks in registers, eight values at a time) give the
    portable loads' values: attention over every cache type as K and as V is the same, bit for
    bit, on the native and the portable-ISA builds."""
    native = make_backend("cpu", backend_cache)
    pairs = [("q8_0", "q4_0"), ("q4_0", "turbo3"), ("turbo4", "q8_0"), ("turbo3", "turbo4")]
    b = GraphBuilder("kv_isa")
    q = b.input("q", "f32", (TQ, HQ, D))
    rng = np.random.default_rng(5)
    caches, data = _cache_data(rng, pairs, b, (TK, HKV, D))
    data["q"] = rng.standard_normal((TQ, HQ, D)).astype(np.float32)
    graph = b.build([b.attention(q, caches[k], caches[v], scale=D ** -0.5, causal=True) for k, v in pairs])
    for (k, v), a, s in zip(pairs, native.compile(graph).run(data), scalar_cpu.compile(graph).run(data)):
        np.testing.assert_array_equal(a, s, err_msg=f"K {k}, V {v}")
