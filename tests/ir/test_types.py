import pytest

from ember.ir import dtypes
from ember.ir.types import TensorType, contiguous_strides, tensor_type


def test_contiguous_strides_are_bytes_outermost_first():
    assert contiguous_strides(dtypes.f32, (2, 3, 4)) == (48, 16, 4)
    assert contiguous_strides(dtypes.f16, (5, 8)) == (16, 2)
    assert contiguous_strides(dtypes.f32, ()) == ()


def test_quantized_strides_count_blocks():
    # q8_0: 32 values in 34 bytes; a row of 64 values is 2 blocks.
    assert contiguous_strides(dtypes.q8_0, (3, 64)) == (68, 34)
    assert contiguous_strides(dtypes.q4_k, (2, 512)) == (288, 144)


def test_quantized_row_bytes():
    assert dtypes.q8_0.row_bytes(64) == 68
    assert dtypes.q4_0.row_bytes(32) == 18
    assert dtypes.q5_0.row_bytes(96) == 66
    assert dtypes.q4_k.row_bytes(256) == 144
    assert dtypes.q6_k.row_bytes(512) == 420
    assert dtypes.f16.row_bytes(7) == 14
    with pytest.raises(ValueError, match="whole number"):
        dtypes.q8_0.row_bytes(40)


def test_quantized_last_dim_must_be_whole_blocks():
    with pytest.raises(ValueError, match="block size 32"):
        TensorType(dtypes.q4_0, (4, 48))


def test_contiguity_and_str():
    t = tensor_type("f32", 4, 8)
    assert t.is_contiguous and str(t) == "f32[4, 8]"
    assert TensorType(dtypes.f32, (4, 8), (32, 4)) == t   # explicit contiguous strides normalize
    view = TensorType(dtypes.f32, (4, 2), (32, 4))
    assert not view.is_contiguous
    assert str(view) == "f32[4, 2]{32, 4}"
    transposed = TensorType(dtypes.f32, (8, 4), (4, 32))
    assert not transposed.is_contiguous
    assert str(tensor_type("f32")) == "f32[]"


def test_nbytes_and_span():
    t = tensor_type("f32", 4, 8)
    assert t.nbytes == t.span_bytes == 128
    # Every other row of a [4, 8] tensor: rows 0 and 2, span ends after row 2.
    rows = TensorType(dtypes.f32, (2, 8), (64, 4))
    assert rows.nbytes == 64 and rows.span_bytes == 64 + 32
    # The fused-QKV split: 4 heads of 16 values from rows of 192 values.
    k = TensorType(dtypes.f32, (5, 4, 16), (768, 64, 4))
    assert k.span_bytes == 4 * 768 + 3 * 64 + 16 * 4
    assert TensorType(dtypes.f32, (0, 8)).span_bytes == 0
    assert TensorType(dtypes.q8_0, (3, 64)).nbytes == 3 * 68
    assert TensorType(dtypes.q8_0, (2, 64), (136, 34)).span_bytes == 136 + 68


def test_type_checks():
    with pytest.raises(ValueError, match="rank 5"):
        tensor_type("f32", 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="negative"):
        tensor_type("f32", -1)
    with pytest.raises(ValueError, match="do not match shape"):
        TensorType(dtypes.f32, (2, 3), (12,))
    with pytest.raises(ValueError, match="unknown dtype 'f64'"):
        tensor_type("f64", 2)


def test_with_shape_and_dtype_are_contiguous():
    t = TensorType(dtypes.f32, (4, 2), (32, 4))
    assert t.with_shape((8,)).is_contiguous
    assert t.with_dtype("f16") == tensor_type("f16", 4, 2)


def test_quantized_type_needs_an_axis():
    with pytest.raises(ValueError, match="needs at least one axis"):
        tensor_type("q8_0")
