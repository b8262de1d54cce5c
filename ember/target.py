"""The targets ember compiles for: one list that the CLI, the session, the pass pipelines and
the artifacts all read. A target is a value, not a string spelled in several places.

A target names the backend that runs it (with that backend's options, e.g. the OpenCL profile),
whether its pipeline ends with a weight-layout phase, and the module of ember.artifact that
writes and loads its compiled artifacts. Adding a target is one `Target` entry here plus its
codegen dialect and backend (see README, "Add a backend").

Ground floor: imports nothing of ember but its errors, so every floor may read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ember.errors import EmberError


@dataclass(frozen=True)
class Target:
    name: str                  # as the user spells it: --target NAME
    backend: str               # the backend that runs it (ember.backends registry name)
    profile: str | None        # the backend's profile for it (OpenCL: generic | adreno), or None
    layout: str | None         # the weight layout its pipeline ends with ("adreno"), or None
    artifact: str              # module of ember.artifact with its writer and loader
    summary: str               # one line for --help: what an artifact of it holds and where it runs


TARGETS: tuple[Target, ...] = (
    Target("cpu", "cpu", None, None, "ember.artifact.cpu",
           "C sources and built libraries (run without the passes or the C compiler)"),
    Target("cpu-aarch64", "cpu-aarch64", None, None, "ember.artifact.cpu",
           "the same cross-compiled for aarch64 Linux (NEON; --cpu-features dotprod,i8mm), "
           "run on an aarch64 machine or by the native runtime"),
    Target("opencl-generic", "opencl", "generic", None, "ember.artifact.opencl",
           "OpenCL C sources, build options and launch plans, plus binaries for the OpenCL device "
           "here (run on any OpenCL 1.2 device)"),
    Target("opencl-adreno", "opencl", "adreno", "adreno", "ember.artifact.opencl",
           "the same for Adreno GPUs (fp16, subgroups, Q8_0/Q4_0 weights stored in the SoA layout), "
           "written without an Adreno device (no binaries then) and run only on one"),
    Target("vulkan", "vulkan", None, None, "ember.artifact.vulkan",
           "SPIR-V and launch plans, built for the Vulkan device here, or with --portable for any "
           "Vulkan 1.1 device without one here (needs glslc; the run does not)"),
)

TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in TARGETS)


def get_target(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise EmberError(f"unknown target {name!r}; known: {', '.join(TARGET_NAMES)}")


def target_of(backend: str, adreno: bool = False) -> Target:
    """The target a backend of that name runs (an OpenCL backend with an Adreno profile runs
    opencl-adreno, any other opencl-generic)."""
    for target in TARGETS:
        if target.backend == backend and (target.layout == "adreno") == adreno:
            return target
    raise EmberError(f"no target runs on backend {backend!r}{' with an Adreno profile' if adreno else ''}")
