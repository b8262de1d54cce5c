"""The CPU matmul kernels (ember/codegen/cpu_matmul.py) compiled for both ISA levels and run
through ctypes: correctness against NumPy, batch invariance, awkward shapes and strides,
dequant_row against ember.ir.quant."""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from ember.backends.cpu.compiler import ISA_FLAGS, CompileCache
from ember.codegen.cpu_matmul import (MATMUL_WTYPES, matmul_common_source, matmul_scratch_bytes,
                                      matmul_source, standalone_source)
from ember.ir.dtypes import dtype, f32_to_bf16, to_float32
from ember.ir.quant import quantize

QUANTIZED = ("q8_0", "q4_0", "q5_0", "q4_k", "q6_k",
             "q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4")
# the weight types whose activations are quantized in 256-value blocks (q8_K-like); the rest 32
Q256 = ("q4_k", "q6_k", "q2_k", "q3_k", "q5_k", "iq4_xs")
FLOATS = ("f32", "f16", "bf16")
I64 = ctypes.c_int64
PTR = ctypes.c_void_p


class Kernels:
    """One compiled library holding every wtype's kernels (so it also checks that the sources
    concatenate into one file)."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        for wtype in MATMUL_WTYPES:
            run = getattr(self.lib, f"ember_mm_{wtype}_run")
            run.argtypes = [ctypes.c_int, I64, I64, I64, PTR, I64, PTR, I64, PTR, I64, PTR]
            run.restype = None
            deq = getattr(self.lib, f"ember_dequant_row_{wtype}")
            deq.argtypes = [PTR, PTR, I64]
            deq.restype = None
            scratch = getattr(self.lib, f"ember_mm_{wtype}_scratch")
            scratch.argtypes = [I64, I64]
            scratch.restype = I64

    def matmul(self, wtype, x, w, nth=2, y_pad=0):
        """y = x @ w.T by the kernel; x [T, >=K] f32 (row stride from the array), w [N, row bytes]."""
        T, K = x.shape[0], _k_of(wtype, w)
        N = w.shape[0]
        y_full = np.full((T, N + y_pad), np.nan, np.float32)
        size = matmul_scratch_bytes(wtype, T, K)
        assert getattr(self.lib, f"ember_mm_{wtype}_scratch")(T, K) == size
        scratch = _aligned(size + 256)
        scratch[size:] = 0xA5  # a canary right after the promised size
        getattr(self.lib, f"ember_mm_{wtype}_run")(
            nth, T, N, K, x.ctypes.data, x.strides[0], w.ctypes.data, w.strides[0],
            y_full.ctypes.data, y_full.strides[0], scratch.ctypes.data)
        assert (scratch[size:] == 0xA5).all(), "kernel wrote past its scratch"
        if y_pad:
            assert np.isnan(y_full[:, N:]).all(), "kernel wrote past the end of a y row"
        return y_full[:, :N]

    def dequant_row(self, wtype, row, K):
        out = np.empty(K, np.float32)
        getattr(self.lib, f"ember_dequant_row_{wtype}")(row.ctypes.data, out.ctypes.data, K)
        return out


def _aligned(nbytes):
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes]


def _k_of(wtype, w):
    dt = dtype(wtype)
    if dt.is_quantized:
        return w.shape[1] // dt.block_bytes * dt.block_size
    return w.shape[1]


def make_weights(wtype, N, K, rng, row_pad=0):
    """Weights of wtype [N, K] stored with row_pad extra bytes per row; returns (stored, float)."""
    values = rng.standard_normal((N, K)).astype(np.float32)
    if wtype == "f32":
        stored = values
    elif wtype == "f16":
        stored = values.astype(np.float16)
    elif wtype == "bf16":
        stored = f32_to_bf16(values)
    else:
        stored = quantize(values, wtype)
    if row_pad:  # a view whose row stride exceeds its row
        padded = np.zeros((N, stored.shape[1] + row_pad), stored.dtype)
        padded[:, :stored.shape[1]] = stored
        stored = padded[:, :stored.shape[1]]
    return stored, to_float32(stored, dtype(wtype))


def make_x(T, K, rng, row_pad=0):
    full = rng.standard_normal((T, K + row_pad)).astype(np.float32)
    return full[:, :K]


def nmse(got, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.sum((got - ref) ** 2) / max(np.sum(ref ** 2), 1e-300))


def emulate_quantized(wtype, x, w_float):
    """NumPy emulation of the kernel's activation quantization (blocks of 32 or 256, scale
    amax / 127, round to nearest even), then an exact product in float64."""
    block = 256 if wtype in Q256 else 32
    T, K = x.shape
    xb = np.ascontiguousarray(x).reshape(T, K // block, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.zeros_like(amax)
    np.divide(np.float32(127), amax, out=inv, where=amax != 0)
    q = np.rint(xb * inv)
    xq = (q.astype(np.float64) * d.astype(np.float64)).reshape(T, K)
    return xq @ w_float.astype(np.float64).T


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return CompileCache(tmp_path_factory.mktemp("cpu-matmul-cache"))


@pytest.fixture(scope="module", params=sorted(ISA_FLAGS))
def kernels(request, compile_cache):
    return Kernels(compile_cache.build(standalone_source(), ISA_FLAGS[request.param], "matmul_test"))


# ---------------------------------------------------------------------------------------------
# source shape


def test_sources_start_with_template_comment_and_concatenate():
    for wtype in MATMUL_WTYPES:
        src = matmul_source(wtype)
        body = src[len(matmul_common_source()):].lstrip()
        assert body.startswith("/* ember matmul (template matmul/"), wtype
        assert f"wtype={wtype}" in body.splitlines()[0]
        assert "#include" not in src
    # no static symbol defined twice when all sources share one file
    statics = re.findall(r"^static [^(=]*?\b(\w+)\(", "".join(matmul_source(w)[len(matmul_common_source()):]
                                                        for w in MATMUL_WTYPES), re.M)
    assert len(statics) == len(set(statics))


def test_one_source_compiles_alone(compile_cache):
    source = standalone_source(("q6_k",))
    assert source.count("#define EMBER_MM_COMMON") == 1
    lib = ctypes.CDLL(str(compile_cache.build(source, ISA_FLAGS["native"], "matmul_q6_k")))
    assert lib.ember_mm_q6_k_scratch is not None


def test_scratch_bytes_cover_the_activation_rows():
    assert matmul_scratch_bytes("f32", 7, 100) == 0
    assert matmul_scratch_bytes("q8_0", 3, 64) == 3 * 128  # 64 quants + 2 f32 scales, 64-aligned
    assert matmul_scratch_bytes("q4_k", 2, 512) == 2 * 640  # 512 + 2 scales + 32 sums
    with pytest.raises(ValueError):
        matmul_scratch_bytes("i8", 1, 32)


def test_unknown_wtype_is_refused():
    with pytest.raises(ValueError, match="iq2_xs"):
        matmul_source("iq2_xs")


# ---------------------------------------------------------------------------------------------
# correctness


@pytest.mark.parametrize("wtype", FLOATS)
def test_float_weights_match_numpy(kernels, wtype):
    rng = np.random.default_rng(1)
    T, N, K = 19, 45, 300
    w, wf = make_weights(wtype, N, K, rng)
    x = make_x(T, K, rng)
    y = kernels.matmul(wtype, x, w)
    ref = x.astype(np.float64) @ wf.astype(np.float64).T
    bound = 1e-10 if wtype == "f32" else 1e-8
    assert nmse(y, ref) < bound


@pytest.mark.parametrize("wtype", QUANTIZED)
def test_quantized_weights_match_numpy(kernels, wtype):
    rng = np.random.default_rng(2)
    T, N = 9, 40
    K = 512 if wtype in Q256 else 320
    w, wf = make_weights(wtype, N, K, rng)
    x = make_x(T, K, rng)
    y = kernels.matmul(wtype, x, w)
    assert nmse(y, x.astype(np.float64) @ wf.astype(np.float64).T) < (3e-3 if wtype == "q2_k" else 1e-3)
    # the remaining error is the activation quantization, emulated here: float rounding only
    assert nmse(y, emulate_quantized(wtype, x, wf)) < 1e-10


def _awkward_cases():
    for wtype in MATMUL_WTYPES:
        block = dtype(wtype).block_size
        ks = (7, 67) if block == 1 else (block, 3 * block)
        for T in (1, 3, 17):
            for N in (1, 3, 17, 64):
                for K in ks:
                    yield wtype, T, N, K


@pytest.mark.parametrize("wtype", MATMUL_WTYPES)
def test_awkward_shapes_and_strides(kernels, wtype):
    rng = np.random.default_rng(3)
    for _, T, N, K in (c for c in _awkward_cases() if c[0] == wtype):
        w, wf = make_weights(wtype, N, K, rng, row_pad=6)
        x = make_x(T, K, rng, row_pad=5)
        y = kernels.matmul(wtype, x, w, nth=2, y_pad=3)
        if dtype(wtype).is_quantized:
            err = nmse(y, emulate_quantized(wtype, x, wf))
            assert err < 1e-10, (T, N, K, err)
        else:
            err = nmse(y, x.astype(np.float64) @ wf.astype(np.float64).T)
            assert err < 1e-10, (T, N, K, err)


def test_zero_activations_give_zero(kernels):
    rng = np.random.default_rng(4)
    for wtype in MATMUL_WTYPES:
        K = 256 if dtype(wtype).is_quantized else 40
        w, _ = make_weights(wtype, 5, K, rng)
        y = kernels.matmul(wtype, np.zeros((2, K), np.float32), w)
        assert np.array_equal(y, np.zeros((2, 5), np.float32)), wtype


# ---------------------------------------------------------------------------------------------
# batch invariance: the bits of row t of y depend on row t of x only


@pytest.mark.parametrize("wtype", MATMUL_WTYPES)
def test_batch_invariance(kernels, wtype):
    rng = np.random.default_rng(5)
    block = dtype(wtype).block_size
    T, N = 64, 83
    K = 2 * 256 if block == 256 else (640 if block in (32, 64) else 601)
    w, _ = make_weights(wtype, N, K, rng)
    x = make_x(T, K, rng, row_pad=3)
    full = kernels.matmul(wtype, x, w, nth=2)
    assert np.array_equal(full, kernels.matmul(wtype, x, w, nth=1))
    for t in (0, 5, 63):  # GEMV path, one row at a time
        assert np.array_equal(kernels.matmul(wtype, x[t:t + 1], w, nth=1)[0], full[t])
        assert np.array_equal(kernels.matmul(wtype, x[t:t + 1], w, nth=2)[0], full[t])
    for start, size in ((0, 7), (30, 7), (57, 7), (9, 2), (20, 3), (40, 5)):
        rows = kernels.matmul(wtype, x[start:start + size], w, nth=2)  # other rows along
        assert np.array_equal(rows, full[start:start + size]), (start, size)
    picked = [3, 40, 11]
    assert np.array_equal(kernels.matmul(wtype, np.ascontiguousarray(x[picked]), w, nth=1),
                          full[picked])


@pytest.mark.parametrize("wtype", ("q8_0", "q4_k", "nvfp4", "q5_k"))
def test_long_single_row_matches_batched_rows(kernels, wtype):
    # one row longer than the per-thread stack buffer goes through the shared scratch instead
    rng = np.random.default_rng(7)
    K = 40960
    w, wf = make_weights(wtype, 5, K, rng)
    x = make_x(3, K, rng)
    full = kernels.matmul(wtype, x, w, nth=2)
    assert np.array_equal(kernels.matmul(wtype, x[1:2], w, nth=2)[0], full[1])
    assert nmse(full, emulate_quantized(wtype, x, wf)) < 1e-10


# ---------------------------------------------------------------------------------------------
# dequant_row


@pytest.mark.parametrize("wtype", MATMUL_WTYPES)
def test_dequant_row(kernels, wtype):
    rng = np.random.default_rng(6)
    K = 512 if dtype(wtype).is_quantized else 37
    w, wf = make_weights(wtype, 3, K, rng)
    for n in range(3):
        row = np.ascontiguousarray(w[n])
        out = kernels.dequant_row(wtype, row, K)
        np.testing.assert_allclose(out, wf[n], rtol=1e-6, atol=1e-7)
