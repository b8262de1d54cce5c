"""gated_delta_net in the IR: its shape rules (errors name the operand), its reference against a
loop written in ggml's orientation, the head mapping (modulo), the split identity of the
reference and the text round trip."""
import numpy as np
import pytest

from ember.ir import GraphBuilder, ShapeError, make_node, run_reference
from ember.ir.builder import input_node
from ember.ir.parser import parse_ir
from ember.ir.printer import print_ir

GOOD = {"q": (3, 2, 8), "k": (3, 2, 8), "v": (3, 4, 5), "g": (3, 4), "beta": (3, 4), "state": (4, 5, 8)}


def _node(scale=0.5, **shapes):
    operands = {**GOOD, **shapes}
    return make_node("gated_delta_net", [input_node(n, "f32", s) for n, s in operands.items()], {"scale": scale})


def test_good_shapes_give_outputs_then_state():
    assert str(_node().type) == f"f32[{3 * 4 * 5 + 4 * 5 * 8}]"
    assert str(_node(g=(3, 4, 8)).type) == f"f32[{3 * 4 * 5 + 4 * 5 * 8}]"     # per key channel


@pytest.mark.parametrize("shapes, message", [
    (dict(v=(3, 3, 5), g=(3, 3), beta=(3, 3), state=(3, 5, 8)), r"v has 3 heads, not a multiple of the 2 heads"),
    (dict(state=(4, 8, 5)), r"state \[4, 8, 5\] must be \[4, 5, 8\]"),
    (dict(state=(4, 5)), r"state \[4, 5\] has rank 2"),
    (dict(k=(3, 2, 7)), r"k \[3, 2, 7\] must have q's shape"),
    (dict(v=(2, 4, 5)), r"v \[2, 4, 5\] must have q's 3 tokens"),
    (dict(g=(3, 2)), r"g \[3, 2\] must be \[3, 4\] \(per head\) or \[3, 4, 8\]"),
    (dict(g=(3, 4, 5)), r"g \[3, 4, 5\] must be"),
    (dict(beta=(3, 4, 1)), r"beta \[3, 4, 1\] has rank 3"),
    (dict(beta=(3, 2)), r"beta \[3, 2\] must be \[3, 4\]"),
], ids=["bad-group-ratio", "state-transposed", "state-rank", "k-shape", "v-tokens", "g-heads", "g-channels",
        "beta-rank", "beta-heads"])
def test_shape_rule_errors_name_the_operand(shapes, message):
    with pytest.raises(ShapeError, match="gated_delta_net: " + message):
        _node(**shapes)


SEQS = {name: (2,) + shape for name, shape in GOOD.items()}      # two sequences (ggml's n_seqs)


def test_sequences_give_every_output_then_every_state():
    assert str(_node(**SEQS).type) == f"f32[{2 * (3 * 4 * 5 + 4 * 5 * 8)}]"
    assert str(_node(**dict(SEQS, g=(2, 3, 4, 8))).type) == f"f32[{2 * (3 * 4 * 5 + 4 * 5 * 8)}]"


@pytest.mark.parametrize("shapes, message", [
    (dict(SEQS, v=(3, 3, 4, 5)), r"v \[3, 3, 4, 5\] must have the state's 2 sequences first"),
    (dict(SEQS, q=(3, 2, 8)), r"q \[3, 2, 8\] has rank 3; expected q, k \[N, T, H_k, S_k\]"),
    (dict(SEQS, beta=(2, 3, 5)), r"beta \[3, 5\] must be \[3, 4\] per sequence"),
], ids=["sequence-count", "operand-without-sequence-axis", "beta-heads"])
def test_sequence_shape_errors_name_the_operand(shapes, message):
    with pytest.raises(ShapeError, match="gated_delta_net: " + message):
        _node(**shapes)


def test_reference_runs_each_sequence_alone():
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(s).astype(np.float32) for s in SEQS.values()]
    xs[3] = -np.abs(xs[3])
    node = _node(**SEQS)
    together = run_reference_node(node, xs)
    alone = [run_reference_node(_node(), [x[n] for x in xs]) for n in range(2)]
    rows = 3 * 4 * 5
    assert np.array_equal(together, np.concatenate([a[:rows] for a in alone] + [a[rows:] for a in alone]))


