"""The walk every renderer shares: a graph in, one lowering call per computing node out.

`Renderer` owns what the three dialects (cpu.py, opencl.py, vulkan.py) do alike: dropping dead
nodes, naming values, placing them (values.py, the memory plan), spotting a set_rows that may
update an input cache where it lies, lowering cont / cast / concat to copies, copying outputs to
where the caller reads them, status codes, de-duplicating kernels by their rendered body, and the
barriers that byte-range hazards between steps call for. A dialect subclass states only its
differences: literals, element-wise tables, launch geometry, arguments, templates.

Ops reach their lowering through one table, LOWERING (op -> kind); a dialect implements one
method per kind, and its supports_node reads the same table. Nothing is discovered by name.

Imports jinja2, ember.ir, ember.errors, ember.files (the template bytecode cache's folder) and the
codegen helpers (values, indexing, memory_plan).
"""
from __future__ import annotations

import abc
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import jinja2
import numpy as np

from ember.codegen.indexing import RowLoop, broadcast_strides, row_loop
from ember.codegen.memory_plan import is_view, plan_memory
from ember.codegen.values import Place, describe_node, place_values
from ember.errors import EmberError
from ember.files import default_cache_dir
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.ops import OPS
from ember.ir.ops.delta_net import gdn_dims
from ember.ir.ops.elementwise import BINARY, GATED, UNARY
from ember.ir.printer import value_names
from ember.ir.types import TensorType

TEMPLATE_ROOT = Path(__file__).parent / "templates"

# ---- the op table ------------------------------------------------------------------------------
ROW_OPS = ("rms_norm", "rms_norm_mul", "layer_norm", "l2_norm", "sum_rows", "argmax")
ELEMENTWISE_OPS = (*BINARY, *UNARY, *GATED, "scale", "clamp")

# op -> the kind of lowering that renders it. Views and sources need none (a view is an offset
# and strides into its operand; inputs and constants are the caller's).
LOWERING: dict[str, str] = {op: "eltwise" for op in ELEMENTWISE_OPS}
LOWERING.update({op: "rows" for op in ROW_OPS})
LOWERING.update(softmax="softmax", rope="rope", attention="attention", ssm_conv="ssm_conv",
                ssm_scan="ssm_scan", gated_delta_net="gated_delta_net", mul_mat="mul_mat",
                get_rows="get_rows", set_rows="set_rows", cont="copy", cast="copy", concat="concat",
                mul_mat_id="mul_mat_id", top_k="top_k", take_along="take_along")


def needs_lowering(op: str) -> bool:
    return OPS[op].category not in ("view", "source")


def lowering_problem(node: Node, dialect: str) -> str:
    """Why no lowering handles node ("" when one does, or when it needs none)."""
    if node.op not in OPS:
        return f"{node.op}: unknown op"
    if needs_lowering(node.op) and node.op not in LOWERING:
        return f"{node.op}: no {dialect} kernel for this op"
    return ""


# ---- templates ---------------------------------------------------------------------------------
class Templates:
    """The kernel templates of one dialect (templates/<folder>), rendered strictly: an undefined
    parameter is an error, never an empty string."""

    def __init__(self, folder: str):
        self.folder = TEMPLATE_ROOT / folder

    @functools.cached_property
    def environment(self) -> jinja2.Environment:
        return jinja2.Environment(loader=jinja2.FileSystemLoader(str(self.folder)),
                                  undefined=jinja2.StrictUndefined, trim_blocks=True,
                                  lstrip_blocks=True, keep_trailing_newline=True,
                                  bytecode_cache=template_bytecode_cache())

    def render(self, template: str, **params) -> str:
        return self.environment.get_template(template).render(**params)

    @functools.lru_cache(maxsize=None)
    def static_file(self, name: str) -> str:
        """A file copied into sources as it is (shared headers)."""
        return (self.folder / name).read_text()

    def names(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.folder.glob(pattern))


@functools.lru_cache(maxsize=None)
def template_bytecode_cache() -> jinja2.BytecodeCache | None:
    """Where jinja2 keeps the templates it compiled to Python code (ember's cache folder,
    templates/), so a process renders without compiling them again (~0.2 s of a warm start).
    An entry holds the sha1 of its template's source and the Python version, and is compiled
    again when either differs. None (compile each time) when the folder cannot be made."""
    folder = default_cache_dir() / "templates"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(str(folder))


