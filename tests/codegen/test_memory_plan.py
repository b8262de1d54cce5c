"""The memory planner on random graphs (hypothesis) and on small graphs read at a glance."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.ir import Graph, GraphBuilder
from ember.ir.ops import get_op
from ember.codegen.memory_plan import plan_memory, planned_values, view_root


def _is_view(node):
    return node.op not in ("input", "const") and get_op(node.op).is_view


def lifetimes(graph, sizes, scratch):
    """Independently of the planner: (node, kind) -> (first step, last step, bytes)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    out = {}
    for node in planned_values(graph):
        last = order[node]
        for user in graph.nodes:
            if any(view_root(i) is node for i in user.inputs):
                last = max(last, order[user])
        out[(node, "value")] = (order[node], last, sizes(node))
    for node, size in scratch.items():
        out[(node, "scratch")] = (order[node], order[node], size)
    return out


def check_plan(graph, plan, sizes, scratch, alignment):
    live = lifetimes(graph, sizes, scratch)
    placed = {(b.node, b.kind): b for b in plan.buffers}
    assert set(placed) == {k for k in live}, "planned buffers differ from the values needing one"
    for node in graph.nodes:
        planned = node in plan.offsets
        expected = node in set(planned_values(graph))
        assert planned == expected, f"{node!r}: planned={planned}"
        assert not (planned and (node in graph.outputs or _is_view(node) or node.op in ("input", "const")))
    items = list(live.items())
    for key, (start, end, size) in items:
        b = placed[key]
        assert b.offset % alignment == 0
        assert b.size >= size
        assert b.offset + b.size <= plan.peak_bytes
    for i, (ka, (sa, ea, na)) in enumerate(items):
        for kb, (sb, eb, nb) in items[i + 1:]:
            if na and nb and sa <= eb and sb <= ea:
                a, b = placed[ka], placed[kb]
                assert a.offset + na <= b.offset or b.offset + nb <= a.offset, \
                    f"{ka} [{a.offset}, +{na}) and {kb} [{b.offset}, +{nb}) are live together and overlap"
    assert plan.peak_bytes <= plan.total_bytes
    # The peak is at least what is live at the busiest step.
    steps = range(len(graph.nodes))
    busiest = max((sum(placed[k].size for k, (s, e, _) in live.items() if s <= t <= e) for t in steps),
                  default=0)
    assert plan.peak_bytes >= busiest


@st.composite
def random_graphs(draw):
    b = GraphBuilder("random")
    values = [b.input(f"x{i}", "f32", (draw(st.integers(1, 9)), draw(st.integers(1, 40))))
              for i in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(1, 25))):
        x = draw(st.sampled_from(values))
        kind = draw(st.sampled_from(["neg", "add", "transpose", "view", "cont", "sum_rows",
                                     "concat", "reshape", "mul_mat"]))
        if kind == "neg":
            y = b.neg(x)
        elif kind == "add":
            same = [v for v in values if v.shape == x.shape]
            y = b.add(x, draw(st.sampled_from(same)))
        elif kind == "transpose":
            y = b.transpose(x)
        elif kind == "view":
            rows, cols = x.shape
            y = b.view(x, shape=(rows, max(cols - 1, 1)), strides=x.type.strides,
                       offset=4 if cols > 1 else 0)
        elif kind == "cont":
            y = b.cont(x)
        elif kind == "sum_rows":
            y = b.sum_rows(x)
        elif kind == "concat":
            y = b.concat(x, x, axis=0)
        elif kind == "reshape":
            y = b.reshape(x, x.shape[1], x.shape[0]) if x.type.is_contiguous else b.neg(x)
        else:
            y = b.mul_mat(x, b.input(f"w{len(values)}", "f32", (draw(st.integers(1, 30)), x.shape[-1])))
        values.append(y)
    computed = [v for v in values if v.op != "input"]
    outputs = draw(st.lists(st.sampled_from(computed), min_size=0, max_size=3)) + [computed[-1]]
    graph = b.build(outputs)
    nodes = [n for n in graph.nodes if n.op not in ("input", "const") and not _is_view(n)]
    scratch = {n: draw(st.integers(1, 5000)) for n in nodes if draw(st.booleans()) and n.op == "mul_mat"}
    return graph, scratch


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.sampled_from([1, 16, 64, 256]))
def test_random_graphs(sample, alignment):
    graph, scratch = sample
    sizes = lambda node: node.type.nbytes   # noqa: E731
    plan = plan_memory(graph, alignment=alignment, extra=scratch)
    check_plan(graph, plan, sizes, scratch, alignment)
    assert plan.scratch_offsets.keys() == {n for n, s in scratch.items() if s}


def test_chain_reuses_memory():
    b = GraphBuilder("chain")
    x = b.input("x", "f32", (4, 64))
    y = x
    for _ in range(6):
        y = b.neg(y)
    graph = b.build(y)
    plan = plan_memory(graph)
    assert plan.total_bytes == 5 * 4 * 64 * 4
    assert plan.peak_bytes == 2 * 4 * 64 * 4   # two buffers ping-pong


def test_view_keeps_its_base_live():
    b = GraphBuilder("view")
    x = b.input("x", "f32", (8, 8))
    a = b.neg(x)
    t = b.transpose(a)             # declared early, read late: a must outlive c and d
    c = b.exp(x)
    d = b.add(c, c)
    ct = b.cont(t)
    out = b.add(ct, d)
    graph = Graph([x], [out], name="view", nodes=[x, a, t, c, d, ct, out])
    plan = plan_memory(graph)
    check_plan(graph, plan, lambda n: n.type.nbytes, {}, 64)
    size = a.type.nbytes
    for other in (c, d):
        lo, hi = plan.offsets[other], plan.offsets[other] + size
        assert hi <= plan.offsets[a] or plan.offsets[a] + size <= lo


def test_outputs_inputs_and_views_are_not_planned():
    b = GraphBuilder("outs")
    x = b.input("x", "f32", (3, 5))
    w = b.const("w", np.ones((5, 5), np.float32))
    h = b.neg(x)
    graph = b.build(b.mul_mat(h, w), b.transpose(h))
    plan = plan_memory(graph)
    assert set(plan.offsets) == {h}


def test_scratch_is_live_only_during_its_node():
    b = GraphBuilder("scratch")
    x = b.input("x", "f32", (4, 16))
    h1 = b.neg(x)
    h2 = b.neg(h1)
    h3 = b.neg(h2)
    graph = b.build(h3)
    plan = plan_memory(graph, extra={h1: 1000, h3: 1000})
    check_plan(graph, plan, lambda n: n.type.nbytes, {h1: 1000, h3: 1000}, 64)
    assert plan.scratch_offsets[h1] == plan.scratch_offsets[h3]   # reused: never live together


def test_bad_alignment():
    b = GraphBuilder("g")
    x = b.input("x", "f32", (2,))
    with pytest.raises(ValueError, match="power of two"):
        plan_memory(b.build(b.neg(x)), alignment=48)
