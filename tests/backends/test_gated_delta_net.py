"""gated_delta_net's split identity on every backend: a sequence run as one call of T tokens gives
the same bits as T calls of one token, each carrying the state the last one returned (a decode
step must equal a prompt row: speculative decoding depends on it). Each backend's kernel walks
the tokens of one state row in order with the state in f32 between tokens, and its per-token
arithmetic does not depend on T, so the identity is exact on cpu, opencl and vulkan alike.
Several sequences in one call (ggml's n_seqs): each sequence's part of the result equals, bit for
bit, the call of that sequence alone (its tokens touch its own state only), for decode steps and
prompt rows, with a state the sequences do not share the layout of.
The values themselves are checked against the reference by the conformance suite."""
from __future__ import annotations

import numpy as np
import pytest

from devices import make_backend
from ember.ir import GraphBuilder


def _token(b: GraphBuilder, x, t: int):
    """Token t of x [T, ...] as a [1, ...] view."""
    step = x.type.strides[0]
    return b.view(x, shape=(1,) + x.shape[1:], strides=x.type.strides, offset=t * step)


def _split_graph(T, H_k, H_v, S_k, S_v, kda):
    """Outputs: the T-token call, then the T one-token calls chained through their states."""
    b = GraphBuilder("gdn_split")
    q, k = b.input("q", "f32", (T, H_k, S_k)), b.input("k", "f32", (T, H_k, S_k))
    v = b.input("v", "f32", (T, H_v, S_v))
    g = b.input("g", "f32", (T, H_v, S_k) if kda else (T, H_v))
    beta, state = b.input("beta", "f32", (T, H_v)), b.input("state", "f32", (H_v, S_v, S_k))
    scale = S_k ** -0.5
    outputs = [b.gated_delta_net(q, k, v, g, beta, state, scale=scale)]
    carried = state
    for t in range(T):
        out = b.gated_delta_net(*(_token(b, x, t) for x in (q, k, v, g, beta)), carried, scale=scale)
        outputs.append(out)
        carried = b.view(out, shape=(H_v, S_v, S_k), strides=(S_v * S_k * 4, S_k * 4, 4), offset=H_v * S_v * 4)
    return b.build(outputs)


def _inputs(graph, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for node in graph.inputs:
        x = rng.standard_normal(node.shape)
        if node.name in ("q", "k"):
            x /= np.linalg.norm(x, axis=-1, keepdims=True)
        elif node.name == "g":
            x = -(0.5 * np.abs(x) + 0.02)
        elif node.name == "beta":
            x = rng.uniform(0.05, 1.0, node.shape)
        data[node.name] = x.astype(np.float32)
    return data


SHAPES = {"grouped-S16": (6, 2, 4, 16, 16, False), "odd-Sk13-Sv7": (5, 3, 6, 13, 7, False),
          "kda-S12": (4, 2, 4, 12, 12, True)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_t_tokens_at_once_equal_t_single_steps_bit_for_bit(backend, shape):
    T, H_k, H_v, S_k, S_v, kda = shape
    graph = _split_graph(*shape)
    full, *steps = backend.compile(graph).run(_inputs(graph))
    rows = H_v * S_v
    np.testing.assert_array_equal(full[:T * rows], np.concatenate([s[:rows] for s in steps]))
    np.testing.assert_array_equal(full[T * rows:], steps[-1][rows:])
    assert np.any(full[T * rows:] != _inputs(graph)["state"].reshape(-1))   # the state moved


def test_cpu_result_does_not_depend_on_the_thread_count(backend_cache):
    graph = _split_graph(*SHAPES["odd-Sk13-Sv7"])
    inputs = _inputs(graph, seed=1)
    one, many = (make_backend("cpu", backend_cache, threads=n).compile(graph).run(inputs) for n in (1, 2))
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def _sequences_graph(N, T, H_k, H_v, S_k, S_v, kda, all_states):
    """Outputs: one call over N sequences, then N calls of one sequence each, whose operands are
    the N-sequence operands' slices (views: the same bytes, no copy)."""
    b = GraphBuilder("gdn_sequences")
    q, k = b.input("q", "f32", (N, T, H_k, S_k)), b.input("k", "f32", (N, T, H_k, S_k))
    v = b.input("v", "f32", (N, T, H_v, S_v))
    g = b.input("g", "f32", (N, T, H_v, S_k) if kda else (N, T, H_v))
    beta, state = b.input("beta", "f32", (N, T, H_v)), b.input("state", "f32", (N, H_v, S_v, S_k))
    scale = S_k ** -0.5
    operands = (q, k, v, g, beta, state)
    outputs = [b.gated_delta_net(*operands, scale=scale, all_states=all_states)]
    for n in range(N):
        alone = (b.view(x, shape=x.shape[1:], strides=x.type.strides[1:], offset=n * x.type.strides[0])
                 for x in operands)
        outputs.append(b.gated_delta_net(*alone, scale=scale, all_states=all_states))
    return b.build(outputs)


SEQUENCES = {"decode-3seqs": (3, 1, 2, 4, 16, 16, False, False),
             "prompt-2seqs-odd": (2, 5, 3, 6, 13, 7, False, False),
             "kda-all-states-3seqs": (3, 4, 2, 4, 12, 12, True, True)}


@pytest.mark.parametrize("shape", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_each_sequence_equals_its_call_alone_bit_for_bit(backend, shape):
    N, T, H_k, H_v, S_k, S_v, kda, all_states = shape
    graph = _sequences_graph(*shape)
    inputs = _inputs(graph, seed=2)
    together, *alone = backend.compile(graph).run(inputs)
    rows, states = T * H_v * S_v, (T if all_states else 1) * H_v * S_v * S_k
    assert together.size == N * (rows + states)
    for n, one in enumerate(alone):
        np.testing.assert_array_equal(together[n * rows:(n + 1) * rows], one[:rows])
        np.testing.assert_array_equal(together[N * rows + n * states:N * rows + (n + 1) * states], one[rows:])
    # each sequence starts from its own state: swapping two sequences' states changes their rows
    swapped = dict(inputs, state=inputs["state"][::-1].copy())
    other = backend.compile(graph).run(swapped)[0]
    assert np.any(other[:rows] != together[:rows])