# ---- C-family literals and comments (C and OpenCL C) ------------------------------------------
def c_literal(v: float, kind: str = "float") -> str:
    """The one way every C-family renderer writes a float: kind "float" as a C float expression
    (the value rounded to f32, as stored), "double" as a double literal, "f32" as an OpenCL C
    float literal with the f suffix. NaN and infinities become the NAN / INFINITY macros (C99
    and OpenCL C both have them), never `inf` or `nan`, which no compiler reads."""
    v = float(v)
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    if kind == "double":
        return repr(v)
    if kind == "f32":
        with np.errstate(over="ignore"):
            f = float(np.float32(v))
        return c_literal(f) if math.isinf(f) else f"{f!r}f"     # beyond f32's range
    return f"((float){v!r})"


def c_float(v: float) -> str:
    """A float attribute as a C float expression (c_literal)."""
    return c_literal(v, "float")


def c_double(v: float) -> str:
    return c_literal(v, "double")


def c_comment(text: str) -> str:
    return "/* " + text.replace("*/", "* /") + " */\n"


# Element-wise arithmetic as every dialect writes it, on float operands a (and b).
ARITHMETIC = {"add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b", "neg": "-a"}


# ---- C-family template parameters (the cpu and opencl kernels take the same ones) -------------
def c_row_op(node: Node, real: Callable[[float], str], wg_of: Callable[[int], int] | None = None,
             reduce: str | None = None) -> tuple[str, list[Node], dict]:
    """(template stem, operands, parameters) of a row op's kernel: rows of the last axis, eps
    as a literal of `real`; with wg_of, the work-group size for n items (and the reduction)."""
    x = node.inputs[0]
    loop = row_loop(x.shape, [x.type.strides], keep_last=True)
    params = dict(rows=loop.rows, n=loop.n, x_row=loop.row[0], x_step=loop.step[0])
    if wg_of is not None:
        params["wg"] = wg_of(loop.n)
    if node.op in ("rms_norm", "layer_norm", "rms_norm_mul", "l2_norm"):
        params["eps"] = real(node.attr("eps"))
    if reduce is not None and node.op != "argmax":
        params["reduce"] = reduce
    stem, operands = node.op, [x]
    if node.op == "rms_norm":
        params.update(weighted=False, w_step=0)
    elif node.op == "rms_norm_mul":
        w = node.inputs[1]
        stem = "rms_norm"
        params.update(weighted=True, w_step=w.type.strides[0])
        operands.append(w)
    return stem, operands, params


def c_softmax(node: Node) -> tuple[list[Node], RowLoop, dict]:
    """(operands, rows, parameters) of a softmax kernel: x and its optional broadcast mask."""
    x = node.inputs[0]
    mask = node.inputs[1] if len(node.inputs) > 1 else None
    strides = [x.type.strides] + ([broadcast_strides(mask.type, x.shape)] if mask else [])
    loop = row_loop(x.shape, strides, keep_last=True)
    softcap = node.attr("softcap")
    params = dict(rows=loop.rows, n=loop.n, x_row=loop.row[0], x_step=loop.step[0],
                  has_mask=mask is not None, mask_row=loop.row[1] if mask else "0",
                  mask_step=loop.step[1] if mask else 0, mask_dtype=mask.dtype.name if mask else "f32",
                  scale=c_float(node.attr("scale")), softcap=c_float(softcap) if softcap else None)
    return [x] + ([mask] if mask else []), loop, params


def c_rope(node: Node, real: Callable[[float], str]) -> tuple[list[Node], dict]:
    """(operands, parameters) of a rope kernel: the frequencies computed in float64 and written
    as literals of `real`."""
    x, pos = node.inputs[:2]
    ff = node.inputs[2] if len(node.inputs) > 2 else None
    T, H, D = x.shape
    n_dims = node.attr("n_dims") or D
    inv_freq = node.attr("freq_base") ** (-np.arange(0, n_dims, 2, dtype=np.float64) / n_dims)
    params = dict(T=T, H=H, D=D, n_dims=n_dims, mode=node.attr("mode"), xs=x.type.strides,
                  pos_step=pos.type.strides[0], has_ff=ff is not None, ff_step=ff.type.strides[0] if ff else 0,
                  freq_scale=real(node.attr("freq_scale")), inv_freq=[real(v) for v in inv_freq])
    return [x, pos] + ([ff] if ff else []), params


