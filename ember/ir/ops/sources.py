"""Source ops: graph inputs and constants. They have no operands and no reference function."""
from ember.ir.ops import Attr, OpDef, register

register(OpDef("input", (), infer=None, reference=None, category="source",
               attrs={"name": Attr("str")}, doc="A graph input, bound at run time."))
register(OpDef("const", (), infer=None, reference=None, category="source",
               attrs={"name": Attr("str", None), "value": Attr("values", None)},
               doc="A constant: named data held by the graph, or a small literal value."))
