"""The OpenCL launch-plan schema: what a rendered program is and how a runtime replays it, free
of the renderer so that artifact loaders read plans without jinja2.

- Profiles (`Profile`, `generic_profile`, `adreno_profile`, the Adreno generation table): what the
  kernels may use and their launch shapes.
- The adreno_soa weight layout as the runtime holds it (`WeightLayout`, `relayout_weight`).
- Kernel arguments (`BufferArg`, `ImageArg`, `StatusArg`), `Launch`, `KernelInfo` and
  `OpenCLProgram`, whose `launch_plan()` is the JSON an artifact stores.

Imports NumPy, ember.ir, ember.errors and the codegen value places and memory plan only.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np

from ember.codegen.memory_plan import MemoryPlan
from ember.codegen.values import Place
from ember.errors import EmberError
from ember.ir import dtypes
from ember.ir.graph import Graph
from ember.ir.layouts import get_layout
from ember.ir.node import Node

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
    # layout-adreno thresholds (layout_pass builds the pass with them): SoA only for big matrices
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


def profile_by_name(name: str) -> Profile:
    """generic (no fp64), adreno or adreno-emulated (the A7xx row of the device table)."""
    if name not in PROFILE_NAMES:
        raise EmberError(f"unknown OpenCL profile {name!r}; known: {', '.join(PROFILE_NAMES)}")
    return generic_profile() if name == "generic" else adreno_profile(emulated=name == "adreno-emulated")
