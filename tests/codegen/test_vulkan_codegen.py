"""The Vulkan renderer without a device: every template renders and compiles to valid SPIR-V
(glslc + spirv-val, skipped where they are missing), header comments, StrictUndefined, launch
plans, bindings split for big weights, the SPIR-V cache and compile errors."""
from __future__ import annotations

import dataclasses
import json
import shutil

import jinja2
import numpy as np
import pytest


from ember.backends.vulkan.compiler import SpirvCache, export_graph, validate_spirv
from ember.codegen.vulkan import all_variants, kernel_templates, render_graph, render_shader, supports_node
from ember.codegen.vulkan_plan import BASELINE_CAPS, PLAN_FORMAT, DeviceCaps
from ember.errors import CompileError, EmberError
from ember.ir import GraphBuilder, dtypes
from ember.ir.examples import example_node
from ember.ir.ops import OPS

LAVAPIPE = DeviceCaps("lavapipe-like", storage8=True, storage16=True, subgroup_size=8, texel_buffers=True,
                      max_texel_bytes=1 << 29)
needs_glslc = pytest.mark.skipif(shutil.which("glslc") is None or shutil.which("spirv-val") is None,
                                 reason="glslc and spirv-val are not installed")


@pytest.fixture(scope="module")
def spirv_cache(tmp_path_factory):
    return SpirvCache(tmp_path_factory.mktemp("spirv"))


def small_graph(name="small", rows=8):
    rng = np.random.default_rng(0)
    b = GraphBuilder(name)
    x = b.input("x", "f32", (3, 64))
    idx = b.input("idx", "i32", (2,))
    w = b.weight("w", rng.standard_normal((rows, 64)), "q8_0")
    return b.build([b.silu(b.mul_mat(x, w)), b.get_rows(w, idx)])


# ---- templates ---------------------------------------------------------------------------------
def test_every_template_has_a_variant():
    used = {s.template for s in all_variants(LAVAPIPE)}
    assert used == set(kernel_templates())


def test_every_op_of_the_table_has_a_kernel():
    checked = 0
    for name, op in OPS.items():
        if op.category in ("source", "view"):
            continue
        try:
            node = example_node(name)
        except Exception:   # noqa: BLE001 - ops without an example are covered by the conformance suite
            continue
        assert supports_node(node, LAVAPIPE) == (True, ""), name
        assert supports_node(node, BASELINE_CAPS) == (True, ""), name
        checked += 1
    assert checked > 30


@pytest.mark.parametrize("caps", [LAVAPIPE, BASELINE_CAPS], ids=["device", "baseline"])
def test_shader_starts_with_its_template_and_parameters(caps):
    for shader in all_variants(caps):
        first, second = shader.source.splitlines()[:2]
        assert first == f"// ember vulkan kernel: template {shader.template}"
        for name, value in shader.params:
            assert f"{name}={value}" in second
        assert "#version 450" in shader.source


def test_missing_parameter_is_an_error_not_an_empty_string():
    with pytest.raises(jinja2.UndefinedError, match="per_thread"):
        render_shader("eltwise.comp.j2", dict(wg=64, storage8=True, storage16=True, subgroup=0, op="exp",
                                              arity=1, expr="exp(a)"), [("n", "uint")], 2)


def test_baseline_shaders_need_no_8_or_16_bit_storage_nor_subgroups():
    for shader in all_variants(BASELINE_CAPS):
        for needle in ("uint8_t", "uint16_t", "subgroupAdd", "usamplerBuffer"):
            assert needle not in shader.source, (shader.describe(), needle)


@needs_glslc
def test_every_variant_compiles_to_valid_spirv(spirv_cache):
    shaders = all_variants(LAVAPIPE)
    for shader, blob in zip(shaders, spirv_cache.compile(shaders)):
        ok, message = validate_spirv(blob)
        assert ok, f"{shader.describe()}: {message}"


@needs_glslc
@pytest.mark.slow
def test_every_baseline_variant_compiles_to_valid_spirv(spirv_cache):
    shaders = all_variants(BASELINE_CAPS)
    for shader, blob in zip(shaders, spirv_cache.compile(shaders)):
        ok, message = validate_spirv(blob)
        assert ok, f"{shader.describe()}: {message}"


