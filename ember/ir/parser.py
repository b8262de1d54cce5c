"""IR text: the parser, the exact inverse of `print_ir` (the format is documented in printer.py).

    parse_ir(print_ir(g), constants=g.constants) == g      print_ir(parse_ir(text)) == text

Hand-written text may leave out the ` : type` after a node (it is inferred; when given it must
equal the inferred type), and may hold `#` comments and blank lines. Named constants take their
data from `constants`, or else deterministic random data drawn from (seed, constant name), so two
texts naming the same weight get the same data. Errors are ParseErrors with a 1-based line and
column. A small regex tokenizer and a recursive-descent parser; imports only the IR itself.
"""
from __future__ import annotations

import bisect
import re
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

import ember.ir.dtypes as dtypes
from ember.ir.builder import check_constant_data, literal_node, make_node
from ember.errors import IRError, ParseError
from ember.ir.graph import Graph
from ember.ir.layouts import from_row
from ember.ir.node import Node
from ember.ir.ops import OPS
from ember.ir.types import TensorType

_STRING = r'"(?:[^"\\]|\\.)*"'
_TOKEN = re.compile(rf"""
    (?P<newline>\n)
  | (?P<space>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<value>%(?:[A-Za-z0-9_.]+|{_STRING}))
  | (?P<string>{_STRING})
  | (?P<number>-inf(?![A-Za-z0-9_.])
              | -?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[()\[\]{{}},:=])
""", re.VERBOSE)

_WORDS = {"true": True, "false": False, "none": None, "inf": float("inf"), "nan": float("nan")}


@dataclass(frozen=True)
class Token:
    kind: str    # value | string | number | ident | punct | eof
    text: str
    offset: int

    def describe(self) -> str:
        return "end of input" if self.kind == "eof" else repr(self.text)


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1], flags=re.S)


