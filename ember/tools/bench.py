"""Throughput by llama-bench's method (llama.cpp tools/llama-bench).

pp<N>: N random tokens (BOS first when the model adds one) in one batch; tg<N>: N single-token
decodes, starting with BOS, each next token random. With a depth D (llama-bench's -d), D random
tokens are decoded first, untimed, so the test runs against a cache already D tokens deep; the
test is then named "pp512 @ d4096". Every repetition starts from an empty cache;
one untimed warm-up run comes first (for ember it also compiles the step graphs); the result is
the mean and sample standard deviation of tokens per second over the repetitions.

`prompt_run` and `decode_run` take an engine as two callables, so bench/models.py measures
llama.cpp with the very same loop. Imports NumPy only.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

Reset = Callable[[], None]
Decode = Callable[[Sequence[int]], object]


@dataclass
class BenchResult:
    test: str                       # "pp512", "tg128"
    n_tokens: int
    seconds: list[float] = field(default_factory=list)
    host_seconds_per_token: float | None = None   # ember decode steps: time outside the kernels

    @property
    def samples(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.seconds) > 1 else 0.0

    def cell(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def random_tokens(rng: np.random.Generator, n: int, n_vocab: int, bos_id: int | None) -> list[int]:
    tokens = [int(t) for t in rng.integers(0, n_vocab, n)]
    if bos_id is not None and tokens:
        tokens[0] = bos_id
    return tokens


def prompt_run(reset: Reset, decode: Decode, tokens: Sequence[int], depth: Sequence[int] = ()) -> float:
    """Seconds for one batch of tokens after an empty cache was filled with `depth` (untimed)."""
    reset()
    if depth:
        decode(depth)
    start = time.perf_counter()
    decode(tokens)
    return time.perf_counter() - start


def decode_run(reset: Reset, decode: Decode, tokens: Sequence[int], depth: Sequence[int] = ()) -> float:
    """Seconds for len(tokens) single-token decodes after an empty cache was filled with
    `depth` (untimed)."""
    reset()
    if depth:
        decode(depth)
    start = time.perf_counter()
    for t in tokens:
        decode([t])
    return time.perf_counter() - start


def test_name(kind: str, n_tokens: int, depth: int) -> str:
    return f"{kind}{n_tokens}" + (f" @ d{depth}" if depth else "")


def bench_session(session, n_prompt: int, n_gen: int, reps: int, bos_id: int | None,
                  seed: int = 0, progress=None, depth: int = 0) -> list[BenchResult]:
    """pp{n_prompt} and tg{n_gen} (a test with 0 tokens is left out) on an ember Session, each
    after `depth` untimed tokens. progress(message), when given, hears of each run."""
    progress = progress or (lambda message: None)
    rng = np.random.default_rng(seed)
    vocab = session.model.hparams.n_vocab

    def fill() -> list[int]:
        return random_tokens(rng, depth, vocab, bos_id)

    results = []
    if n_prompt:
        result = BenchResult(test_name("pp", n_prompt, depth), n_prompt)
        for rep in range(reps + 1):
            seconds = prompt_run(session.reset, session.eval, random_tokens(rng, n_prompt, vocab, None if depth else bos_id),
                                 fill())
            if rep:                         # rep 0 is the warm-up
                result.seconds.append(seconds)
            progress(_run_line(result.test, rep, reps, n_prompt / seconds))
        results.append(result)
    if n_gen:
        result = BenchResult(test_name("tg", n_gen, depth), n_gen)
        host = steps = 0.0
        for rep in range(reps + 1):
            host_before, steps_before = session.stats.host_seconds, session.stats.decode_tokens
            seconds = decode_run(session.reset, session.eval, random_tokens(rng, n_gen, vocab, None if depth else bos_id),
                                 fill())
            if rep:
                result.seconds.append(seconds)
                host += session.stats.host_seconds - host_before
                steps += session.stats.decode_tokens - steps_before
            progress(_run_line(result.test, rep, reps, n_gen / seconds))
        result.host_seconds_per_token = host / steps if steps else None
        results.append(result)
    return results


def _run_line(test: str, rep: int, reps: int, tps: float) -> str:
    which = "warm-up (compiles)" if rep == 0 else f"repetition {rep}/{reps}"
    return f"{test}: {which}: {tps:.1f} t/s"


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str], right: Sequence[bool]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bench_table(model: str, backend: str, threads: int, results: Sequence[BenchResult]) -> str:
    """The llama-bench style table: one row per test."""
    rows = [(model, backend, str(threads), r.test, r.cell()) for r in results]
    return markdown_table(rows, ("model", "backend", "threads", "test", "t/s"),
                          (False, False, True, False, True))
