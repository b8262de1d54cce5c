"""The Vulkan renderer: a whole graph -> GLSL compute shaders and a launch plan.

A `VulkanProgram` is what a Vulkan runtime needs to run one graph: the distinct shaders (each
rendered from templates/vulkan/<op>.comp.j2 and starting with a comment naming its template and
parameters), and the dispatches in order, each with its shader, its buffer bindings (a region, a
byte offset aligned for the device and a size), its push constants (packed bytes) and its
work-group counts, plus whether a barrier must come before it. `launch_plan()` gives all of it
as JSON-able data, so a deployed runtime can run stored SPIR-V without a shader compiler.

Shaders are generic over shapes: sizes, element offsets and strides come in push constants, so
a model needs only a few dozen shaders; types, work-group sizes and device features are template
parameters. The device features a shader may use are a `DeviceCaps` (8-/16-bit storage,
subgroup arithmetic, the largest storage-buffer binding, the binding-offset alignment).

Where values live follows the CPU renderer: the memory plan (ember.codegen.memory_plan) puts
intermediates in one arena; inputs, outputs and constants have regions of their own; views are
an offset and strides into their operand's region. A set_rows that updates a graph input read by
nothing else writes into that input's region (the output is read back from there). A weight
larger than one binding (maxStorageBufferRange) is bound in ranges of rows, one dispatch each.

The device caps and the launch-plan schema (Shader, Binding, Dispatch, VulkanProgram) live in
ember.codegen.vulkan_plan, which runtimes read without the renderer; the walk is
ember.codegen.renderer's, and `VulkanRenderer` states what GLSL does differently: bindings and
push constants, shapes in push constants, work-group counts.

Imports jinja2 (through the renderer), NumPy, ember.ir, ember.errors and the codegen modules: no
Vulkan, no shader compiler.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import struct

import numpy as np

from ember.codegen.indexing import broadcast_strides, dims4, item_unit, matmul_operands, round_up, span_bytes
from ember.codegen.kv_quant import KV_QUANTIZED, Q_DOT_ROUNDED, glsl_bits, is_turbo, sign_words, turbo_literals, turbo_tables
from ember.codegen.memory_plan import is_view
from ember.codegen.renderer import (ARITHMETIC, ELEMENTWISE_OPS, Renderer, Templates, extent, hazard_barriers,
                                    lowering_problem, optional_operands)
from ember.codegen.values import Place
from ember.codegen.vulkan_plan import Binding, DeviceCaps, Dispatch, Shader, VulkanProgram
from ember.errors import EmberError
from ember.ir import dtypes
from ember.ir.graph import Graph
from ember.ir.layouts import unsupported_layout
from ember.ir.node import Node
from ember.ir.ops.delta_net import GdnDims, gdn_dims
from ember.ir.ops.elementwise import BINARY, GATED
from ember.ir.printer import value_names
from ember.ir.types import TensorType

TEMPLATES = Templates("vulkan")
# The TurboQuant tables (_kv_quant.glsl.j2): a template global, not a parameter of every shader.
TEMPLATES.environment.globals["tq"] = dict(turbo_literals(glsl_bits), **{
    f"{name}_words": [f"0x{w:08x}u" for w in sign_words(turbo_tables()[name])] for name in ("d1", "d2")})
TEMPLATE_DIR = TEMPLATES.folder
ARENA_ALIGNMENT = 64

# Elementwise ops as GLSL of the f32 operands a (and b); p0, p1 are push constants.
ELTWISE_GLSL = {
    **ARITHMETIC,
    "exp": "exp(a)",
    "tanh": "tanh_stable(a)",
    "sqrt": "sqrt(a)",
    "rsqrt": "1.0 / sqrt(a)",
    "silu": "a / (1.0 + exp(-a))",
    "gelu": "gelu_tanh(a)",
    "relu": "a < 0.0 ? 0.0 : a",
    "sigmoid": "1.0 / (1.0 + exp(-a))",
    "softplus": "max(a, 0.0) + log1p_stable(exp(-abs(a)))",
    "swiglu": "a / (1.0 + exp(-a)) * b",
    "geglu": "gelu_tanh(a) * b",
    "scale": "a * pc.p0 + pc.p1",
    "clamp": "min(max(a, pc.p0), pc.p1)",
}
assert set(ELTWISE_GLSL) == set(ELEMENTWISE_OPS), "an elementwise op has no GLSL form"

FLOAT_KINDS = ("f32", "f16", "bf16")
RAW_KIND = {4: "u32", 2: "u16", 1: "u8"}
MATMUL_WTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k",
                 "q4_1", "q5_1", "q2_k", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "mxfp4", "nvfp4")


# ---- templates -------------------------------------------------------------------------------
def kernel_templates() -> list[str]:
    """The kernel templates (not the shared includes, whose names start with `_`)."""
    return [name for name in TEMPLATES.names("*.comp.j2") if not name.startswith("_")]


def render_shader(template: str, params: dict, push_fields, bindings) -> Shader:
    """Render a kernel template. params must hold the feature parameters (wg, storage8,
    storage16, subgroup) and the template's own; push_fields the push-constant block;
    bindings the kind of each binding ("storage" or "texel"), or their number (all storage)."""
    kinds = ("storage",) * bindings if isinstance(bindings, int) else tuple(bindings)
    return _render_shader(template, tuple(sorted(params.items())), tuple(push_fields), kinds)


@functools.lru_cache(maxsize=4096)
def _render_shader(template: str, shown: tuple, push_fields: tuple, kinds: tuple) -> Shader:
    params = dict(shown)
    body = TEMPLATES.render(template, push=list(push_fields), **params)
    comment = (f"// ember vulkan kernel: template {template}\n"
               f"// params: {', '.join(f'{k}={v}' for k, v in shown)}\n"
               f"// push constants: {', '.join(n for n, _ in push_fields)}; bindings: {', '.join(kinds)}\n")
    return Shader(template, shown, comment + body, kinds, tuple(push_fields))


def rope_table(node: Node) -> np.ndarray:
    """freq_scale * freq_base^(-2i/n_dims), computed in float64, stored as f32 (hi, lo) pairs."""
    n_dims = node.attr("n_dims") or node.inputs[0].shape[2]
    f = node.attr("freq_scale") * node.attr("freq_base") ** (-np.arange(0, n_dims, 2, dtype=np.float64) / n_dims)
    hi = f.astype(np.float32)
    lo = (f - hi.astype(np.float64)).astype(np.float32)
    return np.stack([hi, lo], axis=1).reshape(-1)


# ---- support -----------------------------------------------------------------------------------
def _splittable_rows(node: Node) -> Node | None:
    """The operand of node that may be bound in ranges of rows (a big weight), if any."""
    if node.op == "mul_mat" and all(s == 1 for s in node.inputs[1].shape[:-2]):
        return node.inputs[1]
    if node.op == "get_rows":
        return node.inputs[0]
    return None


def supports_node(node: Node, caps: DeviceCaps) -> tuple[bool, str]:
    """Whether the Vulkan renderer handles node on a device with caps."""
    why = lowering_problem(node, "Vulkan") or unsupported_layout(node)   # only row-layout tensors: no kernel reads another layout
    if why:
        return False, why
    if node.op in ("input", "const") or is_view(node):
        return True, ""
    limit = caps.max_storage_range
    big = _splittable_rows(node)
    for k, operand in enumerate(node.inputs):
        t = operand.type
        if operand is big:   # bound in ranges of whole rows: one row must fit
            row = t.dtype.row_bytes(t.shape[-1]) if t.dtype.is_quantized else \
                (t.shape[-1] - 1) * t.strides[-1] + t.dtype.block_bytes
            if row > max(limit, caps.max_texel_bytes):
                return False, (f"{node.op}: one row of operand {k} ({row} bytes) exceeds the device's "
                               f"maxStorageBufferRange {limit}")
        elif span_bytes(t) > limit and not (node.op == "mul_mat" and k == 0 and _mul_mat_t_splits(node, caps)):
            return False, (f"{node.op}: operand {k} spans {span_bytes(t)} bytes, more than the device's "
                           f"maxStorageBufferRange {limit}")
    if span_bytes(node.type) > limit and not (node.op == "mul_mat" and _mul_mat_t_splits(node, caps)):
        return False, (f"{node.op}: the result spans {span_bytes(node.type)} bytes, more than the device's "
                       f"maxStorageBufferRange {limit}")
    if node.op in ("mul_mat", "mul_mat_id"):
        w = node.inputs[1]
        if w.dtype.name not in MATMUL_WTYPES:
            return False, f"{node.op}: w dtype {w.dtype} unsupported"
        if w.shape[-1] == 0:
            return False, f"{node.op}: K == 0 unsupported"
    return True, ""


def _mul_mat_t_splits(node: Node, caps: DeviceCaps) -> bool:
    """A mul_mat with one batch whose x or y is too big for a binding is split over tokens."""
    x = node.inputs[0].type
    batches = math.prod(x.shape[:-2]) if x.rank > 2 else 1
    return batches == 1 and node.type.shape[-1] * 4 <= caps.max_storage_range and \
        (x.strides[-2] if x.rank >= 2 else 0) + x.shape[-1] * x.dtype.block_bytes <= caps.max_storage_range


# ---- the renderer ------------------------------------------------------------------------------
class VulkanRenderer(Renderer, dialect="vulkan", templates=TEMPLATES, arena_alignment=ARENA_ALIGNMENT):
    """GLSL compute shaders generic over shapes: operands as bindings at aligned offsets, sizes and
    strides in push constants, dispatches with a barrier where their byte ranges clash."""

    def __init__(self, graph: Graph, caps: DeviceCaps):
        super().__init__(graph)
        self.caps = caps
        self.aux: list[np.ndarray] = []
        self.aux_index: dict[bytes, int] = {}
        self.dispatches: list[Dispatch] = []

    # ---- dispatches --------------------------------------------------------------------------
    def bind(self, place: Place, span: int, unit: int, what: str, kind: str = "storage") -> tuple[Binding, int]:
        """A binding that covers span bytes at place, and place's offset in it, in units."""
        texel = kind == "texel"
        align = max(self.caps.offset_alignment, self.caps.texel_alignment) if texel else self.caps.offset_alignment
        limit = self.caps.max_texel_bytes if texel else self.caps.max_storage_range
        start = place.offset - place.offset % align
        rel = place.offset - start
        if rel % unit:
            raise EmberError(f"vulkan: {what} at byte offset {place.offset} is not aligned to its "
                             f"{unit}-byte items")
        size = round_up(max(rel + span, 4), 4)
        if size > limit:
            raise EmberError(f"vulkan: {what} spans {size} bytes, more than one {kind} binding "
                             f"allows ({limit})")
        return Binding(place.region, place.index, start, size, kind), rel // unit

    def operand(self, node: Node, unit: int | None = None, what: str = "operand", kind: str = "storage"):
        """(binding, offset in units) of a node's data."""
        unit = unit or item_unit(node.dtype)
        return self.bind(self.places[node], span_bytes(node.type), unit, what, kind)

    def shader(self, template: str, params: dict, push_fields, bindings) -> int:
        features = dict(storage8=self.caps.storage8, storage16=self.caps.storage16,
                        subgroup=self.caps.subgroup_size)
        features.update(params)
        shader = render_shader(template, features, push_fields, bindings)
        # Shaders with the same source (every layer of a model) are compiled once.
        index = self.kernel_by_body.get(shader.source)
        if index is None:
            index = self.kernel_by_body[shader.source] = len(self.kernels)
            self.kernels.append(shader)
        return index

    def dispatch(self, node: Node, template: str, params: dict, bindings: list[Binding], push: dict,
                 groups: int, reads: list[Binding], writes: list[Binding]):
        fields = [(name, "float" if isinstance(v, float) else "uint") for name, v in push.items()]
        packed = b"".join(struct.pack("<f", v) if isinstance(v, float) else struct.pack("<I", v)
                          for v in push.values())
        if len(packed) > self.caps.push_bytes:
            raise EmberError(f"vulkan: {template} needs {len(packed)} bytes of push constants, "
                             f"the device allows {self.caps.push_bytes}")
        for name, v in push.items():
            if not isinstance(v, float) and not 0 <= v < 1 << 32:
                raise EmberError(f"vulkan: {self.describe(node)}: push constant {name}={v} out of range")
        index = self.shader(template, params, fields, [b.kind for b in bindings])
        self.dispatches.append(Dispatch(index, tuple(bindings), packed, self.grid(groups, node), False,
                                        self.describe(node), node.op,
                                        tuple(extent(Place(b.region, b.index, b.offset), b.size) for b in reads), tuple(extent(Place(b.region, b.index, b.offset), b.size) for b in writes)))

    def grid(self, groups: int, node: Node) -> tuple[int, int, int]:
        limit = self.caps.max_group_count
        x = max(1, min(groups, limit))
        y = -(-groups // x)
        if y > limit:
            raise EmberError(f"vulkan: {self.describe(node)} needs {groups} work groups, more than "
                             f"{limit} x {limit}")
        return (x, y, 1)

    def aux_table(self, data: np.ndarray) -> int:
        key = data.tobytes()
        if key not in self.aux_index:
            self.aux_index[key] = len(self.aux)
            self.aux.append(data)
        return self.aux_index[key]

    # ---- the program -------------------------------------------------------------------------
    def render(self) -> VulkanProgram:
        self.lower_graph()
        return VulkanProgram(self.graph, self.caps, tuple(self.kernels), tuple(self.schedule()), self.plan,
                             tuple(self.constants), tuple(self.aux), tuple(self.output_sources),
                             dict(self.in_place), dict(self.status_messages))

    def schedule(self) -> list[Dispatch]:
        """The dispatches, each with a barrier before it where hazard_barriers asks for one."""
        flags = hazard_barriers((d.reads, d.writes, False) for d in self.dispatches)
        return [dataclasses.replace(d, barrier=barrier) for d, barrier in zip(self.dispatches, flags)]

    # ---- copies ------------------------------------------------------------------------------
    def copy(self, node: Node, src: Node, dst: Place, dst_type: TensorType):
        """A copy dispatch (for node): src's data into a tensor of dst_type at dst. Floats of
        different types are converted; anything else moves as raw items of 4, 2 or 1 bytes
        (quantized rows as the widest items their offsets and strides allow)."""
        s, d = src.type, dst_type
        shape, s_strides, d_strides = s.shape or (1,), s.strides or (s.dtype.block_bytes,), \
            d.strides or (d.dtype.block_bytes,)
        if s.dtype.is_quantized:
            row = s.dtype.row_bytes(s.shape[-1])
            values = (row, self.places[src].offset, dst.offset, *s.strides[:-1], *d.strides[:-1])
            unit = next(u for u in (4, 2, 1) if all(v % u == 0 for v in values))
            shape = s.shape[:-1] + (row // unit,)
            s_strides, d_strides = s.strides[:-1] + (unit,), d.strides[:-1] + (unit,)
            src_kind = dst_kind = RAW_KIND[unit]
            s_unit = d_unit = unit
        elif s.dtype == d.dtype or not s.dtype.is_float:
            s_unit = d_unit = s.dtype.block_bytes
            src_kind = dst_kind = RAW_KIND[s_unit]
        else:
            src_kind, dst_kind = s.dtype.name, d.dtype.name
            s_unit, d_unit = s.dtype.block_bytes, d.dtype.block_bytes
        ne, ss = dims4(shape, s_strides, s_unit)
        _, ds = dims4(shape, d_strides, d_unit)
        sb, s_off = self.bind(self.places[src], span_bytes(s), s_unit, "copy source")
        db, d_off = self.bind(dst, span_bytes(d), d_unit, "copy destination")
        n = math.prod(ne)
        wg, per_thread = 128, 4
        push = dict(n=n, ne0=ne[0], ne1=ne[1], ne2=ne[2], s_off=s_off, s_s0=ss[0], s_s1=ss[1], s_s2=ss[2],
                    s_s3=ss[3], d_off=d_off, d_s0=ds[0], d_s1=ds[1], d_s2=ds[2], d_s3=ds[3])
        self.dispatch(node, "copy.comp.j2", dict(wg=wg, per_thread=per_thread, src=src_kind, dst=dst_kind),
                      [sb, db], push, -(-n // (wg * per_thread)), reads=[sb], writes=[db])

    # ---- elementwise -------------------------------------------------------------------------
    def eltwise(self, node: Node):
        operands = list(node.inputs)
        shape = node.shape
        params = dict(wg=128, per_thread=4, op=node.op, arity=len(operands), expr=ELTWISE_GLSL[node.op])
        bindings, push = [], {}
        ne, _ = dims4(shape, (), 4)
        push.update(n=node.type.numel, ne0=ne[0], ne1=ne[1], ne2=ne[2])
        for name, o in zip("ab", operands):
            strides = o.type.strides if name == "a" else broadcast_strides(o.type, shape)
            _, st = dims4(shape, strides, 4)
            b, off = self.operand(o)
            bindings.append(b)
            push.update({f"{name}_off": off, f"{name}_s0": st[0], f"{name}_s1": st[1],
                         f"{name}_s2": st[2], f"{name}_s3": st[3]})
        y, y_off = self.operand(node, what="result")
        push["y_off"] = y_off
        if node.op == "scale":
            push.update(p0=float(node.attr("scale")), p1=float(node.attr("bias")))
        elif node.op == "clamp":
            push.update(p0=float(node.attr("min")), p1=float(node.attr("max")))
        self.dispatch(node, "eltwise.comp.j2", params, bindings + [y], push,
                      -(-node.type.numel // (128 * 4)), reads=bindings, writes=[y])

    # ---- rows --------------------------------------------------------------------------------
    def _row_push(self, prefix: str, t: TensorType, strides=None):
        ne, st = dims4(t.shape, strides or t.strides, item_unit(t.dtype))
        return ne, {f"{prefix}_s0": st[0], f"{prefix}_s1": st[1], f"{prefix}_s2": st[2], f"{prefix}_s3": st[3]}

    @staticmethod
    def _row_wg(n: int) -> int:
        return 32 if n <= 64 else 64 if n <= 2048 else 256

    def rows(self, node: Node):
        x = node.inputs[0]
        ne, xs = self._row_push("x", x.type)
        xb, x_off = self.operand(x)
        rows = ne[1] * ne[2] * ne[3]
        push = dict(n=ne[0], rows=rows, ne1=ne[1], ne2=ne[2], x_off=x_off, **xs)
        bindings = [xb]
        template = "rms_norm.comp.j2" if node.op.startswith("rms_norm") else f"{node.op}.comp.j2"
        params = dict(wg=self._row_wg(ne[0]))
        if node.op.startswith("rms_norm"):
            weighted = node.op == "rms_norm_mul"
            params["weighted"] = weighted
            if weighted:
                w = node.inputs[1]
                wb, w_off = self.operand(w)
                bindings.append(wb)
                push.update(w_off=w_off, w_s0=w.type.strides[0] // 4)
        y, y_off = self.operand(node, what="result")
        push["y_off"] = y_off
        if node.op in ("rms_norm", "rms_norm_mul", "layer_norm", "l2_norm"):
            push["eps"] = float(node.attr("eps"))
        self.dispatch(node, template, params, bindings + [y], push, rows, reads=bindings, writes=[y])

    def softmax(self, node: Node):
        x = node.inputs[0]
        mask = node.inputs[1] if len(node.inputs) > 1 else None
        ne, xs = self._row_push("x", x.type)
        xb, x_off = self.operand(x)
        rows = ne[1] * ne[2] * ne[3]
        push = dict(n=ne[0], rows=rows, ne1=ne[1], ne2=ne[2], x_off=x_off, **xs)
        bindings = [xb]
        if mask is not None:
            _, ms = self._row_push("m", TensorType(mask.dtype, x.shape, broadcast_strides(mask.type, x.shape)))
            mb, m_off = self.operand(mask)
            bindings.append(mb)
            push.update(m_off=m_off, **ms)
        y, y_off = self.operand(node, what="result")
        softcap = node.attr("softcap")
        push.update(y_off=y_off, scale=float(node.attr("scale")), softcap=float(softcap))
        params = dict(wg=self._row_wg(ne[0]), has_mask=mask is not None,
                      mask_dtype=mask.dtype.name if mask is not None else "f32", softcap=bool(softcap))
        self.dispatch(node, "softmax.comp.j2", params, bindings + [y], push, rows, reads=bindings, writes=[y])

    # ---- rope, attention ---------------------------------------------------------------------
    def rope(self, node: Node):
        x, pos = node.inputs[:2]
        ff = node.inputs[2] if len(node.inputs) > 2 else None
        T, H, D = x.shape
        n_dims = node.attr("n_dims") or D
        xb, x_off = self.operand(x)
        pb, p_off = self.operand(pos)
        table = self.aux_table(rope_table(node))
        tb, t_off = self.bind(Place("aux", table), self.aux[table].nbytes, 4, "rope table")
        bindings = [xb, pb, tb]
        push = dict(T=T, H=H, D=D, half_dims=n_dims // 2, x_off=x_off, x_s0=x.type.strides[0] // 4,
                    x_s1=x.type.strides[1] // 4, x_s2=x.type.strides[2] // 4, pos_off=p_off,
                    pos_s0=pos.type.strides[0] // 4, tab_off=t_off)
        if ff is not None:
            fb, f_off = self.operand(ff)
            bindings.append(fb)
            push.update(ff_off=f_off, ff_s0=ff.type.strides[0] // 4)
        y, y_off = self.operand(node, what="result")
        push["y_off"] = y_off
        per_row = n_dims // 2 + D - n_dims
        wg = 64
        self.dispatch(node, "rope.comp.j2", dict(wg=wg, mode=node.attr("mode"), has_ff=ff is not None),
                      bindings + [y], push, -(-T * H * per_row // wg), reads=bindings, writes=[y])

    def attention(self, node: Node):
        (q, k, v), mask = optional_operands(node, 3)
        (Tq, Hq, D), (Tk, Hkv, Dv) = q.shape, v.shape
        bindings, push = [], dict(Tq=Tq, Tk=Tk, Hq=Hq, group=Hq // Hkv)
        kv_texel = self.caps.texel_buffers and all(self._word_rows(o) for o in (k, v))
        for name, o in (("q", q), ("k", k), ("v", v)):
            b, off = self.operand(o, kind="texel" if kv_texel and name != "q" else "storage")
            bindings.append(b)
            unit = item_unit(o.dtype)
            push.update({f"{name}_off": off, f"{name}_s0": o.type.strides[0] // unit,
                         f"{name}_s1": o.type.strides[1] // unit, f"{name}_s2": o.type.strides[2] // unit})
        if mask is not None:
            b, off = self.operand(mask)
            bindings.append(b)
            unit = item_unit(mask.dtype)
            push.update(m_off=off, m_s0=mask.type.strides[0] // unit, m_s1=mask.type.strides[1] // unit)
        y, y_off = self.operand(node, what="result")
        softcap = node.attr("softcap")
        push.update(y_off=y_off, scale=float(node.attr("scale")), softcap=float(softcap),
                    window=node.attr("window"))
        params = dict(wg=64, D=D, Dv=Dv, k_dtype=k.dtype.name, v_dtype=v.dtype.name, has_mask=mask is not None,
                      mask_dtype=mask.dtype.name if mask is not None else "f32", softcap=bool(softcap),
                      causal=node.attr("causal"), window=node.attr("window") > 0, kv_texel=kv_texel,
                      kv_quantized=KV_QUANTIZED, q_dot_rounded=Q_DOT_ROUNDED, float64=self.caps.float64)
        self.dispatch(node, "attention.comp.j2", params, bindings + [y], push, Tq * Hq,
                      reads=bindings, writes=[y])

    def _word_rows(self, node: Node) -> bool:
        """Whether node's rows (last axis) can be read as whole 32-bit words from a texel buffer
        bound at an aligned offset: contiguous rows, starting on words, an even count of f16."""
        t = node.type
        if t.dtype.name not in ("f32", "f16") or t.strides[-1] != t.dtype.block_bytes:
            return False
        if t.dtype.name == "f16" and t.shape[-1] % 2:
            return False
        align = max(self.caps.offset_alignment, self.caps.texel_alignment)
        return self.places[node].offset % align % 4 == 0 and all(st % 4 == 0 for st in t.strides[:-1])

    # ---- state-space ops ---------------------------------------------------------------------
    def strided_operands(self, push: dict, **operands: Node) -> list[Binding]:
        """The bindings of f32 operands, in the order given; each adds <name>_off and its strides
        in floats (<name>_s0, ...) to push."""
        bindings = []
        for name, o in operands.items():
            binding, off = self.operand(o)
            bindings.append(binding)
            push[f"{name}_off"] = off
            push.update({f"{name}_s{i}": st // 4 for i, st in enumerate(o.type.strides)})
        return bindings

    def ssm_conv(self, node: Node):
        sx, w = node.inputs
        T, C = node.shape
        xb, x_off = self.operand(sx)
        wb, w_off = self.operand(w)
        y, y_off = self.operand(node, what="result")
        push = dict(T=T, C=C, K=w.shape[1], x_off=x_off, x_s0=sx.type.strides[0] // 4,
                    x_s1=sx.type.strides[1] // 4, w_off=w_off, w_s0=w.type.strides[0] // 4,
                    w_s1=w.type.strides[1] // 4, y_off=y_off)
        self.dispatch(node, "ssm_conv.comp.j2", dict(wg=64), [xb, wb, y], push, -(-T * C // 64),
                      reads=[xb, wb], writes=[y])

    def ssm_scan(self, node: Node):
        state, x, dt, a, b, c = node.inputs
        H, P, N = state.shape
        push = dict(H=H, P=P, T=x.shape[0], heads_per_group=H // b.shape[1],
                    all_states=int(node.attr("all_states")))
        bindings = self.strided_operands(push, s=state, x=x, dt=dt, a=a, b=b, c=c)
        y, y_off = self.operand(node, what="result")
        push["y_off"] = y_off
        self.dispatch(node, "ssm_scan.comp.j2", dict(wg=64, N=N, a_per_state=a.type.rank == 2), bindings + [y],
                      push, -(-H * P // 64), reads=bindings, writes=[y])

    def gated_delta_net(self, node: Node):
        q, k, v, g, beta, state = node.inputs
        d = gdn_dims(q, v, g, state)
        push = dict(N=d.N, T=d.T, H_k=d.H_k, H_v=d.H_v, S_v=d.S_v, all_states=int(node.attr("all_states")))
        bindings = []
        for name, o in dict(q=q, k=k, v=v, g=g, beta=beta, s=state).items():
            binding, off = self.operand(o)
            bindings.append(binding)
            push[f"{name}_off"] = off
            push.update({f"{name}_s{i}": st // 4 for i, st in enumerate(self.gdn_strides(node, o, d))})
        y, y_off = self.operand(node, what="result")
        push.update(y_off=y_off, scale=float(node.attr("scale")))
        self.dispatch(node, "gated_delta_net.comp.j2", dict(wg=64, S_k=d.S_k, kda=d.kda), bindings + [y],
                      push, -(-d.N * d.H_v * d.S_v // 64), reads=bindings, writes=[y])

    def gdn_strides(self, node: Node, o: Node, d: GdnDims) -> tuple[int, ...]:
        """o's byte strides within a sequence, the first (tokens; heads for the state) standing
        for the merged (sequence, first) axis: the push block has no room for sequence strides
        (128 bytes), so a sequence must start where the previous one's first axis would go on."""
        if not d.seq_axis:
            return o.type.strides
        seq, first, *rest = o.type.strides
        if d.N == 1:                # one sequence: its stride is never used
            return (first, *rest)
        n_first = o.shape[1]
        if n_first == 1:            # a size-1 axis: its stride is never used, the sequence's is
            first = seq
        elif seq != n_first * first:
            raise self.error(node, f"gated_delta_net: an operand {list(o.shape)} with strides "
                                   f"{list(o.type.strides)} does not lay its sequences out one after "
                                   f"another (a sequence stride of {n_first} x {first} bytes); copy it "
                                   f"contiguous first")
        return (first, *rest)

    # ---- matmul and rows of tables -----------------------------------------------------------
    def mul_mat(self, node: Node):
        """One dispatch per piece: ranges of w's rows (a weight too big for one binding) times
        ranges of tokens (an x or y too big), each with the batch loop in its work groups."""
        x, w = node.inputs
        xt, wt = matmul_operands(node)
        K, N = wt.shape[-1], wt.shape[-2]
        if xt.rank > 4:
            raise EmberError(f"vulkan: {self.describe(node)}: more than 2 batch dims")
        quantized = wt.dtype.is_quantized
        if quantized and (self.places[w].offset % 2 or wt.strides[-2] % 2):
            raise EmberError(f"vulkan: {self.describe(node)}: quantized rows at odd byte offsets")
        template, params, w_kind, rows, tt = self._mul_mat_kernel(xt.dtype.name, xt.shape[-2], wt)
        wu = 1 if template == "mul_mat_chunked.comp.j2" else item_unit(wt.dtype)   # chunked: w in bytes
        push = self._mul_mat_batches(xt, wt, wu)
        row_bytes = wt.dtype.row_bytes(K) if quantized else (K - 1) * wt.strides[-1] + wt.dtype.block_bytes
        n_pieces, t_pieces = self._mul_mat_pieces(xt, wt, row_bytes, w_kind)
        xu, x_tok, y_row = item_unit(xt.dtype), xt.strides[-2], N * 4
        push.update(K=K, x_t=x_tok // xu, x_k=xt.strides[-1] // xu, w_row=wt.strides[-2] // wu,
                    w_step=0 if quantized else wt.strides[-1] // wu, y_n=N)
        x_place, w_place, y_place = self.places[x], self.places[w], self.places[node]
        for t0, t1 in t_pieces:
            nt = t1 - t0
            if len(t_pieces) == 1:
                xb, x_off = self.operand(x, what="x")
                yb, y_off = self.operand(node, what="result")
            else:
                xb, x_off = self.bind(x_place.shifted(t0 * x_tok), (nt - 1) * x_tok + (K - 1) * xt.strides[-1]
                                      + xt.dtype.block_bytes, xu, "x")
                yb, y_off = self.bind(y_place.shifted(t0 * y_row), nt * y_row, 4, "result")
            for n0, n1 in n_pieces:
                if len(n_pieces) == 1:
                    wb, w_off = self.operand(w, unit=wu, what="w", kind=w_kind)
                else:
                    span = (n1 - n0 - 1) * wt.strides[-2] + row_bytes
                    wb, w_off = self.bind(w_place.shifted(n0 * wt.strides[-2]), span, wu, "w rows", w_kind)
                groups_n, groups_t = -(-(n1 - n0) // rows), -(-nt // tt)
                piece = dict(push, N=n1 - n0, T=nt, x_off=x_off, w_off=w_off, y_off=y_off, n0=n0,
                             groups_n=groups_n, groups_t=groups_t)
                self.dispatch(node, template, params, [xb, wb, yb], _mul_mat_push(piece, template, ids=False),
                              groups_n * groups_t * push["ne2"] * push["ne3"], reads=[xb, wb], writes=[yb])

    def _mul_mat_kernel(self, xtype: str, T: int, wt: TensorType, ids: bool = False):
        """(template, params, w binding kind, rows per group, tokens per group) for T tokens of
        x of dtype xtype, with ids for mul_mat_id. Whole 32-value chunks in contiguous rows: the
        chunked kernel (x in registers, 32-bit weight loads, through a texel buffer where the
        device has them and w fits one); anything else (K % 32, strided float rows): the generic
        one. The parameters depend on T only through tt, which changes no row's arithmetic."""
        K = wt.shape[-1]
        quantized = wt.dtype.is_quantized
        chunked = K % 32 == 0 and (quantized or wt.strides[-1] == wt.dtype.block_bytes)
        sub = self.caps.subgroup_size
        tt = 1 if T == 1 else 2 if T == 2 else 4 if T <= 4 else 8
        if chunked:
            # mul_mat binds a too-big weight in pieces of rows; mul_mat_id binds all experts
            texel = self.caps.texel_buffers and (not ids or span_bytes(wt) <= self.caps.max_texel_bytes)
            w_kind = "texel" if texel else "storage"
            n_chunks = K // 32
            step = max(8, sub)
            wg = min(64, max(step, -(-n_chunks // step) * step))
            rows = 16 if sub else max(1, min(16, 4096 // (wg * tt)))
            params = dict(wg=wg, wtype=wt.dtype.name, xtype=xtype, tt=tt, rows=rows,
                          cpl=-(-n_chunks // wg), subgroup=sub if wg % max(sub, 1) == 0 else 0,
                          w_texel=w_kind == "texel", ids=ids)
            return "mul_mat_chunked.comp.j2", params, w_kind, rows, tt
        rows = 2 if quantized else 4
        wg = 64
        lanes = wg // rows
        params = dict(wg=wg, wtype=wt.dtype.name, xtype=xtype, rows=rows, lanes=lanes, tt=tt,
                      subgroup=sub if sub and lanes % sub == 0 else 0, ids=ids)
        return "mul_mat.comp.j2", params, "storage", rows, tt

    @staticmethod
    def _mul_mat_batches(xt: TensorType, wt: TensorType, wu: int) -> dict:
        """The push constants of the batch loop: sizes ne2, ne3 of x's batch dims, x's and w's
        strides along them (w's in units of wu) and how many x batches share a w matrix."""
        batch = xt.shape[:-2]
        xu = item_unit(xt.dtype)
        bsz = list(reversed(batch)) + [1] * (2 - len(batch))               # ne2, ne3
        xbs = [s // xu for s in reversed(xt.strides[:-2])] + [0] * (2 - len(batch))
        wbatch = wt.shape[:-2]
        if wbatch and any(s > 1 for s in wbatch):
            wsz = list(reversed(wbatch)) + [1] * (2 - len(wbatch))
            wbs = [s // wu for s in reversed(wt.strides[:-2])] + [0] * (2 - len(wbatch))
            ratios = [b // s for b, s in zip(bsz, wsz)]
        else:
            wbs, ratios = [0, 0], [1, 1]
        return dict(ne2=bsz[0], ne3=bsz[1], r2=ratios[0], r3=ratios[1], x_b2=xbs[0], x_b3=xbs[1],
                    w_b2=wbs[0], w_b3=wbs[1])

    def _mul_mat_pieces(self, xt: TensorType, wt: TensorType, row_bytes: int, w_kind: str):
        """([(n0, n1)] ranges of w's rows, [(t0, t1)] ranges of tokens), so that each binding
        stays within the device's limit."""
        K, N = wt.shape[-1], wt.shape[-2]
        T = xt.shape[-2]
        limit = self.caps.max_texel_bytes if w_kind == "texel" else self.caps.max_storage_range
        n_pieces = [(0, N)]
        if span_bytes(wt) > limit:
            per = max(1, (limit - row_bytes) // wt.strides[-2] + 1)
            per = per - per % 64 if per > 64 else per
            n_pieces = [(n0, min(N, n0 + per)) for n0 in range(0, N, per)]
        t_pieces = [(0, T)]
        y_row, x_tok = N * 4, xt.strides[-2]
        xy_limit = self.caps.max_storage_range
        if max(span_bytes(xt), T * y_row) > xy_limit and math.prod(xt.shape[:-2]) == 1:
            per = max(1, min(xy_limit // y_row, (xy_limit - K * xt.dtype.block_bytes) // max(x_tok, 1) + 1))
            t_pieces = [(t0, min(T, t0 + per)) for t0 in range(0, T, per)]
        return n_pieces, t_pieces

    def mul_mat_id(self, node: Node):
        """The mul_mat kernels with ids: one batch per (token, slot) pair (ne3 tokens x ne2
        slots), one token each, reading the pair's expert (_ids.glsl.j2); so only the selected
        experts are read and a pair's row is computed as a one-token mul_mat is, whatever the
        batch. All experts are bound at once (supports_node refuses a w over one binding)."""
        x, w, ids = node.inputs
        xt, wt, it = x.type, w.type, ids.type
        T, n_used = it.shape
        E, N, K = wt.shape
        quantized = wt.dtype.is_quantized
        if quantized and (self.places[w].offset % 2 or wt.strides[0] % 2 or wt.strides[1] % 2):
            raise EmberError(f"vulkan: {self.describe(node)}: quantized rows at odd byte offsets")
        template, params, w_kind, rows, _ = self._mul_mat_kernel(xt.dtype.name, 1, wt, ids=True)
        wu = 1 if template == "mul_mat_chunked.comp.j2" else item_unit(wt.dtype)
        xu = item_unit(xt.dtype)
        x_sel = xt.strides[1] if xt.rank == 3 and xt.shape[1] > 1 else 0
        xb, x_off = self.operand(x, what="x")
        wb, w_off = self.operand(w, unit=wu, what="w", kind=w_kind)
        yb, y_off = self.operand(node, what="result")
        ib, i_off = self.operand(ids, what="ids")
        sb, _ = self.bind(Place("status"), 4, 4, "status")
        groups_n = -(-N // rows)
        push = dict(K=K, N=N, T=1, ne2=n_used, ne3=T, r2=1, r3=1, x_off=x_off, x_t=0, x_k=xt.strides[-1] // xu,
                    x_b2=x_sel // xu, x_b3=xt.strides[0] // xu, w_off=w_off, w_row=wt.strides[1] // wu,
                    w_step=0 if quantized else wt.strides[2] // wu, w_b2=wt.strides[0] // wu, w_b3=0,
                    y_off=y_off, y_n=N, n0=0, groups_n=groups_n, groups_t=1, E=E, i_off=i_off,
                    i_tok=it.strides[0] // 4, i_sel=it.strides[1] // 4, status=self.index_status(node, E))
        self.dispatch(node, template, params, [xb, wb, yb, ib, sb], _mul_mat_push(push, template, ids=True),
                      groups_n * T * n_used, reads=[xb, wb, ib], writes=[yb])   # status: atomics

    def top_k(self, node: Node):
        x = node.inputs[0]
        ne, xs = self._row_push("x", x.type)
        xb, x_off = self.operand(x)
        y, y_off = self.operand(node, what="result")
        rows = ne[1] * ne[2] * ne[3]
        push = dict(n=ne[0], rows=rows, ne1=ne[1], ne2=ne[2], x_off=x_off, **xs, y_off=y_off)
        wg = 64
        self.dispatch(node, "top_k.comp.j2", dict(wg=wg, k=node.attr("k")), [xb, y], push, -(-rows // wg),
                      reads=[xb], writes=[y])

    def take_along(self, node: Node):
        x, idx = node.inputs
        ne, i_s = self._row_push("i", idx.type)
        _, x_s = self._row_push("x", x.type)
        xb, x_off = self.operand(x)
        ib, i_off = self.operand(idx)
        y, y_off = self.operand(node, what="result")
        sb, _ = self.bind(Place("status"), 4, 4, "status")
        rows = ne[1] * ne[2] * ne[3]
        push = dict(n=ne[0], rows=rows, ne1=ne[1], ne2=ne[2], E=x.shape[-1], x_off=x_off, **x_s, i_off=i_off,
                    **i_s, y_off=y_off, status=self.index_status(node, x.shape[-1]))
        wg = 64
        self.dispatch(node, "take_along.comp.j2", dict(wg=wg), [xb, ib, y, sb], push, -(-rows * ne[0] // wg),
                      reads=[xb, ib], writes=[y])   # status: atomics

    def get_rows(self, node: Node):
        table, idx = node.inputs
        R, D = table.shape
        tt = table.type
        quantized = tt.dtype.is_quantized
        wu = item_unit(tt.dtype)
        row_bytes = tt.dtype.row_bytes(D) if quantized else (D - 1) * tt.strides[1] + tt.dtype.block_bytes
        limit = self.caps.max_storage_range
        pieces = [(0, R)]
        if span_bytes(tt) > limit:
            per = max(1, (limit - row_bytes) // tt.strides[0] + 1)
            pieces = [(r0, min(R, r0 + per)) for r0 in range(0, R, per)]
        ib, i_off = self.operand(idx)
        yb, y_off = self.operand(node, what="result")
        sb, _ = self.bind(Place("status"), 4, 4, "status")
        code = self.index_status(node, R)
        T = idx.shape[0]
        per_row = D // 32 if quantized else D
        wg = 64
        for r0, r1 in pieces:
            if len(pieces) == 1:
                wb, w_off = self.operand(table, what="table")
            else:
                wb, w_off = self.bind(self.places[table].shifted(r0 * tt.strides[0]),
                                      (r1 - r0 - 1) * tt.strides[0] + row_bytes, wu, "table rows")
            push = dict(T=T, D=D, rows=R, row_lo=r0, row_hi=r1, i_off=i_off, i_s0=idx.type.strides[0] // 4,
                        w_off=w_off, w_row=tt.strides[0] // wu, w_step=0 if quantized else tt.strides[1] // wu,
                        y_off=y_off, status=code)
            self.dispatch(node, "get_rows.comp.j2", dict(wg=wg, wtype=tt.dtype.name), [wb, ib, yb, sb], push,
                          -(-T * per_row // wg), reads=[wb, ib], writes=[yb])   # status: atomics

    def set_rows(self, node: Node):
        dst, idx, src = node.inputs
        R, D = dst.shape
        place = self.places[node]
        if place != self.places[dst]:
            self.copy(node, dst, place, node.type)
        ib, i_off = self.operand(idx)
        sb, s_off = self.operand(src)
        yb, y_off = self.operand(node, what="result")
        stb, _ = self.bind(Place("status"), 4, 4, "status")
        code = self.index_status(node, R)
        push = dict(T=idx.shape[0], D=D, rows=R, i_off=i_off, i_s0=idx.type.strides[0] // 4, s_off=s_off,
                    s_s0=src.type.strides[0] // 4, s_s1=src.type.strides[1] // 4, y_off=y_off, status=code)
        params = set_rows_params(dst.dtype, self.caps)
        items = D
        if dst.dtype.is_quantized:     # a quantized cache: an invocation per block (turbo: a group
            push.update(y_row=dst.dtype.row_bytes(D))      # per token and block)
            items = D // dst.dtype.block_size
            if is_turbo(dst.dtype.name):
                items *= params["wg"] * idx.shape[0]
        self.dispatch(node, "set_rows.comp.j2", params, [ib, sb, yb, stb], push,
                      -(-items // params["wg"]), reads=[ib, sb, yb], writes=[yb])   # status: atomics


def set_rows_params(dt, caps: DeviceCaps) -> dict:
    """The template parameters of a set_rows into dt: a quantized cache quantizes one block per
    invocation (q8_0, q4_0) or per work group of 128 (turbo3, turbo4)."""
    if not dt.is_quantized:
        return dict(wg=64, dtype=dt.name, block=0)
    return dict(wg=128 if is_turbo(dt.name) else 64, dtype=dt.name, block=dt.block_size,
                block_bytes=dt.block_bytes, float64=caps.float64)


MUL_MAT_PUSH = ("K", "N", "T", "ne2", "ne3", "r2", "r3", "x_off", "x_t", "x_k", "x_b2", "x_b3", "w_off",
                "w_row", "w_step", "w_b2", "w_b3", "y_off", "y_n", "n0", "groups_n", "groups_t")
MUL_MAT_ID_PUSH = ("E", "i_off", "i_tok", "i_sel", "status")     # with ids (_ids.glsl.j2)


def mul_mat_push_names(template: str, ids: bool) -> list[str]:
    """The push constants of a mul_mat kernel in the order its shader declares them (the chunked
    kernel walks contiguous rows: no w_step; with ids, the expert ids' fields last)."""
    names = [n for n in MUL_MAT_PUSH if not (n == "w_step" and template == "mul_mat_chunked.comp.j2")]
    return names + list(MUL_MAT_ID_PUSH if ids else ())


def _mul_mat_push(values: dict, template: str, ids: bool) -> dict:
    return {name: values[name] for name in mul_mat_push_names(template, ids)}


def render_graph(graph: Graph, caps: DeviceCaps = DeviceCaps()) -> VulkanProgram:
    """The shaders and dispatches of graph (dead nodes dropped) for a device with caps. Raises
    EmberError naming the first node the renderer cannot handle."""
    for node in graph.nodes:
        ok, reason = supports_node(node, caps)
        if not ok:
            raise EmberError(f"vulkan: %{value_names(graph)[node]} ({node.op} : {node.type}): {reason}")
    return VulkanRenderer(graph, caps).render()


def all_variants(caps: DeviceCaps) -> list[Shader]:
    """One shader per template and main parameter value (every op, weight type and dtype), for
    the given device features: what tests compile and validate. Sizes that only unroll loops
    further (head dims, tokens per group) are kept small so that compiling them stays quick."""
    feats = dict(storage8=caps.storage8, storage16=caps.storage16, subgroup=caps.subgroup_size)
    u = "uint"
    out = []

    def add(template, params, push, bindings):
        p = dict(feats)
        p.update(params)
        out.append(render_shader(template, p, [(n, "float" if n in FLOAT_PUSH else u) for n in push], bindings))

    for op, expr in ELTWISE_GLSL.items():
        arity = 2 if op in BINARY or op in GATED else 1
        push = ["n", "ne0", "ne1", "ne2"] + [f"{p}_{s}" for p in "ab"[:arity] for s in
                                             ("off", "s0", "s1", "s2", "s3")] + ["y_off"]
        push += ["p0", "p1"] if op in ("scale", "clamp") else []
        add("eltwise.comp.j2", dict(wg=128, per_thread=4, op=op, arity=arity, expr=expr), push, arity + 1)
    copy_push = ["n", "ne0", "ne1", "ne2", "s_off", "s_s0", "s_s1", "s_s2", "s_s3", "d_off", "d_s0",
                 "d_s1", "d_s2", "d_s3"]
    for src in FLOAT_KINDS:
        for dst in FLOAT_KINDS:
            if src != dst:
                add("copy.comp.j2", dict(wg=128, per_thread=4, src=src, dst=dst), copy_push, 2)
    for kind in ("u32", "u16", "u8"):
        add("copy.comp.j2", dict(wg=128, per_thread=4, src=kind, dst=kind), copy_push, 2)
    row_push = ["n", "rows", "ne1", "ne2", "x_off", "x_s0", "x_s1", "x_s2", "x_s3"]
    for weighted in (False, True):
        add("rms_norm.comp.j2", dict(wg=64, weighted=weighted),
            row_push + (["w_off", "w_s0"] if weighted else []) + ["y_off", "eps"], 3 if weighted else 2)
    add("layer_norm.comp.j2", dict(wg=64), row_push + ["y_off", "eps"], 2)
    add("l2_norm.comp.j2", dict(wg=64), row_push + ["y_off", "eps"], 2)
    add("sum_rows.comp.j2", dict(wg=64), row_push + ["y_off"], 2)
    add("argmax.comp.j2", dict(wg=256), row_push + ["y_off"], 2)
    for mask in (None, "f32", "f16"):
        for softcap in (False, True):
            push = row_push + (["m_off", "m_s0", "m_s1", "m_s2", "m_s3"] if mask else []) + \
                ["y_off", "scale", "softcap"]
            add("softmax.comp.j2", dict(wg=64, has_mask=mask is not None, mask_dtype=mask or "f32",
                                        softcap=softcap), push, 3 if mask else 2)
    for mode in ("normal", "neox"):
        for ff in (False, True):
            push = ["T", "H", "D", "half_dims", "x_off", "x_s0", "x_s1", "x_s2", "pos_off", "pos_s0", "tab_off"]
            push += ["ff_off", "ff_s0"] if ff else []
            add("rope.comp.j2", dict(wg=64, mode=mode, has_ff=ff), push + ["y_off"], 5 if ff else 4)
    for kv, mask in (("f32", None), ("f16", "f16")):
        push = ["Tq", "Tk", "Hq", "group"] + [f"{p}_{s}" for p in "qkv" for s in ("off", "s0", "s1", "s2")]
        push += ["m_off", "m_s0", "m_s1"] if mask else []
        push += ["y_off", "scale", "softcap", "window"]
        for texel in (False, True) if caps.texel_buffers else (False,):
            kv_kind = "texel" if texel else "storage"
            add("attention.comp.j2", dict(wg=64, D=64, Dv=32, k_dtype=kv, v_dtype=kv, has_mask=mask is not None,
                                          mask_dtype=mask or "f32", softcap=True, causal=True, window=True,
                                          kv_texel=texel, kv_quantized=KV_QUANTIZED,
                                          q_dot_rounded=Q_DOT_ROUNDED, float64=caps.float64), push,
                ["storage", kv_kind, kv_kind] + ["storage"] * (2 if mask else 1))
    for k_dt, v_dt in (("q8_0", "turbo4"), ("turbo3", "q4_0")):   # quantized caches: every kind, turbo K and V
        push = ["Tq", "Tk", "Hq", "group"] + [f"{p}_{s}" for p in "qkv" for s in ("off", "s0", "s1", "s2")]
        add("attention.comp.j2", dict(wg=64, D=128, Dv=128, k_dtype=k_dt, v_dtype=v_dt, has_mask=False,
                                      mask_dtype="f32", softcap=False, causal=True, window=False, kv_texel=False,
                                      kv_quantized=KV_QUANTIZED, q_dot_rounded=Q_DOT_ROUNDED,
                                      float64=caps.float64), push + ["y_off", "scale", "softcap", "window"], 4)
    gr_push = ["T", "D", "rows", "row_lo", "row_hi", "i_off", "i_s0", "w_off", "w_row", "w_step", "y_off", "status"]
    for k, wtype in enumerate(MATMUL_WTYPES):
        rows = 4 if wtype in FLOAT_KINDS else 2
        sub = caps.subgroup_size if caps.subgroup_size and (64 // rows) % caps.subgroup_size == 0 else 0
        xtype = ("f32", "f16")[k % 2]
        for ids in (False, True):     # mul_mat, and mul_mat_id (two more bindings: ids, status)
            tt = 1 if ids else 4
            add("mul_mat.comp.j2", dict(wg=64, wtype=wtype, xtype=xtype, rows=rows, lanes=64 // rows, tt=tt,
                                        subgroup=sub, ids=ids), mul_mat_push_names("mul_mat.comp.j2", ids),
                5 if ids else 3)
            texel = caps.texel_buffers and k % 2 == 0
            add("mul_mat_chunked.comp.j2", dict(wg=64, wtype=wtype, xtype=xtype, tt=1 if ids else 2,
                                                rows=16 if sub else 4, cpl=2, subgroup=caps.subgroup_size,
                                                w_texel=texel, ids=ids),
                mul_mat_push_names("mul_mat_chunked.comp.j2", ids),
                ["storage", "texel" if texel else "storage", "storage"] + ["storage"] * (2 if ids else 0))
        add("get_rows.comp.j2", dict(wg=64, wtype=wtype), gr_push, 4)
    add("ssm_conv.comp.j2", dict(wg=64), ["T", "C", "K", "x_off", "x_s0", "x_s1", "w_off", "w_s0", "w_s1",
                                          "y_off"], 3)
    for a_per_state in (False, True):       # A per head (Mamba-2), per head and state entry (Mamba-1)
        scan_push = ["H", "P", "T", "heads_per_group", "all_states"]
        for name, rank in (("s", 3), ("x", 3), ("dt", 2), ("a", 2 if a_per_state else 1), ("b", 3), ("c", 3)):
            scan_push += [f"{name}_off"] + [f"{name}_s{i}" for i in range(rank)]
        add("ssm_scan.comp.j2", dict(wg=64, N=16, a_per_state=a_per_state), scan_push + ["y_off"], 7)
    for kda in (False, True):
        gdn_push = ["N", "T", "H_k", "H_v", "S_v", "all_states"]
        for name, rank in (("q", 3), ("k", 3), ("v", 3), ("g", 3 if kda else 2), ("beta", 2), ("s", 3)):
            gdn_push += [f"{name}_off"] + [f"{name}_s{i}" for i in range(rank)]
        add("gated_delta_net.comp.j2", dict(wg=64, S_k=16, kda=kda), gdn_push + ["y_off", "scale"], 7)
    add("top_k.comp.j2", dict(wg=64, k=8), row_push + ["y_off"], 2)
    add("take_along.comp.j2", dict(wg=64), ["n", "rows", "ne1", "ne2", "E", "x_off", "x_s0", "x_s1", "x_s2", "x_s3",
                                            "i_off", "i_s0", "i_s1", "i_s2", "i_s3", "y_off", "status"], 4)
    sr_push = ["T", "D", "rows", "i_off", "i_s0", "s_off", "s_s0", "s_s1", "y_off", "status"]
    for dt in FLOAT_KINDS + KV_QUANTIZED:
        quantized = dt in KV_QUANTIZED
        add("set_rows.comp.j2", set_rows_params(dtypes.dtype(dt), caps), sr_push + (["y_row"] if quantized else []), 4)
    return out


FLOAT_PUSH = ("p0", "p1", "eps", "scale", "softcap")
