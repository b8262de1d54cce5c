"""Perplexity with each KV cache type, ember against llama.cpp (llama-cpp-python) on the same GGUF.

Both engines run llama-perplexity's method through the same code (ember.tools.perplexity: the
same chunks, BOS first, the second half of each chunk scored, the same NLL arithmetic), so only
the engines and their caches differ. Besides PPL, each row gives the change against the same
engine's f16 cache and, for ember, against llama.cpp with the same cache types; the mean KL
divergence of each scored token's distribution from the same engine's f16 cache; and the
teacher-forced top-1 agreement with it (the share of scored positions whose most likely next
token is the f16 cache's). The f16 run's log-probabilities wait in a file for the comparisons
(thousands of rows of a 262,144-token vocabulary are gigabytes).

ember's cache types: f16, q8_0, q4_0 (Walsh-Hadamard rotated as llama.cpp rotates them, and
with --no-cache-rotation's setting), the mixed q8_0-K + turbo4-V, turbo4, turbo3. llama.cpp's:
f16, q8_0, q4_0 (flash attention on, needed for a quantized V cache), with its rotation and with
LLAMA_ATTN_ROT_DISABLE=1. --no-rotation-off leaves out the rows without rotation.

--speed measures decode instead (llama-bench's tg at depths 0 and 4096, by bench/models.py's
workers: one process per engine and cache type, taking turns repetition by repetition so load
from elsewhere falls on all alike): ember with f16, q8_0 and turbo4 caches, llama.cpp with f16
and q8_0 (flash attention on for both).

    python bench/kv_cache.py [--model GGUF] [--text FILE] [--ctx 512,2048] [--tokens N] [--configs K/V,...]
                             [--threads 2] [--markdown]
    python bench/kv_cache.py --speed [--depths 0,4096] [--n-gen 32] [--reps 3] [--markdown]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ember.tools.perplexity import Perplexity, perplexity  # noqa: E402
from bench.tables import print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBER_CONFIGS = [("f16", "f16", True), ("q8_0", "q8_0", True), ("q8_0", "q8_0", False),
                 ("q4_0", "q4_0", True), ("q4_0", "q4_0", False), ("q8_0", "turbo4", True),
                 ("turbo4", "turbo4", True), ("turbo3", "turbo3", True)]
LLAMA_CONFIGS = [("f16", "f16", True), ("q8_0", "q8_0", True), ("q8_0", "q8_0", False),
                 ("q4_0", "q4_0", True), ("q4_0", "q4_0", False)]
SPEED_CONFIGS = [("ember", "f16"), ("ember", "q8_0"), ("ember", "turbo4"), ("llama.cpp", "f16"),
                 ("llama.cpp", "q8_0")]      # (engine, K and V cache type)
ROWS_PER_BLOCK = 32     # softmax rows at a time: bounds the float64 temporaries (~70 MB each)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


class Reference:
    """The log-probabilities (float32, in a file) and top-1 tokens of every scored row of one
    engine's f16 run, in the order perplexity() scores them."""

    def __init__(self, folder: Path, rows: int, n_vocab: int, name: str = "reference"):
        self.logp = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32,
                                              shape=(rows, n_vocab))
        self.top = np.empty(rows, np.int64)
        self.top_path = folder / f"{name}-top.npy"

    def save(self, result) -> None:
        """Keep the top-1 tokens and the f16 run's Perplexity beside the log-probabilities (a kept
        reference, --reference-dir)."""
        self.logp.flush()
        np.save(self.top_path, self.top)
        self.top_path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(result)))

    @classmethod
    def kept(cls, folder: Path, name: str, rows: int):
        """A reference an earlier run kept in folder, or None (absent or of another shape)."""
        ref = cls.__new__(cls)
        ref.top_path = folder / f"{name}-top.npy"
        if not ref.top_path.exists() or not (folder / f"{name}.npy").exists():
            return None
        ref.logp = np.load(folder / f"{name}.npy", mmap_mode="r")
        ref.top = np.load(ref.top_path)
        ref.result = Perplexity(**json.loads(ref.top_path.with_suffix(".json").read_text()))
        return ref if ref.logp.shape[0] == rows == ref.top.shape[0] else None


