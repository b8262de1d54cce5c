"""Tests for ember.ir.turbo: the TurboQuant KV-cache formats, their pinned constants and the
Walsh-Hadamard rotations, against plain NumPy references."""
import math

import numpy as np
import pytest

from ember.ir import quant, turbo

# Max (1960), Lloyd-Max quantizers of the unit normal: the tables must be these times 1/sqrt(128)
# (the fork's 4-bit table once drifted to the wrong sigma and cost ~2x MSE).
MAX_1960 = {3: (0.2451, 0.7560, 1.3440, 2.1520),
            4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326)}
# Mean squared error of a Lloyd-Max quantizer of a Gaussian, relative to its variance (Max 1960),
# and the window the per-vector relative error of a block must fall in.
NMSE_RANGE = {3: (0.030, 0.038), 4: (0.0082, 0.0105)}


@pytest.mark.parametrize("bits", [3, 4])
def test_codebook_is_the_derived_one(bits):
    table = turbo.CODEBOOK_3 if bits == 3 else turbo.CODEBOOK_4
    np.testing.assert_allclose(table, turbo.lloyd_max(bits), rtol=1e-12, atol=0)
    assert len(table) == 1 << bits and np.all(np.diff(table) > 0)
    np.testing.assert_allclose(table, -table[::-1], rtol=0, atol=1e-15)


@pytest.mark.parametrize("bits", [3, 4])
def test_codebook_has_the_sigma_of_a_rotated_unit_coordinate(bits):
    positive = turbo.CODEBOOKS[bits][1 << (bits - 1):]
    np.testing.assert_allclose(positive * math.sqrt(128), MAX_1960[bits], atol=1.5e-4)   # 4 printed decimals


def test_sign_literals_are_the_seeded_draw():
    d1, d2 = turbo.draw_signs(turbo.SIGN_SEED)
    np.testing.assert_array_equal(turbo.SIGNS_D1, d1)
    np.testing.assert_array_equal(turbo.SIGNS_D2, d2)
    assert not np.array_equal(d1, d2)


def _plain_reference(x, bits):
    """Quantize -> dequantize as the paper writes it, with dense matrices in float64."""
    r = np.diag(turbo.SIGNS_D2) @ turbo.hadamard_matrix(128) @ np.diag(turbo.SIGNS_D1)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    y = (x / n) @ r.T
    cb = turbo.CODEBOOK_3 if bits == 3 else turbo.CODEBOOK_4
    c = cb[np.abs(y[:, :, None] - cb).argmin(axis=2)]
    return (c @ r) * n / np.linalg.norm(c, axis=1, keepdims=True)


@pytest.mark.parametrize("bits", [3, 4])
def test_round_trip_matches_plain_numpy_and_keeps_the_norm(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((512, 128)) * rng.uniform(0.1, 10, (512, 1))).astype(np.float32)
    kind = f"turbo{bits}"
    raw = quant.quantize(x, kind)
    assert raw.shape == (512, turbo.BLOCK_BYTES[bits])
    y = quant.dequantize(raw, kind)
    ref = _plain_reference(x.astype(np.float64), bits)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-3 * np.abs(x).max())   # fp16 norm
    err = np.sum((x - y) ** 2, axis=1) / np.sum(x ** 2, axis=1)
    lo, hi = NMSE_RANGE[bits]
    assert lo < err.mean() < hi
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-3)


@pytest.mark.parametrize("kind", ["turbo3", "turbo4"])
def test_block_layout(kind):
    bits = int(kind[-1])
    x = np.random.default_rng(7).standard_normal((1, 128)).astype(np.float32)
    n = np.linalg.norm(x)
    idx = np.abs(turbo.rotate(x / n)[0][:, None] - turbo.CODEBOOKS[bits]).argmin(axis=1)
    raw = quant.quantize(x, kind)[0]
    stored = np.frombuffer(raw[:2].tobytes(), "<f2")[0]
    np.testing.assert_allclose(stored, n / np.linalg.norm(turbo.CODEBOOKS[bits][idx]), rtol=1e-3)
    if bits == 4:
        np.testing.assert_array_equal(raw[2:], idx[0::2] | idx[1::2] << 4)
    else:
        np.testing.assert_array_equal(raw[2:34], [sum((idx[4 * k + i] & 3) << 2 * i for i in range(4))
                                                  for k in range(32)])
        np.testing.assert_array_equal(raw[34:], [sum((idx[8 * k + i] >> 2) << i for i in range(8))
                                                 for k in range(16)])


@pytest.mark.parametrize("kind", ["turbo3", "turbo4"])
def test_zero_and_multi_block_rows(kind):
    x = np.zeros((2, 256), np.float32)
    x[1, 128:] = np.linspace(-1, 1, 128)
    y = quant.dequantize(quant.quantize(x, kind), kind)
    assert y.shape == x.shape and not y[0].any() and not y[1, :128].any()
    assert abs(np.linalg.norm(y[1]) - np.linalg.norm(x[1])) < 1e-3 * np.linalg.norm(x[1])


