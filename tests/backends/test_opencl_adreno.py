"""The Adreno profile's math, run on the OpenCL device here (PoCL) in its emulated variant: the
same templates as on Adreno, with subgroup broadcast/reduce done through local memory and half
arithmetic done in float and rounded to half after every operation (bit-identical to native
half arithmetic). Compiling the native variant is tests/codegen/test_opencl_clang.py's job.

Covered: the GEMV (one token) and GEMM (prompt) kernels on Q8_0/Q4_0 weights in the SoA layout
against the reference, for awkward shapes (rows not a multiple of the 64-lane work-group, K
leaving half a chunk, tokens not a multiple of 8, strided and f16 activations); one weight
feeding GEMV, GEMM and get_rows at once, in one graph and across graphs sharing its upload (the
bug where llama.cpp's SYCL backend once reordered Q8_0 weights for its GEMV but left its GEMM reading the old layout: the layout-adreno pass of the opencl-adreno pipeline, run here before
compiling, puts the weight and every consumer in the adreno_soa layout of the IR, or none); and
the conformance groups whose kernels the profile changes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ember.backends.opencl.backend import OpenCLBackend
from ember.ir import GraphBuilder, run_reference
from ember.codegen.opencl import TEMPLATES, layout_pass
from ember.ir.interpreter import random_inputs
from ember.ir.quant import quantize
from ember.testing import nmse
from moe_ffn import MoeShape, as_stored, build_moe_ffn, moe_weights, numpy_moe_ffn

sys.path.insert(0, str(Path(__file__).parent))
from test_conformance import CASES, QUANT_MATMUL, check  # noqa: E402

SMALL_SOA = dict(soa_min_rows=4, soa_min_cols=32)
_probe = OpenCLBackend(profile="adreno-emulated")
_ok, _why = _probe.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"opencl adreno-emulated: unavailable: {_why}")


class LaidOutBackend(OpenCLBackend):
    """The backend behind the opencl-adreno pipeline's last phase: the profile's layout pass (with
    its small thresholds) runs before compiling, as the renderer runs no pass itself."""

    def compile(self, graph, **options):
        return super().compile(layout_pass(self.profile)(graph), **options)


@pytest.fixture(scope="module")
def adreno(tmp_path_factory):
    return LaidOutBackend(profile="adreno-emulated", profile_options=SMALL_SOA,
                         cache_dir=tmp_path_factory.mktemp("opencl-adreno-cache"))


def templates_of(exe) -> list[str]:
    by_name = {k.name: k.template for k in exe.program.kernels}
    return [by_name[launch.kernel] for launch in exe.program.launches]


def run_and_compare(exe, graph, inputs=None, bound=QUANT_MATMUL):
    inputs = inputs or random_inputs(graph)
    for i, (got, want) in enumerate(zip(exe.run(inputs), run_reference(graph, inputs))):
        err = nmse(got, want)
        assert err <= bound, f"output {i}: NMSE {err:.3g} > {bound:g}"


# ---- GEMV and GEMM -----------------------------------------------------------------------------
@pytest.mark.parametrize("wtype, M, K, x_kinds", [("q8_0", 68, 96, True), ("q4_0", 68, 96, False),
                                                  ("q8_0", 256, 640, False)])
def test_soa_matmuls_match_the_reference(adreno, wtype, M, K, x_kinds):
    b = GraphBuilder(f"soa_{wtype}_{M}x{K}")
    w = b.weight("w", np.random.default_rng(M).standard_normal((M, K)), wtype)
    outs = [b.mul_mat(b.input("x1", "f32", (1, K)), w),                # GEMV
            b.mul_mat(b.input("xr", "f32", (K,)), w),                  # GEMV, x of rank 1
            b.mul_mat(b.input("x9", "f32", (9, K)), w)]                # GEMM, 9 tokens -> 16
    if x_kinds:     # the activations' dtype and strides matter to act_to_half_t only
        outs += [b.mul_mat(b.input("x3", "f16", (3, K)), w),                # GEMM, f16 activations
                 b.mul_mat(b.transpose(b.input("xt", "f32", (K, 17))), w)]  # GEMM, strided activations
    graph = b.build(*outs)
    exe = adreno.compile(graph)
    assert templates_of(exe) == ["mul_mat_soa_gemv.cl.j2"] * 2 + \
        ["act_to_half_t.cl.j2", "mul_mat_soa_gemm.cl.j2"] * (len(outs) - 2)
    run_and_compare(exe, graph)


def test_emulated_half_rounding_is_a_conversion_to_half(adreno):
    """ember_round_half(8) (adreno.h, EMBER_FP16=0) gives the bits of a round trip through half."""
    import pyopencl as cl
    source = TEMPLATES.static_file("common.h") + TEMPLATES.static_file("adreno.h") + """
