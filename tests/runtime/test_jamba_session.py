"""jamba (Mamba-1 + attention + MoE, the tiny_gguf_jamba file) in the generation session on the CPU
backend: a prompt split into micro-batches, or decoded token by token, gives the rows of the whole
prompt bit for bit (batch-invariant kernels, the conv and SSM states carried between steps) and
matches the reference interpreter; the state after a verify batch rolled back to any prefix is the
state one-token decoding reaches, bit for bit; the recurrent state snapshots and restores; greedy
speculative decoding (n-gram drafts, per-position states or checkpoint and re-decode) gives the
tokens of plain decoding."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions
from ember.runtime.speculative import NgramDraft, speculative_generate
from model_steps import ReferenceSession, nmse
from tiny_gguf_jamba import JambaSpec

PROMPT = [1, 17, 260, 300, 42, 9, 33]        # the peer tests' prompt and options: same step graphs
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=32)
N_PREDICT = 24


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)


@pytest.fixture(scope="module")
def model(tiny_files):
    return load_model(tiny_files[JambaSpec()])


# slow, as every case here: a cold jamba step graph takes tens of seconds to compile on 2 cores
# (the default suite checks the scan's per-state form on every backend in test_all_states)
@pytest.mark.slow
def test_decode_rows_and_micro_batches_equal_the_batched_prompt(model, cpu):
    session = Session(model, cpu, OPTIONS)
    whole = session.eval(PROMPT, all_logits=True)
    assert list(session.recurrent_state()) == model.state_names()
    session.reset()
    decoded = np.concatenate([session.eval([t]) for t in PROMPT])
    split = Session(model, cpu, SessionOptions(n_ctx=OPTIONS.n_ctx, kv_bucket=OPTIONS.kv_bucket, ubatch=3))
    np.testing.assert_array_equal(decoded, whole)
    np.testing.assert_array_equal(split.eval(PROMPT, all_logits=True), whole)
    assert nmse(whole, ReferenceSession(model, OPTIONS.kv_bucket).step(PROMPT)) < 1e-9


@pytest.mark.slow
def test_state_after_rollback_is_the_one_token_state(model, cpu):
    """Verify 4 tokens keeping every state, roll back to each prefix: the conv and SSM states
    equal those of decoding the prefix one token at a time, bit for bit."""
    target, step = Session(model, cpu, OPTIONS), Session(model, cpu, OPTIONS)
    batch = [17, 40, 41, 99]
    target.reserve_state_planes(len(batch) + 1)
    step.eval(PROMPT)
    one_at_a_time = []
    for token in batch:
        step.eval([token])
        one_at_a_time.append(step.recurrent_state())
    for j in reversed(range(len(batch))):
        target.reset()
        target.eval(PROMPT)
        target.eval(batch, all_logits=True, keep_states=True)
        target.truncate(len(PROMPT) + j + 1)
        for name, expected in one_at_a_time[j].items():
            np.testing.assert_array_equal(target.recurrent_state()[name], expected, err_msg=f"{name}, prefix {j + 1}")


@pytest.mark.slow
def test_recurrent_state_snapshot_and_restore(model, cpu):
    session = Session(model, cpu, OPTIONS)
    session.eval(PROMPT, all_logits=True)
    snapshot, position = session.recurrent_state(), session.n_past
    after = session.eval([5])
    session.eval([7])
    session.set_recurrent_state(snapshot, n_past=position)
    np.testing.assert_array_equal(session.eval([5]), after)


def repetitive_prompt(seed: int) -> list[int]:
    motif = list(np.random.default_rng(seed).integers(3, 300, size=4))
    return [1] + (motif * 4)[:11]


# slow: the verify and re-decode step graphs of several lengths each compile
@pytest.mark.slow
@pytest.mark.parametrize("rollback", ["states", "redecode"])
@pytest.mark.parametrize("draft_max", [2, 5])
def test_ngram_speculation_is_token_identical(model, cpu, rollback, draft_max):
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    target = Session(model, cpu, SessionOptions(n_ctx=96, kv_bucket=32))
    prompt = repetitive_prompt(7)
    expected = generate(target, tokenizer, prompt, N_PREDICT, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    got, stats = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT, draft_max=draft_max,
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected
    assert stats.drafted > 0 and stats.rollback == rollback
    if rollback == "states":
        assert stats.redecode_seconds == 0
