"""Each rule of the verifier broken once, by nodes made with Node(...) and so bypassing
make_node's checks, or by graphs corrupted after construction."""
from types import MappingProxyType

import numpy as np
import pytest

from ember.ir import Graph, GraphBuilder, Node, VerifyError, dtypes, parse_ir, verify
from ember.ir.builder import const_node, input_node, make_node
from ember.ir.types import TensorType, tensor_type
from ember.errors import ParseError

X = input_node("x", "f32", (4,))
Y = input_node("y", "f32", (3,))


def verify_fails(graph: Graph, *fragments: str):
    with pytest.raises(VerifyError) as e:
        verify(graph)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_well_formed_graphs_verify():
    b = GraphBuilder()
    x = b.input("x", "f32", (2, 64))
    w = b.weight("w", np.ones((32, 64)), "q4_0")
    b_ = b.literal([1.0])
    verify(b.build(b.add(b.mul_mat(x, w), b_), x))
    verify(parse_ir("graph g(%x: f32[4]) {\n  %0 = exp(%x)\n  %1 = neg(%x)\n  return %1\n}\n"))


def test_wrong_type():
    bad = Node("exp", (X,), {}, tensor_type("f32", 5))
    verify_fails(Graph([X], [bad]), "%0 (exp : f32[5])",
                 "type f32[5] differs from the inferred type f32[4]")


def test_wrong_dtype_of_result():
    bad = Node("argmax", (X,), {}, tensor_type("f32"))
    verify_fails(Graph([X], [bad]), "%0 (argmax", "inferred type i32[]")


def test_broken_shape_rule():
    bad = Node("add", (X, Y), {}, X.type)
    verify_fails(Graph([X, Y], [bad]), "%0 (add", "shape rule", "does not broadcast")


def test_view_out_of_bounds():
    t = TensorType(dtypes.f32, (2,), (8,))
    bad = Node("view", (X,), {"shape": (2,), "strides": (8,), "offset": 8}, t)
    verify_fails(Graph([X], [bad]), "%0 (view", "bytes [8, 20) fall outside the operand's 16 bytes")


def test_attributes_not_normalized():
    bad = Node("rms_norm", (X,), {}, X.type)   # eps missing: make_node would fill the default
    verify_fails(Graph([X], [bad]), "%0 (rms_norm", "not the op's normalized attributes")


def test_unknown_op():
    bad = Node("frobnicate", (X,), {}, X.type)
    verify_fails(Graph([X], [bad]), "%0 (frobnicate", "unknown op 'frobnicate'")


def test_input_used_but_not_declared():
    z = input_node("z", "f32", (4,))
    verify_fails(Graph([X], [make_node("add", [X, z])]), "(input : f32[4])",
                 "input 'z' is used but is not one of the graph's inputs")


def test_input_with_wrong_attributes():
    odd = Node("input", (), {"name": "x", "extra": 1}, X.type)
    verify_fails(Graph([odd], [odd]), "%x (input", "exactly one attribute")


def test_constant_data_of_wrong_type():
    w = const_node("w", "f32", (4,))
    g = Graph([X], [make_node("add", [X, w])], {"w": np.zeros(4, np.float16)})
    verify_fails(g, "%w (const : f32[4])", "data float16[4] does not store f32[4]")


def test_quantized_constant_data_of_wrong_size():
    w = const_node("w", "q8_0", (2, 32))
    g = Graph([], [w], {"w": np.zeros((2, 32), np.uint8)})
    verify_fails(g, "%w (const", "expected uint8[2, 34]")


def test_constant_without_data():
    w = const_node("w", "f32", (4,))
    g = Graph([X], [make_node("add", [X, w])], {"w": np.zeros(4, np.float32)})
    g.constants = MappingProxyType({})   # corrupted after construction
    verify_fails(g, "%w (const", "constant 'w' has no data")


def test_literal_of_wrong_size():
    bad = Node("const", (), {"value": (1.0, 2.0)}, tensor_type("f32", 3))
    verify_fails(Graph([], [bad]), "%0 (const", "literal holds 2 values, its type f32[3] needs 3")


def test_const_with_name_and_value():
    bad = Node("const", (), {"name": "w", "value": (1.0,)}, tensor_type("f32", 1))
    verify_fails(Graph([], [bad], {"w": np.zeros(1, np.float32)}), "either a name or a literal value")


def test_graph_input_that_is_no_input_node():
    g = Graph([X], [X])
    g.inputs = (make_node("exp", [X]),)     # Graph() refuses this; simulate a corrupted graph
    g._order = None
    verify_fails(g, "input <Node exp f32[4]> must be an input node")


def test_operand_after_its_user():
    a = make_node("exp", [X])
    b = make_node("neg", [a])
    g = Graph([X], [b])
    g._order = (X, b, a)                     # Graph(nodes=...) refuses this order; corrupt it
    verify_fails(g, "(neg", "operand %", "does not come before its user")


def test_output_that_is_no_node_of_the_graph():
    g = Graph([X], [make_node("exp", [X])])
    g.nodes
    g.outputs = g.outputs + (make_node("neg", [Y]),)
    verify_fails(g, "output <Node neg", "is not a node of the graph")


