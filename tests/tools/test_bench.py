"""The llama-bench method: what one timed run does, the statistics, and the table."""
import statistics

import numpy as np
import pytest

from ember.tools.bench import BenchResult, bench_table, decode_run, prompt_run, random_tokens


class Engine:
    def __init__(self):
        self.log = []

    def reset(self):
        self.log.append("reset")

    def decode(self, tokens):
        self.log.append(list(tokens))


def test_prompt_run_is_one_batch_from_an_empty_cache():
    engine = Engine()
    assert prompt_run(engine.reset, engine.decode, [2, 5, 6, 7]) >= 0
    assert engine.log == ["reset", [2, 5, 6, 7]]


def test_decode_run_is_single_tokens_from_an_empty_cache():
    engine = Engine()
    decode_run(engine.reset, engine.decode, [2, 5, 6])
    assert engine.log == ["reset", [2], [5], [6]]


def test_random_tokens_start_with_bos_and_repeat_with_the_seed():
    a = random_tokens(np.random.default_rng(3), 8, 100, bos_id=2)
    b = random_tokens(np.random.default_rng(3), 8, 100, bos_id=2)
    assert a == b and a[0] == 2 and all(0 <= t < 100 for t in a)
    assert random_tokens(np.random.default_rng(3), 8, 100, bos_id=None)[1:] == a[1:]


def test_result_is_mean_and_sample_std_of_tokens_per_second():
    r = BenchResult("pp512", 512, seconds=[1.0, 2.0, 4.0])
    assert r.samples == [512.0, 256.0, 128.0]
    assert r.mean == pytest.approx(statistics.fmean([512, 256, 128]))
    assert r.std == pytest.approx(statistics.stdev([512, 256, 128]))
    assert r.cell() == f"{r.mean:.2f} ± {r.std:.2f}"


def test_table_has_a_row_per_test():
    table = bench_table("gemma3 tiny", "cpu", 2, [BenchResult("pp512", 512, [1.0, 1.0]),
                                                  BenchResult("tg128", 128, [2.0, 2.0])])
    lines = table.splitlines()
    assert lines[0] == "| model | backend | threads | test | t/s |"
    assert lines[2] == "| gemma3 tiny | cpu | 2 | pp512 | 512.00 ± 0.00 |"
    assert lines[3] == "| gemma3 tiny | cpu | 2 | tg128 | 64.00 ± 0.00 |"


def test_a_depth_is_decoded_untimed_after_the_reset():
    engine = Engine()
    prompt_run(engine.reset, engine.decode, [7, 8], depth=[2, 3, 4])
    decode_run(engine.reset, engine.decode, [5, 6], depth=[2, 3, 4])
    assert engine.log == ["reset", [2, 3, 4], [7, 8], "reset", [2, 3, 4], [5], [6]]
