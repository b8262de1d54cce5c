"""The op table: every op's inputs, attributes, shape/dtype rule and NumPy reference.

Each op is one `OpDef`. The reference function *is* the definition of the op: backends are
tested against it. Modules in this package register their ops on import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ember.errors import ShapeError
from ember.ir.types import TensorType

REQUIRED = object()
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "dtype", "values")


@dataclass(frozen=True)
class Attr:
    kind: str
    default: object = REQUIRED
    choices: tuple = ()

    def check(self, op: str, name: str, value):
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "ints": lambda v: isinstance(v, tuple) and all(isinstance(i, int) for i in v),
            "dtype": lambda v: isinstance(v, str),
            "values": lambda v: isinstance(v, tuple),
        }[self.kind](value)
        if not ok:
            raise ShapeError(f"{op}: attribute {name}={value!r} is not of kind {self.kind}")
        if self.choices and value not in self.choices:
            raise ShapeError(f"{op}: attribute {name}={value!r} is not one of {self.choices}")
        return float(value) if self.kind == "float" else value


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]                 # names of required operands
    infer: Callable[[list[TensorType], dict], TensorType]
    reference: Callable | None              # (list[np.ndarray], attrs) -> np.ndarray
    optional: tuple[str, ...] = ()          # names of trailing optional operands
    attrs: dict = field(default_factory=dict)
    category: str = "compute"               # compute | elementwise | view | source
    doc: str = ""
    # A raw op's reference sees operands as stored (quantized blocks, bf16 bits) and gets
    # (arrays, attrs, input_types, output_type); the others see float arrays and (arrays, attrs).
    raw: bool = False
    # Layouts (ember.ir.layouts) an operand accepts besides "row", by operand name; an operand
    # not named accepts only "row". The verifier holds every node to this.
    layouts: dict = field(default_factory=dict)

    @property
    def is_view(self) -> bool:
        return self.category == "view"

    def operand_name(self, index: int) -> str:
        names = self.inputs + self.optional
        return names[index] if index < len(names) else f"#{index}"

    def accepted_layouts(self, index: int) -> tuple[str, ...]:
        """The layouts operand `index` may be stored in."""
        return ("row",) + tuple(self.layouts.get(self.operand_name(index), ()))

    def layout_problem(self, input_types) -> str | None:
        """A message naming the first operand (and its layout) this op cannot read, or None."""
        for k, t in enumerate(input_types):
            if t.layout not in self.accepted_layouts(k):
                return (f"{self.name}: operand {self.operand_name(k)} is in layout {t.layout}, which "
                        f"{self.name} does not accept (accepts: {', '.join(self.accepted_layouts(k))})")
        return None

    def normalize_attrs(self, given: dict) -> dict:
        """Fill defaults, check kinds; unknown or missing attributes are errors naming the op."""
        unknown = set(given) - set(self.attrs)
        if unknown:
            raise ShapeError(f"{self.name}: unknown attribute(s) {sorted(unknown)}; "
                             f"expected {sorted(self.attrs) or 'none'}")
        out = {}
        for name, spec in self.attrs.items():
            if name in given and given[name] is not None:
                value = given[name]
                if spec.kind == "ints":
                    value = tuple(value)
                out[name] = spec.check(self.name, name, value)
            elif spec.default is REQUIRED:
                raise ShapeError(f"{self.name}: missing attribute {name!r}")
            else:
                out[name] = spec.default
        return out

    def check_arity(self, n: int):
        lo, hi = len(self.inputs), len(self.inputs) + len(self.optional)
        if not lo <= n <= hi:
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise ShapeError(f"{self.name}: takes {want} operands "
                             f"({', '.join(self.inputs + tuple(o + '?' for o in self.optional))}), got {n}")


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} registered twice")
    OPS[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise ShapeError(f"unknown op {name!r}") from None


def infer_type(op: str, input_types: list[TensorType], attrs: dict) -> tuple[TensorType, dict]:
    """Check arity and attributes, then apply the op's shape rule. Returns (type, full attrs)."""
    opdef = get_op(op)
    opdef.check_arity(len(input_types))
    why = opdef.layout_problem(input_types)
    if why:
        raise ShapeError(why)
    full = opdef.normalize_attrs(attrs)
    try:
        return opdef.infer(list(input_types), full), full
    except (ValueError, OverflowError) as e:
        # A rule that builds a TensorType from attributes (a negative dimension in a view's
        # shape, say) fails in the type's constructor: report it as the op's shape error, so
        # the parser can add file:line:col and the verifier the node.
        raise ShapeError(f"{op}: {e}") from None


from ember.ir.ops import sources, elementwise, linalg, norm, rope, attention, views, indexing, ssm, moe, delta_net  # noqa: E402,F401
