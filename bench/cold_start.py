"""Start-up time to the first token, ember against llama.cpp (llama-cpp-python), in one run.

Every figure is a new process, timed from its start to the first byte of generated text on its
stdout (interpreter start, imports, model load, compiling or finding the step graph, the prompt,
the first token), with the CPU time it and the compilers it waited for used by then and by its
exit (which, unlike the wall clock, other processes on a shared machine barely change; a cold
ember run builds its -O3 libraries after its first token and waits for them before exiting):

- ember cold: `ember generate -p PROMPT -n 1 --temp 0` in a fresh cache folder
  ($XDG_CACHE_HOME pointed at an empty folder whose models/ links to the cached default model,
  so the model is not assembled again: nothing compiled is there);
- ember warm: the same command again in that folder (what the cold run compiled is cached);
- llama.cpp: llama-cpp-python's `Llama(model)` and a completion of 1 token, at the same thread
  count and context (llama.cpp compiles nothing: each of its runs is the same).

The runs take turns within each repetition, so each repetition's figures saw about the same
load; the table shows the median of the repetitions and the ratios to llama.cpp.

    python bench/cold_start.py [--model M] [--threads 2] [--reps 3] [--ctx 2048] [--before TREE]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"
REPO = Path(__file__).resolve().parent.parent

LLAMA_SCRIPT = """
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]),
                      n_threads_batch=int(sys.argv[3]), verbose=False)
out = llm.create_completion(sys.argv[4], max_tokens=1, temperature=0)
sys.stdout.write(out["choices"][0]["text"] or " ")
sys.stdout.flush()
"""


def first_output_seconds(cmd: list[str], env: dict, cwd: str | None = None) -> tuple[float, float, float, float, str]:
    """(seconds to the first byte on stdout, seconds to the exit, CPU seconds of the process
    and the compilers it waited for by its first byte, the same by its exit (user + system),
    stdout) of a new process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, cwd=cwd)
        out = os.read(proc.stdout.fileno(), 1)      # unbuffered: the first byte as it comes
        to_first = time.perf_counter() - start
        cpu_first = process_cpu_seconds(proc.pid)
        while chunk := os.read(proc.stdout.fileno(), 65536):
            out += chunk
        # wait4: the child's usage includes the children it waited for (the C compilers)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        total = time.perf_counter() - start
        if proc.returncode != 0 or not out:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    return to_first, total, cpu_first, usage.ru_utime + usage.ru_stime, out.decode(errors="replace")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process and of the children it has waited for
    (the compilers that built what it needed so far), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def fresh_cache_home(base: str | None) -> Path:
    """An $XDG_CACHE_HOME whose ember folder holds no compiled binary, its models/ a link to the
    default model's folder (so the model is not assembled again)."""
    from ember.files import default_cache_dir
    home = Path(tempfile.mkdtemp(prefix="ember-cold-start-", dir=base))
    (home / "ember").mkdir()
    models = default_cache_dir() / "models"
    if models.is_dir():
        (home / "ember" / "models").symlink_to(models)
    return home


def ember_command(model: str | None, threads: int, ctx: int) -> list[str]:
    cmd = [sys.executable, "-m", "ember.cli", "generate"] + ([model] if model else [])
    return cmd + ["-p", PROMPT, "-n", "1", "--temp", "0", "-t", str(threads), "-c", str(ctx), "-q"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where the fresh cache folders go (default: the system's)")
    ap.add_argument("--no-llama", action="store_true", help="ember only")
    ap.add_argument("--before", default=None, metavar="TREE",
                    help="also time the ember of another checkout (e.g. the main branch's), same reps")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from ember.models.default_model import default_model_path
    model = args.model or str(default_model_path())
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # `python -m` puts its working folder first on sys.path: each tree runs from its own root
    trees = {"ember": (env, str(REPO))}
    if args.before:
        before = str(Path(args.before).resolve())
        trees["ember before"] = (dict(os.environ, PYTHONPATH=before + os.pathsep + os.environ.get("PYTHONPATH", "")),
                                 before)
    load_start = open("/proc/loadavg").read().split()[:3]
    runs: dict[str, list[float]] = {f"{tree} {kind}": [] for tree in trees for kind in ("cold", "warm")}
    runs["llama.cpp"] = []
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    cpus_first: dict[str, list[float]] = {name: [] for name in runs}
    exits: dict[str, list[float]] = {name: [] for name in runs}
    texts = set()
    for rep in range(args.reps):
        for tree, (tree_env, root) in trees.items():
            home = fresh_cache_home(args.tmp)
            try:
                run_env = dict(tree_env, XDG_CACHE_HOME=str(home))
                for name in (f"{tree} cold", f"{tree} warm"):
                    first, total, cpu_first, cpu, text = first_output_seconds(
                        ember_command(args.model, args.threads, args.ctx), run_env, root)
                    runs[name].append(first)
                    cpus_first[name].append(cpu_first)
                    cpus[name].append(cpu)
                    exits[name].append(total)
                    texts.add(text.strip())
                    print(f"rep {rep}: {name}: first token {first:.2f} s (CPU {cpu_first:.2f} s), exit {total:.2f} s "
                          f"(CPU {cpu:.2f} s), {text.strip()!r}", file=sys.stderr)
            finally:
                shutil.rmtree(home, ignore_errors=True)
        if not args.no_llama:
            first, total, cpu_first, cpu, text = first_output_seconds(
                [sys.executable, "-c", LLAMA_SCRIPT, model, str(args.ctx), str(args.threads), PROMPT], env)
            runs["llama.cpp"].append(first)
            cpus_first["llama.cpp"].append(cpu_first)
            cpus["llama.cpp"].append(cpu)
            exits["llama.cpp"].append(total)
            print(f"rep {rep}: llama.cpp: first token {first:.2f} s (CPU {cpu_first:.2f} s), exit {total:.2f} s "
                  f"(CPU {cpu:.2f} s), {text.strip()!r}", file=sys.stderr)
    load_end = open("/proc/loadavg").read().split()[:3]
    llama = statistics.median(runs["llama.cpp"]) if runs["llama.cpp"] else None
    print(f"Start-up to the first token, {Path(model).name}, {args.threads} threads, n_ctx {args.ctx}, "
          f"prompt {PROMPT!r}, -n 1 --temp 0; median of {args.reps} reps (each a new process):\n")
    print("| run | first token, s (median) | all reps | / llama.cpp | CPU s by the first token | exit, s | "
          "CPU s by the exit |\n|---|---:|---|---:|---:|---:|---:|")
    for name, values in runs.items():
        if not values:
            continue
        median = statistics.median(values)
        ratio = f"{median / llama:.2f}" if llama else "-"
        print(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {ratio} | "
              f"{statistics.median(cpus_first[name]):.2f} | {statistics.median(exits[name]):.2f} | "
              f"{statistics.median(cpus[name]):.2f} |")
    print(f"\nember's text: {sorted(texts)}; load average (1, 5, 15 min) at start {' '.join(load_start)}, "
          f"at end {' '.join(load_end)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
