import numpy as np
import pytest

from ember.ir.verifier import verify
from ember.passes import CommonSubexpressionElimination, DeadCodeElimination
from ember.testing import assert_allclose, assert_structural_equal, parse_ir, run_reference

CSE = CommonSubexpressionElimination()

COMMUTED = """
graph g(%x: f32[4, 8], %y: f32[4, 8]) {
  %0 = add(%x, %y)
  %1 = add(%y, %x)
  %2 = mul(%0, %1)
  %3 = mul(%1, %0)
  %4 = sub(%2, %3)
  return %4
}
"""

COMMUTED_EXPECTED = """
graph g(%x: f32[4, 8], %y: f32[4, 8]) {
  %0 = add(%x, %y)
  %1 = mul(%0, %0)
  %2 = sub(%1, %1)
  return %2
}
"""


def test_cse_merges_commuted_operands():
    before = parse_ir(COMMUTED)
    after = CSE(before)
    verify(after)
    assert_structural_equal(DeadCodeElimination()(after), parse_ir(COMMUTED_EXPECTED))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))


DUPLICATE_WEIGHTS = """
graph g(%x: f32[4, 8]) {
  %w1 = const "w1" : f32[16, 8]
  %w2 = const "w2" : f32[16, 8]
  %0 = mul_mat(%x, %w1)
  %1 = mul_mat(%x, %w2)
  %2 = add(%0, %1)
  return %2
}
"""

DUPLICATE_WEIGHTS_EXPECTED = """
graph g(%x: f32[4, 8]) {
  %w1 = const "w1" : f32[16, 8]
  %0 = mul_mat(%x, %w1)
  %1 = add(%0, %0)
  return %1
}
"""


def _same_data(text):
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    return parse_ir(text, constants={"w1": w, "w2": w.copy()})


def test_cse_merges_constants_with_identical_data():
    before = _same_data(DUPLICATE_WEIGHTS)
    after = CSE(before)
    verify(after)
    expected = parse_ir(DUPLICATE_WEIGHTS_EXPECTED, constants={"w1": before.constants["w1"]})
    assert_structural_equal(DeadCodeElimination()(after), expected)
    assert set(after.constants) == {"w1"}
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))


def test_cse_keeps_constants_whose_data_differ():
    g = parse_ir(DUPLICATE_WEIGHTS)   # random data per name: w1 != w2
    assert CSE(g) is g


IDENTITY_VIEWS = """
graph g(%x: f32[4, 8]) {
  %0 = reshape(%x, shape=[4, 8])
  %1 = permute(%0, axes=[0, 1])
  %2 = cont(%1)
  %3 = exp(%2)
  return %3
}
"""


def test_cse_replaces_identity_views_by_their_operand():
    before = parse_ir(IDENTITY_VIEWS)
    after = DeadCodeElimination()(CSE(before))
    verify(after)
    assert_structural_equal(after, parse_ir("graph g(%x: f32[4, 8]) {\n  %0 = exp(%x)\n  return %0\n}\n"))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0))


def test_cse_is_idempotent():
    once = CSE(parse_ir(COMMUTED))
    assert CSE(once) is once


@pytest.mark.parametrize("text", [
    # broadcasting makes add(a, b) and add(b, a) different ops: shapes differ
    "graph g(%x: f32[4, 8], %b: f32[8]) {\n  %0 = add(%x, %b)\n  return %0\n}\n",
    # sub is not commutative
    "graph g(%x: f32[4, 8], %y: f32[4, 8]) {\n  %0 = sub(%y, %x)\n  %1 = sub(%x, %y)\n  %2 = add(%0, %1)\n  return %2\n}\n",
    # a real transpose is not an identity view
    "graph g(%x: f32[4, 4]) {\n  %0 = transpose(%x)\n  %1 = cont(%0)\n  return %1\n}\n",
])
def test_cse_leaves_alone(text):
    g = parse_ir(text)
    assert CSE(g) is g