def c_gated_delta_net(node: Node) -> dict:
    """The parameters of a gated_delta_net kernel: sizes (N sequences, 1 without a sequence
    axis), byte strides of every operand within a sequence (qs, ks, ...) and from one sequence to
    the next (qn, kn, ...; 0 without a sequence axis), whether the decay is per key channel (kda),
    the output scale as a float literal and whether the state after every token is written
    (all_states)."""
    q, k, v, g, beta, state = node.inputs
    d = gdn_dims(q, v, g, state)
    lead = 1 if d.seq_axis else 0
    params = dict(N=d.N, T=d.T, H_k=d.H_k, H_v=d.H_v, S_k=d.S_k, S_v=d.S_v, kda=d.kda,
                  scale=c_float(node.attr("scale")), all_states=node.attr("all_states"))
    for name, o in zip(("q", "k", "v", "g", "b", "s"), node.inputs):
        params[f"{name}s"] = o.type.strides[lead:]
        params[f"{name}n"] = o.type.strides[0] if lead else 0
    return params


def c_ssm_scan(node: Node) -> dict:
    """The parameters of an ssm_scan kernel (C and OpenCL C): sizes, byte strides of every
    operand, whether A holds one decay per head (Mamba-2) or per head and state entry (a_per_state,
    Mamba-1), and whether the state after every token is written (all_states)."""
    state, x, dt, a, b, c = node.inputs
    H, P, N = state.shape
    return dict(T=x.shape[0], H=H, P=P, N=N, G=b.shape[1], ss=state.type.strides, xs=x.type.strides,
                dts=dt.type.strides, as_=a.type.strides, a_per_state=a.type.rank == 2,
                bs=b.type.strides, cs=c.type.strides, all_states=node.attr("all_states"))


def optional_operands(node: Node, n: int) -> tuple[list[Node], Node | None]:
    """(the n operands every such node has, then its optional last one or None): attention's
    q, k, v and mask, softmax's x and mask."""
    return list(node.inputs[:n]), node.inputs[n] if len(node.inputs) > n else None


def c_get_rows(node: Node) -> dict:
    """The parameters of a get_rows kernel on a table in the row layout."""
    table, idx = node.inputs
    R, D = table.shape
    return dict(T=idx.shape[0], R=R, D=D, wtype=table.dtype.name, quantized=table.dtype.is_quantized,
                row_stride=table.type.strides[0], step=table.type.strides[1], idx_step=idx.type.strides[0])


def c_take_along(node: Node) -> dict:
    """The parameters of a take_along kernel: rows of idx, x read at the row's indices."""
    x, idx = node.inputs
    loop = row_loop(idx.shape, [x.type.strides, idx.type.strides], keep_last=True)
    return dict(rows=loop.rows, k=loop.n, E=x.shape[-1], x_row=loop.row[0], idx_row=loop.row[1],
                x_step=x.type.strides[-1], idx_step=loop.step[1])


@dataclass(frozen=True)
class KernelText:
    """One distinct kernel of a C-family program."""
    name: str
    template: str
    params: dict
    text: str


# ---- hazards -----------------------------------------------------------------------------------
Extent = tuple   # (region, index, first byte, end byte)


def extent(place: Place, nbytes: int) -> Extent:
    return (place.region, place.index, place.offset, place.offset + nbytes)


def overlap(a: Extent, b: Extent) -> bool:
    """Whether two byte ranges share a byte (an empty range shares none)."""
    return a[:2] == b[:2] and a[2] < a[3] and b[2] < b[3] and a[2] < b[3] and b[2] < a[3]


def hazard_barriers(steps: Iterable[tuple[list[Extent], list[Extent], bool]]) -> list[bool]:
    """For steps (reads, writes, serial) in order: whether a barrier must come before each, as it
    touches what the steps since the last barrier wrote, or writes what they touched. Two serial
    steps run on one thread, in order: never a hazard between them."""
    flags, epoch_reads, epoch_writes = [], [], []
    for reads, writes, serial in steps:
        def clash(mine, theirs):
            return any(overlap(m, e) and not (serial and e_serial) for m in mine for e, e_serial in theirs)
        hazard = clash(writes, epoch_reads + epoch_writes) or clash(reads, epoch_writes)
        if hazard:
            epoch_reads, epoch_writes = [], []
        flags.append(hazard)
        epoch_reads += [(e, serial) for e in reads]
        epoch_writes += [(e, serial) for e in writes]
    return flags


