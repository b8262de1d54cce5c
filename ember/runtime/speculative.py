"""Speculative decoding: draft tokens cheaply, verify them all in one target batch.

Each round the target evaluates [last, d1..dk] in one batch and keeps the longest prefix of
drafts that agrees with its own greedy choice, plus its own next token: 1 to k+1 tokens per
target pass. The rejected tail of the KV cache is dropped (Session.truncate). With greedy
sampling the output is token-identical to decoding without speculation, because the kernels
are batch invariant: a verify row is computed exactly as a single-token decode would.

Recurrent layers (Mamba-2's conv and SSM state; gated DeltaNet and short convolutions the same
way) cannot drop a tail: their state after the accepted prefix must be had some other way.
Two ways, chosen by `rollback`:
- "states" (the default): the verify batch runs with keep_states, so every recurrent op writes
  its state after EACH position into the session's state planes (ssm_scan / gated_delta_net
  with all_states=True; the convolution's states are overlapping windows of the rows it saw,
  no kernel at all). Keeping the accepted prefix is Session.truncate: the index of the plane
  holding that position's state becomes the current one. No second pass, no copy, and on a GPU
  backend nothing of the state leaves the device (the planes are resident like the KV caches).
  Memory per sequence: k + 2 states (the one the round starts from and the k + 1 it writes),
  shown by --verbose. Same for a recurrent draft model: it rewinds to the plane of the accepted
  position instead of starting over.
- "redecode" (llama.cpp's n-gram / draft-model path): a checkpoint before verify (the position
  only: the state the round starts from stays in its plane, 2 planes per sequence), and on a
  partial acceptance a restore and a second target pass over the accepted tokens.

Why per-position states rather than one checkpoint plus the step's inputs replayed by a small
kernel (vLLM's replay): the scan kernels already hold the whole state of their rows in registers
at every token, so writing it out costs one store per state element per token and no new
kernel; a replay would need the step inputs of every recurrent op kept (x, dt, B, C; q, k, v,
g, beta) plus a replay kernel per op and backend, and a launch per layer at each partial round.
Measured per kernel (bench/speculative.py, BENCHMARKS.md "Where a round's time goes"): on the
CPU the all_states scan writes each state straight into its plane (the step's set_rows is fused
into it, ember.codegen.cpu), so keeping every state of a 9-token verify of the random-weight
granitehybrid costs the stores alone, ~2 ms of CPU time over a 21.6 ms pass (~10%; it was
~17% while the states went through the arena and a set_rows copy), and selecting the kept state
is a dictionary lookup (microseconds), while the re-decode it replaces is 20-45% of a round. A
replay would still write one state and re-run the accepted tokens' scan (~0.1 ms per token for
the 6 layers), so it could save at most about half of those ~2 ms: not worth a kernel per op and
backend yet. The price is memory: k + 1 extra states instead of one plus O(k) inputs, bounded by
draft-max (8 by default).

Draft sources: n-grams of the context (prompt lookup) and a smaller draft model with the same
vocabulary.

At temperature > 0 (a Sampler that is not greedy) drafts are accepted by speculative sampling:
both draft sources propose one token for sure (a point mass q), so draft d is accepted with
probability p(d) under the target's sampling distribution p (the sampler's whole chain), and on
rejection the token is drawn from p with d removed, renormalized (max(0, p - q) normalized).
Every emitted token is then distributed exactly as the sampler draws it without speculation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from ember.errors import EmberError
from ember.runtime.generate import Generation, TextStream
from ember.runtime.memory import SequenceMemory
from ember.runtime.sampling import Sampler, apply_repeat_penalty, candidate_probs, check_finite
from ember.runtime.session import Session


class DraftSource(Protocol):
    name: str

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow context."""

    def accepted(self, context: Sequence[int], n_drafted: int, n_accepted: int) -> None:
        """Told after each round how many of its drafts the target kept; context is the whole
        accepted sequence so far."""


