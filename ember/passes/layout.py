"""layout-adreno: Q8_0/Q4_0 weights re-laid out for Adreno's GEMV/GEMM kernels, in the IR.

A constant weight [M, K] of type q8_0 or q4_0 is replaced by a constant in the `adreno_soa`
layout (ember.ir.layouts: scales and quants split and transposed, llama.cpp PR #21938) and
every consumer is rebuilt on it, in one step: a weight is converted only when *every* user
accepts the layout, so the graph never holds a kernel reading bytes it cannot decode (the SYCL
bug: GEMV reordered, GEMM still reading the old layout). The verifier holds each op to the
layouts it declares (OpDef.layouts); this pass adds what the OpenCL kernels need on top.

A weight qualifies (llama.cpp's rule) when it is a named, contiguous 2-D q8_0/q4_0 constant with
M % 4 == 0, M >= min_rows and K >= min_cols (small matrices gain nothing), its quants fit one
image1d_buffer_t (max_texels uint32 texels), it is no graph output, and each user is a mul_mat
reading it as the weight of activations of rank <= 2, or a get_rows reading it as the table.
Anything else leaves that weight in the row layout (graph unchanged when no weight qualifies).
So the stacked expert weights of mul_mat_id ([E, N, K]) stay in rows: the SoA layout holds one
2-D matrix, and the OpenCL mul_mat_id kernel (mul_mat.cl.j2 with ids) reads row blocks, picking
a few experts per token out of the stack; an SoA form of it would need a per-expert image.

The packed copy of a weight's data is made once per source array and reused, so the step graphs
of a model (decode, prompt) share one packed array, hence one device upload.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ember.ir.graph import Graph
from ember.ir.layouts import ROW, get_layout
from ember.ir.node import Node
from ember.ir.types import TensorType
from ember.passes.base import Pass, PassContext
from ember.passes.rewrite import RewriteState, apply_rules

ADRENO_SOA = "adreno_soa"


def adreno_kernel_reads(user: Node, k: int) -> bool:
    """Whether an Adreno OpenCL kernel reads operand k of user in the SoA layout: the GEMV and
    GEMM (mul_mat's weight, under activations of rank <= 2) and get_rows (its table). The op
    table allows more (any mul_mat weight); this is what the kernels handle. No Adreno kernel
    reads mul_mat_id's experts in SoA (see the module docstring)."""
    if user.op == "mul_mat":
        return k == 1 and user.inputs[0].type.rank <= 2
    return user.op == "get_rows" and k == 0


# (id of the source array, layout, dtype name, shape) -> (weak reference to the source, packed)
_packed: dict[tuple, tuple[weakref.ref, np.ndarray]] = {}


def packed_data(data: np.ndarray, t: TensorType) -> np.ndarray:
    """data (row storage of t.row) packed into t's layout; the same array for the same source."""
    key = (id(data), t.layout, t.dtype.name, t.shape)
    entry = _packed.get(key)
    if entry is not None and entry[0]() is data:
        return entry[1]
    out = get_layout(t.layout).pack(data, t.dtype, t.shape)
    out.flags.writeable = False     # shared by every graph packed from the same weight
    try:
        ref = weakref.ref(data, lambda _, key=key: _packed.pop(key, None))
    except TypeError:               # not weak-referenceable: pack again next time
        return out
    _packed[key] = (ref, out)
    return out


@dataclass(frozen=True)
class LayoutAdreno(Pass):
    name: ClassVar[str] = "layout-adreno"
    min_rows: int = 512
    min_cols: int = 512
    max_texels: int = 2 ** 27       # image1d_buffer_t texels (CL_DEVICE_IMAGE_MAX_BUFFER_SIZE)

    def qualifies(self, graph: Graph, node: Node, outputs: set) -> bool:
        t = node.type
        if node.op != "const" or node.attr("value") is not None or t.layout != ROW or node in outputs:
            return False
        if get_layout(ADRENO_SOA).problem(t.dtype, t.shape) or not t.is_contiguous:
            return False
        M, K = t.shape
        per_u32 = get_layout(ADRENO_SOA).values_per_u32(t.dtype)
        if M < self.min_rows or K < self.min_cols or K // per_u32 * M > self.max_texels:
            return False
        users = graph.users.get(node, ())
        return bool(users) and all(adreno_kernel_reads(u, k) for u in users
                                   for k, operand in enumerate(u.inputs) if operand is node)

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        outputs = set(graph.outputs)
        chosen = [n for n in graph.nodes if self.qualifies(graph, n, outputs)]
        if not chosen:
            return graph
        state = RewriteState(graph)
        relaid: dict[Node, Node] = {}
        for node in chosen:
            t = node.type.with_layout(ADRENO_SOA)
            # Same name, new data: a weight has exactly one layout in a graph.
            relaid[node] = Node("const", (), {"name": node.name}, t)
            state.new_constants[node.name] = packed_data(graph.constant_data(node), t)
        return apply_rules(graph, {}, state, substitute=lambda node, mapping: relaid.get(node))
