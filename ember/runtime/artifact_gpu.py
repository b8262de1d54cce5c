"""GPU artifacts: what `ember compile --target opencl-generic|opencl-adreno|vulkan` stores per
step, and loading it without ember's compiler (no passes, no template rendering for OpenCL, no
shader compiler for Vulkan). The manifest, the step shapes, the derived constants, the checksums
and the atomic replacement are ember.runtime.artifact's; this module adds, per target:

OpenCL (both profiles)
    DIR/steps/<shape>.ir         the optimized step graph (for people and tools; not read to run)
    DIR/steps/<shape>.cl         the program source; the step's manifest entry lists its kernels
                                 and its build options
    DIR/steps/<shape>.plan.json  the launch plan (ember.codegen.opencl launch_plan(): buffers,
                                 constants by name and layout, launches with their arguments)
    DIR/steps/<shape>.bin        the program built for the build device, when there was one
                                 (manifest "build_device"); used only on that same device+driver
    DIR/weights/<n>.q.npy, .d.npy   opencl-adreno: each weight the profile re-lays out, already
                                 in the SoA layout (manifest "relaid_weights": name -> layout and
                                 files): q uint32 [K/per_u32, M], d uint16 half bits [K/32, M]
Vulkan
    DIR/steps/<shape>.ir         the step graph (loading renders it again and requires the
                                 stored plan to equal the rendering: GLSL text, not SPIR-V)
    DIR/steps/<shape>.plan.json  the launch plan; each shader names its .spv and its sha256
    DIR/spirv/<sha256>.spv       SPIR-V, shared by the steps that use the same shader
    DIR/steps/<shape>.aux<j>.bin the renderer's tables (for a runtime without the renderer)

An opencl-adreno artifact is written without an Adreno device (sources and plans only); on run
it refuses a non-Adreno device. Its kernels need cl_khr_fp16 and subgroups, so it cannot run on
PoCL; the profile option "adreno-emulated" writes the same layout with kernels that can (tests).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ember.errors import BackendUnavailable, EmberError
from ember.runtime.artifact import (MANIFEST, ArtifactError, artifact_session, open_model, step_graph)

OPENCL_PROFILES = {"opencl-generic": ("generic",), "opencl-adreno": ("adreno", "adreno-emulated")}


def gpu_writer(target: str, progress=None, **options):
    """The writer of a GPU target (see compile_artifact). Options: opencl: device (index or part
    of a name, for the build device), profile (opencl-adreno: "adreno" or "adreno-emulated"),
    profile_options (Profile fields, e.g. soa_min_rows); vulkan: device, features ("device",
    "baseline", or "portable": no device needed), cache_dir."""
    if target == "vulkan":
        return _VulkanWriter(progress=progress, **options)
    return _OpenCLWriter(target, progress=progress, **options)


# ---- OpenCL ------------------------------------------------------------------------------------
class _OpenCLWriter:
    def __init__(self, target: str, progress=None, device=None, profile: str | None = None,
                 profile_options: dict | None = None, cache_dir=None):
        from ember.backends.opencl.device import choose_profile, select_device
        from ember.codegen.opencl_plan import adreno_generation, adreno_profile, generic_profile
        names = OPENCL_PROFILES[target]
        profile = profile or names[0]
        if profile not in names:
            raise ArtifactError(f"compile: target {target} takes profile {' or '.join(names)}, not {profile!r}")
        self.pipeline = target
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
        self.backend = None
        if info is not None:
            from ember.backends.opencl.backend import OpenCLBackend
            self.backend = OpenCLBackend(device=info.index, profile=self.profile, cache_dir=cache_dir)

    def begin(self, tmp: Path) -> dict:
        return {}

    def step(self, tmp: Path, name: str, graph):
        from ember.codegen.opencl import layout_pass, render_graph
        # The pipeline's layout-adreno has the default thresholds; the profile's own (profile_options)
        # decide which weights this artifact lays out, and the renderer runs no pass itself.
        layouts = layout_pass(self.profile)
        if layouts is not None:
            graph = layouts(graph)
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
            (tmp / f"{name}.bin").write_bytes(built.get_info(cl.program_info.BINARIES)[0])
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


def _load_opencl(folder: Path, manifest: dict, model_path):
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
    relaid = {name: {part: np.load(folder / w[part], mmap_mode="r", allow_pickle=False) for part in ("q", "d")}
              for name, w in manifest["relaid_weights"].items()}
    same_device = (manifest.get("build_device") or {}).get("identity") == info.identity
    steps = {}
    for step in manifest["steps"]:
        plan_path = folder / step["plan"]
        plan = _read_json(plan_path)
        if plan.get("build_options") != step["build_options"]:
            raise ArtifactError(f"{plan_path}: build options {plan.get('build_options')!r} differ from the "
                                f"manifest's {step['build_options']!r}")
        binary = (folder / step["binary"]).read_bytes() if same_device and "binary" in step else None
        source = (folder / step["source"]).read_text()
        try:
            exe = PlanExecutable(backend, Path(step["source"]).stem, plan, source, data, relaid, binary)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{plan_path}: corrupt: malformed launch plan ({e!r})") from None
        steps[(step["n_tokens"], step["n_kv"], step["n_outputs"])] = exe
    return model, artifact_session(folder, manifest, model, backend, steps)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt: not valid JSON ({e})") from None


# ---- Vulkan ------------------------------------------------------------------------------------
class _VulkanWriter:
    pipeline = "vulkan"

    def __init__(self, device=None, features: str = "device", cache_dir=None, progress=None):
        """features: "device" or "baseline" (for the Vulkan device here), or "portable": no
        device needed, shaders for any Vulkan 1.1 device (PORTABLE_CAPS; glslc still needed)."""
        from ember.backends.vulkan.backend import VulkanBackend
        from ember.codegen.vulkan_plan import PORTABLE_CAPS
        self.portable = features == "portable"
        self.backend = VulkanBackend(device=device, features="baseline" if self.portable else features,
                                     cache_dir=cache_dir)
        if self.portable:
            if self.backend.spirv_cache.glslc is None:
                raise ArtifactError("compile: target vulkan needs the shader compiler glslc "
                                    "(Debian/Ubuntu: `apt-get install glslc`)")
            self.caps = PORTABLE_CAPS
        else:
            try:
                self.backend.require_available()
            except BackendUnavailable as e:
                raise ArtifactError(f"compile: {e}; `--portable` compiles for any Vulkan 1.1 device "
                                    "without one") from None
            self.caps = self.backend.caps
        self.spirv: set[str] = set()

    def begin(self, tmp: Path) -> dict:
        (tmp / "spirv").mkdir()
        return {}

    def step(self, tmp: Path, name: str, graph):
        from ember.backends.vulkan.compiler import export_graph
        from ember.codegen.vulkan import supports_node
        for node in graph.nodes:
            ok, why = supports_node(node, self.caps)
            if not ok:
                raise ArtifactError(f"compile: vulkan cannot run {node.op} of graph {graph.name!r}: {why}")
        blobs, plan = export_graph(graph, self.caps, self.backend.spirv_cache)
        shaders = sorted({s["file"] for s in plan["shaders"]})
        for file in shaders:
            if file not in self.spirv:
                (tmp / file).write_bytes(blobs[file])
                self.spirv.add(file)
        # The renderer numbers its tables per program: stored per step, the plan renamed to match.
        aux = []
        for j, entry in enumerate(plan["regions"]["aux"]):
            rel = f"{name}.aux{j}.bin"
            (tmp / rel).write_bytes(blobs[entry["file"]])
            entry["file"] = rel
            aux.append(rel)
        (tmp / f"{name}.plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        return {"plan": f"{name}.plan.json", "shaders": shaders, "aux": aux}, len(plan["shaders"]), graph, set()

    def finish(self, tmp: Path) -> dict:
        device = "none (portable)" if self.portable else self.backend.device.name
        return {"build_device": {"name": device}, "caps": self.caps.to_json()}


def _vulkan_backend_class():
    from ember.backends.vulkan.backend import VulkanBackend

    class ArtifactVulkanBackend(VulkanBackend):
        """Runs an artifact's SPIR-V: needs the device, not glslc; compiles nothing."""

        def available(self) -> tuple[bool, str]:
            try:
                self.device
            except BackendUnavailable as e:
                return False, str(e)
            return True, ""

        def compile(self, graph, **options):
            raise ArtifactError(f"graph {graph.name!r}: an artifact session does not compile")

    return ArtifactVulkanBackend


