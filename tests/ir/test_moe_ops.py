"""The mixture-of-experts ops: shape rules naming the operand at fault, the references' meaning
(ties, repeated experts, out-of-range ids) and a whole MoE FFN against plain NumPy."""
import numpy as np
import pytest

from ember.errors import IRError
from ember.ir import GraphBuilder, ShapeError
from ember.ir.interpreter import random_inputs, run_reference
from moe_ffn import MoeShape, build_moe_ffn, moe_weights, numpy_moe_ffn


def _mm_id(x_shape, w_shape, ids_shape, w_dtype="f32", ids_dtype="i32"):
    b = GraphBuilder()
    w = b.weight("w", np.zeros(w_shape), w_dtype)
    return b.mul_mat_id(b.input("x", "f32", x_shape), w, b.input("ids", ids_dtype, ids_shape))


def test_mul_mat_id_shape():
    assert _mm_id((9, 64), (7, 5, 64), (9, 3)).shape == (9, 3, 5)
    assert _mm_id((9, 3, 64), (7, 5, 64), (9, 3)).shape == (9, 3, 5)
    assert _mm_id((9, 1, 64), (7, 5, 64), (9, 3), "q4_0").shape == (9, 3, 5)


@pytest.mark.parametrize("x_shape, w_shape, ids_shape, message", [
    ((9, 64), (7, 5, 64), (9,), r"ids must be \[T, n_used\], got rank 1"),
    ((9, 64), (7, 5, 64), (9, 3, 1), r"ids must be \[T, n_used\], got rank 3"),
    ((9, 64), (5, 64), (9, 3), r"w must be \[E, N, K\]"),
    ((9, 64), (2, 5, 64), (9, 3), r"ids selects 3 experts per token but w holds E=2"),
    ((9, 32), (7, 5, 64), (9, 3), r"inner sizes differ: x \[9, 32\] vs w \[7, 5, 64\]"),
    ((8, 64), (7, 5, 64), (9, 3), r"x has 8 tokens but ids has 9"),
    ((9, 2, 64), (7, 5, 64), (9, 3), r"x \[9, 2, 64\] must have 1 or n_used=3 rows per token"),
], ids=["ids-rank1", "ids-rank3", "w-rank2", "E-smaller-than-n_used", "K-mismatch", "T-mismatch",
        "x-rows-per-token"])
def test_mul_mat_id_shape_errors_name_the_operand(x_shape, w_shape, ids_shape, message):
    with pytest.raises(ShapeError, match="mul_mat_id: " + message):
        _mm_id(x_shape, w_shape, ids_shape)


def test_mul_mat_id_dtype_errors_name_the_operand():
    with pytest.raises(ShapeError, match="mul_mat_id: ids has dtype f32"):
        _mm_id((9, 64), (7, 5, 64), (9, 3), ids_dtype="f32")


def test_mul_mat_id_reference_uses_each_tokens_experts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    w = rng.standard_normal((5, 6, 8)).astype(np.float32)
    ids = np.array([[0, 4, 4], [1, 1, 1], [2, 0, 3], [4, 4, 4]], np.int32)   # repeats too
    b = GraphBuilder()
    g = b.build(b.mul_mat_id(b.input("x", "f32", x.shape), b.const("w", w), b.input("ids", "i32", ids.shape)))
    (got,) = run_reference(g, {"x": x, "ids": ids})
    want = np.stack([[w[ids[t, j]] @ x[t, j] for j in range(3)] for t in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(IRError, match=r"mul_mat_id.*out of range \[0, 5\)"):
        run_reference(g, {"x": x, "ids": np.where(ids == 4, 5, ids).astype(np.int32)})
    # random inputs draw ids valid for w
    assert random_inputs(g, 1)["ids"].max() < 5


def test_top_k_orders_largest_first_ties_to_the_lower_index():
    b = GraphBuilder()
    g = b.build(b.top_k(b.input("x", "f32", (3, 5)), k=3))
    x = np.array([[1, 5, 5, 2, 5], [0, 0, 0, 0, 0], [np.nan, -1, 3, np.nan, 2]], np.float32)
    (got,) = run_reference(g, {"x": x})
    np.testing.assert_array_equal(got, [[1, 2, 4], [0, 1, 2], [2, 4, 1]])


@pytest.mark.parametrize("k, message", [(0, r"k=0 must be in \[1, 7\]"), (8, r"k=8 must be in \[1, 7\]")])
def test_top_k_k_range(k, message):
    with pytest.raises(ShapeError, match="top_k: " + message):
        GraphBuilder().top_k(GraphBuilder().input("x", "f32", (2, 7)), k=k)


def test_take_along_shape_and_errors():
    b = GraphBuilder()
    x = b.input("x", "f32", (9, 7))
    assert b.take_along(x, b.input("i", "i32", (9, 3))).shape == (9, 3)
    with pytest.raises(ShapeError, match=r"take_along: idx \[8, 3\] must match x \[9, 7\]"):
        b.take_along(x, b.input("j", "i32", (8, 3)))
    with pytest.raises(ShapeError, match="take_along: idx has dtype f32"):
        b.take_along(x, b.input("f", "f32", (9, 3)))


@pytest.mark.parametrize("shape", [MoeShape(), MoeShape(gating="sigmoid", renorm=False, shared=False),
                                   MoeShape(T=1, k=1)], ids=["softmax-renorm-shared", "sigmoid", "T1-k1"])
def test_moe_ffn_graph_matches_numpy(shape):
    weights = moe_weights(shape)
    x = np.random.default_rng(1).standard_normal((shape.T, shape.D)).astype(np.float32)
    (got,) = run_reference(build_moe_ffn(shape, weights), {"x": x})
    np.testing.assert_allclose(got, numpy_moe_ffn(shape, weights, x), rtol=1e-4, atol=1e-5)
