import numpy as np
import pytest

from ember.testing import assert_allclose, assert_structural_equal, nmse, parse_ir

BEFORE = """graph g(%x: f32[2, 32]) {
  %w = const "w" : q8_0[16, 32]
  %0 = rms_norm(%x, eps=1e-06)
  %1 = mul_mat(%0, %w)
  %2 = silu(%1)
  %3 = exp(%2)
  return %3
}
"""


def test_structurally_equal_graphs_pass_even_with_other_constant_data():
    assert_structural_equal(parse_ir(BEFORE, seed=0), parse_ir(BEFORE, seed=1))


def test_first_differing_node_is_shown_with_context():
    other = BEFORE.replace("silu", "gelu")
    with pytest.raises(AssertionError) as e:
        assert_structural_equal(parse_ir(other), parse_ir(BEFORE))
    message = str(e.value)
    assert "node 3 of the body is the first that differs" in message
    assert "  >   %2 = gelu(%1) : f32[2, 16]" in message
    assert "  >   %2 = silu(%1) : f32[2, 16]" in message
    assert "      %1 = mul_mat(%0, %w) : f32[2, 16]" in message   # context before


@pytest.mark.parametrize("change, what", [
    (("graph g(", "graph h("), "name 'h' != 'g'"),
    (("%x", "%y"), "inputs (y: f32[2, 32]) != (x: f32[2, 32])"),
    (("return %3", "return %3, %2"), "outputs ['3', '2'] != ['3']"),
    (("  %3 = exp(%2)\n  return %3", "  return %2"), "4 nodes vs 5"),
    (("q8_0[16, 32]", "q4_0[16, 32]"), "node 0 of the body"),
])
def test_other_differences(change, what):
    with pytest.raises(AssertionError, match="graphs differ") as e:
        assert_structural_equal(parse_ir(BEFORE.replace(*change)), parse_ir(BEFORE))
    assert what in str(e.value)


def test_assert_allclose_names_output_and_error():
    a = [np.zeros(3, np.float32), np.array([1.0, 2.0, 3.0], np.float32)]
    b = [np.zeros(3, np.float32), np.array([1.0, 2.5, 3.0], np.float32)]
    assert_allclose(a, a)
    message = r"output 1: 1 of 3 values differ .* max abs error 0.5 at index \(1,\)"
    with pytest.raises(AssertionError, match=message):
        assert_allclose(a, b)
    with pytest.raises(AssertionError, match="2 outputs, expected 1"):
        assert_allclose(a, b[:1])
    with pytest.raises(AssertionError, match=r"output: shape \[3\], expected \[2\]"):
        assert_allclose(np.zeros(3), np.zeros(2))
    assert_allclose(np.array([np.nan, np.inf]), np.array([np.nan, np.inf]))
    with pytest.raises(AssertionError, match="max abs error inf"):
        assert_allclose(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    assert_allclose(np.array([1.0 + 1e-7]), np.array([1.0]))


def test_nmse():
    e = np.array([1.0, -2.0, 2.0])
    assert nmse(e, e) == 0.0
    assert nmse(e + np.array([0.0, 0.0, 0.3]), e) == pytest.approx(0.09 / 9)
    assert nmse(np.zeros(2), np.zeros(2)) == 0.0
    assert nmse(np.ones(2), np.zeros(2)) == float("inf")
