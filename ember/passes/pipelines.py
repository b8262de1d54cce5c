"""Per-target pipelines, built from named phases (TVM/MLC style). The targets and what their
pipelines need come from the one target list (ember/target.py)."""
from __future__ import annotations

from ember.passes.base import Pass, Phase, Pipeline
from ember.passes.cse import CommonSubexpressionElimination
from ember.passes.dce import DeadCodeElimination
from ember.passes.fold_constants import FoldConstants
from ember.passes.fuse_elementwise import FuseElementwise
from ember.passes.fuse_qkv import FuseQKV
from ember.passes.layout import LayoutAdreno
from ember.target import TARGET_NAMES, get_target

TARGETS = TARGET_NAMES


def simplify_phase() -> Phase:
    return Phase("simplify", (FoldConstants(), CommonSubexpressionElimination(), DeadCodeElimination()))


def pipeline_for(target: str, layout: Pass | None = None) -> Pipeline:
    """The pipeline of a target (a name of ember.target.TARGETS). layout: the layout pass of a
    target whose pipeline ends with one, when its options come from the device (the OpenCL
    profile's thresholds); default: that pass with its default options."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    spec = get_target(target)
    phases = (simplify_phase(), fusion_phase())
    if spec.layout == "adreno":
        # Last: layouts are chosen on the final graph, so every consumer of a weight is known.
        phases += (Phase("layout", (layout or LayoutAdreno(),)),)
    elif layout is not None:
        raise ValueError(f"target {target} has no layout phase; got {layout.name}")
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
