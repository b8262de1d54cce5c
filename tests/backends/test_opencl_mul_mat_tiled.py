"""The generic profile's prompt matmul (mul_mat_tiled.cl.j2, a register tile per work item) on the
OpenCL device here: which mul_mats it takes, results against NumPy on shapes that are not
multiples of the tile, and batch invariance: a row's bits are the same whatever T it is computed
with, decode (T = 1, mul_mat.cl.j2) included."""
from __future__ import annotations

import numpy as np
import pytest

from ember.backends.opencl.backend import OpenCLBackend
from ember.codegen.opencl import generic_profile, render_graph
from ember.ir import GraphBuilder

_probe = OpenCLBackend()
_ok, _why = _probe.available()
needs_device = pytest.mark.skipif(not _ok, reason=f"opencl: unavailable: {_why}")


@pytest.fixture(scope="module")
def ocl(tmp_path_factory):
    return OpenCLBackend(profile="generic", cache_dir=tmp_path_factory.mktemp("opencl-cache"))


def _weight(rng, N, K, wtype):
    values = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    if wtype == "f16":
        values = values.astype(np.float16).astype(np.float32)
    elif wtype == "bf16":     # representable in bf16: the kernel then multiplies the same values
        values = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)
    return values


def _graph(name, T, values, wtype):
    """y = x w^T, x [T, K], w the float values [N, K] stored as wtype."""
    b = GraphBuilder(name)
    w = b.weight("w", values, wtype)
    return b.build(b.mul_mat(b.input("x", "f32", (T, values.shape[1])), w))


def _templates(graph):
    return {k.template for k in render_graph(graph, generic_profile()).kernels}


# ---- which kernel ------------------------------------------------------------------------------
def test_prompts_with_float_weights_take_the_tiled_kernel():
    w = _weight(np.random.default_rng(0), 13, 48, "f32")
    assert _templates(_graph("p", 7, w, "f32")) == {"mul_mat_tiled.cl.j2"}
    assert _templates(_graph("d", 1, w, "f32")) == {"mul_mat.cl.j2"}


def test_quantized_and_scalar_cases_keep_the_row_kernel():
    rng = np.random.default_rng(1)
    assert _templates(_graph("q", 5, _weight(rng, 8, 64, "f32"), "q8_0")) == {"mul_mat.cl.j2"}
    odd_k = _weight(rng, 8, 40, "f32")        # K not a multiple of 16: no vector loads
    assert _templates(_graph("k", 5, odd_k, "f32")) == {"mul_mat.cl.j2"}


# ---- on the device -----------------------------------------------------------------------------
@needs_device
@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("T, N, K", [(2, 1, 16), (7, 13, 48), (33, 37, 160), (5, 4, 2048)])
def test_tiled_matches_numpy_on_awkward_shapes(ocl, wtype, T, N, K):
    rng = np.random.default_rng(T * 1000 + N)
    w = _weight(rng, N, K, wtype)
    x = rng.standard_normal((T, K)).astype(np.float32)
    graph = _graph(f"mm_{wtype}_{T}_{N}_{K}", T, w, wtype)
    assert _templates(graph) == {"mul_mat_tiled.cl.j2"}
    got = ocl.compile(graph).run({"x": x})[0]
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@needs_device
@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16"])
def test_batch_invariance_across_T_and_kernels(ocl, wtype):
    """Row t of y has the same bits with T = 1 (decode kernel), any prefix T, and T = 33."""
    rng = np.random.default_rng(7)
    N, K = 37, 160                # N not a multiple of the tile's rows
    w = _weight(rng, N, K, wtype)
    x = rng.standard_normal((33, K)).astype(np.float32)
    full = ocl.compile(_graph(f"inv_{wtype}_33", 33, w, wtype)).run({"x": x})[0]
    for T in (1, 2, 3, 5, 8, 17):
        y = ocl.compile(_graph(f"inv_{wtype}_{T}", T, w, wtype)).run({"x": x[:T]})[0]
        np.testing.assert_array_equal(y.view(np.uint32), full[:T].view(np.uint32), err_msg=f"T={T}")
    decode = ocl.compile(_graph(f"inv_{wtype}_1", 1, w, wtype))
    for t in (0, 16, 32):          # any row alone, through the decode kernel
        alone = decode.run({"x": x[t:t + 1]})[0]
        np.testing.assert_array_equal(alone.view(np.uint32), full[t:t + 1].view(np.uint32), err_msg=f"row {t}")