class _Parser:
    def __init__(self, text: str, source: str):
        self.text, self.source = text, source
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.tokens = self._tokenize()
        self.pos = 0
        self.values: dict[str, Node] = {}
        self.const_types: dict[str, tuple[TensorType, Token]] = {}

    # ---- errors and tokens -------------------------------------------------------------------
    def error(self, message: str, at: Token | int) -> ParseError:
        offset = at.offset if isinstance(at, Token) else at
        line = bisect.bisect_right(self.line_starts, offset) - 1
        return ParseError(message, line + 1, offset - self.line_starts[line] + 1, self.source)

    def _tokenize(self) -> list[Token]:
        tokens, i, n = [], 0, len(self.text)
        while i < n:
            m = _TOKEN.match(self.text, i)
            if m is None:
                if self.text[i] == '"' or self.text.startswith('%"', i):
                    raise self.error("unterminated string", i)
                raise self.error(f"unexpected character {self.text[i]!r}", i)
            if m.lastgroup not in ("newline", "space", "comment"):
                tokens.append(Token(m.lastgroup, m.group(), i))
            i = m.end()
        tokens.append(Token("eof", "", n))
        return tokens

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        tok = self.peek()
        self.pos += tok.kind != "eof"
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok.kind in ("punct", "ident") and tok.text == text

    def expect(self, text: str, context: str) -> Token:
        if not self.at(text):
            raise self.error(f"expected '{text}' {context}, found {self.peek().describe()}", self.peek())
        return self.advance()

    def expect_kind(self, kind: str, what: str) -> Token:
        if self.peek().kind != kind:
            raise self.error(f"expected {what}, found {self.peek().describe()}", self.peek())
        return self.advance()

    # ---- grammar -----------------------------------------------------------------------------
    def graph(self) -> tuple[str, list[Node], list[Node]]:
        self.expect("graph", "at the start of the text")
        name = "main"
        if self.peek().kind == "ident":
            name = self.advance().text
        elif self.peek().kind == "string":
            name = _unquote(self.advance().text)
        self.expect("(", "before the graph's inputs")
        inputs = []
        while not self.at(")"):
            if inputs:
                self.expect(",", "between graph inputs")
            inputs.append(self.parameter())
        self.advance()
        self.expect("{", "to open the graph body")
        while not self.at("return"):
            if self.peek().kind != "value":
                raise self.error(f"expected a statement '%name = ...' or 'return', "
                                 f"found {self.peek().describe()}", self.peek())
            self.statement()
        self.advance()
        outputs = []
        if self.peek().kind == "value":
            outputs.append(self.use())
            while self.at(","):
                self.advance()
                outputs.append(self.use())
        self.expect("}", "after the returned values")
        self.expect_kind("eof", "end of input after the graph's closing '}'")
        return name, inputs, outputs

    def parameter(self) -> Node:
        tok = self.expect_kind("value", "a graph input '%name: type'")
        self.expect(":", f"and a type after input {tok.text}")
        node = Node("input", (), {"name": self.value_name(tok)}, self.tensor_type())
        self.define(tok, node)
        return node

    def statement(self):
        target = self.advance()
        self.expect("=", f"after {target.text}")
        op = self.expect_kind("ident", "an op name")
        node = self.constant() if op.text == "const" else self.operation(op)
        self.define(target, node)

    def declared_type(self, inferred: TensorType) -> TensorType:
        """The optional ` : type` after a node, which must equal the inferred one."""
        if not self.at(":"):
            return inferred
        self.advance()
        tok = self.peek()
        declared = self.tensor_type()
        if declared != inferred:
            raise self.error(f"declared type {declared} does not match inferred type {inferred}", tok)
        return declared

    def operation(self, op: Token) -> Node:
        if op.text not in OPS:
            raise self.error(f"unknown op {op.text!r}", op)
        if OPS[op.text].category == "source":
            raise self.error(f"{op.text} nodes cannot be built with {op.text}(...); inputs are "
                             f"declared in the graph's parameter list", op)
        self.expect("(", f"after op name {op.text!r}")
        operands, attrs = [], {}
        if not self.at(")"):
            while True:
                self.operand_or_attr(operands, attrs)
                if self.at(")"):
                    break
                if not self.at(","):
                    raise self.error(f"expected ')' after operands, found {self.peek().describe()}",
                                     self.peek())
                self.advance()
        self.advance()
        try:
            node = make_node(op.text, operands, attrs)
        except IRError as e:
            raise self.error(str(e), op) from None
        self.declared_type(node.type)
        return node

    def operand_or_attr(self, operands: list, attrs: dict):
        tok = self.peek()
        if tok.kind == "value":
            if attrs:
                raise self.error("operands must come before attributes", tok)
            operands.append(self.use())
        elif tok.kind == "ident" and self.peek(1).text == "=":
            self.pos += 2
            if tok.text in attrs:
                raise self.error(f"attribute {tok.text!r} given twice", tok)
            attrs[tok.text] = self.attr_value()
        else:
            raise self.error(f"expected an operand %name or an attribute name=value, "
                             f"found {tok.describe()}", tok)

    def constant(self) -> Node:
        tok = self.peek()
        if tok.kind == "string":
            self.advance()
            name = _unquote(tok.text)
            self.expect(":", f"and a type after constant {name!r}")
            node = Node("const", (), {"name": name}, self.tensor_type())
            first = self.const_types.setdefault(name, (node.type, tok))
            if first[0] != node.type:
                raise self.error(f"constant {name!r} declared as {first[0]} and as {node.type}", tok)
            return node
        if not self.at("["):
            raise self.error(f"expected a constant name \"...\" or a literal [...] after 'const', "
                             f"found {tok.describe()}", tok)
        values = _flatten(self.attr_value())
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
            raise self.error("literal values must be numbers", tok)
        type_tok, t = tok, TensorType(dtypes.f32, (len(values),))   # a bare literal is f32[n]
        if self.at(":"):
            self.advance()
            type_tok = self.peek()
            t = self.tensor_type()
        if t.dtype.is_quantized:
            raise self.error(f"a literal cannot have quantized type {t.dtype}", type_tok)
        if len(values) != t.numel:
            raise self.error(f"literal has {len(values)} values, type {t} holds {t.numel}", tok)
        if not t.dtype.is_float and not all(isinstance(v, int) for v in values):
            raise self.error(f"literal of type {t} must hold integers", tok)
        try:
            node = literal_node(values, t.dtype, t.shape)
        except (IRError, OverflowError) as e:   # OverflowError: an integer too big for the dtype
            raise self.error(str(e), tok) from None
        if node.type != t:
            raise self.error(f"declared type {t} does not match inferred type {node.type}", type_tok)
        return node

    def use(self) -> Node:
        tok = self.expect_kind("value", "a value %name")
        node = self.values.get(self.value_name(tok))
        if node is None:
            raise self.error(f"undefined value {tok.text}", tok)
        return node

    def define(self, tok: Token, node: Node):
        key = self.value_name(tok)
        if key in self.values:
            raise self.error(f"value {tok.text} defined twice", tok)
        self.values[key] = node

    @staticmethod
    def value_name(tok: Token) -> str:
        body = tok.text[1:]
        return _unquote(body) if body.startswith('"') else body

    def tensor_type(self) -> TensorType:
        tok = self.expect_kind("ident", "a type like f32[4, 8]")
        if tok.text not in dtypes.ALL:
            raise self.error(f"unknown dtype {tok.text!r}; known: {', '.join(dtypes.ALL)}", tok)
        shape = self.int_list("[", "]", "dimension")
        strides, layout = None, "row"
        if self.at("{") and self.peek(1).kind == "ident":
            # A storage layout other than row, in place of strides: q8_0[512, 512]{adreno_soa}
            self.advance()
            name = self.advance()
            if name.text == "row":
                raise self.error("the row layout is the default and is not written", name)
            layout = name.text
            self.expect("}", f"after layout {layout}")
        elif self.at("{"):
            strides = self.int_list("{", "}", "stride")
        try:
            return TensorType(dtypes.ALL[tok.text], shape, strides, layout)
        except ValueError as e:
            raise self.error(str(e), tok) from None

    def int_list(self, open_: str, close: str, what: str) -> tuple[int, ...]:
        self.expect(open_, f"to open the {what} list")
        items = []
        while not self.at(close):
            if items:
                self.expect(",", f"between {what}s")
            tok = self.peek()
            if tok.kind != "number" or not re.fullmatch(r"-?\d+", tok.text):
                raise self.error(f"expected an integer {what}, found {tok.describe()}", tok)
            self.advance()
            items.append(int(tok.text))
        self.advance()
        return tuple(items)

    def attr_value(self):
        tok = self.advance()
        if tok.kind == "number":
            if tok.text == "-inf":
                return float("-inf")
            return int(tok.text) if re.fullmatch(r"-?\d+", tok.text) else float(tok.text)
        if tok.kind == "string":
            return _unquote(tok.text)
        if tok.kind == "ident" and tok.text in _WORDS:
            return _WORDS[tok.text]
        if tok.kind == "punct" and tok.text == "[":
            items = []
            while not self.at("]"):
                if items:
                    self.expect(",", "between list items")
                items.append(self.attr_value())
            self.advance()
            return tuple(items)
        raise self.error(f"expected a value (number, string, true/false/none or [list]), "
                         f"found {tok.describe()}", tok)


