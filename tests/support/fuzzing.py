"""Seed-driven mutation fuzzing of everything ember reads from outside (issue 16): GGUF files,
IR text, compiled artifacts and the compile cache.

Each class has a mutator (seed -> one hostile input, deterministic) and a handler that feeds the
input to ember the way a user would. Handlers run in a worker process (`python fuzzing.py
--worker`), one input at a time, under a memory limit; the parent counts what happened to each:

    ok         accepted, and (where it runs) the result is finite and matches the reference
    refused    an ember error of one line (naming file, key, node or tensor)
    traceback  any other Python exception, or an ember error of several lines
    wrong      accepted, but the output is non-finite or differs from the reference
    crash      the worker died (a signal: SIGSEGV, SIGABRT, SIGBUS, or killed for memory)
    hang       no answer within the time limit

Only ok and refused are good. `python tests/support/fuzzing.py [--slow]` prints the counts per
class (the RELIABILITY table of BENCHMARKS.md).
"""
from __future__ import annotations

import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOOD = ("ok", "refused", "skipped")
TIME_LIMIT = 180.0                 # seconds per input (a cold compile under load included)
MEMORY_LIMIT = 6 << 30             # bytes of address space per worker

# ---- interesting values ----------------------------------------------------------------------
INTS = [0, 1, -1, 2, 3, 7, 64, 255, 256, 511, 512, 513, 4096, 2**15, 2**16, 2**31 - 1, -2**31, 2**31,
        2**32 - 1, 2**32, 2**53, 2**63 - 1, -2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-30, 1e-6, 1e6, 1e30, 3.4e38, float("inf"),
          float("-inf"), float("nan")]


# ---- GGUF --------------------------------------------------------------------------------------
def mutate_gguf(base: bytes, seed: int):
    """One mutated GGUF file's bytes from a well-formed file's and a seed: (bytes, what)."""
    from gguf.constants import GGUFValueType as T

    from gguf_parts import GGUFParts, entry, nested_array, read_parts_bytes
    rng = random.Random(seed)
    parts: GGUFParts = read_parts_bytes(base)
    kind = rng.choice(["header", "meta-type", "meta-value", "meta-value", "tensor-info", "offset",
                       "bytes", "truncate", "duplicate"])
    if kind == "header":
        data = bytearray(parts.to_bytes())
        field = rng.choice([(4, "<I"), (8, "<Q"), (16, "<Q")])
        struct.pack_into(field[1], data, field[0], rng.choice(INTS) % 2**(8 * struct.calcsize(field[1])))
        return bytes(data), f"header field at {field[0]}"
    if kind in ("meta-type", "meta-value"):
        i = rng.randrange(len(parts.kvs))
        key, old = parts.kvs[i]
        if kind == "meta-type":
            new = struct.pack("<I", rng.randrange(16)) + old[4:]
        else:
            new = rng.choice([
                lambda: entry(T.UINT32, rng.choice(INTS) % 2**32),
                lambda: entry(T.INT32, (rng.choice(INTS) + 2**31) % 2**32 - 2**31),
                lambda: entry(T.UINT64, rng.choice(INTS) % 2**64),
                lambda: entry(T.FLOAT32, rng.choice(FLOATS)),
                lambda: entry(T.FLOAT64, rng.choice(FLOATS)),
                lambda: entry(T.BOOL, rng.random() < 0.5),
                lambda: entry(T.STRING, rng.choice(["", "llama", "gpt2", "x" * 300, "\udcff"])),
                lambda: entry(T.ARRAY, [rng.choice(INTS) % 2**32 for _ in range(rng.randrange(5))], T.UINT32),
                lambda: entry(T.ARRAY, [rng.choice(FLOATS) for _ in range(rng.randrange(400))], T.FLOAT32),
                lambda: entry(T.ARRAY, ["a", "b", "a"], T.STRING),
                lambda: nested_array(rng.choice([1, 2, 50, 3000])),
            ])()
        parts.kvs[i] = (key, new)
        return parts.to_bytes(), f"{kind} {key}"
    if kind == "duplicate":
        parts.kvs.insert(rng.randrange(len(parts.kvs)), rng.choice(parts.kvs))
        return parts.to_bytes(), "duplicate key"
    if kind in ("tensor-info", "offset"):
        t = rng.choice(parts.tensors)
        if kind == "offset":
            t[3] = rng.choice([0, t[3] + 32, max(t[3] - 32, 0), t[3] + 1, rng.choice(INTS) % 2**64])
        else:
            what = rng.choice(["dim", "type", "rank"])
            if what == "dim" and t[1]:
                t[1][rng.randrange(len(t[1]))] = rng.choice(INTS) % 2**64
            elif what == "type":
                t[2] = rng.choice([0, 1, 2, 3, 6, 8, 10, 12, 14, 30, 39, 255, 2**32 - 1])
            else:
                t[1] = t[1] + [1] if rng.random() < 0.5 else t[1][:-1]
        return parts.to_bytes(), f"{kind} {t[0]}"
    data = bytearray(parts.to_bytes())
    if kind == "truncate":
        return bytes(data[:rng.randrange(len(data))]), "truncated"
    header = len(data) - len(parts.data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(header)] ^= 1 << rng.randrange(8)
    return bytes(data), "header bytes flipped"


