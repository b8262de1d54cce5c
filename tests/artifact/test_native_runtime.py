"""The native runtime (ember/artifact/native): `ember-run` built into a cpu artifact by
`compile_artifact(..., runtime=True)` runs it without Python, giving the greedy text of
`ember run` (transformers, and models with recurrent layers whose state it carries between
steps), the token ids of ember's tokenizer (SentencePiece and byte-level BPE), and one line and
exit status 1 for a damaged artifact or the wrong model, never a crash. A start hashes only the
files changed since they last matched their checksums."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.artifact import compile_artifact
from ember.backends.cpu.backend import CpuBackend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer

from tiny_gguf import Spec, write_tiny_gguf
from tiny_gguf_delta import DeltaSpec, write_delta_gguf
from tiny_gguf_hybrid import HybridSpec, write_hybrid_gguf
from tiny_gguf_ssm import SsmSpec, write_ssm_gguf
from tokenizer_texts import BPE_TEXTS, HARD_TEXTS

N_CTX, PROMPT_TOKENS = 64, 8
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Hello world, this is a prompt of more than eight tokens"


def ember_run(artifact: Path, *args, runtime: Path | None = None) -> subprocess.CompletedProcess:
    exe = runtime or artifact / "ember-run"
    # a random model's text may be any bytes: compared as bytes, read with errors="replace"
    return subprocess.run([str(exe), str(artifact), *args], capture_output=True, timeout=120,
                          encoding="utf-8", errors="replace")


def python_run(artifact: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ember.cli", "run", str(artifact), *args], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300, env=env)


def assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)     # not a signal
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember-run: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def compiled(model: Path) -> Path:
    """The artifact, with its ember-run, of a GGUF beside it."""
    out = model.with_suffix(".ember")
    compile_artifact(load_model(model), CpuBackend(threads=1), out, n_ctx=N_CTX, prompt_tokens=PROMPT_TOKENS,
                     runtime=True)
    return out


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def built(request, tmp_path_factory) -> tuple[Path, Path]:
    """(artifact with its ember-run, GGUF) of a tiny f32 model."""
    folder = tmp_path_factory.mktemp(f"native-{request.param}")
    model = write_tiny_gguf(folder / f"{request.param}-f32.gguf", Spec(request.param, "f32"))
    return compiled(model), model


@pytest.fixture(scope="module")
def recurrent(tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, GGUF) of the tiny qwen35: gated DeltaNet layers (a conv and a delta-rule state
    each) beside an attention layer, and a byte-level BPE vocabulary (qwen2 pre-tokenizer)."""
    return recurrent_artifact(tmp_path_factory.mktemp("native-qwen35"), DeltaSpec("qwen35", "f32"))


def recurrent_artifact(folder: Path, spec) -> tuple[Path, Path]:
    write = {DeltaSpec: write_delta_gguf, HybridSpec: write_hybrid_gguf, SsmSpec: write_ssm_gguf}[type(spec)]
    model = write(folder / spec.filename, spec)
    return compiled(model), model


@pytest.fixture
def copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "copy", symlinks=True))


def test_greedy_text_is_the_python_runs_up_to_a_full_context(built):
    # two prompt steps of 8, then single tokens until the context (64) is full
    artifact, _ = built
    args = ("-p", PROMPT, "-n", "200", "--temp", "0", "--ignore-eos", "-t", "2")
    native, python = ember_run(artifact, *args), python_run(artifact, *args)
    assert python.returncode == 0, python.stderr
    assert native.returncode == 0, native.stderr
    assert native.stdout == python.stdout and len(native.stdout) > 1
    assert "cold start to the first token" in native.stderr and "stop: context" in native.stderr


def test_recurrent_greedy_text_is_the_python_runs_up_to_a_full_context(recurrent):
    # the DeltaNet layers' conv and delta-rule states carried through two prompt steps of 8 and
    # single tokens until the context (64) is full, as ember's ArtifactSession carries them
    assert_same_greedy_text(recurrent[0])


@pytest.mark.slow
@pytest.mark.parametrize("spec", [SsmSpec("mamba2"), SsmSpec("granitehybrid"), HybridSpec("lfm2"),
                                  HybridSpec("nemotron_h"), HybridSpec("falcon-h1"), HybridSpec("lfm2moe"),
                                  DeltaSpec("qwen3next"), DeltaSpec("qwen35moe")], ids=str)
def test_every_recurrent_kind_gives_the_python_runs_greedy_text(spec, tmp_path):
    assert_same_greedy_text(recurrent_artifact(tmp_path, spec)[0])


def assert_same_greedy_text(artifact: Path) -> None:
    args = ("-p", PROMPT, "-n", "200", "--temp", "0", "--ignore-eos", "-t", "2")
    native, python = ember_run(artifact, *args), python_run(artifact, *args)
    assert python.returncode == 0, python.stderr
    assert native.returncode == 0, native.stderr
    assert native.stdout == python.stdout and len(native.stdout) > 1
    assert "stop: context" in native.stderr


