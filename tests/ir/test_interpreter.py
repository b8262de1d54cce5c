"""Spot checks of op semantics in the reference interpreter against hand-written NumPy/loops."""
import math

import numpy as np
import pytest

from ember.ir import GraphBuilder, IRError, dtypes, run_reference
from ember.testing import assert_allclose


def run(build, **inputs):
    """Build a one-output graph with `build(b, *input_nodes)` and run it on `inputs`."""
    b = GraphBuilder()
    nodes = [b.input(name, _dtype_of(a), a.shape) for name, a in inputs.items()]
    outputs = build(b, *nodes)
    g = b.build(outputs)
    return run_reference(g, inputs)


def _dtype_of(a):
    return {np.dtype(np.float32): "f32", np.dtype(np.int32): "i32", np.dtype(np.float16): "f16"}[a.dtype]


# ---- rope --------------------------------------------------------------------------------
def test_rope_normal_rotates_adjacent_pairs_and_neox_split_halves():
    x = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]], np.float32)   # [T=1, H=1, D=6]
    pos = np.array([3], np.int32)
    base = 100.0
    # n_dims = 4: two frequencies, the last two values pass through untouched.
    t0, t1 = 3 * base ** (-0 / 4), 3 * base ** (-2 / 4)

    def rot(a, b, t):
        return a * math.cos(t) - b * math.sin(t), a * math.sin(t) + b * math.cos(t)

    n0, n1 = rot(1.0, 2.0, t0), rot(3.0, 4.0, t1)
    normal = [n0[0], n0[1], n1[0], n1[1], 5.0, 6.0]
    e0, e1 = rot(1.0, 3.0, t0), rot(2.0, 4.0, t1)
    neox = [e0[0], e1[0], e0[1], e1[1], 5.0, 6.0]
    for mode, want in (("normal", normal), ("neox", neox)):
        (got,) = run(lambda b, x, p: b.rope(x, p, mode=mode, n_dims=4, freq_base=base), x=x, pos=pos)
        assert_allclose(got[0, 0], np.array(want, np.float32))


def test_rope_position_zero_is_identity_and_freq_factors_divide():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    (got,) = run(lambda b, x, p: b.rope(x, p), x=x, pos=np.zeros(2, np.int32))
    assert_allclose(got, x)
    # freq_factors f scale the angle by 1/f: factor 2 at position 2 == factor 1 at position 1.
    ff = np.full(4, 2.0, np.float32)
    (a,) = run(lambda b, x, p, f: b.rope(x, p, f, mode="neox"), x=x, pos=np.full(2, 2, np.int32), f=ff)
    (b_,) = run(lambda b, x, p: b.rope(x, p, mode="neox"), x=x, pos=np.ones(2, np.int32))
    assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


# ---- attention -----------------------------------------------------------------------------
def naive_attention(q, k, v, scale, causal, window, mask=None):
    tq, hq, d = q.shape
    tk, hkv, dv = v.shape
    out = np.zeros((tq, hq, dv))
    for h in range(hq):
        kv = h // (hq // hkv)                      # GQA: consecutive q heads share a kv head
        for i in range(tq):
            qpos = tk - tq + i
            scores = []
            for j in range(tk):
                visible = (not causal or j <= qpos) and (not window or qpos - j < window)
                s = float(np.dot(q[i, h], k[j, kv])) * scale + (mask[i, j] if mask is not None else 0.0)
                scores.append(s if visible else -math.inf)
            m = max(scores)
            if m == -math.inf:
                continue                           # nothing visible: the row stays zero
            w = [math.exp(s - m) for s in scores]
            for j in range(tk):
                out[i, h] += w[j] / sum(w) * v[j, kv]
    return out.astype(np.float32)


@pytest.mark.parametrize("causal, window, with_mask", [(False, 0, False), (True, 0, False),
                                                      (True, 2, False), (True, 3, True)])
