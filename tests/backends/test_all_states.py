"""The recurrent ops' all_states output on every backend, bit for bit: the state a T-token call
writes after token t equals the state reached by feeding the tokens one at a time (each call's
returned state carried into the next), on that backend. This is what lets a speculative verify
batch keep any accepted prefix's state (ember.runtime.speculative)."""
from __future__ import annotations

import numpy as np
import pytest

from ember.ir import GraphBuilder

T = 5


def _scan_graph(T: int, H: int, P: int, N: int, G: int, all_states: bool, per_state: bool = False):
    b = GraphBuilder(f"scan_T{T}")
    state = b.input("state", "f32", (H, P, N))
    x, dt = b.input("x", "f32", (T, H, P)), b.input("dt", "f32", (T, H))
    a = b.input("A", "f32", (H, N) if per_state else (H,))
    bm, cm = b.input("B", "f32", (T, G, N)), b.input("C", "f32", (T, G, N))
    return b.build(b.ssm_scan(state, x, dt, a, bm, cm, all_states=all_states))


def _gdn_graph(T: int, H_k: int, H_v: int, S_k: int, S_v: int, kda: bool, all_states: bool):
    b = GraphBuilder(f"gdn_T{T}")
    q, k = b.input("q", "f32", (T, H_k, S_k)), b.input("k", "f32", (T, H_k, S_k))
    v = b.input("v", "f32", (T, H_v, S_v))
    g = b.input("g", "f32", (T, H_v, S_k) if kda else (T, H_v))
    beta = b.input("beta", "f32", (T, H_v))
    state = b.input("state", "f32", (H_v, S_v, S_k))
    return b.build(b.gated_delta_net(q, k, v, g, beta, state, scale=S_k ** -0.5, all_states=all_states))


def _scan_inputs(rng, H, P, N, G, per_state=False):
    return {"state": rng.standard_normal((H, P, N)).astype(np.float32),
            "x": rng.standard_normal((T, H, P)).astype(np.float32),
            "dt": rng.standard_normal((T, H)).astype(np.float32),
            "A": -np.abs(rng.standard_normal((H, N) if per_state else H)).astype(np.float32) - 0.5,
            "B": rng.standard_normal((T, G, N)).astype(np.float32),
            "C": rng.standard_normal((T, G, N)).astype(np.float32)}


def _gdn_inputs(rng, H_k, H_v, S_k, S_v, kda):
    def unit(shape):
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return {"q": unit((T, H_k, S_k)), "k": unit((T, H_k, S_k)),
            "v": rng.standard_normal((T, H_v, S_v)).astype(np.float32),
            "g": -(0.5 * np.abs(rng.standard_normal((T, H_v, S_k) if kda else (T, H_v))) + 0.02).astype(np.float32),
            "beta": rng.uniform(0.05, 1.0, (T, H_v)).astype(np.float32),
            "state": (0.3 * rng.standard_normal((H_v, S_v, S_k))).astype(np.float32)}


def _check(backend, build, inputs, n_out: int, state_shape):
    """build(T, all_states) -> graph; inputs: T tokens' operands (token axis first, except the
    state and the scan's per-head A)."""
    size = int(np.prod(state_shape))
    (flat,) = backend.compile(build(T, True)).run(inputs)
    states = flat[T * n_out:].reshape(T, size)
    (last,) = backend.compile(build(T, False)).run(inputs)
    np.testing.assert_array_equal(last[T * n_out:], states[-1])     # the last one is the plain result
    np.testing.assert_array_equal(last[:T * n_out], flat[:T * n_out])  # outputs unchanged
    one = backend.compile(build(1, False))
    state = inputs["state"]
    for t in range(T):
        step = {name: (value if name in ("state", "A") else value[t:t + 1]) for name, value in inputs.items()}
        step["state"] = state
        (out,) = one.run(step)
        state = out[n_out:].reshape(state_shape)
        np.testing.assert_array_equal(states[t], state.reshape(-1), err_msg=f"state after token {t}")


@pytest.mark.parametrize("per_state", [False, True], ids=["mamba2-decay-per-head", "mamba1-decay-per-state"])
def test_ssm_scan_all_states_are_the_one_token_states(backend, per_state):
    # Mamba-1 (jamba): 37 heads of one channel, one group, 13 state entries each with its decay
    H, P, N, G = (37, 1, 13, 1) if per_state else (4, 8, 16, 2)
    inputs = _scan_inputs(np.random.default_rng(0), H, P, N, G, per_state)
    _check(backend, lambda t, all_states: _scan_graph(t, H, P, N, G, all_states, per_state), inputs, H * P,
           (H, P, N))


