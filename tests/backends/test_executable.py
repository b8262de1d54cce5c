"""The Executable contract (ember.backends.base), tested once over every backend (the `backend`
fixture: cpu, opencl, vulkan, each skipped with its reason where it cannot run): inputs checked
by name, shape and dtype with errors naming the input; arrays given for outputs and in-place
outputs; a kernel's status (an index out of range) as an error naming the node, cleared for the
next run; bound runs (fresh outputs, inputs replaced by name, in-place caches brought back by
the backend's sync_to_host); the planned arena. What only one backend does stays in its own
test file (test_cpu_backend.py, test_opencl_backend.py, test_vulkan_backend.py)."""
from __future__ import annotations

import numpy as np
import pytest

from ember.backends.base import Executable, host_storage
from ember.errors import EmberError
from ember.ir import GraphBuilder, run_reference
from ember.ir.interpreter import random_inputs
from ember.testing import nmse

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes


def small_graph(name="small"):
    """An f32 matmul and row kernels: within 1e-7 of the reference on every backend (the CPU's
    quantized matmuls round their activations to 8 bits)."""
    b = GraphBuilder(name)
    x = b.input("x", "f32", (3, 32))
    w = b.const("w", np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32))
    return b.build(b.rms_norm(b.silu(b.mul_mat(x, w))))


def cache_graph():
    """set_rows into a KV-cache-like input: output 0 may update input 'cache' in place."""
    b = GraphBuilder("kv")
    cache = b.input("cache", "f16", (16, 8))
    return b.build(b.set_rows(cache, b.input("slots", "i32", (2,)), b.input("rows", "f32", (2, 8))))


def cache_inputs(kv):
    return {"cache": kv, "slots": np.array([3, 9], np.int32),
            "rows": np.arange(16, dtype=np.float32).reshape(2, 8)}


def check(exe, graph, inputs=None, bound=1e-7):
    inputs = inputs or random_inputs(graph)
    for got, want in zip(exe.run(inputs), run_reference(graph, inputs)):
        assert nmse(got, want) <= bound


# ---- inputs ------------------------------------------------------------------------------------
def test_input_errors_name_the_input(backend):
    exe = backend.compile(small_graph())
    good = np.zeros((3, 32), np.float32)
    with pytest.raises(EmberError, match=r"input 'x'.*f32\[3, 32\].*float64"):
        exe.run({"x": good.astype(np.float64)})
    with pytest.raises(EmberError, match=r"input 'x' must be f32.*got float32\[3, 31\]"):
        exe.run({"x": good[:, :31]})
    with pytest.raises(EmberError, match=r"missing input\(s\) \['x'\]"):
        exe.run({})
    with pytest.raises(EmberError, match=r"unknown input\(s\) \['y'\]"):
        exe.run({"x": good, "y": good})


def test_non_contiguous_input_is_accepted(backend):
    graph = small_graph()
    exe = backend.compile(graph)
    x = np.asfortranarray(np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32))
    check(exe, graph, {"x": x})
    check(exe, graph, {"x": np.asfortranarray(np.ones((3, 32), np.float32))})


# ---- outputs -----------------------------------------------------------------------------------
def test_outputs_that_are_inputs_constants_views_repeated_or_empty(backend):
    b = GraphBuilder("outs")
    x = b.input("x", "f32", (3, 4))
    c = b.const("c", np.arange(6, dtype=np.float32).reshape(2, 3))
    y = b.neg(x)
    empty = b.neg(b.input("e", "f32", (0, 4)))
    graph = b.build(x, c, y, y, b.transpose(y), b.view(x, shape=(2, 2), strides=(16, 4), offset=4), empty)
    exe = backend.compile(graph)
    inputs = random_inputs(graph)
    outs = exe.run(inputs)
    for got, want in zip(outs, run_reference(graph, inputs)):
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous
    assert outs[2] is not outs[3] and outs[0] is not inputs["x"]


def test_outputs_are_written_into_given_arrays(backend):
    graph = small_graph("given")
    exe = backend.compile(graph)
    inputs = random_inputs(graph)
    out = np.full((3, 8), np.nan, np.float32)
    (got,) = exe.run(inputs, {0: out})
    assert got is out
    assert nmse(out, run_reference(graph, inputs)[0]) <= 1e-7


