"""Benchmark of the CPU backend's matmul kernels against NumPy and the machine's memory.

Prints one table, measured in one run (median of several repetitions after a warm-up):
  * f32 matmul GFLOP/s, ember vs NumPy (OpenBLAS), at 1024^3 and T=512, N=4096, K=4096;
  * GB/s of weight bytes read by quantized GEMV (T=1) for each type of GEMV_TYPES, against the
    machine's read bandwidth measured by a C streaming-read kernel (same OpenMP thread count,
    over a buffer larger than the L3 cache) compiled in the same run;
  * prompt-sized (T=512) quantized GEMM GFLOP/s, for scale.

    python bench/ops.py [--threads 2] [--reps 7] [--rounds 1] [--markdown] [--gemv-only]
                        [--cpu-time] [--types q5_k,q3_k,...] [--hot]

--markdown writes the table as Markdown to stdout (for BENCHMARKS.md); --gemv-only measures the
read bandwidth and the GEMV rows alone; --cpu-time times by the process's CPU seconds (all
threads together) instead of the wall clock, so that on a machine shared with other jobs the
rates are those of the cores while they run this process (the GEMV and the stream kernel alike);
--types keeps the GEMV rows of the listed weight types only (an A/B comparison of a few kernels);
--hot times the GEMV on weights that stay in a 512 KiB L2 cache (128 x 4096 and 512 x 768, or
512 x 640 for 32-value blocks; each timing repeats the call to about 20 MB of weights), so the
rates are the kernels' compute rates, the memory left out: the figure to compare two versions of
a kernel on a loaded machine, where the DRAM bandwidth moves with the other jobs.

Notes: OPENBLAS_CORETYPE (and OPENBLAS_L2_SIZE) may be set on some machines and slow NumPy's
sgemm; run once with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/ops.py` to
see both numbers. The 4096x4096 quantized matrices (9-18 MB) fit in a 32 MiB L3, so their
GEMV can read faster than DRAM. Other processes on the machine (see the load average in the
title) make 2-thread timings jumpy: a woken OpenMP thread may wait milliseconds for its core.
The 256-value super-block types need K to be a multiple of 256, so their large-N rows use K=768
instead of 640. Weights are
random bytes with sane scales: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.backends.cpu.compiler import ISA_FLAGS, CompileCache  # noqa: E402
from ember.codegen.cpu_matmul import matmul_scratch_bytes, standalone_source  # noqa: E402
from ember.ir.dtypes import dtype, from_float32  # noqa: E402
from ember.ir.quant_formats import random_blocks  # noqa: E402

STREAM_SOURCE = r"""
/* Streaming read of n floats by nth threads; returns the sum so nothing is optimized away. */
#include <omp.h>
#include <stdint.h>
#include <immintrin.h>
float ember_bench_stream(const float *a, int64_t n, int nth) {
    float total = 0.0f;
#pragma omp parallel num_threads(nth) reduction(+:total)
    {
        int ith = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t per = (n / nt) & ~(int64_t)63;
        int64_t b = per * ith, e = ith == nt - 1 ? n : b + per;
#if defined(__AVX2__)
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int64_t i = b;
        for (; i + 32 <= e; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
        }
        float tmp[8];
        _mm256_storeu_ps(tmp, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        float s = 0.0f;
        for (int j = 0; j < 8; j++) s += tmp[j];
        for (; i < e; i++) s += a[i];
#else
        float s = 0.0f;
        for (int64_t i = b; i < e; i++) s += a[i];
#endif
        total += s;
    }
    return total;
}
"""

I64 = ctypes.c_int64
PTR = ctypes.c_void_p


# The clock of median_time: wall seconds, or with --cpu-time the CPU seconds of the whole process
# (all threads), which leave out the time the OS gives the cores to other processes.
CLOCK = {"fn": time.perf_counter}


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = CLOCK["fn"]()
        fn()
        times.append(CLOCK["fn"]() - t0)
    return statistics.median(times)


def aligned(nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes]


def random_weights(wtype: str, N: int, K: int, rng) -> np.ndarray:
    """Random blocks of wtype with small, finite fp16 scales (quantizing real data is slow)."""
    dt = dtype(wtype)
    if dt.is_float:
        values = rng.standard_normal((N, K), dtype=np.float32)
        return values if dt.name == "f32" else from_float32(values, dt)
    raw = random_blocks(wtype, N * K // dt.block_size, rng)
    return raw.reshape(N, K // dt.block_size * dt.block_bytes)


class StreamRead:
    """The machine's read bandwidth: STREAM_SOURCE compiled (cached) with ember's native flags,
    run by `threads` OpenMP threads over a buffer larger than the L3 cache (median of `reps`
    after a warm-up). bench/models.py measures it beside decode as well."""

    def __init__(self, threads: int, reps: int, nbytes: int = 512 << 20):
        self.threads, self.reps, self.nbytes = threads, reps, nbytes
        cache = CompileCache(Path(tempfile.gettempdir()) / "ember-bench-cache")
        self.lib = ctypes.CDLL(str(cache.build(STREAM_SOURCE, ISA_FLAGS["native"], "bench_stream")))
        self.lib.ember_bench_stream.argtypes = [PTR, I64, ctypes.c_int]
        self.lib.ember_bench_stream.restype = ctypes.c_float

    def gb_per_s(self) -> float:
        a = np.ones(self.nbytes // 4, np.float32)    # allocated per call: 512 MiB held only while measured
        seconds = median_time(lambda: self.lib.ember_bench_stream(a.ctypes.data, a.size, self.threads), self.reps)
        return self.nbytes / seconds / 1e9


class Bench:
    def __init__(self, threads: int, reps: int):
        self.threads, self.reps = threads, reps
        cache = CompileCache(Path(tempfile.gettempdir()) / "ember-bench-cache")
        flags = ISA_FLAGS["native"]
        self.lib = ctypes.CDLL(str(cache.build(standalone_source(), flags, "bench_matmul")))
        self.stream = StreamRead(threads, reps)
        self.rng = np.random.default_rng(0)
        self.weights = {}

    def run(self, wtype, x, w, y, scratch, K):
        fn = getattr(self.lib, f"ember_mm_{wtype}_run")
        fn.argtypes = [ctypes.c_int, I64, I64, I64, PTR, I64, PTR, I64, PTR, I64, PTR]
        T, N = x.shape[0], w.shape[0]
        args = (self.threads, T, N, K, x.ctypes.data, x.strides[0], w.ctypes.data, w.strides[0],
                y.ctypes.data, y.strides[0], scratch.ctypes.data)
        return lambda: fn(*args)

    def matmul_seconds(self, wtype, T, N, K, repeat=1):
        """Median seconds of one call (timed over repeat calls in a row), and the weight bytes."""
        if (wtype, N, K) not in self.weights:
            self.weights[(wtype, N, K)] = random_weights(wtype, N, K, self.rng)
        w = self.weights[(wtype, N, K)]
        x = self.rng.standard_normal((T, K), dtype=np.float32)
        y = np.empty((T, N), np.float32)
        scratch = aligned(max(64, matmul_scratch_bytes(wtype, T, K)))
        call = self.run(wtype, x, w, y, scratch, K)

        def calls():
            for _ in range(repeat):
                call()
        return median_time(calls, self.reps) / repeat, w.nbytes

    def numpy_gflops(self, T, N, K):
        x = self.rng.standard_normal((T, K), dtype=np.float32)
        w = self.rng.standard_normal((N, K), dtype=np.float32)
        out = np.empty((T, N), np.float32)
        return 2 * T * N * K / median_time(lambda: np.matmul(x, w.T, out=out), self.reps) / 1e9

    def read_bandwidth(self) -> float:
        return self.stream.gb_per_s()


F32_SIZES = ((1024, 1024, 1024), (512, 4096, 4096))
GEMV_TYPES = ("q8_0", "q4_0", "q4_k", "q5_k", "q3_k", "q2_k", "iq4_xs", "q4_1", "q5_1", "iq4_nl",
              "mxfp4", "nvfp4")
GEMV_CASES = tuple((wtype, N, K) for wtype in GEMV_TYPES
                   for N, K in ((4096, 4096), (262144, 768 if dtype(wtype).block_size == 256 else 640)))
HOT_CASES = tuple((wtype, N, K) for wtype in GEMV_TYPES
                  for N, K in ((128, 4096), (512, 768 if dtype(wtype).block_size == 256 else 640)))
HOT_BYTES = 20_000_000  # weight bytes per timing of a --hot case
GEMM_CASES = tuple((wtype, 512, 4096, 4096) for wtype in ("q8_0", "q4_0", "q4_k"))


def gemv_rates(b: Bench, gemv_cases, hot: bool) -> dict:
    """GB/s of weights read by each GEMV case (hot: the call repeated over ~HOT_BYTES)."""
    out = {}
    for wtype, N, K in gemv_cases:
        repeat = max(1, HOT_BYTES // (N * K)) if hot else 1
        seconds, nbytes = b.matmul_seconds(wtype, 1, N, K, repeat)
        out[(wtype, 1, N, K)] = nbytes / seconds / 1e9
    return out


def measure_round(b: Bench, gemv_only: bool = False, gemv_cases=GEMV_CASES,
                  hot: bool = False) -> dict:
    """One pass over every case (the bandwidth and GEMV cases alone with gemv_only);
    throughputs keyed by case."""
    out = {}
    if gemv_only:
        out["bandwidth"] = b.read_bandwidth()
        out.update(gemv_rates(b, gemv_cases, hot))
        return out
    # NumPy first, then a pause: OpenBLAS's idle threads spin for a while after each call and
    # would steal the cores from ember's OpenMP team.
    for T, N, K in F32_SIZES:
        out[("numpy", T, N, K)] = b.numpy_gflops(T, N, K)
    time.sleep(1.0)
    for T, N, K in F32_SIZES:
        out[("f32", T, N, K)] = 2 * T * N * K / b.matmul_seconds("f32", T, N, K)[0] / 1e9
    out["bandwidth"] = b.read_bandwidth()
    out.update(gemv_rates(b, gemv_cases, hot))
    for wtype, T, N, K in GEMM_CASES:
        out[(wtype, T, N, K)] = 2 * T * N * K / b.matmul_seconds(wtype, T, N, K)[0] / 1e9
    return out


def measure(threads: int, reps: int, rounds: int = 1, gemv_only: bool = False,
            types: tuple[str, ...] = GEMV_TYPES, hot: bool = False) -> list[tuple[str, str, str, str]]:
    """The table rows; with rounds > 1 each number is the best of the rounds' medians."""
    b = Bench(threads, reps)
    gemv_cases = tuple(case for case in (HOT_CASES if hot else GEMV_CASES) if case[0] in types)
    results = [measure_round(b, gemv_only, gemv_cases, hot) for _ in range(rounds)]
    best = {key: max(r[key] for r in results) for key in results[0]}
    rows = []
    for T, N, K in () if gemv_only else F32_SIZES:
        ours, theirs = best[("f32", T, N, K)], best[("numpy", T, N, K)]
        rows.append((f"f32 matmul T={T} N={N} K={K}", f"{ours:.1f} GFLOP/s",
                     f"numpy {theirs:.1f} GFLOP/s", f"{ours / theirs:.2f}x"))
    bandwidth = best["bandwidth"]
    rows.append(("read bandwidth (C stream, 512 MiB)", f"{bandwidth:.1f} GB/s", "", ""))
    for wtype, N, K in gemv_cases:
        gbs = best[(wtype, 1, N, K)]
        if hot:  # a compute rate: no memory to compare it with
            rows.append((f"{wtype} GEMV T=1 N={N} K={K} (L2-hot)", f"{gbs:.1f} GB/s", "", ""))
            continue
        rows.append((f"{wtype} GEMV T=1 N={N} K={K}", f"{gbs:.1f} GB/s",
                     f"read {bandwidth:.1f} GB/s", f"{gbs / bandwidth:.2f}x"))
    for wtype, T, N, K in () if gemv_only else GEMM_CASES:
        rows.append((f"{wtype} GEMM T={T} N={N} K={K}", f"{best[(wtype, T, N, K)]:.1f} GFLOP/s",
                     "", ""))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="repetitions per case (median)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="passes over the table; each number is the best round's median")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--gemv-only", action="store_true",
                        help="only the read bandwidth and the GEMV rows")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the process's CPU seconds (all threads) instead of the wall "
                             "clock: on a loaded machine, rates per busy core")
    parser.add_argument("--types", default=",".join(GEMV_TYPES),
                        help="comma-separated weight types of the GEMV rows (default: all)")
    parser.add_argument("--hot", action="store_true",
                        help="GEMV on weights that stay in L2: the kernels' compute rates")
    args = parser.parse_args(argv)
    types = tuple(t for t in args.types.split(",") if t)
    unknown = [t for t in types if t not in GEMV_TYPES]
    if unknown:
        parser.error(f"--types: no GEMV case for {', '.join(unknown)}; known: {', '.join(GEMV_TYPES)}")
    if args.cpu_time:
        CLOCK["fn"] = time.process_time
    load_before = os.getloadavg()[0]
    rows = measure(args.threads, args.reps, args.rounds, args.gemv_only, types, args.hot)
    load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    header = ("case", "ember", "reference", "ratio")
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                    if k in os.environ) or "OPENBLAS_CORETYPE unset"
    rounds = f", best of {args.rounds} rounds" if args.rounds > 1 else ""
    rounds += ", CPU time" if args.cpu_time else ""
    rounds += ", weights L2-hot" if args.hot else ""
    title = (f"ember CPU matmul, {args.threads} threads, median of {args.reps}{rounds} "
             f"({env}; {load})")
    if args.markdown:
        print(f"**{title}**\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * len(header)) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        print(title)
        for row in [header] + rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
