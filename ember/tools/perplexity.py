"""Perplexity by llama-perplexity's method (llama.cpp tools/perplexity, `perplexity()`).

The whole text is tokenized once (BOS first when the model adds one) and cut into n_chunk =
n_tokens // n_ctx non-overlapping chunks of n_ctx tokens; each chunk runs from an empty cache
with its first token replaced by BOS, and only its second half is scored: the logits at
positions n_ctx/2 .. n_ctx-2 predict the next token. PPL = exp(mean NLL); the error is
llama.cpp's: PPL times the standard error of the mean NLL. `token_nll` follows its
log_softmax (float logits, the sum of exponentials in double), so the same function turns
another engine's logits into directly comparable numbers.

Imports NumPy and the session only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ember.errors import EmberError

ROWS_PER_BLOCK = 32     # softmax rows at a time: bounds the temporary exponentials


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    error: float            # PPL * standard error of the mean NLL, as llama.cpp prints it
    n_chunks: int
    n_scored: int           # tokens scored
    nll_sum: float
    nll2_sum: float

    def final_line(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.error:.5f}"


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, as llama.cpp's log_softmax computes it:
    max_logit + log(sum exp(logit - max_logit)) - logit[target], exponentials in float and
    their sum in double."""
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != targets.size:
        raise ValueError(f"token_nll: {logits.shape} logits for {targets.size} targets")
    out = np.empty(targets.size, np.float64)
    for begin in range(0, targets.size, ROWS_PER_BLOCK):
        rows = logits[begin:begin + ROWS_PER_BLOCK]
        top = rows.max(axis=1)
        sum_exp = np.exp(rows - top[:, None]).sum(axis=1, dtype=np.float64)
        picked = rows[np.arange(rows.shape[0]), targets[begin:begin + ROWS_PER_BLOCK]]
        out[begin:begin + rows.shape[0]] = top.astype(np.float64) + np.log(sum_exp) - picked
    return out


def estimate(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, error) from the NLL of every scored token, as llama.cpp's final estimate."""
    count = nll.size
    mean = float(nll.sum()) / count
    var = float((nll * nll).sum()) / count - mean * mean
    ppl = math.exp(mean)
    return ppl, (math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0)


def chunk_nll(eval_chunk: Callable[[list[int], int], np.ndarray], tokens: Sequence[int],
              bos_id: int | None) -> np.ndarray:
    """The NLL of the scored half of one chunk. eval_chunk(chunk_tokens, first) runs the chunk
    from an empty cache and returns the logits of positions first .. n_ctx-1."""
    chunk = list(tokens)
    n_ctx = len(chunk)
    first = n_ctx // 2
    if bos_id is not None:
        chunk[0] = bos_id
    logits = eval_chunk(chunk, first)
    if logits.shape[0] != n_ctx - first:
        raise ValueError(f"chunk_nll: got {logits.shape[0]} rows of logits, expected {n_ctx - first}")
    # the logits at position j predict token j + 1; the last position predicts nothing
    return token_nll(logits[:-1], chunk[first + 1:])


def session_chunk_evaluator(session) -> Callable[[list[int], int], np.ndarray]:
    """eval_chunk for an ember Session: the first half runs without logits, the second half
    with every row's (only those are scored, as llama.cpp outputs only them)."""
    def eval_chunk(chunk: list[int], first: int) -> np.ndarray:
        session.reset()
        if first:
            session.eval(chunk[:first])
        return session.eval(chunk[first:], all_logits=True)
    return eval_chunk


def perplexity(eval_chunk: Callable[[list[int], int], np.ndarray], tokens: Sequence[int], n_ctx: int,
               bos_id: int | None, on_chunk: Callable[[int, int, float], None] | None = None,
               max_chunks: int = 0) -> Perplexity:
    """llama-perplexity over tokens (already tokenized, BOS first when the model adds one),
    at most max_chunks chunks when it is positive (llama-perplexity's --chunks).
    on_chunk(i, n_chunk, running PPL) is called after each chunk."""
    if n_ctx < 4:
        raise EmberError(f"perplexity: the context must be at least 4 tokens, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise EmberError(f"perplexity: you need at least {2 * n_ctx} tokens to evaluate perplexity "
                         f"with a context of {n_ctx}; the text tokenizes to only {len(tokens)} tokens")
    n_chunk = len(tokens) // n_ctx
    if max_chunks > 0:
        n_chunk = min(n_chunk, max_chunks)
    pieces = []
    nll_sum = 0.0
    count = 0
    for i in range(n_chunk):
        nll = chunk_nll(eval_chunk, tokens[i * n_ctx:(i + 1) * n_ctx], bos_id)
        pieces.append(nll)
        nll_sum += float(nll.sum())
        count += nll.size
        if on_chunk:
            on_chunk(i, n_chunk, math.exp(nll_sum / count))
    nll = np.concatenate(pieces)
    ppl, error = estimate(nll)
    return Perplexity(ppl, error, n_chunk, int(nll.size), float(nll.sum()), float((nll * nll).sum()))