# ---- the walk ----------------------------------------------------------------------------------
_KERNEL_NAME_SLOT = "ember_kernel_name_slot"


class Renderer(abc.ABC):
    """Lowers a graph node by node; a dialect subclass implements copy and one method per kind of
    LOWERING, and sets the class fields below."""
    dialect: str                   # names the renderer in error messages
    templates: Templates
    arena_alignment: int

    def __init_subclass__(cls, dialect: str, templates: Templates, arena_alignment: int, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.dialect, cls.templates, cls.arena_alignment = dialect, templates, arena_alignment
    # Whether an output updated in place (in_place_input) lives in its input's region (the
    # launch plan reads it back from there) or in its own output region, which the executor
    # points at the input's buffer (cpu).
    in_place_in_input_region: bool = True

    def __init__(self, graph: Graph):
        if graph.has_dead_nodes:
            graph = graph.replace()
        graph = self.order(graph)
        self.graph = graph
        self.names = value_names(graph)
        self.plan = plan_memory(graph, alignment=self.arena_alignment, extra=self.scratch_bytes)
        self.places: dict[Node, Place] = {}
        self.constants: list[Node] = []
        self.in_place: dict[int, int] = {}          # output index -> input index it is read from
        self.in_place_nodes: set[Node] = set()
        self.output_sources = [Place("out", k) for k in range(len(graph.outputs))]
        self.status_messages: dict[int, str] = {}
        self.kernels: list = []                     # the distinct kernels, in order of first use
        self.kernel_by_body: dict[str, object] = {}
        self.lowerings: dict[str, Callable[[Node], None]] = {
            "eltwise": self.eltwise, "rows": self.rows, "softmax": self.softmax, "rope": self.rope,
            "attention": self.attention, "ssm_conv": self.ssm_conv, "ssm_scan": self.ssm_scan,
            "gated_delta_net": self.gated_delta_net,
            "mul_mat": self.mul_mat, "get_rows": self.get_rows, "set_rows": self.set_rows,
            "copy": self.cont, "concat": self.concat, "mul_mat_id": self.mul_mat_id,
            "top_k": self.top_k, "take_along": self.take_along}
        assert set(self.lowerings) == set(LOWERING.values()), "a kind of lowering has no method"

    # ---- what a dialect may refine -------------------------------------------------------
    def order(self, graph: Graph) -> Graph:
        """The graph in the order its kernels run (by default, as given)."""
        return graph

    def scratch_bytes(self, node: Node) -> int:
        """Bytes of arena scratch node's kernels need while they run."""
        return 0

    # ---- names, places, status -----------------------------------------------------------
    def describe(self, node: Node) -> str:
        return describe_node(self.names, node)

    def error(self, node: Node, what: str) -> EmberError:
        return EmberError(f"{self.dialect}: {self.describe(node)}: {what}")

    def status_code(self, node: Node, what: str) -> int:
        """The code a kernel reports when `what` happens for node (0 means no error)."""
        code = len(self.status_messages) + 1
        self.status_messages[code] = f"{self.describe(node)}: {what}"
        return code

    def index_status(self, node: Node, rows: int) -> int:
        """The status code of a get_rows / set_rows index outside [0, rows)."""
        return self.status_code(node, f"an index is out of range [0, {rows})")

    def assign_places(self):
        def output_place(node: Node, k: int) -> Place:
            shared = self.in_place_input(node)
            if shared is None:
                return Place("out", k)
            self.in_place[k] = shared
            self.in_place_nodes.add(node)
            if not self.in_place_in_input_region:
                return Place("out", k)
            self.output_sources[k] = Place("in", shared)
            return Place("in", shared)
        self.places, self.constants = place_values(self.graph, self.plan.offsets, output_place)

    def in_place_input(self, node: Node) -> int | None:
        """The input whose buffer a set_rows output may share (a cache updated where it lies):
        its dst is a graph input of the same type that nothing else reads, except nodes the
        set_rows itself depends on (a recurrent state read with get_rows, then its new rows
        written back): those run before it, so they read the old rows. None otherwise."""
        if node.op != "set_rows":
            return None
        dst = node.inputs[0]
        if dst.op != "input" or dst.type != node.type:
            return None
        others = set(self.graph.users[dst]) - {node}
        if others and not others <= _ancestors(node.inputs[1:]):
            return None
        index = self.graph.inputs.index(dst)
        return None if index in self.in_place.values() else index

    # ---- the walk ------------------------------------------------------------------------
    def lower_graph(self):
        """Places every value, then lowers each computing node in order, copying a graph output
        to its output region where it was computed elsewhere."""
        self.assign_places()
        outputs = self.graph.outputs
        for node in self.graph.nodes:
            if not node.type.numel:
                continue
            if needs_lowering(node.op) and not is_view(node):
                self.lowerings[LOWERING[node.op]](node)
            for k, out in enumerate(outputs):
                if out is node and self.output_sources[k] != self.places[node]:
                    self.copy(node, node, Place("out", k), TensorType(node.dtype, node.shape))

    def cont(self, node: Node):
        """cont and cast: a copy into the node's own (contiguous) place."""
        self.copy(node, node.inputs[0], self.places[node], node.type)

    def concat(self, node: Node):
        """Two copies, each part into its slice of the result (an empty part needs none)."""
        a, b = node.inputs
        axis = node.attr("axis") % node.type.rank
        out = node.type
        for part, start in ((a, 0), (b, a.shape[axis])):
            if part.type.numel:
                dst = TensorType(out.dtype, part.shape, out.strides)
                self.copy(node, part, self.places[node].shifted(start * out.strides[axis]), dst)

    def c_kernel(self, node: Node, template: str, params: dict) -> str:
        """The name of the kernel template renders with params, rendering it the first time. Kernels
        with the same body (the same op at the same shapes, as in every layer of a model) are
        emitted once: build time grows with distinct kernels, not with nodes."""
        body = self.templates.render(template, name=_KERNEL_NAME_SLOT, **params)
        kernel = self.kernel_by_body.get(body)
        if kernel is None:
            name = f"k{len(self.kernels)}_{node.op}"
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            comment = c_comment(f"{name}: first used by {self.describe(node)}\n * template {template}: {shown}")
            kernel = KernelText(name, template, params, comment + body.replace(_KERNEL_NAME_SLOT, name))
            self.kernel_by_body[body] = kernel
            self.kernels.append(kernel)
        return kernel.name

    # ---- the lowerings each dialect implements -------------------------------------------
    @abc.abstractmethod
    def copy(self, node: Node, src: Node, dst: Place, dst_type: TensorType):
        """Kernels (for node) that copy src's data into a tensor of dst_type at dst."""

    @abc.abstractmethod
    def eltwise(self, node: Node):
        """The element-wise ops (ELEMENTWISE_OPS), with broadcasting."""

    @abc.abstractmethod
    def rows(self, node: Node):
        """The row ops (ROW_OPS): norms, sums and argmax over the last axis."""

    @abc.abstractmethod
    def softmax(self, node: Node):
        """Softmax over the last axis, with an optional mask, scale and soft cap."""

    @abc.abstractmethod
    def rope(self, node: Node):
        """Rotary position embedding."""

    @abc.abstractmethod
    def attention(self, node: Node):
        """Attention of query rows over key and value rows (GQA, mask, window)."""

    @abc.abstractmethod
    def ssm_conv(self, node: Node):
        """The short causal convolution before a Mamba-2 scan."""

    @abc.abstractmethod
    def ssm_scan(self, node: Node):
        """The selective scan (A per head, Mamba-2, or per head and state entry, Mamba-1)."""

    @abc.abstractmethod
    def gated_delta_net(self, node: Node):
        """The gated delta rule over T tokens with carried state (Gated DeltaNet)."""

    @abc.abstractmethod
    def mul_mat(self, node: Node):
        """Activations times a weight (any weight dtype the dialect declares)."""

    @abc.abstractmethod
    def get_rows(self, node: Node):
        """Rows of a table by index (embeddings), with an index status check."""

    @abc.abstractmethod
    def set_rows(self, node: Node):
        """Rows written into a tensor by index (cache updates), with an index status check."""

    @abc.abstractmethod
    def mul_mat_id(self, node: Node):
        """Expert matmul: each (token, slot) row times the weight of the expert ids selects, reading
        only the selected experts, batch invariant, with an index status check."""

    @abc.abstractmethod
    def top_k(self, node: Node):
        """Indices of the k largest values of each row (ties to the lower index)."""

    @abc.abstractmethod
    def take_along(self, node: Node):
        """Values of each row at per-row indices, with an index status check."""


def _ancestors(nodes) -> set[Node]:
    """Every node the given nodes depend on, themselves included."""
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.inputs)
    return seen
