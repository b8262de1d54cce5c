"""Issue #4 section 4: one weight feeding both a GEMV (one token) and a GEMM (a prompt) gives
correct results on every backend, after that target's own pipeline (on opencl-adreno the weight
is re-laid out into the Adreno SoA layout, and both consumers must read it so: the SYCL reorder
bug of llama.cpp's SYCL Q8_0 reorder). Backends not available here are skipped."""
from __future__ import annotations

import numpy as np
import pytest

from ember.backends import get_backend
from ember.errors import BackendUnavailable
from ember.ir import GraphBuilder
from ember.ir.interpreter import random_inputs, run_reference
from ember.ir.verifier import verify
from ember.passes import PassContext, pipeline_for
from ember.testing import nmse

QUANT_MATMUL = 1e-3    # quantized weights; activations quantized to 8 bits (cpu) or rounded to half

# (id, backend name, backend options, pipeline)
TARGETS = [
    ("cpu", "cpu", {}, "cpu"),
    ("opencl-generic", "opencl", {"profile": "generic"}, "opencl-generic"),
    ("opencl-adreno-emulated", "opencl", {"profile": "adreno-emulated"}, "opencl-adreno"),
    ("vulkan", "vulkan", {}, "vulkan"),
]


def backend_or_skip(name, options):
    try:
        backend = get_backend(name, **options)
        ok, why = backend.available()
    except BackendUnavailable as e:
        ok, why = False, str(e)
    if not ok:
        pytest.skip(f"{name} {options}: unavailable: {why}")
    return backend


def gemv_and_gemm(wtype: str, M: int = 512, K: int = 512) -> object:
    """Big enough for the Adreno pipeline's thresholds (512 x 512), so its layout pass acts."""
    b = GraphBuilder(f"gemv_gemm_{wtype}")
    w = b.weight("w", np.random.default_rng(3).standard_normal((M, K)), wtype)
    return b.build(b.mul_mat(b.input("x1", "f32", (1, K)), w),      # one token: GEMV
                   b.mul_mat(b.input("x32", "f32", (32, K)), w))    # a prompt: GEMM


@pytest.mark.filterwarnings("ignore::Warning")
@pytest.mark.parametrize("wtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("target, name, options, pipeline", TARGETS, ids=[t[0] for t in TARGETS])
def test_one_weight_for_gemv_and_gemm_on_every_backend(target, name, options, pipeline, wtype):
    backend = backend_or_skip(name, options)
    graph = gemv_and_gemm(wtype)
    with PassContext(verify=True):
        optimized = pipeline_for(pipeline)(graph)
    verify(optimized)
    w_layouts = {mm.inputs[1].type.layout for mm in optimized.outputs}
    assert w_layouts == ({"adreno_soa"} if pipeline == "opencl-adreno" else {"row"})
    exe = backend.compile(optimized)
    if pipeline == "opencl-adreno":
        templates = {k.name: k.template for k in exe.program.kernels}
        used = [templates[launch.kernel] for launch in exe.program.launches]
        assert used == ["mul_mat_soa_gemv.cl.j2", "act_to_half_t.cl.j2", "mul_mat_soa_gemm.cl.j2"]
    inputs = random_inputs(graph, seed=5)
    # Compared with the reference on the original graph: the layout changes no value.
    for i, (got, want) in enumerate(zip(exe.run(inputs), run_reference(graph, inputs))):
        err = nmse(got, want)
        assert err <= QUANT_MATMUL, f"{target} {wtype} output {i}: NMSE {err:.3g}"


@pytest.mark.parametrize("name", ["cpu", "vulkan"])
def test_row_only_backends_refuse_an_soa_weight(name):
    """A graph laid out for Adreno handed to a backend without SoA kernels is refused with the
    node, operand and layout named, never computed from misread bytes."""
    backend = backend_or_skip(name, {})
    optimized = pipeline_for("opencl-adreno")(gemv_and_gemm("q8_0"))
    with pytest.raises(Exception, match="layout adreno_soa"):
        backend.compile(optimized)