def _load_vulkan(folder: Path, manifest: dict, model_path):
    path = folder / MANIFEST
    try:
        backend = _vulkan_backend_class()()
    except BackendUnavailable as e:
        raise ArtifactError(f"{path}: target vulkan needs a Vulkan device, but {e}") from None
    ok, why = backend.available()
    if not ok:
        raise ArtifactError(f"{path}: target vulkan needs a Vulkan device, but the vulkan backend is "
                            f"unavailable: {why}")
    model, data = open_model(folder, manifest, model_path)
    steps = {}
    for step in manifest["steps"]:
        plan_path = folder / step["plan"]
        plan = _read_json(plan_path)
        blobs = {rel: (folder / rel).read_bytes() for rel in step["shaders"]}
        try:
            exe = backend.load_executable(step_graph(folder, step, data), plan, blobs)
        except EmberError as e:
            raise ArtifactError(f"{plan_path}: {e}") from None
        steps[(step["n_tokens"], step["n_kv"], step["n_outputs"])] = exe
    return model, artifact_session(folder, manifest, model, backend, steps)


def load_gpu_artifact(folder: Path, manifest: dict, model_path=None):
    """(model, ArtifactSession) of a checked GPU artifact (read_manifest has verified it)."""
    try:
        if manifest["target"] == "vulkan":
            return _load_vulkan(folder, manifest, model_path)
        return _load_opencl(folder, manifest, model_path)
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{folder / MANIFEST}: corrupt: malformed manifest ({e!r})") from None