def _flatten(value) -> list:
    if isinstance(value, tuple):
        return [v for item in value for v in _flatten(item)]
    return [value]


def random_constant(name: str, t: TensorType, seed: int = 0, index_bound: int = 8) -> np.ndarray:
    """Deterministic data for a constant: from (seed, crc32 of its name), stored as t says.

    Floats are N(0, 1) (quantized: quantized normals); integers lie in [0, index_bound). A
    type in another layout than row holds the same values as its row type, packed."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    if t.dtype.is_float or t.dtype.is_quantized:
        values = np.asarray(rng.standard_normal(t.shape), dtype=np.float32)
        return from_row(np.asarray(dtypes.from_float32(values, t.dtype)), t)
    return np.asarray(rng.integers(0, max(index_bound, 1), size=t.shape), dtype=t.dtype.numpy)


def _index_bounds(nodes) -> dict[Node, int]:
    """For integer constants read as row indices, the number of rows they may index."""
    bounds: dict[Node, int] = {}
    for user in nodes:
        if user.op in ("get_rows", "set_rows"):
            idx = user.inputs[1]
            bounds[idx] = min(bounds.get(idx, 8), user.inputs[0].shape[0])
    return bounds


def parse_ir(text: str, source: str = "<ir>", constants: Mapping[str, np.ndarray] | None = None,
             seed: int = 0) -> Graph:
    """The graph written in `text` (see printer.py for the format)."""
    parser = _Parser(text, source)
    name, inputs, outputs = parser.graph()
    bounds = _index_bounds(parser.values.values())
    data = {}
    for node in parser.values.values():
        if node.op != "const" or node.name is None or node.name in data:
            continue
        if constants is not None and node.name in constants:
            given = np.asarray(constants[node.name])
            try:
                check_constant_data(node.name, node.type, given)
            except IRError as e:
                raise parser.error(str(e), parser.const_types[node.name][1]) from None
            data[node.name] = given
        else:
            data[node.name] = random_constant(node.name, node.type, seed, bounds.get(node, 8))
    # The declared order is kept, and so are nodes no output uses (until dead-code elimination).
    return Graph(inputs, outputs, data, name, nodes=parser.values.values())
