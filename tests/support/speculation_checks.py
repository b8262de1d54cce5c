"""A check the model tests share: greedy n-gram speculation gives greedy decoding's tokens."""
from __future__ import annotations

from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.speculative import NgramDraft, speculative_generate

# a prompt whose repeats give the n-gram drafter something to find
REPEATING_PROMPT = [1] + [17, 42, 99, 5] * 3 + [17, 42, 99]


def assert_ngram_speculation_is_greedy(session, prompt=REPEATING_PROMPT, n_predict: int = 14,
                                       draft_max: int = 3) -> None:
    """Greedy decoding of prompt, then n-gram speculation from a reset session: the same tokens,
    and at least one token drafted (else the check would prove nothing)."""
    tokenizer = Tokenizer.from_metadata(session.model.tokenizer)
    session.reset()
    expected = generate(session, tokenizer, prompt, n_predict, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    session.reset()
    got, stats = speculative_generate(session, NgramDraft(), tokenizer, prompt, n_predict,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected and stats.drafted > 0
