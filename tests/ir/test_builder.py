import numpy as np
import pytest

from ember.ir import GraphBuilder, ShapeError, dtypes, make_node, verify
from ember.ir.builder import input_node, literal_node
from ember.ir.interpreter import run_reference

T, D, HEADS, KV_HEADS, HEAD_DIM, FFN = 5, 64, 4, 2, 16, 128


def build_block(weight_type="q8_0"):
    """A llama-style transformer block: pre-norm GQA attention with rope, then a SwiGLU MLP."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("block")
    x = b.input("x", "f32", (T, D))
    pos = b.input("pos", "i32", (T,))

    def weight(name, *shape):
        return b.weight(name, rng.standard_normal(shape) / np.sqrt(shape[-1]), weight_type)

    h = b.mul(b.rms_norm(x, eps=1e-5), b.weight("attn_norm", np.ones(D)))
    q = b.reshape(b.mul_mat(h, weight("wq", HEADS * HEAD_DIM, D)), T, HEADS, HEAD_DIM)
    k = b.reshape(b.mul_mat(h, weight("wk", KV_HEADS * HEAD_DIM, D)), T, KV_HEADS, HEAD_DIM)
    v = b.reshape(b.mul_mat(h, weight("wv", KV_HEADS * HEAD_DIM, D)), T, KV_HEADS, HEAD_DIM)
    q = b.rope(q, pos, mode="neox")
    k = b.rope(k, pos, mode="neox")
    att = b.attention(q, k, v, scale=HEAD_DIM ** -0.5, causal=True)
    x = b.add(x, b.mul_mat(b.reshape(att, T, HEADS * HEAD_DIM), weight("wo", D, HEADS * HEAD_DIM)))
    h = b.mul(b.rms_norm(x, eps=1e-5), b.weight("ffn_norm", np.ones(D)))
    up = b.swiglu(b.mul_mat(h, weight("w_gate", FFN, D)), b.mul_mat(h, weight("w_up", FFN, D)))
    out = b.add(x, b.mul_mat(up, weight("w_down", D, FFN)))
    return b.build(out)


def test_transformer_block_builds_verifies_and_runs():
    g = build_block()
    verify(g)
    assert [n.name for n in g.inputs] == ["x", "pos"]
    assert str(g.outputs[0].type) == "f32[5, 64]"
    assert g.constants["wq"].dtype == np.uint8 and g.constants["wq"].shape == (64, 68)
    assert sum(n.op == "mul_mat" for n in g.nodes) == 7
    (out,) = run_reference(g, seed=1)
    assert out.shape == (T, D) and np.isfinite(out).all()


def test_same_node_twice_is_the_same_object():
    x = input_node("x", "f32", (4,))
    assert make_node("exp", [x]) is make_node("exp", [x])
    assert make_node("scale", [x], {"scale": 2}) is make_node("scale", [x], {"scale": 2.0, "bias": 0.0})


@pytest.mark.parametrize("op, operands, attrs, message", [
    ("add", [("f32", (4, 8)), ("f32", (3,))], {}, r"add: b of shape \[3\] does not broadcast"),
    ("mul_mat", [("f32", (4, 8)), ("f32", (16, 4))], {}, r"mul_mat: inner sizes differ"),
    ("rope", [("f32", (4, 2, 8)), ("f32", (4,))], {}, r"rope: pos has dtype f32"),
    ("attention", [("f32", (4, 3, 8)), ("f32", (4, 2, 8)), ("f32", (4, 2, 8))], {"scale": 1.0},
     r"attention: q heads 3 not a multiple of kv heads 2"),
    ("reshape", [("f32", (4, 8))], {"shape": (5, 6)}, r"reshape: \[4, 8\] has 32 values"),
    ("view", [("f32", (4, 8))], {"shape": (4, 8), "strides": (32, 4), "offset": 4},
     r"view: bytes \[4, 132\) fall outside"),
    ("rms_norm", [("f32", (4,))], {"epsilon": 1.0}, r"rms_norm: unknown attribute\(s\) \['epsilon'\]"),
    ("scale", [("f32", (4,))], {}, r"scale: missing attribute 'scale'"),
    ("exp", [("f32", (4,)), ("f32", (4,))], {}, r"exp: takes 1 operands"),
    ("rope", [("f32", (4, 2, 8)), ("i32", (4,))], {"mode": "glm"}, r"rope: attribute mode='glm'"),
])
def test_shape_rule_errors_name_the_op(op, operands, attrs, message):
    nodes = [input_node(f"in{i}", dt, shape) for i, (dt, shape) in enumerate(operands)]
    with pytest.raises(ShapeError, match=message):
        make_node(op, nodes, attrs)


def test_builder_rejects_bad_sources():
    b = GraphBuilder()
    b.input("x", "f32", (4,))
    with pytest.raises(ShapeError, match="declared twice"):
        b.input("x", "f32", (4,))
    with pytest.raises(ShapeError, match="unknown op 'frobnicate'"):
        b.op("frobnicate")
    with pytest.raises(ShapeError, match="give the logical shape"):
        b.const("w", np.zeros((4, 34), np.uint8), "q8_0")
    with pytest.raises(ShapeError, match="does not store"):
        b.const("w", np.zeros((4, 30), np.uint8), "q8_0", (4, 32))
    with pytest.raises(ShapeError, match="at most 16 values"):
        literal_node(np.zeros(17))
    with pytest.raises(ShapeError, match="do not fill"):
        literal_node([1.0, 2.0, 3.0], "f32", (2,))
    with pytest.raises(ShapeError, match="cannot be q8_0"):
        literal_node([1.0], "q8_0", (1,))


def test_literals_hold_values_of_their_type():
    assert literal_node([0.1], "f16").attr("value") == (float(np.float16(0.1)),)
    bf = literal_node([1.1, -2.0], "bf16")
    assert bf.attr("value") == (1.1015625, -2.0)
    b = GraphBuilder()
    g = b.build(bf)
    assert dtypes.bf16_to_f32(g.constant_data(bf)).tolist() == [1.1015625, -2.0]
