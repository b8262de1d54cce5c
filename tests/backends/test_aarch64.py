"""The CPU backend cross-compiled for aarch64 and run under qemu-user (ember.backends.cpu.cross).

Conformance: the cases of test_conformance against the NumPy reference within each op's bound
(a representative set of groups in the default run, every group under `slow`; the matmul groups
also on +dotprod and +i8mm). Bits: the NEON kernels keep the portable path's arithmetic, so a
matmul of every weight type built for aarch64 (baseline NEON, +dotprod, +i8mm, or portable) gives
the x86 portable build's bits, whatever the batch or thread count: one graph holds every weight
type, so a build is one qemu run. Model: a tiny f32 model's step graphs give x86's greedy tokens.

Skipped, with the reason, where the cross compiler or qemu-aarch64 is missing (.ci/install
installs both).
"""
from __future__ import annotations

import platform
import shutil
import subprocess

import numpy as np
import pytest

import test_conformance as conformance
from ember.backends.cpu.backend import CpuBackend
from ember.backends.cpu.cross import AARCH64_CC, Aarch64Backend, aarch64_flags, parse_features, qemu_problem
from ember.codegen.cpu_matmul import MATMUL_WTYPES
from ember.artifact import ArtifactError, compile_artifact, read_manifest
from ember.errors import EmberError
from ember.ir import GraphBuilder
from ember.ir.interpreter import run_reference
from ember.models import load_model
from ember.passes import pipeline_for
from ember.testing import nmse

from model_steps import ReferenceSession
from tiny_gguf import Spec, write_tiny_gguf

needs_qemu = pytest.mark.skipif(qemu_problem() is not None, reason=f"aarch64 under qemu: {qemu_problem()}")


# ---- flags (no compiler needed) -----------------------------------------------------------------
@pytest.mark.parametrize("features, flag", [
    ((), "-march=armv8-a"),
    ("dotprod", "-march=armv8.2-a+dotprod"),
    ("i8mm,dotprod", "-march=armv8.6-a+dotprod+i8mm"),
], ids=["baseline-neon", "dotprod", "both-in-canonical-order"])
def test_features_pick_the_architecture_level(features, flag):
    assert aarch64_flags(features) == (flag,)


def test_portable_build_has_no_simd():
    assert aarch64_flags(portable=True) == ("-march=armv8-a+nosimd",)


def test_i8mm_brings_dotprod_along():
    # -march=armv8.6-a turns dotprod on: the build uses SDOT, and the artifact must say so
    assert parse_features("i8mm") == ("dotprod", "i8mm")
    assert aarch64_flags("i8mm") == ("-march=armv8.6-a+dotprod+i8mm",)


def test_unknown_feature_is_refused_naming_the_known_ones():
    with pytest.raises(EmberError, match="unknown target feature 'sve'.*dotprod, i8mm"):
        parse_features("dotprod,sve")


# ---- backends -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def neon(backend_cache):
    return Aarch64Backend(threads=3, cache_dir=backend_cache)


@pytest.fixture(scope="module")
def dotprod(backend_cache):
    return Aarch64Backend("dotprod", threads=2, cache_dir=backend_cache)


@pytest.fixture(scope="module")
def i8mm(backend_cache):
    return Aarch64Backend("i8mm", threads=2, cache_dir=backend_cache)


@pytest.fixture(scope="module")
def portable(backend_cache):
    return Aarch64Backend(portable=True, threads=1, cache_dir=backend_cache)


@pytest.fixture(scope="module")
def x86_portable(backend_cache):
    return CpuBackend(threads=2, isa="scalar", cache_dir=backend_cache)


# ---- conformance ------------------------------------------------------------------------------
# Each case is a qemu run. By default the decode and prompt shapes of every weight type (the
# layouts, views and batch shapes of the other cases go through the same kernels, which
# test_aarch64_matmul_of_every_weight_type_gives_the_x86_portable_bits checks bit for bit); the
# rest of mul_mat_quant and every other group under slow.
DEFAULT_GROUPS = ("mul_mat_quant",)
DEFAULT_SHAPES = ("-gemv", "-T17")
CASES = [pytest.param(c, id=c.id, marks=() if c.group in DEFAULT_GROUPS and c.id.endswith(DEFAULT_SHAPES)
                      else pytest.mark.slow)
         for c in conformance.CASES]
