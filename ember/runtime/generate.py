"""Text generation: prompt -> tokens, one decode step per new token, streamed as text.

Streaming holds back what cannot be shown yet: bytes of an unfinished UTF-8 character, and
text that might be the start of a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ember.runtime.sampling import Sampler
from ember.runtime.session import Session


@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""          # "eos", "stop string", "length", "context"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first generated token comes from the prompt pass; the others from decode steps
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds else 0.0


class TextStream:
    """Turns token pieces (bytes) into text to show, holding back what may still change."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = b""
        self.text = ""        # everything decoded so far
        self.shown = 0        # characters of text already handed out

    def push(self, piece: bytes) -> str:
        self.pending += piece
        # decode as far as the bytes form whole characters
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                self.text += self.pending[:cut].decode("utf-8")
                self.pending = self.pending[cut:]
                break
            except UnicodeDecodeError:
                continue
        return self._release(final=False)

    def stop_hit(self) -> bool:
        return any(s in self.text[max(0, self.shown - len(s)):] for s in self.stops)

    def finish(self) -> str:
        if self.pending:
            self.text += self.pending.decode("utf-8", errors="replace")
            self.pending = b""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        for s in self.stops:
            at = self.text.find(s, max(0, self.shown - len(s)))
            if at != -1:
                end = min(end, at)
        if not final and end == len(self.text):
            # keep back a tail that could grow into a stop string
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.shown)
        out = self.text[self.shown:end]
        self.shown = end
        return out


def generate(session: Session, tokenizer, prompt: str, n_predict: int, sampler: Sampler,
             stops: Sequence[str] = (), ignore_eos: bool = False,
             on_text: Callable[[str], None] | None = None, parse_special: bool = True,
             special: bool = False) -> Generation:
    """Generate from an empty cache; on_text(piece) is told each piece of text as it is shown.
    A prompt may be given as token ids (tests, benchmarks) or as text."""
    prompt_ids = list(prompt) if not isinstance(prompt, str) else \
        tokenizer.encode(prompt, add_special=True, parse_special=parse_special)
    result = Generation()
    for piece in generate_stream(session, tokenizer, prompt_ids, n_predict, sampler, stops,
                                 ignore_eos, special, result):
        if on_text:
            on_text(piece)
    return result


def generate_stream(session: Session, tokenizer, prompt_ids: Sequence[int], n_predict: int,
                    sampler: Sampler, stops: Sequence[str] = (), ignore_eos: bool = False,
                    special: bool = False, result: Generation | None = None,
                    n_keep: int = 0) -> Iterator[str]:
    """Yield the generated text piece by piece, filling result (a Generation) as it goes.
    prompt_ids are evaluated after the first n_keep positions of the session's cache (0: from an
    empty cache; a chat keeps its earlier turns). A generated control or unknown token shows
    as nothing unless special (llama.cpp's token_to_piece with special=false); the last sampled
    token stays out of the cache (session.n_past says how far the cache goes)."""
    result = Generation() if result is None else result
    if not prompt_ids:
        raise ValueError("the prompt is empty and the model adds no BOS token")
    result.prompt_tokens = len(prompt_ids)
    if n_keep:
        session.truncate(n_keep)
    else:
        session.reset()
    stream = TextStream(stops)
    history = list(prompt_ids)

    logits = session.eval(prompt_ids)[-1]
    result.prompt_seconds = session.last_eval_seconds
    result.stop_reason = "length"
    for i in range(n_predict):
        token = sampler.sample(logits, history)
        if not ignore_eos and tokenizer.is_eog(token):
            result.stop_reason = "eos"
            break
        result.tokens.append(token)
        history.append(token)
        shown = stream.push(tokenizer.token_to_piece(token, skip_special=not special))
        result.text = stream.text[:stream.shown]
        if shown:
            yield shown
        if stream.stop_hit():
            result.stop_reason = "stop string"
            break
        if i + 1 == n_predict:
            break
        if session.n_past >= session.n_ctx:
            result.stop_reason = "context"
            break
        logits = session.eval([token])[-1]
        result.decode_seconds += session.last_eval_seconds
    tail = stream.finish()
    result.text = stream.text[:stream.shown]
    if tail:
        yield tail
