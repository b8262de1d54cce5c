"""Choosing the next token from logits: greedy, or llama.cpp's default chain
(repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw), seeded.

Greedy (temperature <= 0) is an argmax with the lowest index winning ties, the same rule as
the `argmax` op, so a greedy run is reproducible bit for bit.

Top-k on a large vocabulary (262k for Gemma 3) is the costly step: a full `argpartition` takes
~0.7 ms, most of a sampled token's overhead. `top_k_ids` first narrows the vocabulary to a few
thousand candidates that must hold the top k (`_top_k_candidates`), then partitions only those.
The result is exact, with ties at the k-th place going to the lowest ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import math

import numpy as np

from ember.errors import EmberError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # 0 = off
    top_p: float = 0.95        # 1.0 = off
    min_p: float = 0.05        # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    seed: int = 0

    def __post_init__(self):
        # Each value outside its meaning is refused, named by its llama.cpp flag: a repeat
        # penalty of 0 once gave a NumPy warning and then a reduction error, top_p 2 nothing.
        problems = []
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"--temp {self.temperature}: must be finite and >= 0 (0 = greedy)")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1] (1 = off)")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"--min-p {self.min_p}: must be in [0, 1] (0 = off)")
        if not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            problems.append(f"--repeat-penalty {self.repeat_penalty}: must be finite and > 0 (1 = off)")
        if self.repeat_last_n < 0:
            problems.append(f"repeat_last_n {self.repeat_last_n}: must be >= 0")
        if problems:
            raise EmberError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Sampler:
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)

    def state(self):
        """The random generator's state, to restore after a rejected speculative draft."""
        return self.rng.bit_generator.state

    def restore(self, state) -> None:
        self.rng.bit_generator.state = state

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token after history from its logits; NaN or infinite logits (a model whose
        computation overflowed) are refused, never sampled (they printed <unk>s, exit 0)."""
        logits = np.asarray(logits, dtype=np.float32)
        check_finite(logits, len(history))
        p = self.params
        if p.repeat_penalty != 1.0 and history:
            logits = apply_repeat_penalty(logits, history[-p.repeat_last_n:], p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        ids, probs = candidate_probs(logits, p)
        return int(ids[draw(self.rng, probs)])


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """`rng.choice(len(probs), p=probs)` without its argument checks (a tenth of a sampled
    token's cost): the same cumulative sum, one uniform double, the same search, so the same
    draws from the same seed."""
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def check_finite(logits: np.ndarray, position: int) -> None:
    """Raise an EmberError naming the step whose logits hold NaN or infinity."""
    finite = np.isfinite(logits)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise EmberError(f"the logits after {position} tokens are not finite (token {bad}: "
                         f"{logits[bad]}, {int((~finite).sum())} of {logits.size}): the model's "
                         f"computation overflowed; refusing to sample from them")


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def candidate_probs(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids left after top-k / top-p / min-p, and their probabilities at the temperature."""
    n = logits.shape[-1]
    ids = top_k_ids(logits, p.top_k if 0 < p.top_k < n else n)
    vals = logits[ids].astype(np.float64)
    probs = _softmax(vals)
    if p.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        ids, vals, probs = ids[:keep], vals[:keep], probs[:keep]
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        ids, vals = ids[keep], vals[keep]
    probs = _softmax(vals / p.temperature)
    return ids, probs


GRID_ROWS = 64   # the logits are read as a 64-row grid; its column maxima pick the candidates


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, ordered by logit (descending) then id (ascending); of
    logits tied at the k-th place, the lowest ids are kept."""
    n = logits.shape[-1]
    if k >= n:
        ids = np.arange(n)
    else:
        ids = _top_k_candidates(logits, k)
        vals = logits[ids]
        kth = np.partition(vals, len(vals) - k)[len(vals) - k]
        above = vals > kth
        tied = np.sort(ids[vals == kth])[:k - int(above.sum())]
        ids = np.concatenate([ids[above], tied])
    # Sort by logit, ties by id, so the candidate order (and the draw) is deterministic.
    return ids[np.lexsort((ids, -logits[ids]))]


def _top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids that include every logit >= the k-th largest, found with a few vectorised
    passes: read the logits as a grid, keep the k columns with the largest maxima (k values,
    each in a different column, are >= their k-th largest maximum, so no top-k logit lies in a
    column whose maximum is below it), plus the ragged tail that does not fill a row."""
    n = logits.shape[-1]
    width = n // GRID_ROWS
    if width <= k:
        return np.arange(n)
    grid = logits[:width * GRID_ROWS].reshape(GRID_ROWS, width)
    column_max = grid.max(axis=0)
    cut = np.partition(column_max, width - k)[width - k]
    columns = np.flatnonzero(column_max >= cut)
    ids = (np.arange(GRID_ROWS)[:, None] * width + columns[None, :]).ravel()
    return np.concatenate([ids, np.arange(width * GRID_ROWS, n)])


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()