def test_bpe_token_ids_are_ember_tokenizes(recurrent):
    artifact, model = recurrent
    assert_token_ids(artifact, Tokenizer.from_gguf(model), HARD_TEXTS + BPE_TEXTS)


def assert_token_ids(artifact: Path, tokenizer: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        result = ember_run(artifact, "--tokenize", "-p", text)
        assert result.returncode == 0, result.stderr
        ids = [int(i) for i in result.stdout.split()]
        assert ids == tokenizer.encode(text, add_special=True, parse_special=True), text


def test_token_ids_are_ember_tokenizes(built):
    artifact, model = built
    tokenizer = Tokenizer.from_gguf(model)
    for text in HARD_TEXTS:
        result = ember_run(artifact, "--tokenize", "-p", text)
        assert result.returncode == 0, result.stderr
        ids = [int(i) for i in result.stdout.split()]
        assert ids == tokenizer.encode(text, add_special=True, parse_special=True), text


def test_seeded_sampling_repeats_and_differs_by_seed(built):
    artifact, _ = built
    args = ("-p", PROMPT, "-n", "16", "--temp", "1.5", "--top-k", "50", "--top-p", "0.9", "--min-p", "0")
    runs = [ember_run(artifact, *args, "--seed", str(seed)) for seed in (1, 1, 2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout != runs[2].stdout


def hashed(result: subprocess.CompletedProcess) -> tuple[int, int]:
    """(files hashed, files unchanged since verified) of ember-run's cold-start line."""
    m = re.search(r"(\d+) files hashed, (\d+) unchanged since verified", result.stderr)
    assert m, result.stderr
    return int(m.group(1)), int(m.group(2))


def test_a_start_hashes_only_files_changed_since_they_matched(recurrent, tmp_path):
    copy = Path(shutil.copytree(recurrent[0], tmp_path / "copy", symlinks=True))
    (copy / ".ember-run-verified").unlink(missing_ok=True)     # copied from runs of the original
    time.sleep(2.1)         # a file hashed within 2 s of its last change is not recorded (racy)
    args = ("-p", "hi", "-n", "1", "--temp", "0", "--ignore-eos")
    first = ember_run(copy, *args)
    n_files = len(json.loads((copy / "manifest.json").read_text())["files"]) + 1     # and the model's header
    assert hashed(first) == (n_files, 0), first.stderr      # copied: new inodes, all hashed
    assert hashed(ember_run(copy, *args)) == (0, n_files)
    assert hashed(ember_run(copy, *args, "--verify-artifact")) == (n_files, 0)
    # a byte changed in place, the mtime put back: the ctime still tells
    library = next((copy / "steps").glob("*.so"))
    stat = library.stat()
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert_one_line_failure(ember_run(copy, *args), "checksum mismatch", library.name)


def test_a_tampered_library_is_one_line(copy):
    library = next((copy / "steps").glob("*.so"))
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    assert_one_line_failure(ember_run(copy, "-p", "hi", runtime=copy / "ember-run"), "checksum mismatch",
                            library.name)


def test_a_truncated_manifest_is_one_line(copy):
    manifest = copy / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    assert_one_line_failure(ember_run(copy, "-p", "hi"), "not valid JSON")


def test_a_manifest_path_leaving_the_folder_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../evil.so"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_failure(ember_run(copy, "-p", "hi"), "does not stay inside")


def test_a_missing_file_is_one_line(copy):
    next((copy / "steps").glob("*.so")).unlink()
    assert_one_line_failure(ember_run(copy, "-p", "hi"), "missing")


def test_a_truncated_model_is_one_line(built, tmp_path):
    artifact, model = built
    short = tmp_path / "short.gguf"
    short.write_bytes(model.read_bytes()[:100_000])
    assert_one_line_failure(ember_run(artifact, "-p", "hi", "--model", str(short)), "not the model")


def test_another_model_is_one_line(built, tmp_path):
    artifact, model = built
    other = write_tiny_gguf(tmp_path / "other.gguf", Spec("qwen2" if "llama" in model.name else "llama", "f32"))
    assert_one_line_failure(ember_run(artifact, "-p", "hi", "--model", str(other)), "not the model")


def test_a_tampered_weight_is_found_on_request(built, tmp_path):
    # same size and header: only --verify-model (the whole file's sha256) sees it
    artifact, model = built
    data = bytearray(model.read_bytes())
    data[-10] ^= 0x01
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(bytes(data))
    assert_one_line_failure(ember_run(artifact, "-p", "hi", "--model", str(changed), "--verify-model"),
                            "not the model")


def test_bad_arguments_are_one_line(built):
    artifact, _ = built
    assert_one_line_failure(ember_run(artifact, "-p", "hi", "--top-p", "2"), "--top-p")
    assert_one_line_failure(ember_run(artifact.parent / "nowhere", "-p", "hi", runtime=artifact / "ember-run"),
                            "no such artifact")


@pytest.mark.slow
def test_default_model_first_16_greedy_tokens(tmp_path):
    from ember.models.default_model import default_model_path
    model = default_model_path()
    out = tmp_path / "default.ember"
    compile_artifact(load_model(model), CpuBackend(), out, n_ctx=256, prompt_tokens=32, runtime=True)
    args = ("-p", "The capital of France is a city that", "-n", "16", "--temp", "0", "--ignore-eos")
    native, python = ember_run(out, *args), python_run(out, *args)
    assert native.returncode == 0 and python.returncode == 0, native.stderr + python.stderr
    assert native.stdout == python.stdout
    tokenizer = Tokenizer.from_gguf(model)
    for text in HARD_TEXTS:
        result = ember_run(out, "--tokenize", "-p", text)
        assert [int(i) for i in result.stdout.split()] == tokenizer.encode(text, add_special=True,
                                                                           parse_special=True), text


# ---- the aarch64 build of ember-run, under qemu-user (issue 15) --------------------------------
@pytest.mark.slow
def test_aarch64_native_runtime_under_qemu_gives_the_x86_greedy_text(built, tmp_path):
    """`ember compile --target cpu-aarch64 --cpu-features i8mm --runtime`: the cross-built
    ember-run and NEON step libraries, run under qemu-aarch64, give the greedy text of the x86
    native runtime; on an emulated CPU without the recorded features ember-run refuses the
    artifact in one line before running anything."""
    from ember.backends.cpu.cross import AARCH64_SYSROOT, QEMU, QEMU_CPU, Aarch64Backend, qemu_problem
    if qemu_problem() is not None:
        pytest.skip(f"aarch64 under qemu: {qemu_problem()}")
    artifact, model = built
    out = tmp_path / "tiny-aarch64.ember"
    compile_artifact(load_model(model), Aarch64Backend("i8mm"), out, n_ctx=N_CTX, prompt_tokens=PROMPT_TOKENS,
                     runtime=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["isa"], manifest["features"]) == ("aarch64", ["dotprod", "i8mm"])
    args = ("-p", PROMPT, "-n", "24", "--temp", "0", "--ignore-eos", "-t", "1")

    def under_qemu(cpu):
        return subprocess.run([QEMU, "-cpu", cpu, "-L", str(AARCH64_SYSROOT), str(out / "ember-run"), str(out),
                               *args], capture_output=True, timeout=300, encoding="utf-8", errors="replace")
    qemu = under_qemu(QEMU_CPU)
    native = ember_run(artifact, *args)
    assert qemu.returncode == 0, qemu.stderr
    assert native.returncode == 0, native.stderr
    assert qemu.stdout == native.stdout and len(qemu.stdout) > 1
    # Cortex-A72: Armv8.0, neither SDOT nor SMMLA
    assert_one_line_failure(under_qemu("cortex-a72"), "target feature dotprod", "this CPU lacks")


@pytest.mark.slow
def test_default_model_under_qemu_gives_the_x86_first_16_greedy_tokens(tmp_path):
    """The default model cross-built for aarch64 (baseline NEON) with its ember-run, run under
    qemu-aarch64, generates the x86 native runtime's first 16 greedy tokens (about a minute: two
    compiles and 25 emulated steps)."""
    from ember.backends.cpu.cross import AARCH64_SYSROOT, QEMU, QEMU_CPU, Aarch64Backend, qemu_problem
    from ember.models.default_model import default_model_path
    if qemu_problem() is not None:
        pytest.skip(f"aarch64 under qemu: {qemu_problem()}")
    model = load_model(default_model_path())
    arm, x86 = tmp_path / "aarch64.ember", tmp_path / "x86.ember"
    compile_artifact(model, Aarch64Backend(), arm, n_ctx=256, prompt_tokens=32, runtime=True)
    compile_artifact(model, CpuBackend(), x86, n_ctx=256, prompt_tokens=32, runtime=True)
    args = ("-p", "The capital of France is a city that", "-n", "16", "--temp", "0", "--ignore-eos", "-t", "2")
    emulated = subprocess.run([QEMU, "-cpu", QEMU_CPU, "-L", str(AARCH64_SYSROOT), str(arm / "ember-run"), str(arm),
                               *args], capture_output=True, timeout=900, encoding="utf-8", errors="replace")
    native = ember_run(x86, *args)
    assert emulated.returncode == 0 and native.returncode == 0, emulated.stderr + native.stderr
    assert "generated 16 tokens" in emulated.stderr
    assert emulated.stdout == native.stdout and len(native.stdout.strip()) > 0
