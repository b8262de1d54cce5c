"""Mutation fuzzing of what ember reads from outside (issue 16; the fuzzers are in
tests/support/fuzzing.py): every input must be accepted (with finite results matching the
reference where it runs) or refused with one line; no traceback, crash, hang or silent wrong
output. Each input runs in a worker process, so a crash is counted, not fatal.

The default run holds a fast subset (GGUF mutations, a few IR mutations compiled on the CPU);
the `slow` tests run every class on more seeds, the IR and cache classes also on a GPU backend
when one is available (`python tests/support/fuzzing.py --slow` prints the RELIABILITY table)."""
from __future__ import annotations

import pytest

from fuzzing import GOOD, Runner, campaign, gpu_backend


def fuzz(tmp_path, counts, seed0=0, gpu=None):
    runner = Runner()
    try:
        campaign(tmp_path, counts, runner, seed0=seed0, gpu=gpu)
    finally:
        runner.close()
    bad = [f"{cls}: {what}: {why}" for cls, what, why in runner.bad]
    assert not bad, "\n".join(bad[:20])
    for cls, n in counts.items():
        if cls in runner.counts:
            assert sum(runner.counts[cls].values()) >= n and set(runner.counts[cls]) <= set(GOOD)
    return runner


def test_gguf_mutations_fast(tmp_path):
    runner = fuzz(tmp_path, {"gguf": 200})
    assert runner.counts["gguf"]["refused"] > 100      # the mutations do break files


def test_ir_mutations_fast(tmp_path):
    fuzz(tmp_path, {"ir": 3, "ir_default_cache": 1}, seed0=1000)


@pytest.mark.slow
def test_gguf_mutations(tmp_path):
    fuzz(tmp_path, {"gguf": 1500, "gguf_run": 10}, seed0=10_000)


@pytest.mark.slow
def test_ir_mutations_cpu_and_gpu(tmp_path):
    fuzz(tmp_path, {"ir": 40}, seed0=20_000, gpu=gpu_backend())


@pytest.mark.slow
def test_artifact_tampering(tmp_path):
    fuzz(tmp_path, {"artifact": 40}, seed0=30_000)


@pytest.mark.slow
def test_cache_corruption(tmp_path):
    fuzz(tmp_path, {"cache": 12}, seed0=40_000, gpu=gpu_backend())
