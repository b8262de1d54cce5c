"""A phone-size mixture-of-experts hybrid (qwen35moe) on the CPU, ember against llama.cpp, and the
weight bytes one decode step reads.

The model is written once into the bench cache folder (~/.cache/ember/bench, fixed seed) by
tests/support/tiny_gguf_delta.py's writer, llama.cpp's tensor names: 16 layers of n_embd 1024
(gated DeltaNet in three of four, gated attention in every fourth), 64 experts of width 288 with
8 used per token plus a shared expert of width 512 in every layer: 1.0B parameters, 0.2B active
per token. Every weight matrix is stored in the file's type (q4_0 or q8_0) but the routers and
the short-convolution kernels (F32, as llama.cpp's quantizer keeps them).

1. Speed: bench/models.py's side-by-side run (llama-bench's method, the engines in separate
   processes taking turns) on each file.
2. Bytes read per decode step: the file's pages are dropped from memory (madvise on ember's own
   mapping, posix_fadvise on the file, read-ahead off), one token is decoded, and mincore says
   which pages the step brought back; each tensor's share of them is compared with its active
   bytes (the n_used selected experts of an expert tensor, one row of the embedding table, all of
   any other weight).

    python bench/moe.py [--types q4_0 q8_0] [--threads 2] [--reps 3] [--markdown]
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from ember.files import default_cache_dir  # noqa: E402

PAGE = mmap.PAGESIZE


def phone_config():
    from tiny_gguf_delta import DeltaConfig
    return DeltaConfig("qwen35moe", seed=35, n_layer=16, full_attention_interval=4, n_rot=32,
                       rope_sections=(6, 5, 5, 0), n_embd=1024, n_head=8, n_head_kv=2, head_dim=128,
                       d_state=128, n_k_heads=4, n_v_heads=8, n_expert=64, n_expert_used=8,
                       n_ff_exp=288, n_ff_shexp=512, rope_base=1e7)


def stored_quantized(cfg, name: str, values: np.ndarray) -> bool:
    """Every weight matrix but the routers and the convolution kernels (llama.cpp's quantizer
    keeps those F32)."""
    kind = name.split(".", 2)[-1]
    return (values.ndim >= 2 and values.shape[-1] % 32 == 0 and not kind.startswith("ffn_gate_inp")
            and not kind.startswith("ssm_conv1d"))


def write_model(weight_type: str) -> Path:
    """The phone-size GGUF in weight_type, written on first use."""
    from tiny_gguf_delta import delta_weights, write_delta_model
    cfg = phone_config()
    path = default_cache_dir() / "bench" / f"qwen35moe-phone-{weight_type}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        print(f"writing {path} ...", file=sys.stderr)
        try:
            write_delta_model(tmp, cfg, delta_weights(cfg), weight_type, f"qwen35moe-phone-{weight_type}",
                              quantize=stored_quantized)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


# ---- bytes read per decode step ----------------------------------------------------------------
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.posix_fadvise.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    return libc


MADV_RANDOM, MADV_DONTNEED, POSIX_FADV_DONTNEED = 1, 4, 4


class PageProbe:
    """Which pages of a model file's mapping (ember's own mmap of the GGUF) a piece of work reads."""

    def __init__(self, file):
        self.libc = _libc()
        self.path = file.path
        self.base = file.bytes.ctypes.data           # page aligned: the mmap's start
        self.size = file.size
        self.pages = -(-self.size // PAGE)
        self._call("madvise", self.base, self.size, MADV_RANDOM)    # no read-around on faults

    def _call(self, name, *args):
        if getattr(self.libc, name)(*args) != 0:
            raise OSError(ctypes.get_errno(), f"{name} failed on {self.path}")

    def drop(self) -> None:
        """Drop the file's pages: unmapped here, then evicted from the page cache."""
        self._call("madvise", self.base, self.size, MADV_DONTNEED)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            rc = self.libc.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            if rc != 0:
                raise OSError(rc, f"posix_fadvise failed on {self.path}")
        finally:
            os.close(fd)

    def resident(self) -> np.ndarray:
        """bool per page: in memory now."""
        vec = np.zeros(self.pages, np.uint8)
        self._call("mincore", self.base, self.size, vec.ctypes.data)
        return (vec & 1).astype(bool)