def test_cycle():
    u = input_node("cycle_u", "f32", (4,))
    a = Node("exp", (u,), {}, u.type)
    b = Node("neg", (a,), {}, u.type)
    a.inputs = (b,)                          # nodes are never mutated; this one is, to make a cycle
    try:
        verify_fails(_graph_without_walk([u], [b]), "lies on a cycle")
    finally:
        a.inputs = (u,)


def _graph_without_walk(inputs, outputs) -> Graph:
    """A Graph whose constructor did not walk the nodes (the walk would not end on a cycle)."""
    g = Graph.__new__(Graph)
    g.name, g.inputs, g.outputs = "cyclic", tuple(inputs), tuple(outputs)
    g.constants = MappingProxyType({})
    g._order = g._users = None
    return g


def test_view_negative_stride_refused_with_node_named():
    # issue 16: strides [-4096, 4] once passed (the span check used a negative span) and the
    # compiled kernels read before the buffer.
    x = input_node("x", "f32", (4, 1024))
    t = TensorType(dtypes.f32, (4, 64))
    bad = Node("view", (x,), {"shape": (4, 64), "strides": (-4096, 4), "offset": 0}, t)
    verify_fails(Graph([x], [bad]), "%0 (view", "negative stride")
    with pytest.raises(ValueError, match="negative stride"):
        TensorType(dtypes.f32, (4, 64), (-4096, 4))


def test_view_overlapping_strides_bounded_by_real_extent():
    # Overlapping rows (stride 0: a broadcast) read inside the operand and are fine; a large
    # offset with them is not.
    x = input_node("x", "f32", (4,))
    ok = make_node("view", [x], {"shape": (3, 4), "strides": (0, 4), "offset": 0})
    verify(Graph([x], [ok]))
    t = TensorType(dtypes.f32, (3, 2), (0, 4))
    bad = Node("view", (x,), {"shape": (3, 2), "strides": (0, 4), "offset": 12}, t)
    verify_fails(Graph([x], [bad]), "%0 (view", "bytes [12, 20) fall outside the operand's 16 bytes")


@pytest.mark.parametrize("attrs, message", [
    ("shape=[4, 64], strides=[-4096, 4]", "negative stride"),
    ("shape=[-4, 64], strides=[4096, 4]", "negative dimension"),
], ids=["negative-stride", "negative-dimension"])
def test_view_attribute_errors_carry_file_line_col(attrs, message):
    from ember.errors import ParseError
    text = f"graph g(%x: f32[4, 1024]) {{\n  %v = view(%x, offset=0, {attrs})\n  return %v\n}}\n"
    with pytest.raises(ParseError) as e:
        parse_ir(text, "bad.ir")
    assert str(e.value).startswith("bad.ir:2:8: view:") and message in str(e.value)


@pytest.mark.parametrize("attrs, message", [
    ("n_dims=-2147483648", "n_dims -2147483648 must be even and in (0, head_dim 64]"),
    ("freq_base=0.0", "freq_base 0.0 must be finite and positive"),
    ("freq_scale=-inf", "freq_scale -inf must be finite and positive"),
], ids=["n-dims-min", "freq-base-0", "freq-scale-inf"])
def test_rope_attributes_outside_their_meaning(attrs, message):
    from ember.errors import ParseError
    text = (f"graph g(%x: f32[2, 4, 64], %p: i32[2]) {{\n  %r = rope(%x, %p, {attrs})\n  return %r\n}}\n")
    with pytest.raises(ParseError, match=r"bad.ir:2:8: rope: " + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_ir(text, "bad.ir")


def test_norm_eps_negative_is_refused():
    x = input_node("x", "f32", (4, 8))
    with pytest.raises(Exception, match="rms_norm: eps -1.0 must be finite and >= 0"):
        make_node("rms_norm", [x], {"eps": -1.0})


@pytest.mark.parametrize("offset, strides", [(257, (512, 4)), (256, (512, 1))], ids=["offset", "stride"])
def test_view_splitting_an_element_is_refused(offset, strides):
    # found by the IR fuzzer: OpenCL read such views wrongly (kernels address whole elements)
    x = input_node("x", "f32", (8, 64))
    with pytest.raises(Exception, match="must be multiples of the 4-byte f32 element"):
        make_node("view", [x], {"shape": (4, 32), "strides": strides, "offset": offset})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", ["softmax", "attention"])
def test_a_softmax_scale_that_is_not_finite_is_refused_naming_it(op, value):
    """scale=nan once compiled to NaN rows on the CPU and zero rows on OpenCL and Vulkan (found by
    the fuzzer): the type rule refuses a scale or cap that is not a finite number."""
    call = (f"softmax(%x, scale={value})" if op == "softmax"
            else f"attention(%x, %x, %x, scale={value}, causal=true)")
    text = f"graph g(%x: f32[4, 2, 64]) {{\n  %s = {call}\n  return %s\n}}\n"
    with pytest.raises(ParseError, match=rf"bad.ir:2:8: {op}: attribute scale={value} is not a finite number"):
        parse_ir(text, source="bad.ir")
