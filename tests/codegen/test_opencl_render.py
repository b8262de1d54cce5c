"""The OpenCL renderer without a device: kernel comments, template strictness, kernel sharing,
the launch plan (JSON for artifacts), profiles and the Adreno device table, and the SoA weight
layout (which weights the profile's layout pass gives it, how the bytes move, that the renderer
reads it from the types and that no other kernel or profile may read it)."""
from __future__ import annotations

import json
import re

import jinja2
import numpy as np
import pytest

from ember.codegen import opencl, opencl_plan
from ember.codegen.opencl import compile_plan, layout_pass, render_graph, weight_layouts
from ember.codegen.opencl_plan import (ADRENO_GENERATIONS, WeightLayout, adreno_generation, adreno_profile,
                                       generic_profile, relayout_weight)
from ember.codegen.renderer import LOWERING
from ember.errors import EmberError
from ember.ir import GraphBuilder, dtypes
from ember.passes import LayoutAdreno
from ember.ir.quant import dequantize, quantize

SMALL_SOA = dict(soa_min_rows=4, soa_min_cols=32)


def laid_out(graph, profile):
    """graph as a target's pipeline hands it to the renderer: through the profile's layout pass."""
    layouts = layout_pass(profile)
    return layouts(graph) if layouts is not None else graph


def block_graph(name="block", layers=2):
    """A few identical layers: matmul, norm, activation, residual."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(name)
    x = b.input("x", "f32", (3, 64))
    for i in range(layers):
        h = b.rms_norm_mul(x, b.weight(f"n{i}", rng.standard_normal(64)), eps=1e-6)
        h = b.mul_mat(h, b.weight(f"w{i}", rng.standard_normal((64, 64)), "q8_0"))
        x = b.add(x, b.silu(h))
    return b.build(x)


def shared_weight_graph(wtype="q8_0", M=64, K=64):
    """One weight feeding a GEMV (one token), a GEMM (a prompt) and get_rows."""
    b = GraphBuilder("shared")
    w = b.weight("w", np.random.default_rng(1).standard_normal((M, K)), wtype)
    return b.build(b.mul_mat(b.input("x1", "f32", (1, K)), w), b.mul_mat(b.input("x5", "f32", (5, K)), w),
                   b.get_rows(w, b.input("idx", "i32", (3,))))


# ---- kernels and the program -------------------------------------------------------------------
def test_every_kernel_starts_with_a_comment_naming_its_template_and_parameters():
    program = render_graph(block_graph())
    lines = program.source.splitlines()
    for k in program.kernels:
        head = "\n".join(lines[k.first_line - 1:k.first_line + 1])
        assert head.startswith(f"/* {k.name}: first used by %"), head
        assert f"template {k.template}: " in head
        assert all(f"{p}=" in head for p in k.params), head
        assert f"void {k.name}(" in "\n".join(lines[k.first_line - 1:k.last_line])


def test_identical_layers_share_their_kernels():
    one, three = render_graph(block_graph(layers=1)), render_graph(block_graph(layers=3))
    assert len(three.kernels) == len(one.kernels)
    assert len(three.launches) == 3 * len(one.launches)


def test_templates_are_strict_about_parameters():
    with pytest.raises(jinja2.UndefinedError):
        opencl.TEMPLATES.render("eltwise.cl.j2", name="k", arity=1, expr="a", numel=4, a_off="0", b_off="0")


def test_every_template_is_used_by_some_op():
    used = {"eltwise", "copy", "rms_norm", "layer_norm", "sum_rows", "argmax", "softmax", "rope", "attention",
            "mul_mat", "get_rows", "set_rows", "ssm_conv", "ssm_scan", "gated_delta_net", "l2_norm",
            "mul_mat_soa_gemv", "mul_mat_soa_gemm", "act_to_half_t", "get_rows_soa", "mul_mat_tiled",
            "top_k", "take_along"}
    on_disk = {p.name.removesuffix(".cl.j2") for p in opencl.TEMPLATE_DIR.glob("*.cl.j2")}
    assert on_disk == used


def test_every_op_of_the_table_is_supported_by_the_renderer():
    from ember.ir.examples import example_node
    from ember.ir.ops import OPS
    for op, opdef in OPS.items():
        if opdef.category == "source":
            continue
        try:
            node = example_node(op)
        except Exception:      # an op without an example node yet: the renderer must still know it
            assert op in LOWERING or opdef.is_view, op
            continue
        assert opencl.supports_node(node) == (True, ""), op


def experts_graph(T, wtype="q4_0", K=64):
    b = GraphBuilder(f"experts{T}")
    w = b.weight("w", np.random.default_rng(0).standard_normal((5, 8, K)), wtype)
    return b.build(b.mul_mat_id(b.input("x", "f32", (T, K)), w, b.input("ids", "i32", (T, 3))))


# Every weight type, and float rows of K % 16 != 0 (the scalar path of mul_mat.cl.j2).
ID_CASES = [(d.name, 256 if d.block_size == 256 else 64) for d in dtypes.WEIGHT_TYPES] + \
    [(d.name, 72) for d in dtypes.WEIGHT_TYPES if not d.is_quantized]


@pytest.mark.parametrize("wtype, K", ID_CASES, ids=[f"{w}-K{k}" for w, k in ID_CASES])
def test_mul_mat_id_runs_the_same_kernel_for_one_token_and_for_a_batch(wtype, K):
    """mul_mat.cl.j2 with ids, one work item per (weight row, pair): the kernel text is the same
    whatever the number of tokens, so a token's rows are the bits it gets alone."""
    bodies = []
    for T in (1, 9):
        program = render_graph(experts_graph(T, wtype, K))
        (k,) = program.kernels
        assert k.params["vector"] == (K % 16 == 0)
        (launch,) = program.launches
        assert k.template == "mul_mat.cl.j2" and k.params["ids"] is True
        assert launch.global_size == (8, 1, T * 3)
        lines = program.source.splitlines()[k.first_line - 1:k.last_line]
        bodies.append(lines[next(i for i, line in enumerate(lines) if line.startswith("__kernel")):])
    assert bodies[0] == bodies[1]


