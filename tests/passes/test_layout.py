"""layout-adreno: which weights get the adreno_soa layout, that every consumer moves with them
(or none does), and that the result prints, parses, verifies and computes as before."""
import subprocess
import sys

import numpy as np
import pytest

from ember.ir import GraphBuilder
from ember.ir.dtypes import dtype
from ember.ir.layouts import get_layout
from ember.ir.parser import parse_ir
from ember.ir.printer import print_ir
from ember.ir.verifier import verify
from ember.passes import LayoutAdreno, pipeline_for
from ember.passes.pipelines import TARGETS
from ember.testing import assert_allclose, assert_structural_equal, run_reference

SMALL = LayoutAdreno(min_rows=4, min_cols=32)

# A tied embedding: one weight read by get_rows (the token embedding), a GEMV (decode) and a
# GEMM (prompt) of the output head.
BEFORE = """
graph tied(%tok: i32[3], %x1: f32[1, 64], %x5: f32[5, 64]) {
  %w = const "w" : q8_0[8, 64]
  %0 = get_rows(%w, %tok)
  %1 = mul_mat(%x1, %w)
  %2 = mul_mat(%x5, %w)
  return %0, %1, %2
}
"""

# The packed data of "w" is what parse_ir draws for it: the same values as BEFORE's, packed.
EXPECTED = """
graph tied(%tok: i32[3], %x1: f32[1, 64], %x5: f32[5, 64]) {
  %w = const "w" : q8_0[8, 64]{adreno_soa}
  %0 = get_rows(%w, %tok)
  %1 = mul_mat(%x1, %w)
  %2 = mul_mat(%x5, %w)
  return %0, %1, %2
}
"""


def test_layout_adreno_moves_a_weight_and_all_its_consumers():
    before = parse_ir(BEFORE)
    after = SMALL(before)
    verify(after)
    expected = parse_ir(EXPECTED)
    assert_structural_equal(after, expected)
    np.testing.assert_array_equal(after.constants["w"], expected.constants["w"])
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0), rtol=0, atol=0)


def test_layout_adreno_moves_bytes_not_values():
    before = parse_ir(BEFORE)
    packed = SMALL(before).constants["w"]
    row = before.constants["w"]
    assert packed.dtype == np.uint8 and packed.shape == (row.nbytes,)
    assert sorted(packed.tolist()) == sorted(row.reshape(-1).tolist())


def test_layout_adreno_is_idempotent():
    once = SMALL(parse_ir(BEFORE))
    assert SMALL(once) is once


def test_layout_adreno_packs_a_weight_once_for_every_graph():
    """Step graphs of one model share the packed array, so a backend uploads it once."""
    blocks = parse_ir(BEFORE).constants["w"]

    def graph_of(T):
        b = GraphBuilder(f"t{T}")
        w = b.const("w", blocks, "q8_0", (8, 64))
        return b.build(b.mul_mat(b.input("x", "f32", (T, 64)), w))

    assert SMALL(graph_of(1)).constants["w"] is SMALL(graph_of(32)).constants["w"]


def test_layout_adreno_runs_last_in_the_adreno_pipeline_only():
    assert pipeline_for("opencl-adreno").phases[-1].passes == (LayoutAdreno(),)
    for target in TARGETS:
        if target != "opencl-adreno":
            assert "layout-adreno" not in [p.name for p in pipeline_for(target).passes], target


def test_the_adreno_pipeline_lays_out_a_big_weight():
    text = BEFORE.replace("q8_0[8, 64]", "q4_0[512, 512]").replace(", 64]", ", 512]")
    before = parse_ir(text)
    after = pipeline_for("opencl-adreno")(before)
    verify(after)
    assert after.outputs[1].inputs[1].type.layout == "adreno_soa"
    assert_allclose(run_reference(before, seed=1), run_reference(after, seed=1), rtol=0, atol=0)
    assert pipeline_for("opencl-generic")(before).outputs[1].inputs[1].type.layout == "row"


# ---- refusals: the graph is returned unchanged --------------------------------------------------
def one_consumer(wtype="q8_0", shape=(8, 64), x_shape=(1, 64)):
    return f"""
graph g(%x: f32[{', '.join(map(str, x_shape))}]) {{
  %w = const "w" : {wtype}[{', '.join(map(str, shape))}]
  %0 = mul_mat(%x, %w)
  return %0
}}
"""


