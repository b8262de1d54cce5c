"""The CPU renderer: a whole graph -> one C file with one entry point.

    int ember_graph_run(void **inputs, void **outputs, void **consts, uint8_t *arena, int n_threads);

The entry point opens one OpenMP parallel region; every kernel is a static function called by all
threads with (ith, nth), and a barrier (ember_barrier_wait, common.h) goes between two kernels only
when the second touches bytes the kernels since the last barrier wrote (or writes bytes they
touched). Kernels of tiny work (one token's norms, ropes, cache rows) run on thread 0 alone, and
two of those in a row need no barrier. The heavy kernels (matmul, attention) share their work in
chunks claimed from a counter, so a thread the OS holds back delays the others little. There is no
Python between ops and no thread spawn per op. n_threads is the most threads a run may use: a
governor in each library (common.h) runs fewer when fewer have been faster lately (another busy
process on the machine); a negative n_threads asks for exactly -n_threads.

Each kernel is rendered from templates/cpu/<template>.c.j2 with the node's shapes, byte strides
and attributes baked in as constants (a compiled graph serves one set of shapes), and starts with
a comment naming the node, the template and its parameters. Views are free: a view's data is its
operand's pointer plus a byte offset, read through its own strides, and every kernel takes byte
strides for its operands. Values live where the memory plan puts them (ember.codegen.memory_plan):
inputs and constants in the caller's arrays, graph outputs in the caller's output arrays, the rest
in one arena. mul_mat and mul_mat_id call the kernels of ember.codegen.cpu_matmul (mul_mat_id
shares one work list over all selected experts' chunks).

The walk is ember.codegen.renderer's; `CpuRenderer` states what C does differently: expressions,
threads and barriers, kernel calls.

Imports NumPy, ember.ir, ember.errors and the codegen modules (renderer, indexing, values,
memory_plan, cpu_matmul): no compiler or device library.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ember.codegen.indexing import (broadcast_strides, bytes_type, matmul_batches, matmul_operands, offset_expr,
                                    round_up, row_loop, span_bytes)
from ember.codegen.kv_quant import KV_QUANTIZED, Q_DOT_ROUNDED, c_hex, turbo_literals
from ember.codegen.memory_plan import MemoryPlan
from ember.codegen.renderer import (ARITHMETIC, ELEMENTWISE_OPS, Renderer, Templates, c_double, c_float,
                                    c_gated_delta_net, c_get_rows, c_rope, c_row_op, c_softmax, c_ssm_scan,
                                    c_take_along, extent, hazard_barriers, lowering_problem,
                                    optional_operands)
from ember.codegen.values import Place
from ember.errors import EmberError
from ember.ir import dtypes
from ember.ir.graph import Graph
from ember.ir.layouts import unsupported_layout
from ember.ir.node import Node
from ember.ir.printer import value_names
from ember.ir.types import TensorType, contiguous_strides

TEMPLATES = Templates("cpu")
ENTRY_POINT = "ember_graph_run"
ARENA_ALIGNMENT = 64
EMBER_WORK_INTS = 128     # common.h: the ints of one work block (EMBER_WORK_REGIONS * 16)

# Elementwise ops as C expressions of the float operands a (and b): f32 math, exp through
# ember_expf (helpers.h), the rest through libm.
ELTWISE_C = {
    **ARITHMETIC,
    "exp": "ember_expf(a)",
    "tanh": "tanhf(a)",
    "sqrt": "sqrtf(a)",
    "rsqrt": "1.0f / sqrtf(a)",
    "silu": "ember_silu(a)",
    "gelu": "ember_gelu(a)",
    "relu": "a < 0.0f ? 0.0f : a",
    "sigmoid": "1.0f / (1.0f + ember_expf(-a))",
    "softplus": "fmaxf(a, 0.0f) + log1pf(expf(-fabsf(a)))",
    "swiglu": "ember_silu(a) * b",
    "geglu": "ember_gelu(a) * b",
}
# The same ops on 8 lanes (a, b: ember_f32x8), for the ones worth it; each gives the bits of its
# scalar form above, so a value does not care whether it lands in a vector or in a tail.
ELTWISE_V8 = {
    "add": "a + b",
    "sub": "a - b",
    "mul": "a * b",
    "div": "a / b",
    "neg": "-a",
    "exp": "ember_exp8(a)",
    "silu": "ember_silu8(a)",
    "gelu": "ember_gelu8(a)",
    "sigmoid": "ember_splat8(1.0f) / (ember_splat8(1.0f) + ember_exp8(-a))",
    "swiglu": "ember_silu8(a) * b",
    "geglu": "ember_gelu8(a) * b",
}
assert set(ELTWISE_C) | {"scale", "clamp"} == set(ELEMENTWISE_OPS), "an elementwise op has no C form"


def _matmul():
    """The matmul kernel module (written separately; imported when a graph needs it)."""
    from ember.codegen import cpu_matmul
    return cpu_matmul


def c_pointer(place: Place) -> str:
    """A C expression of place's first byte (the entry point's pointers: arena, in_i, out_k, const_j)."""
    base = "arena" if place.region == "arena" else f"{place.region}_{place.index}"
    return base if not place.offset else f"({base} + {place.offset})"


@dataclass
class Step:
    """One kernel call of the entry point, with the bytes it reads and writes (for barriers)
    and a label naming the kind of work (for profiles: op, plus the weight type of a matmul)."""
    call: str
    reads: list[tuple[Place, int]]
    writes: list[tuple[Place, int]]
    label: str = ""
    serial: bool = False     # run by thread 0 alone


# Kernels with no barrier inside, which may run on thread 0 alone when their work is at most
# SERIAL_MAX_ITEMS values: cheaper than the barriers around a split of a few hundred values.
SERIAL_TEMPLATES = frozenset({"eltwise.c.j2", "rms_norm.c.j2", "layer_norm.c.j2", "l2_norm.c.j2", "sum_rows.c.j2",
                              "argmax.c.j2", "top_k.c.j2", "take_along.c.j2", "softmax.c.j2", "rope.c.j2",
                              "get_rows.c.j2",
                              "set_rows.c.j2", "copy.c.j2"})
SERIAL_MAX_ITEMS = 1024


def _attention_items(Tq: int, Hkv: int, group: int) -> dict:
    """The attention kernel's work item, qb queries x hb heads of one kv head (at most 4 x 4,
    sharing each converted key block): as large as allows two items or more, so two threads
    both have work even for one query (performance only: rows do not depend on it)."""
    qb, hb = min(4, Tq), group
    while hb > 4 and hb % 2 == 0:
        hb //= 2
    while -(-Tq // qb) * Hkv * (group // hb) < 2 and (hb % 2 == 0 or qb > 1):
        if hb % 2 == 0:
            hb //= 2
        else:
            qb = -(-qb // 2)
    while qb * hb > 16:
        qb = -(-qb // 2)
    return dict(qb=qb, hb=hb)


def _work_items(node: Node) -> int:
    """Values a kernel for node touches (a measure of its work)."""
    if node.op == "set_rows":
        dst, _, src = node.inputs
        return src.type.numel if dst.op == "input" else dst.type.numel + src.type.numel
    if node.op in ("sum_rows", "argmax", "top_k"):
        return node.inputs[0].type.numel
    return node.type.numel


@dataclass(frozen=True)
class CpuProgram:
    """A rendered graph: the C source and what the executor must pass to its entry point."""
    source: str
    graph: Graph
    plan: MemoryPlan
    constants: tuple[Node, ...]          # consts[i] of the entry point holds constants[i]'s data
    status_messages: dict[int, str]      # entry point return code -> error message
    n_kernels: int
    n_barriers: int
    matmul_wtypes: tuple[str, ...] = ()
    in_place: dict[int, int] = None      # output index -> input index whose buffer it may share
    profile_labels: tuple[str, ...] = () # rendered with profile: the label of each timed call


# ---- support -----------------------------------------------------------------------------------
def supports_node(node: Node) -> tuple[bool, str]:
    """Whether the CPU renderer handles node (every op of the op table, at the dtypes it allows)."""
    why = lowering_problem(node, "cpu") or unsupported_layout(node)   # only row-layout tensors: no kernel reads another layout
    if why:
        return False, why
    if node.op == "mul_mat":
        w = node.inputs[1]
        try:
            wtypes = _matmul().MATMUL_WTYPES
        except ImportError as e:
            return False, f"mul_mat: matmul kernels unavailable ({e})"
        wtype = w.dtype.name if w.dtype.is_quantized or w.type.strides[-1] == w.dtype.block_bytes else "f32"
        if wtype not in wtypes:
            return False, f"mul_mat: w dtype {w.dtype} unsupported"
        if w.shape[-1] == 0:
            return False, "mul_mat: K == 0 unsupported"
    if node.op == "mul_mat_id":
        return _mul_mat_id_support(node)
    if node.op == "get_rows" and node.inputs[0].dtype.is_quantized:
        try:
            wtypes = _matmul().MATMUL_WTYPES
        except ImportError as e:
            return False, f"get_rows: dequantization kernels unavailable ({e})"
        if node.inputs[0].dtype.name not in wtypes:
            return False, f"get_rows: table dtype {node.inputs[0].dtype} unsupported"
    return True, ""


# ---- mul_mat layout ----------------------------------------------------------------------------
@dataclass
class _MulMatLayout:
    wtype: str
    T: int
    N: int
    K: int
    batches: int
    x_row: int
    w_row: int
    x_batch: str
    w_batch: str
    y_batch: int
    x_copy: dict | None
    w_copy: dict | None
    mm_scratch: int
    scratch_bytes: int


def _mul_mat_layout(node: Node) -> _MulMatLayout:
    x, w = matmul_operands(node)
    K, N = w.shape[-1], w.shape[-2]
    batch, T = x.shape[:-2], x.shape[-2]
    w_batch_shape, w_bs, w_row, w_step = w.shape[:-2], w.strides[:-2], w.strides[-2], w.strides[-1]
    offset = 0
    x_copy = w_copy = None
    if x.dtype is not dtypes.f32 or x.strides[-1] != 4:
        # x is converted to contiguous f32 rows in scratch first; the matmul reads those
        x_copy = dict(rows=math.prod(batch) * T, n=K, step=x.strides[-1], dtype=x.dtype.name, offset=0,
                      src_row=offset_expr("r", batch + (T,), x.strides[:-1]))
        x = TensorType(dtypes.f32, x.shape, contiguous_strides(dtypes.f32, x.shape))
        offset = round_up(x_copy["rows"] * K * 4, ARENA_ALIGNMENT)
    wtype = w.dtype.name
    if not w.dtype.is_quantized and w_step != w.dtype.block_bytes:
        w_copy = dict(rows=math.prod(w_batch_shape) * N, n=K, step=w_step, dtype=w.dtype.name,
                      offset=offset, src_row=offset_expr("r", w_batch_shape + (N,), w_bs + (w_row,)))
        wtype, w_row = "f32", K * 4
        w = TensorType(dtypes.f32, w.shape, contiguous_strides(dtypes.f32, w.shape))
        offset += round_up(w_copy["rows"] * K * 4, ARENA_ALIGNMENT)
    b = matmul_batches(x, w)
    mm = _matmul()
    mm_scratch = mm.matmul_scratch_bytes(wtype, b.T, K) if mm.matmul_uses_scratch(wtype, b.T, K) else 0
    return _MulMatLayout(wtype, b.T, N, K, b.batches, b.x_row, w_row, b.x_batch, b.w_batch, b.T * N * 4,
                         x_copy, w_copy, offset, offset + mm_scratch)


# ---- mul_mat_id layout -------------------------------------------------------------------------
def _mul_mat_id_support(node: Node) -> tuple[bool, str]:
    w = node.inputs[1]
    if w.dtype.name not in _matmul().MATMUL_WTYPES:
        return False, f"mul_mat_id: w dtype {w.dtype} unsupported"
    if w.type.strides[-1] != w.dtype.block_bytes:
        return False, "mul_mat_id: w's rows must be contiguous"
    if w.shape[-1] == 0:
        return False, "mul_mat_id: K == 0 unsupported"
    return True, ""


def _mul_mat_id_params(node: Node) -> dict:
    """The template parameters of a mul_mat_id kernel, with the scratch it needs (scratch_bytes).
    One token whose activation row fits the stack takes the "decode" plan (no scratch); else the
    "batch" plan: the expert map, the pairs' activation rows in the matmul kernel's form (with
    f32 copies first for a quantized w and an x that is not contiguous f32), and their results."""
    x, w, ids = (i.type for i in node.inputs)
    T, n_used = ids.shape
    E, N, K = w.shape
    P = T * n_used
    mm = _matmul()
    wtype = w.dtype.name
    act = mm.matmul_activation(wtype)
    a_row = 4 * K if act is None else mm.matmul_scratch_bytes(wtype, 1, K)
    x_direct = x.dtype is dtypes.f32 and x.strides[-1] == 4
    needs_f32 = act is not None and not x_direct
    fits = a_row <= mm.LOCAL_ROW_BYTES and (not needs_f32 or 4 * K <= mm.LOCAL_ROW_BYTES)
    plan = "decode" if T == 1 and fits else "batch"
    layout, offset = {"map_off": 0, "a_off": 0, "xf_off": 0, "yg_off": 0}, 0
    if plan == "batch":
        for part, size in (("map_off", 4 * (3 * E + 2 + P)), ("a_off", a_row * P),
                           ("xf_off", 4 * P * K if needs_f32 else 0), ("yg_off", 4 * P * N)):
            layout[part] = offset
            offset += round_up(size, ARENA_ALIGNMENT)
    x_sel = x.strides[1] if x.rank == 3 and x.shape[1] > 1 else 0
    return dict(wtype=wtype, plan=plan, act=act, a_row=a_row, P=P, n_used=n_used, E=E, N=N, K=K,
                x_tok=x.strides[0], x_sel=x_sel, x_step=x.strides[-1], x_dtype=x.dtype.name,
                x_direct=x_direct, ids_tok=ids.strides[0], ids_sel=ids.strides[1],
                w_expert=w.strides[0], w_row=w.strides[1], scratch_bytes=offset, **layout)


# ---- the renderer ------------------------------------------------------------------------------
def cluster_matmuls(graph: Graph) -> Graph:
    """The graph with each mul_mat moved up next to the first mul_mat of the same activations
    (e.g. a V projection next to the fused Q/K one), when its weight allows: such matmuls then
    run between the same two barriers. Same nodes, same results; only the order changes."""
    order = list(graph.nodes)
    first: dict[Node, Node] = {}      # activations -> the last mul_mat of their group so far
    moved = False
    for node in list(order):
        if node.op != "mul_mat":
            continue
        x, w = node.inputs
        anchor = first.get(x)
        first[x] = node
        if anchor is None:
            continue
        at = order.index(anchor)
        if order.index(node) == at + 1:
            continue
        if w.op not in ("const", "input") and order.index(w) > at:
            first[x] = anchor
            continue
        order.remove(node)
        if w.op == "const" and order.index(w) > at:
            order.remove(w)
            order.insert(at + 1, w)
            at += 1
        order.insert(at + 1, node)
        moved = True
    if not moved:
        return graph
    return Graph(graph.inputs, graph.outputs, graph.constants, graph.name, nodes=order)


PROFILE_CLOCKS = {"wall": "CLOCK_MONOTONIC", "cpu": "CLOCK_THREAD_CPUTIME_ID"}
BARRIER = "ember_barrier_wait(&ember_bar, nth);"   # common.h; `bar` inside kernels


class CpuRenderer(Renderer, dialect="cpu", templates=TEMPLATES, arena_alignment=ARENA_ALIGNMENT):
    """C with OpenMP threads: kernels are static functions called by every thread, a barrier
    between two calls only where their bytes clash (hazard_barriers)."""
    in_place_in_input_region = False     # the executor points the output at the input's buffer

    def __init__(self, graph: Graph, profile: str | None = None):
        if profile is not None and profile not in PROFILE_CLOCKS:
            raise EmberError(f"cpu: profile must be one of {sorted(PROFILE_CLOCKS)} or None, got {profile!r}")
        super().__init__(graph)
        self.profile = profile
        self.steps: list[Step] = []
        self.wtypes: dict[str, None] = {}
        self.kv_quant = False                # whether a kernel reads or writes a quantized cache
        self.n_counters = 0                  # work counters (ember_next) handed out so far
        self.fused_stores: set[Node] = set() # set_rows whose rows a scan kernel writes itself

    def order(self, graph: Graph) -> Graph:
        return cluster_matmuls(graph)

    def scratch_bytes(self, node: Node) -> int:
        if node.op == "mul_mat" and node.type.numel:
            return _mul_mat_layout(node).scratch_bytes
        if node.op == "mul_mat_id" and node.type.numel:
            return _mul_mat_id_params(node)["scratch_bytes"]
        return 0

    # ---- steps ---------------------------------------------------------------------------
    def ptr(self, node: Node) -> str:
        return c_pointer(self.places[node])

    def add_kernel(self, node: Node, template: str, args: list[str], reads, writes, **params):
        name = self.c_kernel(node, template, params)
        label = node.op + (f"[{params['wtype']}]" if node.op in ("mul_mat", "mul_mat_id", "get_rows") else "")
        if template in SERIAL_TEMPLATES and _work_items(node) <= SERIAL_MAX_ITEMS:
            # Tiny work (one token's norms, ropes, cache rows): thread 0 alone, so a chain of
            # such kernels needs no barrier between its links (see schedule).
            call = f"if (ith == 0) {name}(0, 1, {', '.join(args)});"
            self.steps.append(Step(call, reads, writes, label, serial=True))
        else:
            self.steps.append(Step(f"{name}(ith, nth, {', '.join(args)});", reads, writes, label))

    def counters(self, n: int = 1) -> str:
        """C expression of n fresh work blocks (common.h; zeroed at the start of each run)."""
        self.n_counters += n
        return f"(ember_next + {self.n_counters - n} * EMBER_WORK_INTS)"

    def reads_of(self, *nodes: Node):
        return [(self.places[n], span_bytes(n.type)) for n in nodes]

    def render(self) -> CpuProgram:
        self.lower_graph()
        body, barriers = self.schedule()
        labels = [step.label for step in self.steps]
        if self.profile:
            body = self.timed(body)
        pointers = [(f"in_{i}", "inputs", i) for i in range(len(self.graph.inputs))]
        pointers += [(f"out_{k}", "outputs", k) for k in range(len(self.graph.outputs))]
        pointers += [(f"const_{j}", "consts", j) for j in range(len(self.constants))]
        # The matmul kernels live in libraries built once per ISA (kernel_library_source, one per
        # weight type or one of them all); a graph only declares the ones it calls, so compiling
        # a graph stays cheap.
        library = [matmul_prototypes(w) for w in self.wtypes]
        source = TEMPLATES.render(
            "graph.c.j2", graph_name=self.graph.name.replace("*/", "* /"), n_kernels=len(self.kernels),
            n_barriers=barriers, arena_bytes=self.plan.peak_bytes,
            common_h=TEMPLATES.static_file("common.h"), helpers_h=TEMPLATES.static_file("helpers.h"),
            kv_quant_h=kv_quant_header() if self.kv_quant else "", library=library, kernels=[k.text for k in self.kernels], pointers=pointers, body=body,
            n_counters=self.n_counters,
            profile_steps=len(labels) + 1 if self.profile else 0,
            profile_clock=PROFILE_CLOCKS.get(self.profile, ""))
        return CpuProgram(source, self.graph, self.plan, tuple(self.constants),
                          dict(self.status_messages), len(self.kernels), barriers, tuple(self.wtypes),
                          dict(self.in_place), tuple(labels) + ("barrier",) if self.profile else ())

    @staticmethod
    def timed(body: list[str]) -> list[str]:
        """The body with every call and barrier timed per thread into ember_profile[ith]: slot i
        for call i, the last slot for the waits at the barriers between calls."""
        out, call = [], 0
        for line in body:
            if line == BARRIER:
                out += ["ember_prof_t = ember_prof_now();", line, "EMBER_PROF_ADD(-1);"]
            else:
                out += ["ember_prof_t = ember_prof_now();", line, f"EMBER_PROF_ADD({call});"]
                call += 1
        return out

    def schedule(self) -> tuple[list[str], int]:
        """The calls in order, with a barrier before any call that touches what the calls since
        the last barrier wrote, or writes what they touched."""
        lines = []
        flags = hazard_barriers(([extent(p, n) for p, n in step.reads], [extent(p, n) for p, n in step.writes],
                                 step.serial) for step in self.steps)
        for step, barrier in zip(self.steps, flags):
            if barrier:
                lines.append(BARRIER)
            lines.append(step.call)
        return lines, sum(flags)

    # ---- copies --------------------------------------------------------------------------
    def copy(self, node: Node, src: Node, dst: Place, dst_type: TensorType):
        s, d = src.type, dst_type
        if s.dtype.is_quantized:
            row = s.dtype.row_bytes(s.shape[-1])
            s = bytes_type(s, row)
            d = bytes_type(d, row)
        loop = row_loop(s.shape, [s.strides, d.strides])
        if s.dtype == d.dtype:
            item = s.dtype.block_bytes
            mode = "memcpy" if loop.step == [item, item] else "items"
        else:
            item, mode = 0, "convert"
        self.add_kernel(node, "copy.c.j2", [self.ptr(src), c_pointer(dst)],
                        reads=[(self.places[src], span_bytes(s))], writes=[(dst, span_bytes(d))],
                        rows=loop.rows, n=loop.n, src_row=loop.row[0], dst_row=loop.row[1],
                        src_step=loop.step[0], dst_step=loop.step[1], src_dtype=s.dtype.name,
                        dst_dtype=d.dtype.name, item_bytes=item, mode=mode)

    # ---- elementwise ---------------------------------------------------------------------
    def eltwise(self, node: Node):
        operands = list(node.inputs)
        shape = node.shape
        strides = [operands[0].type.strides]
        if len(operands) == 2:
            strides.append(broadcast_strides(operands[1].type, shape))
        strides.append(node.type.strides)
        loop = row_loop(shape, strides)
        if node.op == "scale":
            scale, bias = c_float(node.attr("scale")), c_float(node.attr("bias"))
            expr = f"a * {scale} + {bias}"
            vec_expr = f"a * ember_splat8({scale}) + ember_splat8({bias})"
        elif node.op == "clamp":
            expr = f"fminf(fmaxf(a, {c_float(node.attr('min'))}), {c_float(node.attr('max'))})"
            vec_expr = None
        else:
            expr, vec_expr = ELTWISE_C[node.op], ELTWISE_V8.get(node.op)
        two = len(operands) == 2
        a_step, b_step = loop.step[0], loop.step[1] if two else 0
        if a_step != 4 or b_step not in (0, 4) or operands[0].dtype is not dtypes.f32:
            vec_expr = None
        self.add_kernel(node, "eltwise.c.j2", [self.ptr(o) for o in operands] + [self.ptr(node)],
                        reads=self.reads_of(*operands), writes=self.reads_of(node),
                        arity=len(operands), expr=expr, vec_expr=vec_expr, rows=loop.rows, n=loop.n,
                        a_row=loop.row[0], b_row=loop.row[1] if two else "0", y_row=loop.row[-1],
                        a_step=a_step, b_step=b_step)

    # ---- rows ----------------------------------------------------------------------------
    def rows(self, node: Node):
        stem, operands, params = c_row_op(node, c_double)
        self.add_kernel(node, f"{stem}.c.j2", [self.ptr(o) for o in operands] + [self.ptr(node)],
                        reads=self.reads_of(*node.inputs), writes=self.reads_of(node), **params)

    def softmax(self, node: Node):
        operands, _, params = c_softmax(node)
        self.add_kernel(node, "softmax.c.j2", [self.ptr(o) for o in operands] + [self.ptr(node)],
                        reads=self.reads_of(*operands), writes=self.reads_of(node), **params)

    # ---- rope, attention -----------------------------------------------------------------
    def rope(self, node: Node):
        operands, params = c_rope(node, c_double)
        self.add_kernel(node, "rope.c.j2", [self.ptr(o) for o in operands] + [self.ptr(node)],
                        reads=self.reads_of(*operands), writes=self.reads_of(node), **params)

    def attention(self, node: Node):
        (q, k, v), mask = optional_operands(node, 3)
        (Tq, Hq, D), (Tk, Hkv, Dv) = q.shape, v.shape
        softcap = node.attr("softcap")
        operands = [q, k, v] + ([mask] if mask else [])
        self.kv_quant |= k.dtype.is_quantized or v.dtype.is_quantized
        self.add_kernel(node, "attention.c.j2", [self.ptr(o) for o in operands] +
                        [self.ptr(node), self.counters()],
                        reads=self.reads_of(*operands), writes=self.reads_of(node),
                        Tq=Tq, Tk=Tk, Hq=Hq, Hkv=Hkv, group=Hq // Hkv, D=D, Dv=Dv,
                        qs=q.type.strides, ks=k.type.strides, vs=v.type.strides,
                        ms=mask.type.strides if mask else (0, 0), k_dtype=k.dtype.name,
                        v_dtype=v.dtype.name, kv_quantized=KV_QUANTIZED, q_dot_rounded=Q_DOT_ROUNDED,
                        has_mask=mask is not None, mask_dtype=mask.dtype.name if mask else "f32",
                        scale=c_float(node.attr("scale")), softcap=c_float(softcap) if softcap else None,
                        causal=node.attr("causal"), window=node.attr("window"),
                        **_attention_items(Tq, Hkv, Hq // Hkv))

    # ---- state-space ops (Mamba-2) -------------------------------------------------------
    def ssm_conv(self, node: Node):
        sx, w = node.inputs
        T, C = node.shape
        self.add_kernel(node, "ssm_conv.c.j2", [self.ptr(sx), self.ptr(w), self.ptr(node)],
                        reads=self.reads_of(sx, w), writes=self.reads_of(node),
                        T=T, C=C, K=w.shape[1], xs=sx.type.strides, ws=w.type.strides)

    def ssm_scan(self, node: Node):
        T, H, P = node.inputs[1].shape
        self.scan_kernel(node, "ssm_scan.c.j2", c_ssm_scan(node), T * H * P)

    def gated_delta_net(self, node: Node):
        params = c_gated_delta_net(node)
        # the planes of a step graph's state table hold one sequence's states
        self.scan_kernel(node, "gated_delta_net.c.j2", params, params["N"] * params["T"] * params["H_v"] * params["S_v"],
                         fusable=params["N"] == 1)

    def scan_kernel(self, node: Node, template: str, params: dict, n_outputs: int, fusable: bool = True):
        """A recurrent scan (ssm_scan, gated_delta_net). With all_states, when its states only go
        to the planes of a table updated in place (the step graph's set_rows(planes, state_slots,
        states)), the scan writes each state straight into its plane and that set_rows becomes no
        kernel: a 9-token verify of a 6-layer Mamba-2 hybrid kept ~21 MB of states in the arena
        and then copied them, 10% of the pass (BENCHMARKS.md)."""
        args = [self.ptr(o) for o in node.inputs] + [self.ptr(node)]
        reads, writes = self.reads_of(*node.inputs), self.reads_of(node)
        store = self.fused_state_store(node, n_outputs) if fusable else None
        planes = dict(planes=0, plane_bytes=0, idx_step=0)
        if store is not None:
            table, idx, _ = store.inputs
            self.fused_stores.add(store)
            args += [self.ptr(idx), self.ptr(table), self.ptr(store), "&status",
                     str(self.index_status(store, table.shape[0]))]
            reads += self.reads_of(table, idx)
            writes += self.reads_of(store)
            planes = dict(planes=table.shape[0], plane_bytes=table.type.strides[0], idx_step=idx.type.strides[0])
        self.add_kernel(node, template, args, reads=reads, writes=writes, **params, **planes)

    def fused_state_store(self, node: Node, n_outputs: int) -> Node | None:
        """The set_rows a scan's kernel may do itself: it writes the all_states states (the
        contiguous f32 rows after the n_outputs outputs, one view nothing else reads) into an f32
        table it updates in place; every other reader of the scan reads only the outputs."""
        if not node.attr("all_states") or node in self.graph.outputs:
            return None
        start = n_outputs * 4
        store = None
        for user in self.graph.users[node]:
            if user.op != "view" or user in self.graph.outputs:
                return None
            lo, hi = user.type.byte_extent
            offset = user.attr("offset")
            sinks = self.graph.users[user]
            if (offset == start and store is None and user.type.is_contiguous and len(sinks) == 1
                    and sinks[0].op == "set_rows" and sinks[0].inputs[2] is user and sinks[0] in self.in_place_nodes
                    and sinks[0].dtype.name == "f32" and sinks[0].inputs[0].type.is_contiguous
                    and user.shape[1] == sinks[0].shape[1]):
                store = sinks[0]
            elif offset + hi > start:
                return None
        return store

    # ---- matmul and rows of tables -------------------------------------------------------
    def mul_mat(self, node: Node):
        x, w = node.inputs
        lay = _mul_mat_layout(node)
        self.wtypes[lay.wtype] = None
        scratch = Place("arena", 0, self.plan.scratch_offsets.get(node, 0))
        self.add_kernel(node, "mul_mat.c.j2",
                        [self.ptr(x), self.ptr(w), self.ptr(node), c_pointer(scratch),
                         self.counters(lay.batches), "&ember_bar"],
                        reads=self.reads_of(x, w),
                        writes=self.reads_of(node) + [(scratch, lay.scratch_bytes)],
                        wtype=lay.wtype, T=lay.T, N=lay.N, K=lay.K, batches=lay.batches,
                        x_row=lay.x_row, w_row=lay.w_row, y_row=lay.N * 4, x_batch=lay.x_batch,
                        w_batch=lay.w_batch, y_batch=lay.y_batch, x_copy=lay.x_copy,
                        w_copy=lay.w_copy, mm_scratch=lay.mm_scratch,
                        batch_barrier=lay.scratch_bytes > lay.mm_scratch)

    def get_rows(self, node: Node):
        table, idx = node.inputs
        R, D = table.shape
        if table.dtype.is_quantized:
            self.wtypes[table.dtype.name] = None
        self.add_kernel(node, "get_rows.c.j2",
                        [self.ptr(table), self.ptr(idx), self.ptr(node), "&status", str(self.index_status(node, R))],
                        reads=self.reads_of(table, idx), writes=self.reads_of(node), **c_get_rows(node))

    def mul_mat_id(self, node: Node):
        x, w, ids = node.inputs
        params = _mul_mat_id_params(node)
        scratch_bytes = params.pop("scratch_bytes")
        self.wtypes[params["wtype"]] = None
        scratch = Place("arena", 0, self.plan.scratch_offsets.get(node, 0))
        code = self.index_status(node, w.shape[0])
        self.add_kernel(node, "mul_mat_id.c.j2",
                        [self.ptr(x), self.ptr(w), self.ptr(ids), self.ptr(node), c_pointer(scratch),
                         self.counters(), "&ember_bar", "&status", str(code)],
                        reads=self.reads_of(x, w, ids), writes=self.reads_of(node) + [(scratch, scratch_bytes)],
                        **params)

    def top_k(self, node: Node):
        _, operands, params = c_row_op(node, c_double)
        self.add_kernel(node, "top_k.c.j2", [self.ptr(operands[0]), self.ptr(node)],
                        reads=self.reads_of(*operands), writes=self.reads_of(node), k=node.attr("k"), **params)

    def take_along(self, node: Node):
        x, idx = node.inputs
        self.add_kernel(node, "take_along.c.j2",
                        [self.ptr(x), self.ptr(idx), self.ptr(node), "&status",
                         str(self.index_status(node, x.shape[-1]))],
                        reads=self.reads_of(x, idx), writes=self.reads_of(node), **c_take_along(node))

    def set_rows(self, node: Node):
        if node in self.fused_stores:      # the scan before it wrote the rows (scan_kernel)
            return
        dst, idx, src = node.inputs
        R, D = dst.shape
        self.kv_quant |= dst.dtype.is_quantized
        self.add_kernel(node, "set_rows.c.j2",
                        [self.ptr(o) for o in (dst, idx, src)] + [self.ptr(node), "&status",
                                                                  str(self.index_status(node, R))],
                        reads=self.reads_of(dst, idx, src), writes=self.reads_of(node),
                        T=idx.shape[0], R=R, D=D, dtype=dst.dtype.name, quantized=dst.dtype.is_quantized,
                        row_bytes=dst.dtype.row_bytes(D), ds=dst.type.strides,
                        idx_step=idx.type.strides[0], ss=src.type.strides,
                        esize=dst.dtype.block_bytes, in_place=node in self.in_place_nodes)


@functools.lru_cache(maxsize=None)
def kv_quant_header() -> str:
    """The quantized KV-cache block helpers, with the TurboQuant tables of ember.codegen.kv_quant."""
    t = turbo_literals(c_hex)
    return TEMPLATES.render("kv_quant.h.j2", d1=t["d1"], d2=t["d2"], cb3=t["cb3"], cb4=t["cb4"],
                            b3=t["b3"], b4=t["b4"], inv=t["inv"][0])


def matmul_prototypes(wtype: str) -> str:
    return (f"void ember_mm_{wtype}(int ith, int nth, int64_t T, int64_t N, int64_t K, const float *x, "
            f"int64_t x_row, const void *w, int64_t w_row, float *y, int64_t y_row, void *scratch, "
            f"int *next, ember_barrier *bar);\n"
            f"void ember_dequant_row_{wtype}(const void *row, float *out, int64_t K);\n"
            f"void ember_mm_{wtype}_prepare(int64_t K, const float *x, void *a);\n"
            f"void ember_mm_{wtype}_chunk(int64_t T, int64_t n0, int64_t n1, int64_t K, const void *a, "
            f"int64_t a_row, const void *w, int64_t w_row, float *y, int64_t y_row);\n"
            f"int64_t ember_mm_chunk_rows_of(int64_t T, int64_t N, int64_t w_row);\n")


def kernel_library_source(wtypes=None) -> str:
    """The C source of a library graphs link against: the matmul and dequantization kernels of
    wtypes (default: every weight type, the library an artifact carries; a JIT-compiled graph
    links against one library per weight type it uses, kernel_library_wtypes)."""
    mm = _matmul()
    parts = [TEMPLATES.static_file("common.h"), TEMPLATES.static_file("helpers.h"), mm.matmul_common_source()]
    parts += [mm.matmul_source(w) for w in (mm.MATMUL_WTYPES if wtypes is None else wtypes)]
    return "\n".join(parts)


# The names a kernel library exports, as a graph calls them (matmul_prototypes); the tag goes
# after the prefix.
_LIBRARY_SYMBOL = re.compile(r"\b(ember_mm_|ember_dequant_row_)(\w+)")
# exported by every kernel library alike (matmul/common.c.j2), whatever its weight types
SHARED_LIBRARY_SYMBOLS = frozenset({"ember_mm_chunk_rows_of"})


def tag_kernel_symbols(source: str, tag: str | Mapping[str, str]) -> str:
    """Give the library's exported names a tag (a hash of the library), so libraries built for
    different ISAs or versions can be loaded into one process side by side. tag: one tag for
    every name (a library's own source, or a graph linked against one library of every weight
    type), or a weight type -> tag map (a graph linked against one library per weight type:
    each name gets its weight type's tag; ember_mm_chunk_rows_of, which every library defines
    alike, the first type's)."""
    if isinstance(tag, str):
        return source.replace("ember_mm_", f"ember_mm_{tag}_").replace("ember_dequant_row_", f"ember_dequant_row_{tag}_")
    if not tag:
        return source
    default = tag[min(tag)]
    # the longest weight type first: a name's type is the longest one it starts with
    wtypes = sorted(tag, key=len, reverse=True)

    def tagged(m: re.Match) -> str:
        prefix, rest = m.groups()
        owner = next((w for w in wtypes if rest == w or rest.startswith(w + "_")), None)
        if owner is None and m.group(0) not in SHARED_LIBRARY_SYMBOLS:
            raise EmberError(f"cpu: {m.group(0)}: no kernel library of its weight type is linked")
        return f"{prefix}{default if owner is None else tag[owner]}_{rest}"
    return _LIBRARY_SYMBOL.sub(tagged, source)


def render_graph(graph: Graph, profile: str | None = None) -> CpuProgram:
    """The C program for graph (dead nodes dropped). Raises EmberError naming the first node
    the CPU renderer cannot handle. With profile ("wall" or "cpu": the clock), every kernel call
    and barrier is timed per thread (ember_graph_profile reads the totals; see
    CpuExecutable.profile)."""
    for node in graph.nodes:
        ok, reason = supports_node(node)
        if not ok:
            raise EmberError(f"cpu: %{value_names(graph)[node]} ({node.op} : {node.type}): {reason}")
    return CpuRenderer(graph, profile).render()
