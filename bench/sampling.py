"""Sampling cost per token on a Gemma-3-sized vocabulary (262,144 logits), llama.cpp's default
chain (top-k 40 -> top-p 0.95 -> min-p 0.05 -> temperature 0.8): ember's sampler against the
same chain with a full `argpartition` for top-k (the sampler before the candidate grid), side
by side in one run, with the draws checked equal.

    python bench/sampling.py [--tokens 2000] [--vocab 262144]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ember.runtime import sampling
from ember.runtime.sampling import Sampler, SamplingParams


def full_partition_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    n = logits.shape[-1]
    ids = np.argpartition(-logits, k - 1)[:k] if k < n else np.arange(n)
    return ids[np.lexsort((ids, -logits[ids]))]


def per_token_ms(rows: np.ndarray, top_k_ids) -> tuple[float, list[int]]:
    original = sampling.top_k_ids
    sampling.top_k_ids = top_k_ids
    try:
        sampler = Sampler(SamplingParams(seed=11))
        start = time.perf_counter()
        draws = [sampler.sample(row) for row in rows]
        return (time.perf_counter() - start) / len(rows) * 1e3, draws
    finally:
        sampling.top_k_ids = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((64, args.vocab)) * 3).astype(np.float32)
    rows = rows[np.arange(args.tokens) % len(rows)]
    ember_ms, full_ms = [], []
    for _ in range(args.reps):      # interleaved, so load on a shared machine hits both alike
        ms, ours = per_token_ms(rows, sampling.top_k_ids)
        ember_ms.append(ms)
        ms, theirs = per_token_ms(rows, full_partition_top_k)
        full_ms.append(ms)
        assert ours == theirs, "the candidate grid changed a draw"
    e, f = statistics.median(ember_ms), statistics.median(full_ms)
    print(f"| sampler | ms per token | vs full argpartition |\n|---|---|---|\n"
          f"| ember (candidate grid) | {e:.3f} | {f / e:.1f}x faster |\n"
          f"| full argpartition | {f:.3f} | 1.0x |")


if __name__ == "__main__":
    main()
