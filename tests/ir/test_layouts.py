"""Storage layouts in the IR: the registry (pack/unpack, sizes), the layout in TensorType (equality,
text), the ops' accepted layouts enforced by make_node and the verifier, and the reference
interpreter running re-laid-out tensors by unpacking them."""
import numpy as np
import pytest

from ember.errors import IRError
from ember.ir import GraphBuilder
from ember.errors import ParseError, VerifyError
from ember.ir.graph import Graph
from ember.ir.layouts import LAYOUTS, get_layout, unsupported_layout
from ember.ir.node import Node
from ember.ir.builder import make_node
from ember.ir.interpreter import run_reference
from ember.ir.parser import parse_ir
from ember.ir.printer import print_ir
from ember.ir.quant import quantize
from ember.ir.types import TensorType
from ember.ir.verifier import verify
from ember.ir import dtypes

SOA = get_layout("adreno_soa")


@pytest.mark.parametrize("wtype", ["q8_0", "q4_0"])
def test_adreno_soa_packs_and_unpacks_to_the_same_blocks(wtype):
    M, K = 12, 96
    dt = dtypes.dtype(wtype)
    blocks = quantize(np.random.default_rng(0).standard_normal((M, K)).astype(np.float32), wtype)
    packed = SOA.pack(blocks, dt, (M, K))
    assert packed.dtype == np.uint8 and packed.shape == (SOA.nbytes(dt, (M, K)),) == (blocks.nbytes,)
    np.testing.assert_array_equal(SOA.unpack(packed, dt, (M, K)), blocks)
    parts = SOA.parts(packed, dt, (M, K))
    # scales transposed: row r's scale of block b is d[b, r]
    np.testing.assert_array_equal(parts["d"][:, 5], blocks[5].reshape(K // 32, -1)[:, :2].copy().view(np.uint16)[:, 0])
    assert parts["q"].shape == (K // dict(SOA.per_u32)[wtype], M)


def test_every_layout_names_its_dtypes():
    for name, layout in LAYOUTS.items():
        assert layout.name == name and layout.dtypes


def test_the_layout_is_part_of_the_type():
    row = TensorType("q8_0", (8, 64))
    soa = row.with_layout("adreno_soa")
    assert row.layout == "row" and soa != row and hash(soa) != hash(row) and soa.row == row
    assert str(soa) == "q8_0[8, 64]{adreno_soa}" and str(row) == "q8_0[8, 64]"
    assert soa.nbytes == row.nbytes


@pytest.mark.parametrize("dt, shape, layout, match", [
    ("q5_0", (8, 64), "adreno_soa", "applies to q8_0, q4_0, not q5_0"),
    ("q8_0", (6, 64), "adreno_soa", "M % 4 == 0"),
    ("q8_0", (2, 8, 64), "adreno_soa", "2-D"),
    ("q8_0", (8, 64), "tiled", "unknown layout 'tiled'"),
])
def test_types_a_layout_cannot_hold(dt, shape, layout, match):
    with pytest.raises(ValueError, match=match):
        TensorType(dt, shape, layout=layout)


TEXT = """graph g(%x: f32[1, 64]) {
  %w = const "w" : q8_0[8, 64]{adreno_soa}
  %0 = mul_mat(%x, %w) : f32[1, 8]
  return %0
}
"""


def test_a_layout_round_trips_through_the_text():
    g = parse_ir(TEXT)
    assert print_ir(g) == TEXT
    assert g.outputs[0].inputs[1].type.layout == "adreno_soa"
    assert parse_ir(print_ir(g), constants=g.constants) == g
    verify(g)


@pytest.mark.parametrize("bad, match", [
    ("q8_0[8, 64]{row}", "the row layout is the default"),
    ("q8_0[8, 64]{tiled}", "unknown layout 'tiled'"),
    ("q8_0[8, 64]{adreno_soa", "expected '}' after layout adreno_soa"),
])
def test_bad_layouts_in_the_text(bad, match):
    with pytest.raises(ParseError, match=match):
        parse_ir(TEXT.replace("q8_0[8, 64]{adreno_soa}", bad))


def test_the_reference_interpreter_unpacks_a_layout():
    row = parse_ir(TEXT.replace("{adreno_soa}", ""))
    soa = parse_ir(TEXT)
    assert not np.array_equal(row.constants["w"].reshape(-1), soa.constants["w"])
    np.testing.assert_array_equal(run_reference(row)[0], run_reference(soa)[0])


def test_an_op_that_does_not_accept_a_layout_cannot_be_built_on_it():
    w = parse_ir(TEXT).outputs[0].inputs[1]
    with pytest.raises(IRError, match="cont: operand x is in layout adreno_soa, which cont does not accept"):
        make_node("cont", [w])
    with pytest.raises(ParseError, match="scale: operand x is in layout adreno_soa"):
        parse_ir(TEXT.replace("mul_mat(%x, %w) : f32[1, 8]", "scale(%w)"))


def test_the_verifier_rejects_a_node_reading_a_layout_its_op_does_not_accept():
    """llama.cpp's SYCL Q8_0 reorder bug (GEMV reordered, GEMM not), made impossible: a kernel for rows reading SoA."""
    g = parse_ir(TEXT)
    w = g.outputs[0].inputs[1]
    # Built around make_node, as a careless pass might: a row-layout copy of the packed weight.
    copied = Node("cont", (w,), {}, TensorType("q8_0", (8, 64)))
    bad = Graph(g.inputs, [g.outputs[0], copied], g.constants, g.name)
    with pytest.raises(VerifyError, match=r"%1 \(cont : q8_0\[8, 64\]\): operand x \(%w\) is in layout "
                                          r"adreno_soa, which cont does not accept \(accepts: row\)"):
        verify(bad)


def test_mul_mat_accepts_the_layout_only_for_its_weight():
    x = parse_ir(TEXT).outputs[0].inputs[1]
    b = GraphBuilder("g")
    y = b.input("y", "f32", (1, 64))
    make_node("mul_mat", [y, x])
    with pytest.raises(IRError, match="mul_mat: operand x is in layout adreno_soa"):
        make_node("mul_mat", [x, x])


def test_a_row_only_target_names_operand_and_layout():
    node = parse_ir(TEXT).outputs[0]
    assert unsupported_layout(node, supported=("row", "adreno_soa")) is None
    why = unsupported_layout(node)
    assert "operand 1" in why and "adreno_soa" in why and "reads only row" in why