@dataclass
class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from n_max down to n_min) and propose what followed it. Gives up for a while when
    acceptance stays low (three rounds under half), as llama.cpp's n-gram drafter does; the
    pause doubles each time it follows another low streak (up to max_pause rounds), so on
    text n-grams cannot predict, drafting costs little, and a good round resets it."""
    n_min: int = 1
    n_max: int = 4
    name: str = "ngram"
    low_rounds: int = 0
    paused: int = 0
    first_pause: int = 8
    max_pause: int = 256
    pause: int = 8                   # the next pause's length (rounds)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if self.paused:
            self.paused -= 1
            return []
        ctx = list(context)
        for n in range(min(self.n_max, len(ctx) - 1), self.n_min - 1, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    follow = ctx[start + n:start + n + k]
                    if follow:
                        return follow
        return []

    def accepted(self, context, n_drafted: int, n_accepted: int) -> None:
        if n_drafted and n_accepted / n_drafted < 0.5:
            self.low_rounds += 1
            if self.low_rounds >= 3:
                self.paused, self.low_rounds = self.pause, 0
                self.pause = min(2 * self.pause, self.max_pause)
        elif n_drafted:
            self.low_rounds, self.pause = 0, self.first_pause


class ModelDraft:
    """A smaller model with the same vocabulary, decoding greedily in its own session; its
    cache is kept in step with the accepted sequence. A recurrent draft rewinds to the state
    its session still holds for the accepted position (a plane written this or last round:
    Session.truncate), and starts over only where none is held."""

    name = "draft-model"

    def __init__(self, session: Session):
        self.session = session
        self.synced: list[int] = []      # tokens the draft's cache holds, in order

    def reserve(self, draft_max: int) -> None:
        """Room for the states a round writes (the context's tail, then up to draft_max - 1
        single tokens) plus the one it rewinds to."""
        self.session.reserve_state_planes(draft_max + 2)

    def _rewind(self, n_past: int) -> int:
        """Move the draft back to n_past tokens; returns where it is (0 when a recurrent
        draft holds no state for n_past and must start over)."""
        s = self.session
        if not s.holds(n_past):
            n_past = 0
        s.truncate(n_past)
        return n_past

    def _eval(self, tokens: list[int]):
        return self.session.eval(tokens)[-1]

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        context = list(context)
        common = 0
        while common < min(len(self.synced), len(context)) and self.synced[common] == context[common]:
            common += 1
        if common == len(context):        # the cache holds all of it: recompute the last one
            common -= 1
        common = self._rewind(common)
        logits = self._eval(context[common:])
        self.synced = context[:]
        drafts = []
        for _ in range(k):
            token = int(np.argmax(logits))
            drafts.append(token)
            if len(drafts) == k or self.session.n_past >= self.session.n_ctx:
                break
            logits = self._eval([token])
            self.synced.append(token)
        return drafts

    def accepted(self, context, n_drafted: int, n_accepted: int) -> None:
        pass


ROLLBACKS = ("states", "redecode")


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_tokens: int = 0           # tokens evaluated by the target in verify batches
    checkpoint_seconds: float = 0.0  # saving recurrent state before verify (redecode)
    restore_seconds: float = 0.0     # restoring it after a partial acceptance (redecode)
    redecode_seconds: float = 0.0    # then re-decoding the accepted tokens (a target pass, not state handling)
    rollback_seconds: float = 0.0    # selecting the accepted prefix's state (states)
    verify_seconds: float = 0.0      # the verify passes
    round_seconds: float = 0.0
    rollback: str = ""               # "states" or "redecode"; "" for a model without recurrent state
    state_bytes: int = 0             # recurrent state kept per sequence (every plane)
    synced_bytes: int = 0            # host <-> device syncs of resident arrays (caches, states) during rounds

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def share(self, seconds: float) -> float:
        return seconds / self.round_seconds if self.round_seconds else 0.0

    def summary(self) -> str:
        text = (f"speculative: {self.rounds} verify passes, acceptance {self.acceptance:.2f} "
                f"({self.accepted}/{self.drafted}), {self.tokens_per_pass:.2f} tokens per pass")
        if self.rollback == "states":
            text += (f"; rollback by per-position states: {1e3 * self.rollback_seconds:.2f} ms "
                     f"({100 * self.share(self.rollback_seconds):.2f}% of round time), no re-decode")
        elif self.rollback == "redecode":
            state = self.checkpoint_seconds + self.restore_seconds
            text += (f"; checkpoint {1e3 * self.checkpoint_seconds:.1f} ms + restore "
                     f"{1e3 * self.restore_seconds:.1f} ms ({100 * self.share(state):.1f}% of round "
                     f"time), re-decode {1e3 * self.redecode_seconds:.1f} ms "
                     f"({100 * self.share(self.redecode_seconds):.1f}%)")
        return text

    def memory_summary(self) -> str:
        """What --verbose adds: the recurrent state kept per sequence, and bytes synced."""
        return (f"speculative memory: recurrent state {self.state_bytes / 2**20:.2f} MiB per sequence "
                f"({self.rollback}); host <-> device syncs during rounds: {self.synced_bytes} bytes")


def speculative_generate(target: Session, draft: DraftSource, tokenizer, prompt: str, n_predict: int,
                         draft_max: int = 8, stops: Sequence[str] = (), ignore_eos: bool = False,
                         on_text: Callable[[str], None] | None = None,
                         parse_special: bool = True,
                         sampler: Sampler | None = None,
                         special: bool = False,
                         rollback: str = "states") -> tuple[Generation, SpecStats]:
    """Generation with speculation. Greedy (sampler None or greedy): token-identical to
    greedy `generate`. Otherwise speculative sampling (module doc): the target's distribution.
    rollback: how recurrent state drops a rejected tail, "states" or "redecode" (module doc)."""
    if draft_max < 1:
        raise EmberError("--draft-max must be at least 1")
    if rollback not in ROLLBACKS:
        raise EmberError(f"--spec-rollback must be one of {', '.join(ROLLBACKS)}, got {rollback!r}")
    run = _Speculation(target, draft, tokenizer, n_predict, stops, ignore_eos, on_text, sampler, special,
                       rollback)
    run.reserve(draft_max)
    # a prompt may be given as token ids (tests, benchmarks) or as text
    prompt_ids = list(prompt) if not isinstance(prompt, str) else \
        tokenizer.encode(prompt, add_special=True, parse_special=parse_special)
    return run.generate(prompt_ids, draft_max)


class _Speculation:
    """One speculative generation: draft, verify in one target batch, keep the accepted prefix
    (rolling recurrent state back when a tail is rejected), emit."""

    def __init__(self, target: Session, draft: DraftSource, tokenizer, n_predict: int,
                 stops: Sequence[str], ignore_eos: bool, on_text, sampler: Sampler | None,
                 special: bool = False, rollback: str = "states"):
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.n_predict, self.ignore_eos, self.on_text = n_predict, ignore_eos, on_text
        self.sampler, self.special = sampler, special
        self.sampling = sampler is not None and not sampler.params.greedy
        self.result, self.stats = Generation(), SpecStats()
        self.stream = TextStream(stops)
        self.memory = SequenceMemory(target)
        self.sessions = [target] + ([draft.session] if isinstance(draft, ModelDraft) else [])
        self.context: list[int] = []
        self.rollback = rollback if target.is_recurrent else ""
        self.stats.rollback = self.rollback

    def reserve(self, draft_max: int) -> None:
        """State planes for the rounds (Session.prepare_speculation; an artifact's session
        checks that its compiled steps hold them, and that its verify steps take draft_max + 1
        tokens)."""
        self.target.prepare_speculation(draft_max, self.rollback)
        if self.rollback:
            self.stats.state_bytes = self.target.state_planes * self.target.state_bytes
        if isinstance(self.draft, ModelDraft):
            self.draft.reserve(draft_max)

    def generate(self, prompt_ids: list[int], draft_max: int) -> tuple[Generation, SpecStats]:
        result, target = self.result, self.target
        next_token = self.prompt(prompt_ids)
        result.stop_reason = "length"
        compile_before = self.compile_seconds()
        transfers = target.backend.transfers
        synced_before = transfers.synced if transfers is not None else 0
        start = time.perf_counter()
        while not self.emit(next_token):
            self.context.append(next_token)
            room = min(draft_max, self.n_predict - len(result.tokens), target.n_ctx - target.n_past - 1)
            drafts = self.draft.propose(self.context, room) if room > 0 else []
            round_start, compiled = time.perf_counter(), self.compile_seconds()
            n_ok, chosen = self.verify(next_token, drafts)
            stop = self.emit_accepted(drafts[:n_ok])
            # a step shape compiled inside the round is not the round's cost (as decode_seconds)
            self.stats.round_seconds += time.perf_counter() - round_start - (self.compile_seconds() - compiled)
            if stop:
                break
            next_token = chosen
            if target.n_past >= target.n_ctx:
                # the context is full, but its last logits chose one more token, which plain
                # decoding emits too (identity at n_ctx)
                if not self.emit(next_token):
                    result.stop_reason = "context"
                break
        # compiling new step shapes is not decoding time (the CLI reports it on its own)
        result.decode_seconds = time.perf_counter() - start - (self.compile_seconds() - compile_before)
        if transfers is not None:
            self.stats.synced_bytes = transfers.synced - synced_before
        tail = self.stream.finish()
        if tail and self.on_text:
            self.on_text(tail)
        result.text = self.stream.text[:self.stream.shown]
        return result, self.stats

    def compile_seconds(self) -> float:
        return sum(s.stats.compile_seconds for s in self.sessions)

    def prompt(self, prompt_ids: list[int]) -> int:
        """Evaluate the prompt; the first token."""
        self.result.prompt_tokens = len(prompt_ids)
        self.target.reset()
        self.context = list(prompt_ids)
        logits = self.target.eval(prompt_ids)[-1]
        self.result.prompt_seconds = self.target.last_eval_seconds
        check_finite(logits, len(self.context))
        return self.sampler.sample(logits, self.context) if self.sampling else int(np.argmax(logits))

    def emit(self, token: int) -> bool:
        """Add one token to the output; True when generation must stop."""
        result = self.result
        if not self.ignore_eos and self.tokenizer.is_eog(token):
            result.stop_reason = "eos"
            return True
        result.tokens.append(token)
        shown = self.stream.push(self.tokenizer.token_to_piece(token, skip_special=not self.special))
        if shown and self.on_text:
            self.on_text(shown)
        if self.stream.stop_hit():
            result.stop_reason = "stop string"
            return True
        return len(result.tokens) >= self.n_predict

    def emit_accepted(self, accepted: list[int]) -> bool:
        """Emit the accepted drafts; True when generation must stop."""
        for token in accepted:
            if self.emit(token):
                return True
            self.context.append(token)
        return False

    def verify(self, next_token: int, drafts: list[int]) -> tuple[int, int]:
        """One target pass over [next_token, drafts...]: (drafts accepted, the token after them),
        with the target's memory holding exactly the accepted tokens afterwards."""
        target, stats = self.target, self.stats
        base = target.n_past
        batch = [next_token] + drafts
        redecode = self.rollback == "redecode" and drafts
        checkpoint = None
        if redecode:
            t = time.perf_counter()
            checkpoint = self.memory.checkpoint()     # the position: its plane stays (ember.runtime.memory)
            stats.checkpoint_seconds += time.perf_counter() - t
        rows = target.eval(batch, all_logits=True, keep_states=self.rollback == "states")
        stats.verify_seconds += target.last_eval_seconds      # without compiling a new shape
        n_ok, chosen = self.accept(rows, drafts)
        t = time.perf_counter()
        if redecode and n_ok < len(drafts):
            # back to the checkpoint, then re-decode the accepted tokens (llama.cpp's way)
            self.memory.restore(checkpoint)
            stats.restore_seconds += time.perf_counter() - t
            target.eval(batch[:1 + n_ok])
            stats.redecode_seconds += target.last_eval_seconds
        else:
            # the cache keeps the last token and the accepted drafts; the rest is dropped (a
            # recurrent state moves to the plane holding the accepted position: Session.truncate)
            target.truncate(base + 1 + n_ok)
            stats.rollback_seconds += time.perf_counter() - t
        stats.rounds += 1
        stats.drafted += len(drafts)
        stats.accepted += n_ok
        stats.target_tokens += len(drafts) + 1
        self.draft.accepted(self.context, len(drafts), n_ok)
        return n_ok, chosen

    def accept(self, rows: np.ndarray, drafts: list[int]) -> tuple[int, int]:
        """How many drafts the target keeps, and the token after them: greedy keeps a draft
        while it is the argmax; sampling keeps it with the target's probability."""
        if self.sampling:
            return _sample_verify(self.sampler, rows, drafts, self.context)
        n_ok = 0
        while True:
            check_finite(rows[n_ok], len(self.context) + n_ok)   # as plain decoding would
            choice = int(np.argmax(rows[n_ok]))
            if n_ok == len(drafts) or drafts[n_ok] != choice:
                return n_ok, choice
            n_ok += 1


