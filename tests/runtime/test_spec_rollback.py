"""Speculation on recurrent models without re-decoding (ember.runtime.speculative, rollback
"states") next to the checkpoint-and-re-decode path ("redecode"): the state after a rollback is
the state one-token decoding reaches, bit for bit; greedy output is identical to plain decoding
for every draft source, rollback mode and backend; on a GPU backend the state never crosses to
the host during the rounds. Mamba-2 (mamba2, granitehybrid) on every backend; the gated-DeltaNet
hybrids (qwen35moe, qwen35), the short-convolution / parallel hybrids (lfm2, falcon-h1) and jamba
(Mamba-1) on the CPU."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from devices import make_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions
from ember.runtime.speculative import ModelDraft, NgramDraft, speculative_generate
from tiny_gguf_delta import DeltaSpec
from tiny_gguf_hybrid import HybridSpec
from tiny_gguf_jamba import JambaSpec
from tiny_gguf_ssm import SsmSpec

OPTIONS = SessionOptions(n_ctx=96, kv_bucket=32)
N_PREDICT = 24
BACKENDS = ["cpu", "opencl", "vulkan"]


@pytest.fixture(scope="module")
def backends(tmp_path_factory, shared_cpu_cache):
    gpu_cache = tmp_path_factory.mktemp("rollback-cache")
    made = {}

    def get(name):
        if name not in made:
            # the CPU graphs are test_speculative.py's hybrid ones: one compile for both modules
            made[name] = (make_backend(name, shared_cpu_cache, threads=2) if name == "cpu"
                          else make_backend(name, gpu_cache))
        return made[name]
    return get


def session(tiny_files, backend, arch="granitehybrid"):
    model = load_model(tiny_files[SsmSpec(arch, "f32")])
    return Session(model, backend, OPTIONS), Tokenizer.from_metadata(model.tokenizer)


def prompt_ids(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    motif = list(rng.integers(3, 200, size=4))
    return [1] + (motif * 4)[:11]


def greedy(target, tokenizer, prompt):
    return generate(target, tokenizer, prompt, N_PREDICT, Sampler(SamplingParams(temperature=0)),
                    ignore_eos=True).tokens


@dataclass
class WrongAt:
    """A drafter that knows the greedy answer and is wrong exactly at draft position j, j going
    round 0..k (k: every draft right), so each round's acceptance stops at a chosen place."""
    answer: list[int]
    n_prompt: int
    name: str = "wrong-at"
    round: int = 0
    positions: set = field(default_factory=set)

    def propose(self, context, k):
        done = len(context) - self.n_prompt          # answer tokens already in the context
        drafts = list(self.answer[done:done + k])
        j = self.round % (k + 1)
        self.round += 1
        if j < len(drafts):
            drafts[j] = (drafts[j] + 1) % 300 + 3
            self.positions.add(j)
        return drafts

    def accepted(self, context, n_drafted, n_accepted):
        pass


# ---- the state after a rollback ---------------------------------------------------------------
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_state_after_rollback_is_the_one_token_state(tiny_files, backends, backend_name):
    """Verify 5 tokens keeping every state, roll back to each prefix: the recurrent state (and the
    next logits) equal, bit for bit, those of a session that decoded the prefix one token at a time."""
    backend = backends(backend_name)
    target, _ = session(tiny_files, backend)
    step, _ = session(tiny_files, backend)
    prompt, batch = prompt_ids(0), [17, 40, 41, 99, 5]
    target.reserve_state_planes(len(batch) + 1)
    step.eval(prompt)
    one_at_a_time = []
    for token in batch:
        step.eval([token])
        one_at_a_time.append(step.recurrent_state())
    for j in reversed(range(len(batch))):            # the longest prefix first, then shorter ones
        target.reset()
        target.eval(prompt)
        target.eval(batch, all_logits=True, keep_states=True)
        target.truncate(len(prompt) + j + 1)
        for name, expected in one_at_a_time[j].items():
            np.testing.assert_array_equal(target.recurrent_state()[name], expected, err_msg=f"{name}, prefix {j + 1}")
    # and the session goes on from there as if it had never seen the tail
    target.reset()
    target.eval(prompt)
    target.eval(batch, all_logits=True, keep_states=True)
    target.truncate(len(prompt) + 2)
    step.reset()
    step.eval(prompt)
    step.eval(batch[:1])
    step.eval(batch[1:2])
    np.testing.assert_array_equal(target.eval([7]), step.eval([7]))