@pytest.mark.parametrize("why, text, pass_", [
    ("too small for the default thresholds", one_consumer(), LayoutAdreno()),
    ("rows not a multiple of 4", one_consumer(shape=(6, 64), x_shape=(1, 64)), SMALL),
    ("not q8_0/q4_0", one_consumer("q5_0"), SMALL),
    ("not quantized", one_consumer("f16"), SMALL),
    ("batched activations: no SoA kernel", one_consumer(x_shape=(2, 3, 64)), SMALL),
    ("over the image limit", one_consumer(), LayoutAdreno(min_rows=4, min_cols=32, max_texels=64)),
    ("also copied: cont reads only rows", """
graph g(%x: f32[1, 64]) {
  %w = const "w" : q8_0[8, 64]
  %0 = mul_mat(%x, %w)
  %1 = cont(%w)
  return %0, %1
}
""", SMALL),
    ("also viewed", """
graph g(%x: f32[1, 64]) {
  %w = const "w" : q8_0[8, 64]
  %0 = mul_mat(%x, %w)
  %1 = view(%w, shape=[4, 64], strides=[68, 34])
  %2 = mul_mat(%x, %1)
  return %0, %2
}
""", SMALL),
    ("experts of mul_mat_id: 3-D, read as rows", """
graph g(%x: f32[2, 64], %ids: i32[2, 2]) {
  %w = const "w" : q8_0[4, 8, 64]
  %0 = mul_mat_id(%x, %w, %ids)
  return %0
}
""", SMALL),
    ("a graph output", """
graph g(%x: f32[1, 64]) {
  %w = const "w" : q8_0[8, 64]
  %0 = mul_mat(%x, %w)
  return %0, %w
}
""", SMALL),
])
def test_layout_adreno_refuses(why, text, pass_):
    g = parse_ir(text)
    assert pass_(g) is g, why


def test_a_refused_weight_stays_in_rows_while_another_moves():
    g = parse_ir("""
graph g(%x: f32[1, 64]) {
  %a = const "a" : q8_0[8, 64]
  %b = const "b" : q8_0[8, 64]
  %0 = mul_mat(%x, %a)
  %1 = mul_mat(%x, %b)
  %2 = cont(%b)
  return %0, %1, %2
}
""")
    after = SMALL(g)
    verify(after)
    layouts = {n.name: n.type.layout for n in after.nodes if n.op == "const"}
    assert layouts == {"a": "adreno_soa", "b": "row"}
    assert_allclose(run_reference(g), run_reference(after), rtol=0, atol=0)


# ---- `ember passes` prints a graph with layouts that parses back --------------------------------
def test_ember_passes_output_with_layouts_round_trips(tmp_path):
    text = BEFORE.replace("q8_0[8, 64]", "q8_0[512, 512]").replace(", 64]", ", 512]")
    path = tmp_path / "tied.ir"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "ember.cli", "passes", str(path), "--target", "opencl-adreno"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'const "w" : q8_0[512, 512]{adreno_soa}' in out.stdout
    printed = parse_ir(out.stdout)
    assert print_ir(printed) == out.stdout
    want = pipeline_for("opencl-adreno")(parse_ir(text))
    assert_structural_equal(printed, want)
    np.testing.assert_array_equal(printed.constants["w"], want.constants["w"])


NEW_WTYPES = ("q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4")


@pytest.mark.parametrize("wtype", NEW_WTYPES)
def test_layout_adreno_leaves_the_other_weight_formats_in_rows(wtype):
    """No Adreno SoA form for these (llama.cpp has none either): the layout names the type it
    refuses, the pass leaves the weight in rows, and the OpenCL row kernels read it."""
    K = 256 if dtype(wtype).block_size == 256 else 512
    assert wtype in get_layout("adreno_soa").problem(dtype(wtype), (512, K))
    before = parse_ir(one_consumer(wtype, shape=(512, K), x_shape=(1, K)))
    assert LayoutAdreno(min_rows=4, min_cols=32)(before) is before
    assert pipeline_for("opencl-adreno")(before).outputs[0].inputs[1].type.layout == "row"