def _sample_verify(sampler: Sampler, rows: np.ndarray, drafts: list[int], context: list[int]) -> tuple[int, int]:
    """Speculative sampling over a verify batch: (drafts accepted, the token after them). Row i
    holds the target's logits after context + drafts[:i]; draft d is kept with probability p(d),
    else the token comes from p without d; after all drafts, from the last row's p."""
    params = sampler.params
    history = list(context)
    for i, d in enumerate(drafts):
        ids, probs = _distribution(rows[i], history, params)
        at = np.flatnonzero(ids == d)
        p_d = float(probs[at[0]]) if at.size else 0.0
        if sampler.rng.random() < p_d:
            history.append(d)
            continue
        if at.size:                     # the residual: p with the rejected draft taken out
            probs = probs.copy()
            probs[at[0]] = 0.0
            probs /= probs.sum()
        return i, int(ids[sampler.rng.choice(len(ids), p=probs)])
    ids, probs = _distribution(rows[len(drafts)], history, params)
    return len(drafts), int(ids[sampler.rng.choice(len(ids), p=probs)])


def _distribution(logits: np.ndarray, history: list[int], params) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's distribution for these logits (ember.runtime.sampling's chain)."""
    logits = np.asarray(logits, dtype=np.float32)
    check_finite(logits, len(history))
    if params.repeat_penalty != 1.0 and history:
        logits = apply_repeat_penalty(logits, history[-params.repeat_last_n:], params.repeat_penalty)
    return candidate_probs(logits, params)
