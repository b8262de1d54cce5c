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
`render_graph` runs the layout pass of an Adreno profile first (with the profile's size
thresholds; a no-op on a graph already laid out), so a graph that did not go through the
opencl-adreno pipeline still gets the SoA kernels.

Imports jinja2, NumPy and ember only: no OpenCL library.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from ember.codegen.cpu import broadcast_strides, c_float, coalesce, offset_expr, row_loop, span_bytes
from ember.codegen.values import describe_node, place_values
from ember.errors import EmberError
from ember.ir import dtypes
from ember.ir.graph import Graph
from ember.ir.layouts import get_layout
from ember.ir.node import Node
from ember.ir.ops import OPS
from ember.ir.ops.elementwise import BINARY, GATED, UNARY
from ember.ir.printer import value_names
from ember.ir.types import TensorType
from ember.passes.layout import LayoutAdreno, adreno_kernel_reads
from ember.codegen.memory_plan import MemoryPlan, is_view, plan_memory

TEMPLATE_DIR = Path(__file__).parent / "templates" / "opencl"
ARENA_ALIGNMENT = 256
MAX_BYTES = 2 ** 31 - 1          # kernels index bytes with 32-bit ints

# Elementwise ops as OpenCL C expressions of the float operands a (and b).
ELTWISE_CL = {
    "add": "a + b",
    "sub": "a - b",
    "mul": "a * b",
    "div": "a / b",
    "neg": "-a",
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
assert set(ELTWISE_CL) == set(BINARY) | set(UNARY) | set(GATED), "an elementwise op has no OpenCL form"


# ---- profiles and the Adreno device table ------------------------------------------------------
@dataclass(frozen=True)
class AdrenoGeneration:
    """Launch parameters of one Adreno generation. The wave is 64 lanes in "half" mode and 128
    in "full" mode on every generation (qcom_reqd_sub_group_size); the GEMV shape (64 lanes x 4
    subgroups) and the GEMM subgroup mode follow llama.cpp's Adreno kernels (tuned on A7xx/A8xx);
    the A6xx and X1 rows are starting points that were not measured on hardware."""
    name: str
    row_wg: int              # norms, softmax, sums: work-group size (a multiple of the wave)
    attention_wg: int
    gemv_local: tuple        # (lanes = rows per group, subgroups splitting K, 1)
    gemm_local: tuple        # work items (each 8 tokens x 4 rows) per group
    max_image_texels: int    # image1d_buffer_t limit (CL_DEVICE_IMAGE_MAX_BUFFER_SIZE)


ADRENO_GENERATIONS = {
    "a6xx": AdrenoGeneration("a6xx", row_wg=64, attention_wg=64, gemv_local=(64, 4, 1),
                             gemm_local=(64, 1, 1), max_image_texels=2 ** 27),
    "a7xx": AdrenoGeneration("a7xx", row_wg=128, attention_wg=64, gemv_local=(64, 4, 1),
                             gemm_local=(128, 1, 1), max_image_texels=2 ** 27),
    "a8xx": AdrenoGeneration("a8xx", row_wg=128, attention_wg=64, gemv_local=(64, 4, 1),
                             gemm_local=(128, 1, 1), max_image_texels=2 ** 27),
    "x1": AdrenoGeneration("x1", row_wg=128, attention_wg=64, gemv_local=(64, 4, 1),
                           gemm_local=(128, 1, 1), max_image_texels=2 ** 27),
}


def adreno_generation(device_name: str) -> str | None:
    """The Adreno generation of an OpenCL device name ("QUALCOMM Adreno(TM) 740" -> "a7xx",
    "Adreno (TM) 830" -> "a8xx", "Qualcomm(R) Adreno(TM) X1-85 GPU" -> "x1"), or None."""
    if "adreno" not in device_name.lower():
        return None
    if re.search(r"\bX1\b|X1-\d+", device_name, re.IGNORECASE):
        return "x1"
    match = re.search(r"(\d)\d\d", device_name)
    if match and f"a{match.group(1)}xx" in ADRENO_GENERATIONS:
        return f"a{match.group(1)}xx"
    return None


@dataclass(frozen=True)
class Profile:
    """What the rendered kernels may use, and their launch shapes."""
    name: str                    # generic | adreno | adreno-emulated
    adreno: bool = False         # SoA weights with GEMV/GEMM kernels
    fp16: bool = False           # half arithmetic (cl_khr_fp16)
    subgroups: bool = False      # cl_khr_subgroups (+ qcom_reqd_sub_group_size where announced)
    fp64: bool = False           # double rope angles (cl_khr_fp64)
    generation: str | None = None
    row_wg: int = 64
    attention_wg: int = 32
    gemv_local: tuple = (64, 4, 1)
    gemm_local: tuple = (64, 1, 1)
    max_image_texels: int = 2 ** 27
    # layout-adreno thresholds (render_graph runs the pass with them): SoA only for big matrices
    # (llama.cpp: ne0 >= 512 and ne1 >= 512), as small ones gain nothing
    soa_min_rows: int = 512
    soa_min_cols: int = 512
    cl_std: str = "CL1.2"

    @property
    def build_options(self) -> str:
        options = [f"-cl-std={self.cl_std}"]
        if self.adreno:
            options += [f"-DEMBER_FP16={int(self.fp16)}", f"-DEMBER_SUBGROUPS={int(self.subgroups)}",
                        "-cl-mad-enable"]
        return " ".join(options)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def generic_profile(fp64: bool = False) -> Profile:
    return Profile("generic", fp64=fp64)


def adreno_profile(generation: str = "a7xx", emulated: bool = False, **overrides) -> Profile:
    """The Adreno profile of a generation; emulated: subgroups and half arithmetic emulated, so
    the kernels run on any OpenCL 1.2 device. overrides: any Profile field (e.g. soa_min_rows)."""
    if generation not in ADRENO_GENERATIONS:
        raise EmberError(f"unknown Adreno generation {generation!r}; known: {', '.join(ADRENO_GENERATIONS)}")
    gen = ADRENO_GENERATIONS[generation]
    profile = Profile("adreno-emulated" if emulated else "adreno", adreno=True, fp16=not emulated,
                      subgroups=not emulated, fp64=False, generation=generation, row_wg=gen.row_wg,
                      attention_wg=gen.attention_wg, gemv_local=gen.gemv_local, gemm_local=gen.gemm_local,
                      max_image_texels=gen.max_image_texels, cl_std="CL1.2" if emulated else "CL2.0")
    return dataclasses.replace(profile, **overrides)


PROFILE_NAMES = ("generic", "adreno", "adreno-emulated")


# ---- the SoA weight layout ---------------------------------------------------------------------
SOA = get_layout("adreno_soa")
SOA_DTYPES = dict(SOA.per_u32)       # values per uint32 of quants


@dataclass(frozen=True)
class WeightLayout:
    """How the runtime holds a constant in the adreno_soa layout (ember.ir.layouts): a 2-D
    weight [M, K] as scales d[K/32][M] (half) and quants q[K/per_u32][M] (uint32), both
    transposed so neighbouring rows are adjacent, quants also bound as an image."""
    kind: str            # "soa"
    dtype: str           # q8_0 | q4_0
    rows: int            # M
    cols: int            # K

    @property
    def texels(self) -> int:
        return self.cols // SOA_DTYPES[self.dtype] * self.rows

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def weight_layouts(graph: Graph) -> dict[Node, WeightLayout]:
    """The constants whose type is in the adreno_soa layout, with how the runtime holds them."""
    return {n: WeightLayout("soa", n.dtype.name, *n.shape) for n in graph.nodes
            if n.op == "const" and n.type.layout == SOA.name}


def relayout_weight(data: np.ndarray, layout: WeightLayout) -> dict[str, np.ndarray]:
    """The parts of a weight in the SoA layout: {"q": uint32 [K/per_u32, M], "d": uint16
    [K/32, M] (the half bits)}. data is the constant's storage in the adreno_soa layout (flat,
    as the layout-adreno pass stores it) or its row-layout blocks (uint8 [M, row bytes], as a
    plan replayed from the original weights gives it), which are packed first."""
    dt, shape = dtypes.dtype(layout.dtype), (layout.rows, layout.cols)
    data = np.asarray(data)
    if data.ndim != 1:
        data = SOA.pack(data, dt, shape)
    return SOA.parts(data, dt, shape)


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


def lower_layouts(graph: Graph, profile: Profile) -> Graph:
    """graph with the profile's layout pass applied (Adreno: layout-adreno with the profile's
    thresholds); unchanged for the generic profile and for a graph already laid out."""
    if not profile.adreno:
        return graph
    return LayoutAdreno(min_rows=profile.soa_min_rows, min_cols=profile.soa_min_cols,
                        max_texels=profile.max_image_texels)(graph)


# ---- templates ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


@functools.lru_cache(maxsize=None)
def _static_file(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def render_template(template: str, **params) -> str:
    return _environment().get_template(template).render(**params)


def cl_float(v: float) -> str:
    """A float attribute as an OpenCL C float literal expression."""
    return c_float(v)


def cl_real(v: float, fp64: bool) -> str:
    """A finite float as an OpenCL C literal: a double with fp64, else a float (rounded to f32)."""
    return repr(float(v)) if fp64 else f"{float(np.float32(v))!r}f"


# ---- where values live, kernel arguments, launches ---------------------------------------------
@dataclass(frozen=True)
class Place:
    """Bytes of a region: an input, an output, a constant or the arena, at an offset."""
    region: str    # "in", "out", "const", "arena"
    index: int
    offset: int = 0

    def shifted(self, by: int) -> "Place":
        return Place(self.region, self.index, self.offset + by)


@dataclass(frozen=True)
class BufferArg:
    """Two kernel arguments: a buffer and a uint byte offset into it. part names a piece of a
    re-laid-out constant ("q": quants, "d": scales); "" is the plain buffer."""
    place: Place
    part: str = ""

    def to_json(self) -> dict:
        return {"kind": "buffer", "region": self.place.region, "index": self.place.index,
                "offset": self.place.offset, "part": self.part}


@dataclass(frozen=True)
class ImageArg:
    """One kernel argument: an image1d_buffer_t over a re-laid-out constant's quants."""
    index: int               # the constant
    format: str              # "r32ui" (one uint32 per texel) or "rgba32ui" (four)

    def to_json(self) -> dict:
        return {"kind": "image", "region": "const", "index": self.index, "part": "q", "format": self.format}


@dataclass(frozen=True)
class StatusArg:
    """Two kernel arguments: the status buffer (one int) and the code a failure writes."""
    code: int

    def to_json(self) -> dict:
        return {"kind": "status", "code": self.code}


@dataclass(frozen=True)
class Launch:
    kernel: str
    global_size: tuple[int, ...]
    local_size: tuple[int, ...] | None
    args: tuple
    node: str                # the node it computes, as printed

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "global": list(self.global_size),
                "local": list(self.local_size) if self.local_size else None,
                "args": [a.to_json() for a in self.args], "node": self.node}


@dataclass(frozen=True)
class KernelInfo:
    name: str
    template: str
    params: dict
    first_line: int          # lines of the program source (1-based, inclusive)
    last_line: int


@dataclass(frozen=True)
class OpenCLProgram:
    """A rendered graph: the program source and everything the runtime needs to run it."""
    source: str
    build_options: str
    profile: Profile
    graph: Graph
    plan: MemoryPlan
    constants: tuple[Node, ...]               # const buffer j holds constants[j]'s data
    layouts: dict                             # constant index -> WeightLayout (re-laid out)
    kernels: tuple[KernelInfo, ...]
    launches: tuple[Launch, ...]
    status_messages: dict[int, str]           # status code -> error message
    in_place: dict[int, int] = field(default_factory=dict)   # output -> input whose buffer it is

    def kernel_at_line(self, line: int) -> KernelInfo | None:
        for k in self.kernels:
            if k.first_line <= line <= k.last_line:
                return k
        return None

    def launch_plan(self) -> dict:
        """Everything but the source, as JSON-able data: buffers, constants (with layouts),
        kernels (template, parameters) and the launches in order."""
        g = self.graph
        return {
            "format": 1,
            "profile": self.profile.to_json(),
            "build_options": self.build_options,
            "inputs": [{"name": n.name, "dtype": n.dtype.name, "shape": list(n.shape)} for n in g.inputs],
            "outputs": [{"dtype": n.dtype.name, "shape": list(n.shape)} for n in g.outputs],
            "constants": [{"name": n.name, "dtype": n.dtype.name, "shape": list(n.shape),
                           "layout": self.layouts[j].to_json() if j in self.layouts else None}
                          for j, n in enumerate(self.constants)],
            "arena_bytes": self.plan.peak_bytes,
            "status_messages": {str(k): v for k, v in self.status_messages.items()},
            "in_place": {str(k): v for k, v in self.in_place.items()},
            "kernels": [{"name": k.name, "template": k.template, "params": _jsonable(k.params)}
                        for k in self.kernels],
            "launches": [launch.to_json() for launch in self.launches],
        }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---- support -----------------------------------------------------------------------------------
def supports_node(node: Node) -> tuple[bool, str]:
    """Whether the OpenCL renderer handles node: every op of the op table, at every dtype it
    allows, as long as each tensor spans less than 2 GiB (32-bit offsets)."""
    if node.op not in OPS:
        return False, f"{node.op}: unknown op"
    if OPS[node.op].category != "view" and not hasattr(_Renderer, f"_render_{_KIND.get(node.op, node.op)}"):
        return False, f"{node.op}: no OpenCL kernel for this op yet"
    for t in [node.type] + [i.type for i in node.inputs]:
        if span_bytes(t) > MAX_BYTES or t.numel > MAX_BYTES:
            return False, f"{node.op}: a tensor of {span_bytes(t)} bytes is over the 2 GiB kernels address"
    if node.op == "mul_mat" and node.inputs[1].shape[-1] == 0:
        return False, "mul_mat: K == 0 unsupported"
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
    x, w = node.inputs[0].type, node.inputs[1].type
    K, N = w.shape[-1], w.shape[-2]
    if x.rank == 1:
        x = TensorType(x.dtype, (1, K), (x.strides[0] * K, x.strides[0]))
    batch, T = x.shape[:-2], x.shape[-2]
    x_bs, x_row, x_step = x.strides[:-2], x.strides[-2], x.strides[-1]
    w_batch_shape, w_bs = w.shape[:-2], w.strides[:-2]
    # With no batch of w to follow, the batch dims of x fold into T when x walks them as one.
    if all(s == 1 for s in w_batch_shape):
        sizes, (strides,) = coalesce(batch + (T,), [x_bs + (x_row,)])
        if len(sizes) == 1:
            batch, T, x_row, x_bs = (), sizes[0], strides[0] if sizes[0] > 1 else x_row, ()
    x_batch = offset_expr("b", batch, x_bs)
    terms, inner = [], 1
    for i in reversed(range(len(batch))):
        if w_batch_shape and w_batch_shape[i] > 1 and w_bs[i]:
            ratio = batch[i] // w_batch_shape[i]
            index = f"(b / {inner}) % {batch[i]}"
            terms.append(f"(({index}) / {ratio}) * {w_bs[i]}" if ratio > 1 else f"({index}) * {w_bs[i]}")
        inner *= batch[i]
    w_batch = "(" + " + ".join(terms) + ")" if terms else "0"
    return _MulMat(T, N, K, math.prod(batch), x_row, x_step, w.strides[-2], w.strides[-1], x_batch, w_batch)


def _act_scratch_bytes(node: Node, layouts) -> int:
    """Arena scratch a node needs while it runs: the half, transposed activations of a GEMM on
    an SoA weight."""
    if node.op == "mul_mat" and node.inputs[1] in layouts and node.type.numel:
        mm = _mul_mat_shape(node)
        if mm.T > 1:
            return mm.K * _round_up(mm.T, 8) * 2
    return 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---- the renderer ------------------------------------------------------------------------------
_KERNEL_NAME_SLOT = "ember_kernel_name_slot"
_KIND = {name: "eltwise" for name in ELTWISE_CL}
_KIND.update(scale="eltwise", clamp="eltwise", rms_norm="rows", layer_norm="rows", rms_norm_mul="rows",
             sum_rows="rows", argmax="rows")


class _Renderer:
    def __init__(self, graph: Graph, profile: Profile):
        if graph.has_dead_nodes:
            graph = graph.replace()
        self.graph = graph
        self.profile = profile
        self.names = value_names(graph)
        self.layouts = weight_layouts(graph)     # read from the types; check_layouts vetted them
        self.plan = plan_memory(graph, alignment=ARENA_ALIGNMENT,
                                extra=lambda n: _act_scratch_bytes(n, self.layouts))
        self.places: dict[Node, Place] = {}
        self.constants: list[Node] = []
        self.kernels: list[tuple[str, str, dict, str]] = []   # name, template, params, text
        self.kernel_by_body: dict[str, str] = {}
        self.launches: list[Launch] = []
        self.status_messages: dict[int, str] = {}
        self.in_place: dict[int, int] = {}
        self.reduce = "subgroup" if profile.subgroups else "local"

    def describe(self, node: Node) -> str:
        return describe_node(self.names, node)

    # ---- places --------------------------------------------------------------------------
    def assign_places(self):
        def output_place(node: Node, k: int) -> Place:
            shared = self.in_place_input(node, k)
            return Place("in", shared) if shared is not None else Place("out", k)
        self.places, self.constants = place_values(self.graph, self.plan.offsets, Place, output_place)

    def in_place_input(self, node: Node, k: int) -> int | None:
        """The input whose buffer a set_rows output may be (a cache updated where it lies): its
        dst is a graph input read by nothing else, of the same type."""
        if node.op != "set_rows":
            return None
        dst = node.inputs[0]
        if dst.op != "input" or self.graph.users[dst] != (node,) or dst.type != node.type:
            return None
        index = self.graph.inputs.index(dst)
        if index in self.in_place.values():
            return None
        self.in_place[k] = index
        return index

    def buf(self, node: Node) -> BufferArg:
        place = self.places[node]
        if place.region == "const" and self.constants[place.index] in self.layouts:
            raise EmberError(f"opencl: {self.describe(node)} reads a weight in the "
                             f"{self.constants[place.index].type.layout} layout through a kernel "
                             f"that does not know that layout")
        return BufferArg(place)

    def status(self, node: Node, what: str) -> StatusArg:
        code = len(self.status_messages) + 1
        self.status_messages[code] = f"{self.describe(node)}: {what}"
        return StatusArg(code)

    # ---- kernels -------------------------------------------------------------------------
    def add_kernel(self, node: Node, template: str, args: list, global_size, local_size=None, **params):
        # Kernels with the same body (the same op at the same shapes, as in every layer of a
        # model) are emitted once: build time grows with distinct kernels, not with nodes.
        body = render_template(template, name=_KERNEL_NAME_SLOT, **params)
        name = self.kernel_by_body.get(body)
        if name is None:
            name = f"k{len(self.kernels)}_{node.op}"
            self.kernel_by_body[body] = name
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            comment = _cl_comment(f"{name}: first used by {self.describe(node)}\n"
                                  f" * template {template}: {shown}")
            self.kernels.append((name, template, params, comment + body.replace(_KERNEL_NAME_SLOT, name)))
        global_size = tuple(int(g) for g in global_size)
        if local_size is not None:
            local_size = tuple(int(s) for s in local_size)
            global_size = tuple(_round_up(max(g, 1), s) for g, s in zip(global_size, local_size))
        self.launches.append(Launch(name, global_size, local_size, tuple(args), self.describe(node)))

    def render(self) -> OpenCLProgram:
        self.assign_places()
        for node in self.graph.nodes:
            if node.op not in ("input", "const") and not is_view(node) and node.type.numel:
                getattr(self, f"_render_{_KIND.get(node.op, node.op)}")(node)
            for k, out in enumerate(self.graph.outputs):
                if out is node and self.places[node] != Place("out", k) and node.type.numel \
                        and k not in self.in_place:
                    self.copy(node, node, Place("out", k), TensorType(node.dtype, node.shape))
        prelude = [_cl_comment(f"ember: graph {self.graph.name}, profile {self.profile.name}, "
                               f"{len(self.kernels)} kernels, {len(self.launches)} launches")]
        if self.profile.fp64:
            prelude.append("#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n")
        prelude.append(_static_file("common.h"))
        if self.profile.adreno:
            prelude.append(_static_file("adreno.h"))
        source = "\n".join(prelude)
        line = source.count("\n") + 1
        infos, parts = [], [source]
        for name, template, params, text in self.kernels:
            text = "\n" + text
            first = line + 1
            line += text.count("\n")
            infos.append(KernelInfo(name, template, params, first, line))
            parts.append(text)
        layouts = {j: self.layouts[c] for j, c in enumerate(self.constants) if c in self.layouts}
        return OpenCLProgram("".join(parts), self.profile.build_options, self.profile, self.graph, self.plan,
                             tuple(self.constants), layouts, tuple(infos), tuple(self.launches),
                             dict(self.status_messages), dict(self.in_place))

    # ---- copies --------------------------------------------------------------------------
    def copy(self, node: Node, src: Node, dst: Place, dst_type: TensorType):
        """A copy kernel (for node): src's data into a tensor of dst_type at dst."""
        s, d = src.type, dst_type
        if s.dtype.is_quantized:
            row = s.dtype.row_bytes(s.shape[-1])
            s, d = _bytes_type(s, row), _bytes_type(d, row)
        sizes, (ss, ds) = coalesce(s.shape, [s.strides, d.strides])
        numel = math.prod(sizes)
        if s.dtype == d.dtype:
            mode, item = "raw", {1: "uchar", 2: "ushort", 4: "uint"}[s.dtype.block_bytes]
        else:
            mode, item = "convert", "uint"
        self.add_kernel(node, "copy.cl.j2", [self.buf(src), BufferArg(dst)], (numel,), None,
                        numel=numel, src_off=offset_expr("i", sizes, ss), dst_off=offset_expr("i", sizes, ds),
                        src_dtype=s.dtype.name, dst_dtype=d.dtype.name, mode=mode, item_type=item)

    def _render_cont(self, node: Node):
        self.copy(node, node.inputs[0], self.places[node], node.type)

    _render_cast = _render_cont

    def _render_concat(self, node: Node):
        a, b = node.inputs
        axis = node.attr("axis") % node.type.rank
        out = node.type
        for part, start in ((a, 0), (b, a.shape[axis])):
            if part.type.numel:
                dst = TensorType(out.dtype, part.shape, out.strides)
                self.copy(node, part, self.places[node].shifted(start * out.strides[axis]), dst)

    # ---- elementwise ---------------------------------------------------------------------
    def _render_eltwise(self, node: Node):
        operands = list(node.inputs)
        strides = [operands[0].type.strides]
        if len(operands) == 2:
            strides.append(broadcast_strides(operands[1].type, node.shape))
        strides.append(node.type.strides)
        sizes, strides = coalesce(node.shape, strides)
        numel = math.prod(sizes)
        if node.op == "scale":
            expr = f"a * {cl_float(node.attr('scale'))} + {cl_float(node.attr('bias'))}"
        elif node.op == "clamp":
            expr = f"fmin(fmax(a, {cl_float(node.attr('min'))}), {cl_float(node.attr('max'))})"
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
        return min(self.profile.row_wg, _next_pow2(max(n, 1)))

    def _render_rows(self, node: Node):
        x = node.inputs[0]
        loop = row_loop(x.shape, [x.type.strides], keep_last=True)
        wg = self.row_wg(loop.n)
        params = dict(rows=loop.rows, n=loop.n, x_row=loop.row[0], x_step=loop.step[0], wg=wg)
        template, args = f"{node.op}.cl.j2", [self.buf(x)]
        if node.op in ("rms_norm", "layer_norm", "rms_norm_mul"):
            params["eps"] = cl_float(node.attr("eps"))
        if node.op != "argmax":
            params["reduce"] = self.reduce
        if node.op == "rms_norm":
            params.update(weighted=False, w_step=0)
        elif node.op == "rms_norm_mul":
            w = node.inputs[1]
            template = "rms_norm.cl.j2"
            params.update(weighted=True, w_step=w.type.strides[0])
            args.append(self.buf(w))
        self.add_kernel(node, template, args + [self.buf(node)], (loop.rows * wg,), (wg,), **params)

    def _render_softmax(self, node: Node):
        x = node.inputs[0]
        mask = node.inputs[1] if len(node.inputs) > 1 else None
        strides = [x.type.strides] + ([broadcast_strides(mask.type, x.shape)] if mask else [])
        loop = row_loop(x.shape, strides, keep_last=True)
        wg = self.row_wg(loop.n)
        softcap = node.attr("softcap")
        operands = [x] + ([mask] if mask else [])
        self.add_kernel(node, "softmax.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (loop.rows * wg,), (wg,),
                        rows=loop.rows, n=loop.n, x_row=loop.row[0], x_step=loop.step[0],
                        has_mask=mask is not None, mask_row=loop.row[1] if mask else "0",
                        mask_step=loop.step[1] if mask else 0, mask_dtype=mask.dtype.name if mask else "f32",
                        scale=cl_float(node.attr("scale")), softcap=cl_float(softcap) if softcap else None,
                        wg=wg, reduce=self.reduce)

    # ---- rope, attention -----------------------------------------------------------------
    def _render_rope(self, node: Node):
        x, pos = node.inputs[:2]
        ff = node.inputs[2] if len(node.inputs) > 2 else None
        T, H, D = x.shape
        n_dims = node.attr("n_dims") or D
        fp64 = self.profile.fp64
        inv_freq = node.attr("freq_base") ** (-np.arange(0, n_dims, 2, dtype=np.float64) / n_dims)
        operands = [x, pos] + ([ff] if ff else [])
        self.add_kernel(node, "rope.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (n_dims // 2 + D - n_dims, H, T), None,
                        T=T, H=H, D=D, n_dims=n_dims, mode=node.attr("mode"), xs=x.type.strides,
                        pos_step=pos.type.strides[0], has_ff=ff is not None,
                        ff_step=ff.type.strides[0] if ff else 0,
                        freq_scale=cl_real(node.attr("freq_scale"), fp64),
                        inv_freq=[cl_real(v, fp64) for v in inv_freq], fp64=fp64)

    def _render_attention(self, node: Node):
        q, k, v = node.inputs[:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        Tq, Hq, D = q.shape
        Tk, Hkv, Dv = v.shape
        softcap = node.attr("softcap")
        wg = self.profile.attention_wg
        operands = [q, k, v] + ([mask] if mask else [])
        self.add_kernel(node, "attention.cl.j2", [self.buf(o) for o in operands] + [self.buf(node)],
                        (wg, Hq, Tq), (wg, 1, 1),
                        Tq=Tq, Tk=Tk, Hq=Hq, group=Hq // Hkv, D=D, Dv=Dv,
                        qs=q.type.strides, ks=k.type.strides, vs=v.type.strides,
                        ms=mask.type.strides if mask else (0, 0), k_dtype=k.dtype.name,
                        v_dtype=v.dtype.name, has_mask=mask is not None,
                        mask_dtype=mask.dtype.name if mask else "f32",
                        scale=cl_float(node.attr("scale")), softcap=cl_float(softcap) if softcap else None,
                        causal=node.attr("causal"), window=node.attr("window"), wg=wg,
                        k_vector=D % 16 == 0 and k.type.strides[2] == k.dtype.block_bytes,
                        dv_per=max(1, -(-Dv // wg)), reduce=self.reduce)

    # ---- matmul and rows of tables -------------------------------------------------------
    def _render_mul_mat(self, node: Node):
        x, w = node.inputs
        mm = _mul_mat_shape(node)
        if w in self.layouts:
            return self._render_mul_mat_soa(node, mm)
        vector = x.dtype.name == "f32" and mm.x_step == 4 and (w.dtype.is_quantized or (
            mm.K % 16 == 0 and mm.w_step == w.dtype.block_bytes))
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
                        w_batch=mm.w_batch)

    def _render_mul_mat_soa(self, node: Node, mm: _MulMat):
        x, w = node.inputs
        layout = self.layouts[w]
        j = self.places[w].index
        emulate = not self.profile.subgroups
        scales = BufferArg(self.places[w], "d")
        if mm.T == 1:
            sg, nsg, _ = self.profile.gemv_local
            self.add_kernel(node, "mul_mat_soa_gemv.cl.j2",
                            [self.buf(x), ImageArg(j, "r32ui"), scales, self.buf(node)],
                            (_round_up(mm.N, sg), nsg, 1), (sg, nsg, 1),
                            wtype=layout.dtype, M=mm.N, K=mm.K, x_dtype=x.dtype.name, x_step=mm.x_step,
                            sg=sg, nsg=nsg, emulate=emulate)
            return
        tp = _round_up(mm.T, 8)
        scratch = Place("arena", 0, self.plan.scratch_offsets[node])
        self.add_kernel(node, "act_to_half_t.cl.j2", [self.buf(x), BufferArg(scratch)], (mm.K, tp), None,
                        T=mm.T, K=mm.K, tp=tp, x_dtype=x.dtype.name, x_row=mm.x_row, x_step=mm.x_step)
        local = self.profile.gemm_local
        self.add_kernel(node, "mul_mat_soa_gemm.cl.j2",
                        [BufferArg(scratch), ImageArg(j, "rgba32ui"), scales, self.buf(node)],
                        (mm.N // 4, tp // 8, 1), local,
                        wtype=layout.dtype, M=mm.N, K=mm.K, T=mm.T, tp=tp, emulate=emulate)

    def _render_get_rows(self, node: Node):
        table, idx = node.inputs
        R, D = table.shape
        if table in self.layouts:
            layout = self.layouts[table]
            place = self.places[table]
            self.add_kernel(node, "get_rows_soa.cl.j2",
                            [BufferArg(place, "q"), BufferArg(place, "d"), self.buf(idx), self.buf(node),
                             self.status(node, f"an index is out of range [0, {R})")],
                            (D, idx.shape[0]), None,
                            wtype=layout.dtype, M=R, K=D, T=idx.shape[0], idx_step=idx.type.strides[0])
            return
        quantized = table.dtype.is_quantized
        self.add_kernel(node, "get_rows.cl.j2",
                        [self.buf(table), self.buf(idx), self.buf(node),
                         self.status(node, f"an index is out of range [0, {R})")],
                        (D // 32 if quantized else D, idx.shape[0]), None,
                        T=idx.shape[0], R=R, D=D, wtype=table.dtype.name, quantized=quantized,
                        row_stride=table.type.strides[0], step=table.type.strides[1],
                        idx_step=idx.type.strides[0])

    def _render_set_rows(self, node: Node):
        dst, idx, src = node.inputs
        R, D = dst.shape
        if self.places[node] != self.places[dst]:
            self.copy(node, dst, self.places[node], node.type)
        chunk = 256
        self.add_kernel(node, "set_rows.cl.j2",
                        [self.buf(idx), self.buf(src), self.buf(node),
                         self.status(node, f"an index is out of range [0, {R})")],
                        (-(-D // chunk), idx.shape[0]), None,
                        T=idx.shape[0], R=R, D=D, dtype=dst.dtype.name, esize=dst.dtype.block_bytes,
                        idx_step=idx.type.strides[0], ss=src.type.strides, chunk=chunk)

    # ---- state-space ops (Mamba-2) -------------------------------------------------------
    def _render_ssm_conv(self, node: Node):
        sx, w = node.inputs
        T, C = node.shape
        self.add_kernel(node, "ssm_conv.cl.j2", [self.buf(sx), self.buf(w), self.buf(node)], (C, T), None,
                        T=T, C=C, K=w.shape[1], xs=sx.type.strides, ws=w.type.strides)

    def _render_ssm_scan(self, node: Node):
        state, x, dt, a, b, c = node.inputs
        H, P, N = state.shape
        self.add_kernel(node, "ssm_scan.cl.j2", [self.buf(o) for o in node.inputs] + [self.buf(node)],
                        (H * P,), None,
                        T=x.shape[0], H=H, P=P, N=N, G=b.shape[1], ss=state.type.strides,
                        xs=x.type.strides, dts=dt.type.strides, as_=a.type.strides,
                        bs=b.type.strides, cs=c.type.strides)


def _cl_comment(text: str) -> str:
    return "/* " + text.replace("*/", "* /") + " */\n"


def _bytes_type(t: TensorType, row_bytes: int) -> TensorType:
    """A quantized tensor's storage as bytes: blocks copy as opaque data."""
    return TensorType(dtypes.i8, t.shape[:-1] + (row_bytes,), t.strides[:-1] + (1,))


def render_graph(graph: Graph, profile: Profile | None = None) -> OpenCLProgram:
    """The OpenCL program for graph (dead nodes dropped). Raises EmberError naming the first node
    the renderer cannot handle."""
    profile = profile or generic_profile()
    graph = lower_layouts(graph, profile)
    for node in graph.nodes:
        if node.op in ("input", "const"):
            continue
        ok, reason = supports_node(node)
        if not ok:
            raise EmberError(f"opencl: %{value_names(graph)[node]} ({node.op} : {node.type}): {reason}")
    check_layouts(graph, profile)
    return _Renderer(graph, profile).render()


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


def profile_by_name(name: str) -> Profile:
    """generic (no fp64), adreno or adreno-emulated (the A7xx row of the device table)."""
    if name not in PROFILE_NAMES:
        raise EmberError(f"unknown OpenCL profile {name!r}; known: {', '.join(PROFILE_NAMES)}")
    return generic_profile() if name == "generic" else adreno_profile(emulated=name == "adreno-emulated")
