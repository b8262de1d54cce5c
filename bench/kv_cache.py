"""Perplexity with each KV cache type, ember against llama.cpp (llama-cpp-python) on the same GGUF.

Both engines run llama-perplexity's method through the same code (ember.tools.perplexity: the
same chunks, BOS first, the second half of each chunk scored, the same NLL arithmetic), so only
the engines and their caches differ. Besides PPL, each row gives the change against the same
engine's f16 cache and the mean KL divergence from it over the scored tokens.

ember's cache types: f16, q8_0, q4_0 (Walsh-Hadamard rotated as llama.cpp rotates them, and
with --no-cache-rotation's setting), the mixed q8_0-K + turbo4-V, turbo4, turbo3. llama.cpp's:
f16, q8_0, q4_0 (flash attention on, needed for a quantized V cache), with its rotation and with
LLAMA_ATTN_ROT_DISABLE=1.

    python bench/kv_cache.py [--model GGUF] [--text FILE] [--ctx 512] [--threads 2] [--markdown]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF (default: the default model, Gemma 3 270M Q4_K_M)")
    parser.add_argument("--text", default=str(ROOT / "tests" / "data" / "ppl_text.txt"))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="ember,llama.cpp")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    from ember.models.default_model import default_model_path
    from ember.models.tokenizer import Tokenizer
    model_path = Path(args.model) if args.model else default_model_path()
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
