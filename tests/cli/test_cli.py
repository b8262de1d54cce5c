"""The `ember` command, run as a user would (a subprocess), and its error behaviour."""
import os
import subprocess
import sys

import pytest

from ember.ir.parser import parse_ir

GOOD = """graph g(%x: f32[4, 8]) {
  %w = const [2.0] : f32[1]
  %v = const [3.0] : f32[1]
  %0 = mul(%w, %v)
  %1 = mul(%x, %0)
  %2 = exp(%x)
  return %1
}
"""


def ember(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "g.ir"
    path.write_text(GOOD)
    return path


def test_help_lists_every_command():
    out = ember("--help")
    assert out.returncode == 0
    for command in ("demo", "ops", "ir", "passes"):
        assert command in out.stdout


def test_ir_prints_the_verified_graph(good_file):
    out = ember("ir", str(good_file))
    assert out.returncode == 0, out.stderr
    assert out.stdout == str(parse_ir(GOOD))


def test_passes_runs_the_pipeline_with_timing_and_dump(good_file, tmp_path):
    dump = tmp_path / "dump"
    out = ember("passes", str(good_file), "--pipeline", "cpu", "--timing", "--dump-dir", str(dump),
                "--print-after-all")
    assert out.returncode == 0, out.stderr
    result = parse_ir(out.stdout)
    assert [n.op for n in result.nodes] == ["input", "const", "mul"]
    assert "fold-constants" in out.stderr and "total" in out.stderr
    from ember.passes import pipeline_for
    n = len(pipeline_for("cpu").passes)
    assert out.stderr.count("IR after") == n
    assert sorted(p.name for p in dump.iterdir())[-1] == f"{n:02d}-dce.ir"


def test_passes_disable(good_file):
    out = ember("passes", str(good_file), "--disable", "fold-constants", "--disable", "dce")
    assert out.returncode == 0, out.stderr
    assert "exp" in out.stdout   # dce did not run


def test_unknown_pass_is_an_error_naming_it(good_file):
    out = ember("passes", str(good_file), "--disable", "no-such-pass")
    assert out.returncode == 1
    assert "unknown pass 'no-such-pass'" in out.stderr
    assert "Traceback" not in out.stderr


def test_malformed_ir_gives_file_line_column(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("graph g(%x: f32[4]) {\n  %0 = exp(%x\n  return %0\n}\n")
    out = ember("ir", str(bad))
    assert out.returncode == 1
    line = out.stderr.strip()
    assert line.startswith(f"ember: error: {bad}:3:3: expected ')'")
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_shape_mismatch_names_the_op(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("graph g(%x: f32[4, 8], %y: f32[3]) {\n  %0 = add(%x, %y)\n  return %0\n}\n")
    out = ember("ir", str(bad))
    assert out.returncode == 1
    assert "bad.ir:2:" in out.stderr and "add" in out.stderr and "broadcast" in out.stderr


def test_unknown_op_and_dtype(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("graph g(%x: f32[4]) {\n  %0 = frobnicate(%x)\n  return %0\n}\n")
    assert "unknown op 'frobnicate'" in ember("ir", str(bad)).stderr
    bad.write_text("graph g(%x: f33[4]) {\n  return %x\n}\n")
    out = ember("ir", str(bad))
    assert out.returncode == 1 and "f33" in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("graph g(%x: f32[4]) {\n  %0 = exp(%x\n}\n")
    out = ember("--debug", "ir", str(bad))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_missing_file_is_one_line():
    out = ember("ir", "/nonexistent/model.ir")
    assert out.returncode == 1 and "/nonexistent/model.ir" in out.stderr and "Traceback" not in out.stderr


def test_ops_lists_every_op_for_every_backend():
    from ember.ir.ops import OPS
    out = ember("ops")
    assert out.returncode == 0, out.stderr
    for op, opdef in OPS.items():
        if opdef.category != "source":
            assert any(line.split()[:1] == [op] for line in out.stdout.splitlines()), op