@pytest.mark.parametrize("bad", ["shape", "dtype", "not-contiguous", "read-only"])
def test_a_given_output_of_the_wrong_kind_is_an_error(backend, bad):
    exe = backend.compile(small_graph("bad-output"))
    out = {"shape": np.zeros((3, 9), np.float32), "dtype": np.zeros((3, 8), np.float64),
           "not-contiguous": np.zeros((8, 3), np.float32).T, "read-only": np.zeros((3, 8), np.float32)}[bad]
    out.flags.writeable = bad != "read-only"
    with pytest.raises(EmberError, match=r"output 0 must be a writable contiguous float32\[3, 8\] array"):
        exe.run({"x": np.zeros((3, 32), np.float32)}, {0: out})


def test_set_rows_updates_a_cache_where_it_lies(backend):
    graph = cache_graph()
    exe = backend.compile(graph)
    assert exe.in_place_outputs == {0: "cache"}
    kv = np.zeros((16, 8), np.float16)
    inputs = cache_inputs(kv)
    expected = run_reference(graph, dict(inputs, cache=kv.copy()))[0]
    (out,) = exe.run(inputs, {0: kv})
    assert out is kv
    np.testing.assert_array_equal(kv, expected)


def test_an_output_may_not_overlap_an_input_it_does_not_update(backend):
    x = np.zeros((3, 32), np.float32)
    with pytest.raises(EmberError, match="output 0 overlaps input 'x', which it may not update in place"):
        backend.compile(small_graph()).run({"x": x}, {0: x.reshape(-1)[:24].reshape(3, 8)})


# ---- kernel status -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "q4_0"])
def test_an_index_out_of_range_is_an_error_naming_the_node(backend, dtype):
    b = GraphBuilder("rows")
    idx = b.input("idx", "i32", (2,))
    graph = b.build(b.get_rows(b.weight("table", np.ones((4, 32)), dtype), idx))
    exe = backend.compile(graph)
    np.testing.assert_array_equal(exe.run({"idx": np.array([3, 0], np.int32)})[0], np.ones((2, 32)))
    with pytest.raises(EmberError, match=rf"{backend.name} backend: graph 'rows': "
                                         r"%\d+ = get_rows\(%table, %idx\).*an index is out of range \[0, 4\)"):
        exe.run({"idx": np.array([1, 4], np.int32)})
    # the status is cleared for the next run
    np.testing.assert_array_equal(exe.run({"idx": np.array([3, 0], np.int32)})[0], np.ones((2, 32)))


# ---- bound runs --------------------------------------------------------------------------------
def test_bound_run_gives_fresh_outputs_no_one_else_holds(backend):
    graph = small_graph("bound")
    exe = backend.compile(graph)
    inputs = random_inputs(graph)
    run = exe.bind(inputs)
    first = run(fresh=(0,))[0]
    kept = first.copy()
    second = run(fresh=(0,))[0]
    assert second is not first and not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)           # the caller's array was left alone
    np.testing.assert_array_equal(second, kept)
    view = second[1:]
    del first, second
    third = run(fresh=(0,))[0]                            # may reuse an array no one holds
    assert not np.shares_memory(third, view)
    np.testing.assert_array_equal(third, kept)
    inputs["x"] = inputs["x"] * 2
    other = run(fresh=(0,), inputs={"x": inputs["x"]})[0]
    np.testing.assert_array_equal(other, exe.run(inputs)[0])


def test_bound_run_checks_replaced_inputs(backend):
    graph = small_graph("rebind")
    exe = backend.compile(graph)
    run = exe.bind(random_inputs(graph))
    with pytest.raises(EmberError, match="unknown input 'y'"):
        run(inputs={"y": np.zeros((3, 32), np.float32)})
    with pytest.raises(EmberError, match=r"input 'x' must be a contiguous NumPy float32\[3, 32\] array"):
        run(inputs={"x": np.zeros((3, 32), np.float64)})
    with pytest.raises(EmberError, match=r"input 'x' must be a contiguous"):
        run(inputs={"x": np.zeros((32, 3), np.float32).T})


