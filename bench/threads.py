"""Decode with 1 and 2 threads, alone and beside one busy process, ember against llama.cpp.

Issue 18 (threads under contention): on a 2-core machine where another process keeps a core
busy, a 2-thread decode step can fall below the 1-thread speed when a thread waiting at a
barrier holds its core while the teammate it waits for is queued behind the other process.
This measures tg (llama-bench's method, bench/models.py's workers: one process per engine and
thread count, cache cleared before each run, one untimed warm-up) for ember and llama.cpp with
1 and 2 threads, in two conditions taken in turns: "alone" (nothing of ours beside it) and
"busy" (one child process spinning on the CPU for the whole turn). Within a condition the
workers take turns run by run, so load from elsewhere falls on all alike. The target: with
the busy process, 2 threads never slower than 0.9x of 1 thread.

"ember-adaptive" is ember with each step graph's team governor on (common.h;
CpuBackend(adapt_threads=True)): it runs fewer threads than asked when fewer have been faster
lately; "ember" (the default) pins the thread count, what the barrier alone gives. --engines picks the engines
(on a loaded machine llama.cpp's 2-thread decode beside the spinner can take minutes per run).

    python bench/threads.py [--model GGUF] [--n-gen 64] [--reps 3] [--engines ember,ember-adaptive,llama.cpp]
                            [--markdown]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.models import Worker, kill_workers, quit_workers  # noqa: E402
from ember.tools.bench import BenchResult, test_name  # noqa: E402
from bench.tables import print_table  # noqa: E402

ENGINES = ("ember", "ember-adaptive", "llama.cpp")
THREADS = (1, 2)
CONDITIONS = ("alone", "busy")
SPINNER = "while True:\n    pass\n"
SETTLE_S = 0.5           # the spinner's start (and the scheduler's placement) before timed runs


class Spinner:
    """One child process that keeps one core busy while the `with` block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SPINNER])
        time.sleep(SETTLE_S)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def start_workers(args) -> list[tuple[str, int, Worker]]:
    """(engine, threads, worker) for every engine and thread count, started one at a time (no
    warm-up, which for ember includes compiling, overlaps another)."""
    workers = []
    for engine in args.engines:
        for threads in THREADS:
            wargs = argparse.Namespace(model=args.model, threads=threads, n_prompt=0, n_gen=args.n_gen,
                                       seed=0, depth=0)
            w = Worker(engine, wargs, tests="tg")
            w.read()
            workers.append((engine, threads, w))
    return workers


def measure(args) -> tuple[dict, list[float]]:
    """{(engine, threads, condition): BenchResult}, and the 1-minute load averages seen."""
    results = {(e, t, c): BenchResult(test_name("tg", args.n_gen, 0), args.n_gen)
               for e in args.engines for t in THREADS for c in CONDITIONS}
    loads = [os.getloadavg()[0]]
    workers = start_workers(args)
    try:
        for rep in range(args.reps):
            for condition in (CONDITIONS if rep % 2 == 0 else CONDITIONS[::-1]):
                shift = rep % len(workers)
                with (Spinner() if condition == "busy" else contextlib.nullcontext()):
                    for engine, threads, w in workers[shift:] + workers[:shift]:
                        result = results[(engine, threads, condition)]
                        result.seconds.append(w.ask("tg")["seconds"])
                        print(f"rep {rep} {condition} {engine} {threads} thr: {result.samples[-1]:.2f} t/s "
                              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
                loads.append(os.getloadavg()[0])
        quit_workers([w for _, _, w in workers])
    finally:
        kill_workers([w for _, _, w in workers])
    return results, loads


def table(results, engines) -> tuple[list[str], list[list[str]]]:
    header = ["engine", "threads"] + [f"t/s {c}" for c in CONDITIONS] + [f"2 thr / 1 thr {c}" for c in CONDITIONS]
    rows = []
    for engine in engines:
        for threads in THREADS:
            row = [engine, str(threads)] + [results[(engine, threads, c)].cell() for c in CONDITIONS]
            if threads == 2:
                row += [f"{results[(engine, 2, c)].mean / results[(engine, 1, c)].mean:.2f}" for c in CONDITIONS]
            else:
                row += ["", ""]
            rows.append(row)
    return header, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: ember's default model)")
    parser.add_argument("--n-gen", type=int, default=64, help="decoded tokens per timed run")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per engine, thread count and condition")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    args.engines = tuple(args.engines.split(","))
    if set(args.engines) - set(ENGINES):
        parser.error(f"--engines: unknown {', '.join(sorted(set(args.engines) - set(ENGINES)))}")
    if args.reps < 2:
        parser.error("--reps must be at least 2 (the table shows a sample std)")
    if args.model is None:
        from ember.models.default_model import default_model_path
        args.model = str(default_model_path())
    start = time.perf_counter()
    results, loads = measure(args)
    header, rows = table(results, args.engines)
    title = (f"{Path(args.model).name}, CPU, tg{args.n_gen}, mean ± std of {args.reps} reps, busy = one "
             f"spinning process beside it (load average {min(loads):.1f}-{max(loads):.1f} over the run; "
             f"{os.cpu_count()} CPUs; {time.perf_counter() - start:.0f} s)")
    print_table(title, header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
