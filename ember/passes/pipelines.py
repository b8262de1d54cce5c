"""Per-target pipelines, built from named phases (TVM/MLC style)."""
from __future__ import annotations

from ember.passes.base import Phase, Pipeline
from ember.passes.cse import CommonSubexpressionElimination
from ember.passes.dce import DeadCodeElimination
from ember.passes.fold_constants import FoldConstants
from ember.passes.fuse_elementwise import FuseElementwise
from ember.passes.fuse_qkv import FuseQKV
from ember.passes.layout import LayoutAdreno

TARGETS = ("cpu", "opencl-generic", "opencl-adreno", "vulkan")


def simplify_phase() -> Phase:
    return Phase("simplify", (FoldConstants(), CommonSubexpressionElimination(), DeadCodeElimination()))


def pipeline_for(target: str) -> Pipeline:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    phases = (simplify_phase(), fusion_phase())
    if target == "opencl-adreno":
        # Last: layouts are chosen on the final graph, so every consumer of a weight is known.
        phases += (Phase("layout", (LayoutAdreno(),)),)
    return Pipeline(phases=phases, label=target)


def fusion_phase() -> Phase:
    return Phase("fusion", (FuseQKV(), FuseElementwise(), DeadCodeElimination()))


def known_pass_names() -> tuple[str, ...]:
    names = []
    for target in TARGETS:
        for p in pipeline_for(target).passes:
            if p.name not in names:
                names.append(p.name)
    return tuple(names)