@pytest.mark.parametrize("kda", [False, True], ids=["per-head-decay", "per-channel-decay"])
def test_gated_delta_net_all_states_are_the_one_token_states(backend, kda):
    H_k, H_v, S_k, S_v = 2, 4, 16, 8
    inputs = _gdn_inputs(np.random.default_rng(1), H_k, H_v, S_k, S_v, kda)
    _check(backend, lambda t, all_states: _gdn_graph(t, H_k, H_v, S_k, S_v, kda, all_states), inputs,
           H_v * S_v, (H_v, S_v, S_k))


def _planes_graph(T: int, H: int, P: int, N: int, G: int, R: int, delta: bool):
    """A step graph's recurrent layer: the state read from plane src of a table, the scan with
    all_states, its states written back with set_rows(planes, slots, states) (the contract of
    ember.models.common), its outputs read on through a copy."""
    b = GraphBuilder("scan_planes")
    planes = b.input("planes", "f32", (R, H * P * N))
    src, slots = b.input("src", "i32", (1,)), b.input("slots", "i32", (T,))
    state = b.reshape(b.get_rows(planes, src), H, P, N)
    if delta:       # H = H_v, P = S_v, N = S_k, G = H_k
        q, k = b.input("q", "f32", (T, G, N)), b.input("k", "f32", (T, G, N))
        v, g, beta = b.input("v", "f32", (T, H, P)), b.input("g", "f32", (T, H)), b.input("beta", "f32", (T, H))
        out = b.gated_delta_net(q, k, v, g, beta, state, scale=N ** -0.5, all_states=True)
    else:
        x, dt, a = b.input("x", "f32", (T, H, P)), b.input("dt", "f32", (T, H)), b.input("A", "f32", (H,))
        bm, cm = b.input("B", "f32", (T, G, N)), b.input("C", "f32", (T, G, N))
        out = b.ssm_scan(state, x, dt, a, bm, cm, all_states=True)
    y = b.view(out, shape=(T, H, P), strides=(H * P * 4, P * 4, 4))
    states = b.view(out, shape=(T, H * P * N), strides=(H * P * N * 4, 4), offset=T * H * P * 4)
    return b.build(b.cont(y), b.set_rows(planes, slots, states))


@pytest.mark.parametrize("delta", [False, True], ids=["ssm_scan", "gated_delta_net"])
def test_all_states_written_into_their_planes(backend, delta):
    # what a verify step does: every state lands in the plane state_slots names (a repeated slot
    # keeps the later token's), the other planes stay; on the CPU the scan writes them itself
    # (CpuRenderer.scan_kernel), into the table bound in place or into a separate output
    H, P, N, G, R = 4, 8, 16, 2, 6
    rng = np.random.default_rng(2)
    if delta:
        inputs = _gdn_inputs(rng, G, H, N, P, kda=False)
        plain = _gdn_graph(T, G, H, N, P, False, True)
    else:
        inputs = _scan_inputs(rng, H, P, N, G)
        plain = _scan_graph(T, H, P, N, G, True)
    (flat,) = backend.compile(plain).run(inputs)
    states = flat[T * H * P:].reshape(T, -1)
    table = rng.standard_normal((R, H * P * N)).astype(np.float32)
    table[2] = inputs["state"].reshape(-1)
    slots = np.array([3, 1, 4, 1, 0], np.int32)
    expected = table.copy()
    expected[slots] = states            # NumPy keeps the last of a repeated index too
    fused = {**{k: v for k, v in inputs.items() if k != "state"}, "planes": table,
             "src": np.array([2], np.int32), "slots": slots}
    executable = backend.compile(_planes_graph(T, H, P, N, G, R, delta))
    y, planes = executable.run(fused)
    np.testing.assert_array_equal(y.reshape(-1), flat[:T * H * P])
    np.testing.assert_array_equal(planes, expected)
    if backend.name == "cpu":
        assert "_set_rows(" not in executable.source     # the scan stored the states itself
        in_place = table.copy()
        executable.run({**fused, "planes": in_place}, {1: in_place})
        np.testing.assert_array_equal(in_place, expected)
