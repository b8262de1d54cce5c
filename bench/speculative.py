"""Speculative decoding on a repetitive task, measured side by side in one run.

The task rewrites a block of Python code (renaming a variable), so the answer repeats the
prompt and n-gram drafting (prompt lookup) has something to find. For each model, greedy
generation of --n-predict tokens without speculation and with `--spec ngram` at several draft
lengths take turns repetition by repetition (so load from other processes falls on all alike);
each cell is the mean +- sample std of decode tokens/s. Every speculative run is checked to
produce exactly the tokens of the plain run (greedy identity); the script stops if one does not.

Models:
- the default model (Gemma 3 270M Q4_K_M, a transformer: no recurrent state to checkpoint);
- a random-weight granitehybrid (Mamba-2 + attention layers) written with a fixed seed into
  ~/.cache/ember/bench/ (never into the repository), big enough that its steps take real time.
  Random weights give degenerate text, but the acceptance of drafts against the target's own
  greedy choices is still a real figure. Its draft model (`draft:`) is a smaller random hybrid
  with the same vocabulary. Its own text (random bytes) gives n-grams nothing to find, so it is
  also driven by a synthetic oracle draft (OracleDraft) whose acceptance is set by hand.

A last table gives the cost of one verify pass over T tokens relative to a decode step, which
bounds what speculation can gain: speedup ~= tokens per pass / (cost of a pass of k+1 tokens);
on a recurrent model also the pass that keeps the state after every token (rollback "states").

- a random-weight qwen35moe (gated DeltaNet + gated attention layers, MoE FFNs), written the same
  way through the test suite's DeltaNet writer (`--models qwen35moe`), with the oracle draft only.

--rollback (the two random-weight hybrids): the oracle draft at the miss rates given, at each draft length,
with `--spec-rollback redecode` and the default per-position-states rollback side by side; the
table adds the share of a round spent re-decoding and selecting the kept state, and for each
states row its t/s over the redecode row's of the same repetition (paired median).
--acceptance 0.6,0.8 instead of --oracle-miss: for each draft length, the miss rate whose
acceptance comes closest to each target (the oracle's drafts are fixed by position, so the
acceptance of a miss rate is known before running: oracle_acceptance); the runs check it.

--artifact: the target is an artifact (`ember compile --spec --draft-max <largest draft length>`,
the context the task needs rounded up to a KV bucket) loaded as `ember run` loads it, so
"no speculation" and the speculative rows run the same compiled steps: plain decoding of the
artifact against speculation through its verify steps. The artifact is compiled once into
~/.cache/ember/bench/artifacts/ (again when this ember no longer reads it); no draft-model rows.

    python bench/speculative.py [--threads 2] [--reps 3] [--n-predict 128] [--draft-max 1,2,4,8]
                                [--models default,hybrid,qwen35moe] [--oracle-miss 0.05,0.2 | --acceptance 0.6,0.8]
                                [--no-draft-model] [--rollback] [--artifact]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))    # the random-weight GGUF writers

from ember.artifact import ArtifactError, compile_artifact, load_artifact  # noqa: E402
from ember.backends import get_backend  # noqa: E402
from ember.models import load_model  # noqa: E402
from ember.models.default_model import default_model_path  # noqa: E402
from ember.models.tokenizer import Tokenizer  # noqa: E402
from ember.runtime.generate import generate  # noqa: E402
from ember.runtime.memory import SequenceMemory  # noqa: E402
from ember.runtime.sampling import Sampler, SamplingParams  # noqa: E402
from ember.runtime.session import Session, SessionOptions  # noqa: E402
from ember.runtime.speculative import ModelDraft, NgramDraft, speculative_generate  # noqa: E402

CODE = '''\
def summarize(records):
    x = {}
    for record in records:
        key = record["name"]
        if key not in x:
            x[key] = {"count": 0, "total": 0.0, "items": []}
        x[key]["count"] += 1
        x[key]["total"] += record["value"]
        x[key]["items"].append(record["id"])
    result = []
    for key in sorted(x):
        entry = x[key]
        mean = entry["total"] / entry["count"]
        result.append((key, entry["count"], mean, entry["items"]))
    return result


def merge(first, second):
    x = dict(first)
    for key, value in second.items():
        if key in x:
            x[key] = x[key] + value
        else:
            x[key] = value
    return x


def top(records, n):
    x = summarize(records)
    x.sort(key=lambda row: row[2], reverse=True)
    return x[:n]


def report(records):
    x = top(records, 10)
    lines = []
    for name, count, mean, items in x:
        lines.append(f"{name}: {count} records, mean {mean:.2f}")
    return "\\n".join(lines)
'''
PROMPT = ("Rewrite the following Python code, renaming the variable x to y:\n\n"
          f"```python\n{CODE}```\n\nThe rewritten code:\n\n```python\n")
N_CTX = 2048

# The hybrid target: 6 Mamba-2 layers and 2 attention layers (at 3 and 7), n_embd 768, q8_0;
# about 63 M parameters, so a decode step is a few milliseconds of real work. The draft: the
# test suite's 3-layer granitehybrid shape (n_embd 256) with another seed, same vocabulary.
HYBRID = dict(arch="granitehybrid", seed=2024, n_layer=8, attention_layers=(3, 7), n_embd=768,
              d_inner=1536, d_state=64, n_ssm_head=24, n_group=1, n_head=12, n_head_kv=4,
              n_ff=2048, embedding_scale=12.0, residual_scale=0.22, attention_scale=0.015625,
              logit_scale=8.0)
HYBRID_DRAFT = dict(arch="granitehybrid", seed=2025, n_layer=3, attention_layers=(1,), n_embd=256,
                    d_inner=512, d_state=32, n_ssm_head=8, n_group=1, n_head=4, n_head_kv=2,
                    n_ff=512, embedding_scale=12.0, residual_scale=0.22, attention_scale=0.015625,
                    logit_scale=8.0)


# The gated-DeltaNet hybrid target: qwen35moe with 6 DeltaNet layers and 2 gated attention layers
# (full attention every 4th), n_embd 512, 16 experts of which 4 are used plus a shared expert, q8_0.
QWEN35MOE = dict(arch="qwen35moe", seed=2026, n_layer=8, full_attention_interval=4, n_rot=32,
                 rope_sections=(6, 5, 5, 0), n_embd=512, n_head=8, n_head_kv=2, head_dim=64,
                 d_state=64, n_k_heads=4, n_v_heads=8, d_conv=4, n_expert=16, n_expert_used=4,
                 n_ff_exp=256, n_ff_shexp=512)


def write_hybrid(name: str, settings: dict, weight_type: str = "q8_0") -> Path:
    """The random-weight hybrid GGUF (granitehybrid through the test suite's Mamba-2 writer,
    qwen35moe through its DeltaNet writer), written once into the cache folder (fixed seed)."""
    if settings["arch"] == "qwen35moe":
        import tiny_gguf_delta as writer
        cfg, spec, configs = writer.DeltaConfig(**settings), writer.DeltaSpec, writer.DELTA_CONFIGS
        write = writer.write_delta_gguf
    else:
        import tiny_gguf_ssm as writer
        cfg, spec, configs = writer.SsmConfig(**settings), writer.SsmSpec, writer.SSM_CONFIGS
        write = writer.write_ssm_gguf
    folder = Path(os.path.expanduser("~/.cache/ember/bench"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{weight_type}.gguf"
    if not path.exists():
        # the writers read their shapes from a table by architecture: point that entry at this
        # config for the write only
        saved = configs[cfg.arch]
        configs[cfg.arch] = cfg
        try:
            tmp = path.with_suffix(".tmp")
            write(tmp, spec(cfg.arch, weight_type))
            tmp.rename(path)
        finally:
            configs[cfg.arch] = saved
    return path


def new_session(model, backend) -> Session:
    # Every verify length (1..k+1 rows, with and without every state kept), re-decode length and
    # KV bucket is its own compiled step: room for all of them (count and memory budget), and no
    # eviction while other configurations take their turn (an evicted step recompiled inside a
    # timed run would be counted as decoding).
    return Session(model, backend, SessionOptions(n_ctx=N_CTX, plan_capacity=128, plan_budget_mb=8192))


def artifact_target(path: Path, backend, draft_max: int, n_ctx: int, threads: int):
    """The ArtifactSession of path compiled for speculation with draft_max (compiled into the
    cache folder the first time, or when this ember no longer reads the one there)."""
    folder = Path(os.path.expanduser("~/.cache/ember/bench/artifacts")) / f"{Path(path).stem}-ctx{n_ctx}-spec{draft_max}"
    try:
        _, session = load_artifact(folder, threads=threads)
    except ArtifactError as e:
        print(f"compiling the artifact {folder} ({e})", file=sys.stderr)
        start = time.perf_counter()
        manifest = compile_artifact(load_model(str(path)), backend, folder, n_ctx=n_ctx, draft_max=draft_max,
                                    progress=lambda message: print(message, file=sys.stderr))
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"compiled {len(manifest['steps'])} steps ({size / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        _, session = load_artifact(folder, threads=threads)
    return session


def artifact_context(tokenizer, n_predict: int, draft_max: int) -> int:
    """The prompt, the generated tokens and a verify batch's padding, in whole KV buckets."""
    n_prompt = len(tokenizer.encode(PROMPT, add_special=True, parse_special=True))
    return -(-(n_prompt + n_predict + draft_max + 1) // 256) * 256


@dataclass
class OracleDraft:
    """A synthetic draft for a model whose own text gives n-grams nothing to find (random
    weights): it proposes the target's greedy continuation, known from the plain run, with each
    token made wrong with probability `miss` (fixed per position, so every run drafts alike).
    Acceptance is then set by hand, and the figures measure what speculation costs and gains
    on this model (verify batches, checkpoint, restore, re-decode), not a draft's quality."""
    answer: list                       # prompt + greedy output
    miss: float
    n_vocab: int
    name: str = "oracle"

    def propose(self, context, k: int) -> list[int]:
        drafts = []
        for pos in range(len(context), min(len(context) + k, len(self.answer))):
            token = self.answer[pos]
            if random.Random(pos).random() < self.miss:
                token = (token + 1) % self.n_vocab
            drafts.append(token)
        return drafts

    def accepted(self, context, n_drafted: int, n_accepted: int) -> None:
        pass


def oracle_acceptance(n_prompt: int, n_predict: int, miss: float, draft_max: int) -> float:
    """The acceptance OracleDraft(miss) gets over n_predict tokens after an n_prompt-token prompt:
    its drafts are right except at the positions its fixed coin marks, so the rounds of
    speculative_generate can be replayed without the model (first token from the prompt, then
    drafts of min(draft_max, tokens left) accepted up to the first miss, plus the target's own)."""
    produced, context, drafted, accepted = 1, n_prompt + 1, 0, 0
    while produced < n_predict:
        room = min(draft_max, n_predict - produced)
        n_ok = 0
        while n_ok < room and random.Random(context + n_ok).random() >= miss:
            n_ok += 1
        drafted, accepted = drafted + room, accepted + n_ok
        produced, context = produced + n_ok + 1, context + n_ok + 1
    return accepted / drafted if drafted else 0.0


def miss_for_acceptance(n_prompt: int, n_predict: int, draft_max: int, target: float) -> float:
    """The miss rate (a multiple of 0.005) whose oracle acceptance is closest to target."""
    grid = [round(0.005 * i, 3) for i in range(1, 121)]
    return min(grid, key=lambda m: (abs(oracle_acceptance(n_prompt, n_predict, m, draft_max) - target), m))


def verify_cost(target: Session, prompt: list[int], lengths: list[int], reps: int) -> dict[int, float]:
    """Median seconds of one target pass over T tokens with logits for every row (a verify
    batch), right after the prompt, T taking turns; T=1 is a plain decode step."""
    memory = SequenceMemory(target)
    target.reset()
    target.eval(prompt)
    checkpoint = memory.checkpoint()
    kinds = [(T, keep) for T in lengths for keep in ((False, True) if target.is_recurrent and T > 1 else (False,))]
    target.reserve_state_planes(max(lengths) + 1)
    times: dict[tuple, list] = {kind: [] for kind in kinds}
    for rep in range(reps + 1):                 # the first round compiles, untimed
        for T, keep in kinds:
            memory.restore(checkpoint)
            start = time.perf_counter()
            target.eval(prompt[:T], all_logits=True, keep_states=keep)
            if rep:
                times[T, keep].append(time.perf_counter() - start)
    return {kind: statistics.median(v) for kind, v in times.items()}


@dataclass
class Config:
    label: str
    draft_max: int = 0                 # 0: no speculation
    draft: object = None               # answer (prompt + greedy output) -> a fresh draft source
    rollback: str = "states"           # speculative_generate's rollback (recurrent models)
    partner: "Config | None" = None    # a states row's redecode row (same drafts): paired ratio
    expected_acceptance: float | None = None   # oracle rows: oracle_acceptance, checked on every run
    tps: list = field(default_factory=list)
    stats: list = field(default_factory=list)


def run(config: Config, target: Session, tokenizer, prompt: list[int], n_predict: int, answer: list[int]):
    if not config.draft_max:
        g = generate(target, tokenizer, prompt, n_predict, Sampler(SamplingParams(temperature=0)),
                     ignore_eos=True)
        return g, None
    return speculative_generate(target, config.draft(answer), tokenizer, prompt, n_predict,
                                draft_max=config.draft_max, ignore_eos=True, rollback=config.rollback)


def measure(title: str, target: Session, tokenizer, configs: list[Config], n_predict: int,
            reps: int) -> list[str]:
    prompt = tokenizer.encode(PROMPT, add_special=True, parse_special=True)
    expected = None
    for config in configs:             # warm-up: compiles every step shape the runs use
        g, _ = run(config, target, tokenizer, prompt, n_predict, prompt + (expected or []))
        if expected is None:
            expected = g.tokens
            print(f"[{title}] prompt {len(prompt)} tokens; greedy output ({len(g.tokens)} tokens):\n"
                  f"{tokenizer.decode(g.tokens)!r}", file=sys.stderr)
    for rep in range(reps):
        for config in configs:
            g, stats = run(config, target, tokenizer, prompt, n_predict, prompt + expected)
            # greedy identity: speculation must not change a single token
            assert g.tokens == expected, f"{title} {config.label}: output differs from plain decoding"
            if config.expected_acceptance is not None:
                assert abs(stats.acceptance - config.expected_acceptance) < 1e-9, \
                    f"{config.label}: acceptance {stats.acceptance:.3f}, oracle_acceptance said {config.expected_acceptance:.3f}"
            config.tps.append(g.decode_tps)
            if stats is not None:
                config.stats.append(stats)
            print(f"[{title}] rep {rep} {config.label}: {g.decode_tps:.1f} t/s"
                  + (f"; {stats.summary()}" if stats else ""), file=sys.stderr)
    print(f"[{title}] greedy identity: all {reps * (len(configs) - 1)} speculative runs gave the "
          f"same {len(expected)} tokens as plain decoding", file=sys.stderr)

    base = statistics.mean(configs[0].tps)
    paired_rows = any(c.partner for c in configs)
    lines = [f"{title}: prompt {len(prompt)} tokens, {n_predict} generated, {reps} reps, "
             f"greedy identity checked on every run.", "",
             "| decoding | t/s | best t/s | speedup (means) | speedup (paired median) | acceptance | "
             "tokens / verify pass | checkpoint + restore per round | share of round | "
             "re-decode share of round | rollback (state selection) share of round |"
             + (" states / redecode (paired median) |" if paired_rows else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if paired_rows else "")]
    for config in configs:
        tps = config.tps
        cell = f"{statistics.mean(tps):.1f} ± {statistics.stdev(tps) if len(tps) > 1 else 0:.1f}"
        speedup = f"{statistics.mean(tps) / base:.2f}x"
        # each repetition runs every configuration back to back, so a pair shares its load
        paired = statistics.median(x / y for x, y in zip(tps, configs[0].tps))
        cell += f" | {max(tps):.1f} | {speedup} | {paired:.2f}x"
        if not config.stats:
            lines.append(f"| {config.label} | {cell} | | 1 | | | |")
            continue
        s = config.stats[-1]             # the same tokens and drafts every run: counts agree
        rounds = sum(x.rounds for x in config.stats)
        round_s = sum(x.round_seconds for x in config.stats)
        state_s = sum(x.checkpoint_seconds + x.restore_seconds for x in config.stats)
        redecode_s = sum(x.redecode_seconds for x in config.stats)
        rollback_s = sum(x.rollback_seconds for x in config.stats)
        if target.is_recurrent and s.rollback == "redecode":
            state = f"{1e6 * state_s / rounds:.0f} µs", f"{100 * state_s / round_s:.2f}%", \
                f"{100 * redecode_s / round_s:.1f}%", ""
        elif target.is_recurrent:
            state = "none", "", "0%", f"{100 * rollback_s / round_s:.3f}% ({1e6 * rollback_s / rounds:.0f} µs)"
        else:
            state = ("none (KV truncate)", "", "", "")
        versus = ""
        if config.partner:
            versus = f" {statistics.median(x / y for x, y in zip(tps, config.partner.tps)):.2f}x |"
        elif paired_rows:
            versus = " |"
        lines.append(f"| {config.label} | {cell} | {s.acceptance:.2f} ({s.accepted}/{s.drafted}) | "
                     f"{s.tokens_per_pass:.2f} | {' | '.join(state)} |{versus}")

    # What a verify pass costs: speculation gains only when tokens per pass outgrow it.
    lengths = sorted({1} | {c.draft_max + 1 for c in configs if c.draft_max})
    cost = verify_cost(target, prompt, lengths, reps=max(reps, 7))
    lines += ["", "One target pass over T tokens with logits for every row (a verify batch), after the "
              "prompt, median:", "",
              "| T | " + " | ".join(str(T) for T in lengths) + " |",
              "|---|" + "---|" * len(lengths),
              "| ms | " + " | ".join(f"{1e3 * cost[T, False]:.1f}" for T in lengths) + " |",
              "| / decode step | " + " | ".join(f"{cost[T, False] / cost[1, False]:.2f}" for T in lengths) + " |"]
    if target.is_recurrent:
        lines += ["| ms, keeping every state | " + " | ".join(
                      f"{1e3 * cost.get((T, True), cost[T, False]):.1f}" for T in lengths) + " |",
                  "| keeping every state / plain | " + " | ".join(
                      f"{cost.get((T, True), cost[T, False]) / cost[T, False]:.2f}" for T in lengths) + " |"]
    return lines


def rollback_configs(model, tokenizer, lengths: list[int], args) -> list[Config]:
    """redecode and states rows of the oracle draft, side by side, for each miss rate (given, or
    chosen per draft length for each --acceptance) and draft length."""
    n_vocab = model.hparams.n_vocab
    n_prompt = len(tokenizer.encode(PROMPT, add_special=True, parse_special=True))
    configs = []
    for i in range(len(args.acceptance or args.oracle_miss)):
        for k in lengths:
            if args.acceptance:
                miss = miss_for_acceptance(n_prompt, args.n_predict, k, args.acceptance[i])
                label = f"oracle (miss {miss}, acceptance ~{args.acceptance[i]}), draft-max {k}"
            else:
                miss = args.oracle_miss[i]
                label = f"oracle (miss {miss}), draft-max {k}"
            expected = oracle_acceptance(n_prompt, args.n_predict, miss, k)
            redecode = Config(f"{label}, redecode", k, lambda answer, m=miss: OracleDraft(answer, m, n_vocab),
                              "redecode", expected_acceptance=expected)
            states = Config(f"{label}, states", k, lambda answer, m=miss: OracleDraft(answer, m, n_vocab),
                            "states", partner=redecode, expected_acceptance=expected)
            configs += [redecode, states]
    return configs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--draft-max", default="1,2,4,8", help="comma-separated draft lengths")
    ap.add_argument("--models", default="default,hybrid")
    ap.add_argument("--model", default=None, help="GGUF for the 'default' row (default: the default model)")
    ap.add_argument("--no-draft-model", action="store_true", help="skip `draft:` on the hybrid model")
    ap.add_argument("--oracle-miss", default="0.05,0.2", type=lambda v: [float(x) for x in v.split(",")],
                    help="miss rates of the synthetic oracle draft on the hybrid model")
    ap.add_argument("--acceptance", default=None, type=lambda v: [float(x) for x in v.split(",")],
                    help="--rollback: oracle miss rates chosen per draft length for these acceptances "
                         "(instead of --oracle-miss)")
    ap.add_argument("--artifact", action="store_true",
                    help="the target is an artifact compiled with --spec (plain decoding of it against speculation "
                         "through its verify steps); no draft-model rows")
    ap.add_argument("--rollback", action="store_true",
                    help="hybrid and qwen35moe models: oracle drafts with --spec-rollback redecode and states side by side "
                         "(no n-gram or draft-model rows)")
    args = ap.parse_args(argv)
    backend = get_backend("cpu", threads=args.threads)
    lengths = [int(k) for k in args.draft_max.split(",")]
    out = [f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]

    for which in args.models.split(","):
        if which == "default":
            path = args.model or default_model_path()
            title = f"default model ({Path(path).name})"
        elif which == "hybrid":
            path = write_hybrid("granitehybrid-768x8", HYBRID)
            title = f"random-weight hybrid ({path.name}: 6 Mamba-2 + 2 attention layers, n_embd 768)"
        elif which == "qwen35moe":
            path = write_hybrid("qwen35moe-512x8", QWEN35MOE)
            title = (f"random-weight qwen35moe ({path.name}: 6 gated DeltaNet + 2 gated attention "
                     "layers, n_embd 512, 16 experts / 4 used + shared)")
        else:
            raise SystemExit(f"unknown model {which!r}")
        model = load_model(str(path))
        tokenizer = Tokenizer.from_metadata(model.tokenizer)
        if args.artifact:
            k = max(lengths)
            target = artifact_target(path, backend, k, artifact_context(tokenizer, args.n_predict, k), args.threads)
            title = f"artifact (`ember compile --spec --draft-max {k}`, context {target.n_ctx}) of the {title}"
        else:
            target = new_session(model, backend)
        configs = [Config("no speculation")]
        recurrent = which in ("hybrid", "qwen35moe")
        if recurrent and args.rollback:
            configs += rollback_configs(model, tokenizer, lengths, args)
            if not args.artifact:
                # every plane the rounds use, before anything compiles: growing the planes later
                # drops the compiled steps, and a repetition would recompile them
                target.reserve_state_planes(max(lengths) + 2)
            out += ["", *measure(title + ", rollback side by side", target, tokenizer, configs,
                                 args.n_predict, args.reps)]
            continue
        configs += [Config(f"ngram, draft-max {k}", k, lambda answer: NgramDraft()) for k in lengths]
        if recurrent:
            n_vocab = model.hparams.n_vocab
            for miss in args.oracle_miss:
                configs.append(Config(f"oracle (miss {miss}), draft-max 4", 4,
                                      lambda answer, m=miss: OracleDraft(answer, m, n_vocab)))
        if which == "hybrid" and not args.no_draft_model and not args.artifact:
            draft_path = write_hybrid("granitehybrid-256x3", HYBRID_DRAFT)
            draft_session = new_session(load_model(str(draft_path)), backend)
            configs.append(Config(f"draft:{draft_path.name}, draft-max 2", 2,
                                  lambda answer: ModelDraft(draft_session)))
        out += ["", *measure(title, target, tokenizer, configs, args.n_predict, args.reps)]
    out.append(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
