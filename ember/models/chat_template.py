"""Chat templates: a GGUF's `tokenizer.chat_template` (Jinja) turned into a prompt.

A template is untrusted input (it comes with a downloaded file), so it is rendered in jinja2's
ImmutableSandboxedEnvironment (no `_`-attributes such as `__class__`, no mutating methods) with
bounds on the work a template may do: at most MAX_OUTPUT characters rendered, `range` of at
most MAX_RANGE items, no string/list product or call argument past MAX_OUTPUT, and at most
MAX_STEPS executed template lines (counted by a trace function on the template's own frames,
so nested loops that print nothing are bounded too). A refused template raises one line.

The variables follow Hugging Face's apply_chat_template, as llama.cpp's templates expect:
`messages` (dicts with `role` and `content`), `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception(message)`, `strftime_now(format)`; blocks are trimmed
(trim_blocks, lstrip_blocks) and `tojson` keeps non-ASCII text. Imports jinja2 and the
standard library.
"""
from __future__ import annotations

import datetime
import functools
import json
import re
import sys
from collections.abc import Mapping, Sequence

from ember.errors import EmberError

KEY = "tokenizer.chat_template"
MAX_OUTPUT = 1 << 20          # characters of a rendered prompt
MAX_RANGE = 100_000           # items of one range()
MAX_STEPS = 2_000_000         # template lines executed in one render
_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{6,}|\{[^}]*:[^}]*\d{6,}[^}]*\}")


class ChatTemplateError(EmberError):
    """A chat template that is missing, malformed, refused by the sandbox or over a bound."""


class _Limit(Exception):
    """Raised inside a render when a bound is passed (turned into a ChatTemplateError)."""


def _check_size(value) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OUTPUT:
        raise _Limit(f"a number argument of {value} is over the bound of {MAX_OUTPUT}")
    if isinstance(value, str) and _WIDE_FORMAT.search(value):
        raise _Limit("a format field wider than 99999 characters")


def _bounded(function):
    """A filter or global whose arguments are checked against the bounds."""
    @functools.wraps(function)
    def checked(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            _check_size(value)
        return function(*args, **kwargs)
    return checked


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _Limit(f"range of {len(r)} items is over the bound of {MAX_RANGE}")
    return r


def _raise_exception(message):
    raise ChatTemplateError(f"{KEY}: the template raised: {message}")


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                        raise _Limit(f"a product of {len(seq) * n} items is over the bound of {MAX_OUTPUT}")
            elif operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 64:
                    raise _Limit(f"an exponent of {right} is over the bound of 64")
            elif operator == "%":
                _check_size(left)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):
            for value in (*args, *kwargs.values()):
                _check_size(value)
            return super().call(__context, __obj, *args, **kwargs)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters = {name: _bounded(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals.update(range=_range, raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


class _StepBudget:
    """A trace function counting the lines executed in the template's own frames (jinja2
    compiles a template into Python code whose file name is <template>)."""

    def __init__(self, steps: int):
        self.left = steps

    def __enter__(self):
        self.previous = sys.gettrace()
        sys.settrace(self.trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.previous)

    def trace(self, frame, event, arg):
        return self.count if frame.f_code.co_filename == "<template>" else None

    def count(self, frame, event, arg):
        self.left -= 1
        if self.left < 0:
            raise _Limit(f"more than {MAX_STEPS} template steps (a loop too long?)")
        return self.count


class ChatTemplate:
    """A compiled chat template with the model's BOS and EOS texts."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        try:
            self.template = _environment().from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"{KEY}: malformed template: {_one_line(e)}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], tokenizer) -> "ChatTemplate":
        """The template of a model's tokenizer metadata; a one-line error when it has none."""
        source = meta.get(KEY)
        if not source:
            raise ChatTemplateError(f"the model has no chat template ({KEY} is not in its GGUF): it is "
                                    "probably a base model; use generate -p with plain text instead")
        token = tokenizer.tokens
        bos = token[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
        eos = token[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
        return cls(str(source), bos, eos)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of messages (each with a `role` and a string `content`)."""
        from jinja2 import TemplateError
        from jinja2.exceptions import SecurityError
        checked = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ChatTemplateError(f"messages[{i}]: expected a dict with string 'role' and 'content', got {m!r:.80}")
            checked.append(dict(m))
        variables = dict(messages=checked, add_generation_prompt=add_generation_prompt,
                         bos_token=self.bos_token, eos_token=self.eos_token)
        pieces, size = [], 0
        try:
            with _StepBudget(MAX_STEPS):
                for piece in self.template.generate(variables):
                    size += len(piece)
                    if size > MAX_OUTPUT:
                        raise _Limit(f"the rendered prompt is over the bound of {MAX_OUTPUT} characters")
                    pieces.append(piece)
        except ChatTemplateError:
            raise
        except _Limit as e:
            raise ChatTemplateError(f"{KEY}: refused: {e}") from None
        except SecurityError as e:
            raise ChatTemplateError(f"{KEY}: refused by the sandbox: {_one_line(e)}") from None
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                ZeroDivisionError, OverflowError, RecursionError) as e:
            raise ChatTemplateError(f"{KEY}: rendering failed: {type(e).__name__}: {_one_line(e)}") from None
        return "".join(pieces)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
