"""IR text: the printer. `parse_ir(print_ir(g)) == g` for every graph (see parser.py).

    graph block(%x: f32[5, 64], %pos: i32[5]) {
      %wq = const "wq" : q8_0[192, 64]
      %0 = rms_norm(%x, eps=1e-06) : f32[5, 64]
      %1 = mul_mat(%0, %wq) : f32[5, 192]
      %2 = view(%1, offset=256, shape=[5, 4, 16], strides=[768, 64, 4]) : f32[5, 4, 16]{768, 64, 4}
      %3 = const [0.5, 2.0] : f32[2]
      return %1, %2
    }

Inputs and named constants print under their own names (constants made unique; an input
name that is no identifier prints quoted, `%"a-b"`); other values are numbered in order. Types
print after every node so the text can be read alone; non-contiguous types show their byte
strides in braces; a storage layout other than row, always contiguous, is named in the braces
instead (`q8_0[512, 512]{adreno_soa}`, see ember.ir.layouts).
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ember.ir.node import Node

if TYPE_CHECKING:   # annotations only: graph.py prints itself through this module
    from ember.ir.graph import Graph

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")


def format_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def format_value(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return format_scalar(v)


def value_names(graph: Graph) -> dict[Node, str]:
    names: dict[Node, str] = {}
    taken: set[str] = set()

    def claim(base: str) -> str:
        name, k = base, 1
        while name in taken or name.isdigit():
            name = f"{base}.{k}"
            k += 1
        taken.add(name)
        return name

    for node in graph.inputs:
        # An input's value name is its name, so one that is no identifier prints quoted.
        if _IDENT.match(node.name):
            names[node] = claim(node.name)
        else:
            names[node] = format_scalar(node.name)
            taken.add(node.name)
    counter = 0
    for node in graph.nodes:
        if node in names:
            continue
        if node.op == "const" and node.name is not None and _IDENT.match(node.name):
            names[node] = claim(node.name)
        else:
            while str(counter) in taken:
                counter += 1
            names[node] = str(counter)
            taken.add(names[node])
            counter += 1
    return names


def print_ir(graph: Graph) -> str:
    names = value_names(graph)
    params = ", ".join(f"%{names[n]}: {n.type}" for n in graph.inputs)
    title = graph.name if _IDENT.match(graph.name) else format_scalar(graph.name)
    lines = [f"graph {title}({params}) {{"]
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.op == "const":
            value = node.attr("value")
            body = f"const {format_value(value)}" if value is not None else f"const {format_scalar(node.name)}"
        else:
            args = [f"%{names[i]}" for i in node.inputs]
            args += [f"{k}={format_value(v)}" for k, v in node.attrs]
            body = f"{node.op}({', '.join(args)})"
        lines.append(f"  %{names[node]} = {body} : {node.type}")
    lines.append("  return " + ", ".join(f"%{names[o]}" for o in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
