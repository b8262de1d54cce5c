"""Speculative decoding: draft tokens cheaply, verify them all in one target batch.

Each round the target evaluates [last, d1..dk] in one batch and keeps the longest prefix of
drafts that agrees with its own greedy choice, plus its own next token: 1 to k+1 tokens per
target pass. The rejected tail of the KV cache is dropped (Session.truncate); a model with recurrent
layers is checkpointed before verify and, on a partial acceptance, restored and the accepted
tokens re-decoded (one extra target pass; llama.cpp's method). With greedy
sampling the output is token-identical to decoding without speculation, because the CPU
kernels are batch invariant: a verify row is computed exactly as a single-token decode would.

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
    cache is kept in step with the accepted sequence."""

    name = "draft-model"

    def __init__(self, session: Session):
        self.session = session
        self.synced: list[int] = []      # tokens the draft's cache holds, in order
        # A recurrent draft (Mamba-2 layers) cannot truncate its tail: keep its state after
        # each position it evaluates this round, by reference (a step never writes into the
        # state arrays it was given), to rewind to where the accepted sequence leaves it.
        self.states: dict[int, dict] = {}

    def _rewind(self, n_past: int) -> int:
        """Move the draft back to n_past tokens; returns where it is (0 when a recurrent
        draft holds no state for n_past and must start over)."""
        s = self.session
        if not s.is_recurrent or n_past in (0, s.n_past):
            s.truncate(n_past)
        elif n_past in self.states:
            s.set_recurrent_state(self.states[n_past], n_past)
        else:
            s.truncate(0)
            n_past = 0
        self.states = {}
        return n_past

    def _eval(self, tokens: list[int]):
        logits = self.session.eval(tokens)[-1]
        if self.session.is_recurrent:
            self.states[self.session.n_past] = self.session.recurrent_state()
        return logits

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


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    target_tokens: int = 0           # tokens evaluated by the target in verify batches
    checkpoint_seconds: float = 0.0  # saving recurrent state before verify
    restore_seconds: float = 0.0     # restoring it after a partial acceptance
    redecode_seconds: float = 0.0    # then re-decoding the accepted tokens (a target pass, not state handling)
    round_seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def summary(self) -> str:
        share = (self.checkpoint_seconds + self.restore_seconds) / self.round_seconds if self.round_seconds else 0.0
        return (f"speculative: {self.rounds} verify passes, acceptance {self.acceptance:.2f} "
                f"({self.accepted}/{self.drafted}), {self.tokens_per_pass:.2f} tokens per pass; "
                f"checkpoint {1e3 * self.checkpoint_seconds:.1f} ms + restore "
                f"{1e3 * self.restore_seconds:.1f} ms ({100 * share:.1f}% of round time), re-decode "
                f"{1e3 * self.redecode_seconds:.1f} ms")


def speculative_generate(target: Session, draft: DraftSource, tokenizer, prompt: str, n_predict: int,
                         draft_max: int = 8, stops: Sequence[str] = (), ignore_eos: bool = False,
                         on_text: Callable[[str], None] | None = None,
                         parse_special: bool = True,
                         sampler: Sampler | None = None,
                         special: bool = False) -> tuple[Generation, SpecStats]:
    """Generation with speculation. Greedy (sampler None or greedy): token-identical to
    greedy `generate`. Otherwise speculative sampling (module doc): the target's distribution."""
    if draft_max < 1:
        raise EmberError("--draft-max must be at least 1")
    run = _Speculation(target, draft, tokenizer, n_predict, stops, ignore_eos, on_text, sampler, special)
    # a prompt may be given as token ids (tests, benchmarks) or as text
    prompt_ids = list(prompt) if not isinstance(prompt, str) else \
        tokenizer.encode(prompt, add_special=True, parse_special=parse_special)
    return run.generate(prompt_ids, draft_max)


class _Speculation:
    """One speculative generation: draft, verify in one target batch, keep the accepted prefix
    (rolling recurrent state back when a tail is rejected), emit."""

    def __init__(self, target: Session, draft: DraftSource, tokenizer, n_predict: int,
                 stops: Sequence[str], ignore_eos: bool, on_text, sampler: Sampler | None,
                 special: bool = False):
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.n_predict, self.ignore_eos, self.on_text = n_predict, ignore_eos, on_text
        self.sampler, self.special = sampler, special
        self.sampling = sampler is not None and not sampler.params.greedy
        self.result, self.stats = Generation(), SpecStats()
        self.stream = TextStream(stops)
        self.memory = SequenceMemory(target)
        self.sessions = [target] + ([draft.session] if isinstance(draft, ModelDraft) else [])
        self.context: list[int] = []

    def generate(self, prompt_ids: list[int], draft_max: int) -> tuple[Generation, SpecStats]:
        result, target = self.result, self.target
        next_token = self.prompt(prompt_ids)
        result.stop_reason = "length"
        compile_before = self.compile_seconds()
        start = time.perf_counter()
        while not self.emit(next_token):
            self.context.append(next_token)
            room = min(draft_max, self.n_predict - len(result.tokens), target.n_ctx - target.n_past - 1)
            drafts = self.draft.propose(self.context, room) if room > 0 else []
            round_start = time.perf_counter()
            n_ok, chosen = self.verify(next_token, drafts)
            stop = self.emit_accepted(drafts[:n_ok])
            self.stats.round_seconds += time.perf_counter() - round_start
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
        checkpoint = None
        if target.is_recurrent and drafts:
            t = time.perf_counter()
            checkpoint = self.memory.checkpoint()     # references: no copy (see ember.runtime.memory)
            stats.checkpoint_seconds += time.perf_counter() - t
        batch = [next_token] + drafts
        rows = target.eval(batch, all_logits=True)
        n_ok, chosen = self.accept(rows, drafts)
        if checkpoint is not None and n_ok < len(drafts):
            # Recurrent state cannot drop a tail: back to the checkpoint, then re-decode the
            # accepted tokens (one extra target pass, as llama.cpp does).
            t = time.perf_counter()
            self.memory.restore(checkpoint)
            t_redecode = time.perf_counter()
            stats.restore_seconds += t_redecode - t
            target.eval(batch[:1 + n_ok])
            stats.redecode_seconds += time.perf_counter() - t_redecode
        else:
            # the cache keeps the last token and the accepted drafts; the rest is dropped
            target.truncate(base + 1 + n_ok)
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
