import io
from dataclasses import dataclass
from typing import ClassVar

import pytest

from ember.ir.builder import make_node
from ember.errors import VerifyError
from ember.ir.graph import Graph
from ember.ir.node import Node
from ember.passes import DumpIR, Pass, PassContext, PrintAfter, Timing, pipeline_for
from ember.passes.pipelines import TARGETS
from ember.testing import parse_ir

TEXT = """
graph g(%x: f32[4, 8]) {
  %w = const [2.0] : f32[1]
  %v = const [3.0] : f32[1]
  %0 = mul(%w, %v)
  %1 = mul(%x, %0)
  %2 = exp(%x)
  return %1
}
"""


def test_pipeline_runs_every_pass_and_instruments_see_each():
    timing = Timing()
    out = io.StringIO()
    with PassContext(instruments=[timing, PrintAfter(out)], verify=True):
        result = pipeline_for("cpu")(parse_ir(TEXT))
    names = [p.name for p in pipeline_for("cpu").passes]
    assert [r[0] for r in timing.records] == names
    assert [r[2] for r in timing.records][:3] == [True, False, True]
    assert out.getvalue().count("// ----- IR after") == len(names)
    assert [n.op for n in result.nodes] == ["input", "const", "mul"]
    assert "total" in timing.report()


def test_print_after_only_named_passes():
    out = io.StringIO()
    with PassContext(instruments=[PrintAfter(out, ["dce"])]):
        pipeline_for("cpu")(parse_ir(TEXT))
    assert out.getvalue().count("// ----- IR after dce") == [p.name for p in pipeline_for("cpu").passes].count("dce")
    assert "IR after cse" not in out.getvalue()


def test_dump_dir_writes_one_file_per_pass(tmp_path):
    with PassContext(instruments=[DumpIR(tmp_path)]):
        result = pipeline_for("cpu")(parse_ir(TEXT))
    files = sorted(p.name for p in tmp_path.iterdir())
    names = [p.name for p in pipeline_for("cpu").passes]
    assert files == ["00-input.ir"] + [f"{i + 1:02d}-{n}.ir" for i, n in enumerate(names)]
    assert parse_ir((tmp_path / files[-1]).read_text()) == result
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_disabled_passes_do_not_run():
    timing = Timing()
    with PassContext(disabled={"fold-constants", "dce"}, instruments=[timing]):
        pipeline_for("cpu")(parse_ir(TEXT))
    assert "dce" not in [r[0] for r in timing.records]
    assert [r[0] for r in timing.records][0] == "cse"


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_has_a_pipeline(target):
    assert pipeline_for(target).passes


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        pipeline_for("tpu")


@dataclass(frozen=True)
class BreakTypes(Pass):
    """A deliberately wrong pass: it gives a node a type its op cannot produce."""
    name: ClassVar[str] = "break-types"

    def transform(self, graph, ctx):
        out = graph.outputs[0]
        bad = Node(out.op, out.inputs, out.attrs, out.type.with_shape((1,) + out.shape))
        return Graph(graph.inputs, [bad], graph.constants, graph.name)


def test_verifier_after_each_pass_catches_a_broken_pass():
    g = parse_ir("graph g(%x: f32[4, 8]) {\n  %0 = exp(%x)\n  return %0\n}\n")
    BreakTypes()(g)  # without verification the broken graph goes through
    with PassContext(verify=True), pytest.raises(VerifyError, match="exp"):
        BreakTypes()(g)


def test_make_node_is_what_passes_build_with():
    x = parse_ir("graph g(%x: f32[4, 8]) {\n  return %x\n}\n").inputs[0]
    assert make_node("exp", (x,)) is make_node("exp", (x,))