def test_attention_gqa_causal_window_matches_naive_loop(causal, window, with_mask):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 4, 8)).astype(np.float32)    # 3 queries at positions 2, 3, 4
    k = rng.standard_normal((5, 2, 8)).astype(np.float32)    # 5 keys, 2 kv heads
    v = rng.standard_normal((5, 2, 6)).astype(np.float32)
    inputs = dict(q=q, k=k, v=v)
    mask = None
    if with_mask:
        mask = rng.standard_normal((3, 5)).astype(np.float32)
        inputs["mask"] = mask
    (got,) = run(lambda b, *qkv: b.attention(*qkv, scale=0.3, causal=causal, window=window), **inputs)
    assert_allclose(got, naive_attention(q, k, v, 0.3, causal, window, mask), rtol=1e-4, atol=1e-5)


def test_attention_fully_masked_query_gives_zeros():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 1, 4), (2, 1, 4), (2, 1, 4)))
    mask = np.array([[-np.inf, -np.inf], [0.0, 0.0]], np.float32)
    (got,) = run(lambda b, q, k, v, m: b.attention(q, k, v, m, scale=1.0), q=q, k=k, v=v, mask=mask)
    assert np.array_equal(got[0], np.zeros((1, 4), np.float32))
    assert_allclose(got[1], naive_attention(q, k, v, 1.0, False, 0)[1], rtol=1e-4, atol=1e-5)


# ---- softmax -------------------------------------------------------------------------------
def test_softmax_scale_softcap_and_mask():
    x = np.array([[1.0, 2.0, 30.0], [0.5, -1.0, 4.0]], np.float32)
    mask = np.array([0.0, -np.inf, 0.0], np.float32)
    (got,) = run(lambda b, x, m: b.softmax(x, m, scale=0.5, softcap=5.0), x=x, mask=mask)
    z = 5.0 * np.tanh(x.astype(np.float64) * 0.5 / 5.0) + mask
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert_allclose(got, want.astype(np.float32))
    assert got[:, 1].tolist() == [0.0, 0.0]
    assert got[0, 2] < 0.99     # capped at 5: 30 * 0.5 = 15 no longer dominates completely


def test_softmax_fully_masked_row_gives_zeros_not_nan():
    x = np.ones((2, 3), np.float32)
    mask = np.array([[-np.inf] * 3, [0.0, 0.0, -np.inf]], np.float32)
    (got,) = run(lambda b, x, m: b.softmax(x, m), x=x, mask=mask)
    assert got.tolist() == [[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]


# ---- get_rows / set_rows --------------------------------------------------------------------
def test_get_rows_dequantizes_rows_of_a_quantized_table():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((6, 64)).astype(np.float32)
    b = GraphBuilder()
    idx = b.input("idx", "i32", (3,))
    g = b.build(b.get_rows(b.weight("emb", table, "q8_0"), idx))
    (got,) = run_reference(g, {"idx": np.array([5, 0, 5], np.int32)})
    stored = dtypes.to_float32(g.constants["emb"], dtypes.q8_0)
    assert np.array_equal(got, stored[[5, 0, 5]])
    assert_allclose(got, table[[5, 0, 5]], rtol=0, atol=0.02)


def test_get_rows_out_of_range_is_an_error():
    b = GraphBuilder()
    idx = b.input("idx", "i32", (1,))
    g = b.build(b.get_rows(b.weight("emb", np.zeros((2, 4))), idx))
    with pytest.raises(IRError, match="out of range"):
        run_reference(g, {"idx": np.array([2], np.int32)})


def test_set_rows_writes_converted_rows_and_leaves_the_rest():
    dst = np.arange(12, dtype=np.float16).reshape(4, 3)
    src = np.array([[0.1, 0.2, 0.3], [7.0, 8.0, 9.0]], np.float32)
    idx = np.array([3, 1], np.int32)
    (got,) = run(lambda b, d, i, s: b.set_rows(d, i, s), dst=dst, idx=idx, src=src)
    want = dst.copy()
    want[[3, 1]] = src.astype(np.float16)
    assert got.dtype == np.float16 and np.array_equal(got, want)
    assert np.array_equal(dst, np.arange(12, dtype=np.float16).reshape(4, 3))   # input untouched


# ---- views ---------------------------------------------------------------------------------
def test_view_at_byte_offset_with_row_stride():
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    # Rows 1..3, columns 3..4: offset one row (32 bytes) + 3 values; rows stay 32 bytes apart.
    (got,) = run(lambda b, x: b.view(x, shape=(3, 2), strides=(32, 4), offset=32 + 12), x=x)
    assert np.array_equal(got, x[1:4, 3:5])
    # Every other row, then computed on: the compute op reads through the strides.
    (got,) = run(lambda b, x: b.neg(b.view(x, shape=(2, 8), strides=(64, 4), offset=0)), x=x)
    assert np.array_equal(got, -x[::2])


def test_view_splits_a_fused_projection():
    x = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)        # [T, q(4) + k(4) + v(4)]
    b = GraphBuilder()
    xi = b.input("x", "f32", (2, 12))
    parts = [b.view(xi, shape=(2, 2, 2), strides=(48, 8, 4), offset=16 * i) for i in range(3)]
    got = run_reference(b.build(parts), {"x": x})
    for i, part in enumerate(got):
        assert np.array_equal(part, x[:, 4 * i:4 * i + 4].reshape(2, 2, 2))


