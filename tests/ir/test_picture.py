"""Pictures of graphs (ember.ir.picture): the SVG parses and names every drawn node; views are
edges, fused nodes are marked; the CLI draws an IR file and the graph after each pass."""
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from ember.ir import GraphBuilder
from ember.ir.examples import example_node
from ember.ir.graph import Graph
from ember.ir.ops import OPS
from ember.ir.ops.views import storage_layout
from ember.ir.picture import PictureError, drawing_graph, render_svg, to_dot
from ember.ir.printer import value_names
from ember.models.demo_block import BlockConfig, transformer_block
from ember.passes import pipeline_for

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is missing (apt-get install graphviz)")


def svg_text(path) -> str:
    """The text of an SVG file, after checking it parses as XML with an <svg> root."""
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext())


def example_graph(op: str) -> Graph:
    """The op table's example of op as a graph (named constants get zero data)."""
    node = example_node(op)
    inputs, constants, stack, seen = [], {}, [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack += n.inputs
        if n.op == "input":
            inputs.append(n)
        elif n.op == "const" and n.attr("value") is None:
            shape, _ = storage_layout(n.type)
            constants[n.name] = np.zeros(shape, n.dtype.numpy)
    return Graph(sorted(inputs, key=lambda n: n.name), [node], constants, name=f"example_{op}")


def drawn_names(graph: Graph) -> list[str]:
    names = value_names(graph)
    return [names[n] for n in graph.nodes if not OPS[n.op].is_view]


@needs_dot
@pytest.mark.parametrize("op", [op for op in sorted(OPS) if op not in ("input", "const")])
def test_every_example_is_drawn_with_every_node(op, tmp_path):
    graph = example_graph(op)
    text = svg_text(render_svg(graph, tmp_path / "g.svg"))
    for name in drawn_names(graph):
        assert f"%{name}" in text


@needs_dot
def test_the_optimized_block_names_every_node_and_marks_fusion(tmp_path):
    graph = pipeline_for("cpu")(transformer_block(BlockConfig()))
    text = svg_text(render_svg(graph, tmp_path / "block.svg"))
    for name in drawn_names(graph):
        assert f"%{name}" in text
    drawn = drawing_graph(graph)
    fused = {drawn.nodes[v]["op"] for v in drawn.nodes if drawn.nodes[v]["fused"]}
    assert {"rms_norm_mul", "swiglu", "const"} <= fused   # fuse-elementwise and fuse-qkv's weight
    # views move no data: none is a vertex; the reshapes before rope are edge labels
    assert not any(OPS[drawn.nodes[v]["op"]].is_view for v in drawn.nodes)
    assert any("reshape" in d["views"] for _, _, d in drawn.edges(data=True))


def test_a_view_chain_is_one_labelled_edge():
    b = GraphBuilder("views")
    x = b.input("x", "f32", (4, 6))
    y = b.exp(b.permute(b.reshape(x, (2, 2, 6)), (1, 0, 2)))
    graph = b.build(y)
    dot = to_dot(graph)
    assert 'label="reshape > permute" style=dashed' in dot
    assert [data["op"] for _, data in drawing_graph(graph).nodes(data=True)] == ["input", "exp"]


def test_no_dot_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(PictureError, match="apt-get install graphviz"):
        render_svg(transformer_block(BlockConfig()), tmp_path / "x.svg")
    assert not (tmp_path / "x.svg").exists()


def ember(*args):
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@needs_dot
def test_cli_draws_a_file_and_each_pass(tmp_path):
    from ember.ir.printer import print_ir
    source = tmp_path / "block.ir"
    source.write_text(print_ir(transformer_block(BlockConfig())))
    out = ember("ir", source, "--svg", tmp_path / "block.svg")
    assert out.returncode == 0, out.stderr
    assert "%attn_norm" in svg_text(tmp_path / "block.svg")
    dump = tmp_path / "dump"
    out = ember("passes", source, "--dump-dir", dump, "--svg")
    assert out.returncode == 0, out.stderr
    irs = sorted(p.stem for p in dump.glob("*.ir"))
    assert irs and irs == sorted(p.stem for p in dump.glob("*.svg"))
    for svg in dump.glob("*.svg"):
        svg_text(svg)
    out = ember("passes", source, "--svg")
    assert out.returncode == 1 and "give --dump-dir DIR too" in out.stderr
