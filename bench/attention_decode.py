"""Decode attention on the CPU backend against the machine's read bandwidth.

One query token over a KV cache of `depth` keys (the attention op alone, compiled through
CpuBackend with the thread count pinned): GB/s of K and V cache read per call, beside the C
stream-read bandwidth of bench/ops.py measured in the same run. At depth 4096 a decode step of
the default model reads about 20 MB of KV cache against 247 MB of weights; this shows how close
its attention comes to the memory. Default shape: a global layer of gemma-3-270m (4 query heads
sharing 1 KV head of 256, f16 cache). Times are medians of `reps` batches of calls; --cpu-time
uses the process's CPU seconds (a loaded machine), as bench/ops.py does; --best takes the
fastest batch instead of the median (on a loaded machine, the batch least disturbed).

    python bench/attention_decode.py [--threads 2] [--depths 512,4096] [--reps 7] [--cpu-time] [--best]
                                     [--markdown]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.ops import CLOCK, StreamRead, median_time  # noqa: E402
from bench.tables import print_table  # noqa: E402

CALLS = 20      # calls per timed batch


def attention_run(threads: int, depth: int, hq: int, hkv: int, d: int):
    """(run, KV bytes per call): the attention op of one query over depth f16 keys and values."""
    from ember.backends.cpu.backend import CpuBackend
    from ember.ir.builder import GraphBuilder
    b = GraphBuilder("attention_decode")
    q = b.input("q", "f32", (1, hq, d))
    k = b.input("k", "f16", (depth, hkv, d))
    v = b.input("v", "f16", (depth, hkv, d))
    graph = b.build(b.attention(q, k, v, scale=d ** -0.5))
    backend = CpuBackend(threads=threads, cache_dir=Path(tempfile.gettempdir()) / "ember-bench-cache",
                         adapt_threads=False)
    rng = np.random.default_rng(0)
    kv = {name: rng.standard_normal((depth, hkv, d)).astype(np.float16) for name in ("k", "v")}
    run = backend.compile(graph).bind({"q": rng.standard_normal((1, hq, d)).astype(np.float32), **kv})
    return run, kv["k"].nbytes + kv["v"].nbytes


def best_time(fn, reps: int) -> float:
    """The fastest of reps calls of fn (after a warm-up), by bench/ops.py's clock."""
    fn()
    times = []
    for _ in range(reps):
        t0 = CLOCK["fn"]()
        fn()
        times.append(CLOCK["fn"]() - t0)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depths", default="512,4096", help="comma-separated KV lengths")
    parser.add_argument("--heads", default="4,1,256", help="query heads, KV heads, head size")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU seconds")
    parser.add_argument("--best", action="store_true", help="the fastest batch instead of the median")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.cpu_time:
        CLOCK["fn"] = time.process_time
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    load_before = os.getloadavg()[0]
    read = StreamRead(args.threads, args.reps).gb_per_s()
    rows = [("read bandwidth (C stream, 512 MiB)", f"{read:.1f} GB/s", "", "")]
    for depth in (int(x) for x in args.depths.split(",")):
        run, nbytes = attention_run(args.threads, depth, hq, hkv, d)

        def batch():
            for _ in range(CALLS):
                run()
        seconds = (best_time(batch, args.reps) if args.best else median_time(batch, args.reps)) / CALLS
        rows.append((f"attention T=1 Hq={hq} Hkv={hkv} D={d} depth {depth} (f16)",
                     f"{nbytes / seconds / 1e9:.1f} GB/s", f"{seconds * 1e6:.0f} us", f"{nbytes / seconds / 1e9 / read:.2f}x"))
    clock = ("CPU time" if args.cpu_time else "wall clock") + (", fastest batch" if args.best else "")
    title = (f"decode attention, {args.threads} threads, median of {args.reps}, {clock} "
             f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
    print_table(title, ("case", "KV read", "per call", "of stream read"), rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
