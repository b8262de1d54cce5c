"""The opencl-generic and opencl-adreno targets' artifacts: what a step stores and how it is
loaded without ember's compiler (no passes, no template rendering).

    DIR/steps/<shape>.cl         the program source; the step's manifest entry lists its kernels
                                 and its build options
    DIR/steps/<shape>.plan.json  the launch plan (ember.codegen.opencl launch_plan(): buffers,
                                 constants by name and layout, launches with their arguments)
    DIR/steps/<shape>.bin        the program built for the build device, when there was one
                                 (manifest "build_device"); used only on that same device+driver
    DIR/weights/<n>.q.npy, .d.npy   opencl-adreno: each weight the profile re-lays out, already
                                 in the SoA layout (manifest "relaid_weights": name -> layout and
                                 files): q uint32 [K/per_u32, M], d uint16 half bits [K/32, M]

An opencl-adreno artifact is written without an Adreno device (sources and plans only); on run
it refuses a non-Adreno device. Its kernels need cl_khr_fp16 and subgroups, so it cannot run on
PoCL; the profile option "adreno-emulated" writes the same layout with kernels that can (tests).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ember.artifact.format import MANIFEST, ArtifactError, read_json
from ember.backends.binary_cache import marked, unmarked
from ember.artifact.session import artifact_session, load_array, open_model, step_key
from ember.errors import BackendUnavailable
from ember.target import get_target


def profiles_of(target: str) -> tuple[str, ...]:
    """The OpenCL profiles an artifact of target may be written with: the target's own, and for
    Adreno also the emulated one (the same layout with kernels any OpenCL 1.2 device runs)."""
    profile = get_target(target).profile
    return (profile, "adreno-emulated") if profile == "adreno" else (profile,)


class Writer:
    native = False          # no native runtime for this target yet

    def __init__(self, target: str, progress=None, device=None, profile: str | None = None,
                 profile_options: dict | None = None, cache_dir=None):
        from ember.backends.opencl.device import choose_profile, select_device
        from ember.codegen.opencl import layout_pass
        from ember.codegen.opencl_plan import adreno_generation, adreno_profile, generic_profile
        names = profiles_of(target)
        profile = profile or names[0]
        if profile not in names:
            raise ArtifactError(f"compile: target {target} takes profile {' or '.join(names)}, not {profile!r}")
        self.relaid: dict[str, dict] = {}
        options = dict(profile_options or {})
        try:
            _, info = select_device(device)
        except BackendUnavailable as e:
            if device is not None:
                raise
            info, why = None, str(e)
        # A build device is one that can run the profile's kernels: binaries are stored for it.
        if info is not None and profile == "adreno" and adreno_generation(info.name) is None:
            info, why = None, f"the OpenCL device here ({info.name}) is not an Adreno GPU"
        if info is not None:
            try:
                self.profile = choose_profile(info, profile, **options)
            except BackendUnavailable as e:
                info, why = None, str(e)
        if info is None:
            self.profile = generic_profile() if profile == "generic" else \
                adreno_profile(emulated=profile == "adreno-emulated")
            self.profile = dataclasses.replace(self.profile, **options) if options else self.profile
            if progress:
                progress(f"no build device ({why}): writing OpenCL sources and plans without binaries")
        self.info = info
        # The pipeline ends with the profile's own layout pass: its thresholds (profile_options)
        # decide which weights this artifact lays out; the renderer runs no pass itself.
        self.layout = layout_pass(self.profile)
        self.backend = None
        if info is not None:
            from ember.backends.opencl.backend import OpenCLBackend
            self.backend = OpenCLBackend(device=info.index, profile=self.profile, cache_dir=cache_dir)

    def supports_op(self, node) -> tuple[bool, str]:
        from ember.codegen.opencl import supports_node
        return supports_node(node)

    def begin(self, tmp: Path) -> dict:
        return {}

    def step(self, tmp: Path, name: str, graph):
        from ember.codegen.opencl import render_graph
        program = render_graph(graph, self.profile)
        plan = program.launch_plan()
        for j, node in enumerate(program.constants):
            if node.attr("value") is not None:   # a literal: not in the GGUF, kept in the plan
                plan["constants"][j]["value"] = graph.constant_data(node).tolist()
        for j, layout in program.layouts.items():
            self._save_relaid(tmp, program.constants[j], graph, layout)
        (tmp / f"{name}.cl").write_text(program.source)
        (tmp / f"{name}.plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        entry = {"source": f"{name}.cl", "plan": f"{name}.plan.json", "build_options": program.build_options,
                 "kernels": [k.name for k in program.kernels]}
        if self.backend is not None:
            import pyopencl as cl
            built = self.backend.cache.build(program, name=f"graph {graph.name!r}")
            (tmp / f"{name}.bin").write_bytes(marked(built.get_info(cl.program_info.BINARIES)[0], program.source))
            entry["binary"] = f"{name}.bin"
        return entry, len(program.kernels), program.graph, {program.constants[j].name for j in program.layouts}

    def _save_relaid(self, tmp: Path, node, graph, layout) -> None:
        from ember.codegen.opencl_plan import relayout_weight
        if node.name in self.relaid:
            if self.relaid[node.name]["layout"] != layout.to_json():
                raise ArtifactError(f"compile: weight {node.name!r} is laid out differently by two steps")
            return
        (tmp / "weights").mkdir(exist_ok=True)
        stem = f"weights/{len(self.relaid):03d}"
        entry = {"layout": layout.to_json()}
        for part, data in relayout_weight(graph.constant_data(node), layout).items():
            np.save(tmp / f"{stem}.{part}.npy", data, allow_pickle=False)
            entry[part] = f"{stem}.{part}.npy"
        self.relaid[node.name] = entry

    def finish(self, tmp: Path) -> dict:
        device = None
        if self.info is not None:
            device = {"name": self.info.name, "identity": self.info.identity, "description": self.info.describe()}
        return {"profile": self.profile.to_json(), "build_device": device, "relaid_weights": self.relaid}


def _profile_from_json(data: dict):
    from ember.codegen.opencl_plan import Profile
    return Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _opencl_backend_class():
    from ember.backends.opencl.backend import OpenCLBackend

    class ArtifactOpenCLBackend(OpenCLBackend):
        """Runs an artifact's stored plans; compiles nothing."""

        def compile(self, graph, **options):
            raise ArtifactError(f"graph {graph.name!r}: an artifact session does not compile")

    return ArtifactOpenCLBackend


