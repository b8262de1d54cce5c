"""The one node type of the IR: immutable and hash-consed.

Building the same (op, inputs, attrs, type) twice gives the same object, so structural
equality of whole subgraphs is `is`, hashing is O(1), and common-subexpression elimination
is mostly free. Nodes never change; passes build new ones.
"""
from __future__ import annotations

import itertools
import math
import weakref

from ember.ir.types import TensorType

_table: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()
_serial = itertools.count(1)


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, float) and value == 0.0:
        return 0.0  # -0.0 and 0.0 hash alike but print differently; keep one
    if isinstance(value, float) and value != value:
        return math.nan  # NaN != NaN: only one shared NaN object lets equal nodes be found again
    return value


class Node:
    """One value in a graph: an op applied to input nodes, with attributes and a result type.

    `attrs` is a tuple of (name, value) pairs sorted by name; values are ints, floats, strs,
    bools, None or tuples of those. Source nodes are op "input" (attr name) and op "const"
    (attr name, or attr value for a small literal).
    """

    __slots__ = ("op", "inputs", "attrs", "type", "serial", "_hash", "__weakref__")

    def __new__(cls, op: str, inputs: tuple["Node", ...], attrs, type: TensorType):
        inputs = tuple(inputs)
        if isinstance(attrs, dict):
            attrs = attrs.items()
        attrs = tuple(sorted((str(k), _freeze(v)) for k, v in attrs))
        key = (op, tuple(id(i) for i in inputs), attrs, type)
        node = _table.get(key)
        if node is not None:
            return node
        node = object.__new__(cls)
        node.op = op
        node.inputs = inputs
        node.attrs = attrs
        node.type = type
        node.serial = next(_serial)  # creation order: a stable tie-break, never compared across runs
        node._hash = hash(key)
        _table[key] = node
        return node

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other

    def __reduce__(self):
        return (Node, (self.op, self.inputs, self.attrs, self.type))

    def attr(self, name: str, default=None):
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @property
    def attr_dict(self) -> dict:
        return dict(self.attrs)

    @property
    def name(self) -> str | None:
        """The name of an input or named constant."""
        return self.attr("name")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self):
        return self.type.dtype

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<Node {self.op}{label} {self.type}>"
