"""fuse-qkv: parallel matmuls on one input become one matmul and strided views.

Q/K/V projections (and an FFN's gate/up) read the same activations with weights of the same
type and inner size. Concatenating the weights row-wise (quantized weights block by block:
rows are whole blocks, nothing is requantized) lets one matmul read the activations once and
launch once; each original result is a view of the fused result at a byte offset of its
leading columns, with the fused row stride (llama.cpp's build_qkv). When every member is
followed by the addition of a constant bias, the biases are concatenated too.

The fused weights are made once per process and shared by every graph fused from the same
weights (ember.passes.shared_constants), not copied per compiled step graph.

Each output element is computed exactly as before (same row of weights, same reduction over
K), so on batch-invariant kernels the results are bit-identical.

Refused (graph unchanged): different inputs, different weight types or inner sizes, weights
that are not constants, batched (3-D+) weights, a lone matmul. A matmul read through a `view`
op stays out of the group: a view's byte strides were written for the matmul's own contiguous
rows, and the fused row stride would change what it reads (Qwen3-Next's query + gate split;
falcon-h1's Mamba-2 ssm_in beside Q/K/V).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from ember.ir.builder import const_node, make_node
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.passes.base import Pass, PassContext
from ember.passes.rewrite import RewriteState, apply_rules
from ember.passes.shared_constants import concatenated


def _fusable(node: Node) -> bool:
    w = node.inputs[1]
    return (node.op == "mul_mat" and w.op == "const" and w.attr("value") is None
            and w.type.rank == 2 and w.type.is_contiguous
            and w.type.layout == "row")   # re-laid-out blocks do not concatenate row-wise


def _const_bias(graph: Graph, mm: Node) -> tuple[Node, Node] | None:
    """(add node, bias const) when mm's only user adds a constant bias of one value per column."""
    users = graph.users.get(mm, ())
    if len(users) != 1 or users[0].op != "add" or users[0].inputs[0] is not mm:
        return None
    bias = users[0].inputs[1]
    if bias.op != "const" or bias.attr("value") is not None or bias.shape != (mm.shape[-1],):
        return None
    return users[0], bias


def _read_through_view(graph: Graph, mm: Node) -> bool:
    """Whether mm (or its bias addition) is read by a view op, whose strides assume mm's rows."""
    users = list(graph.users.get(mm, ()))
    users += [u2 for u in users if u.op == "add" for u2 in graph.users.get(u, ())]
    return any(u.op == "view" for u in users)


def find_groups(graph: Graph) -> list[list[Node]]:
    """Matmuls to fuse, each group in declared order, groups in order of their first member."""
    groups: dict[tuple, list[Node]] = {}
    for node in graph.live_nodes:   # dead matmuls (left by an earlier fusion) do not count
        if node.op == "mul_mat" and _fusable(node):
            x, w = node.inputs
            if 0 in x.shape:    # no rows (a step with no outputs): nothing to gain, no view fits
                continue
            if _read_through_view(graph, node):
                continue
            groups.setdefault((x, w.dtype, w.shape[-1]), []).append(node)
    # A weight used twice by one input is one projection (cse makes them one node anyway).
    groups = [list({m.inputs[1]: m for m in g}.values()) for g in groups.values()]
    return [g for g in groups if len(g) >= 2]


@dataclass(frozen=True)
class FuseQKV(Pass):
    name: ClassVar[str] = "fuse-qkv"
    opt_level: ClassVar[int] = 1

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        groups = find_groups(graph)
        if not groups:
            return graph
        biases = {m: _const_bias(graph, m) for group in groups for m in group}
        # The node each member's result replaces: the member itself, or its bias addition
        # when the whole group's biases are fused.
        key_group: dict[Node, int] = {}
        for k, group in enumerate(groups):
            with_bias = all(biases[m] is not None for m in group)
            for m in group:
                key_group[biases[m][0] if with_bias else m] = k
        constants: dict = {}
        built: dict[int, dict[Node, Node]] = {}   # group -> {replaced node: its view}

        def substitute(node: Node, mapping: dict) -> Node | None:
            k = key_group.get(node)
            if k is None:
                return None
            if k not in built:
                built[k] = self._fuse(graph, groups[k], mapping, biases, constants)
            return built[k][node]

        return apply_rules(graph, {}, RewriteState(graph, constants), substitute=substitute)

    @staticmethod
    def _fuse(graph: Graph, group: list[Node], mapping: dict, biases: dict, constants: dict) -> dict[Node, Node]:
        """The fused matmul for a group (built on the replacement of its input) and, for each
        member (or, with fused biases, each member's bias addition), the view replacing it."""
        x = mapping[group[0].inputs[0]]
        weights = [m.inputs[1] for m in group]
        name = "+".join(w.name for w in weights)
        constants[name] = concatenated([graph.constants[w.name] for w in weights])
        widths = [w.shape[0] for w in weights]
        fused_w = const_node(name, weights[0].dtype, (sum(widths), weights[0].shape[1]))
        y = make_node("mul_mat", (x, fused_w))

        member_biases = [biases[m] for m in group]
        with_bias = all(b is not None for b in member_biases)
        if with_bias:
            bias_name = "+".join(b[1].name for b in member_biases)
            constants[bias_name] = concatenated([graph.constants[b[1].name] for b in member_biases])
            y = make_node("add", (y, const_node(bias_name, member_biases[0][1].dtype, (sum(widths),))))

        out: dict[Node, Node] = {}
        offset = 0
        for member, width, bias in zip(group, widths, member_biases):
            view = make_node("view", (y,), {"shape": member.shape, "strides": y.type.strides,
                                            "offset": offset * y.dtype.block_bytes})
            out[bias[0] if with_bias else member] = view
            offset += width
        return out