def load(folder: Path, manifest: dict, model_path=None, threads: int | None = None):
    from ember.backends.opencl.device import profile_requirements, select_device
    from ember.backends.opencl.loader import PlanExecutable
    from ember.codegen.opencl_plan import adreno_generation
    path = folder / MANIFEST
    target, profile = manifest["target"], _profile_from_json(manifest["profile"])
    try:
        _, info = select_device(None)
    except BackendUnavailable as e:
        raise ArtifactError(f"{path}: target {target} needs an OpenCL device, but the opencl backend is "
                            f"unavailable: {e}") from None
    if profile.name == "adreno" and adreno_generation(info.name) is None:
        raise ArtifactError(f"{path}: compiled for Adreno GPUs (target {target}, {profile.generation}); this "
                            f"OpenCL device is {info.name} ({info.platform}), not an Adreno: compile with "
                            "--target opencl-generic for it")
    missing = profile_requirements(profile, info)
    if missing:
        raise ArtifactError(f"{path}: profile {profile.name} needs {', '.join(missing)}, which the OpenCL "
                            f"device {info.name} lacks")
    backend = _opencl_backend_class()(device=info.index, profile=profile)
    model, data = open_model(folder, manifest, model_path)
    relaid = {name: {part: load_array(folder / w[part]) for part in ("q", "d")}
              for name, w in manifest["relaid_weights"].items()}
    same_device = (manifest.get("build_device") or {}).get("identity") == info.identity
    steps = {}
    for step in manifest["steps"]:
        plan_path = folder / step["plan"]
        plan = read_json(plan_path)
        if plan.get("build_options") != step["build_options"]:
            raise ArtifactError(f"{plan_path}: build options {plan.get('build_options')!r} differ from the "
                                f"manifest's {step['build_options']!r}")
        binary = (folder / step["binary"]).read_bytes() if same_device and "binary" in step else None
        source = (folder / step["source"]).read_text()
        if binary is not None:
            # a binary of another program (steps swapped in the manifest) would crash the driver
            binary = unmarked(binary, source)
            if binary is None:
                raise ArtifactError(f"{folder / step['binary']}: not built from {folder / step['source']} "
                                    f"(its source mark differs): refusing to load it")
        try:
            exe = PlanExecutable(backend, Path(step["source"]).stem, plan, source, data, relaid, binary)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{plan_path}: corrupt: malformed launch plan ({e!r})") from None
        steps[step_key(step)] = exe
    return model, artifact_session(folder, manifest, model, backend, steps)


def writer(target: str, backend=None, progress=None, **options) -> Writer:
    """Options: device (index or part of a name, for the build device), profile (opencl-adreno:
    "adreno" or "adreno-emulated"), profile_options (Profile fields, e.g. soa_min_rows),
    cache_dir."""
    if backend is not None:
        raise ArtifactError(f"compile: target {target} makes its own backend")
    return Writer(target, progress=progress, **options)


def check_host(manifest: dict, path: Path) -> None:
    """The device is checked when loading (an OpenCL device is needed then, not now)."""


def manifest_files(manifest: dict) -> list[str]:
    return [w[part] for w in manifest["relaid_weights"].values() for part in ("q", "d")]