# the target features change only the matmul kernels: their groups (every weight type, mul_mat
# and mul_mat_id) on each feature build, all under slow
FEATURE_CASES = [pytest.param(c, id=c.id, marks=pytest.mark.slow)
                 for c in conformance.CASES if c.group.startswith("mul_mat")]


@needs_qemu
@pytest.mark.parametrize("c", CASES)
def test_op_on_aarch64(neon, c):
    conformance.check(neon, c)


@needs_qemu
@pytest.mark.parametrize("c", FEATURE_CASES)
@pytest.mark.parametrize("build", ["dotprod", "i8mm"])
def test_matmul_op_on_aarch64_features(build, c, request):
    conformance.check(request.getfixturevalue(build), c)


# ---- bits: NEON = portable = x86 portable -------------------------------------------------------
T, N = 7, 67    # odd: the i8mm 2 x 2 tiles leave a row of each; 67 rows: two chunks at T = 7


def _matmul_graph(wtypes):
    """For each wtype y7 = x7 w^T and y1 = x1 w^T with x1 = x7[3]: row 3 of y7 and y1 must agree
    bit for bit (x1's row meets a partner row in the T = 7 tiles, none in the T = 1 dot)."""
    rng = np.random.default_rng(7)
    b = GraphBuilder("mm_every_wtype")
    outputs, inputs = [], {}
    for wtype in wtypes:
        K = 2 * conformance._row_len(wtype)
        w = b.weight(f"w_{wtype}", rng.standard_normal((N, K)).astype(np.float32), wtype)
        x7, x1 = b.input(f"x7_{wtype}", "f32", (T, K)), b.input(f"x1_{wtype}", "f32", (1, K))
        outputs += [b.mul_mat(x7, w), b.mul_mat(x1, w)]
        inputs[x7.name] = rng.standard_normal((T, K)).astype(np.float32)
        inputs[x1.name] = inputs[x7.name][3:4].copy()
    return b.build(outputs), inputs


@pytest.fixture(scope="module")
def x86_bits(x86_portable):
    """The graph of every weight type, its inputs, the reference's outputs and the x86 portable
    build's (checked against the reference and for batch invariance here)."""
    graph, inputs = _matmul_graph(MATMUL_WTYPES)
    expected = run_reference(graph, inputs)
    reference = x86_portable.compile(graph).run(inputs)
    for k, wtype in enumerate(MATMUL_WTYPES):
        assert nmse(reference[2 * k], expected[2 * k]) <= conformance.MUL_MAT_BOUND[wtype], wtype
        np.testing.assert_array_equal(reference[2 * k][3:4], reference[2 * k + 1], err_msg=wtype)
    return graph, inputs, expected, reference


BUILDS = ["neon", "i8mm", pytest.param("portable", marks=pytest.mark.slow),
          pytest.param("dotprod", marks=pytest.mark.slow)]


@needs_qemu
@pytest.mark.parametrize("build", BUILDS)
def test_aarch64_matmul_of_every_weight_type_gives_the_x86_portable_bits(build, request, x86_bits):
    graph, inputs, expected, reference = x86_bits
    got = request.getfixturevalue(build).compile(graph).run(inputs)
    wrong = []
    for k, wtype in enumerate(MATMUL_WTYPES):
        err = nmse(got[2 * k], expected[2 * k])
        if err > conformance.MUL_MAT_BOUND[wtype]:
            wrong.append(f"{wtype}: NMSE {err:.3g} against the reference")
        for j, name in ((2 * k, "T=7"), (2 * k + 1, "T=1")):
            differ = int(np.sum(got[j].view(np.uint32) != reference[j].view(np.uint32)))
            if differ:
                wrong.append(f"{wtype} {name}: {differ} of {got[j].size} values differ from x86 portable")
    assert not wrong, f"{build}: " + "; ".join(wrong)