def bytes_touched(resident: np.ndarray, start: int, nbytes: int) -> int:
    """Bytes of [start, start + nbytes) (offsets in the file) on resident pages."""
    first, last = start // PAGE, (start + nbytes - 1) // PAGE
    pages = resident[first:last + 1]
    total = int(pages.sum()) * PAGE
    if pages[0]:
        total -= start - first * PAGE
    if pages[-1]:
        total -= (last + 1) * PAGE - (start + nbytes)
    return total


def active_bytes(name: str, tensor: np.ndarray, n_used: int) -> int:
    """The bytes of a weight one token needs: n_used experts of an expert tensor, one row of the
    embedding table, all of the rest."""
    if "_exps." in name:
        return tensor.nbytes // tensor.shape[0] * n_used
    if name == "token_embd.weight":
        return tensor.nbytes // tensor.shape[0]
    return tensor.nbytes


def measure_bytes(path: Path, threads: int, steps: int = 8, seed: int = 0) -> dict:
    """{"experts" | "other": (bytes read, active bytes)} per decode step, averaged over `steps`
    tokens decoded after a 16-token prompt. Read bytes of the weights in the file's mapping are
    measured (PageProbe); a weight ember copied at load (matmuls of one input fused into one) is
    counted whole, as its dense matmul reads all of it."""
    from ember.backends.cpu.backend import CpuBackend
    from ember.models import load_model
    from ember.runtime.session import Session, SessionOptions

    class Recording(CpuBackend):
        def compile(self, graph):
            self.last = super().compile(graph)
            return self.last

    model = load_model(path)
    backend = Recording(threads=threads)
    session = Session(model, backend, SessionOptions(n_ctx=256))
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, model.hparams.n_vocab, 16 + steps + 1)]
    session.eval(tokens[:16])
    session.eval(tokens[16:17])                  # compiles the decode step
    step = backend.last.graph
    base, end = model.file.bytes.ctypes.data, model.file.bytes.ctypes.data + model.file.size
    copies = 0
    for node in step.nodes:
        if node.op == "const":
            data = step.constant_data(node)
            if not base <= data.ctypes.data < end:
                copies += data.nbytes
    n_used = model.hparams.n_expert_used
    probe = PageProbe(model.file)
    sums = {"experts": [0, 0], "other": [0, 0]}
    for t in tokens[17:]:
        probe.drop()
        session.eval([t])
        resident = probe.resident()
        for name, w in model.tensors.items():
            part = sums["experts" if "_exps." in name else "other"]
            part[0] += bytes_touched(resident, w.ctypes.data - base, w.nbytes)
            part[1] += active_bytes(name, w, n_used)
        sums["other"][0] += copies
    return {part: (read / steps, active / steps) for part, (read, active) in sums.items()}


def bytes_table(path: Path, figures: dict, steps: int = 8) -> list[str]:
    lines = [f"**Weight bytes read per decode step, {path.name}** (mean of {steps} tokens; experts: "
             "the ffn_*_exps tensors; other: the file's other weights, those ember fused at load "
             "counted whole)", "",
             "| weights | read MB/token | active MB/token | read / active |", "|---|---:|---:|---:|"]
    total = [0.0, 0.0]
    for part, (read, active) in figures.items():
        lines.append(f"| {part} | {read / 1e6:.2f} | {active / 1e6:.2f} | {read / active:.3f} |")
        total = [total[0] + read, total[1] + active]
    lines.append(f"| all | {total[0] / 1e6:.2f} | {total[1] / 1e6:.2f} | {total[0] / total[1]:.3f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["q4_0", "q8_0"], choices=["q4_0", "q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=64)
    parser.add_argument("--no-speed", action="store_true", help="only the bytes per decode step")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    import models as side_by_side
    status = 0
    for weight_type in args.types:
        path = write_model(weight_type)
        figures = measure_bytes(path, args.threads)
        print("\n".join(bytes_table(path, figures)) + "\n", flush=True)
        read = sum(r for r, _ in figures.values())
        active = sum(a for _, a in figures.values())
        if abs(read / active - 1.0) > 0.10:
            print(f"WARNING: {path.name}: a decode step reads {read / active:.2f}x its active weights")
            status = 1
        if not args.no_speed:
            status |= side_by_side.main(["--model", str(path), "--threads", str(args.threads),
                                         "--reps", str(args.reps), "--n-prompt", str(args.n_prompt),
                                         "--n-gen", str(args.n_gen)] + (["--markdown"] if args.markdown else []))
            print(flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