def run_reference_node(node, xs):
    b = GraphBuilder("one")
    ins = [b.input(n, "f32", x.shape) for n, x in zip(GOOD, xs)]
    out = b.gated_delta_net(*ins, scale=node.attr("scale"))
    return run_reference(b.build([out]), dict(zip(GOOD, xs)))[0]


def test_dtype_and_attribute_errors():
    operands = [input_node(n, "f16" if n == "v" else "f32", s) for n, s in GOOD.items()]
    with pytest.raises(ShapeError, match="gated_delta_net: v has dtype f16"):
        make_node("gated_delta_net", operands, {"scale": 1.0})
    with pytest.raises(ShapeError, match="gated_delta_net: missing attribute 'scale'"):
        make_node("gated_delta_net", [input_node(n, "f32", s) for n, s in GOOD.items()], {})


def _random(shapes, kda=False, seed=0):
    rng = np.random.default_rng(seed)
    data = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    data["g"] = -np.abs(data["g"]) * 0.3
    data["beta"] = rng.uniform(0.1, 1.0, shapes["beta"]).astype(np.float32)
    return data


def _run(data, scale):
    b = GraphBuilder()
    nodes = [b.input(n, "f32", a.shape) for n, a in data.items()]
    (out,) = run_reference(b.build(b.gated_delta_net(*nodes, scale=scale)), data)
    return out


def _ggml_loop(d, scale):
    """ggml's loop: state row j of v head h is M[j] (over key channels), q/k head h % H_k."""
    q, k, v, g, beta, state = (d[n].astype(np.float64) for n in GOOD)
    T, H_k, _ = q.shape
    M = state.copy()
    o = np.zeros(v.shape)
    for t in range(T):
        for h in range(M.shape[0]):
            M[h] *= np.exp(g[t, h])                       # a scalar, or one factor per key channel
            for j in range(M.shape[1]):
                delta = (v[t, h, j] - M[h, j] @ k[t, h % H_k]) * beta[t, h]
                M[h, j] += delta * k[t, h % H_k]
                o[t, h, j] = (M[h, j] @ q[t, h % H_k]) * scale
    return np.concatenate([o.reshape(-1), M.reshape(-1)])


@pytest.mark.parametrize("kda", [False, True], ids=["per-head-decay", "per-channel-decay"])
def test_reference_matches_ggml_loop(kda):
    shapes = {**GOOD, "g": (3, 4, 8) if kda else (3, 4)}
    data = _random(shapes)
    np.testing.assert_allclose(_run(data, 0.35), _ggml_loop(data, 0.35), rtol=1e-5, atol=1e-5)


def test_v_head_h_reads_qk_head_h_mod_hk():
    data = _random(GOOD)
    base = _run(data, 1.0)
    data["k"] = data["k"].copy()
    data["k"][:, 1] += 1.0                    # k head 1: read by v heads 1 and 3 (modulo), not 2 and 3
    changed = (_run(data, 1.0)[:3 * 4 * 5] != base[:3 * 4 * 5]).reshape(3, 4, 5).any(axis=(0, 2))
    assert changed.tolist() == [False, True, False, True]


def test_reference_split_identity():
    data = _random(GOOD)
    full = _run(data, 0.5)
    rows, state = 4 * 5, data["state"]
    for t in range(3):
        step = _run({n: (a if n == "state" else a[t:t + 1]) for n, a in {**data, "state": state}.items()}, 0.5)
        np.testing.assert_allclose(step[:rows], full[t * rows:(t + 1) * rows], rtol=1e-6, atol=1e-6)
        state = step[rows:].reshape(4, 5, 8)
    np.testing.assert_allclose(state.reshape(-1), full[3 * rows:], rtol=1e-6, atol=1e-6)


def test_text_round_trip():
    b = GraphBuilder("gdn")
    nodes = [b.input(n, "f32", s) for n, s in GOOD.items()]
    g = b.build(b.gated_delta_net(*nodes, scale=0.25))
    text = print_ir(g)
    assert "gated_delta_net" in text and "scale=0.25" in text
    assert print_ir(parse_ir(text)) == text
