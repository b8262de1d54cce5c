"""The vulkan target's artifacts: what a step stores and how it is loaded without ember's
compiler (no passes, no shader compiler).

    DIR/steps/<shape>.plan.json  the launch plan; each shader names its .spv and its sha256
    DIR/spirv/<sha256>.spv       SPIR-V, shared by the steps that use the same shader
    DIR/steps/<shape>.aux<j>.bin the renderer's tables (for a runtime without the renderer)

Loading renders each stored graph again and requires the stored plan to equal the rendering
(GLSL text, not SPIR-V).
"""
from __future__ import annotations

import json
from pathlib import Path

from ember.artifact.format import MANIFEST, ArtifactError, read_json
from ember.artifact.session import artifact_session, open_model, step_graph, step_key
from ember.errors import BackendUnavailable, EmberError


class Writer:
    layout = None

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

    def supports_op(self, node) -> tuple[bool, str]:
        from ember.codegen.vulkan import supports_node
        return supports_node(node, self.caps)

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


def load(folder: Path, manifest: dict, model_path=None, threads: int | None = None):
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
        plan = read_json(plan_path)
        blobs = {rel: (folder / rel).read_bytes() for rel in step["shaders"]}
        try:
            exe = backend.load_executable(step_graph(folder, step, data), plan, blobs)
        except EmberError as e:
            raise ArtifactError(f"{plan_path}: {e}") from None
        steps[step_key(step)] = exe
    return model, artifact_session(folder, manifest, model, backend, steps)


def writer(target: str, backend=None, progress=None, **options) -> Writer:
    """Options: device, features ("device", "baseline", or "portable": no device needed),
    cache_dir."""
    if backend is not None:
        raise ArtifactError("compile: target vulkan makes its own backend")
    return Writer(progress=progress, **options)


def check_host(manifest: dict, path: Path) -> None:
    """The device is checked when loading (a Vulkan device is needed then, not now)."""


def manifest_files(manifest: dict) -> list[str]:
    return []

