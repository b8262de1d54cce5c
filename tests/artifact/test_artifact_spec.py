"""Artifacts compiled for speculation (`ember compile --spec`, ember/artifact/__init__.py): the
verify steps they hold, greedy speculation through them token-identical to plain decoding of the
same artifact (a transformer, and a recurrent hybrid rolled back by per-position states, with
re-decoding still selectable), the native runtime leaving the verify steps alone, and one line
for what the artifact does not hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ember.artifact import ArtifactError, compile_artifact, load_artifact, read_manifest, verify_tokens
from ember.backends.cpu.backend import CpuBackend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.speculative import NgramDraft, speculative_generate
from devices import make_backend
from tiny_gguf import Spec
from tiny_gguf_ssm import SsmSpec

ROOT = Path(__file__).resolve().parents[2]
PROMPT_TOKENS = 8
MODELS = {"transformer": Spec("llama", "q8_0"), "recurrent": SsmSpec("granitehybrid", "f32")}


@dataclass(frozen=True)
class Build:
    kind: str
    n_ctx: int
    kv_bucket: int
    draft_max: int

    @property
    def verify(self) -> list[int]:
        return verify_tokens(self.draft_max)


# By default one KV bucket and draft-max 2 (4 steps: a cold CPU step takes a second or two to
# compile); slow: two buckets, so verify batches also cross a bucket, and draft-max 3.
# (the transformer's by default too, under slow: suite time; its verify steps are the recurrent
# model's without the state planes)
BUILDS = [pytest.param(Build(kind, 32, 32, 2), id=f"{kind}-k2",
                       marks=pytest.mark.slow if kind == "transformer" else ()) for kind in MODELS] + \
    [pytest.param(Build(kind, 64, 32, 3), id=f"{kind}-k3-2buckets", marks=pytest.mark.slow) for kind in MODELS]


@pytest.fixture(scope="module", params=BUILDS)
def built(request, tiny_files, shared_cpu_cache, tmp_path_factory) -> tuple[Build, Path]:
    """(build, artifact compiled with --spec, with ember-run)."""
    build = request.param
    out = tmp_path_factory.mktemp(f"spec-{build.kind}") / "art"
    compile_artifact(load_model(tiny_files[MODELS[build.kind]]), CpuBackend(threads=2, cache_dir=shared_cpu_cache),
                     out, n_ctx=build.n_ctx, kv_bucket=build.kv_bucket, prompt_tokens=PROMPT_TOKENS,
                     draft_max=build.draft_max, runtime=True)
    return build, out


def prompt_ids() -> list[int]:
    motif = [17, 40, 41, 99, 5]
    return [1] + motif * 3


def greedy(session, tokenizer, prompt, n_predict):
    return generate(session, tokenizer, prompt, n_predict, Sampler(SamplingParams(temperature=0)), ignore_eos=True)


@dataclass
class WrongAt:
    """Drafts the greedy answer but wrong at draft position j, j going round 0..k (k: all
    right), so rounds stop at every acceptance position, including full acceptance."""
    answer: list[int]
    n_prompt: int
    name: str = "wrong-at"
    round: int = 0

    def propose(self, context, k):
        done = len(context) - self.n_prompt
        drafts = list(self.answer[done:done + k])
        j = self.round % (k + 1)
        self.round += 1
        if j < len(drafts):
            drafts[j] = (drafts[j] + 1) % 300 + 3
        return drafts

    def accepted(self, context, n_drafted, n_accepted):
        pass


def test_verify_tokens_grow_with_log2_of_draft_max():
    assert verify_tokens(1) == [2]
    assert verify_tokens(3) == [2, 3, 4]
    assert verify_tokens(8) == [2, 3, 5, 9]
    assert verify_tokens(12) == [2, 3, 5, 9, 13]


def test_manifest_records_the_draft_max_and_holds_the_verify_steps(built):
    build, art = built
    manifest = read_manifest(art)
    planes = build.draft_max + 2 if build.kind == "recurrent" else 1
    assert manifest["spec"] == {"draft_max": build.draft_max, "verify_tokens": build.verify, "state_planes": planes}
    shapes = [(s["n_tokens"], s["n_kv"], s["n_outputs"]) for s in manifest["steps"]]
    want = [(T, n_kv, n_out) for n_kv in range(build.kv_bucket, build.n_ctx + 1, build.kv_bucket)
            for T, n_out in [(1, 1), (PROMPT_TOKENS, 1)] + [(T, T) for T in build.verify]]
    assert sorted(shapes) == sorted(want)


@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_greedy_speculation_through_the_artifact_is_token_identical(built, rollback):
    """Every acceptance position (WrongAt), until the context is full: the same tokens as plain
    decoding of the artifact, with no compile; recurrent state rolled back by selecting a plane
    (no re-decode) unless redecode is asked for."""
    build, art = built
    model, session = load_artifact(art, threads=2)
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    prompt = prompt_ids()
    expected = greedy(session, tokenizer, prompt, build.n_ctx)
    assert expected.stop_reason == "context"
    got, stats = speculative_generate(session, WrongAt(expected.tokens, len(prompt)), tokenizer, prompt,
                                      build.n_ctx, draft_max=build.draft_max, ignore_eos=True, rollback=rollback)
    assert got.tokens == expected.tokens and got.stop_reason == "context"
    assert stats.accepted > 0 and stats.rounds < len(expected.tokens)    # verify batches, not single tokens
    assert session.stats.graph_builds == 0 and session.stats.compile_seconds == 0
    if build.kind == "recurrent":
        assert stats.rollback == rollback and stats.state_bytes == (build.draft_max + 2) * session.state_bytes
        assert (stats.redecode_seconds > 0) == (rollback == "redecode")


def test_verify_rows_are_the_rows_single_tokens_give(built):
    """A padded verify step's real rows equal the decode steps' logits bit for bit (batch
    invariance), and the session goes on from the accepted prefix as if it had never seen the
    tail (for a recurrent model: the state kept for that position)."""
    build, art = built
    _, spec = load_artifact(art, threads=2)
    _, plain = load_artifact(art, threads=2)
    prompt, batch = prompt_ids(), [7, 8]
    # 2 tokens run in the 2-token verify step; with draft-max 3, 3 tokens in the 4-token one (padded)
    for tokens in (batch, batch + [9]):
        for session in (spec, plain):
            session.reset()
            session.eval(prompt)
        spec.prepare_speculation(build.draft_max, "states" if spec.is_recurrent else "")
        rows = spec.eval(tokens, all_logits=True)
        singles = np.stack([plain.eval([t]) for t in tokens])
        np.testing.assert_array_equal(rows, singles.reshape(rows.shape))
    spec.truncate(len(prompt) + 1)
    plain.reset()
    plain.eval(prompt)
    plain.eval(batch[:1])
    np.testing.assert_array_equal(spec.eval([11]), plain.eval([11]))


def test_draft_max_beyond_the_artifact_is_one_line(built):
    build, art = built
    model, session = load_artifact(art, threads=2)
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    k = build.draft_max
    with pytest.raises(ArtifactError, match=rf"compiled for speculation with --draft-max {k} at most, not {k + 1}"):
        speculative_generate(session, NgramDraft(), tokenizer, prompt_ids(), 8, draft_max=k + 1)


def test_without_spec_steps_a_recurrent_artifact_needs_redecode(built, tmp_path):
    """An artifact compiled without --spec: a recurrent model cannot keep per-position states (one
    line naming the fix); a transformer verifies one token at a time, giving the same tokens."""
    build, art = built
    model, session = load_artifact(art, threads=2)
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    expected = greedy(session, tokenizer, prompt_ids(), 8).tokens
    # what a session of an artifact compiled without --spec holds (its manifest has no spec block)
    session.reset()
    session.draft_max, session.verify_tokens = 0, []
    if build.kind == "recurrent":
        with pytest.raises(ArtifactError, match=r"compiled without --spec.*--spec-rollback redecode"):
            speculative_generate(session, NgramDraft(), tokenizer, prompt_ids(), 8, draft_max=2)
        return
    got, stats = speculative_generate(session, NgramDraft(), tokenizer, prompt_ids(), 8, draft_max=2,
                                      ignore_eos=True)
    assert got.tokens == expected and stats.drafted > 0


def ember(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, env=env)


def test_ember_run_spec_ngram_gives_the_plain_runs_text(built):
    build, art = built
    args = ("run", art, "-p", "the model the model", "-n", 8, "--temp", 0, "--ignore-eos", "-t", 2)
    plain, spec = ember(*args), ember(*args, "--spec", "ngram")
    assert plain.returncode == 0 and spec.returncode == 0, (plain.stderr, spec.stderr)
    assert spec.stdout == plain.stdout and len(plain.stdout.strip()) > 0
    assert "generated 8 tokens" in spec.stderr and "verify passes" in spec.stderr
    if build.kind == "recurrent":
        assert "rollback by per-position states" in spec.stderr
        return
    too_many = ember(*args, "--spec", "ngram", "--draft-max", 5)
    assert too_many.returncode == 1 and too_many.stderr.strip().splitlines()[-1] == (
        f"ember: error: {art}: compiled for speculation with --draft-max {build.draft_max} at most, not 5: "
        "pass a smaller --draft-max, or compile it again with --spec --draft-max 5")


def test_native_runtime_runs_a_spec_artifact_without_its_verify_steps(built):
    build, art = built
    args = ("-p", "the model the small device", "-n", "20", "--temp", "0", "--ignore-eos", "-t", "2")
    native = subprocess.run([str(art / "ember-run"), str(art), *args], capture_output=True, timeout=120,
                            encoding="utf-8", errors="replace")
    python = ember("run", art, *args)
    assert native.returncode == 0, native.stderr
    assert native.stdout == python.stdout and len(native.stdout.strip()) > 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert any(s["n_outputs"] > 1 for s in manifest["steps"])


# lavapipe compiles the two steps in seconds; PoCL every kernel cold, for a minute or more
@pytest.mark.parametrize("target,backend", [pytest.param("opencl-generic", "opencl", marks=pytest.mark.slow),
                                            ("vulkan", "vulkan")])
def test_gpu_spec_artifact_of_a_recurrent_model_is_token_identical(tiny_files, tmp_path, target, backend):
    """The same on a GPU target (lavapipe, PoCL): the verify steps keep every state on the device,
    nothing of it crosses to the host during the rounds. Two steps only (the decode step and the
    2-token verify step: draft-max 1, the prompt in single tokens)."""
    make_backend(backend, tmp_path / "cache")          # skips where the device is missing
    out = tmp_path / "art"
    compile_artifact(load_model(tiny_files[MODELS["recurrent"]]), target, out, n_ctx=32, kv_bucket=32,
                     prompt_tokens=1, draft_max=1, cache_dir=tmp_path / "cache")
    assert len(read_manifest(out)["steps"]) == 2
    model, session = load_artifact(out)
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    prompt = prompt_ids()
    expected = greedy(session, tokenizer, prompt, 12)
    got, stats = speculative_generate(session, WrongAt(expected.tokens, len(prompt)), tokenizer, prompt, 12,
                                      draft_max=1, ignore_eos=True)
    assert got.tokens == expected.tokens
    assert stats.accepted > 0 and stats.rollback == "states" and stats.redecode_seconds == 0
    assert stats.synced_bytes == 0
