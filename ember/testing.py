"""Helpers for tests of passes, backends and models. A pass test is before, transform, expected
(TVM's CompareBeforeAfter), in one call:

    check_pass(MyPass(), BEFORE, EXPECTED, cleanup=[DeadCodeElimination()])
    check_unchanged(MyPass(), GRAPH_IT_MUST_LEAVE_ALONE)

or step by step:

    before = parse_ir(BEFORE)
    after = MyPass()(before)
    verify(after)
    assert_structural_equal(after, parse_ir(EXPECTED))
    assert_allclose(run_reference(after), run_reference(before))

Imports only the IR.
"""
from __future__ import annotations


import numpy as np

from ember.ir.graph import Graph
from ember.ir.interpreter import random_inputs, run_reference
from ember.ir.parser import parse_ir
from ember.ir.printer import print_ir, value_names
from ember.ir.verifier import verify

__all__ = ["parse_ir", "run_reference", "random_inputs", "verify", "assert_structural_equal",
           "assert_allclose", "nmse", "check_pass", "check_unchanged"]

CONTEXT_LINES = 3


def _printed_lines(graph: Graph) -> dict:
    """The printed line of each non-input node, and the whole text as a list of lines."""
    lines = print_ir(graph).splitlines()
    body = [n for n in graph.nodes if n.op != "input"]
    return {node: i + 1 for i, node in enumerate(body)}, lines


def _excerpt(graph: Graph, node) -> str:
    """The printed text around node (or around the end of the body when node is None)."""
    index, lines = _printed_lines(graph)
    at = index.get(node, len(lines) - 2) if node is not None else len(lines) - 2
    lo = max(at - CONTEXT_LINES, 0)
    return "\n".join(("  > " if i == at else "    ") + lines[i]
                     for i in range(lo, min(at + CONTEXT_LINES + 1, len(lines))))


def assert_structural_equal(actual: Graph, expected: Graph) -> None:
    """Same name, inputs, nodes (in order), outputs and constant names and types; constant data
    is not compared. On failure the message shows the first differing node of each side."""
    def fail(what: str, a_node=None, e_node=None):
        raise AssertionError(f"graphs differ: {what}\n"
                             f"actual:\n{_excerpt(actual, a_node)}\n"
                             f"expected:\n{_excerpt(expected, e_node)}")

    if actual.name != expected.name:
        fail(f"name {actual.name!r} != {expected.name!r}")
    a_in = [(n.name, n.type) for n in actual.inputs]
    e_in = [(n.name, n.type) for n in expected.inputs]
    if a_in != e_in:
        fail(f"inputs {_signature(a_in)} != {_signature(e_in)}")
    a_nodes = [n for n in actual.nodes if n.op != "input"]
    e_nodes = [n for n in expected.nodes if n.op != "input"]
    for i, (a, e) in enumerate(zip(a_nodes, e_nodes)):
        # Nodes are hash-consed and every earlier node matched, so `is` compares this one alone.
        if a is not e:
            fail(f"node {i} of the body is the first that differs", a, e)
    if len(a_nodes) != len(e_nodes):
        n = min(len(a_nodes), len(e_nodes))
        fail(f"{len(a_nodes)} nodes vs {len(e_nodes)}",
             a_nodes[n] if n < len(a_nodes) else None, e_nodes[n] if n < len(e_nodes) else None)
    if actual.outputs != expected.outputs:
        a_names, e_names = value_names(actual), value_names(expected)
        fail(f"outputs {[a_names[o] for o in actual.outputs]} != {[e_names[o] for o in expected.outputs]}")
    a_consts = {k: (v.dtype, v.shape) for k, v in actual.constants.items()}
    e_consts = {k: (v.dtype, v.shape) for k, v in expected.constants.items()}
    if a_consts != e_consts:
        fail(f"constants {a_consts} != {e_consts}")


def _signature(inputs) -> str:
    return "(" + ", ".join(f"{name}: {t}" for name, t in inputs) + ")"


def assert_allclose(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere, for one array or a list of
    them (a graph's outputs); the message names the output and its largest error."""
    single = isinstance(actual, np.ndarray) or np.isscalar(actual)
    a_list = [actual] if single else list(actual)
    e_list = [expected] if isinstance(expected, np.ndarray) or np.isscalar(expected) else list(expected)
    if len(a_list) != len(e_list):
        raise AssertionError(f"{len(a_list)} outputs, expected {len(e_list)}")
    for i, (a, e) in enumerate(zip(a_list, e_list)):
        a, e = np.asarray(a), np.asarray(e)
        label = "output" if single else f"output {i}"
        if a.shape != e.shape:
            raise AssertionError(f"{label}: shape {list(a.shape)}, expected {list(e.shape)}")
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        with np.errstate(invalid="ignore"):   # inf - inf; equal infinities pass below
            err = np.abs(a64 - e64)
        same_special = (a64 == e64) | (np.isnan(a64) & np.isnan(e64))
        bad = ~(same_special | (err <= atol + rtol * np.abs(e64)))
        if bad.any():
            finite_err = np.where(same_special, 0.0, np.nan_to_num(err, nan=np.inf))
            worst = np.unravel_index(np.argmax(finite_err), a.shape) if a.ndim else ()
            raise AssertionError(
                f"{label}: {int(bad.sum())} of {a.size} values differ beyond rtol={rtol}, "
                f"atol={atol}; max abs error {finite_err.max():.3g} at index {tuple(map(int, worst))} "
                f"(actual {a64[worst]!r}, expected {e64[worst]!r})")


def nmse(actual, expected) -> float:
    """Normalized mean squared error sum((a - e)^2) / sum(e^2), as ggml's test-backend-ops
    reports it; 0 when both are all zero, inf when only expected is."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    err = float(np.sum((a - e) ** 2))
    ref = float(np.sum(e * e))
    if ref == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / ref


def _graph(graph_or_text) -> Graph:
    return parse_ir(graph_or_text) if isinstance(graph_or_text, str) else graph_or_text


def _transform(pass_, cleanup, graph: Graph) -> Graph:
    for p in (pass_, *cleanup):
        graph = p(graph)
    return graph


def check_pass(pass_, before, expected, cleanup=(), rtol: float = 1e-5, atol: float = 1e-6,
               seed: int = 0) -> Graph:
    """Run pass_ (then the cleanup passes a rule pass leaves work for, such as dead-code
    elimination) on before, and check: the result verifies; it equals expected structurally
    (the message shows the first differing node); the reference interpreter gives the same
    outputs on random inputs (seed) for both; and the pass is idempotent (a second run changes
    nothing). before and expected are IR text or graphs. Returns the transformed graph."""
    before, expected = _graph(before), _graph(expected)
    after = _transform(pass_, cleanup, before)
    verify(after)
    assert_structural_equal(after, expected)
    assert_allclose(run_reference(after, seed=seed), run_reference(before, seed=seed), rtol=rtol, atol=atol)
    again = _transform(pass_, cleanup, after)
    assert again == after, f"{pass_.name} is not idempotent: a second run changed\n{print_ir(after)}"
    return after


def check_unchanged(pass_, graph) -> None:
    """pass_ leaves graph alone (a case it must refuse): the very same graph comes back."""
    graph = _graph(graph)
    after = pass_(graph)
    assert after == graph, f"{pass_.name} changed a graph it must leave alone:\n{print_ir(after)}"