def test_permute_transpose_reshape_cont():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    (got,) = run(lambda b, x: b.cont(b.permute(x, 2, 0, 1)), x=x)
    assert np.array_equal(got, x.transpose(2, 0, 1))
    (got,) = run(lambda b, x: b.reshape(b.cont(b.transpose(x)), 8, 3), x=x)
    assert np.array_equal(got, x.transpose(0, 2, 1).reshape(8, 3))


# ---- mul_mat -------------------------------------------------------------------------------
def test_mul_mat_broadcasts_weight_batches():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)     # 4 batches of [3, 8]
    w = rng.standard_normal((2, 5, 8)).astype(np.float32)     # 2 batches of [5, 8]
    (got,) = run(lambda b, x, w: b.mul_mat(x, w), x=x, w=w)
    want = np.stack([x[i] @ w[i // 2].T for i in range(4)])  # x batch i uses w batch i // 2
    assert got.shape == (4, 3, 5)
    assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mul_mat_with_quantized_weight_uses_dequantized_values():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    for dt in ("q8_0", "q4_0", "q5_0"):
        b = GraphBuilder()
        xi = b.input("x", "f32", (2, 64))
        g = b.build(b.mul_mat(xi, b.weight("w", rng.standard_normal((3, 64)), dt)))
        (got,) = run_reference(g, {"x": x})
        w = dtypes.to_float32(g.constants["w"], dtypes.dtype(dt))
        assert_allclose(got, x @ w.T, rtol=1e-4, atol=1e-4)


def test_cast_to_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5], np.float32)   # halfway cases of bf16
    (got,) = run(lambda b, x: b.cast(b.cast(x, dtype="bf16"), dtype="f32"), x=x)
    assert got.tolist() == [1.0, 1.0, 1.015625, -2.5]


def test_scalar_results_keep_shape_of_their_type():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    total = b.reshape(b.sum_rows(x), ())
    g = b.build(b.argmax(x), b.cont(b.exp(total)), b.literal(2.0))
    x_value = np.array([1.0, 3.0, -2.0, 0.5], np.float32)
    got = run_reference(g, {"x": x_value})
    assert [a.shape for a in got] == [(), (), ()]
    assert got[0] == 1 and got[2] == 2.0
    assert_allclose(got[1], np.float32(np.exp(2.5)))


def test_l2_norm_divides_by_the_norm_or_by_eps_when_the_norm_is_below_it():
    x = np.array([[3.0, 4.0], [3e-8, 4e-8]], np.float32)
    (got,) = run(lambda b, x: b.l2_norm(x, eps=1e-6), x=x)
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.03, 0.04]], rtol=1e-6)
