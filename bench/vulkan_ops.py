"""Benchmark of the Vulkan backend: per-op and per-token figures, with the error of each result.

Prints Markdown tables, measured in one run (median of --reps runs after a warm-up):
  * ops: single-op graphs at the default model's shapes (Gemma 3 270M: n_embd 640, FFN 2048,
    4 heads / 1 KV head of 256, vocab 262144) with ms per run, the bytes of weights (or
    operands) read per second, and NMSE against the NumPy reference: on lavapipe, a CPU
    implementation of Vulkan, correctness is the point and the speed is for scale;
  * the default model's decode step (T=1) and a prompt step (T=16) by op: each dispatch
    submitted alone and timed (so the sum exceeds a real run, which submits one command buffer);
  * per token: decode and prompt steps as a session runs them, Vulkan and the CPU backend side
    by side, with the NMSE of the Vulkan logits against the CPU's.

    python bench/vulkan_ops.py [--reps 5] [--no-model] [--device N] [--features baseline]

Other processes on the machine (the load average is in the title) slow lavapipe's worker
threads as they do the CPU backend's.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.backends import get_backend  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.ir import GraphBuilder, run_reference  # noqa: E402
from ember.ir.dtypes import dtype  # noqa: E402
from ember.testing import nmse  # noqa: E402


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- single ops --------------------------------------------------------------------------------
def op_cases(rng):
    """(name, shape text, graph, inputs, bytes read) at the default model's shapes."""
    cases = []

    def mm(wtype, N, K, T=1):
        b = GraphBuilder(f"mm_{wtype}")
        x = b.input("x", "f32", (T, K))
        w = b.weight("w", rng.standard_normal((N, K)).astype(np.float32) * 0.05, wtype)
        graph = b.build([b.mul_mat(x, w)])
        nbytes = dtype(wtype).row_bytes(K) * N
        cases.append((f"mul_mat {wtype}", f"T={T} N={N} K={K}", graph,
                      {"x": rng.standard_normal((T, K)).astype(np.float32)}, nbytes))

    mm("q8_0", 262144 // 8, 640)        # an eighth of the output head
    mm("q5_0", 4096, 640)
    mm("q4_k", 2048, 1024 - 1024 % 256)
    mm("q6_k", 640, 2048)
    mm("f16", 2048, 640)
    mm("q4_k", 2048, 1024, T=16)

    b = GraphBuilder("attention")
    q = b.input("q", "f32", (1, 4, 256))
    k, v = b.input("k", "f16", (256, 1, 256)), b.input("v", "f16", (256, 1, 256))
    graph = b.build([b.attention(q, k, v, scale=0.0625)])
    cases.append(("attention", "Tq=1 Tk=256 4/1 heads of 256", graph,
                  {"q": rng.standard_normal((1, 4, 256)).astype(np.float32),
                   "k": rng.standard_normal((256, 1, 256)).astype(np.float16),
                   "v": rng.standard_normal((256, 1, 256)).astype(np.float16)}, 2 * 256 * 256 * 2))

    b = GraphBuilder("get_rows")
    table = b.weight("table", rng.standard_normal((4096, 640)).astype(np.float32), "q8_0")
    idx = b.input("idx", "i32", (16,))
    graph = b.build([b.get_rows(table, idx)])
    cases.append(("get_rows q8_0", "16 rows of 640", graph,
                  {"idx": rng.integers(0, 4096, 16).astype(np.int32)}, 16 * dtype("q8_0").row_bytes(640)))

    for name, shape in (("rms_norm_mul", (16, 640)), ("geglu", (16, 2048)), ("add", (16, 640))):
        b = GraphBuilder(name)
        x = b.input("x", "f32", shape)
        y = b.input("y", "f32", shape[-1:] if name == "rms_norm_mul" else shape)
        graph = b.build([b.op(name, x, y)])
        inputs = {"x": rng.standard_normal(shape).astype(np.float32),
                  "y": rng.standard_normal(shape[-1:] if name == "rms_norm_mul" else shape).astype(np.float32)}
        cases.append((name, "x".join(map(str, shape)), graph, inputs, sum(a.nbytes for a in inputs.values())))

    b = GraphBuilder("rope")
    x = b.input("x", "f32", (16, 4, 256))
    pos = b.input("pos", "i32", (16,))
    graph = b.build([b.rope(x, pos, mode="neox", freq_base=1e6)])
    cases.append(("rope", "16x4x256 neox", graph, {"x": rng.standard_normal((16, 4, 256)).astype(np.float32),
                                                  "pos": np.arange(100, 116, dtype=np.int32)}, 16 * 4 * 256 * 4))
    return cases


def bench_ops(backend, reps: int) -> list[str]:
    rng = np.random.default_rng(0)
    rows = ["| op | shape | ms | GB/s read | NMSE vs reference |", "|---|---|---:|---:|---:|"]
    for name, shape, graph, inputs, nbytes in op_cases(rng):
        exe = backend.compile(graph)
        seconds = median_seconds(lambda: exe.run(inputs), reps)
        got = exe.run(inputs)[0]
        err = nmse(got, run_reference(graph, inputs)[0])
        rows.append(f"| {name} | {shape} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.3f} | {err:.1e} |")
    return rows


# ---- the default model -------------------------------------------------------------------------
def step_inputs(graph, T: int, n_kv: int):
    rng = np.random.default_rng(1)
    inputs = {}
    for node in graph.inputs:
        if node.name == "tokens":
            inputs[node.name] = rng.integers(0, 10000, T).astype(np.int32)
        elif node.name in ("pos", "slots"):
            inputs[node.name] = np.arange(T, dtype=np.int32)
        elif node.name == "out_ids":
            inputs[node.name] = np.array([T - 1], np.int32)
        elif node.name.startswith("mask"):
            visible = np.arange(n_kv)[None, :] <= np.arange(T)[:, None]
            inputs[node.name] = np.where(visible, 0.0, -np.inf).astype(np.float32)
        else:
            inputs[node.name] = np.zeros(node.shape, node.dtype.numpy)
    return inputs


def bench_model_ops(backend, model, T: int) -> list[str]:
    from ember.passes import pipeline_for
    graph = pipeline_for("vulkan")(model.build_step(T, 256, 1))
    exe = backend.compile(graph)
    inputs = step_inputs(graph, T, 256)
    exe.run(inputs)
    times = exe.profile(inputs)
    by_op, count = collections.defaultdict(float), collections.Counter()
    for op, label, seconds in times:
        key = op
        if op == "mul_mat":
            key = f"mul_mat (output head)" if "token_embd" in label else "mul_mat (layers)"
        by_op[key] += seconds
        count[key] += 1
    total = sum(by_op.values())
    rows = [f"| op (T={T}) | dispatches | ms | share |", "|---|---:|---:|---:|"]
    for key, seconds in sorted(by_op.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {key} | {count[key]} | {seconds * 1e3:.1f} | {100 * seconds / total:.1f}% |")
    rows.append(f"| all, each dispatch alone | {len(times)} | {total * 1e3:.1f} | |")
    run = median_seconds(lambda: exe.run(inputs), 3)
    rows.append(f"| all, one command buffer | {len(times)} | {run * 1e3:.1f} | |")
    return rows


def bench_tokens(backends, model, reps: int) -> list[str]:
    from ember.runtime.session import Session, SessionOptions
    prompt = np.random.default_rng(2).integers(0, 10000, 16).astype(np.int32)
    rows = ["| backend | compile s | prompt 16 tok: t/s | decode: ms/token | decode t/s | NMSE vs cpu |",
            "|---|---:|---:|---:|---:|---:|"]
    logits = {}
    for name, backend in backends:
        session = Session(model, backend, SessionOptions(n_ctx=256))
        try:
            session.eval(prompt)                     # compiles the prompt step
        except EmberError as e:
            rows.append(f"| {name} | failed: {str(e).splitlines()[0][:80]} | | | | |")
            continue
        session.reset()
        prompt_s, decode_s = [], []
        for _ in range(max(1, reps // 2)):
            session.reset()
            start = time.perf_counter()
            first = session.eval(prompt)
            prompt_s.append(time.perf_counter() - start)
            session.eval([int(first.argmax())])      # compiles the decode step once
            start = time.perf_counter()
            steps = 4
            for i in range(steps):
                last = session.eval([100 + i])
            decode_s.append((time.perf_counter() - start) / steps)
        logits[name] = (first, last)
        p, d = statistics.median(prompt_s), statistics.median(decode_s)
        err = "" if name == "cpu" else f"{max(nmse(a, b) for a, b in zip(logits[name], logits['cpu'])):.1e}" \
            if "cpu" in logits else ""
        rows.append(f"| {name} | {session.stats.compile_seconds:.1f} | {prompt.size / p:.1f} | {d * 1e3:.0f} | "
                    f"{1 / d:.2f} | {err} |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-model", action="store_true", help="only the single-op table")
    parser.add_argument("--device", type=int, default=None)
    parser.add_argument("--features", default="device", choices=("device", "baseline"))
    args = parser.parse_args(argv)
    cache = Path(tempfile.gettempdir()) / "ember-bench-vulkan"
    backend = get_backend("vulkan", device=args.device, features=args.features, cache_dir=cache)
    ok, why = backend.available()
    if not ok:
        print(why, file=sys.stderr)
        return 1
    caps = backend.caps
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"### Vulkan on {caps.device} (features: {args.features}; 8-bit storage {caps.storage8}, "
          f"16-bit {caps.storage16}, subgroup {caps.subgroup_size}, texel buffers {caps.texel_buffers}); "
          f"load average {load:.1f} on {os.cpu_count()} cores\n")
    print("\n".join(bench_ops(backend, args.reps)))
    if not args.no_model:
        from ember.models import load_model
        from ember.models.default_model import default_model_path
        model = load_model(default_model_path(progress=None))
        for T in (1, 16):
            print()
            print("\n".join(bench_model_ops(backend, model, T)))
        print()
        # the cpu backend first: the NMSE column compares with its logits
        print("\n".join(bench_tokens([("cpu", get_backend("cpu")), ("vulkan", backend)], model, args.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
