"""Perplexity with each KV cache type, ember against llama.cpp (llama-cpp-python) on the same GGUF.

Both engines run llama-perplexity's method through the same code (ember.tools.perplexity: the
same chunks, BOS first, the second half of each chunk scored, the same NLL arithmetic), so only
the engines and their caches differ. Besides PPL, each row gives the change against the same
engine's f16 cache and the mean KL divergence from it over the scored tokens.

ember's cache types: f16, q8_0, q4_0 (Walsh-Hadamard rotated as llama.cpp rotates them, and
with --no-cache-rotation's setting), the mixed q8_0-K + turbo4-V, turbo4, turbo3. llama.cpp's:
f16, q8_0, q4_0 (flash attention on, needed for a quantized V cache), with its rotation and with
LLAMA_ATTN_ROT_DISABLE=1.

--speed measures decode instead (llama-bench's tg at depths 0 and 4096, by bench/models.py's
workers: one process per engine and cache type, taking turns repetition by repetition so load
from elsewhere falls on all alike): ember with f16, q8_0 and turbo4 caches, llama.cpp with f16
and q8_0 (flash attention on for both).

    python bench/kv_cache.py [--model GGUF] [--text FILE] [--ctx 512] [--threads 2] [--markdown]
    python bench/kv_cache.py --speed [--depths 0,4096] [--n-gen 32] [--reps 3] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ember.tools.perplexity import perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBER_CONFIGS = [("f16", "f16", True), ("q8_0", "q8_0", True), ("q8_0", "q8_0", False),
                 ("q4_0", "q4_0", True), ("q4_0", "q4_0", False), ("q8_0", "turbo4", True),
                 ("turbo4", "turbo4", True), ("turbo3", "turbo3", True)]
LLAMA_CONFIGS = [("f16", "f16", True), ("q8_0", "q8_0", True), ("q8_0", "q8_0", False),
                 ("q4_0", "q4_0", True), ("q4_0", "q4_0", False)]
SPEED_CONFIGS = [("ember", "f16"), ("ember", "q8_0"), ("ember", "turbo4"), ("llama.cpp", "f16"),
                 ("llama.cpp", "q8_0")]      # (engine, K and V cache type)


class Recorder:
    """Wraps eval_chunk: keeps the logits of every scored row (for the KL divergence)."""

    def __init__(self, eval_chunk):
        self.eval_chunk, self.rows = eval_chunk, []

    def __call__(self, chunk, first):
        logits = self.eval_chunk(chunk, first)
        self.rows.append(np.asarray(logits[:-1], np.float32))
        return logits

    @property
    def logits(self) -> np.ndarray:
        return np.concatenate(self.rows)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def mean_kl(base: np.ndarray, other: np.ndarray) -> float:
    """Mean over rows of KL(base || other) of the softmaxes, in nats."""
    total = 0.0
    for i in range(0, base.shape[0], 64):
        p, q = log_softmax(base[i:i + 64]), log_softmax(other[i:i + 64])
        total += float((np.exp(p) * (p - q)).sum())
    return total / base.shape[0]


def ember_run(model_path, tokens, bos, ctx, threads, k, v, rotation):
    from ember.backends import get_backend
    from ember.models import KVCacheTypes, load_model
    from ember.runtime.session import Session, SessionOptions
    from ember.tools.perplexity import session_chunk_evaluator
    session = Session(load_model(model_path), get_backend("cpu", threads=threads),
                      SessionOptions(n_ctx=ctx, cache=KVCacheTypes.of(k, v, rotation)))
    recorder = Recorder(session_chunk_evaluator(session))
    return perplexity(recorder, tokens, ctx, bos), recorder.logits


def llama_run(model_path, tokens, bos, ctx, threads, k, v, rotation):
    import llama_cpp
    ids = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
    # read when the context (its KV cache) is made
    os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    if not rotation:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, flash_attn=True,
                          type_k=ids[k], type_v=ids[v], verbose=False)
    try:
        def eval_chunk(chunk, first):
            llm.reset()
            llm.eval(chunk)
            return np.array(llm.scores[first:len(chunk)], dtype=np.float32)
        recorder = Recorder(eval_chunk)
        return perplexity(recorder, tokens, ctx, bos), recorder.logits
    finally:
        llm.close()
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)


def speed(args) -> int:
    """Decode t/s per engine and cache type at each depth; ratios against ember's f16."""
    from bench.models import Worker, context_size
    from ember.tools.bench import BenchResult, test_name
    load_before, start = os.getloadavg()[0], time.perf_counter()
    depths = [int(d) for d in args.depths.split(",")]
    table = {}                      # (engine, type) -> [BenchResult per depth]
    for depth in depths:
        wargs = argparse.Namespace(model=str(args.model), threads=args.threads, n_prompt=0, n_gen=args.n_gen,
                                   seed=0, depth=depth)
        workers = []
        try:
            for engine, kind in SPEED_CONFIGS:     # one at a time: no warm-up overlaps another
                w = Worker(engine, wargs, (kind, kind), tests="tg")
                w.read()
                workers.append((engine, kind, w))
                table.setdefault((engine, kind), []).append(BenchResult(test_name("tg", args.n_gen, depth), args.n_gen))
            for rep in range(args.reps):
                shift = rep % len(workers)
                for engine, kind, w in workers[shift:] + workers[:shift]:
                    table[(engine, kind)][-1].seconds.append(w.ask("tg")["seconds"])
                    print(f"d{depth} rep {rep} {engine} {kind}: {table[(engine, kind)][-1].samples[-1]:.2f} t/s",
                          file=sys.stderr, flush=True)
            for _, _, w in workers:
                w.ask("quit")
        finally:
            for _, _, w in workers:
                if w.proc.poll() is None:
                    w.proc.kill()
    load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    base = table[("ember", "f16")]
    header = ["engine", "K = V"] + [r.test + " t/s" for r in base] + [f"vs ember f16 @ d{d}" for d in depths]
    rows = []
    for (engine, kind), results in table.items():
        rows.append([engine, kind] + [r.cell() for r in results] +
                    [f"{r.mean / b.mean:.2f}" for r, b in zip(results, base)])
    title = (f"{Path(args.model).name}, CPU, {args.threads} threads, n_ctx {context_size(0, args.n_gen, max(depths))}, "
             f"mean ± std of {args.reps} reps ({load}; {time.perf_counter() - start:.0f} s)")
    if args.markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|---|---|" + "---:|" * (len(header) - 2))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(title)
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF (default: the default model, Gemma 3 270M Q4_K_M)")
    parser.add_argument("--text", default=str(ROOT / "tests" / "data" / "ppl_text.txt"))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="ember,llama.cpp")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--speed", action="store_true", help="decode t/s per cache type instead of perplexity")
    parser.add_argument("--depths", default="0,4096", help="--speed: cache depths (llama-bench's -d)")
    parser.add_argument("--n-gen", type=int, default=32, help="--speed: decoded tokens per timed run")
    parser.add_argument("--reps", type=int, default=3, help="--speed: timed runs per engine, type and depth")
    args = parser.parse_args()
    from ember.models.default_model import default_model_path
    from ember.models.tokenizer import Tokenizer
    model_path = Path(args.model) if args.model else default_model_path()
    if args.speed:
        args.model = model_path
        return speed(args)
    tokenizer = Tokenizer.from_gguf(model_path)
    tokens = tokenizer.encode(Path(args.text).read_text(), add_special=True)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    rows = []
    for engine in args.engines.split(","):
        run, configs = (ember_run, EMBER_CONFIGS) if engine == "ember" else (llama_run, LLAMA_CONFIGS)
        base = None
        for k, v, rotation in configs:
            start = time.perf_counter()
            result, logits = run(model_path, tokens, bos, args.ctx, args.threads, k, v, rotation)
            if base is None:
                base = (result, logits)
            rows.append((engine, k, v, rotation, result, result.ppl / base[0].ppl - 1,
                         mean_kl(base[1], logits)))
            print(f"{engine} K {k} V {v} rotation {rotation}: {result.final_line()} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    scored = rows[0][4].n_scored
    if args.markdown:
        print(f"{Path(model_path).name}, ctx {args.ctx}, {rows[0][4].n_chunks} chunks, {scored} tokens "
              f"scored, CPU, {args.threads} threads\n")
        print("| engine | K | V | rotation | PPL | vs own f16 | mean KL vs own f16 |")
        print("|---|---|---|---|---|---|---|")
    for engine, k, v, rotation, result, change, kl in rows:
        rot = "-" if not any(t in ("q8_0", "q4_0") for t in (k, v)) else ("on" if rotation else "off")
        if args.markdown:
            print(f"| {engine} | {k} | {v} | {rot} | {result.ppl:.4f} ± {result.error:.4f} | "
                  f"{100 * change:+.2f}% | {kl:.5f} |")
        else:
            print(f"{engine:9} K {k:6} V {v:6} rot {rot:3}  PPL {result.ppl:.4f} +/- {result.error:.4f}  "
                  f"{100 * change:+.2f}%  KL {kl:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
