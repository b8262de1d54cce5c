"""The Vulkan backend itself (on whatever Vulkan device is here; lavapipe on the CI machines):
the fallback kernels (no 8/16-bit storage, no subgroups, no texel buffers) against the
conformance cases, weights bound in row ranges, one command buffer reused across runs, the
pipeline cache, launch plans run without glslc, and a host without a Vulkan driver (what every
executable does is tested over every backend in test_executable.py). The default model against the CPU backend and the reference is slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devices import make_backend
from ember.backends import get_backend
from ember.backends.vulkan.compiler import export_graph
from ember.errors import EmberError
from ember.ir import GraphBuilder, run_reference
from ember.testing import nmse
from test_conformance import SCALAR_CASES, check

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vulkan(backend_cache):
    return make_backend("vulkan", backend_cache)


@pytest.fixture(scope="module")
def baseline(backend_cache):
    return make_backend("vulkan", backend_cache, features="baseline")


def weights_graph(name="weights", rows=300, T=5):
    rng = np.random.default_rng(3)
    b = GraphBuilder(name)
    x = b.input("x", "f32", (T, 64))
    idx = b.input("idx", "i32", (4,))
    w = b.weight("w", rng.standard_normal((rows, 64)), "q8_0")
    table = b.weight("table", rng.standard_normal((rows, 64)), "q4_0")
    return b.build([b.mul_mat(x, w), b.get_rows(table, idx)])


def weights_inputs(graph, rows=300, T=5):
    rng = np.random.default_rng(4)
    return {"x": rng.standard_normal((T, 64)).astype(np.float32),
            "idx": np.array([0, rows - 1, 7, rows // 2], np.int32)}


# ---- kernels without optional features ---------------------------------------------------------
@pytest.mark.parametrize("c", SCALAR_CASES, ids=[c.id for c in SCALAR_CASES])
def test_baseline_features_conformance(baseline, c):
    """The fallbacks every Vulkan 1.1 device runs: bytes and halves as bits of words, reductions
    in shared memory, weights through storage buffers."""
    check(baseline, c, scalar_only=True)


def test_baseline_caps_leave_out_optional_features(baseline):
    caps = baseline.caps
    assert not (caps.storage8 or caps.storage16 or caps.subgroup_size or caps.texel_buffers)


# ---- bindings in ranges ------------------------------------------------------------------------
@pytest.mark.parametrize("features", ["device", "baseline"])
def test_weights_bigger_than_a_binding_run_in_row_ranges(backend_cache, features):
    """maxStorageBufferRange made small: the 20 KB weights go in ranges of rows, x and y in
    ranges of tokens, as the 170 MB embedding of the default model does on lavapipe."""
    backend = make_backend("vulkan", backend_cache, features=features, max_binding_bytes=2048)
    graph = weights_graph(T=40)
    exe = backend.compile(graph)
    counts = {op: sum(d.op == op for d in exe.program.dispatches) for op in ("mul_mat", "get_rows")}
    assert counts["mul_mat"] > 4 and counts["get_rows"] > 4
    inputs = weights_inputs(graph, T=40)
    got, expected = exe.run(inputs), run_reference(graph, inputs)
    assert nmse(got[0], expected[0]) < 1e-3
    np.testing.assert_array_equal(got[1], expected[1])


# ---- running -----------------------------------------------------------------------------------
def test_one_command_buffer_is_recorded_and_resubmitted(vulkan):
    graph = weights_graph("resubmit")
    exe = vulkan.compile(graph)
    command_buffer = exe._command_buffer
    for seed in range(3):
        inputs = weights_inputs(graph)
        inputs["x"] = np.random.default_rng(seed).standard_normal((5, 64)).astype(np.float32)
        got, expected = exe.run(inputs), run_reference(graph, inputs)
        assert nmse(got[0], expected[0]) < 1e-3
    assert exe._command_buffer is command_buffer


def test_pipeline_cache_is_written_to_disk(vulkan, backend_cache):
    vulkan.compile(weights_graph("pipelines"))
    files = list((Path(backend_cache) / "vulkan").glob("pipelines-*.bin"))
    assert files and files[0].stat().st_size > 0


def test_plan_and_spirv_run_without_glslc(vulkan, backend_cache):
    graph = weights_graph("deployed")
    blobs, plan = export_graph(graph, vulkan.caps, vulkan.spirv_cache)
    plan = json.loads(json.dumps(plan))
    deployed = get_backend("vulkan", cache_dir=backend_cache, glslc="ember-no-such-glslc")
    assert not deployed.available()[0]               # cannot compile, ...
    exe = deployed.load_executable(graph, plan, blobs)   # ... but runs what was compiled
    inputs = weights_inputs(graph)
    assert nmse(exe.run(inputs)[0], run_reference(graph, inputs)[0]) < 1e-3
    name = plan["shaders"][0]["file"]
    with pytest.raises(EmberError, match="checksum"):
        deployed.load_executable(graph, plan, dict(blobs, **{name: blobs[name][:-4] + b"\0\0\0\0"}))
    plan["dispatches"][0]["push"] = "00" + plan["dispatches"][0]["push"][2:]
    with pytest.raises(EmberError, match="does not match"):
        deployed.load_executable(graph, plan, blobs)


def test_profile_times_every_dispatch(vulkan):
    graph = weights_graph("profile")
    exe = vulkan.compile(graph)
    times = exe.profile(weights_inputs(graph))
    assert [op for op, _, _ in times] == [d.op for d in exe.program.dispatches]
    assert all(s > 0 for _, _, s in times)


def test_no_vulkan_driver_is_reported_as_unavailable(tmp_path):
    """No ICD: the backend says so and what to install; the registry lists it as unavailable."""
    code = ("from ember.backends import get_backend, available_backends\n"
            "ok, why = get_backend('vulkan').available()\n"
            "print(ok); print(why); print(available_backends())\n")
    env = dict(os.environ, VK_ICD_FILENAMES=str(tmp_path / "none.json"), VK_DRIVER_FILES=str(tmp_path / "none.json"),
               XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    ok, why, names = out.stdout.splitlines()[:3]
    assert ok == "False"
    assert "vulkan backend" in why and "mesa-vulkan-drivers" in why
    assert "vulkan" not in names


# ---- the default model -------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_logits_match_the_cpu_backend_and_the_reference(vulkan):
    """Gemma 3 270M (Q4_K_M), a short prompt and two decode steps: the CPU backend's top token,
    logits within NMSE 3e-2 of the CPU backend's (which quantizes activations to 8 bits for its
    quantized matmuls and sits 0.5e-2..1.1e-2 from the reference) and within 1e-5 of the NumPy
    reference interpreter (Vulkan keeps activations in f32: ~2e-8 measured)."""
    from ember.models import load_model
    from ember.models.default_model import default_model_path
    from ember.passes import pipeline_for
    from ember.runtime.session import Session, SessionOptions
    try:
        model = load_model(default_model_path(progress=None))
    except EmberError as e:
        pytest.skip(str(e))
    tokens = [2, 9259, 1902, 563, 496, 1618, 236761]
    results = {}
    for name, backend in (("vulkan", vulkan), ("cpu", get_backend("cpu"))):
        session = Session(model, backend, SessionOptions(n_ctx=256))
        results[name] = [session.eval(tokens, all_logits=True), session.eval([1234]), session.eval([567])]
    for got, expected in zip(results["vulkan"], results["cpu"]):
        assert nmse(got, expected) < 3e-2
        np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))

    step = pipeline_for("vulkan")(model.build_step(1, 256, 1))
    inputs = {"tokens": np.array([1234], np.int32), "pos": np.array([3], np.int32),
              "slots": np.array([3], np.int32), "out_ids": np.array([0], np.int32)}
    visible = np.arange(256) <= 3
    inputs["mask"] = inputs["mask_swa"] = np.where(visible, 0.0, -np.inf).astype(np.float32)[None]
    rng = np.random.default_rng(0)
    for node in step.inputs:
        if node.name not in inputs:
            inputs[node.name] = (rng.standard_normal(node.shape) * visible[:, None]).astype(np.float16)
    exe = vulkan.compile(step)
    assert nmse(exe.run(inputs)[0], run_reference(step, inputs)[0]) < 1e-5
    # the embedding (170 MB of q8_0) is wider than one storage binding: get_rows reads it in
    # row ranges (the output head reads it whole, through a texel buffer)
    assert sum(d.op == "get_rows" and "token_embd" in d.label for d in exe.program.dispatches) == 2