def handle_gguf(request: dict) -> dict:
    from ember.models import load_model
    from ember.models.tokenizer import Tokenizer
    path = request["path"]
    model = load_model(path)                      # header, hyper-parameters, the step graph
    tokenizer = Tokenizer.from_metadata(model.tokenizer, path, model.n_vocab)
    ids = tokenizer.encode("Hello world, once upon a time", add_special=True)
    tokenizer.decode(ids)
    if request.get("run"):
        import numpy as np

        from ember.backends import get_backend
        from ember.runtime.sampling import Sampler, SamplingParams
        from ember.runtime.session import Session, SessionOptions
        backend = get_backend("cpu", threads=1, cache_dir=request["cache"])
        session = Session(model, backend, SessionOptions(n_ctx=32))
        logits = session.eval(ids[:8] or [0])[-1]
        Sampler(SamplingParams(temperature=0)).sample(logits, ids)   # refuses non-finite logits
        if not np.all(np.isfinite(logits)):
            return {"outcome": "wrong", "why": "non-finite logits sampled"}
    return {"outcome": "ok"}


# ---- IR text -----------------------------------------------------------------------------------
IR_SEEDS = [
    """graph views(%x: f32[8, 64]) {
  %v = view(%x, offset=256, shape=[4, 32], strides=[512, 4])
  %c = cont(%v)
  %r = rms_norm(%c, eps=1e-06)
  return %r
}
""",
    """graph rope(%x: f32[4, 2, 64], %p: i32[4]) {
  %r = rope(%x, %p, n_dims=64, mode="neox", freq_base=10000.0, freq_scale=1.0)
  %s = softmax(%r, scale=0.125, softcap=0.0)
  return %s
}
""",
    """graph mm(%x: f32[3, 64], %w: f32[16, 64]) {
  %t = transpose(%w)
  %c = cont(%t)
  %v = view(%c, offset=0, shape=[64, 8], strides=[64, 4])
  %y = mul_mat(%x, %w)
  %z = scale(%y, scale=0.5, bias=1.0)
  return %z
}
""",
]


def mutate_ir(seed: int) -> tuple[str, str]:
    """One mutated IR text: a number (stride, offset, shape, attribute value) replaced."""
    import re
    rng = random.Random(seed)
    text = rng.choice(IR_SEEDS)
    numbers = [m for m in re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?", text)
               if not text[m.start() - 1].isalpha() and text[m.start() - 1] != "%"]
    m = rng.choice(numbers)
    if "." in m.group() or "e" in m.group():
        new = rng.choice(["0.0", "-1.0", "1e-45", "1e30", "inf", "-inf", "nan", "2.0", "-0.0"])
    else:
        value = int(m.group())
        new = str(rng.choice(INTS[:16] + [value - 1, value + 1, -value, value * 2, value * 4096, -4096]))
    return text[:m.start()] + new + text[m.end():], f"{m.group()} -> {new} at {m.start()}"


