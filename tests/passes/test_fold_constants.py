import numpy as np

from ember.ir.verifier import verify
from ember.passes import DeadCodeElimination, FoldConstants
from ember.testing import assert_allclose, assert_structural_equal, parse_ir, run_reference

FOLD = FoldConstants()

BEFORE = """
graph g(%x: f32[4, 32]) {
  %w = const "w" : f32[32]
  %one = const [1.0] : f32[1]
  %0 = exp(%w)
  %1 = add(%0, %one)
  %2 = mul(%x, %1)
  return %2
}
"""

EXPECTED = """
graph g(%x: f32[4, 32]) {
  %folded.add.0 = const "folded.add.0" : f32[32]
  %0 = mul(%x, %folded.add.0)
  return %0
}
"""


def test_fold_constants_evaluates_constant_subgraphs():
    before = parse_ir(BEFORE)
    after = DeadCodeElimination()(FOLD(before))
    verify(after)
    w = before.constants["w"]
    expected = parse_ir(EXPECTED, constants={"folded.add.0": np.exp(w) + 1})
    assert_structural_equal(after, expected)
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))
    np.testing.assert_allclose(after.constants["folded.add.0"], np.exp(w) + 1, rtol=1e-6)


SMALL = """
graph g(%x: f32[4, 2]) {
  %a = const [1.0, 2.0] : f32[2]
  %b = const [0.5, 0.25] : f32[2]
  %0 = mul(%a, %b)
  %1 = add(%x, %0)
  return %1
}
"""

SMALL_EXPECTED = """
graph g(%x: f32[4, 2]) {
  %0 = const [0.5, 0.5] : f32[2]
  %1 = add(%x, %0)
  return %1
}
"""


def test_fold_constants_small_results_become_literals():
    before = parse_ir(SMALL)
    after = DeadCodeElimination()(FOLD(before))
    verify(after)
    assert_structural_equal(after, parse_ir(SMALL_EXPECTED))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))


VIEW_OF_CONST = """
graph g(%x: f32[4, 4]) {
  %w = const "w" : f32[4, 8]
  %0 = view(%w, offset=16, shape=[4, 4], strides=[32, 4])
  %1 = neg(%0)
  %2 = add(%x, %1)
  return %2
}
"""


def test_fold_constants_sees_through_views_but_keeps_them():
    before = parse_ir(VIEW_OF_CONST)
    after = DeadCodeElimination()(FOLD(before))
    verify(after)
    assert [n.op for n in after.nodes] == ["input", "const", "add"]
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))


def test_fold_constants_is_idempotent():
    once = FOLD(parse_ir(BEFORE))
    assert FOLD(once) is once


def test_fold_constants_leaves_alone_what_depends_on_inputs():
    g = parse_ir("graph g(%x: f32[4, 8]) {\n  %w = const \"w\" : f32[8]\n  %0 = mul(%x, %w)\n  %1 = exp(%0)\n  return %1\n}\n")
    assert FOLD(g) is g


def test_fold_constants_leaves_bare_views_of_weights_alone():
    g = parse_ir("graph g(%x: f32[2, 8]) {\n  %w = const \"w\" : q8_0[4, 32]\n"
                 "  %0 = view(%w, offset=68, shape=[2, 32], strides=[34, 34])\n  return %0\n}\n")
    assert FOLD(g) is g


def test_fold_constants_respects_the_size_limit():
    g = parse_ir("graph g(%x: f32[64, 64]) {\n  %w = const \"w\" : f32[64, 64]\n  %0 = exp(%w)\n"
                 "  %1 = add(%x, %0)\n  return %1\n}\n")
    assert FoldConstants(max_bytes=1024)(g) is g
    assert FoldConstants()(g) is not g