class Scorer:
    """Wraps eval_chunk. The reference run (record) writes each scored row into the Reference;
    any other run adds up, row by row, its KL divergence from the reference's row,
    KL(p_f16 || p_this) in nats, and whether both rank the same token first."""

    def __init__(self, eval_chunk, reference: Reference, record: bool):
        self.eval_chunk, self.reference, self.record = eval_chunk, reference, record
        self.rows = self.agree = 0
        self.kl_sum = 0.0

    def __call__(self, chunk, first):
        logits = self.eval_chunk(chunk, first)
        scored = logits[:-1]            # the last position predicts nothing (chunk_nll)
        for begin in range(0, scored.shape[0], ROWS_PER_BLOCK):
            logq = log_softmax(np.asarray(scored[begin:begin + ROWS_PER_BLOCK], np.float32))
            at = slice(self.rows, self.rows + logq.shape[0])
            top = logq.argmax(axis=1)
            if self.record:
                self.reference.logp[at] = logq
                self.reference.top[at] = top
            else:
                logp = self.reference.logp[at].astype(np.float64)
                self.kl_sum += float((np.exp(logp) * (logp - logq)).sum())
            self.agree += int((top == self.reference.top[at]).sum())
            self.rows += logq.shape[0]
        return logits

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.rows

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.rows


def ember_run(model_path, tokens, bos, ctx, threads, k, v, rotation, scorer_for):
    from ember.backends import get_backend
    from ember.models import KVCacheTypes, load_model
    from ember.runtime.session import Session, SessionOptions
    from ember.tools.perplexity import session_chunk_evaluator
    session = Session(load_model(model_path), get_backend("cpu", threads=threads),
                      SessionOptions(n_ctx=ctx, cache=KVCacheTypes.of(k, v, rotation)))
    scorer = scorer_for(session_chunk_evaluator(session), session.model.hparams.n_vocab)
    return perplexity(scorer, tokens, ctx, bos), scorer


def llama_run(model_path, tokens, bos, ctx, threads, k, v, rotation, scorer_for):
    import llama_cpp
    ids = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
    # read when the context (its KV cache) is made
    os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    if not rotation:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                          n_threads=threads, n_threads_batch=threads, flash_attn=True,
                          type_k=ids[k], type_v=ids[v], verbose=False)
    n_vocab = llm.n_vocab()
    try:
        def eval_chunk(chunk, first):
            # one batch, logits only for the scored half (logits_all would keep n_ctx rows)
            llm._ctx.kv_cache_clear()
            batch = llm._batch.batch
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= first
            llm._ctx.decode(llm._batch)
            rows = len(chunk) - first
            # a view of llama.cpp's output buffer: read before the next decode
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(rows * n_vocab,)).reshape(rows, n_vocab)
        scorer = scorer_for(eval_chunk, n_vocab)
        return perplexity(scorer, tokens, ctx, bos), scorer
    finally:
        llm.close()
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)


def speed(args) -> int:
    """Decode t/s per engine and cache type at each depth; ratios against ember's f16."""
    from bench.models import Worker, context_size, kill_workers, quit_workers
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
            quit_workers([w for _, _, w in workers])
        finally:
            kill_workers([w for _, _, w in workers])
    load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    base = table[("ember", "f16")]
    header = ["engine", "K = V"] + [r.test + " t/s" for r in base] + [f"vs ember f16 @ d{d}" for d in depths]
    rows = []
    for (engine, kind), results in table.items():
        rows.append([engine, kind] + [r.cell() for r in results] +
                    [f"{r.mean / b.mean:.2f}" for r, b in zip(results, base)])
    title = (f"{Path(args.model).name}, CPU, {args.threads} threads, n_ctx {context_size(0, args.n_gen, max(depths))}, "
             f"mean ± std of {args.reps} reps ({load}; {time.perf_counter() - start:.0f} s)")
    print_table(title, header, rows, args.markdown, text_columns=2)
    return 0


def scored_rows(n_tokens: int, ctx: int) -> int:
    """The rows perplexity() scores: the second half of each whole chunk but its last position."""
    return n_tokens // ctx * (ctx - ctx // 2 - 1)


