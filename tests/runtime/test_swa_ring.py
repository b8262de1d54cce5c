"""Sliding-window layers keep a ring of window + ubatch rows instead of the whole context:
the same logits as a full-size cache, token-identical speculation, sequences kept apart."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.memory import SequenceMemory
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions
from ember.runtime.speculative import NgramDraft, speculative_generate
from model_steps import ReferenceSession, nmse
from tiny_gguf import Spec

# tiny gemma3: layer 0 has a window of 3, layer 1 is global; the ring: 3 + 4 -> 8 rows (rounded up
# to the KV bucket). The full-size cache grows in buckets of 16 rows: fewer step graphs to compile
# (suite time), the same logits
RING = SessionOptions(n_ctx=64, ubatch=4, kv_bucket=4)
FULL = SessionOptions(n_ctx=64, ubatch=4, kv_bucket=16, swa_full=True)
PROMPT = [2, 17, 42, 99, 5, 23, 64, 7, 11, 3, 8, 19, 30]


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    return get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp("ring-cache"))


@pytest.fixture(scope="module")
def gemma(tiny_files):
    return load_model(tiny_files[Spec("gemma3", "f32")])


def teacher_forced(session, tokens):
    """Logits of every token: the prompt in micro-batches, then one token at a time."""
    rows = [session.eval(tokens[:len(PROMPT)], all_logits=True)]
    rows += [session.eval([t]) for t in tokens[len(PROMPT):]]
    return np.concatenate(rows)


def test_ring_has_window_plus_ubatch_rows(gemma, cpu):
    s = Session(gemma, cpu, RING)
    assert s.swa_rows == 8
    assert [c.shape[0] for c in s.k_cache] == [8, 64]        # layer 0 windowed, layer 1 global
    assert Session(gemma, cpu, FULL).swa_rows == 64


# slow (suite time): the ring against the reference also runs by default in
# test_kv_cache_session.py, and truncate/fork over a wrapped ring below
@pytest.mark.slow
def test_ring_matches_full_cache_and_reference(gemma, cpu):
    tokens = PROMPT + [int(t) for t in np.random.default_rng(3).integers(3, 200, 19)]   # wraps 3 times
    ring = teacher_forced(Session(gemma, cpu, RING), tokens)
    full = teacher_forced(Session(gemma, cpu, FULL), tokens)
    # the same keys in another order within the ring: equal up to summation order
    assert nmse(ring, full) < 1e-10
    assert nmse(ring, ReferenceSession(gemma, 64).step(tokens)) < 1e-9


def test_truncate_and_fork_with_a_wrapped_ring(gemma, cpu):
    s = Session(gemma, cpu, RING)
    mem = SequenceMemory(s)
    s.eval(PROMPT)                                  # 13 positions: the ring has wrapped
    mem.fork(1)
    a = s.eval([50, 51, 52])                         # overwrites ring rows of positions 5..7
    s.truncate(len(PROMPT))
    again = s.eval([50, 51, 52])                     # rows 13..15 hold positions 13..15 again
    np.testing.assert_array_equal(a, again)
    s.eval([60, 61, 62, 63, 64])                     # sequence 0 goes on past the fork
    mem.switch(1)
    np.testing.assert_array_equal(s.eval([50, 51, 52]), a)


@pytest.mark.slow      # suite time; test_kv_cache_session.py speculates over a ring by default
@pytest.mark.parametrize("draft_max", [3, 8])
def test_speculation_is_token_identical_over_the_ring(gemma, cpu, draft_max):
    options = SessionOptions(n_ctx=64, ubatch=8, kv_bucket=16)    # ring of 3 + 8 -> 16 rows: wraps
    session = Session(gemma, cpu, options)
    tokenizer = Tokenizer.from_metadata(gemma.tokenizer)
    prompt = [2] + [17, 42, 99, 5] * 3
    expected = generate(session, tokenizer, prompt, 40, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    got, stats = speculative_generate(session, NgramDraft(), tokenizer, prompt, 40,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected and stats.drafted > 0
