"""Where a first `ember generate` spends its time: one in-process run of the default model's
prompt with timers around each phase (GGUF load, tokenizer, session, step graph, passes, C
rendering, the C compiler per library, loading, the first step), in a fresh cache folder
(cold) and then again in the same folder (warm, a second process).

    python bench/cold_start_phases.py [--model M] [--threads 2] [--cache-dir DIR]

Each run is its own process (`--child`), so the warm run finds only what the cold one left on
disk, as a second `ember generate` would. The phases are timed by wrapping the functions that
do them; what no phase covers is listed as "other".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROMPT = "The capital of France is"


def child(model: str | None, threads: int, quick_start: bool | None) -> dict:
    """Run the prompt once in this process; seconds per phase."""
    start = time.perf_counter()
    spent: dict[str, float] = defaultdict(float)

    def timed(owner, attr: str, label):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        setattr(owner, attr, wrapper)

    import ember.api
    import ember.backends.cpu.backend as cpu_backend
    import ember.backends.cpu.compiler as cpu_compiler
    import ember.models
    import ember.models.gguf_file as gguf_file
    import ember.models.tokenizer as tokenizer
    import ember.passes.base as passes
    import ember.runtime.session as session
    spent["import"] = time.perf_counter() - start
    timed(ember.api, "load", "ember.api.load (all)")
    timed(ember.models, "load_model", "GGUF load + model check")
    timed(gguf_file.GGUFFile, "__init__", "GGUF header")
    timed(tokenizer.Tokenizer, "__init__", "tokenizer")
    timed(session.Session, "__init__", "session (KV caches)")
    timed(session.Session, "build_step", "build step graph")
    timed(passes.Pipeline, "__call__", "passes")
    timed(cpu_backend, "render_graph", "render C")
    timed(cpu_compiler.CompileCache, "_compile",
          lambda self, source, flags, name: f"C compiler {flags[0]}: {'kernel library' if name == 'kernels' else 'graph'}"
                                            f" (summed over threads)")
    timed(cpu_compiler.CompileCache, "cached", "binary cache (lookup, hash, write)")
    timed(cpu_backend.CpuBackend, "load_executable", "load library + executable")
    timed(cpu_backend.CpuRun, "__call__", "first step (kernels)")
    llm = ember.api.load(model, threads=threads, **({} if quick_start is None else {"quick_start": quick_start}))
    t0 = time.perf_counter()
    text = llm.generate(PROMPT, max_tokens=1, temperature=0)
    spent["generate (all)"] = time.perf_counter() - t0
    spent["total"] = time.perf_counter() - start
    spent["text"] = text
    return dict(spent)


def run_child(args, cache_dir: Path) -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_dir))
    cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads)]
    if args.quick_start is not None:
        cmd += ["--quick-start", "on" if args.quick_start else "off"]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fresh_cache(base: Path) -> Path:
    """A cache folder with nothing compiled in it, sharing the default model's folder (so the
    model is not assembled again)."""
    from ember.files import default_cache_dir
    folder = Path(tempfile.mkdtemp(prefix="ember-cold-", dir=base))
    models = default_cache_dir() / "models"
    (folder / "ember").mkdir()
    if models.is_dir():
        (folder / "ember" / "models").symlink_to(models)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick-start", choices=("on", "off"), default=None,
                   help="ember.api.load's quick_start (default: its default; older versions lack it)")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args(argv)
    if args.quick_start is not None:
        args.quick_start = args.quick_start == "on"
    if args.child:
        print(json.dumps(child(args.model, args.threads, args.quick_start)))
        return 0
    folder = fresh_cache(args.cache_dir)
    cold = run_child(args, folder)
    warm = run_child(args, folder)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"load average {load}; text {cold.pop('text')!r} / {warm.pop('text')!r}")
    print("| phase | cold (s) | warm (s) |\n|---|---:|---:|")
    for name in sorted(set(cold) | set(warm), key=lambda n: -cold.get(n, 0.0)):
        print(f"| {name} | {cold.get(name, 0.0):.3f} | {warm.get(name, 0.0):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
