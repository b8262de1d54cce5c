"""Graph passes and graph reuse, measured side by side in one run on the default model.

1. Fusion: prompt (pp) and decode (tg) speed with the default pipeline vs with fuse-qkv and
   fuse-elementwise disabled, interleaved repetitions.
2. Reuse: host time per decode step outside the compiled graph, with plan reuse (graph uid ->
   compiled plan) vs rebuilding the step graph every step (build, passes, render, compile-cache
   lookup, load), and its share of the decode step.

    python bench/passes.py [--model M] [--threads 2] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from ember.backends import get_backend
from ember.models import load_model
from ember.models.default_model import default_model_path
from ember.runtime.session import Session, SessionOptions

FUSION_PASSES = frozenset({"fuse-qkv", "fuse-elementwise"})


def speed(session: Session, tokens: np.ndarray, n_decode: int) -> tuple[float, float]:
    """(prompt t/s, decode t/s) for one repetition, cache cleared first."""
    session.reset()
    session.eval(tokens)
    pp = tokens.size / session.last_eval_seconds
    decode = 0.0
    for t in range(n_decode):
        session.eval([int(tokens[t % tokens.size])])
        decode += session.last_eval_seconds
    return pp, n_decode / decode


def host_share(session: Session, n_steps: int) -> tuple[float, float]:
    """(host ms per decode step, host share of the step) over n_steps decode steps.

    Host time is the session's own account of each step outside the compiled graph
    (stats.host_seconds: plan lookup, inputs, cache and state copies) plus, when the step graph
    is rebuilt, building, optimizing and compiling it (stats.compile_seconds, which
    host_seconds leaves out), against the wall clock of the whole step."""
    session.reset()
    session.eval([2, 3, 4, 5])
    stats = session.stats
    host_before = stats.host_seconds + stats.compile_seconds
    start = time.perf_counter()
    for t in range(n_steps):
        session.eval([10 + t])
    wall = time.perf_counter() - start
    host = (stats.host_seconds + stats.compile_seconds - host_before) / n_steps
    return 1e3 * host, host / (wall / n_steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args(argv)
    model = load_model(args.model or default_model_path())
    backend = get_backend("cpu", threads=args.threads)
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, model.hparams.n_vocab - 10, size=args.prompt).astype(np.int32)

    load_start = os.getloadavg()
    fused = Session(model, backend, SessionOptions(n_ctx=1024))
    plain = Session(model, backend, SessionOptions(n_ctx=1024, disabled_passes=FUSION_PASSES))
    reuse = Session(model, backend, SessionOptions(n_ctx=1024))
    rebuild = Session(model, backend, SessionOptions(n_ctx=1024, reuse=False))
    for s in (fused, plain):                 # warm-up: compile every shape used below
        speed(s, tokens, 2)
    results = {"fused": [], "unfused": []}
    for _ in range(args.reps):
        for name, s in (("fused", fused), ("unfused", plain)):
            results[name].append(speed(s, tokens, args.decode))
            print(f"{name}: pp {results[name][-1][0]:.1f} t/s, tg {results[name][-1][1]:.1f} t/s",
                  file=sys.stderr)

    host_share(reuse, 2)
    host_share(rebuild, 1)                   # warm the compile cache for the rebuilt graphs
    hosts = {"reuse": [], "rebuild": []}
    for _ in range(args.reps):               # interleaved, as above
        hosts["reuse"].append(host_share(reuse, args.decode))
        hosts["rebuild"].append(host_share(rebuild, max(3, args.decode // 8)))
        print(f"host ms / step: reuse {hosts['reuse'][-1][0]:.3f}, rebuild {hosts['rebuild'][-1][0]:.1f}",
              file=sys.stderr)
    reuse_ms, reuse_share = zip(*hosts["reuse"])
    rebuild_ms, rebuild_share = zip(*hosts["rebuild"])

    def mean_std(values, digits=1):
        std = statistics.stdev(values) if len(values) > 1 else 0
        return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"

    def paired(a, b):
        return f"{statistics.median(x / y for x, y in zip(a, b)):.2f}"

    f_pp, f_tg = zip(*results["fused"])
    u_pp, u_tg = zip(*results["unfused"])
    lines = [
        f"Fusion (fuse-qkv + fuse-elementwise), default model, {args.threads} threads, {args.reps} reps:",
        "",
        "| pipeline | pp{} t/s | tg{} t/s |".format(args.prompt, args.decode),
        "|---|---|---|",
        f"| default (fused) | {mean_std(f_pp)} | {mean_std(f_tg)} |",
        f"| fusion disabled | {mean_std(u_pp)} | {mean_std(u_tg)} |",
        f"| ratio fused / unfused (of the means) | {statistics.mean(f_pp) / statistics.mean(u_pp):.2f} | "
        f"{statistics.mean(f_tg) / statistics.mean(u_tg):.2f} |",
        # the two take turns, so each repetition's pair saw about the same load: the median
        # of the paired ratios is steadier than the ratio of means on a busy machine
        f"| ratio fused / unfused (median of paired reps) | {paired(f_pp, u_pp)} | {paired(f_tg, u_tg)} |",
        "",
        f"Graph reuse: host time per decode step outside the compiled graph, {args.reps} reps:",
        "",
        "| mode | host ms / step | share of the step |",
        "|---|---|---|",
        f"| reuse (plan cache by graph uid) | {mean_std(reuse_ms, 3)} | {mean_std([100 * x for x in reuse_share])}% |",
        f"| rebuild every step | {mean_std(rebuild_ms)} | {mean_std([100 * x for x in rebuild_share])}% |",
        "",
        f"Plan cache with reuse: {reuse.plans.stats}",
        "Load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}; at end: {:.2f} {:.2f} {:.2f}".format(
            *load_start, *os.getloadavg()),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
