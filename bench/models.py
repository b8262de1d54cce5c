"""Model throughput and memory, ember against llama.cpp (llama-cpp-python) on the same GGUF.

Both engines are measured in one run by llama-bench's method (ember/tools/bench.py, the same
loop for both): pp512 is one batch of 512 random tokens, tg128 is 128 single-token decodes, the
cache is cleared before every repetition, one untimed warm-up comes first (ember compiles its
step graphs there); each cell is the mean +- sample std of tokens/s. Same thread count, n_ctx
1024, same token sequences (same seed) for both.

Each engine lives in its own subprocess (so each peak RSS, VmHWM, is its own), and the two take
turns repetition by repetition, so load from other processes on the machine falls on both alike.

--llama-bench PATH adds llama.cpp's own llama-bench binary as a third column (an anchor without
Python: build it from the llama.cpp commit llama-cpp-python vendors, see BENCHMARKS.md). It runs
once per repetition and test (`-r 1`, after its own warm-up) in the same turns, with the
Python engine's settings: same threads, batch and micro-batch 512, flash attention off.

    python bench/models.py [--model GGUF] [--threads 2] [--reps 5] [--llama-bench PATH] [--markdown]
                           [--requant q5_k_m]

--markdown writes the table as Markdown to stdout (for BENCHMARKS.md). --requant MIX first
requantizes the model into llama.cpp's Q5_K_M (or Q4_K_M) mix with ember.tools.requant (ggml's
k-quant searches; written once next to the model as <name>.ember-<mix>.gguf) and measures that
file: both engines run the same requantized file.

Decode against the memory (issue 18, "decode >= 90% of the stream-read bandwidth"): the tg rows
are followed by the GB/s each engine's decode reads (decode_step_bytes: the weights a step
touches, i.e. every tensor once, the tied output head in full and one embedding row, plus the
K and V cache rows the step attends to at its depth, in the session's cache types) and its
fraction of the read bandwidth of bench/ops.py's C stream kernel, measured by this process
between the tg repetitions (same thread count), so both come from the same run and load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ember.tools.bench import BenchResult, decode_run, prompt_run, random_tokens, test_name  # noqa: E402
from bench.tables import print_table  # noqa: E402

ENGINES = ("ember", "llama.cpp")
# a worker may also run ember with the team governor on (CpuBackend(adapt_threads=True): bench/threads.py)
WORKER_ENGINES = ENGINES + ("ember-adaptive",)
N_CTX = 1024
PAUSE_S = 0.1        # lets the other engine's OpenMP threads go idle before a timed run
REPLY = "@@ "        # marks the workers' replies on stdout (libraries may print there too)


# ---- workers -----------------------------------------------------------------------------------
class EmberEngine:
    def __init__(self, model_path: str, threads: int, n_ctx: int, cache: tuple[str, str] | None = None,
                 adapt_threads: bool = False):
        from ember.backends import get_backend
        from ember.models import KVCacheTypes, load_model
        from ember.models.tokenizer import Tokenizer
        from ember.runtime.session import Session, SessionOptions
        model = load_model(model_path)
        tokenizer = Tokenizer.from_metadata(model.tokenizer)
        options = SessionOptions(n_ctx=n_ctx, cache=KVCacheTypes.of(*cache) if cache else KVCacheTypes())
        self.session = Session(model, get_backend("cpu", threads=threads, adapt_threads=adapt_threads), options)
        self.n_vocab = model.hparams.n_vocab
        self.bos = tokenizer.bos_id if tokenizer.add_bos else None
        self.reset, self.decode = self.session.reset, self.session.eval

    def info(self) -> dict:
        stats = self.session.stats
        return {"compile_seconds": stats.compile_seconds, "graphs": stats.graph_builds,
                "evictions": self.session.plans.stats.evictions}


class LlamaCppEngine:
    def __init__(self, model_path: str, threads: int, n_ctx: int, cache: tuple[str, str] | None = None):
        import llama_cpp
        kv = {}
        if cache:       # a quantized V needs flash attention; f16 caches take it too, to compare alike
            ids = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
            kv = dict(type_k=ids[cache[0]], type_v=ids[cache[1]], flash_attn=True)
        self.llm = llama_cpp.Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False, **kv)
        self.n_vocab = self.llm.n_vocab()
        self.bos = self.llm.token_bos() if self.llm._model.add_bos_token() else None
        self.decode = self.llm.eval
        self.version = llama_cpp.__version__
        self.system = llama_cpp.llama_print_system_info().decode().strip()

    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def info(self) -> dict:
        return {"version": self.version, "system": self.system}


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def decode_step_bytes(model_path: str, depth: int, n_gen: int, cache: tuple[str, str] | None = None) -> dict:
    """Bytes one decode step of a tg run reads, averaged over its n_gen steps after `depth`
    tokens: {"weights", "kv", "total"}. Weights: every tensor of the file once, except the token
    embedding, of which a step reads one row, or all of it when it is also the output head
    (no output.weight). KV: for each attention layer, the K and V rows of the keys the step
    attends to (position + 1, at most the window on a sliding-window layer), in the cache types
    (default: ember's, f16). For a mixture of experts this counts every expert (an upper bound)."""
    from ember.models import KVCacheTypes, load_model
    model = load_model(model_path)
    hp, infos = model.hparams, model.file.tensor_infos
    embd = infos["token_embd.weight"]
    weights = sum(info.nbytes for name, info in infos.items() if name != "token_embd.weight")
    weights += embd.nbytes if "output.weight" not in infos else embd.nbytes // embd.shape[0]
    types = KVCacheTypes.of(*cache) if cache else KVCacheTypes()
    kv = 0
    for il in model.attention_layers:
        row = types.row_bytes(hp.kv_width(il, "k"), hp.kv_width(il, "v"))
        for pos in range(depth, depth + n_gen):
            keys = pos + 1
            kv += row * (min(keys, hp.sliding_window) if hp.is_swa(il) else keys)
    kv /= n_gen
    return {"weights": weights, "kv": kv, "total": weights + kv}


def context_size(n_prompt: int, n_gen: int, depth: int) -> int:
    """N_CTX, or more when the depth needs it (a multiple of 256)."""
    return max(N_CTX, -(-(depth + max(n_prompt, n_gen)) // 256) * 256)


def worker(engine_name: str, model_path: str, threads: int, n_prompt: int, n_gen: int, seed: int,
           depth: int = 0, cache: tuple[str, str] | None = None, tests: str = "pp,tg") -> int:
    """Serve commands on stdin: pp / tg (one timed run each; those of `tests`, each warmed up
    once), quit (report and exit). cache: the K and V cache types (None: each engine's default)."""
    def reply(obj) -> None:
        sys.stdout.write(REPLY + json.dumps(obj) + "\n")
        sys.stdout.flush()

    start = time.perf_counter()
    n_ctx = context_size(n_prompt, n_gen, depth)
    if engine_name == "llama.cpp":
        engine = LlamaCppEngine(model_path, threads, n_ctx, cache)
    else:
        engine = EmberEngine(model_path, threads, n_ctx, cache, adapt_threads=engine_name == "ember-adaptive")
    rng = np.random.default_rng(seed)

    def tokens(n: int, bos: bool = True) -> list[int]:
        return random_tokens(rng, n, engine.n_vocab, engine.bos if bos else None)

    runs = {"pp": lambda: prompt_run(engine.reset, engine.decode, tokens(n_prompt, not depth), tokens(depth)),
            "tg": lambda: decode_run(engine.reset, engine.decode, tokens(n_gen, not depth), tokens(depth))}
    runs = {name: run for name, run in runs.items() if name in tests.split(",")}
    for run in runs.values():        # the warm-up
        run()
    reply({"ready": time.perf_counter() - start, **engine.info()})
    for line in sys.stdin:
        command = line.strip()
        if command in runs:
            time.sleep(PAUSE_S)
            reply({"seconds": runs[command]()})
        elif command == "quit":
            reply({"peak_rss_kib": peak_rss_kib(), **engine.info()})
            return 0
    return 1


class LlamaBench:
    """llama.cpp's llama-bench binary, one test and one repetition per call (JSON output)."""

    def __init__(self, path: str, args):
        self.path, self.args = path, args
        self.info: dict = {}

    def run(self, test: str) -> float:
        """Seconds for one pp (n_prompt tokens) or tg (n_gen tokens) run."""
        a = self.args
        n_prompt, n_gen = (a.n_prompt, 0) if test == "pp" else (0, a.n_gen)
        command = [self.path, "-m", a.model, "-p", str(n_prompt), "-n", str(n_gen), "-d", str(a.depth),
                   "-r", "1", "-t", str(a.threads), "-b", "512", "-ub", "512", "-fa", "off", "-o", "json"]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"llama-bench exited with status {proc.returncode}: {tail[0]}")
        record = json.loads(proc.stdout)[0]
        self.info = {k: record.get(k) for k in ("build_commit", "build_number", "cpu_info", "n_threads")}
        return (n_prompt or n_gen) / record["avg_ts"]


# ---- the driver --------------------------------------------------------------------------------
class Worker:
    """One engine in its own process; cache (K, V types) and tests as worker() takes them."""

    def __init__(self, engine: str, args, cache: tuple[str, str] | None = None, tests: str = "pp,tg"):
        command = [sys.executable, __file__, "--worker", engine, "--model", args.model,
                   "--threads", str(args.threads), "--n-prompt", str(args.n_prompt),
                   "--n-gen", str(args.n_gen), "--seed", str(args.seed), "--depth", str(args.depth),
                   "--tests", tests]
        if cache:
            command += ["--cache", f"{cache[0]},{cache[1]}"]
        self.engine = engine
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"{self.engine} worker exited (status {self.proc.wait()})")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()


def quit_workers(workers: list[Worker]) -> list[dict]:
    """Each worker's reply to quit (its info), its process waited for."""
    replies = []
    for w in workers:
        replies.append(w.ask("quit"))
        w.proc.wait(timeout=60)
    return replies


def kill_workers(workers: list[Worker]) -> None:
    """Kill the workers still running (a driver's finally: an error must not leave them behind)."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()


def measure(args) -> tuple[dict, dict]:
    """{engine: [BenchResult pp, BenchResult tg]}, {engine: worker info}; info["stream"] holds
    the read bandwidths (GB/s) measured after each tg repetition."""
    from bench.ops import StreamRead
    stream = StreamRead(args.threads, reps=3)
    results = {e: [BenchResult(test_name("pp", args.n_prompt, args.depth), args.n_prompt),
                   BenchResult(test_name("tg", args.n_gen, args.depth), args.n_gen)] for e in ENGINES}
    info = {}
    # One at a time, so neither warm-up (ember's includes compiling) overlaps the other.
    workers = []
    for engine in ENGINES:
        w = Worker(engine, args)
        ready = w.read()
        info[engine] = {"ready_seconds": ready["ready"], "compile_seconds_at_ready": ready.get("compile_seconds")}
        workers.append(w)
    info["stream"] = []
    bench = LlamaBench(args.llama_bench, args) if args.llama_bench else None
    if bench:
        results["llama-bench"] = [BenchResult(r.test, r.n_tokens) for r in results["ember"]]
    try:
        for k, test in enumerate(("pp", "tg")):
            for rep in range(args.reps):
                order = workers if rep % 2 == 0 else workers[::-1]
                for w in order:
                    results[w.engine][k].seconds.append(w.ask(test)["seconds"])
                if bench:
                    time.sleep(PAUSE_S)
                    results["llama-bench"][k].seconds.append(bench.run(test))
                if test == "tg":
                    time.sleep(PAUSE_S)
                    info["stream"].append(stream.gb_per_s())
        if bench:
            info["llama-bench"] = bench.info
        for w, reply in zip(workers, quit_workers(workers)):
            info[w.engine].update(reply)
    finally:
        kill_workers(workers)
    return results, info


def requantized(model: Path, mix: str) -> Path:
    """model requantized into mix, written once next to it (the write is atomic)."""
    from ember.tools.requant import requantize
    out = model.with_name(f"{model.stem}.ember-{mix}.gguf")
    if not out.exists():
        tmp = out.with_name(f".{out.name}.pid{os.getpid()}")
        start = time.perf_counter()
        requantize(model, tmp, mix)
        os.replace(tmp, out)
        print(f"requantized {model.name} into {mix} in {time.perf_counter() - start:.0f} s: {out}", file=sys.stderr)
    return out


def bandwidth_rows(results: dict, anchors: list[str], stream: list[float], step: dict) -> list[tuple]:
    """Decode GB/s (tg tokens/s times the bytes a step reads) and its fraction of the stream
    read bandwidth measured in the same run, per engine, then the step's bytes and the stream."""
    tg = {e: results[e][1] for e in ("ember", *anchors)}
    read = float(np.mean(stream))
    gbs = {e: r.mean * step["total"] / 1e9 for e, r in tg.items()}
    rows = [(f"{tg['ember'].test} decode GB/s", *(f"{gbs[e]:.1f}" for e in tg),
             *(f"{gbs['ember'] / gbs[e]:.2f}" for e in anchors)),
            ("decode / stream read", *(f"{gbs[e] / read:.0%}" for e in tg), *([""] * len(anchors))),
            (f"stream read GB/s ({len(stream)} runs)",
             f"{read:.1f} ± {float(np.std(stream, ddof=1)) if len(stream) > 1 else 0.0:.1f}",
             *([""] * (2 * len(anchors)))),
            ("MB read per decode step", f"{step['total'] / 1e6:.1f} (weights {step['weights'] / 1e6:.1f}, "
             f"KV {step['kv'] / 1e6:.1f})", *([""] * (2 * len(anchors))))]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: ember's default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per test and engine")
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0,
                        help="tokens in the cache before each timed run, decoded untimed (llama-bench's -d)")
    parser.add_argument("--llama-bench", metavar="PATH",
                        help="also run llama.cpp's llama-bench binary at PATH (a third column)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--requant", choices=("q4_k_m", "q5_k_m"),
                        help="measure the model requantized into this llama.cpp mix (ember.tools.requant)")
    parser.add_argument("--worker", choices=WORKER_ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)      # a worker's K,V cache types
    parser.add_argument("--tests", default="pp,tg", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model is None:
        from ember.models.default_model import default_model_path
        args.model = str(default_model_path())
    if args.worker:
        cache = tuple(args.cache.split(",")) if args.cache else None
        return worker(args.worker, args.model, args.threads, args.n_prompt, args.n_gen, args.seed, args.depth,
                      cache, args.tests)
    if args.reps < 2:
        parser.error("--reps must be at least 2 (the table shows a sample std)")
    if args.requant:
        args.model = str(requantized(Path(args.model), args.requant))

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results, info = measure(args)
    load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    anchors = [e for e in ("llama.cpp", "llama-bench") if e in results]
    rows = []
    for k, ours in enumerate(results["ember"]):
        theirs = [results[e][k] for e in anchors]
        rows.append((f"{ours.test} t/s", ours.cell(), *(t.cell() for t in theirs),
                     *(f"{ours.mean / t.mean:.2f}" for t in theirs)))
    rows += bandwidth_rows(results, anchors, info["stream"], decode_step_bytes(args.model, args.depth, args.n_gen))
    rss = [info[e]["peak_rss_kib"] / 1024 for e in ENGINES]
    rows.append(("peak RSS MiB", f"{rss[0]:.0f}", f"{rss[1]:.0f}", *([""] * (len(anchors) - 1)),
                 f"{rss[0] / rss[1]:.2f}", *([""] * (len(anchors) - 1))))
    header = ("", "ember", *anchors, *(f"ember / {e}" for e in anchors))
    n_ctx = context_size(args.n_prompt, args.n_gen, args.depth)
    title = (f"{Path(args.model).name}, {args.threads} threads, n_ctx {n_ctx}, mean ± std of "
             f"{args.reps} reps ({load}; {time.perf_counter() - start:.0f} s)")
    notes = (f"ember: warm-up with compiling {info['ember']['ready_seconds']:.1f} s "
             f"(compile {info['ember']['compile_seconds']:.1f} s, {info['ember']['graphs']} graphs); "
             f"llama-cpp-python {info['llama.cpp']['version']} ({info['llama.cpp']['system']})")
    if "llama-bench" in info:
        lb = info["llama-bench"]
        notes += (f"\nllama-bench: build {lb['build_commit']} ({lb['build_number']}), {lb['cpu_info']}, "
                  f"{lb['n_threads']} threads, n_ctx = its test's tokens")
    if info["ember"]["compile_seconds"] != info["ember"]["compile_seconds_at_ready"]:
        notes += "\nWARNING: ember compiled during timed runs; its numbers include compiling"
    print_table(title, header, rows, args.markdown)
    print(f"\n{notes}" if args.markdown else notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
