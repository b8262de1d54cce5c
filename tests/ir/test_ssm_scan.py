"""ssm_scan's two forms of the decay A in the IR: one per head [H] (Mamba-2) or one per head and
state entry [H, N] (Mamba-1, jamba). The shape rule (errors name A and both accepted shapes), the
reference against ggml's Mamba-1 loop, the per-head form as the per-state form with equal entries,
and the text round trip."""
import numpy as np
import pytest

from ember.ir import GraphBuilder, ShapeError, make_node, run_reference
from ember.ir.builder import input_node
from ember.ir.parser import parse_ir
from ember.ir.printer import print_ir

T, H, P, N, G = 3, 6, 1, 5, 1


def _node(a_shape, all_states=False):
    shapes = {"state": (H, P, N), "x": (T, H, P), "dt": (T, H), "A": a_shape, "B": (T, G, N), "C": (T, G, N)}
    return make_node("ssm_scan", [input_node(n, "f32", s) for n, s in shapes.items()],
                     {"all_states": all_states})


def test_a_per_head_or_per_state_entry_give_the_same_result_type():
    assert _node((H,)).type == _node((H, N)).type
    assert str(_node((H, N), all_states=True).type) == f"f32[{T * H * P + T * H * P * N}]"


@pytest.mark.parametrize("a_shape, message", [
    ((N, H), r"A \[5, 6\] must be \[6\] \(one decay per head, Mamba-2\) or \[6, 5\] \(one per head and "
             r"state entry, Mamba-1\)"),
    ((H, N + 1), r"A \[6, 6\] must be \[6\] .* or \[6, 5\]"),
    ((H - 1,), r"A \[5\] must be \[6\] .* or \[6, 5\]"),
    ((H, N, 1), r"state must be \[H, P, N\], .* A \[H\] or \[H, N\]"),
], ids=["transposed", "state-size", "heads", "rank-3"])
def test_a_of_another_shape_is_refused_naming_both_forms(a_shape, message):
    with pytest.raises(ShapeError, match="ssm_scan: " + message):
        _node(a_shape)


def _inputs(seed, per_state):
    rng = np.random.default_rng(seed)
    return {"state": rng.standard_normal((H, P, N)).astype(np.float32),
            "x": rng.standard_normal((T, H, P)).astype(np.float32),
            "dt": (2 * rng.standard_normal((T, H))).astype(np.float32),
            "A": -np.abs(rng.standard_normal((H, N) if per_state else H)).astype(np.float32),
            "B": rng.standard_normal((T, G, N)).astype(np.float32),
            "C": rng.standard_normal((T, G, N)).astype(np.float32)}


def _run(data, all_states=False):
    b = GraphBuilder()
    nodes = [b.input(n, "f32", a.shape) for n, a in data.items()]
    (out,) = run_reference(b.build(b.ssm_scan(*nodes, all_states=all_states)), data)
    return out


def _ggml_mamba1_loop(d):
    """ggml_compute_forward_ssm_scan's Mamba-1 branch (A->ne[0] != 1): channel h of one element,
    state entry i decays by exp(softplus(dt) * A[h, i])."""
    s, x, dt, a, b, c = (d[n].astype(np.float64) for n in ("state", "x", "dt", "A", "B", "C"))
    s = s[:, 0, :].copy()
    y = np.zeros((T, H))
    for t in range(T):
        for h in range(H):
            d_sp = dt[t, h] if dt[t, h] > 20 else np.log1p(np.exp(dt[t, h]))
            x_dt = x[t, h, 0] * d_sp
            for i in range(N):
                s[h, i] = s[h, i] * np.exp(d_sp * a[h, i]) + b[t, 0, i] * x_dt
                y[t, h] += s[h, i] * c[t, 0, i]
    return np.concatenate([y.reshape(-1), s.reshape(-1)])


def test_reference_is_ggmls_mamba1_loop():
    data = _inputs(0, per_state=True)
    np.testing.assert_allclose(_run(data), _ggml_mamba1_loop(data), rtol=1e-5, atol=1e-5)


def test_a_per_head_is_a_per_state_entry_with_equal_entries():
    data = _inputs(1, per_state=False)
    wide = dict(data, A=np.repeat(data["A"][:, None], N, axis=1))
    np.testing.assert_array_equal(_run(data, all_states=True), _run(wide, all_states=True))


def test_text_round_trip_keeps_the_per_state_decay():
    b = GraphBuilder("scan")
    shapes = {"state": (H, P, N), "x": (T, H, P), "dt": (T, H), "A": (H, N), "B": (T, G, N), "C": (T, G, N)}
    g = b.build(b.ssm_scan(*[b.input(n, "f32", s) for n, s in shapes.items()], all_states=True))
    text = print_ir(g)
    assert "f32[6, 5]" in text and print_ir(parse_ir(text)) == text