def handle_ir(request: dict) -> dict:
    import numpy as np

    from ember.backends import get_backend
    from ember.ir.interpreter import random_inputs, run_reference
    from ember.ir.parser import parse_ir
    from ember.ir.verifier import verify
    graph = parse_ir(request["text"], "fuzz.ir")
    verify(graph)
    if max(n.type.numel for n in graph.nodes) > 1 << 24:
        return {"outcome": "skipped", "why": "a valid graph too large to run here"}
    inputs = random_inputs(graph, seed=0)
    with np.errstate(all="ignore"):
        expected = run_reference(graph, inputs)
    results = {}
    for name in request["backends"]:
        backend = get_backend(name, cache_dir=request["cache"], **({"threads": 1} if name == "cpu" else {}))
        ok, why = backend.available()
        if not ok:
            continue
        supported, why = zip(*(backend.supports_op(n) for n in graph.nodes)) if graph.nodes else ((), ())
        if not all(supported):
            results[name] = "unsupported"
            continue
        got = backend.compile(graph).run(inputs)
        for g, e in zip(got, expected):
            g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
            if not np.array_equal(np.isfinite(g), np.isfinite(e)):
                return {"outcome": "wrong", "why": f"{name}: non-finite where the reference is not"}
            finite = np.isfinite(e)
            if not np.allclose(g[finite], e[finite], rtol=1e-3, atol=1e-3 * max(1.0, np.abs(e[finite]).max(initial=0))):
                return {"outcome": "wrong", "why": f"{name}: differs from the reference"}
        results[name] = "ok"
    if any(not np.all(np.isfinite(np.asarray(e, np.float64))) for e in expected):
        # The reference itself overflows (an attribute such as scale=1e30 is legal): the backends
        # matched it, non-finite values where it has them; counted apart.
        return {"outcome": "ok", "note": "non-finite like the reference"}
    return {"outcome": "ok", "backends": results}


# ---- artifacts ---------------------------------------------------------------------------------
def tamper_artifact(src: Path, dst: Path, seed: int) -> str:
    """A copy of artifact src at dst, tampered one way (checksums fixed up where the tamperer
    would): what was done."""
    import hashlib
    rng = random.Random(seed)
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    m = json.loads(path.read_text())
    files = sorted(m["files"])
    kind = rng.choice(["swap-steps", "path", "flip", "replace", "field", "truncate-json"])
    if kind == "swap-steps":
        key = rng.choice([k for k in ("library", "source", "graph", "plan", "binary") if k in m["steps"][0]])
        a, b = m["steps"][0], m["steps"][1]
        a[key], b[key] = b[key], a[key]
    elif kind == "path":
        step = rng.choice(m["steps"])
        key = rng.choice([k for k in ("library", "source", "graph", "plan") if k in step])
        bad = rng.choice(["/etc/passwd", "/tmp/x.so", "../outside", "steps/../../x", "", "steps"])
        step[key] = bad
        m["files"][bad] = "0" * 64
    elif kind in ("flip", "replace"):
        rel = rng.choice(files)
        target = dst / rel
        data = bytearray(target.read_bytes())
        if kind == "flip" and data:
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            data = bytearray((dst / rng.choice(files)).read_bytes())
        target.write_bytes(bytes(data))
        # Machine code edited with its checksum fixed up is code the tamperer chose (it may do
        # anything, crash included: checksums detect corruption, not tampering, and the README
        # says what a deployment signs), so flipped bits in a library stay a corruption the
        # checksum must catch. Libraries replaced whole, checksum fixed, are still tried: the
        # source mark and the loader probe must refuse them.
        if not (kind == "flip" and rel.endswith(".so")):
            m["files"][rel] = hashlib.sha256(bytes(data)).hexdigest()
        kind += f" {rel}"
    elif kind == "field":
        field = rng.choice(["n_ctx", "steps", "constants", "target", "model", "kernel_library", "files"])
        m[field] = rng.choice([None, 0, -1, 2**40, "x", [], {}, {"a": 1}])
        kind += f" {field}"
    if kind == "truncate-json":
        text = json.dumps(m)
        path.write_text(text[:rng.randrange(len(text))])
    else:
        path.write_text(json.dumps(m))
    return kind


def handle_artifact(request: dict) -> dict:
    import numpy as np

    from ember.artifact import load_artifact
    _, session = load_artifact(request["path"], threads=1)
    logits = session.eval([1, 17, 260, 300, 42])
    if not np.all(np.isfinite(logits)):
        return {"outcome": "wrong", "why": "non-finite logits"}
    if request["compare"] and not np.array_equal(logits, np.load(request["expected"])):
        return {"outcome": "wrong", "why": "logits differ from the untampered artifact's"}
    return {"outcome": "ok"}


# ---- the compile cache -------------------------------------------------------------------------
CACHE_GRAPH = """graph cached(%x: f32[4, 64], %w: f32[32, 64]) {
  %y = mul_mat(%x, %w)
  %z = rms_norm(%y, eps=1e-05)
  return %z
}
"""


