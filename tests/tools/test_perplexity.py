"""Perplexity by llama-perplexity's method: the NLL of one row, the final estimate and its error,
which tokens are scored, and the chunking."""
import math

import numpy as np
import pytest

from ember.errors import EmberError
from ember.tools.perplexity import Perplexity, chunk_nll, estimate, perplexity, token_nll


def test_token_nll_is_minus_log_softmax_of_the_target():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((50, 1000)) * 5).astype(np.float32)
    targets = rng.integers(0, 1000, 50)
    x = logits.astype(np.float64)
    expected = -(x[np.arange(50), targets] - x.max(1) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)))
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-6)


def test_estimate_is_llama_cpps_final_estimate():
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    ppl, error = estimate(nll)
    mean = 2.5
    assert ppl == pytest.approx(math.exp(mean))
    # llama.cpp: sqrt((mean(nll^2) - mean^2) / (count - 1)) * ppl
    assert error == pytest.approx(math.sqrt((7.5 - mean ** 2) / 3) * math.exp(mean))


def test_final_line_format():
    line = Perplexity(12.345678, 0.1234567, 2, 10, 0.0, 0.0).final_line()
    assert line == "Final estimate: PPL = 12.3457 +/- 0.12346"


class RecordingEvaluator:
    """Uniform logits over n_vocab: every scored token has NLL log(n_vocab)."""

    def __init__(self, n_vocab: int):
        self.n_vocab, self.calls = n_vocab, []

    def __call__(self, chunk, first):
        self.calls.append((list(chunk), first))
        return np.zeros((len(chunk) - first, self.n_vocab), np.float32)


def test_chunks_start_with_bos_and_only_the_second_half_is_scored():
    tokens = list(range(100, 100 + 70))     # 70 tokens, n_ctx 16: 4 chunks, 6 tokens left over
    evaluator = RecordingEvaluator(n_vocab=500)
    seen = []
    result = perplexity(evaluator, tokens, 16, bos_id=2, on_chunk=lambda i, n, p: seen.append((i, n)))
    assert [c[0] for c, _ in evaluator.calls] == [2, 2, 2, 2]
    assert [c[1:] for c, _ in evaluator.calls] == [tokens[i * 16 + 1:(i + 1) * 16] for i in range(4)]
    assert all(first == 8 for _, first in evaluator.calls)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert result.n_chunks == 4 and result.n_scored == 4 * 7     # positions 8..14 of each chunk
    assert result.ppl == pytest.approx(500) and result.error < 1e-4   # rounding only


def test_chunk_nll_scores_next_tokens_from_the_first_scored_position():
    chunk = [1, 5, 6, 7, 3, 4]       # first = 3: logits at positions 3, 4 predict tokens 3 and 4

    def eval_chunk(tokens, first):
        logits = np.full((len(tokens) - first, 10), -30.0, np.float32)
        for row, position in enumerate(range(first, len(tokens))):
            if position + 1 < len(tokens):
                logits[row, tokens[position + 1]] = 30.0     # certain of the right next token
        return logits

    assert np.all(chunk_nll(eval_chunk, chunk, bos_id=None) < 1e-20)
    assert chunk_nll(eval_chunk, chunk, bos_id=None).shape == (2,)


def test_too_short_a_text_is_an_error():
    with pytest.raises(EmberError, match="you need at least 64 tokens .* only 40 tokens"):
        perplexity(RecordingEvaluator(10), list(range(40)), 32, bos_id=None)


def test_max_chunks_limits_the_chunks_scored():
    evaluator = RecordingEvaluator(100)
    result = perplexity(evaluator, list(range(70)), 16, bos_id=None, max_chunks=1)
    assert result.n_chunks == 1 and len(evaluator.calls) == 1 and result.n_scored == 7
