"""Passes, pass contexts and instruments.

A pass is a small frozen dataclass: a `name` and its options as fields; calling it on a graph
returns a new graph (or the same object when nothing changed). The `PassContext` carries what
is not the pass's own business: config, disabled passes, whether to verify after each pass, and
instruments (timing, print-after, dump to a folder). Core code reads no environment variables.
"""
from __future__ import annotations

import abc
import contextvars
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, TextIO

from ember.ir.graph import Graph

_current: contextvars.ContextVar["PassContext | None"] = contextvars.ContextVar("ember_pass_context", default=None)


class Instrument:
    """Hooks around each pass a context runs. Subclass and override what you need."""

    def before_pass(self, pass_: "Pass", graph: Graph) -> None:
        pass

    def after_pass(self, pass_: "Pass", before: Graph, after: Graph, seconds: float) -> None:
        pass


@dataclass
class PassContext:
    opt_level: int = 2
    disabled: frozenset[str] = frozenset()
    config: dict = field(default_factory=dict)
    instruments: list[Instrument] = field(default_factory=list)
    verify: bool = False          # run the verifier after every pass (always on in tests)

    def __post_init__(self):
        self.disabled = frozenset(self.disabled)
        self._token = None

    @staticmethod
    def current() -> "PassContext":
        return _current.get() or PassContext()

    def __enter__(self) -> "PassContext":
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _current.reset(self._token)

    def is_enabled(self, pass_: "Pass") -> bool:
        return pass_.name not in self.disabled and pass_.opt_level <= self.opt_level

    def run(self, pass_: "Pass", graph: Graph) -> Graph:
        """Run one pass under this context: instruments around it, the verifier after it."""
        if not self.is_enabled(pass_):
            return graph
        for inst in self.instruments:
            inst.before_pass(pass_, graph)
        start = time.perf_counter()
        after = pass_.transform(graph, self)
        seconds = time.perf_counter() - start
        if self.verify:
            from ember.ir.verifier import verify
            verify(after)
        for inst in self.instruments:
            inst.after_pass(pass_, graph, after, seconds)
        return after


@dataclass(frozen=True)
class Pass(abc.ABC):
    name: ClassVar[str] = "pass"
    opt_level: ClassVar[int] = 0   # the lowest context opt_level at which the pass runs

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        return (ctx or PassContext.current()).run(self, graph)

    @abc.abstractmethod
    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        """The rewrite itself; return `graph` unchanged (the same object) when nothing applies."""


@dataclass(frozen=True)
class Phase:
    """A named group of passes in a pipeline (dumps and timings are grouped by phase)."""
    name: str
    passes: tuple[Pass, ...]


@dataclass(frozen=True)
class Pipeline(Pass):
    """Phases run in order; each pass goes through the context, so it can be disabled."""
    name: ClassVar[str] = "pipeline"
    phases: tuple[Phase, ...] = ()
    label: str = "pipeline"

    @property
    def passes(self) -> tuple[Pass, ...]:
        return tuple(p for phase in self.phases for p in phase.passes)

    def transform(self, graph: Graph, ctx: PassContext) -> Graph:
        for p in self.passes:
            graph = ctx.run(p, graph)
        return graph

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        # A pipeline is not itself instrumented or disabled: its passes are.
        return self.transform(graph, ctx or PassContext.current())


# ---- instruments ------------------------------------------------------------------------------
class Timing(Instrument):
    """Seconds spent in each pass, in the order they ran."""

    def __init__(self):
        self.records: list[tuple[str, float, bool]] = []

    def after_pass(self, pass_, before, after, seconds):
        self.records.append((pass_.name, seconds, after is not before))

    def report(self) -> str:
        lines = [f"{'pass':<24} {'ms':>9}  changed"]
        for name, seconds, changed in self.records:
            lines.append(f"{name:<24} {seconds * 1e3:>9.3f}  {'yes' if changed else 'no'}")
        lines.append(f"{'total':<24} {sum(r[1] for r in self.records) * 1e3:>9.3f}")
        return "\n".join(lines)


class PrintAfter(Instrument):
    """Prints the IR after the named passes (all passes when `names` is None)."""

    def __init__(self, stream: TextIO, names: Iterable[str] | None = None):
        self.stream = stream
        self.names = None if names is None else frozenset(names)

    def after_pass(self, pass_, before, after, seconds):
        if self.names is None or pass_.name in self.names:
            from ember.ir.printer import print_ir
            self.stream.write(f"// ----- IR after {pass_.name} -----\n{print_ir(after)}")


class DumpIR(Instrument):
    """Writes `<NN>-<pass>.ir` into a folder after each pass (and `00-input.ir` first); with
    svg, also the picture of each (`<NN>-<pass>.svg`, ember.ir.picture)."""

    def __init__(self, folder: Path | str, svg: bool = False):
        self.folder = Path(folder)
        self.svg = svg
        self.count = 0

    def _write(self, label: str, graph: Graph):
        from ember.ir.printer import print_ir
        from ember.files import atomic_write_text
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"{self.count:02d}-{label}"
        atomic_write_text(stem.with_suffix(".ir"), print_ir(graph))
        if self.svg:
            from ember.ir.picture import render_svg
            render_svg(graph, stem.with_suffix(".svg"))
        self.count += 1

    def before_pass(self, pass_, graph):
        if self.count == 0:
            self._write("input", graph)

    def after_pass(self, pass_, before, after, seconds):
        self._write(pass_.name, after)