def corrupt_cache(folder: Path, seed: int) -> str:
    """Damage an entry of a compile cache: another entry copied over it with its checksum (the
    bytes and sidecar agree, the program is another), or damage a checksum cannot miss (bytes
    changed, sidecar not), or an empty file with a matching sidecar. What was done.

    Not tried: bytes edited in place with the sidecar recomputed. Only deliberate tampering does
    that, and whoever may write the cache folder may as well write any program there: the cache
    folder must be writable by its user only (README)."""
    import hashlib
    rng = random.Random(seed)
    entries = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".sha256"
                     and not p.name.startswith("."))
    if not entries:
        return "empty cache"
    target = rng.choice(entries)
    data = bytearray(target.read_bytes())
    kind = rng.choice(["swap", "swap", "flip", "truncate", "empty"]) if data else "swap"
    fix_sidecar = kind in ("swap", "empty")
    if kind == "flip":
        for _ in range(rng.randint(1, 64)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "swap":
        other = rng.choice(entries)
        data = bytearray(other.read_bytes())
        kind += " (same entry)" if other == target else ""
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    else:
        data = bytearray()
    # a new file renamed into place, as every writer of the cache does: truncating a library in
    # place under a process that has it mapped kills that process (SIGBUS), cache or not
    tmp = target.with_name(target.name + ".fuzz")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, target)
    sidecar = target.with_suffix(".sha256")
    if fix_sidecar and sidecar.exists():
        sidecar.write_text(hashlib.sha256(bytes(data)).hexdigest())
    return f"{kind} {target.suffix}"


def handle_cache(request: dict) -> dict:
    import numpy as np

    from ember.backends import get_backend
    from ember.ir.interpreter import random_inputs, run_reference
    from ember.ir.parser import parse_ir
    graph = parse_ir(CACHE_GRAPH, "cache.ir")
    inputs = random_inputs(graph, seed=0)
    expected = run_reference(graph, inputs)[0]
    backend = get_backend(request["backend"], cache_dir=request["cache"],
                          **({"threads": 1} if request["backend"] == "cpu" else {}))
    got = backend.compile(graph).run(inputs)[0]
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-3):
        return {"outcome": "wrong", "why": "differs from the reference"}
    return {"outcome": "ok"}


HANDLERS = {"gguf": handle_gguf, "ir": handle_ir, "artifact": handle_artifact, "cache": handle_cache}