def test_truncate_refuses_a_position_whose_state_is_gone(tiny_files, backends):
    target, _ = session(tiny_files, backends("cpu"))
    target.eval(prompt_ids(1))
    target.eval([5, 6, 7])           # one plane: only the last state is held
    assert not target.holds(len(prompt_ids(1)) + 1)
    with pytest.raises(Exception, match="state after position"):
        target.truncate(len(prompt_ids(1)) + 1)


# ---- greedy identity ----------------------------------------------------------------------------
# redecode (the older path) with the slow cases: the default run covers it through the CLI case and
# the GPU transfer cases
@pytest.mark.parametrize("rollback", ["states", pytest.param("redecode", marks=pytest.mark.slow)])
@pytest.mark.parametrize("draft_max", [1, pytest.param(3, marks=pytest.mark.slow), pytest.param(5, marks=pytest.mark.slow),
                                       pytest.param(8, marks=pytest.mark.slow)])
def test_every_acceptance_position_is_token_identical(tiny_files, backends, rollback, draft_max):
    target, tokenizer = session(tiny_files, backends("cpu"))
    prompt = prompt_ids(2)
    n_predict = 48          # enough rounds for the drafter to be wrong at each of 8 positions
    expected = generate(target, tokenizer, prompt, n_predict, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    drafter = WrongAt(expected, len(prompt))
    got, stats = speculative_generate(target, drafter, tokenizer, prompt, n_predict, draft_max=draft_max,
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected
    assert drafter.positions == set(range(draft_max))     # rejected at every draft position
    assert stats.accepted < stats.drafted
    if rollback == "states":
        assert stats.redecode_seconds == 0 and stats.rollback_seconds > 0
        assert stats.state_bytes == (draft_max + 2) * target.state_bytes
    else:
        assert stats.redecode_seconds > 0
        assert stats.state_bytes == 2 * target.state_bytes


def _identity_case(tiny_files, backends, backend_name, arch, source, rollback, draft_max=4):
    backend = backends(backend_name)
    target, tokenizer = session(tiny_files, backend, arch)
    prompt = prompt_ids(3)
    expected = greedy(target, tokenizer, prompt)
    if source == "ngram":
        draft = NgramDraft()
    else:   # another recurrent model with the same vocabulary: it disagrees often
        other = "mamba2" if arch == "granitehybrid" else "granitehybrid"
        draft = ModelDraft(session(tiny_files, backend, other)[0])
    got, stats = speculative_generate(target, draft, tokenizer, prompt, N_PREDICT, draft_max=draft_max,
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected
    assert stats.drafted > 0
    return target, stats


@pytest.mark.slow      # suite time: a second model's steps to compile
@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_recurrent_draft_model_rolls_back_the_same_way(tiny_files, backends, rollback):
    _identity_case(tiny_files, backends, "cpu", "granitehybrid", "draft", rollback)


@pytest.mark.parametrize("backend_name", ["opencl", "vulkan"])
@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_gpu_state_stays_on_the_device(tiny_files, backends, backend_name, rollback):
    """Greedy identity on a GPU backend, and no byte of recurrent state (nor of the KV caches)
    synced between host and device during the rounds: the planes are resident (a sync after
    the run brings every table back, so they were on the device, newer than the host)."""
    target, stats = _identity_case(tiny_files, backends, backend_name, "granitehybrid", "ngram", rollback)
    assert stats.synced_bytes == 0
    transfers = target.backend.transfers
    before = transfers.synced
    target.recurrent_state()
    assert transfers.synced - before == target.state_planes * target.state_bytes


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("arch", ["mamba2", "granitehybrid"])
@pytest.mark.parametrize("source", ["ngram", "draft"])
@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_speculation_identity_matrix(tiny_files, backends, backend_name, arch, source, rollback):
    _identity_case(tiny_files, backends, backend_name, arch, source, rollback)


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["opencl", "vulkan"])
@pytest.mark.parametrize("draft_max", [2, 5, 8])
def test_gpu_every_acceptance_position(tiny_files, backends, backend_name, draft_max):
    target, tokenizer = session(tiny_files, backends(backend_name))
    prompt = prompt_ids(4)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, WrongAt(expected, len(prompt)), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected and stats.synced_bytes == 0


@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_cli_spec_rollback_option(tiny_files, tmp_path, capsys, rollback):
    from ember.cli import main
    path = tiny_files[SsmSpec("granitehybrid", "f32")]
    argv = ["generate", str(path), "-p", "a b a b a b a b", "-n", "8", "--temp", "0",
            "--ignore-eos", "-c", "96", "-t", "2", "--spec", "ngram", "--draft-max", "3",
            "--spec-rollback", rollback, "--verbose"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "speculative memory: recurrent state" in err and f"({rollback})" in err
    assert ("no re-decode" in err) == (rollback == "states")


# ---- gated DeltaNet, short convolution, parallel attention + Mamba-2 (CPU) ---------------------
@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return make_backend("cpu", shared_cpu_cache, threads=2)


def test_delta_net_state_after_rollback_is_the_one_token_state(tiny_files, cpu):
    """qwen35 (gated DeltaNet: a conv state over q, k, v and the delta rule's state): a verify
    batch keeping every state, rolled back to a prefix, holds bit for bit the state of decoding
    that prefix one token at a time, and goes on to the same logits."""
    model = load_model(tiny_files[DeltaSpec("qwen35", "f32")])
    target, step = Session(model, cpu, OPTIONS), Session(model, cpu, OPTIONS)
    prompt, batch = prompt_ids(0), [17, 40, 41, 99]
    target.reserve_state_planes(len(batch) + 1)
    target.eval(prompt)
    target.eval(batch, all_logits=True, keep_states=True)
    step.eval(prompt)
    one_at_a_time = []
    for token in batch[:2]:
        step.eval([token])
        one_at_a_time.append(step.recurrent_state())
    for j in (1, 0):                       # the longer prefix first, then the shorter
        target.truncate(len(prompt) + j + 1)
        kept = target.recurrent_state()
        assert list(kept) == model.state_names() and any(n.startswith("ssm_state") for n in kept)
        for name, expected in one_at_a_time[j].items():
            np.testing.assert_array_equal(kept[name], expected, err_msg=f"{name}, prefix {j + 1}")
    step.set_recurrent_state(one_at_a_time[0], len(prompt) + 1)
    np.testing.assert_array_equal(target.eval([7]), step.eval([7]))


def _hybrid(tiny_files, cpu, spec):
    model = load_model(tiny_files[spec])
    return Session(model, cpu, OPTIONS), Tokenizer.from_metadata(model.tokenizer)


@pytest.mark.slow      # suite time: the default run rolls back Mamba-2 and gated DeltaNet states above
def test_short_convolution_every_acceptance_position(tiny_files, cpu):
    """lfm2 (a conv state only) with a drafter wrong at each draft position in turn: the kept
    conv windows give plain decoding's tokens, with no re-decode."""
    target, tokenizer = _hybrid(tiny_files, cpu, HybridSpec("lfm2"))
    prompt = prompt_ids(5)
    expected = greedy(target, tokenizer, prompt)
    drafter = WrongAt(expected, len(prompt))
    got, stats = speculative_generate(target, drafter, tokenizer, prompt, N_PREDICT, draft_max=3,
                                      ignore_eos=True, rollback="states")
    assert got.tokens == expected
    assert drafter.positions == {0, 1, 2} and stats.accepted < stats.drafted
    assert stats.redecode_seconds == 0 and stats.state_bytes == 5 * target.state_bytes


NEW_ARCHS = [DeltaSpec("qwen35moe", "f32"), HybridSpec("lfm2"), HybridSpec("falcon-h1"), JambaSpec()]


@pytest.mark.slow
@pytest.mark.parametrize("spec", NEW_ARCHS, ids=lambda spec: spec.arch)
@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_new_arch_ngram_speculation_is_token_identical(tiny_files, cpu, spec, rollback):
    target, tokenizer = _hybrid(tiny_files, cpu, spec)
    prompt = prompt_ids(2)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT, draft_max=4,
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected and stats.drafted > 0
    assert stats.rollback == rollback
    if rollback == "states":
        assert stats.redecode_seconds == 0


@pytest.mark.slow
@pytest.mark.parametrize("spec", NEW_ARCHS, ids=lambda spec: spec.arch)
@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_new_arch_every_acceptance_position(tiny_files, cpu, spec, rollback):
    target, tokenizer = _hybrid(tiny_files, cpu, spec)
    prompt = prompt_ids(6)
    expected = greedy(target, tokenizer, prompt)
    drafter = WrongAt(expected, len(prompt))
    got, stats = speculative_generate(target, drafter, tokenizer, prompt, N_PREDICT, draft_max=4,
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected and drafter.positions == {0, 1, 2, 3}
    assert (stats.redecode_seconds > 0) == (rollback == "redecode")
