"""The mixture-of-experts ops on every backend, beyond the conformance cases: batch invariance
(a token's expert outputs are the bits it gets alone, on every backend), an expert id out of
range as a status error naming the node, and a whole MoE FFN against plain NumPy and against its
own decode steps."""
import numpy as np
import pytest

from ember.backends.cpu.backend import CpuBackend
from ember.errors import EmberError
from ember.ir import GraphBuilder, dtypes
from ember.testing import nmse
from moe_ffn import MoeShape, as_stored, build_moe_ffn, moe_weights, numpy_moe_ffn

E, N = 7, 5
# Each token's experts; the other tokens of the batch choose others (and repeat some).
IDS = np.array([[0, 3, 6], [3, 3, 1], [6, 5, 4], [2, 0, 1], [4, 4, 4], [1, 2, 3],
                [0, 1, 2], [5, 6, 0], [3, 2, 1]], np.int32)


def _require(backend, graph):
    for node in graph.nodes:
        if node.op not in ("input", "const"):
            ok, reason = backend.supports_op(node)
            if not ok:
                pytest.skip(f"{backend.name}: unsupported: {reason}")


def _experts(T, wtypes, seed=0):
    """For each weight type, an up projection x [T, K] -> [T, 3, K] and a down projection with one
    input row per selected expert -> [T, 3, N], both through mul_mat_id (K = 256 for 256-value
    blocks, 64 else); all in one graph (one compile), with inputs x64 and x256 for 9 tokens."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(f"experts_T{T}")
    ids = b.input("ids", "i32", (T, 3))
    xs, outputs = {}, []
    for wtype in wtypes:
        K = 256 if dtypes.dtype(wtype).block_size == 256 else 64
        if K not in xs:
            xs[K] = b.input(f"x{K}", "f32", (T, K))
        up = b.mul_mat_id(xs[K], b.weight(f"up_{wtype}", rng.standard_normal((E, K, K)) / 8, wtype), ids)
        down = b.mul_mat_id(b.silu(up), b.weight(f"down_{wtype}", rng.standard_normal((E, N, K)), wtype), ids)
        outputs += [up, down]
    return b.build(*outputs), {f"x{K}": rng.standard_normal((9, K)).astype(np.float32) for K in xs}


def _token_alone_equals_batch(batch_exe, alone_exe, xs):
    got = batch_exe.run({**xs, "ids": IDS})
    for t in range(len(IDS)):
        one = alone_exe.run({**{k: x[t:t + 1] for k, x in xs.items()}, "ids": IDS[t:t + 1]})
        for i, (g, o) in enumerate(zip(got, one)):
            np.testing.assert_array_equal(g[t], o[0], err_msg=f"token {t}, output {i}")


# A float weight, a 32-value block and a 256-value k-quant block in the default run (each graph
# is a device compile, seconds on PoCL); every other weight type with -m slow. The GPU renderers'
# tests check that one token and a batch run the same kernel text for every weight type.
FIRST_WTYPES = ("f32", "q8_0", "q4_k")


@pytest.mark.parametrize("wtypes", [
    pytest.param(FIRST_WTYPES, id="-".join(FIRST_WTYPES)),
    pytest.param(tuple(d.name for d in dtypes.WEIGHT_TYPES if d.name not in FIRST_WTYPES), id="others",
                 marks=pytest.mark.slow)])
def test_mul_mat_id_is_batch_invariant(backend, wtypes):
    """For each weight type, each token computed alone gives the bits it gets in a batch of 9
    whose other tokens chose other experts."""
    batch, xs = _experts(9, wtypes)
    alone, _ = _experts(1, wtypes)
    _require(backend, batch)
    _token_alone_equals_batch(backend.compile(batch), backend.compile(alone), xs)


@pytest.mark.parametrize("wtype", ["f32", "q4_0", "q6_k"])
def test_mul_mat_id_cpu_bits_do_not_depend_on_threads(backend_cache, wtype):
    batch, xs = _experts(9, [wtype])
    alone, _ = _experts(1, [wtype])
    one_thread = CpuBackend(threads=1, cache_dir=backend_cache)
    three = CpuBackend(threads=3, cache_dir=backend_cache)
    _token_alone_equals_batch(three.compile(batch), one_thread.compile(alone), xs)


@pytest.mark.parametrize("op", ["mul_mat_id", "take_along"])
def test_an_expert_id_out_of_range_is_an_error_naming_the_node(backend, op):
    b = GraphBuilder("experts")
    ids = b.input("ids", "i32", (2, 2))
    if op == "mul_mat_id":
        y = b.mul_mat_id(b.input("x", "f32", (2, 32)), b.weight("w", np.ones((4, 3, 32)), "f16"), ids)
        want = np.full((2, 2, 3), 32.0, np.float32)
    else:
        y = b.take_along(b.input("x", "f32", (2, 4), ), ids)
        want = np.ones((2, 2), np.float32)
    graph = b.build(y)
    _require(backend, graph)
    exe = backend.compile(graph)
    x = np.ones((2, 32 if op == "mul_mat_id" else 4), np.float32)
    good = np.array([[3, 0], [1, 1]], np.int32)
    np.testing.assert_array_equal(exe.run({"x": x, "ids": good})[0], want)
    with pytest.raises(EmberError, match=rf"%\d+ = {op}\(%x, .*%ids\).*an index is out of range \[0, 4\)"):
        exe.run({"x": x, "ids": np.array([[3, 0], [4, 1]], np.int32)})
    np.testing.assert_array_equal(exe.run({"x": x, "ids": good})[0], want)   # the status is cleared


T9 = MoeShape()
T1_SIGMOID = MoeShape(T=1, gating="sigmoid", renorm=False, shared=False)
BOUND = {"f32": 1e-7, "q8_0": 1e-3, "q4_k": 1e-3}
# Each case is a device compile (seconds on PoCL): the default run takes the f32 and q8_0 FFN and
# the q8_0 one-token sigmoid FFN; -m slow the rest (every weight type's numerics are the
# conformance suite's mul_mat_id cases).
FFN_CASES = [pytest.param(T9, w, id=f"T9-softmax-renorm-shared-{w}", marks=pytest.mark.slow if w == "q4_k" else [])
             for w in BOUND] + [
    pytest.param(T1_SIGMOID, w, id=f"T1-sigmoid-{w}", marks=[] if w == "q8_0" else pytest.mark.slow)
    for w in BOUND]


# the NumPy FFN reads the weights as stored (dequantized): what is left is 8-bit activations
@pytest.mark.parametrize("shape, wtype", FFN_CASES)
def test_moe_ffn_matches_numpy(backend, shape, wtype):
    shape = MoeShape(**{**shape.__dict__, "D": 256, "F": 256}) if wtype == "q4_k" else shape
    weights = moe_weights(shape)
    graph = build_moe_ffn(shape, weights, wtype)
    _require(backend, graph)
    x = np.random.default_rng(1).standard_normal((shape.T, shape.D)).astype(np.float32)
    (got,) = backend.compile(graph).run({"x": x})
    assert nmse(got, numpy_moe_ffn(shape, as_stored(weights, wtype), x)) <= BOUND[wtype]


def test_moe_ffn_rows_equal_decode_rows(backend):
    """The whole FFN (router, top_k, take_along, three mul_mat_id, shared expert): each token of a
    batch of 9 gets the bits of its own one-token step, whatever experts the others chose. (The
    batch graph is test_moe_ffn_matches_numpy's q8_0 one: compiled once.)"""
    shape, wtype = T9, "q8_0"
    weights = moe_weights(shape)
    batch, decode = build_moe_ffn(shape, weights, wtype), build_moe_ffn(shape, weights, wtype, T=1)
    _require(backend, batch)
    x = np.random.default_rng(3).standard_normal((shape.T, shape.D)).astype(np.float32)
    (got,) = backend.compile(batch).run({"x": x})
    step = backend.compile(decode)
    for t in range(shape.T):
        np.testing.assert_array_equal(got[t], step.run({"x": x[t:t + 1]})[0][0], err_msg=f"token {t}")
