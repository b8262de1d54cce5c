import numpy as np
import pytest

from ember.ir.verifier import verify
from ember.passes import DeadCodeElimination, FuseQKV
from ember.testing import assert_allclose, assert_structural_equal, parse_ir, run_reference

FUSE = FuseQKV()

# GQA: 4 query heads, 1 kv head of 32; the Q width (128) differs from n_embd (64).
BEFORE = """
graph attn(%x: f32[5, 64], %pos: i32[5]) {
  %wq = const "wq" : q8_0[128, 64]
  %wk = const "wk" : q8_0[32, 64]
  %wv = const "wv" : q8_0[32, 64]
  %0 = mul_mat(%x, %wq)
  %1 = mul_mat(%x, %wk)
  %2 = mul_mat(%x, %wv)
  %3 = reshape(%0, shape=[5, 4, 32])
  %4 = reshape(%1, shape=[5, 1, 32])
  %5 = reshape(%2, shape=[5, 1, 32])
  %6 = rope(%3, %pos, mode="neox")
  %7 = rope(%4, %pos, mode="neox")
  %8 = attention(%6, %7, %5, scale=0.17677669529663687, causal=true)
  return %8
}
"""

EXPECTED = """
graph attn(%x: f32[5, 64], %pos: i32[5]) {
  %wqkv = const "wq+wk+wv" : q8_0[192, 64]
  %0 = mul_mat(%x, %wqkv)
  %1 = view(%0, offset=0, shape=[5, 128], strides=[768, 4])
  %2 = view(%0, offset=512, shape=[5, 32], strides=[768, 4])
  %3 = view(%0, offset=640, shape=[5, 32], strides=[768, 4])
  %4 = reshape(%1, shape=[5, 4, 32])
  %5 = reshape(%2, shape=[5, 1, 32])
  %6 = reshape(%3, shape=[5, 1, 32])
  %7 = rope(%4, %pos, mode="neox")
  %8 = rope(%5, %pos, mode="neox")
  %9 = attention(%7, %8, %6, scale=0.17677669529663687, causal=true)
  return %9
}
"""


def fused_data(before):
    return {"wq+wk+wv": np.concatenate([before.constants[n] for n in ("wq", "wk", "wv")])}


def test_fuse_qkv_three_projections():
    before = parse_ir(BEFORE)
    after = DeadCodeElimination()(FUSE(before))
    verify(after)
    assert_structural_equal(after, parse_ir(EXPECTED, constants=fused_data(before)))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0), rtol=0, atol=0)


def test_fuse_qkv_concatenates_quantized_blocks_without_requantizing():
    before = parse_ir(BEFORE)
    after = FUSE(before)
    fused = after.constants["wq+wk+wv"]
    assert fused.dtype == np.uint8 and fused.shape == (192, 2 * 34)
    np.testing.assert_array_equal(fused[128:160], before.constants["wk"])


def test_fused_weights_exist_once_per_process():
    """Step graphs built from the same weights (every compiled graph of a model) share one fused
    array instead of holding a copy each; other weights get their own."""
    first = parse_ir(BEFORE)
    same_weights = parse_ir(BEFORE.replace("f32[5, 64]", "f32[9, 64]").replace("i32[5]", "i32[9]")
                            .replace("[5, ", "[9, "), constants=first.constants)
    other_weights = parse_ir(BEFORE)
    fused = [FUSE(g).constants["wq+wk+wv"] for g in (first, same_weights, other_weights)]
    assert fused[0] is fused[1] and not fused[0].flags.writeable
    assert fused[2] is not fused[0]      # equal bytes (parse_ir's constants are seeded), other arrays


def test_fuse_qkv_is_idempotent():
    once = FUSE(parse_ir(BEFORE))
    assert FUSE(once) is once


BIASED = """
graph g(%x: f32[3, 32]) {
  %wq = const "wq" : f32[32, 32]
  %wk = const "wk" : f32[16, 32]
  %bq = const "bq" : f32[32]
  %bk = const "bk" : f32[16]
  %0 = mul_mat(%x, %wq)
  %1 = add(%0, %bq)
  %2 = mul_mat(%x, %wk)
  %3 = add(%2, %bk)
  %4 = exp(%1)
  %5 = exp(%3)
  return %4, %5
}
"""

BIASED_EXPECTED = """
graph g(%x: f32[3, 32]) {
  %w = const "wq+wk" : f32[48, 32]
  %0 = mul_mat(%x, %w)
  %b = const "bq+bk" : f32[48]
  %1 = add(%0, %b)
  %2 = view(%1, offset=0, shape=[3, 32], strides=[192, 4])
  %3 = view(%1, offset=128, shape=[3, 16], strides=[192, 4])
  %4 = exp(%2)
  %5 = exp(%3)
  return %4, %5
}
"""


