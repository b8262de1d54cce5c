import numpy as np
import pytest

from ember.backends import get_backend
from ember.ir.interpreter import random_inputs
from ember.ir.verifier import verify
from ember.passes import DeadCodeElimination, FuseElementwise
from ember.testing import assert_allclose, assert_structural_equal, parse_ir, run_reference

FUSE = FuseElementwise()

BEFORE = """
graph ffn(%x: f32[4, 64]) {
  %norm_w = const "norm_w" : f32[64]
  %wg = const "wg" : f32[128, 64]
  %wu = const "wu" : f32[128, 64]
  %0 = rms_norm(%x, eps=1e-06)
  %1 = mul(%0, %norm_w)
  %2 = mul_mat(%1, %wg)
  %3 = mul_mat(%1, %wu)
  %4 = silu(%2)
  %5 = mul(%4, %3)
  %6 = gelu(%2)
  %7 = mul(%3, %6)
  %8 = add(%5, %7)
  return %8
}
"""

EXPECTED = """
graph ffn(%x: f32[4, 64]) {
  %norm_w = const "norm_w" : f32[64]
  %wg = const "wg" : f32[128, 64]
  %wu = const "wu" : f32[128, 64]
  %0 = rms_norm_mul(%x, %norm_w, eps=1e-06)
  %1 = mul_mat(%0, %wg)
  %2 = mul_mat(%0, %wu)
  %3 = swiglu(%1, %2)
  %4 = geglu(%1, %2)
  %5 = add(%3, %4)
  return %5
}
"""


def test_fuse_elementwise_norm_weight_and_gates():
    before = parse_ir(BEFORE)
    after = DeadCodeElimination()(FUSE(before))
    verify(after)
    assert_structural_equal(after, parse_ir(EXPECTED))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0), rtol=0, atol=0)


def test_fuse_elementwise_is_idempotent():
    once = FUSE(parse_ir(BEFORE))
    assert FUSE(once) is once


@pytest.mark.parametrize("text", [
    # the normalized value is used elsewhere too: fusing would compute it twice
    """graph g(%x: f32[4, 8]) {
  %w = const "w" : f32[8]
  %0 = rms_norm(%x)
  %1 = mul(%0, %w)
  %2 = add(%1, %0)
  return %2
}""",
    # a weight per row, not per column
    """graph g(%x: f32[4, 8]) {
  %w = const "w" : f32[4, 1]
  %0 = rms_norm(%x)
  %1 = mul(%0, %w)
  return %1
}""",
    # silu output broadcast against a smaller operand
    """graph g(%x: f32[4, 8], %u: f32[8]) {
  %0 = silu(%x)
  %1 = mul(%0, %u)
  return %1
}""",
    # layer_norm is not rms_norm
    """graph g(%x: f32[4, 8]) {
  %w = const "w" : f32[8]
  %0 = layer_norm(%x)
  %1 = mul(%0, %w)
  return %1
}""",
])
def test_fuse_elementwise_leaves_alone(text):
    g = parse_ir(text)
    assert FUSE(g) is g


def test_fused_kernels_give_the_same_bits_on_cpu(tmp_path):
    before = parse_ir(BEFORE)
    after = DeadCodeElimination()(FUSE(before))
    backend = get_backend("cpu", threads=2, cache_dir=tmp_path)
    inputs = random_inputs(before, seed=3)
    a = backend.compile(before).run(inputs)[0]
    b = backend.compile(after).run(inputs)[0]
    np.testing.assert_array_equal(a, b)