def test_bound_in_place_cache_comes_back_through_sync_to_host(backend):
    """A GPU backend keeps the cache on its device between bound runs; the host array is
    current after sync_to_host, on every backend (the CPU's does nothing: its runs work on the
    host array itself)."""
    graph = cache_graph()
    exe = backend.compile(graph)
    kv = np.zeros((16, 8), np.float16)
    inputs = cache_inputs(kv)
    expected = run_reference(graph, dict(inputs, cache=kv.copy()))[0]
    run = exe.bind(inputs, {0: kv})
    run()
    backend.sync_to_host([kv])
    np.testing.assert_array_equal(kv, expected)
    rows = np.full((2, 8), 7, np.float32)
    expected = run_reference(graph, dict(inputs, cache=kv.copy(), rows=rows))[0]
    run(inputs={"rows": rows})                           # a small input replaced, the cache stays
    backend.sync_to_host([kv])
    np.testing.assert_array_equal(kv, expected)
    kv[:] = 0                                            # the host writes it and hands it over
    backend.sync_to_device([kv])
    run()
    backend.sync_to_host([kv])
    np.testing.assert_array_equal(kv, run_reference(graph, dict(inputs, cache=np.zeros_like(kv),
                                                                     rows=rows))[0])


# ---- memory plan -------------------------------------------------------------------------------
def test_planned_peak_is_below_the_sum_of_intermediates(backend):
    b = GraphBuilder("chain")
    x = b.input("x", "f32", (16, 256))
    y = x
    for op in ("neg", "exp", "tanh", "silu", "gelu", "relu", "sigmoid", "neg"):
        y = b.op(op, y)
    graph = b.build(y)
    exe = backend.compile(graph)
    intermediates = sum(n.type.nbytes for n in graph.nodes if n.op not in ("input",) and n is not y)
    assert 0 < exe.planned_peak_bytes < intermediates
    assert exe.planned_peak_bytes == 2 * 16 * 256 * 4
    check(exe, graph)


# ---- the defaults of the base ------------------------------------------------------------------
class ReferenceExecutable(Executable):
    """An executable with nothing but `run` (through the reference interpreter): what the base
    gives every backend for free."""

    backend_name = "reference"

    def __init__(self, graph):
        self.graph = graph
        self.planned_peak_bytes = 0
        self._declare_signature(graph.inputs, [host_storage(n.type) for n in graph.outputs])
        self.runs = 0

    def run(self, inputs, outputs=None):
        arrays = self._checked_inputs(inputs)
        results = self._checked_outputs(outputs or {}, arrays)
        self.runs += 1
        named = {node.name: a for node, a in zip(self._inputs, arrays)}
        for out, value in zip(results, run_reference(self.graph, named)):
            out[...] = value
        return results


def test_default_bind_runs_through_run():
    graph = small_graph("reference")
    exe = ReferenceExecutable(graph)
    inputs = random_inputs(graph)
    out = np.empty((3, 8), np.float32)
    run = exe.bind(inputs, {0: out})
    assert run()[0] is out and exe.runs == 1
    assert run(fresh=(0,))[0] is not out                   # fresh: a new array even where one was bound
    x = inputs["x"] * 2
    np.testing.assert_array_equal(run(inputs={"x": x})[0], run_reference(graph, {"x": x})[0])
    with pytest.raises(EmberError, match="unknown input 'y'"):
        run(inputs={"y": x})


def test_default_status_and_profile():
    exe = ReferenceExecutable(small_graph("reference"))
    exe.status_messages = {3: "%1 = get_rows(%t, %i): an index is out of range [0, 4)"}
    exe._check_status(0)
    with pytest.raises(EmberError, match=r"reference backend: graph 'reference': %1 = get_rows.*\[0, 4\)"):
        exe._check_status(3)
    with pytest.raises(EmberError, match="kernel status 5"):
        exe._check_status(5)
    with pytest.raises(EmberError, match="does not time its kernels"):
        exe.profile({})
