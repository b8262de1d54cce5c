"""lfm2, nemotron_h and falcon-h1 in the generation session on the CPU backend: a prompt split into
micro-batches, or decoded token by token, gives the rows of the whole prompt bit for bit (the
kernels are batch invariant; the state is carried between steps), matching the reference
interpreter; the recurrent state snapshots and restores; greedy speculative decoding (n-gram and
draft-model drafts, per-position states or checkpoint and re-decode on partial acceptance) gives
the tokens of plain decoding."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions
from ember.runtime.speculative import ModelDraft, NgramDraft, speculative_generate
from model_steps import ReferenceSession, nmse
from tiny_gguf_hybrid import HYBRID_ARCHS, HybridSpec

PROMPT = [1, 17, 260, 300, 42, 9, 33]        # the peer tests' prompt and options: same step graphs
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=32)

# a cold CPU step graph takes seconds to compile: lfm2 by default, the other two with the slow tests
CPU_ARCHS = [a if a == "lfm2" else pytest.param(a, marks=pytest.mark.slow) for a in HYBRID_ARCHS]


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_decode_rows_and_micro_batches_equal_the_batched_prompt(tiny_files, cpu, arch):
    model = load_model(tiny_files[HybridSpec(arch)])
    session = Session(model, cpu, OPTIONS)
    whole = session.eval(PROMPT, all_logits=True)
    assert list(session.recurrent_state()) == model.state_names()
    session.reset()
    decoded = np.concatenate([session.eval([t]) for t in PROMPT])
    split = Session(model, cpu, SessionOptions(n_ctx=OPTIONS.n_ctx, kv_bucket=OPTIONS.kv_bucket, ubatch=3))
    np.testing.assert_array_equal(decoded, whole)
    np.testing.assert_array_equal(split.eval(PROMPT, all_logits=True), whole)
    assert nmse(whole, ReferenceSession(model, OPTIONS.kv_bucket).step(PROMPT)) < 1e-9


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_recurrent_state_snapshot_and_restore(tiny_files, cpu, arch):
    session = Session(load_model(tiny_files[HybridSpec(arch)]), cpu, OPTIONS)
    session.eval(PROMPT, all_logits=True)
    snapshot, position = session.recurrent_state(), session.n_past
    after = session.eval([5])
    session.eval([7])
    session.set_recurrent_state(snapshot, n_past=position)
    np.testing.assert_array_equal(session.eval([5]), after)


def repetitive_prompt(seed: int) -> list[int]:
    motif = list(np.random.default_rng(seed).integers(3, 300, size=4))
    return [1] + (motif * 4)[:11]


# a draft model of another arch for each target, chosen to disagree with it on the test prompt (the
# tiny lfm2 and lfm2moe both settle on the same token, so neither drafts for the other)
DISAGREEING_DRAFT = {"lfm2": "nemotron_h", "nemotron_h": "falcon-h1", "falcon-h1": "lfm2moe",
                     "lfm2moe": "nemotron_h"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
@pytest.mark.parametrize("drafter", ["ngram", "model"])
@pytest.mark.parametrize("rollback", ["states", "redecode"])
def test_speculation_is_token_identical(tiny_files, cpu, arch, drafter, rollback):
    """n-gram drafts (the tiny lfm2 settles on one token, so every draft is accepted there), and
    drafts from another of the three models (same vocabulary, other weights: rejected tails, so
    the target keeps the accepted prefix's state, or restores its checkpoint and re-decodes, and
    the recurrent draft rewinds)."""
    model = load_model(tiny_files[HybridSpec(arch)])
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    options = SessionOptions(n_ctx=96, kv_bucket=32)
    target = Session(model, cpu, options)
    prompt = repetitive_prompt(7)
    expected = generate(target, tokenizer, prompt, 24, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    if drafter == "ngram":
        draft, draft_max = NgramDraft(), 5
    else:
        other = DISAGREEING_DRAFT[arch]
        draft, draft_max = ModelDraft(Session(load_model(tiny_files[HybridSpec(other)]), cpu, options)), 3
    got, stats = speculative_generate(target, draft, tokenizer, prompt, 24, draft_max=draft_max,
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected
    assert stats.drafted > 0
    if drafter == "model":
        assert stats.accepted < stats.drafted
        assert (stats.redecode_seconds > 0) == (rollback == "redecode")