def worker() -> None:
    """Answer one JSON request per line of stdin with one JSON line on stdout."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    from ember.errors import CompileError, EmberError, IRError
    out = sys.stdout
    sys.stdout = sys.stderr             # anything ember prints must not break the protocol
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = HANDLERS[request["class"]](request)
        except CompileError as e:
            answer = {"outcome": "traceback", "why": f"CompileError: {str(e).splitlines()[0]}"}
        except (EmberError, IRError) as e:
            one_line = "\n" not in str(e).strip()
            answer = {"outcome": "refused" if one_line else "traceback", "why": str(e)[:300]}
        except Exception as e:          # noqa: BLE001 - the point is to count them
            import traceback
            where = traceback.extract_tb(e.__traceback__)[-1]
            answer = {"outcome": "traceback",
                      "why": f"{type(e).__name__}: {str(e)[:200]} ({Path(where.filename).name}:{where.lineno})"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class Runner:
    """A worker process fed one input at a time; a dead worker is a crash, a silent one a hang
    (each restarts it)."""

    def __init__(self, time_limit: float = TIME_LIMIT):
        self.time_limit = time_limit
        self.proc = None
        self.counts: dict[str, Counter] = {}
        self.bad: list[tuple[str, str, str]] = []

    def _start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fuzzing.py"), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, request: dict, what: str) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.time_limit)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            answer = json.loads(line)
        elif not ready:
            self.proc.kill()
            self.proc.wait()
            answer = {"outcome": "hang", "why": f"no answer in {self.time_limit} s"}
        else:
            code = self.proc.wait()
            answer = {"outcome": "crash", "why": f"worker exit status {code}"}
        outcome = answer["outcome"]
        self.counts.setdefault(request["class"], Counter())[outcome] += 1
        if outcome not in GOOD:
            self.bad.append((request["class"], what, answer.get("why", "")))
        return outcome

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# ---- the campaign ------------------------------------------------------------------------------
def read_parts_bytes_base(folder: Path, arch: str) -> bytes:
    from tiny_gguf import Spec, write_tiny_gguf
    return write_tiny_gguf(folder / f"{arch}.gguf", Spec(arch, "q8_0")).read_bytes()


def campaign(folder: Path, counts: dict, runner: Runner, seed0: int = 0, gpu: str | None = None) -> Runner:
    """Run counts[class] inputs of each class (seeds seed0, seed0+1, ...) under folder."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "cache"
    if counts.get("gguf"):
        bases = [read_parts_bytes_base(folder, a) for a in ("llama", "gemma3", "qwen2")]
        for i in range(counts["gguf"]):
            seed = seed0 + i
            data, what = mutate_gguf(bases[seed % len(bases)], seed)
            path = folder / f"gguf-{seed}.gguf"
            path.write_bytes(data)
            runner.run({"class": "gguf", "path": str(path), "cache": str(cache),
                        "run": counts.get("gguf_run", 0) > i}, what)
            path.unlink()
    if counts.get("ir"):
        backends = ["cpu"] + ([gpu] if gpu else [])
        for i in range(counts["ir"]):
            text, what = mutate_ir(seed0 + i)
            runner.run({"class": "ir", "text": text, "backends": backends,
                        "cache": None if counts.get("ir_default_cache") else str(cache)}, what)
    if counts.get("artifact"):
        import numpy as np

        from ember.artifact import compile_artifact, load_artifact
        from ember.backends.cpu.backend import CpuBackend
        from ember.models import load_model
        from tiny_gguf import Spec, write_tiny_gguf
        model_path = write_tiny_gguf(folder / "artifact-model.gguf", Spec("llama", "q8_0"))
        built = folder / "built.ember"
        if not built.exists():
            compile_artifact(load_model(model_path), CpuBackend(threads=1, cache_dir=cache), built, n_ctx=32,
                             prompt_tokens=8)
        expected = folder / "expected.npy"
        np.save(expected, load_artifact(built, threads=1)[1].eval([1, 17, 260, 300, 42]))
        for i in range(counts["artifact"]):
            dst = folder / f"artifact-{seed0 + i}"
            what = tamper_artifact(built, dst, seed0 + i)
            # weights edited with their checksums fixed give other logits: the data the tamperer
            # chose (checksums detect corruption, not tampering); only finiteness is required
            compare = "constants/" not in what
            runner.run({"class": "artifact", "path": str(dst), "expected": str(expected), "compare": compare}, what)
            shutil.rmtree(dst)
    if counts.get("cache"):
        backends = ["cpu"] + ([gpu] if gpu else [])
        for i in range(counts["cache"]):
            backend = backends[i % len(backends)]
            own = folder / f"cache-{backend}"
            runner.run({"class": "cache", "backend": backend, "cache": str(own)}, "fill")   # a valid entry
            what = corrupt_cache(own, seed0 + i)
            runner.run({"class": "cache", "backend": backend, "cache": str(own)}, what)
    return runner


def gpu_backend() -> str | None:
    """The GPU backend the IR and cache fuzzers also run on: OpenCL when a device answers."""
    from ember.backends import get_backend
    for name in ("opencl", "vulkan"):
        try:
            if get_backend(name).available()[0]:
                return name
        except Exception:   # noqa: BLE001 - a missing driver is only a missing backend here
            continue
    return None


def table(runner: Runner, seconds: float) -> str:
    outcomes = ("ok", "refused", "skipped", "traceback", "wrong", "crash", "hang")
    lines = ["| class | inputs | " + " | ".join(outcomes) + " |", "|---" * (len(outcomes) + 2) + "|"]
    for cls, c in runner.counts.items():
        lines.append(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in outcomes) + " |")
    return "\n".join(lines) + f"\n\n{seconds:.0f} s in all."


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
        sys.exit(0)
    import tempfile
    sys.path.insert(0, str(HERE))
    slow = "--slow" in sys.argv
    counts = dict(gguf=2000, gguf_run=30, ir=60, artifact=60, cache=20) if slow else \
        dict(gguf=300, gguf_run=5, ir=10, artifact=10, cache=6)
    start = time.perf_counter()
    runner = Runner()
    with tempfile.TemporaryDirectory(prefix="ember-fuzz-") as tmp:
        campaign(Path(tmp), counts, runner, gpu=gpu_backend())
    runner.close()
    print(table(runner, time.perf_counter() - start))
    for cls, what, why in runner.bad:
        print(f"BAD {cls}: {what}: {why}")
