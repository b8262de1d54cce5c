"""Running a stored OpenCL launch plan (ember.codegen.opencl.compile_plan, as an artifact keeps it):
the program source and build options, the plan's JSON, the constants by name, and optionally
a binary built earlier for this very device. Nothing is rendered again and no template is read:
this is what a deployed runtime does, with pyopencl only.

A constant whose plan entry has a layout (the Adreno SoA layout) is taken as its parts ("q",
"d") when given (an artifact stores them already re-laid out); otherwise the documented
transform (ember.codegen.opencl.relayout_weight) is applied to the plain blocks at load.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ember.backends.base import host_storage
from ember.backends.opencl.backend import OpenCLBackend, OpenCLExecutable, _nbytes
from ember.backends.opencl.compiler import _quiet_build
from ember.codegen.opencl_plan import SOA_DTYPES, BufferArg, ImageArg, Launch, Place, StatusArg, WeightLayout
from ember.errors import EmberError
from ember.ir import dtypes
from ember.ir.types import TensorType

PLAN_FORMAT = 1      # launch_plan()["format"] this loader reads


@dataclass(frozen=True)
class _Value:
    """An input of the plan: what OpenCLExecutable checks inputs against."""
    name: str
    type: TensorType


@dataclass(frozen=True)
class _PlanGraph:
    name: str
    inputs: tuple


@dataclass(frozen=True)
class _Profile:
    name: str


@dataclass(frozen=True)
class LoadedProgram:
    """The parts of an OpenCLProgram a run needs, read from a plan instead of rendered. Also what
    ProgramCache.build and build_error read (source, options, profile name; no kernel lines)."""
    source: str
    build_options: str
    profile: _Profile
    launches: tuple
    kernels: tuple
    in_place: dict = field(default_factory=dict)
    status_messages: dict = field(default_factory=dict)

    def kernel_at_line(self, line: int):
        return None     # a stored plan keeps no line map: build errors show the log only


def _argument(a: dict):
    kind = a.get("kind")
    if kind == "buffer":
        return BufferArg(Place(a["region"], int(a["index"]), int(a["offset"])), a.get("part", ""))
    if kind == "image":
        return ImageArg(int(a["index"]), a["format"])
    if kind == "status":
        return StatusArg(int(a["code"]))
    raise EmberError(f"opencl plan: unknown kernel argument {a!r}")


def _launch(entry: dict) -> Launch:
    return Launch(entry["kernel"], tuple(entry["global"]),
                  tuple(entry["local"]) if entry.get("local") else None,
                  tuple(_argument(a) for a in entry["args"]), entry.get("node", ""))


class PlanExecutable(OpenCLExecutable):
    """An OpenCLExecutable made from a stored plan; runs exactly as one the backend compiled."""

    def __init__(self, backend: OpenCLBackend, name: str, plan: dict, source: str,
                 constants: Mapping[str, np.ndarray], relaid: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 binary: bytes | None = None):
        import pyopencl as cl
        if plan.get("format") != PLAN_FORMAT:
            raise EmberError(f"opencl plan {name!r}: format {plan.get('format')!r}; this ember reads {PLAN_FORMAT}")
        relaid = relaid or {}
        self.backend = backend
        self.program = LoadedProgram(
            source=source, build_options=plan["build_options"], profile=_Profile(plan["profile"]["name"]),
            launches=tuple(_launch(e) for e in plan["launches"]), kernels=tuple(k["name"] for k in plan["kernels"]),
            in_place={int(k): int(v) for k, v in plan["in_place"].items()},
            status_messages={int(k): v for k, v in plan["status_messages"].items()})
        inputs = tuple(_Value(i["name"], TensorType(dtypes.dtype(i["dtype"]), tuple(i["shape"])))
                       for i in plan["inputs"])
        self.graph = _PlanGraph(name, inputs)
        self.planned_peak_bytes = int(plan["arena_bytes"])
        self.status_messages = self.program.status_messages
        self.transfers = backend.transfers
        self._queue = backend.queue
        ctx = backend.context
        self._lock = threading.Lock()
        out_types = [TensorType(dtypes.dtype(o["dtype"]), tuple(o["shape"])) for o in plan["outputs"]]
        self._declare_signature(inputs, [host_storage(t) for t in out_types])
        self._in_bufs = [None] * len(self._inputs)     # made on first use (OpenCLExecutable._in_buf)
        self._out_bufs = [cl.Buffer(ctx, cl.mem_flags.READ_WRITE, max(_nbytes(t), 4)) for t in out_types]
        self._arena = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, max(self.planned_peak_bytes, 4))
        self._status = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, 4) if self.program.status_messages else None
        self._consts = [self._constant(c, constants, relaid) for c in plan["constants"]]
        self.in_place_outputs = {k: self._inputs[i].name for k, i in self.program.in_place.items()}
        built = self._build(binary, name)
        self._kernels = [cl.Kernel(built, launch.kernel) for launch in self.program.launches]
        self._plain_args = False

    def _constant(self, entry: dict, constants, relaid) -> dict:
        name = entry["name"]
        layout = WeightLayout(**entry["layout"]) if entry.get("layout") else None
        if layout is not None and name in relaid:
            parts = relaid[name]
            want = {"q": (layout.cols // SOA_DTYPES[layout.dtype], layout.rows),
                    "d": (layout.cols // 32, layout.rows)}
            for part, shape in want.items():
                if tuple(parts[part].shape) != shape:
                    raise EmberError(f"opencl plan: constant {name!r} part {part} is {list(parts[part].shape)}, "
                                     f"its layout needs {list(shape)}")
            return self.backend.weights.get_relaid(parts, layout)
        if "value" in entry:      # a literal the graph made, kept in the plan itself
            data = np.asarray(entry["value"], dtype=dtypes.dtype(entry["dtype"]).numpy)
        elif name in constants:
            data = constants[name]
        else:
            raise EmberError(f"opencl plan: constant {name!r} was not given")
        return self.backend.weights.get(data, layout)

    def _build(self, binary: bytes | None, name: str):
        """The program: from binary when given and this device's driver takes it, else from
        the source through the backend's binary cache."""
        import pyopencl as cl
        if binary is not None:
            device = self.backend._select()[0]
            try:
                raw = cl._cl._Program(self.backend.context, [device], [binary])
                _quiet_build(raw, self.program.build_options, device)
                return cl.Program(raw)
            except (cl.Error, RuntimeError, ValueError):
                pass        # another driver or version: built from source below
        return self.backend.cache.build(self.program, name=name)


__all__ = ["LoadedProgram", "PlanExecutable", "PLAN_FORMAT"]