def test_launch_plan_is_json_and_names_every_buffer():
    graph = shared_weight_graph()
    plan = compile_plan(laid_out(graph, adreno_profile(**SMALL_SOA)), adreno_profile(**SMALL_SOA))
    text = json.dumps(plan)
    again = json.loads(text)
    assert again["build_options"] == "-cl-std=CL2.0 -DEMBER_FP16=1 -DEMBER_SUBGROUPS=1 -cl-mad-enable"
    p = again["plan"]
    assert [c["layout"]["kind"] for c in p["constants"]] == ["soa"]
    kernels = {k["name"]: k for k in p["kernels"]}
    assert {k["template"] for k in kernels.values()} == {"mul_mat_soa_gemv.cl.j2", "act_to_half_t.cl.j2",
                                                          "mul_mat_soa_gemm.cl.j2", "get_rows_soa.cl.j2"}
    for launch in p["launches"]:
        assert launch["kernel"] in kernels
        assert all(g % s == 0 for g, s in zip(launch["global"], launch["local"] or launch["global"]))
        for arg in launch["args"]:
            if arg["kind"] in ("buffer", "image"):
                limit = {"in": len(p["inputs"]), "out": len(p["outputs"]), "const": len(p["constants"]),
                         "arena": 1}[arg["region"]]
                assert 0 <= arg["index"] < limit
    for k in kernels.values():
        assert f"void {k['name']}(" in plan["source"]


def test_compile_plan_accepts_profile_names():
    graph = block_graph()
    assert compile_plan(graph, "generic")["build_options"] == "-cl-std=CL1.2"
    with pytest.raises(EmberError, match="unknown OpenCL profile 'mali'"):
        compile_plan(graph, "mali")


def test_a_node_too_big_for_32_bit_offsets_is_unsupported():
    b = GraphBuilder("big")
    x = b.input("x", "f32", (2 ** 16, 2 ** 15 + 1))
    ok, reason = opencl.supports_node(b.neg(x))
    assert not ok and "2 GiB" in reason


# ---- profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, generation", [
    ("QUALCOMM Adreno(TM) 740", "a7xx"), ("Adreno (TM) 830", "a8xx"), ("QUALCOMM Adreno(TM) 650", "a6xx"),
    ("Qualcomm(R) Adreno(TM) X1-85 GPU", "x1"), ("pthread-haswell-AMD EPYC", None),
    ("Mali-G78", None), ("Adreno (TM) 512", None)])
def test_adreno_generation_from_the_device_name(name, generation):
    assert adreno_generation(name) == generation


def test_profiles_take_their_launch_shapes_from_the_generation_table():
    for name, gen in ADRENO_GENERATIONS.items():
        p = adreno_profile(name)
        assert (p.row_wg, p.gemv_local, p.gemm_local) == (gen.row_wg, gen.gemv_local, gen.gemm_local)
        assert p.fp16 and p.subgroups and not p.fp64
    emulated = adreno_profile("a6xx", emulated=True)
    assert not emulated.fp16 and not emulated.subgroups and emulated.cl_std == "CL1.2"
    assert "-DEMBER_FP16=0 -DEMBER_SUBGROUPS=0" in emulated.build_options
    assert generic_profile().build_options == "-cl-std=CL1.2"
    with pytest.raises(EmberError, match="unknown Adreno generation"):
        adreno_profile("a5xx")


