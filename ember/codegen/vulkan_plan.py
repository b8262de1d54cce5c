"""The Vulkan launch-plan schema: the device features shaders depend on (`DeviceCaps`, the
baseline and portable caps), and what a rendered graph is (`Shader`, `Binding`, `Dispatch`,
`VulkanProgram`, whose `launch_plan()` is the JSON an artifact stores), free of the renderer so
that runtimes and artifact loaders read plans without jinja2.

Imports NumPy, ember.ir and the codegen value places, memory plan and indexing only.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from ember.codegen.indexing import storage_bytes
from ember.codegen.memory_plan import MemoryPlan
from ember.codegen.values import Place
from ember.ir.graph import Graph
from ember.ir.node import Node

PLAN_FORMAT = "ember-vulkan-launch-plan"
PLAN_VERSION = 1


# ---- the device, as the renderer sees it ---------------------------------------------------
@dataclass(frozen=True)
class DeviceCaps:
    """The features and limits of a Vulkan device that shaders and launch plans depend on."""
    device: str = "generic"
    storage8: bool = True            # storageBuffer8BitAccess
    storage16: bool = True           # storageBuffer16BitAccess
    subgroup_size: int = 0           # with subgroup arithmetic in compute shaders; 0: none
    max_storage_range: int = 1 << 27  # maxStorageBufferRange
    offset_alignment: int = 16       # minStorageBufferOffsetAlignment
    push_bytes: int = 128            # maxPushConstantsSize
    max_group_count: int = 65535     # maxComputeWorkGroupCount[0] (and [1])
    texel_buffers: bool = False      # R32_UINT uniform texel buffers (weights read through them)
    max_texel_bytes: int = 0         # 4 * maxTexelBufferElements
    texel_alignment: int = 16        # minTexelBufferOffsetAlignment
    float64: bool = False            # shaderFloat64 (quantized-cache stores exact, ember.codegen.kv_quant)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "DeviceCaps":
        return cls(**data)


# The features every Vulkan 1.1 compute device has: no 8/16-bit storage, no subgroup arithmetic.
BASELINE_CAPS = DeviceCaps("baseline", storage8=False, storage16=False, subgroup_size=0)
# What any Vulkan 1.1 device runs, for compiling with no device at hand: the baseline features
# and the limits the specification guarantees (maxStorageBufferRange >= 2^27, push constants
# >= 128 bytes, 65535 work groups; offset alignments are at most 256 bytes).
PORTABLE_CAPS = dataclasses.replace(BASELINE_CAPS, device="portable (Vulkan 1.1 minimum limits)",
                                    offset_alignment=256, texel_alignment=256)


@dataclass(frozen=True)
class Shader:
    """One compute shader: rendered GLSL and what a pipeline for it needs."""
    template: str
    params: tuple            # sorted (name, value) pairs, as in the header comment
    source: str
    binding_kinds: tuple     # "storage" or "texel", for bindings 0, 1, ...
    push_fields: tuple       # (name, glsl type) in packing order, 4 bytes each

    @property
    def bindings(self) -> int:
        return len(self.binding_kinds)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def name(self) -> str:
        return f"{self.template.split('.')[0]}_{self.sha256[:12]}"

    @property
    def push_bytes(self) -> int:
        return 4 * len(self.push_fields)

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"template {self.template} ({shown})"


@dataclass(frozen=True)
class Binding:
    region: str
    index: int
    offset: int      # bytes from the region's start, a multiple of the device's alignment
    size: int        # bytes
    kind: str = "storage"   # a storage buffer, or a uniform texel buffer of R32_UINT words

    def to_json(self) -> list:
        return [self.region, self.index, self.offset, self.size, self.kind]


@dataclass(frozen=True)
class Dispatch:
    shader: int                       # index into VulkanProgram.shaders
    bindings: tuple[Binding, ...]
    push: bytes
    groups: tuple[int, int, int]
    barrier: bool                     # a memory barrier between this and the dispatches before
    label: str                        # the node it computes, as printed
    op: str
    reads: tuple = ()                 # (region, index, lo, hi) byte ranges, for the barriers
    writes: tuple = ()


@dataclass(frozen=True)
class VulkanProgram:
    graph: Graph
    caps: DeviceCaps
    shaders: tuple[Shader, ...]
    dispatches: tuple[Dispatch, ...]
    plan: MemoryPlan
    constants: tuple[Node, ...]             # region const j holds constants[j]'s data
    aux: tuple[np.ndarray, ...]             # region aux j holds aux[j]'s bytes
    output_sources: tuple[Place, ...]       # where output k is read back from
    in_place: dict                          # output index -> input index it is read from
    status_messages: dict                   # status code -> message

    @property
    def n_barriers(self) -> int:
        return sum(d.barrier for d in self.dispatches)

    def region_bytes(self, region: str, index: int = 0) -> int:
        """Bytes of a region, as the runtime must allocate it (at least this)."""
        if region == "in":
            return storage_bytes(self.graph.inputs[index].type)
        if region == "out":
            return storage_bytes(self.graph.outputs[index].type)
        if region == "const":
            return storage_bytes(self.constants[index].type)
        if region == "aux":
            return self.aux[index].nbytes
        if region == "arena":
            return self.plan.peak_bytes
        if region == "status":
            return 4
        raise ValueError(f"unknown region {region!r}")

    def launch_plan(self) -> dict:
        """Everything a Vulkan runtime needs besides the SPIR-V (named by each shader's
        sha256) and the constants' data, as JSON-able data."""
        g = self.graph
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "graph": g.name,
            "caps": self.caps.to_json(),
            "shaders": [{"name": s.name, "template": s.template, "params": [list(p) for p in s.params],
                         "sha256": s.sha256, "bindings": list(s.binding_kinds), "push_bytes": s.push_bytes}
                        for s in self.shaders],
            "regions": {
                "arena": self.plan.peak_bytes,
                "status": 4,
                "inputs": [{"name": n.name, "dtype": n.dtype.name, "shape": list(n.shape),
                            "bytes": storage_bytes(n.type)} for n in g.inputs],
                "outputs": [{"dtype": n.dtype.name, "shape": list(n.shape), "bytes": storage_bytes(n.type),
                             "source": [p.region, p.index, p.offset]}
                            for n, p in zip(g.outputs, self.output_sources)],
                "constants": [{"name": n.name, "dtype": n.dtype.name, "shape": list(n.shape),
                               "bytes": storage_bytes(n.type)} for n in self.constants],
                "aux": [{"bytes": a.nbytes, "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                        for a in self.aux],
            },
            "dispatches": [{"shader": d.shader, "groups": list(d.groups), "push": d.push.hex(),
                            "bindings": [b.to_json() for b in d.bindings], "barrier": d.barrier,
                            "label": d.label} for d in self.dispatches],
            "in_place": {str(k): g.inputs[i].name for k, i in self.in_place.items()},
            "status_messages": {str(k): v for k, v in self.status_messages.items()},
        }