__kernel void round_trip(__global const float *x, __global float *scalar, __global float *vector) {
    const int i = get_global_id(0);
    scalar[i] = ember_round_half(x[i]);
    if (i % 8 == 0) vstore8(ember_round_half8(vload8(i / 8, x)), i / 8, vector);
}"""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.uniform(-9, 6, 4000),
                        [65504, 65519, 65520, -65520, 1e-8, 2.98e-8, 2.99e-8, 6.1e-5, 6.103e-5, 0, -0.0,
                         np.inf, -np.inf, np.nan, 1.5, 2049, 2051]]).astype(np.float32)
    x = np.concatenate([x, np.zeros(-len(x) % 8, np.float32)])
    ctx, queue = adreno.context, adreno.queue
    program = cl.Program(ctx, source).build("-DEMBER_FP16=0 -DEMBER_SUBGROUPS=0")
    mf = cl.mem_flags
    outs = [cl.Buffer(ctx, mf.WRITE_ONLY, x.nbytes) for _ in range(2)]
    program.round_trip(queue, (len(x),), None, cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x), *outs)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    for buf in outs:
        got = np.empty_like(x)
        cl.enqueue_copy(queue, got, buf)
        np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(x)], want.view(np.uint32)[~np.isnan(x)])
        assert np.isnan(got[np.isnan(x)]).all()


@pytest.mark.parametrize("wtype", ["q8_0", "q4_0"])
def test_one_weight_for_gemv_gemm_and_get_rows(adreno, wtype):
    """A weight re-laid out for one consumer must be read in that layout by all of them."""
    blocks = quantize(np.random.default_rng(7).standard_normal((128, 64)), wtype)

    def graph_of(name, *consumers):
        b = GraphBuilder(name)
        w = b.const("w", blocks, wtype, (128, 64))
        make = {"gemv": lambda: b.mul_mat(b.input("x1", "f32", (1, 64)), w),
                "gemm": lambda: b.mul_mat(b.input("x5", "f32", (5, 64)), w),
                "rows": lambda: b.get_rows(w, b.input("idx", "i32", (4,)))}
        return b.build(*[make[c]() for c in consumers])

    inputs = {"x1": np.ones((1, 64), np.float32), "x5": np.linspace(-1, 1, 320, dtype=np.float32).reshape(5, 64),
              "idx": np.array([127, 0, 5, 5], np.int32)}
    together = graph_of("together", "gemv", "gemm", "rows")
    exe = adreno.compile(together)
    assert len(exe.program.layouts) == 1
    # the program's graph says so in its types: the weight and all three consumers moved
    (w,) = [n for n in exe.program.graph.nodes if n.op == "const"]
    assert w.type.layout == "adreno_soa" and len(exe.program.graph.users[w]) == 3
    assert set(templates_of(exe)) == {"mul_mat_soa_gemv.cl.j2", "act_to_half_t.cl.j2", "mul_mat_soa_gemm.cl.j2",
                                      "get_rows_soa.cl.j2"}
    run_and_compare(exe, together, inputs)
    # A decode graph, then a prompt graph, then rows: the same upload of the weight serves all.
    uploads = adreno.weights.uploads
    for consumers in (("gemv",), ("gemm",), ("rows",), ("gemv",)):
        graph = graph_of("-".join(consumers), *consumers)
        used = {k: v for k, v in inputs.items() if k in {n.name for n in graph.inputs}}
        run_and_compare(adreno.compile(graph), graph, used)
    assert adreno.weights.uploads == uploads


def test_a_weight_also_read_another_way_keeps_its_blocks(adreno):
    b = GraphBuilder("mixed")
    w = b.weight("w", np.random.default_rng(8).standard_normal((64, 64)), "q8_0")
    graph = b.build(b.mul_mat(b.input("x", "f32", (1, 64)), w), b.cont(w))
    exe = adreno.compile(graph)
    assert exe.program.layouts == {} and "mul_mat.cl.j2" in templates_of(exe)
    assert exe.program.graph is graph      # refused: the graph is unchanged, the weight in rows
    run_and_compare(exe, graph, bound=1e-7)


@pytest.mark.parametrize("wtype", ["q4_0"])
def test_expert_weights_stay_in_rows_while_the_shared_expert_moves(adreno, wtype):
    """A MoE FFN: the 2-D shared-expert weights go to the SoA layout, the stacked [E, N, K] expert
    weights of mul_mat_id stay in rows (layout-adreno leaves them: no SoA kernel reads experts)
    and run on mul_mat.cl.j2's ids variant; the result matches NumPy."""
    shape = MoeShape(T=5)
    weights = moe_weights(shape)
    graph = build_moe_ffn(shape, weights, wtype)
    exe = adreno.compile(graph)
    consts = {n.name: n.type.layout for n in exe.program.graph.nodes if n.op == "const"}
    assert {k for k, v in consts.items() if v == "adreno_soa"} == {"sh_gate", "sh_up", "sh_down"}
    assert consts["gate"] == consts["up"] == consts["down"] == "row"
    assert "mul_mat_soa_gemm.cl.j2" in templates_of(exe) and "mul_mat.cl.j2" in templates_of(exe)
    x = np.random.default_rng(2).standard_normal((shape.T, shape.D)).astype(np.float32)
    (got,) = exe.run({"x": x})
    assert nmse(got, numpy_moe_ffn(shape, as_stored(weights, wtype), x)) <= QUANT_MATMUL


# ---- the conformance groups the profile changes ------------------------------------------------
# Groups whose kernels differ from the generic profile's: work-group sizes and reductions (rows,
# softmax, attention), float rope angles, and the SoA kernels (mul_mat, get_rows of Q8_0/Q4_0;
# the other weight types get the generic kernels, tested by the conformance suite).
ADRENO_GROUPS = ("rows", "softmax", "attention", "mul_mat_quant", "get_rows", "rope")
ADRENO_CASES = [c for c in CASES if c.group in ADRENO_GROUPS and
                (c.group not in ("mul_mat_quant", "get_rows") or c.id.split("/")[1][:4] in ("q8_0", "q4_0"))]


@pytest.mark.parametrize("c", ADRENO_CASES, ids=[c.id for c in ADRENO_CASES])
def test_conformance_on_the_emulated_profile(adreno, c):
    check(adreno, c)