def measure(args, model_path, tokens, bos, ctx) -> list[tuple]:
    """(engine, k, v, rotation, Perplexity, Scorer) for every configuration at one context."""
    rows = []
    for engine in args.engines.split(","):
        run, configs = (ember_run, EMBER_CONFIGS) if engine == "ember" else (llama_run, LLAMA_CONFIGS)
        configs = [c for c in configs if (c[2] or not args.no_rotation_off)
                   and (not args.configs or f"{c[0]}/{c[1]}" in args.configs.split(","))]
        if engine == "ember" and args.configs:     # any other pair ember takes (e.g. turbo4/f16)
            listed = {f"{k}/{v}" for k, v, _ in EMBER_CONFIGS}
            configs += [(*pair.split("/"), True) for pair in args.configs.split(",") if pair not in listed]
        if args.configs:                           # in the order given (f16/f16 first)
            order = args.configs.split(",")
            configs.sort(key=lambda c: order.index(f"{c[0]}/{c[1]}"))
        with tempfile.TemporaryDirectory(prefix="kv-cache-bench-") as scratch:
            # --reference-dir keeps the f16 run's rows, so a later run can score other cache types
            # against them without running f16 again (the name says text, token count and context)
            folder = Path(args.reference_dir or scratch)
            name = f"{engine}-{Path(args.text).name}-{len(tokens)}-ctx{ctx}"
            reference = Reference.kept(folder, name, scored_rows(len(tokens), ctx)) if args.reference_dir else None
            if reference is not None:
                configs = [c for c in configs if c[:2] != ("f16", "f16")]
                kept = Scorer(None, reference, False)
                kept.rows = kept.agree = 1          # the reference against itself: KL 0, top-1 100%
                rows.append((engine, "f16", "f16", True, reference.result, kept))
                print(f"ctx {ctx} {engine}: f16 reference kept in {folder}", file=sys.stderr, flush=True)

            def scorer_for(eval_chunk, n_vocab):
                nonlocal reference
                record = reference is None          # the first configuration is f16: the reference
                if record:
                    reference = Reference(folder, scored_rows(len(tokens), ctx), n_vocab, name)
                return Scorer(eval_chunk, reference, record)

            for k, v, rotation in configs:
                start = time.perf_counter()
                result, scorer = run(model_path, tokens, bos, ctx, args.threads, k, v, rotation, scorer_for)
                if scorer.record and args.reference_dir:
                    reference.save(result)
                scorer.reference = None         # the file goes with the folder
                rows.append((engine, k, v, rotation, result, scorer))
                print(f"ctx {ctx} {engine} K {k} V {v} rotation {rotation}: {result.final_line()} "
                      f"KL {scorer.mean_kl:.5f} top-1 {100 * scorer.top1_agreement:.2f}% "
                      f"({time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
            reference = None
    return rows


def print_perplexity_table(rows, ctx, args, model_path) -> None:
    base = {engine: result.ppl for engine, k, v, _, result, _ in rows if k == v == "f16"}
    llama = {(k, v, rot): result.ppl for engine, k, v, rot, result, _ in rows if engine == "llama.cpp"}
    first = rows[0][4]
    title = (f"{Path(model_path).name}, {Path(args.text).name} ({first.n_chunks * ctx} of its tokens), "
             f"ctx {ctx}: {first.n_chunks} chunks, {first.n_scored} tokens scored, CPU, {args.threads} threads")
    header = ["engine", "K", "V", "rotation", "PPL", "vs own f16", "vs llama.cpp", "mean KL vs own f16",
              "top-1 = own f16"]
    lines = []
    for engine, k, v, rotation, result, scorer in rows:
        rot = "-" if not any(t in ("q8_0", "q4_0") for t in (k, v)) else ("on" if rotation else "off")
        peer = llama.get((k, v, rotation)) if engine == "ember" else None
        lines.append([engine, k, v, rot, f"{result.ppl:.4f} ± {result.error:.4f}",
                      f"{100 * (result.ppl / base[engine] - 1):+.2f}%",
                      f"{100 * (result.ppl / peer - 1):+.2f}%" if peer else "",
                      f"{scorer.mean_kl:.5f}", f"{100 * scorer.top1_agreement:.2f}%"])
    print_table(title, header, lines, args.markdown, text_columns=4)
    if args.markdown:
        print()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF (default: the default model, Gemma 3 270M Q4_K_M)")
    parser.add_argument("--text", default=str(ROOT / "tests" / "data" / "ppl_text.txt"))
    parser.add_argument("--ctx", default="512", help="contexts, comma-separated (e.g. 512,2048)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="ember,llama.cpp")
    parser.add_argument("--no-rotation-off", action="store_true", help="leave out the q8_0/q4_0 rows without rotation")
    parser.add_argument("--configs", help="only these K/V pairs, e.g. f16/f16,q8_0/q8_0 (f16/f16 first: the "
                        "reference); ember also runs pairs not in its list, e.g. turbo4/f16")
    parser.add_argument("--tokens", type=int, default=0, help="use only the text's first N tokens (0: all)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--reference-dir", help="keep each engine's f16 rows here and reuse them in later runs "
                        "(then only the other configurations run; several GB per context)")
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
    if args.tokens:
        tokens = tokens[:args.tokens]
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    load_before, start = os.getloadavg()[0], time.perf_counter()
    for ctx in [int(c) for c in args.ctx.split(",")]:
        print_perplexity_table(measure(args, model_path, tokens, bos, ctx), ctx, args, model_path)
    print(f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
