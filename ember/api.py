"""The Python API for applications, shaped like llama-cpp-python's `Llama`:

    import ember
    llm = ember.load("model.gguf", backend="cpu", threads=2, n_ctx=512)
    text = llm.generate("Once upon a time", max_tokens=32, temperature=0)
    for piece in llm.generate("Once upon a time", max_tokens=32, stream=True): ...

`load` reads the GGUF, builds its tokenizer and a `Session` (ember/runtime/session.py) on the
backend; step graphs are compiled on first use and reused. The `ember` command is built on this
module (ember/cli.py). Argument names follow llama-cpp-python's (max_tokens, temperature, top_k,
top_p, min_p, repeat_penalty, seed, stop, stream). Imports every floor below it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ember.errors import EmberError


@dataclass(frozen=True)
class SamplingArgs:
    """The sampling arguments of generate and chat, as llama-cpp-python names them."""
    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    special: bool = False

    def sampler(self):
        from ember.runtime.sampling import Sampler, SamplingParams
        if self.max_tokens < 0:
            raise EmberError(f"max_tokens must be >= 0, got {self.max_tokens}")
        return Sampler(SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                      min_p=self.min_p, repeat_penalty=self.repeat_penalty, seed=self.seed))


def load(model: str | Path | None = None, backend: str = "cpu", threads: int | None = None,
         n_ctx: int | None = None, swa_full: bool = False, disable: Sequence[str] = (),
         on_compile: Callable[[str], None] | None = None, verbose: bool = False,
         default_n_ctx: int = 2048, cache=None, quick_start: bool = True) -> "Model":
    """Open a GGUF model (default: Gemma 3 270M Q4_K_M, fetched into the cache on first use) on
    a backend (cpu, opencl, vulkan). threads: CPU threads (cpu only; default all cores); n_ctx:
    the context in tokens (default: default_n_ctx, or the model's training context when that is
    smaller; more than the training context is refused); disable: compiler passes to
    skip; on_compile(message) is told before each step graph is compiled; verbose: the OpenCL
    compiler's build logs go to stderr (otherwise they are kept, not shown); cache: the KV cache
    types (an ember.models.KVCacheTypes, e.g. KVCacheTypes.of("q8_0", "turbo4"); default f16);
    quick_start (cpu): a step graph the compile cache lacks first runs built at a lower
    optimisation level (seconds sooner, the same bits) while the full build is made in the
    background (ember.backends.cpu.backend; the process waits for it at exit, so the next start
    finds it cached); False: wait for the full build (benchmarks)."""
    from ember.backends import get_backend
    from ember.models import load_model
    from ember.models.default_model import default_model_path
    from ember.passes import known_pass_names
    from ember.runtime.session import Session, SessionOptions
    for name in disable:
        if name not in known_pass_names():
            raise EmberError(f"unknown pass {name!r}; passes: {', '.join(known_pass_names())}")
    path = Path(model) if model is not None else default_model_path()
    start = time.perf_counter()
    loaded = load_model(path)
    n_train = loaded.hparams.n_ctx_train
    if n_ctx is None:
        n_ctx = min(default_n_ctx, n_train or default_n_ctx)
    elif n_ctx > n_train > 0:
        raise EmberError(f"n_ctx {n_ctx} exceeds the training context of {path} ({n_train} tokens)")
    options = {"threads": threads} if threads and backend == "cpu" else {}
    if backend == "cpu":
        options["tiered"] = quick_start
    if verbose and backend == "opencl":
        options["verbose"] = True
    session = Session(loaded, get_backend(backend, **options),
                      SessionOptions(n_ctx=n_ctx, swa_full=swa_full, disabled_passes=frozenset(disable),
                                     **({"cache": cache} if cache is not None else {})))
    session.on_compile = on_compile
    return Model(loaded, session, load_seconds=time.perf_counter() - start)


def load_artifact(folder: str | Path, model: str | Path | None = None,
                  threads: int | None = None, cache_request: dict | None = None) -> "Model":
    """Open an artifact folder written by `ember compile` (no passes, no compilers run); the GGUF
    from model, or the path recorded in the artifact (checked by sha256). cache_request: the
    KV cache settings ({"k", "v", "rotation"}) the caller expects; other than the artifact's
    is refused (None, or a None value: the artifact's)."""
    from ember.artifact import load_artifact as load
    start = time.perf_counter()
    loaded, session = load(folder, model, threads, cache_request=cache_request)
    return Model(loaded, session, load_seconds=time.perf_counter() - start)


class Model:
    """A loaded model with its tokenizer and KV cache (one sequence at a time). `last` holds the
    statistics of the latest generate/chat (an ember.runtime.generate.Generation)."""

    def __init__(self, model, session, tokenizer=None, load_seconds: float = 0.0):
        from ember.models.tokenizer import Tokenizer
        self.model, self.session = model, session
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_metadata(model.tokenizer, str(model.path), model.n_vocab)
        self.path = Path(model.path) if getattr(model, "path", None) else None
        self.load_seconds = load_seconds
        self.last = None
        self._template = None
        self.last_kept = 0
        # what the KV cache holds: its token ids, and for a chat the rendered text they are
        # (None: not a chat's), so the next turn prefills only what it adds
        self._cache_ids: list[int] = []
        self._cache_text: str | None = None

    @property
    def n_ctx(self) -> int:
        return self.session.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.model.hparams.n_vocab

    # ---- text <-> tokens ---------------------------------------------------------------------
    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of text: BOS first when add_bos and the model adds one; special: control-token
        text such as <start_of_turn> becomes its id (llama-cpp-python's arguments)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of token ids; control and unknown tokens show as nothing unless special."""
        return self.tokenizer.decode(tokens, skip_special=not special)

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int = 0, stop: str | Sequence[str] = (), ignore_eos: bool = False,
                 special: bool = False, stream: bool = False) -> str | Iterator[str]:
        """Text generated after prompt (text, or token ids), from an empty cache. temperature 0 is
        greedy. Returns the text, or with stream=True an iterator of its pieces as they come.
        special: show generated control tokens (<eos>, <start_of_turn>, ...) as their text."""
        args = SamplingArgs(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                            (stop,) if isinstance(stop, str) else tuple(stop), ignore_eos, special)
        ids = list(prompt) if not isinstance(prompt, str) else \
            self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        return self._run(ids, args, stream)

    def generate_with(self, prompt_ids: Sequence[int], args: SamplingArgs, n_keep: int = 0,
                      text: str | None = None) -> Iterator[str]:
        """The pieces of a generation after prompt_ids (evaluated after the cache's first n_keep
        positions); `last` holds its statistics. text: the rendered chat text the cache holds
        with prompt_ids (chat turns only)."""
        from ember.runtime.generate import Generation, generate_stream
        self.last = result = Generation()
        sequence = self._cache_ids[:n_keep] + list(prompt_ids)
        self._cache_ids, self._cache_text = [], None
        pieces = generate_stream(self.session, self.tokenizer, list(prompt_ids), args.max_tokens,
                                 args.sampler(), args.stop, args.ignore_eos, args.special, result,
                                 n_keep=n_keep)
        return self._track(pieces, sequence, result, text)

    def _track(self, pieces: Iterator[str], sequence: list[int], result, text: str | None) -> Iterator[str]:
        """pieces, recording what the cache holds once they end (or the caller stops reading)."""
        try:
            yield from pieces
        finally:
            # the cache holds the prompt and the generated tokens but the last sampled one
            held = (sequence + result.tokens)[:self.session.n_past]
            self._cache_ids = held
            if text is not None and len(held) >= len(sequence):
                reply = b"".join(self.tokenizer.token_to_piece(t) for t in held[len(sequence):])
                self._cache_text = text + reply.decode("utf-8", errors="replace")

    # ---- chat --------------------------------------------------------------------------------
    @property
    def chat_template(self):
        """The model's ChatTemplate (ember/models/chat_template.py); a one-line ChatTemplateError
        when the GGUF has none (a base model)."""
        from ember.models.chat_template import ChatTemplate
        if self._template is None:
            self._template = ChatTemplate.from_metadata(self.model.tokenizer, self.tokenizer)
        return self._template

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of messages, without the BOS text when the tokenizer adds BOS itself
        (so BOS is not doubled, as llama.cpp does)."""
        template = self.chat_template
        text = template.render(messages, add_generation_prompt)
        bos = template.bos_token
        if self.tokenizer.add_bos and bos and text.startswith(bos):
            text = text[len(bos):]
        return text

    def chat(self, messages: Sequence[dict], max_tokens: int = 128, temperature: float = 0.8,
             top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
             seed: int = 0, stop: str | Sequence[str] = (), special: bool = False,
             stream: bool = False) -> str | Iterator[str]:
        """The assistant's reply to messages (dicts with `role` and `content`: system, user,
        assistant), rendered with the model's chat template. The KV cache is kept between calls:
        when messages extend the previous call's (its reply appended as an assistant message),
        only the new turn's tokens are evaluated. Returns the text, or its pieces (stream)."""
        args = SamplingArgs(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                            (stop,) if isinstance(stop, str) else tuple(stop), False, special)
        pieces = self.chat_with(messages, args)
        return pieces if stream else "".join(pieces)

    def chat_with(self, messages: Sequence[dict], args: SamplingArgs) -> Iterator[str]:
        """The pieces of the reply to messages; `last` holds its statistics and `last_kept` the
        cache positions the turn kept from the previous one."""
        text = self.apply_chat_template(messages)
        ids, self.last_kept = self._chat_prompt(text)
        return self.generate_with(ids, args, self.last_kept, text=text)

    def _chat_prompt(self, text: str) -> tuple[list[int], int]:
        """(token ids to evaluate, cache positions to keep) for a chat prompt's text."""
        held, n_past = self._cache_ids, self.session.n_past
        if self._cache_text is not None and len(held) == n_past and text.startswith(self._cache_text) \
                and len(text) > len(self._cache_text):
            new = self.tokenizer.encode(text[len(self._cache_text):], add_special=False, parse_special=True)
            if new:
                return new, n_past
        ids = self.tokenizer.encode(text, add_special=True, parse_special=True)
        keep = 0
        if len(held) == n_past:
            while keep < min(len(held), len(ids) - 1) and held[keep] == ids[keep]:
                keep += 1
        if self.session.is_recurrent and keep != n_past:
            keep = 0        # a recurrent state cannot be rolled back to an earlier position
        return ids[keep:], keep

    def _run(self, prompt_ids: Sequence[int], args: SamplingArgs, stream: bool, n_keep: int = 0):
        pieces = self.generate_with(prompt_ids, args, n_keep)
        return pieces if stream else "".join(pieces)

    # ---- scoring -----------------------------------------------------------------------------
    def logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """The logits of every prompt position (teacher forcing), float32 [n_tokens, n_vocab]; a
        text prompt gets BOS first when the model adds one."""
        ids = list(prompt) if not isinstance(prompt, str) else \
            self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        if not ids:
            raise EmberError("the prompt is empty and the model adds no BOS token")
        self.session.reset()
        return np.ascontiguousarray(self.session.eval(ids, all_logits=True), dtype=np.float32)

    def perplexity(self, text: str, n_ctx: int = 512, chunks: int = 0,
                   on_chunk: Callable[[int, int, float], None] | None = None):
        """Perplexity of text by llama-perplexity's method (ember.tools.perplexity): chunks of
        n_ctx tokens, each from an empty cache with BOS first, the second half scored; at most
        chunks chunks when positive. on_chunk(i, n_chunk, running PPL) after each chunk.
        Returns a Perplexity (ppl, error, final_line())."""
        from ember.tools.perplexity import perplexity, session_chunk_evaluator
        if n_ctx > self.session.n_ctx:
            raise EmberError(f"n_ctx {n_ctx} exceeds the session's context of {self.session.n_ctx} tokens")
        tokens = self.tokenizer.encode(text, add_special=True, parse_special=False)
        bos = self.tokenizer.bos_id if self.tokenizer.add_bos else None
        return perplexity(session_chunk_evaluator(self.session), tokens, n_ctx, bos, on_chunk,
                          max_chunks=chunks)

    def __repr__(self) -> str:
        return (f"ember.Model({self.path}, {self.model.arch}, backend {self.session.backend.name}, "
                f"n_ctx {self.n_ctx})")
