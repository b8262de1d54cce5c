"""The CPU backend cross-compiled for aarch64 and run under qemu-user (ember.backends.cpu.cross).

Conformance: the cases of test_conformance against the NumPy reference within each op's bound
(a representative set of groups in the default run, every group under `slow`). Bits: the NEON
kernels keep the portable path's arithmetic, so a matmul built for aarch64 (baseline NEON,
+dotprod, or portable) gives the x86 portable build's bits, whatever the batch or thread count.
Model: a tiny f32 model's step graphs give x86's greedy tokens.

Skipped, with the reason, where the cross compiler or qemu-aarch64 is missing (.ci/install
installs both).
"""
from __future__ import annotations

import platform

import numpy as np
import pytest

import test_conformance as conformance
from ember.backends.cpu.backend import CpuBackend
from ember.backends.cpu.cross import Aarch64Backend, aarch64_flags, parse_features, qemu_problem
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
def portable(backend_cache):
    return Aarch64Backend(portable=True, threads=1, cache_dir=backend_cache)


@pytest.fixture(scope="module")
def x86_portable(backend_cache):
    return CpuBackend(threads=2, isa="scalar", cache_dir=backend_cache)


# ---- conformance ------------------------------------------------------------------------------
DEFAULT_GROUPS = ("mul_mat_quant",)     # each group is qemu runs of its cases; the rest under slow
CASES = [pytest.param(c, id=c.id, marks=() if c.group in DEFAULT_GROUPS else pytest.mark.slow)
         for c in conformance.CASES]


@needs_qemu
@pytest.mark.parametrize("c", CASES)
def test_op_on_aarch64(neon, c):
    conformance.check(neon, c)


# ---- bits: NEON = portable = x86 portable -------------------------------------------------------
QUICK_WTYPES = ("f32", "q8_0", "q4_k")
MORE_WTYPES = ("f16", "q4_0", "q6_k", "bf16", "q5_0") + conformance.MORE_WTYPES
WTYPES = [*QUICK_WTYPES, *(pytest.param(w, marks=pytest.mark.slow) for w in MORE_WTYPES)]
T, N = 7, 37


def _matmul_graph(wtype: str):
    """y7 = x7 w^T and y1 = x1 w^T: row 3 of y7 and y1 must agree bit for bit (x1 = x7[3])."""
    K = 2 * conformance._row_len(wtype)
    rng = np.random.default_rng(7)
    b = GraphBuilder(f"mm_{wtype}")
    w = b.weight("w", rng.standard_normal((N, K)).astype(np.float32), wtype)
    x7, x1 = b.input("x7", "f32", (T, K)), b.input("x1", "f32", (1, K))
    graph = b.build([b.mul_mat(x7, w), b.mul_mat(x1, w)])
    x = rng.standard_normal((T, K)).astype(np.float32)
    return graph, {"x7": x, "x1": x[3:4].copy()}


BUILDS = ["neon", pytest.param("portable", marks=pytest.mark.slow), pytest.param("dotprod", marks=pytest.mark.slow)]


@needs_qemu
@pytest.mark.parametrize("wtype", WTYPES)
@pytest.mark.parametrize("build", BUILDS)
def test_aarch64_matmul_gives_the_x86_portable_bits_at_any_batch(build, wtype, request, x86_portable):
    graph, inputs = _matmul_graph(wtype)
    expected = run_reference(graph, inputs)[0]
    reference = x86_portable.compile(graph).run(inputs)
    assert nmse(reference[0], expected) <= conformance.MUL_MAT_BOUND[wtype]
    np.testing.assert_array_equal(reference[0][3:4], reference[1])
    got = request.getfixturevalue(build).compile(graph).run(inputs)
    for k in range(2):
        np.testing.assert_array_equal(got[k], reference[k], err_msg=f"{build} output {k}")


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
def test_tiny_f32_model_gives_the_x86_greedy_tokens(tiny_f32, neon, backend_cache):
    prompt = [1, 17, 260, 300, 42]
    x86_tokens, x86_logits = _greedy(tiny_f32, CpuBackend(threads=2, cache_dir=backend_cache), prompt, 4)
    tokens, logits = _greedy(tiny_f32, neon, prompt, 4)
    assert tokens == x86_tokens
    assert nmse(logits, x86_logits) <= 1e-9


def test_aarch64_artifact_records_isa_and_features_and_is_refused_on_x86(tiny_f32, tmp_path, backend_cache):
    if Aarch64Backend().available()[0] is False:
        pytest.skip(f"aarch64 cross builds: {Aarch64Backend().available()[1]}")
    backend = Aarch64Backend("dotprod", cache_dir=backend_cache)
    out = tmp_path / "tiny.ember"
    manifest = compile_artifact(tiny_f32, backend, out, n_ctx=64, prompt_tokens=8)
    assert (manifest["target"], manifest["isa"], manifest["features"]) == ("cpu-aarch64", "aarch64", ["dotprod"])
    assert (out / "kernels.so").read_bytes()[18:20] == (183).to_bytes(2, "little")   # ELF e_machine: AArch64
    if platform.machine() != "aarch64":
        with pytest.raises(ArtifactError, match="an aarch64 artifact .*dotprod.*native runtime"):
            read_manifest(out)