# ---- programs ----------------------------------------------------------------------------------
def test_launch_plan_is_json_and_names_every_shader():
    program = render_graph(small_graph(), LAVAPIPE)
    plan = json.loads(json.dumps(program.launch_plan()))
    assert plan["format"] == PLAN_FORMAT
    assert [d["shader"] for d in plan["dispatches"]] == [d.shader for d in program.dispatches]
    assert {s["sha256"] for s in plan["shaders"]} == {s.sha256 for s in program.shaders}
    for d in plan["dispatches"]:
        for region, index, offset, size, kind in d["bindings"]:
            assert offset % LAVAPIPE.offset_alignment == 0 and size % 4 == 0
            assert kind in ("storage", "texel")
    # mul_mat -> silu reads what mul_mat wrote: a barrier; get_rows touches neither
    assert [(d.op, d.barrier) for d in program.dispatches] == [("mul_mat", False), ("silu", True),
                                                               ("get_rows", False)]


def test_same_op_at_other_shapes_shares_its_shader():
    b = GraphBuilder("shapes")
    x, y = b.input("x", "f32", (3, 17)), b.input("y", "f32", (5, 2, 9))
    program = render_graph(b.build([b.exp(x), b.exp(y)]), LAVAPIPE)
    assert len(program.dispatches) == 2 and len(program.shaders) == 1


def test_big_weight_is_bound_in_row_ranges():
    caps = DeviceCaps("small", max_storage_range=4096)       # 68-byte q8_0 rows: 60 rows a binding
    program = render_graph(small_graph("big", rows=300), caps)
    mm = [d for d in program.dispatches if d.op == "mul_mat"]
    gr = [d for d in program.dispatches if d.op == "get_rows"]
    assert len(mm) > 1 and len(gr) > 1
    for d in mm + gr:
        assert all(b.size <= 4096 for b in d.bindings)
    # the ranges cover every row once
    w_bindings = sorted((d.bindings[1].offset, d.bindings[1].size) for d in mm)
    assert w_bindings[0][0] == 0 and sum(size for _, size in w_bindings) >= 300 * 68


def test_operand_too_big_for_any_binding_is_unsupported():
    b = GraphBuilder("huge")
    x = b.input("x", "f32", (2048,))
    node = b.exp(x)
    ok, reason = supports_node(node, DeviceCaps("tiny", max_storage_range=1024))
    assert not ok and "maxStorageBufferRange" in reason


def experts_graph(E=4, N=8, K=64, wtype="q8_0", T=3):
    b = GraphBuilder("experts")
    w = b.weight("w", np.random.default_rng(0).standard_normal((E, N, K)), wtype)
    return b.build(b.mul_mat_id(b.input("x", "f32", (T, K)), w, b.input("ids", "i32", (T, 2))))


# Every weight type in whole chunks of 32 (the chunked kernel), and float rows that are not (the
# generic kernel).
ID_CASES = [(d.name, 256 if d.block_size == 256 else 64) for d in dtypes.WEIGHT_TYPES] + \
    [(d.name, 80) for d in dtypes.WEIGHT_TYPES if not d.is_quantized]


@pytest.mark.parametrize("wtype, K", ID_CASES, ids=[f"{w}-K{k}" for w, k in ID_CASES])
def test_mul_mat_id_runs_the_same_shader_for_one_token_and_for_a_batch(wtype, K):
    """One token and a batch of 9 run the same shader with the same push constants but the
    token count: a token's rows are the bits it gets alone."""
    seen = []
    for T in (1, 9):
        program = render_graph(experts_graph(K=K, wtype=wtype, T=T), LAVAPIPE)
        (d,) = program.dispatches
        shader = program.shaders[d.shader]
        push = dict(zip((n for n, _ in shader.push_fields), np.frombuffer(d.push, np.uint32)))
        assert push.pop("ne3") == T
        assert shader.template == ("mul_mat.comp.j2" if K % 32 else "mul_mat_chunked.comp.j2")
        seen.append((shader.source, push))
    assert seen[0] == seen[1]


