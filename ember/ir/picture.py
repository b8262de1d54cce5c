"""Pictures of graphs for pass writers: a graph drawn as SVG by Graphviz's `dot`.

networkx holds the drawing's graph: computing nodes become boxes coloured by the kind of op
(matmul, attention, norm, element-wise, indexing, state-space, copy), inputs and constants
ovals, and a chain of views (reshape, permute, slices) is contracted into one edge from the
value it views to each user, labelled with the views' ops, since a view moves no data. Nodes
made by fusion passes (fused ops, concatenated weights) get a double border. Ranks come from
networkx's topological generations, so a graph reads top to bottom in evaluation order.

Imports the IR, networkx (lazily) and the standard library; `dot` (Debian package graphviz)
is needed only to write the SVG.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ember.errors import IRError
from ember.files import atomic_write_bytes
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.ir.ops import OPS
from ember.ir.printer import value_names

# Fill colour of each kind of op (the legend of the picture).
KIND_COLOURS = {
    "matmul": "#f4a582", "attention": "#d6604d", "norm": "#92c5de", "elementwise": "#d1e5f0",
    "indexing": "#b8e186", "state": "#c2a5cf", "copy": "#f7f7f7", "other": "#fddbc7",
    "source": "#ffffff",
}
KIND_OF_OP = {
    "mul_mat": "matmul", "attention": "attention", "softmax": "attention", "rope": "attention",
    "rms_norm": "norm", "rms_norm_mul": "norm", "layer_norm": "norm", "sum_rows": "norm",
    "argmax": "norm", "get_rows": "indexing", "set_rows": "indexing", "ssm_conv": "state",
    "ssm_scan": "state", "cont": "copy", "cast": "copy", "concat": "copy",
}
# Ops only the fusion passes make (fuse-elementwise); fuse-qkv's mark is a concatenated weight.
FUSED_OPS = frozenset({"rms_norm_mul", "swiglu", "geglu"})


class PictureError(IRError):
    """The picture cannot be drawn here (no Graphviz) or dot failed on it."""


def op_kind(node: Node) -> str:
    if node.op in ("input", "const"):
        return "source"
    if node.op in KIND_OF_OP:
        return KIND_OF_OP[node.op]
    return "elementwise" if OPS[node.op].category == "elementwise" else "other"


def is_fused(node: Node) -> bool:
    return node.op in FUSED_OPS or (node.op == "const" and "+" in (node.name or ""))


def drawing_graph(graph: Graph):
    """The networkx MultiDiGraph that is drawn: one vertex per non-view value (keyed by its
    printed name), edges operand -> user, view chains contracted into labelled edges."""
    import networkx as nx
    names = value_names(graph)
    drawn = nx.MultiDiGraph(name=graph.name)
    for node in graph.nodes:
        if OPS[node.op].is_view:
            continue
        drawn.add_node(names[node], op=node.op, kind=op_kind(node), fused=is_fused(node),
                       type=str(node.type), output=node in graph.outputs)
    for node in graph.nodes:
        if OPS[node.op].is_view:
            continue
        for index, operand in enumerate(node.inputs):
            source, views = _through_views(operand)
            drawn.add_edge(names[source], names[node], index=index, views=views)
    return drawn


def _through_views(node: Node) -> tuple[Node, list[str]]:
    """The value a chain of views reads, and the chain's ops from that value outwards."""
    views = []
    while OPS[node.op].is_view:
        views.append(node.op)
        node = node.inputs[0]
    return node, views[::-1]


def to_dot(graph: Graph) -> str:
    """The Graphviz text of the picture."""
    import networkx as nx
    drawn = drawing_graph(graph)
    lines = [f"digraph {_quote(graph.name)} {{", "  rankdir=TB; node [fontname=Helvetica fontsize=10];",
             "  edge [fontname=Helvetica fontsize=8];"]
    ids = {name: f"n{i}" for i, name in enumerate(drawn.nodes)}
    for rank in nx.topological_generations(drawn):
        members = []
        for name in rank:
            data = drawn.nodes[name]
            shape = "ellipse" if data["kind"] == "source" else "box"
            border = ' peripheries=2 penwidth=2' if data["fused"] else ""
            bold = " style=\"filled,bold\"" if data["output"] else " style=filled"
            label = f"%{name}\\n{data['op']} : {data['type']}"
            lines.append(f"  {ids[name]} [label={_quote(label)} shape={shape}{bold}"
                         f" fillcolor=\"{KIND_COLOURS[data['kind']]}\"{border}];")
            members.append(ids[name])
        lines.append(f"  {{ rank=same; {'; '.join(members)}; }}")
    for source, user, data in drawn.edges(data=True):
        label = " > ".join(data["views"])
        attrs = f" [label={_quote(label)} style=dashed]" if label else ""
        lines.append(f"  {ids[source]} -> {ids[user]}{attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A Graphviz string: double quotes escaped; a label's line breaks are written as \n."""
    return '"' + str(text).replace('"', '\\"') + '"'


def render_svg(graph: Graph, path: Path | str) -> Path:
    """Draw graph into an SVG file (written whole or not at all)."""
    dot = shutil.which("dot")
    if dot is None:
        raise PictureError("drawing a graph needs Graphviz's dot (Debian/Ubuntu: `apt-get install graphviz`)")
    result = subprocess.run([dot, "-Tsvg"], input=to_dot(graph).encode(), capture_output=True, timeout=120)
    if result.returncode != 0:
        raise PictureError(f"dot failed on graph {graph.name!r}: {result.stderr.decode(errors='replace').strip()}")
    atomic_write_bytes(path, result.stdout)
    return Path(path)
