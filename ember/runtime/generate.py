"""Text generation: prompt -> tokens, one decode step per new token, streamed as text.

Streaming holds back what cannot be shown yet: bytes of an unfinished UTF-8 character, and
text that might be the start of a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


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
             on_text: Callable[[str], None] | None = None, parse_special: bool = True) -> Generation:
    result = Generation()
    # a prompt may be given as token ids (tests, benchmarks) or as text
    prompt_ids = list(prompt) if not isinstance(prompt, str) else \
        tokenizer.encode(prompt, add_special=True, parse_special=parse_special)
    if not prompt_ids:
        raise ValueError("the prompt is empty and the model adds no BOS token")
    result.prompt_tokens = len(prompt_ids)
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
        shown = stream.push(tokenizer.token_to_piece(token))
        if shown and on_text:
            on_text(shown)
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
    if tail and on_text:
        on_text(tail)
    result.text = stream.text[:stream.shown]
    return result
