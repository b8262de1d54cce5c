"""The model commands of `ember` (tokenize, logits, perplexity, bench, compile, run), run as a
user would, on a tiny random-weight GGUF."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ember.artifact import FORMAT_VERSION
from ember.models.tokenizer import Tokenizer

from tiny_gguf import Spec, write_tiny_gguf

TEXT = Path(__file__).resolve().parents[1] / "data" / "ppl_text.txt"


def ember(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ember.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "gemma3-q8_0.gguf", Spec("gemma3", "q8_0"))


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "tiny.ember"
    result = ember("compile", tiny, "--target", "cpu", "-o", out, "-c", 64, "--prompt-tokens", 8, "-t", 1)
    assert result.returncode == 0, result.stderr
    return out


def test_help_lists_the_model_commands():
    out = ember("--help")
    for command in ("tokenize", "logits", "perplexity", "bench", "compile", "run"):
        assert command in out.stdout


def test_tokenize_prints_the_ids_with_bos(tiny):
    out = ember("tokenize", tiny, "-p", "hello world")
    assert out.returncode == 0, out.stderr
    tokenizer = Tokenizer.from_gguf(tiny)
    expected = tokenizer.encode("hello world", add_special=True, parse_special=True)
    assert expected[0] == tokenizer.bos_id
    assert out.stdout == "[" + ", ".join(map(str, expected)) + "]\n"


def test_logits_writes_every_position_atomically(tiny, tmp_path):
    target = tmp_path / "logits.npy"
    target.write_bytes(b"old contents")
    out = ember("logits", tiny, "-p", "hello world", "-o", target, "-c", 64, "-t", 1)
    assert out.returncode == 0, out.stderr
    n_tokens = len(Tokenizer.from_gguf(tiny).encode("hello world", parse_special=True))
    logits = np.load(target)
    assert logits.dtype == np.float32 and logits.shape == (n_tokens, 320)
    assert np.isfinite(logits).all()
    assert [p.name for p in tmp_path.iterdir()] == ["logits.npy"]      # no temporary left behind


def test_logits_failure_leaves_the_old_file(tiny, tmp_path):
    target = tmp_path / "logits.npy"
    target.write_bytes(b"old contents")
    out = ember("logits", tiny, "-p", "x" * 200, "-o", target, "-c", 16, "-t", 1)
    assert out.returncode == 1 and "context full" in out.stderr
    assert target.read_bytes() == b"old contents"


def test_perplexity_progress_and_final_line(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT.read_text()[:400])
    out = ember("perplexity", tiny, "-f", text, "-c", 64, "-t", 1)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}", out.stdout.splitlines()[-1])
    chunks = re.findall(r"^\[(\d+)/(\d+)\] ", out.stderr, re.M)
    assert chunks and chunks[-1][0] == chunks[-1][1] and len(chunks) == int(chunks[0][1])


def test_perplexity_chunks_limits_the_chunks(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT.read_text()[:400])
    out = ember("perplexity", tiny, "-f", text, "-c", 64, "-t", 1, "--chunks", 2)
    assert out.returncode == 0, out.stderr
    assert re.findall(r"^\[(\d+)/(\d+)\] ", out.stderr, re.M) == [("1", "2"), ("2", "2")]


def test_perplexity_needs_two_contexts_of_text(tiny, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("A short text.")
    out = ember("perplexity", tiny, "-f", text, "-c", 64, "-t", 1)
    assert out.returncode == 1
    assert "you need at least 128 tokens" in out.stderr and "Traceback" not in out.stderr


def test_bench_prints_a_row_per_test_and_the_verbose_statistics(tiny):
    out = ember("bench", tiny, "-p", 16, "-n", 4, "-r", 2, "-t", 1, "--verbose", "-ctk", "q8_0", "-ctv", "turbo4")
    assert out.returncode == 0, out.stderr
    # 2 layers of one 128-value head: K q8_0 4 x 34 bytes, V turbo4 66 bytes
    assert re.search(r"KV cache K q8_0, V turbo4: 404 bytes per token \(2 layers\), [\d.]+ MiB for a "
                     r"context of \d+", out.stdout)
    rows = [line for line in out.stdout.splitlines() if line.startswith("| gemma3")]
    assert [row.split("|")[4].strip() for row in rows] == ["pp16", "tg4"]
    for row in rows:
        assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", row.split("|")[5].strip())
    assert re.search(r"plan cache: \d+ hits .* \d+ misses, \d+ evictions", out.stdout)
    assert re.search(r"tg4: host time per decode step \(outside the kernels\): \d+ us", out.stdout)


def test_bench_at_a_depth_names_it_and_checks_the_context(tiny):
    out = ember("bench", tiny, "-p", 8, "-n", 4, "-d", 40, "-r", 2, "-t", 1, "-c", 64, "-q")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| gemma3")]
    assert [row.split("|")[4].strip() for row in rows] == ["pp8 @ d40", "tg4 @ d40"]
    too_deep = ember("bench", tiny, "-p", 8, "-n", 4, "-d", 60, "-t", 1, "-c", 64, "-q")
    assert too_deep.returncode != 0
    assert too_deep.stderr.strip().splitlines()[-1] == "ember: error: -d plus -p/-n exceed the context of 64 tokens; raise -c"


def test_bench_shows_progress_on_stderr_unless_quiet(tiny):
    out = ember("bench", tiny, "-p", 16, "-n", 4, "-r", 2, "-t", 1)
    assert out.returncode == 0, out.stderr
    for line in ("pp16: warm-up (compiles)", "pp16: repetition 2/2", "tg4: repetition 1/2"):
        assert line in out.stderr
    assert re.search(r"ember: compiling step graph \S+ \(1 so far\)", out.stderr)
    quiet = ember("bench", tiny, "-p", 16, "-n", 4, "-r", 2, "-t", 1, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "repetition" not in quiet.stderr and "compiling step graph" not in quiet.stderr
    assert "| gemma3" in quiet.stdout


def test_compile_then_run_without_the_c_compiler(built, tiny):
    files = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert "manifest.json" in files and "kernels.so" in files
    for step in ("t1_kv64_o1", "t8_kv64_o1"):
        assert {f"steps/{step}.ir", f"steps/{step}.c", f"steps/{step}.so"} <= set(files)
    # PATH holds no C compiler: a run must not need one
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    assert shutil.which("cc", path=env["PATH"]) is None and shutil.which("gcc", path=env["PATH"]) is None
    out = ember("run", built, "-p", "hello world", "-n", 6, "--temp", 0, "--ignore-eos", "-t", 1, env=env)
    assert out.returncode == 0, out.stderr
    assert "compile 0.0 s (0 graphs)" in out.stderr and "generated 6 tokens" in out.stderr
    # the same greedy text as `ember generate` (whose prompt runs as one batch, the run's as
    # prompt steps and single tokens; the tiny model's margins are wide)
    reference = ember("generate", tiny, "-p", "hello world", "-n", 6, "--temp", 0, "--ignore-eos",
                      "-c", 64, "-t", 1)
    assert reference.returncode == 0, reference.stderr
    assert out.stdout == reference.stdout


def damage_corrupt(folder: Path) -> str:
    path = folder / "steps" / "t8_kv64_o1.so"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    return f"{path}: checksum mismatch: the artifact is corrupt"


def damage_missing(folder: Path) -> str:
    path = folder / "constants" / "000.npy"
    path.unlink()
    return f"{path}: missing: the artifact is incomplete"


def damage_version(folder: Path) -> str:
    """An artifact of the version before (version 1 kept recurrent state as per-layer inputs)."""
    path = folder / "manifest.json"
    old = FORMAT_VERSION - 1
    path.write_text(path.read_text().replace(f'"format_version": {FORMAT_VERSION},', f'"format_version": {old},'))
    return f"{path}: artifact format version {old}; this ember reads version {FORMAT_VERSION}: compile the model again"


@pytest.mark.parametrize("damage", [damage_corrupt, damage_missing, damage_version],
                         ids=["corrupt", "missing", "version"])
def test_run_refuses_a_damaged_artifact_naming_the_file(built, tmp_path, damage):
    folder = Path(shutil.copytree(built, tmp_path / "copy"))
    message = damage(folder)
    out = ember("run", folder, "-p", "hello", "-n", 2)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"ember: error: {message}"]
    assert out.stdout == ""


def test_run_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    out = ember("run", tmp_path, "-p", "hello", "-n", 2)
    assert out.returncode == 1
    assert f"{tmp_path / 'manifest.json'}: missing: {tmp_path} is not an ember artifact" in out.stderr


def test_run_checks_the_common_options_against_the_artifact(built):
    ok = ember("run", built, "-p", "hello", "-n", 2, "--temp", 0, "--backend", "cpu", "-c", 64, "-t", 1, "-q")
    assert ok.returncode == 0, ok.stderr
    other = ember("run", built, "-p", "hello", "-n", 2, "--backend", "vulkan")
    assert other.returncode == 1 and "the artifact runs on cpu, not vulkan" in other.stderr
    context = ember("run", built, "-p", "hello", "-n", 2, "-c", 128)
    assert context.returncode == 1 and "the artifact's context is 64 tokens" in context.stderr


# ---- KV cache types ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """Heads of 64: whole q8_0 / q4_0 blocks, not whole turbo blocks."""
    return write_tiny_gguf(tmp_path_factory.mktemp("llama") / "llama-f32.gguf", Spec("llama", "f32"))


def test_an_unknown_cache_type_is_refused_with_the_choices(tiny):
    out = ember("generate", tiny, "-p", "hi", "-ctv", "q5_0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "argument -ctv/--cache-type-v: invalid choice: 'q5_0' (choose from 'f16', 'f32', 'q8_0', " \
           "'q4_0', 'turbo3', 'turbo4')" in out.stderr


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["perplexity", "-f", TEXT],
                                     ["compile", "-o", "OUT"]], ids=["generate", "perplexity", "compile"])
def test_a_head_size_the_cache_type_cannot_hold_is_one_line(tiny_llama, tmp_path, command):
    args = [tmp_path / "art" if a == "OUT" else a for a in command]
    out = ember(args[0], tiny_llama, *args[1:], "-ctk", "turbo4")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (f"ember: error: {tiny_llama}: K cache type turbo4 needs a "
                                                   "head size that is a multiple of 128; this model's K "
                                                   "head size is 64")
    assert "compiling step graph" not in out.stderr and not (tmp_path / "art").exists()


def test_run_refuses_cache_types_other_than_the_artifacts(built):
    out = ember("run", built, "-p", "hello", "-n", 2, "-ctk", "q8_0")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"ember: error: {built}: the artifact was compiled with K cache type f16, not q8_0; compile it "
        "again with the cache settings you want"]


@pytest.mark.slow     # two GPU generate runs; the quantized-cache kernels have their own tests
def test_a_gpu_backend_without_quantized_cache_kernels_says_so_in_one_line(tiny):
    """Until the OpenCL/Vulkan kernels for quantized caches exist, the request is refused before
    anything compiles; once they do, the run succeeds. Either way: no traceback."""
    from ember.backends import get_backend
    for name in ("opencl", "vulkan"):
        if not get_backend(name).available()[0]:
            continue
        out = ember("generate", tiny, "-p", "hi", "-n", 2, "--backend", name, "-c", 64, "-ctk", "q8_0")
        assert "Traceback" not in out.stderr
        if out.returncode:
            assert out.stderr.strip().splitlines()[-1].startswith(
                f"ember: error: {name} backend: a KV cache of K q8_0, V f16 is not supported: ")
            assert "compiling step graph" not in out.stderr