def _disassembly(library) -> str:
    objdump = AARCH64_CC.replace("gcc", "objdump")
    if shutil.which(objdump) is None:
        pytest.skip(f"{objdump} not on PATH (binutils-aarch64-linux-gnu)")
    return subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("build, present, absent", [
    ("neon", (), ("sdot", "smmla")),
    ("i8mm", ("sdot", "smmla"), ()),
], ids=["baseline-has-neither", "i8mm-has-sdot-and-smmla"])
def test_feature_builds_use_their_instructions(build, present, absent, request):
    backend = request.getfixturevalue(build)
    if not backend.available()[0]:
        pytest.skip(f"aarch64 cross builds: {backend.available()[1]}")
    code = _disassembly(backend.kernel_library()[1])
    for instruction in present:
        assert f"\t{instruction}\t" in code, f"{build}: no {instruction} in the kernel library"
    for instruction in absent:
        assert f"\t{instruction}\t" not in code, f"{build}: {instruction} in the kernel library"


# ---- a model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("model") / "llama-f32.gguf", Spec("llama", "f32")))


def _greedy(model, backend, prompt, n_new: int, n_kv: int = 16):
    """Greedy tokens of one sequence, the step graphs compiled on backend (the cpu pipeline)."""
    session = ReferenceSession(model, n_kv)
    executables = {}

    def step(tokens):
        tokens = np.asarray(tokens, np.int32)
        start = int(session.slot_pos.max()) + 1
        pos = np.arange(start, start + len(tokens), dtype=np.int32)
        session.slot_pos[pos] = pos
        if len(tokens) not in executables:
            graph = pipeline_for("cpu")(model.build_step(len(tokens), n_kv, 1))
            executables[len(tokens)] = backend.compile(graph)
        inputs = dict(tokens=tokens, pos=pos, slots=pos.copy(), out_ids=np.array([len(tokens) - 1], np.int32),
                      **session.masks(pos), **session.caches)
        logits, *caches = executables[len(tokens)].run(inputs)
        session.caches = dict(zip(session.caches, caches))
        return logits[-1]

    logits = [step(prompt)]
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(n_new - 1):
        logits.append(step([tokens[-1]]))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, np.stack(logits)


@needs_qemu
@pytest.mark.slow       # a cold cross-compile of the tiny model's steps and a qemu run: seconds
def test_tiny_f32_model_gives_the_x86_greedy_tokens(tiny_f32, neon, backend_cache):
    prompt = [1, 17, 260, 300, 42]
    x86_tokens, x86_logits = _greedy(tiny_f32, CpuBackend(threads=2, cache_dir=backend_cache), prompt, 4)
    tokens, logits = _greedy(tiny_f32, neon, prompt, 4)
    assert tokens == x86_tokens
    assert nmse(logits, x86_logits) <= 1e-9


def test_aarch64_artifact_records_isa_and_features_and_is_refused_on_x86(tiny_f32, tmp_path, backend_cache):
    if Aarch64Backend().available()[0] is False:
        pytest.skip(f"aarch64 cross builds: {Aarch64Backend().available()[1]}")
    backend = Aarch64Backend("i8mm", cache_dir=backend_cache)
    out = tmp_path / "tiny.ember"
    manifest = compile_artifact(tiny_f32, backend, out, n_ctx=64, prompt_tokens=8)
    assert (manifest["target"], manifest["isa"], manifest["features"]) == \
        ("cpu-aarch64", "aarch64", ["dotprod", "i8mm"])
    assert (out / "kernels.so").read_bytes()[18:20] == (183).to_bytes(2, "little")   # ELF e_machine: AArch64
    if platform.machine() != "aarch64":
        with pytest.raises(ArtifactError, match="an aarch64 artifact .*dotprod, i8mm.*native runtime"):
            read_manifest(out)