def test_experts_are_one_dispatch_of_the_mul_mat_kernel_with_ids():
    program = render_graph(experts_graph(), LAVAPIPE)
    (d,) = program.dispatches
    shader = program.shaders[d.shader]
    assert shader.template == "mul_mat_chunked.comp.j2" and dict(shader.params)["ids"] is True
    assert d.bindings[1].kind == "texel" and len(d.bindings) == 5     # x, w, y, ids, status
    assert d.groups == (-(-8 // dict(shader.params)["rows"]) * 3 * 2, 1, 1)   # row groups x pairs


def test_experts_over_one_texel_binding_are_read_through_a_storage_binding():
    caps = dataclasses.replace(LAVAPIPE, max_texel_bytes=1024)    # 4 x 8 rows of 68 bytes: more
    (d,) = render_graph(experts_graph(), caps).dispatches
    assert d.bindings[1].kind == "storage"


def test_experts_over_one_storage_binding_are_unsupported():
    ok, reason = supports_node(experts_graph().outputs[0], DeviceCaps("small", max_storage_range=1024))
    assert not ok and "operand 1" in reason and "maxStorageBufferRange" in reason


# ---- SPIR-V cache and errors -------------------------------------------------------------------
@needs_glslc
def test_spirv_cache_hits_and_rebuilds_a_corrupt_entry(tmp_path):
    cache = SpirvCache(tmp_path)
    shader = all_variants(LAVAPIPE)[0]
    first = cache.compile([shader])[0]
    assert (cache.builds, cache.hits) == (1, 0)
    assert cache.compile([shader])[0] == first and cache.hits == 1
    path = cache.path(cache.key(shader))
    path.write_bytes(b"\x03\x02\x23\x07" + bytes(40))           # SPIR-V magic, wrong bytes
    assert cache.compile([shader])[0] == first
    assert cache.builds == 2
    assert not list(tmp_path.rglob(".build-*")), "temporary build folders are removed"


@needs_glslc
def test_compile_error_names_template_parameters_and_glslc_message(tmp_path):
    good = all_variants(LAVAPIPE)[0]
    broken = type(good)(good.template, good.params, good.source.replace("void main()", "void main() { oops; }\nvoid unused()"),
                        good.binding_kinds, good.push_fields)
    with pytest.raises(CompileError) as e:
        SpirvCache(tmp_path).compile([good, broken])
    message = str(e.value)
    assert good.template in message and "expr=" in message and "oops" in message


@needs_glslc
def test_export_gives_spirv_blobs_and_a_plan_naming_them(spirv_cache):
    blobs, plan = export_graph(small_graph("export"), LAVAPIPE, spirv_cache)
    json.dumps(plan)
    for shader in plan["shaders"]:
        assert blobs[shader["file"]].startswith(b"\x03\x02\x23\x07")
    assert all(f.startswith(("spirv/", "aux/")) for f in blobs)


def test_push_constants_beyond_the_device_limit_are_an_error():
    with pytest.raises(EmberError, match="push constants"):
        render_graph(small_graph("bad"), DeviceCaps("pushless", push_bytes=16))


def _gdn_sequences(state_layout: str):
    """gated_delta_net over 2 sequences of 3 tokens; v's sequences one after another, or
    interleaved (a transpose of its sequence and token axes)."""
    b = GraphBuilder("gdn_seqs")
    q, k = b.input("q", "f32", (2, 3, 1, 16)), b.input("k", "f32", (2, 3, 1, 16))
    if state_layout == "contiguous":
        v = b.input("v", "f32", (2, 3, 2, 8))
    else:
        v = b.permute(b.input("v", "f32", (3, 2, 2, 8)), 1, 0, 2, 3)
    g, beta = b.input("g", "f32", (2, 3, 2)), b.input("beta", "f32", (2, 3, 2))
    state = b.input("state", "f32", (2, 2, 8, 16))
    return b.build([b.gated_delta_net(q, k, v, g, beta, state, scale=0.25)])


def test_gated_delta_net_sequences_share_the_one_sequence_shader():
    """N rides in the push constants: two sequences run the shader of one (the decode path's)."""
    b = GraphBuilder("gdn_one")
    q, k = b.input("q", "f32", (1, 1, 16)), b.input("k", "f32", (1, 1, 16))
    v, g, beta = b.input("v", "f32", (1, 2, 8)), b.input("g", "f32", (1, 2)), b.input("beta", "f32", (1, 2))
    one = render_graph(b.build([b.gated_delta_net(q, k, v, g, beta, b.input("s", "f32", (2, 8, 16)), scale=0.25)]),
                       LAVAPIPE)
    two = render_graph(_gdn_sequences("contiguous"), LAVAPIPE)
    assert [s.sha256 for s in two.shaders] == [s.sha256 for s in one.shaders]
    assert [d.op for d in two.dispatches] == ["gated_delta_net"]


def test_gated_delta_net_interleaved_sequences_are_refused_in_one_line():
    with pytest.raises(EmberError, match=r"gated_delta_net: an operand \[2, 3, 2, 8\] .* does not lay its "
                                         r"sequences out one after another"):
        render_graph(_gdn_sequences("interleaved"), LAVAPIPE)
