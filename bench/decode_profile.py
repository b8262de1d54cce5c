"""Where a decode step's time goes on the CPU backend: a kernel profile of the 1-token step graph.

The session runs with CpuBackend(profile=CLOCK): every kernel call of the generated code is
timed per thread (CpuExecutable.profile), and so is the time between calls spent in the team
barrier. After `depth` tokens (untimed) and one warm-up token, n_gen tokens are decoded; the
table sums the calls by label (op, plus the weight type of a matmul) per decode step: the
slowest thread's milliseconds (a call ends for the team when its last thread is done) and the
mean thread's, the calls per step, and the share of the step. The barrier row is the time
threads wait for each other; "kernels, barriers" counts what the step graph has.

    python bench/decode_profile.py [--model GGUF] [--threads 2] [--depth 0] [--n-gen 64] [--clock wall]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ember.tools.bench import random_tokens  # noqa: E402


def profiled_session(model_path: str, threads: int, clock: str, n_ctx: int):
    """(session, executables): a Session on CpuBackend(profile=clock); executables fills with
    every step executable the session compiles."""
    from ember.backends.cpu.backend import CpuBackend
    from ember.models import load_model
    from ember.runtime.session import Session, SessionOptions
    backend = CpuBackend(threads=threads, profile=clock)
    executables = []
    compile_graph = backend.compile

    def compile_and_keep(*args, **kwargs):
        executable = compile_graph(*args, **kwargs)
        executables.append(executable)
        return executable
    backend.compile = compile_and_keep      # the profile is read from each executable
    return Session(load_model(model_path), backend, SessionOptions(n_ctx=n_ctx)), executables


def decode_profile(args) -> tuple[list[tuple], str]:
    session, executables = profiled_session(args.model, args.threads, args.clock,
                                            max(1024, -(-(args.depth + args.n_gen + 1) // 256) * 256))
    rng = np.random.default_rng(0)
    tokens = random_tokens(rng, args.depth + args.n_gen + 1, session.model.n_vocab, None)
    if args.depth:
        session.eval(tokens[:args.depth])
    session.eval(tokens[args.depth:args.depth + 1])          # warm-up: compiles the 1-token step
    for exe in executables:
        exe.profile()                                        # clears what the warm-up left
    for token in tokens[args.depth + 1:]:
        session.eval([token])
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0.0, 0])   # slowest thread s, mean s, calls
    graphs = []
    for exe in executables:
        rows = exe.profile()
        if not any(any(t) for _, t in rows):
            continue                                          # not run since (the prompt's graph)
        graphs.append(f"{exe.graph.name}: {exe.program.n_kernels} kernels, {exe.program.n_barriers} barriers")
        for label, per_thread in rows:
            entry = totals[label]
            entry[0] += max(per_thread)
            entry[1] += sum(per_thread) / len(per_thread)
            entry[2] += 1
    step = sum(slowest for slowest, _, _ in totals.values())
    rows = [(label, f"{calls}", f"{slowest / args.n_gen * 1e3:.3f}", f"{mean / args.n_gen * 1e3:.3f}",
             f"{slowest / step:.1%}")
            for label, (slowest, mean, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    rows.append(("step (sum)", "", f"{step / args.n_gen * 1e3:.3f}", "", "100%"))
    return rows, "; ".join(graphs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: ember's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=0, help="tokens in the cache before the profiled decode")
    parser.add_argument("--n-gen", type=int, default=64, help="decoded tokens profiled")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    if args.model is None:
        from ember.models.default_model import default_model_path
        args.model = str(default_model_path())
    from bench.tables import print_table
    load_before = os.getloadavg()[0]
    rows, graphs = decode_profile(args)
    title = (f"{Path(args.model).name}, decode profile, {args.threads} threads, depth {args.depth}, "
             f"{args.n_gen} steps, {args.clock} clock (load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})")
    header = ("label", "calls per step", "ms per step (slowest thread)", "ms (mean thread)", "share")
    print_table(title, header, rows, args.markdown)
    print(f"\n{graphs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
