"""The OpenCL backend itself (on whatever OpenCL device is here, PoCL in CI): the program-binary
cache, build errors, device and profile selection, the no-platform message, weights uploaded
once, arguments bound once, and the launch plan replayed from its JSON alone. What every
executable does is tested over every backend in test_executable.py."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ember.backends.opencl.backend import OpenCLBackend
from ember.codegen import opencl, opencl_plan
from ember.codegen.opencl import compile_plan, layout_pass
from ember.codegen.opencl_plan import relayout_weight
from ember.errors import BackendUnavailable, CompileError, EmberError
from ember.ir import GraphBuilder, run_reference
from ember.ir.interpreter import random_inputs
from ember.testing import nmse

_probe = OpenCLBackend()
_ok, _why = _probe.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"opencl: unavailable: {_why}")


@pytest.fixture(scope="module")
def ocl(tmp_path_factory):
    """A backend whose binary cache the tests of this module share."""
    return OpenCLBackend(cache_dir=tmp_path_factory.mktemp("opencl-cache"))


@pytest.fixture
def fresh(tmp_path):
    """A backend with an empty binary cache of its own."""
    return OpenCLBackend(cache_dir=tmp_path)


def small_graph(name="small", weight=None):
    b = GraphBuilder(name)
    x = b.input("x", "f32", (3, 32))
    w = b.weight("w", np.random.default_rng(0).standard_normal((8, 32)), "q8_0") if weight is None \
        else b.const("w", weight)
    return b.build(b.rms_norm(b.silu(b.mul_mat(x, w))))


def check(exe, graph, inputs=None, bound=1e-7):
    inputs = inputs or random_inputs(graph)
    for got, want in zip(exe.run(inputs), run_reference(graph, inputs)):
        assert nmse(got, want) <= bound


# ---- the binary cache --------------------------------------------------------------------------
def test_second_compile_hits_the_binary_cache(fresh):
    graph = small_graph("hit")
    fresh.compile(graph)
    assert (fresh.cache.builds, fresh.cache.hits) == (1, 0)
    exe = fresh.compile(graph)
    assert (fresh.cache.builds, fresh.cache.hits) == (1, 1)
    check(exe, graph)
    leftovers = [p.name for p in fresh.cache.directory.rglob("*") if p.name.startswith(".build-")]
    assert leftovers == []


def test_cache_key_covers_source_options_device_and_format(fresh, monkeypatch):
    cache = fresh.cache
    key = cache.key("src", "-cl-std=CL1.2")
    assert key != cache.key("src2", "-cl-std=CL1.2") != cache.key("src", "-cl-std=CL2.0")
    assert fresh.info.driver in fresh.info.identity and fresh.info.name in fresh.info.identity
    from ember.backends.opencl import compiler
    monkeypatch.setattr(compiler, "FORMAT_VERSION", compiler.FORMAT_VERSION + 1)
    assert cache.key("src", "-cl-std=CL1.2") != key


@pytest.mark.parametrize("damage", ["bytes", "bytes-and-checksum"])
def test_a_corrupt_cache_entry_is_rebuilt(fresh, damage):
    graph = small_graph(f"corrupt-{damage}")
    fresh.compile(graph)
    program = fresh.render(graph)
    path = fresh.cache.path(fresh.cache.key(program.source, program.build_options))
    garbage = b"not a program binary" + bytes(64)
    path.write_bytes(garbage)
    if damage == "bytes-and-checksum":    # a valid checksum of garbage: the driver refuses it
        path.with_suffix(".sha256").write_text(hashlib.sha256(garbage).hexdigest())
    exe = fresh.compile(graph)
    assert (fresh.cache.builds, fresh.cache.hits) == (2, 0)
    assert path.read_bytes() != garbage
    check(exe, graph)


def test_a_build_failure_names_kernel_template_parameters_and_log(fresh, monkeypatch):
    monkeypatch.setitem(opencl.ELTWISE_CL, "neg", "-a +* no_such_name")
    b = GraphBuilder("broken")
    x = b.input("x", "f32", (3, 5))
    graph = b.build(b.neg(b.exp(x)))
    with pytest.raises(CompileError) as info:
        fresh.compile(graph)
    message = str(info.value)
    assert "building graph 'broken' failed (profile generic" in message
    assert "kernel k1_neg" in message and "k0_exp" not in message
    assert "template eltwise.cl.j2" in message and "expr=-a +* no_such_name" in message
    assert "first used by %" in message and "neg(%" in message
    assert "compiler log:" in message and "no_such_name" in info.value.log


# ---- devices and profiles ----------------------------------------------------------------------
def test_no_platform_is_a_clear_message(tmp_path):
    code = ("from ember.backends import get_backend, available_backends\n"
            "b = get_backend('opencl')\nprint(b.available())\nprint(available_backends())\n"
            "try:\n    b.compile(None)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = dict(os.environ, OCL_ICD_VENDORS=str(tmp_path))      # an empty folder: no ICD
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    available, backends, error = out.stdout.splitlines()
    assert available.startswith("(False, 'no OpenCL platform found") and "pocl-opencl-icd" in available
    assert "'opencl'" not in backends
    assert error.startswith("BackendUnavailable opencl backend unavailable: no OpenCL platform found")


def test_device_by_name_or_index():
    name = _probe.info.name
    assert OpenCLBackend(device=name[:6].upper()).info.name == name
    assert OpenCLBackend(device=_probe.info.index).info.name == name
    ok, reason = OpenCLBackend(device="no-such-gpu").available()
    assert not ok and "no OpenCL device matches 'no-such-gpu'" in reason and name in reason


def test_unknown_profile_is_an_error():
    with pytest.raises(EmberError, match="unknown profile 'mali'"):
        OpenCLBackend(profile="mali")


def test_auto_profile_and_what_a_device_lacks():
    info = _probe.info
    if opencl_plan.adreno_generation(info.name) is None:
        assert _probe.profile.name == "generic" and _probe.profile.fp64 == info.fp64
    native = OpenCLBackend(profile="adreno")
    ok, reason = native.available()
    if not (info.fp16 and info.subgroups):
        assert not ok and "profile 'adreno' needs" in reason
        assert ("cl_khr_fp16" in reason) != info.fp16 and ("cl_khr_subgroups" in reason) != info.subgroups
        with pytest.raises(BackendUnavailable, match="needs"):
            native.compile(small_graph())
    if info.image_support:      # the emulated Adreno profile needs images only
        assert OpenCLBackend(profile="adreno-emulated").available() == (True, "")


def test_supports_op_names_what_is_too_big():
    b = GraphBuilder("big")
    node = b.neg(b.input("x", "f32", (2 ** 16, 2 ** 15 + 1)))
    ok, reason = _probe.supports_op(node)
    assert not ok and "bytes" in reason
    with pytest.raises(EmberError, match=r"%\w+ \(neg : f32\[65536, 32769\]\) is not supported"):
        _probe.require_supported(b.build(node))


# ---- running -----------------------------------------------------------------------------------
def test_a_reused_graph_only_uploads_its_inputs(ocl, monkeypatch):
    import pyopencl as cl
    weight = np.random.default_rng(3).standard_normal((8, 32)).astype(np.float32)
    first = ocl.compile(small_graph("first", weight))
    uploads = ocl.weights.uploads
    second = ocl.compile(small_graph("second", weight))      # the same weight array: no new upload
    assert ocl.weights.uploads == uploads
    for exe in (first, second):                # a first run sets the kernels' arguments, once
        check(exe, exe.graph)
    copies, set_args = [], []
    real_copy = cl.enqueue_copy
    monkeypatch.setattr(cl, "enqueue_copy", lambda q, dst, src, **kw: copies.append(
        "up" if isinstance(src, np.ndarray) else "down") or real_copy(q, dst, src, **kw))
    monkeypatch.setattr(cl.Kernel, "set_args", lambda *a: set_args.append(a))
    for exe in (first, second, first):
        copies.clear()
        check(exe, exe.graph)
        assert copies == ["up", "down"]       # x in, y out; the weight and the arguments stay
    assert set_args == []


# ---- the launch plan, replayed from JSON -------------------------------------------------------
def replay(plan_json: str, constants: dict, inputs: list, backend: OpenCLBackend) -> list:
    """Run a compile_plan() result with nothing but pyopencl: what an artifact runtime does."""
    import pyopencl as cl
    plan = json.loads(plan_json)
    p, ctx, queue, device = plan["plan"], backend.context, backend.queue, backend._select()[0]
    program = cl.Program(ctx, plan["source"]).build(plan["build_options"], devices=[device])
    flags = cl.mem_flags
    ins = [cl.Buffer(ctx, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=a) for a in inputs]
    outs = [cl.Buffer(ctx, flags.READ_WRITE, max(4, int(np.prod(o["shape"])) * 4)) for o in p["outputs"]]
    arena = cl.Buffer(ctx, flags.READ_WRITE, max(4, p["arena_bytes"]))
    status = cl.Buffer(ctx, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=np.zeros(1, np.int32))
    consts = []
    for c in p["constants"]:
        data = constants[c["name"]]
        if c["layout"] is None:
            consts.append({"": cl.Buffer(ctx, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=data)})
            continue
        layout = opencl_plan.WeightLayout(**c["layout"])
        parts = {k: cl.Buffer(ctx, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=v)
                 for k, v in relayout_weight(data, layout).items()}
        for fmt, order, n in (("r32ui", cl.channel_order.R, layout.texels),
                              ("rgba32ui", cl.channel_order.RGBA, layout.texels // 4)):
            parts[f"img_{fmt}"] = cl.create_image(ctx, flags.READ_ONLY, cl.ImageFormat(
                order, cl.channel_type.UNSIGNED_INT32), shape=(n,), buffer=parts["q"])
        consts.append(parts)
    regions = {"in": ins, "out": outs, "arena": [arena]}
    for launch in p["launches"]:
        args = []
        for a in launch["args"]:
            if a["kind"] == "buffer":
                mem = consts[a["index"]][a["part"]] if a["region"] == "const" else regions[a["region"]][a["index"]]
                args += [mem, np.uint32(a["offset"])]
            elif a["kind"] == "image":
                args.append(consts[a["index"]][f"img_{a['format']}"])
            else:
                args += [status, np.int32(a["code"])]
        kernel = cl.Kernel(program, launch["kernel"])
        kernel.set_args(*args)
        cl.enqueue_nd_range_kernel(queue, kernel, launch["global"], launch["local"])
    results = []
    for o, buf in zip(p["outputs"], outs):
        host = np.empty(o["shape"], np.float32)
        cl.enqueue_copy(queue, host, buf)
        results.append(host)
    return results


@pytest.mark.filterwarnings("ignore::pyopencl.CompilerWarning")
@pytest.mark.parametrize("profile", ["generic", "adreno-emulated"])
def test_the_launch_plan_alone_runs_the_graph(ocl, profile):
    rng = np.random.default_rng(4)
    b = GraphBuilder("plan")
    w = b.weight("w", rng.standard_normal((64, 64)), "q8_0")
    x = b.input("x", "f32", (3, 64))
    h = b.rms_norm_mul(x, b.weight("g", rng.standard_normal(64)), eps=1e-6)
    graph = b.build(b.mul_mat(h, w), b.get_rows(w, b.input("i", "i32", (2,))), b.mul_mat(b.reshape(x, 192), b.weight(
        "v", rng.standard_normal((4, 192)), "f16")))
    profile = opencl_plan.adreno_profile(emulated=True, soa_min_rows=4, soa_min_cols=32) if profile != "generic" \
        else opencl_plan.generic_profile(fp64=_probe.info.fp64)
    if profile.adreno:     # the opencl-adreno pipeline's layout pass, with the profile's thresholds
        graph = layout_pass(profile)(graph)
    plan = compile_plan(graph, profile)
    assert any(c["layout"] for c in plan["plan"]["constants"]) == profile.adreno
    inputs = random_inputs(graph)
    got = replay(json.dumps(plan), dict(graph.constants), [inputs["x"], inputs["i"]], ocl)
    for g, want in zip(got, run_reference(graph, inputs)):
        assert nmse(g, want) <= 1e-5


# ---- build logs --------------------------------------------------------------------------------
WARNING_EXPR = "-a + (float)(0 & 1 == 1)"     # clang: '&' has lower precedence than '==' (a warning)


def warning_graph(name: str):
    b = GraphBuilder(name)
    x = b.input("x", "f32", (3, 5))
    return b.build(b.neg(x))


def test_compiler_warnings_stay_off_the_terminal(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(opencl.ELTWISE_CL, "neg", WARNING_EXPR)
    backend = OpenCLBackend(cache_dir=tmp_path)
    graph = warning_graph("warns")
    check(backend.compile(graph), graph)
    out, err = capfd.readouterr()
    assert "warning" not in err and "generated" not in err and out == ""
    name, log = backend.cache.logs[-1]
    assert name == "graph 'warns'" and "warning" in log      # kept for --verbose


def test_verbose_prints_the_build_log(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(opencl.ELTWISE_CL, "neg", WARNING_EXPR)
    OpenCLBackend(cache_dir=tmp_path, verbose=True).compile(warning_graph("verbose"))
    err = capfd.readouterr().err
    assert "opencl: build log of graph 'verbose':" in err and "warning" in err


def test_a_failed_build_keeps_what_the_compiler_printed(fresh, monkeypatch, capfd):
    monkeypatch.setitem(opencl.ELTWISE_CL, "neg", "-a +* no_such_name")
    with pytest.raises(CompileError) as info:
        fresh.compile(warning_graph("fails"))
    assert "no_such_name" in info.value.log
    assert capfd.readouterr().err == ""