def test_rotation_is_orthonormal_and_unrotate_inverts_it():
    eye = np.eye(128, dtype=np.float32)
    r = turbo.rotate(eye).T
    np.testing.assert_allclose(r @ r.T, np.eye(128), atol=1e-6)
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    np.testing.assert_allclose(turbo.unrotate(turbo.rotate(x)), x, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 64, 128, 256])
def test_hadamard_is_orthonormal_symmetric_and_keeps_dots(n):
    h = turbo.hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    rng = np.random.default_rng(n)
    q, k = rng.standard_normal((2, 3, n))
    np.testing.assert_allclose(np.sum(turbo.fwht(q) * turbo.fwht(k), axis=-1), np.sum(q * k, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(turbo.fwht(q), q @ h, atol=1e-12)


def test_hadamard_refuses_a_size_not_a_power_of_two():
    with pytest.raises(ValueError, match="size 96 is not a power of two"):
        turbo.fwht(np.zeros(96))


@pytest.mark.parametrize("block", [None, 16])
def test_hadamard_building_block_rotates_heads_and_keeps_attention_scores(block):
    from ember.ir import GraphBuilder
    from ember.ir.interpreter import run_reference
    b = GraphBuilder("rot")
    q, k = b.input("q", "f32", (3, 2, 64)), b.input("k", "f32", (5, 2, 64))
    hq, hk = b.hadamard(q, block), b.hadamard(k, block)
    back = b.hadamard(hq, block)
    rng = np.random.default_rng(1)
    data = {"q": rng.standard_normal((3, 2, 64)).astype(np.float32),
            "k": rng.standard_normal((5, 2, 64)).astype(np.float32)}
    got_q, got_k, got_back = run_reference(b.build(hq, hk, back), data)
    n = block or 64
    expect = turbo.fwht(data["q"].reshape(3, 2, 64 // n, n)).reshape(3, 2, 64)
    np.testing.assert_allclose(got_q, expect, atol=1e-5)
    np.testing.assert_allclose(got_back, data["q"], atol=1e-5)
    np.testing.assert_allclose(np.einsum("qhd,khd->hqk", got_q, got_k),
                               np.einsum("qhd,khd->hqk", data["q"], data["k"]), atol=1e-4)


def test_hadamard_refuses_a_block_that_does_not_divide_the_axis():
    from ember.errors import ShapeError
    from ember.ir import GraphBuilder
    b = GraphBuilder("rot")
    with pytest.raises(ShapeError, match="block 48 must be a power of two"):
        b.hadamard(b.input("x", "f32", (2, 96)), 48)


# ---- IR semantics: set_rows and attention over a quantized cache ---------------------------
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "turbo3", "turbo4"])
def test_set_rows_quantizes_each_written_row_and_attention_reads_it(kind):
    from ember.ir import GraphBuilder, dtypes
    from ember.ir.interpreter import run_reference
    b = GraphBuilder("cache")
    cache = b.input("cache", kind, (6, 256))
    rows = b.input("rows", "f32", (2, 256))
    updated = b.set_rows(cache, b.input("slots", "i32", (2,)), rows)
    kv = b.reshape(updated, 6, 2, 128)
    att = b.attention(b.input("q", "f32", (1, 4, 128)), kv, kv, scale=0.1)
    rng = np.random.default_rng(0)
    data = {"cache": dtypes.from_float32(rng.standard_normal((6, 256)).astype(np.float32), dtypes.dtype(kind)),
            "rows": rng.standard_normal((2, 256)).astype(np.float32), "slots": np.array([4, 1], np.int32),
            "q": rng.standard_normal((1, 4, 128)).astype(np.float32)}
    new_cache, out = run_reference(b.build(updated, att), data)
    expect = data["cache"].copy()
    expect[[4, 1]] = quant.quantize(data["rows"], kind)
    np.testing.assert_array_equal(new_cache, expect)
    keys = np.repeat(quant.dequantize(expect, kind).reshape(6, 2, 128).astype(np.float64), 2, axis=1)

    def attend(q):
        s = np.einsum("hd,khd->hk", q.astype(np.float64), keys) * 0.1
        p = np.exp(s - s.max(axis=1, keepdims=True))
        return np.einsum("hk,khd->hd", p / p.sum(axis=1, keepdims=True), keys)
    q = data["q"][0]
    if kind in ("q8_0", "q4_0"):      # ggml's dot with these K types takes q as q8_0 blocks
        rounded = quant.dequantize(quant.quantize(q, "q8_0"), "q8_0")
        assert np.abs(attend(rounded) - attend(q)).max() > 1e-4     # the rounding shows
        q = rounded
    np.testing.assert_allclose(out[0], attend(q), rtol=1e-5, atol=1e-6)


def test_a_turbo_cache_refuses_a_head_size_not_a_multiple_of_128():
    from ember.errors import ShapeError
    from ember.ir import GraphBuilder
    b = GraphBuilder("cache")
    cache = b.input("k_cache", "turbo4", (6, 128))
    with pytest.raises(ShapeError, match="last axis 64 of a turbo4 result is not a multiple of the turbo4 block size 128"):
        b.reshape(cache, 6, 2, 64)


def test_attention_names_a_cache_dtype_it_does_not_take():
    from ember.errors import ShapeError
    from ember.ir import GraphBuilder
    b = GraphBuilder("cache")
    q = b.input("q", "f32", (1, 2, 32))
    k = b.input("k", "q5_0", (4, 2, 32))
    with pytest.raises(ShapeError, match="attention: k has dtype q5_0, expected one of f32, f16, q8_0, q4_0, turbo3, turbo4"):
        b.attention(q, k, k, scale=1.0)
