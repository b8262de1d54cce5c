"""Cold start of a cpu artifact to the first token, the native runtime against Python's
`ember run`, side by side in one run (the default model unless --model; x86-64).

    python bench/native_runtime.py [--artifact DIR] [--runs 5] [-t 2] [--model GGUF] [--baseline-runtime EXE]

Compiles the artifact with --runtime into DIR when it holds none (n_ctx 256, prompt steps of 32),
then, interleaved per run so the machine's load hits each alike: `ember-run` as it starts by
default (files unchanged since they last matched their checksums are not hashed again: the
record in DIR/.ember-run-verified), `ember-run --verify-artifact` (every file hashed, as every
start did before the record), `ember run` (Python), and with --baseline-runtime another build of
ember-run on the same folder (e.g. one built from an earlier commit's ember/artifact/native). Each is timed from process start to the
first byte on stdout (-n 1: the first token, or the newline after an empty one); the model file
is in the page cache after the first run, so "cold" is the process, not the disk. Prints a
Markdown table (medians, min-max) with the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def first_byte_seconds(cmd: list[str]) -> tuple[float, str]:
    """(seconds from start to the first stdout byte, stderr) of a command that must succeed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(1)
    seconds = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {err.decode(errors='replace').strip()}")
    return seconds, err.decode(errors="replace")


def open_seconds(stderr: str) -> str:
    m = re.search(r"checked in ([\d.]+) s(: (\d+) files hashed)?", stderr)
    if not m:
        return "?"
    return f"{m.group(1)} s, {m.group(3)} hashed" if m.group(3) else f"{m.group(1)} s"


def compile_artifact(model: Path, out: Path, threads: int) -> None:
    cmd = [sys.executable, "-m", "ember.cli", "compile", str(model), "--target", "cpu", "--runtime",
           "-o", str(out), "-c", "256", "-t", str(threads)]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=Path("/tmp/ember-bench-native.ember"))
    parser.add_argument("--model", type=Path, help="a GGUF (default: the default model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--baseline-runtime", type=Path, help="another ember-run to time on the same artifact")
    args = parser.parse_args()
    if not (args.artifact / "ember-run").is_file():
        if args.model is None:
            from ember.models.default_model import default_model_path
            args.model = default_model_path()
        compile_artifact(args.model, args.artifact, args.threads)
    art = str(args.artifact)
    run_args = ["-p", PROMPT, "-n", "1", "--temp", "0", "-t", str(args.threads)]
    commands = {
        "native `ember-run` (record of verified files)": [f"{art}/ember-run", art, *run_args],
        "native `ember-run --verify-artifact` (every file hashed)": [f"{art}/ember-run", art, *run_args,
                                                                     "--verify-artifact"],
        "Python `ember run`": [sys.executable, "-m", "ember.cli", "run", art, *run_args],
    }
    if args.baseline_runtime:
        commands[f"baseline `{args.baseline_runtime.name}`"] = [str(args.baseline_runtime), art, *run_args]
    first_byte_seconds(commands["native `ember-run` (record of verified files)"])    # writes the record
    load_before = os.getloadavg()
    times = {name: [] for name in commands}
    opens = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            seconds, err = first_byte_seconds(cmd)
            times[name].append(seconds)
            opens[name].append(open_seconds(err))
    load_after = os.getloadavg()
    anchor = statistics.median(times["Python `ember run`"])
    print(f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {args.runs} runs each, interleaved\n")
    print("| | cold start to the first token (median, min-max) | vs Python | ember_open (last run) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} s ({min(values):.3f}-{max(values):.3f}) | {anchor / med:.1f}x | "
              f"{opens[name][-1] if 'Python' not in name else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
