"""The OpenCL renderer: a whole graph -> one OpenCL C program, its build options and a launch plan.

Every kernel is rendered from templates/opencl/<template>.cl.j2 with the node's shapes and byte
strides baked in as constants and starts with a comment naming the node, the template and its
parameters; kernels with the same body (every layer of a model) are emitted once. Operands are
passed as (buffer, byte offset) pairs, so a view is its operand's buffer at another offset and
one kernel serves every layer. Values live where the memory plan puts them
(ember.codegen.memory_plan): inputs, outputs and constants in buffers of their own, the rest in
one arena buffer. The launch plan lists, in order, each kernel launch with its global and local
sizes and its arguments (which buffer, at which offset); it is plain data (`launch_plan()` is
JSON), so an artifact writer can store it and a runtime can replay it.

Profiles (`Profile`) choose the kernels:
- generic: OpenCL C 1.2, no fp16 arithmetic (halves through vload_half/vstore_half), no
  subgroups; rope angles in double when the device has cl_khr_fp64.
- adreno: Q8_0/Q4_0 weights in the SoA layout (scales and quants split and transposed, quants
  read through image1d_buffer_t) with a GEMV (one token) and a GEMM (prompts) kernel, half
  arithmetic, subgroup broadcast/reduce and qcom_reqd_sub_group_size; work-group sizes from a
  table per Adreno generation (ADRENO_GENERATIONS), detected from the device name.
- adreno-emulated: the adreno kernels with subgroups emulated through local memory and half
  arithmetic emulated in float (rounded to half after every operation), for devices without
  them (PoCL): the same math, runnable and testable anywhere.

The SoA layout is part of the IR: the layout-adreno pass (ember.passes.layout) gives a weight
the `adreno_soa` layout in its type, together with every consumer, and the verifier rejects any
op reading a layout it does not accept. The renderer decides nothing: it reads each weight's
layout from the node types, renders SoA kernels for the weights in that layout and refuses any
layout its profile has no kernels for (the generic profile reads only "row"), naming the node.
(llama.cpp's SYCL backend once reordered Q8_0 for GEMV only and GEMM read garbage.)
The renderer never runs that pass: `layout_pass(profile)` builds it for the pipeline of a target.

Profiles, kernel arguments, launches and `OpenCLProgram` (the launch-plan schema) live in
ember.codegen.opencl_plan, which loaders read without the renderer; the walk is
ember.codegen.renderer's, and `OpenCLRenderer` states what OpenCL C does differently.

Imports jinja2 (through the renderer), NumPy, ember.ir, ember.passes.layout, ember.errors and
the codegen modules: no OpenCL library.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass


from ember.codegen.indexing import (broadcast_strides, bytes_type, coalesce, matmul_batches, matmul_operands,
                                    next_pow2, offset_expr, round_up, span_bytes)
from ember.codegen.kv_quant import KV_QUANTIZED, Q_DOT_ROUNDED, c_hex, turbo_literals
from ember.codegen.opencl_plan import (SOA, BufferArg, ImageArg, KernelInfo, Launch, OpenCLProgram, Profile,
                                       StatusArg, WeightLayout, generic_profile, profile_by_name)
from ember.codegen.renderer import (ARITHMETIC, ELEMENTWISE_OPS, Renderer, Templates, c_comment, c_float,
                                    c_gated_delta_net, c_get_rows, c_literal, c_rope, c_row_op, c_softmax,
                                    c_ssm_scan, c_take_along, lowering_problem, optional_operands)
from ember.codegen.values import Place
from ember.errors import EmberError
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.printer import value_names
from ember.ir.types import TensorType
from ember.passes.layout import LayoutAdreno, adreno_kernel_reads

TEMPLATES = Templates("opencl")
TEMPLATE_DIR = TEMPLATES.folder
ARENA_ALIGNMENT = 256
MAX_BYTES = 2 ** 31 - 1          # kernels index bytes with 32-bit ints

# Elementwise ops as OpenCL C expressions of the float operands a (and b).
ELTWISE_CL = {
    **ARITHMETIC,
    "exp": "exp(a)",
    "tanh": "tanh(a)",
    "sqrt": "sqrt(a)",
    "rsqrt": "1.0f / sqrt(a)",
    "silu": "a / (1.0f + exp(-a))",
    "gelu": "ember_gelu(a)",
    "relu": "a < 0.0f ? 0.0f : a",
    "sigmoid": "1.0f / (1.0f + exp(-a))",
    "softplus": "fmax(a, 0.0f) + log1p(exp(-fabs(a)))",
    "swiglu": "a / (1.0f + exp(-a)) * b",
    "geglu": "ember_gelu(a) * b",
}
assert set(ELTWISE_CL) | {"scale", "clamp"} == set(ELEMENTWISE_OPS), "an elementwise op has no OpenCL form"


# ---- the SoA weight layout ---------------------------------------------------------------------
def weight_layouts(graph: Graph) -> dict[Node, WeightLayout]:
    """The constants whose type is in the adreno_soa layout, with how the runtime holds them."""
    return {n: WeightLayout("soa", n.dtype.name, *n.shape) for n in graph.nodes
            if n.op == "const" and n.type.layout == SOA.name}


def _soa_kernel_problem(user: Node, k: int) -> str | None:
    """Why the Adreno kernels cannot read operand k of user in the SoA layout, or None."""
    operand = user.inputs[k]
    if operand.op != "const" or operand.attr("value") is not None:
        return "the SoA kernels read only named constants (bound as images) in that layout"
    if not adreno_kernel_reads(user, k):
        return f"no Adreno kernel reads {user.op} operand {k} in that layout"
    return None


def check_layouts(graph: Graph, profile: Profile) -> None:
    """EmberError naming the first node that reads (or returns) a tensor in a layout this
    profile has no kernel for: generic reads only "row"; Adreno also reads adreno_soa weights
    in its GEMV/GEMM and get_rows kernels."""
    names = None
    readable = ("row", SOA.name) if profile.adreno else ("row",)
    for node in graph.nodes:
        for k, operand in enumerate(node.inputs):
            layout = operand.type.layout
            if layout == "row":
                continue
            if layout in readable:
                why = _soa_kernel_problem(node, k)
            else:
                why = f"the {profile.name} profile reads only the layouts {', '.join(readable)}"
            if why:
                names = names or value_names(graph)
                raise EmberError(f"opencl: %{names[node]} ({node.op} : {node.type}): operand {k} "
                                 f"(%{names[operand]}) is in layout {layout}: {why}")
    for out in graph.outputs:
        if out.type.layout != "row":
            names = names or value_names(graph)
            raise EmberError(f"opencl: output %{names[out]} ({out.op} : {out.type}) is in layout "
                             f"{out.type.layout}; outputs are returned in the row layout only")


def layout_pass(profile: Profile) -> LayoutAdreno | None:
    """The layout pass a profile's kernels expect, with its size thresholds, for the target's
    pipeline to run (the renderer never runs it): layout-adreno for Adreno profiles, None for
    the generic one (row layout only)."""
    if not profile.adreno:
        return None
    return LayoutAdreno(min_rows=profile.soa_min_rows, min_cols=profile.soa_min_cols,
                        max_texels=profile.max_image_texels)


def cl_real(v: float, fp64: bool) -> str:
    """A float as an OpenCL C literal: a double with fp64, else a float (rounded to f32)."""
    return c_literal(v, "double" if fp64 else "f32")


# ---- support -----------------------------------------------------------------------------------
def supports_node(node: Node) -> tuple[bool, str]:
    """Whether the OpenCL renderer handles node: every op of the op table, at every dtype it
    allows, as long as each tensor spans less than 2 GiB (32-bit offsets)."""
    why = lowering_problem(node, "OpenCL")
    if why:
        return False, why
    for t in [node.type] + [i.type for i in node.inputs]:
        if span_bytes(t) > MAX_BYTES or t.numel > MAX_BYTES:
            return False, f"{node.op}: a tensor of {span_bytes(t)} bytes is over the 2 GiB kernels address"
    if node.op in ("mul_mat", "mul_mat_id") and node.inputs[1].shape[-1] == 0:
        return False, f"{node.op}: K == 0 unsupported"
    for k, operand in enumerate(node.inputs):
        if operand.type.layout not in ("row", SOA.name):
            return False, f"{node.op}: operand {k} is in layout {operand.type.layout}, which no OpenCL kernel reads"
    return True, ""


# ---- mul_mat shapes ----------------------------------------------------------------------------
# Register tile (tokens, weight rows) of mul_mat_tiled.cl.j2. Measured on PoCL (AVX2, 16 vector
# registers): 1 x 4 keeps its 4 float16 accumulators and weight vectors in registers; 1 x 8,
# 2 x 2, 2 x 4, 4 x 1 and 4 x 2 measured slower (tokens gain little from a register tile, as the
# work items of a group, consecutive tokens, already share their weight rows in L1). PoCL's own
# work-group size was as fast as any we set.
_TILE = (1, 4)

@dataclass
class _MulMat:
    T: int
    N: int
    K: int
    batches: int
    x_row: int
    x_step: int
    w_row: int
    w_step: int
    x_batch: str
    w_batch: str


def _mul_mat_shape(node: Node) -> _MulMat:
    x, w = matmul_operands(node)
    b = matmul_batches(x, w)
    return _MulMat(b.T, w.shape[-2], w.shape[-1], b.batches, b.x_row, x.strides[-1], w.strides[-2], w.strides[-1],
                   b.x_batch, b.w_batch)


def _mul_mat_id_shape(node: Node) -> _MulMat:
    """mul_mat_id as mul_mat.cl.j2 runs it: one batch per (token, slot) pair, one token each, x
    read at the pair's token (and slot, for x [T, n_used, K]), w at the pair's expert `e`."""
    x, w, ids = (i.type for i in node.inputs)
    T, n_used = ids.shape
    E, N, K = w.shape
    x_sel = x.strides[1] if x.rank == 3 and x.shape[1] > 1 else 0
    x_batch = f"(b / {n_used}) * {x.strides[0]} + (b % {n_used}) * {x_sel}"
    return _MulMat(1, N, K, T * n_used, 0, x.strides[-1], w.strides[1], w.strides[2], x_batch,
                   f"e * {w.strides[0]}")


def _vector_dot(x_dtype: str, wt: TensorType, mm: _MulMat) -> bool:
    """Whether mul_mat.cl.j2 takes its float16 path: x f32 and contiguous along K, and w
    quantized, or float, contiguous along K with K a multiple of 16."""
    return x_dtype == "f32" and mm.x_step == 4 and (wt.dtype.is_quantized or (
        mm.K % 16 == 0 and mm.w_step == wt.dtype.block_bytes))


# ---- the renderer ------------------------------------------------------------------------------
class OpenCLRenderer(Renderer, dialect="opencl", templates=TEMPLATES, arena_alignment=ARENA_ALIGNMENT):
    """OpenCL C for a profile: operands as (buffer, byte offset) pairs, launches with global and
    local sizes, SoA kernels for the weights whose type is in the adreno_soa layout."""

    def __init__(self, graph: Graph, profile: Profile):
        self.profile = profile
        self.reduce = "subgroup" if profile.subgroups else "local"
        self.launches: list[Launch] = []
        self.kv_quant = False          # whether a kernel reads or writes a quantized KV cache
        super().__init__(graph)
        self.layouts = weight_layouts(self.graph)     # read from the types; check_layouts vetted them

    def scratch_bytes(self, node: Node) -> int:
        """The half, transposed activations of a GEMM on an SoA weight."""
        w = node.inputs[1] if node.op == "mul_mat" else None
        if w is not None and w.op == "const" and w.type.layout == SOA.name and node.type.numel:
            mm = _mul_mat_shape(node)
            if mm.T > 1:
                return mm.K * round_up(mm.T, 8) * 2
        return 0

    def buf(self, node: Node) -> BufferArg:
        place = self.places[node]
        if place.region == "const" and self.constants[place.index] in self.layouts:
            raise EmberError(f"opencl: {self.describe(node)} reads a weight in the "
                             f"{self.constants[place.index].type.layout} layout through a kernel "
                             f"that does not know that layout")
        return BufferArg(place)

    # ---- kernels -------------------------------------------------------------------------
    def add_kernel(self, node: Node, template: str, args: list, global_size, local_size=None, **params):
        name = self.c_kernel(node, template, params)
        global_size = tuple(int(g) for g in global_size)
        if local_size is not None:
            local_size = tuple(int(s) for s in local_size)
            global_size = tuple(round_up(max(g, 1), s) for g, s in zip(global_size, local_size))
        self.launches.append(Launch(name, global_size, local_size, tuple(args), self.describe(node)))

    def render(self) -> OpenCLProgram:
        self.lower_graph()
        prelude = [c_comment(f"ember: graph {self.graph.name}, profile {self.profile.name}, "
                             f"{len(self.kernels)} kernels, {len(self.launches)} launches")]
        if self.profile.fp64:
            prelude.append("#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n")
        prelude.append(TEMPLATES.static_file("common.h"))
        if self.profile.adreno:
            prelude.append(TEMPLATES.static_file("adreno.h"))
        if self.kv_quant:
            prelude.append(kv_quant_header(self.profile.fp64))
        source = "\n".join(prelude)
        line = source.count("\n") + 1
        infos, parts = [], [source]
        for kernel in self.kernels:
            text = "\n" + kernel.text
            first = line + 1
            line += text.count("\n")
            infos.append(KernelInfo(kernel.name, kernel.template, kernel.params, first, line))
            parts.append(text)
        layouts = {j: self.layouts[c] for j, c in enumerate(self.constants) if c in self.layouts}
        return OpenCLProgram("".join(parts), self.profile.build_options, self.profile, self.graph, self.plan,
                             tuple(self.constants), layouts, tuple(infos), tuple(self.launches),
                             dict(self.status_messages), dict(self.in_place))

    # ---- copies --------------------------------------------------------------------------
    def copy(self, node: Node, src: Node, dst: Place, dst_type: TensorType):
        s, d = src.type, dst_type
        if s.dtype.is_quantized:
            row = s.dtype.row_bytes(s.shape[-1])
            s, d = bytes_type(s, row), bytes_type(d, row)
        sizes, (ss, ds) = coalesce(s.shape, [s.strides, d.strides])
        numel = math.prod(sizes)
        if s.dtype == d.dtype:
            mode, item = "raw", {1: "uchar", 2: "ushort", 4: "uint"}[s.dtype.block_bytes]
        else:
            mode, item = "convert", "uint"
        self.add_kernel(node, "copy.cl.j2", [self.buf(src), BufferArg(dst)], (numel,), None,
                        numel=numel, src_off=offset_expr("i", sizes, ss), dst_off=offset_expr("i", sizes, ds),
                        src_dtype=s.dtype.name, dst_dtype=d.dtype.name, mode=mode, item_type=item)

    # ---- elementwise ---------------------------------------------------------------------
    def eltwise(self, node: Node):
        operands = list(node.inputs)
        strides = [operands[0].type.strides]
        if len(operands) == 2:
            strides.append(broadcast_strides(operands[1].type, node.shape))
        strides.append(node.type.strides)
        sizes, strides = coalesce(node.shape, strides)
        numel = math.prod(sizes)
        if node.op == "scale":
            expr = f"a * {c_float(node.attr('scale'))} + {c_float(node.attr('bias'))}"
        elif node.op == "clamp":
            expr = f"fmin(fmax(a, {c_float(node.attr('min'))}), {c_float(node.attr('max'))})"
        else:
            expr = ELTWISE_CL[node.op]
        two = len(operands) == 2
        self.add_kernel(node, "eltwise.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (numel,), None, arity=len(operands), expr=expr, numel=numel,
                        a_off=offset_expr("i", sizes, strides[0]),
                        b_off=offset_expr("i", sizes, strides[1]) if two else "0",
                        y_off=offset_expr("i", sizes, strides[-1]))

    # ---- rows ----------------------------------------------------------------------------
    def row_wg(self, n: int) -> int:
        if self.profile.subgroups:    # whole subgroups for sub_group_reduce
            return self.profile.row_wg
        return min(self.profile.row_wg, next_pow2(max(n, 1)))

    def rows(self, node: Node):
        stem, operands, params = c_row_op(node, c_float, wg_of=self.row_wg, reduce=self.reduce)
        self.add_kernel(node, f"{stem}.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (params["rows"] * params["wg"],), (params["wg"],), **params)

    def softmax(self, node: Node):
        operands, loop, params = c_softmax(node)
        wg = self.row_wg(loop.n)
        self.add_kernel(node, "softmax.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (loop.rows * wg,), (wg,), **params, wg=wg, reduce=self.reduce)

    # ---- rope, attention -----------------------------------------------------------------
    def rope(self, node: Node):
        fp64 = self.profile.fp64
        operands, params = c_rope(node, lambda v: cl_real(v, fp64))
        T, H, D, n_dims = params["T"], params["H"], params["D"], params["n_dims"]
        self.add_kernel(node, "rope.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (n_dims // 2 + D - n_dims, H, T), None, **params, fp64=fp64)

    def attention(self, node: Node):
        (q, k, v), mask = optional_operands(node, 3)
        (Tq, Hq, D), (Tk, Hkv, Dv) = q.shape, v.shape
        softcap = node.attr("softcap")
        wg = self.profile.attention_wg
        operands = [q, k, v] + ([mask] if mask else [])
        self.kv_quant |= k.dtype.is_quantized or v.dtype.is_quantized
        self.add_kernel(node, "attention.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (wg, Hq, Tq), (wg, 1, 1),
                        Tq=Tq, Tk=Tk, Hq=Hq, group=Hq // Hkv, D=D, Dv=Dv,
                        qs=q.type.strides, ks=k.type.strides, vs=v.type.strides,
                        ms=mask.type.strides if mask else (0, 0), k_dtype=k.dtype.name,
                        v_dtype=v.dtype.name, has_mask=mask is not None,
                        mask_dtype=mask.dtype.name if mask else "f32",
                        scale=c_float(node.attr("scale")), softcap=c_float(softcap) if softcap else None,
                        causal=node.attr("causal"), window=node.attr("window"), wg=wg,
                        k_vector=D % 16 == 0 and k.type.strides[2] == k.dtype.block_bytes
                        and not k.dtype.is_quantized,
                        dv_per=max(1, -(-Dv // wg)), reduce=self.reduce, kv_quantized=KV_QUANTIZED,
                        q_dot_rounded=Q_DOT_ROUNDED)

    # ---- matmul and rows of tables -------------------------------------------------------
    def mul_mat(self, node: Node):
        x, w = node.inputs
        mm = _mul_mat_shape(node)
        if w in self.layouts:
            return self.mul_mat_soa(node, mm)
        vector = _vector_dot(x.dtype.name, w.type, mm)
        if mm.T > 1 and vector and not w.dtype.is_quantized:
            # Prompts: a register tile per work item (see the template); it reduces each
            # output exactly as mul_mat.cl.j2 does, so decode and prompt rows agree bit for bit.
            tm, tn = _TILE
            self.add_kernel(node, "mul_mat_tiled.cl.j2", [self.buf(x), self.buf(w), self.buf(node)],
                            (-(-mm.T // tm), -(-mm.N // tn), mm.batches), None,
                            wtype=w.dtype.name, T=mm.T, N=mm.N, K=mm.K, tm=tm, tn=tn,
                            batches=mm.batches, x_row=mm.x_row, w_row=mm.w_row, x_batch=mm.x_batch,
                            w_batch=mm.w_batch)
            return
        tt = min(mm.T, 8)
        self.add_kernel(node, "mul_mat.cl.j2", [self.buf(x), self.buf(w), self.buf(node)],
                        (mm.N, -(-mm.T // tt), mm.batches), None,
                        wtype=w.dtype.name, quantized=w.dtype.is_quantized, vector=vector,
                        x_dtype=x.dtype.name,
                        T=mm.T, N=mm.N, K=mm.K, tt=tt, batches=mm.batches, x_row=mm.x_row,
                        x_step=mm.x_step, w_row=mm.w_row, w_step=mm.w_step, x_batch=mm.x_batch,
                        w_batch=mm.w_batch, ids=False)

    def mul_mat_id(self, node: Node):
        """mul_mat.cl.j2 with ids: one work item per (weight row, pair), reading only the pairs'
        experts (see the template). Expert weights are in the row layout on every profile: the
        Adreno SoA layout holds 2-D matrices, and layout-adreno leaves a 3-D [E, N, K] weight as
        it is (check_layouts would refuse one that were not)."""
        x, w, ids = node.inputs
        mm = _mul_mat_id_shape(node)
        T, n_used = ids.shape
        self.add_kernel(node, "mul_mat.cl.j2",
                        [self.buf(x), self.buf(w), self.buf(node), self.buf(ids),
                         StatusArg(self.index_status(node, w.shape[0]))],
                        (mm.N, 1, mm.batches), None,
                        wtype=w.dtype.name, quantized=w.dtype.is_quantized,
                        vector=_vector_dot(x.dtype.name, w.type, mm), x_dtype=x.dtype.name,
                        T=1, N=mm.N, K=mm.K, tt=1, batches=mm.batches, x_row=0, x_step=mm.x_step,
                        w_row=mm.w_row, w_step=mm.w_step, x_batch=mm.x_batch, w_batch=mm.w_batch,
                        ids=True, n_used=n_used, E=w.shape[0], ids_tok=ids.type.strides[0],
                        ids_sel=ids.type.strides[1])

    def top_k(self, node: Node):
        _, operands, params = c_row_op(node, c_float)
        self.add_kernel(node, "top_k.cl.j2", [self.buf(operands[0]), self.buf(node)], (params["rows"],), None,
                        k=node.attr("k"), **params)

    def take_along(self, node: Node):
        x, idx = node.inputs
        params = c_take_along(node)
        self.add_kernel(node, "take_along.cl.j2",
                        [self.buf(x), self.buf(idx), self.buf(node), StatusArg(self.index_status(node, x.shape[-1]))],
                        (params["k"], params["rows"]), None, **params)

    def mul_mat_soa(self, node: Node, mm: _MulMat):
        x, w = node.inputs
        layout = self.layouts[w]
        j = self.places[w].index
        emulate = not self.profile.subgroups
        scales = BufferArg(self.places[w], "d")
        if mm.T == 1:
            sg, nsg, _ = self.profile.gemv_local
            self.add_kernel(node, "mul_mat_soa_gemv.cl.j2",
                            [self.buf(x), ImageArg(j, "r32ui"), scales, self.buf(node)],
                            (round_up(mm.N, sg), nsg, 1), (sg, nsg, 1),
                            wtype=layout.dtype, M=mm.N, K=mm.K, x_dtype=x.dtype.name, x_step=mm.x_step,
                            sg=sg, nsg=nsg, emulate=emulate)
            return
        tp = round_up(mm.T, 8)
        scratch = Place("arena", 0, self.plan.scratch_offsets[node])
        self.add_kernel(node, "act_to_half_t.cl.j2", [self.buf(x), BufferArg(scratch)], (mm.K, tp), None,
                        T=mm.T, K=mm.K, tp=tp, x_dtype=x.dtype.name, x_row=mm.x_row, x_step=mm.x_step)
        local = self.profile.gemm_local
        self.add_kernel(node, "mul_mat_soa_gemm.cl.j2",
                        [BufferArg(scratch), ImageArg(j, "rgba32ui"), scales, self.buf(node)],
                        (mm.N // 4, tp // 8, 1), local,
                        wtype=layout.dtype, M=mm.N, K=mm.K, T=mm.T, tp=tp, emulate=emulate)

    def get_rows(self, node: Node):
        table, idx = node.inputs
        R, D = table.shape
        if table in self.layouts:
            layout = self.layouts[table]
            place = self.places[table]
            self.add_kernel(node, "get_rows_soa.cl.j2",
                            [BufferArg(place, "q"), BufferArg(place, "d"), self.buf(idx), self.buf(node),
                             StatusArg(self.index_status(node, R))],
                            (D, idx.shape[0]), None,
                            wtype=layout.dtype, M=R, K=D, T=idx.shape[0], idx_step=idx.type.strides[0])
            return
        self.add_kernel(node, "get_rows.cl.j2",
                        [self.buf(table), self.buf(idx), self.buf(node), StatusArg(self.index_status(node, R))],
                        (D // 32 if table.dtype.is_quantized else D, idx.shape[0]), None, **c_get_rows(node))

    def set_rows(self, node: Node):
        dst, idx, src = node.inputs
        R, D = dst.shape
        if self.places[node] != self.places[dst]:
            self.copy(node, dst, self.places[node], node.type)
        quantized = dst.dtype.is_quantized      # a quantized cache: one work item per block
        self.kv_quant |= quantized
        chunk = dst.dtype.block_size if quantized else 256
        self.add_kernel(node, "set_rows.cl.j2",
                        [self.buf(idx), self.buf(src), self.buf(node),
                         StatusArg(self.index_status(node, R))],
                        (-(-D // chunk), idx.shape[0]), None,
                        T=idx.shape[0], R=R, D=D, dtype=dst.dtype.name, quantized=quantized,
                        esize=dst.dtype.block_bytes, row_bytes=dst.dtype.row_bytes(D),
                        idx_step=idx.type.strides[0], ss=src.type.strides, chunk=chunk)

    # ---- state-space ops (Mamba-2) -------------------------------------------------------
    def ssm_conv(self, node: Node):
        sx, w = node.inputs
        T, C = node.shape
        self.add_kernel(node, "ssm_conv.cl.j2", [self.buf(sx), self.buf(w), self.buf(node)], (C, T), None,
                        T=T, C=C, K=w.shape[1], xs=sx.type.strides, ws=w.type.strides)

    def ssm_scan(self, node: Node):
        H, P, _ = node.inputs[0].shape
        self.add_kernel(node, "ssm_scan.cl.j2", [self.buf(o) for o in node.inputs] + [self.buf(node)],
                        (H * P,), None, **c_ssm_scan(node))

    def gated_delta_net(self, node: Node):
        params = c_gated_delta_net(node)
        self.add_kernel(node, "gated_delta_net.cl.j2", [self.buf(o) for o in node.inputs] + [self.buf(node)],
                        (params["N"] * params["H_v"] * params["S_v"],), None, **params)


@functools.lru_cache(maxsize=None)
def kv_quant_header(fp64: bool) -> str:
    """The quantized KV-cache helpers, with the TurboQuant tables of ember.codegen.kv_quant."""
    t = turbo_literals(c_hex)
    return TEMPLATES.render("kv_quant.h.j2", d1=t["d1"], d2=t["d2"], cb3=t["cb3"], cb4=t["cb4"],
                            b3=t["b3"], b4=t["b4"], inv=t["inv"][0], fp64=fp64)


def render_graph(graph: Graph, profile: Profile | None = None) -> OpenCLProgram:
    """The OpenCL program for graph (dead nodes dropped). Raises EmberError naming the first node
    the renderer cannot handle."""
    profile = profile or generic_profile()
    for node in graph.nodes:
        if node.op in ("input", "const"):
            continue
        ok, reason = supports_node(node)
        if not ok:
            raise EmberError(f"opencl: %{value_names(graph)[node]} ({node.op} : {node.type}): {reason}")
    check_layouts(graph, profile)
    return OpenCLRenderer(graph, profile).render()


def compile_plan(graph: Graph, profile: Profile | str = "adreno") -> dict:
    """What an artifact needs to run graph with OpenCL: {"source": the program, "build_options",
    "plan": launch_plan() (buffers, constants and their layouts, kernels, launches)}. JSON-able.
    profile: a Profile or a profile name (adreno = the A7xx table).

    A runtime builds the source with the options, makes one buffer per input, output and
    constant and one arena of plan["arena_bytes"] (plus a one-int status buffer, zeroed before
    each run), and enqueues plan["launches"] in order on one in-order queue. An argument
    {"kind": "buffer"} is two kernel arguments, the buffer and a uint byte offset; a constant
    with a layout has parts instead of one buffer: relayout_weight(data, layout) gives "q" and
    "d" (data: the graph's own row blocks, or the packed array of the laid-out graph), and {"kind": "image"} is an image1d_buffer_t of format r32ui (layout.texels texels) or
    rgba32ui (a quarter as many) over "q"; {"kind": "status"} is the status buffer and an int
    code (plan["status_messages"] says what a nonzero status means). Outputs listed in
    plan["in_place"] are read from their input's buffer. tests/backends/test_opencl_backend.py
    replays a plan this way."""
    if isinstance(profile, str):
        profile = profile_by_name(profile)
    program = render_graph(graph, profile)
    return {"source": program.source, "build_options": program.build_options, "plan": program.launch_plan()}