def test_subgroup_reductions_only_with_native_subgroups():
    graph = block_graph(layers=1)
    native = render_graph(laid_out(graph, adreno_profile()), adreno_profile())
    emulated = render_graph(laid_out(graph, adreno_profile(emulated=True)), adreno_profile(emulated=True))
    assert "sub_group_reduce_add" in native.source and "sub_group_reduce_add" not in emulated.source
    assert "#pragma OPENCL EXTENSION cl_khr_fp16" in native.source   # guarded by EMBER_FP16 in adreno.h
    generic = render_graph(graph).source
    assert "sub_group" not in generic and "cl_khr_fp16" not in generic


def test_generic_rope_uses_double_only_with_fp64():
    b = GraphBuilder("rope")
    graph = b.build(b.rope(b.input("x", "f32", (2, 2, 8)), b.input("pos", "i32", (2,))))
    assert "__constant double" in render_graph(graph, generic_profile(fp64=True)).source
    source = render_graph(graph, generic_profile(fp64=False)).source
    assert "double" not in source and "__constant float" in source


# ---- the SoA layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("wtype", ["q8_0", "q4_0"])
def test_relayout_moves_bytes_not_values(wtype):
    M, K = 8, 96
    values = np.random.default_rng(2).standard_normal((M, K)).astype(np.float32)
    blocks = quantize(values, wtype)
    parts = relayout_weight(blocks, WeightLayout("soa", wtype, M, K))
    per_u32 = opencl_plan.SOA_DTYPES[wtype]
    assert parts["q"].shape == (K // per_u32, M) and parts["d"].shape == (K // 32, M)
    # back to blocks: transpose, then interleave scales and quants again
    q = np.ascontiguousarray(parts["q"].T).view(np.uint8).reshape(M, K // 32, -1)
    d = np.ascontiguousarray(parts["d"].T).view(np.uint8).reshape(M, K // 32, 2)
    rebuilt = np.concatenate([d, q], axis=2).reshape(M, -1)
    np.testing.assert_array_equal(rebuilt, blocks)
    np.testing.assert_array_equal(dequantize(rebuilt, wtype), dequantize(blocks, wtype))
    # the same parts from the packed storage the layout pass keeps in the graph
    b = GraphBuilder("w")
    w = b.const("w", blocks, wtype, (M, K))
    packed = LayoutAdreno(min_rows=4, min_cols=32)(b.build(b.mul_mat(b.input("x", "f32", (1, K)), w)))
    assert packed.constants["w"].shape == (blocks.nbytes,)
    for name, part in relayout_weight(packed.constants["w"], WeightLayout("soa", wtype, M, K)).items():
        np.testing.assert_array_equal(part, parts[name])


def test_weight_feeding_gemv_gemm_and_get_rows_is_laid_out_for_all_of_them():
    program = render_graph(laid_out(shared_weight_graph(), adreno_profile(**SMALL_SOA)), adreno_profile(**SMALL_SOA))
    assert list(program.layouts.values()) == [WeightLayout("soa", "q8_0", 64, 64)]
    templates = [next(k.template for k in program.kernels if k.name == launch.kernel) for launch in program.launches]
    assert templates == ["mul_mat_soa_gemv.cl.j2", "act_to_half_t.cl.j2", "mul_mat_soa_gemm.cl.j2",
                         "get_rows_soa.cl.j2"]


def test_a_weight_with_any_other_consumer_keeps_the_block_layout():
    b = GraphBuilder("mixed")
    w = b.weight("w", np.random.default_rng(1).standard_normal((64, 64)), "q8_0")
    half = b.view(w, shape=(32, 64), strides=(w.type.strides[0], 34), offset=0)
    graph = b.build(b.mul_mat(b.input("x", "f32", (1, 64)), w), b.mul_mat(b.input("y", "f32", (1, 64)), half))
    profile = adreno_profile(**SMALL_SOA)
    assert layout_pass(profile)(graph) is graph
    assert {k.template for k in render_graph(laid_out(graph, profile), profile).kernels} == {"mul_mat.cl.j2"}


@pytest.mark.parametrize("why, shape, wtype, x_shape, options", [
    ("too small", (64, 64), "q8_0", (1, 64), {}),
    ("rows not a multiple of 4", (66, 64), "q8_0", (1, 64), SMALL_SOA),
    ("not q8_0/q4_0", (64, 64), "q5_0", (1, 64), SMALL_SOA),
    ("batched activations", (64, 64), "q8_0", (2, 3, 64), SMALL_SOA),
    ("over the image limit", (64, 64), "q8_0", (1, 64), dict(SMALL_SOA, max_image_texels=512)),
])
def test_weights_that_keep_the_block_layout(why, shape, wtype, x_shape, options):
    b = GraphBuilder("keep")
    w = b.weight("w", np.random.default_rng(1).standard_normal(shape), wtype)
    graph = b.build(b.mul_mat(b.input("x", "f32", x_shape), w))
    assert layout_pass(adreno_profile(**options))(graph) is graph, why
    assert layout_pass(generic_profile()) is None     # the generic profile lays nothing out
    assert weight_layouts(render_graph(laid_out(graph, adreno_profile(**options)), adreno_profile(**options)).graph) == {}


def test_the_renderer_refuses_a_plain_kernel_on_a_re_laid_out_weight():
    profile = adreno_profile(**SMALL_SOA)
    graph = layout_pass(profile)(shared_weight_graph())
    w = graph.outputs[2].inputs[0]
    assert w.type.layout == "adreno_soa"
    # a kernel that knows only the block layout asks for the weight's buffer: refused
    renderer = opencl.OpenCLRenderer(graph, profile)
    renderer.assign_places()
    with pytest.raises(EmberError, match=r"reads a weight in the adreno_soa layout through a kernel that does not know"):
        renderer.buf(w)


def test_the_renderer_reads_layouts_from_the_types_and_decides_none():
    laid_out = LayoutAdreno(min_rows=4, min_cols=32)(shared_weight_graph())
    # the profile's own thresholds would leave this 64 x 64 weight alone: the type decides
    program = render_graph(laid_out, adreno_profile())
    assert list(program.layouts.values()) == [WeightLayout("soa", "q8_0", 64, 64)]
    assert program.graph is laid_out


def test_the_generic_profile_refuses_a_re_laid_out_weight_naming_node_and_layout():
    laid_out = LayoutAdreno(min_rows=4, min_cols=32)(shared_weight_graph())
    with pytest.raises(EmberError, match=r"opencl: %0 \(mul_mat : f32\[1, 64\]\): operand 1 \(%w\) is in "
                                         r"layout adreno_soa: the generic profile reads only the layouts row"):
        render_graph(laid_out, generic_profile())


def test_an_soa_weight_under_batched_activations_is_refused():
    """The IR allows it (mul_mat accepts the layout), the Adreno kernels do not: a clear error."""
    laid_out = LayoutAdreno(min_rows=4, min_cols=32)(shared_weight_graph())
    w = laid_out.outputs[0].inputs[1]
    b = GraphBuilder("batched")
    b.constants["w"] = laid_out.constants["w"]
    batched = b.build(b.mul_mat(b.input("x", "f32", (2, 3, 64)), w))
    with pytest.raises(EmberError, match=r"operand 1 \(%w\) is in layout adreno_soa: no Adreno kernel"):
        render_graph(batched, adreno_profile())


def test_soa_kernels_index_the_transposed_layout():
    program = render_graph(laid_out(shared_weight_graph(M=68, K=96), adreno_profile(**SMALL_SOA)), adreno_profile(**SMALL_SOA))
    gemv = next(k for k in program.kernels if k.template == "mul_mat_soa_gemv.cl.j2")
    text = "\n".join(program.source.splitlines()[gemv.first_line - 1:gemv.last_line])
    assert "read_imageui(wq, (kb * 8 + w4) * 68 + rowc)" in text       # quants: [K/4][M]
    assert "EMBER_H_LOAD(kb * 68 + rowc, wd)" in text                    # scales: [K/32][M]
    assert re.search(r"qcom_reqd_sub_group_size|EMBER_REQD_SUBGROUP\(\"half\"\)", text)


@pytest.mark.parametrize("value, kind, literal", [
    (float("inf"), "float", "INFINITY"), (-float("inf"), "double", "(-INFINITY)"),
    (float("nan"), "f32", "NAN"), (1e300, "f32", "INFINITY"), (0.5, "f32", "0.5f"),
    (0.5, "float", "((float)0.5)"), (0.1, "double", "0.1"),
], ids=["inf-float", "minus-inf-double", "nan-f32", "beyond-f32", "half-f32", "half-float", "tenth-double"])
def test_every_float_is_a_c_literal(value, kind, literal):
    """Issue 16: `inf` once reached generated C and OpenCL C; every renderer writes floats
    through c_literal, which gives the NAN / INFINITY macros for non-finite values."""
    from ember.codegen.opencl import cl_real
    from ember.codegen.renderer import c_literal
    assert c_literal(value, kind) == literal
    if kind != "float":
        assert cl_real(value, fp64=kind == "double") == literal