def test_fuse_qkv_fuses_biases_too():
    before = parse_ir(BIASED)
    after = DeadCodeElimination()(FUSE(before))
    verify(after)
    data = {"wq+wk": np.concatenate([before.constants["wq"], before.constants["wk"]]),
            "bq+bk": np.concatenate([before.constants["bq"], before.constants["bk"]])}
    assert_structural_equal(after, parse_ir(BIASED_EXPECTED, constants=data))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0), rtol=0, atol=0)


GATE_UP = """
graph ffn(%x: f32[7, 256]) {
  %wg = const "wg" : q4_k[512, 256]
  %wu = const "wu" : q4_k[512, 256]
  %wd = const "wd" : q4_k[256, 512]
  %0 = mul_mat(%x, %wg)
  %1 = mul_mat(%x, %wu)
  %2 = swiglu(%0, %1)
  %3 = mul_mat(%2, %wd)
  return %3
}
"""


def test_fuse_qkv_fuses_gate_and_up_the_same_way():
    before = parse_ir(GATE_UP)
    after = DeadCodeElimination()(FUSE(before))
    verify(after)
    assert [n.op for n in after.nodes].count("mul_mat") == 2
    assert after.constants["wg+wu"].shape == (1024, 144)
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0), rtol=0, atol=0)


@pytest.mark.parametrize("text", [
    # different inputs
    """graph g(%x: f32[2, 32], %y: f32[2, 32]) {
  %a = const "a" : f32[8, 32]
  %b = const "b" : f32[8, 32]
  %0 = mul_mat(%x, %a)
  %1 = mul_mat(%y, %b)
  %2 = add(%0, %1)
  return %2
}""",
    # mixed weight types
    """graph g(%x: f32[2, 32]) {
  %a = const "a" : q8_0[8, 32]
  %b = const "b" : q4_0[8, 32]
  %0 = mul_mat(%x, %a)
  %1 = mul_mat(%x, %b)
  %2 = add(%0, %1)
  return %2
}""",
    # a weight that is not a constant
    """graph g(%x: f32[2, 32], %b: f32[8, 32]) {
  %a = const "a" : f32[8, 32]
  %0 = mul_mat(%x, %a)
  %1 = mul_mat(%x, %b)
  %2 = add(%0, %1)
  return %2
}""",
    # batched weights: no row concatenation lines these up
    """graph g(%x: f32[2, 3, 32]) {
  %a = const "a" : f32[2, 8, 32]
  %b = const "b" : f32[2, 8, 32]
  %0 = mul_mat(%x, %a)
  %1 = mul_mat(%x, %b)
  %2 = add(%0, %1)
  return %2
}""",
    # no rows (a prompt micro-batch that produces no logits has an empty last FFN)
    """graph g(%x: f32[0, 32]) {
  %a = const "a" : f32[8, 32]
  %b = const "b" : f32[8, 32]
  %0 = mul_mat(%x, %a)
  %1 = mul_mat(%x, %b)
  %2 = add(%0, %1)
  return %2
}""",
    # a projection read through a view whose strides assume its own rows (qwen3next's query
    # and gate interleaved per head): with the fused row stride the view would read other columns
    """graph g(%x: f32[2, 32]) {
  %a = const "a" : f32[8, 32]
  %b = const "b" : f32[4, 32]
  %0 = mul_mat(%x, %a)
  %1 = view(%0, offset=0, shape=[2, 2, 2], strides=[32, 16, 4])
  %2 = mul_mat(%x, %b)
  %3 = cont(%1)
  %4 = reshape(%3, shape=[2, 4])
  %5 = add(%4, %2)
  return %5
}""",
    # a lone projection
    """graph g(%x: f32[2, 32]) {
  %a = const "a" : f32[8, 32]
  %0 = mul_mat(%x, %a)
  return %0
}""",
])
def test_fuse_qkv_leaves_alone(text):
    g = parse_ir(text)
    assert FUSE(g) is g


@pytest.mark.parametrize("wtype", ["q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4"])
def test_fuse_qkv_concatenates_blocks_of_every_weight_format(wtype):
    """Rows are whole blocks in every format, so the fused weight is the members' bytes one
    after the other and the reference result does not move a bit."""
    text = BEFORE.replace("q8_0", wtype).replace(", 64]", ", 256]").replace("[5, 64]", "[5, 256]")
    before = parse_ir(text)
    after = DeadCodeElimination()(FUSE(before))
    verify(after)
    fused = after.constants["wq+wk+wv"]
    np.testing.assert_array_equal(fused, np.concatenate([before.constants[n] for n in ("wq", "wk", "wv")]))
    assert_allclose(run_reference(before, seed=0), run_reference(after, seed=0), rtol=0, atol=0)
