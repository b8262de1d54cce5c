from ember.ir.verifier import verify
from ember.passes import DeadCodeElimination, PassContext
from ember.testing import assert_allclose, assert_structural_equal, parse_ir, run_reference

BEFORE = """
graph g(%x: f32[4, 8], %unused: f32[2]) {
  %w = const "w" : f32[8]
  %0 = exp(%x)
  %1 = mul(%x, %w)
  %2 = tanh(%1)
  %3 = add(%0, %0)
  return %3
}
"""

EXPECTED = """
graph g(%x: f32[4, 8], %unused: f32[2]) {
  %0 = exp(%x)
  %3 = add(%0, %0)
  return %3
}
"""


def test_dce_removes_nodes_and_constants_no_output_needs():
    before = parse_ir(BEFORE)
    after = DeadCodeElimination()(before)
    verify(after)
    assert_structural_equal(after, parse_ir(EXPECTED))
    assert "w" not in after.constants
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))


def test_dce_keeps_unused_graph_inputs():
    after = DeadCodeElimination()(parse_ir(BEFORE))
    assert [n.name for n in after.inputs] == ["x", "unused"]


def test_dce_is_idempotent():
    once = DeadCodeElimination()(parse_ir(BEFORE))
    assert DeadCodeElimination()(once) is once


def test_dce_leaves_live_graph_alone():
    g = parse_ir(EXPECTED)
    assert DeadCodeElimination()(g) is g
    assert DeadCodeElimination()(g) == g


def test_dce_can_be_disabled_by_name():
    g = parse_ir(BEFORE)
    with PassContext(disabled={"dce"}):
        assert DeadCodeElimination()(g) is g
