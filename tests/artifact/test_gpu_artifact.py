"""GPU artifacts (`ember compile --target opencl-generic|opencl-adreno|vulkan`): what they store,
running them without ember's compiler (no OpenCL template rendering, no glslc) to the same
greedy text as `ember generate` on the backend, and the refusals: corrupt file, version, missing
device, an Adreno artifact on another device. OpenCL tests run on PoCL, Vulkan ones on lavapipe;
each skips with its reason where the device is missing. The Adreno kernels cannot run on PoCL:
they are compiled by clang's OpenCL front end instead (tests/codegen/test_opencl_clang.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ember.backends import get_backend
from ember.errors import BackendUnavailable
from ember.models import load_model
from ember.artifact import FORMAT_VERSION, ArtifactError, compile_artifact, load_artifact, read_manifest
from ember.runtime.session import Session, SessionOptions

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "codegen"))
from test_opencl_clang import CLANG, SMALL_SOA, assert_adreno_compiles  # noqa: E402
from tiny_gguf import Spec, write_tiny_gguf  # noqa: E402

N_CTX, PROMPT_TOKENS = 64, 8
GENERATE = ("-p", "hello wo", "-n", 6, "--temp", 0, "--ignore-eos")
PROMPT_LENGTH = 8         # tokens of "hello wo" with BOS


def _available(name: str) -> tuple[bool, str]:
    try:
        return get_backend(name).available()
    except BackendUnavailable as e:
        return False, str(e)


OPENCL_OK, OPENCL_WHY = _available("opencl")
VULKAN_OK, VULKAN_WHY = _available("vulkan")
needs_opencl = pytest.mark.skipif(not OPENCL_OK, reason=f"opencl: unavailable: {OPENCL_WHY}")
needs_vulkan = pytest.mark.skipif(not VULKAN_OK, reason=f"vulkan: unavailable: {VULKAN_WHY}")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "gemma3-q8_0.gguf", Spec("gemma3", "q8_0"))


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory) -> Path:
    """XDG_CACHE_HOME of the commands: the compile's program binaries serve `ember generate`."""
    return tmp_path_factory.mktemp("cache-home")


def ember(*args, cache_home: Path, path: str | None = None, before: str = ""):
    """`ember ARGS` in a new process; before: Python run first in it (to take tools away)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    if path is not None:
        env["PATH"] = path
    main = f"{before}\nimport sys\nfrom ember.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", main, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


# In a run of an OpenCL artifact, neither template rendering nor a program build from source may
# happen: the stored binary serves on its build device.
NO_OPENCL_COMPILER = """
import ember.codegen.opencl as opencl, ember.codegen.opencl_plan as opencl_plan
import ember.codegen.renderer as renderer, ember.backends.opencl.compiler as compiler
def refuse(*args, **kwargs):
    raise AssertionError("an artifact run rendered a template or built a program from source")
for module, name in ((opencl, "render_graph"), (renderer.Templates, "render"), (opencl_plan, "relayout_weight")):
    setattr(module, name, refuse)
compiler.ProgramCache.build = refuse
"""


def error_line(result) -> str:
    """The one line a refused command prints (after any lines the OpenCL driver writes itself)."""
    assert result.returncode == 1 and result.stdout == ""
    return [line for line in result.stderr.splitlines() if line.startswith("ember: error:")][-1]


# ---- opencl-adreno: written without an Adreno device, checked by clang ------------------------
@pytest.fixture(scope="module")
def adreno(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adreno") / "tiny.ember"
    messages = []
    compile_artifact(load_model(tiny), "opencl-adreno", out, n_ctx=N_CTX, prompt_tokens=PROMPT_TOKENS,
                     progress=messages.append, profile_options=SMALL_SOA)
    assert any("without binaries" in m for m in messages)
    assert sum(m.startswith("compiled step") for m in messages) == 2
    return out


@pytest.fixture
def adreno_copy(adreno, tmp_path) -> Path:
    return Path(shutil.copytree(adreno, tmp_path / "copy"))


def test_adreno_manifest_lists_every_source_its_options_and_the_soa_weights(adreno, tiny):
    manifest = read_manifest(adreno)
    assert manifest["target"] == "opencl-adreno" and manifest["profile"]["name"] == "adreno"
    assert manifest["build_device"] is None       # no Adreno here: sources and plans only
    for step in manifest["steps"]:
        assert {step["source"], step["plan"], step["graph"]} <= set(manifest["files"])
        assert "binary" not in step
        assert step["build_options"] == "-cl-std=CL2.0 -DEMBER_FP16=1 -DEMBER_SUBGROUPS=1 -cl-mad-enable"
        plan = json.loads((adreno / step["plan"]).read_text())
        assert plan["build_options"] == step["build_options"]
        assert step["kernels"] == [k["name"] for k in plan["kernels"]]
        source = (adreno / step["source"]).read_text()
        assert all(f"kernel void {k}(" in source or f" {k}(" in source for k in step["kernels"])
        # every re-laid-out constant of the plan is stored in that layout
        for c in plan["constants"]:
            if c["layout"]:
                assert manifest["relaid_weights"][c["name"]]["layout"] == c["layout"]
    # the stored parts are the documented transform of the blocks (the GGUF's, or those the
    # passes made, which are then stored in that layout only)
    from ember.codegen.opencl_plan import WeightLayout, relayout_weight
    model = load_model(tiny)
    relaid = manifest["relaid_weights"]
    assert "token_embd.weight" in relaid and any("+" in name for name in relaid)
    for name, entry in relaid.items():
        if name not in model.file:
            assert name not in manifest["constants"]
            continue
        want = relayout_weight(model.file.tensor(name), WeightLayout(**entry["layout"]))
        for part in ("q", "d"):
            assert np.array_equal(np.load(adreno / entry[part]), want[part])


@pytest.mark.skipif(CLANG is None, reason="clang is not installed (Debian: apt-get install clang)")
def test_adreno_sources_compile_with_clangs_opencl_front_end(adreno, tmp_path):
    for step in read_manifest(adreno)["steps"]:
        program = SimpleNamespace(source=(adreno / step["source"]).read_text(), build_options=step["build_options"])
        assert_adreno_compiles(program, tmp_path)


@needs_opencl
def test_adreno_artifact_is_refused_on_another_device(adreno, cache_home):
    out = ember("run", adreno, "-p", "hello", "-n", 2, cache_home=cache_home)
    line = error_line(out)
    assert line.startswith(f"ember: error: {adreno / 'manifest.json'}: compiled for Adreno GPUs")
    assert "not an Adreno" in line


def test_corrupt_gpu_artifact_file_is_refused_naming_it(adreno_copy):
    weight = next(adreno_copy.glob("weights/*.q.npy"))
    data = bytearray(weight.read_bytes())
    data[-1] ^= 0x01
    weight.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"^{weight}: checksum mismatch: the artifact is corrupt$"):
        load_artifact(adreno_copy)


def test_gpu_artifact_of_another_format_version_is_refused(adreno_copy):
    path = adreno_copy / "manifest.json"
    path.write_text(path.read_text().replace(f'"format_version": {FORMAT_VERSION},', '"format_version": 7,'))
    with pytest.raises(ArtifactError, match=rf"^{path}: artifact format version 7; this ember reads version {FORMAT_VERSION}"):
        load_artifact(adreno_copy)


def test_missing_opencl_device_is_refused_saying_why(adreno_copy, monkeypatch):
    from ember.backends.opencl import device
    why = "no OpenCL platform found: install an OpenCL driver (ICD)"
    monkeypatch.setattr(device, "select_device", lambda spec=None: (_ for _ in ()).throw(BackendUnavailable(why)))
    with pytest.raises(ArtifactError, match=r"manifest.json: target opencl-adreno needs an OpenCL device, but "
                                            r"the opencl backend is unavailable: no OpenCL platform found"):
        load_artifact(adreno_copy)


# ---- opencl-generic: run on PoCL ---------------------------------------------------------------
@pytest.fixture(scope="module")
def generic(tiny, cache_home, tmp_path_factory) -> Path:
    # Prompt steps of the test prompt's length: `ember generate` then needs the very programs the
    # artifact holds, found in the shared caches (PoCL builds cost seconds each).
    out = tmp_path_factory.mktemp("generic") / "tiny.ember"
    result = ember("compile", tiny, "--target", "opencl-generic", "-o", out, "-c", N_CTX, "--prompt-tokens",
                   PROMPT_LENGTH, cache_home=cache_home)
    assert result.returncode == 0, result.stderr
    assert "ember: compiled step t1_kv64_o1 (" in result.stderr and "ember: wrote" in result.stderr
    return out


@needs_opencl
def test_opencl_generic_artifact_generates_what_ember_generate_does(generic, tiny, cache_home):
    manifest = read_manifest(generic)
    assert manifest["build_device"] and all("binary" in s for s in manifest["steps"])
    out = ember("run", generic, *GENERATE, cache_home=cache_home, before=NO_OPENCL_COMPILER)
    assert out.returncode == 0, out.stderr
    assert "backend opencl" in out.stderr and "compile 0.0 s (0 graphs)" in out.stderr
    reference = ember("generate", tiny, "--backend", "opencl", "-c", N_CTX, *GENERATE, cache_home=cache_home)
    assert reference.returncode == 0, reference.stderr
    assert out.stdout == reference.stdout and len(out.stdout.strip()) > 0


@needs_opencl
def test_adreno_layout_runs_from_the_stored_weights(tiny, tmp_path, monkeypatch):
    """adreno-emulated: the Adreno kernels and SoA weights, runnable on PoCL: the artifact's stored
    parts (no re-layout at load) give the bits of a session that re-lays out itself."""
    from ember.backends.opencl import backend as opencl_backend
    from ember.backends.opencl.backend import OpenCLBackend
    options = dict(profile="adreno-emulated", profile_options=SMALL_SOA, cache_dir=tmp_path / "cache")
    out = tmp_path / "emulated.ember"
    compile_artifact(load_model(tiny), "opencl-adreno", out, n_ctx=N_CTX, prompt_tokens=1, **options)
    tokens = [1, 17, 260]
    reference = Session(load_model(tiny), OpenCLBackend(**options), SessionOptions(n_ctx=N_CTX))
    want = [reference.eval([t]) for t in tokens]
    monkeypatch.setattr(opencl_backend, "relayout_weight", lambda *a: pytest.fail("re-laid out at load"))
    _, session = load_artifact(out)
    assert read_manifest(out)["relaid_weights"]
    for t, w in zip(tokens, want):
        assert np.array_equal(session.eval([t]), w)


# ---- vulkan: run on lavapipe -------------------------------------------------------------------
NO_SHADER_COMPILER = """
import ember.backends.vulkan.compiler as compiler
def refuse(*args, **kwargs):
    raise AssertionError("an artifact run compiled a shader")
compiler.SpirvCache.compile = refuse
"""


@pytest.fixture(scope="module")
def vulkan(tiny, cache_home, tmp_path_factory) -> Path:
    if not VULKAN_OK:
        pytest.skip(f"vulkan: unavailable: {VULKAN_WHY}")
    out = tmp_path_factory.mktemp("vulkan") / "tiny.ember"
    result = ember("compile", tiny, "--target", "vulkan", "-o", out, "-c", N_CTX, "--prompt-tokens",
                   PROMPT_LENGTH, cache_home=cache_home)
    assert result.returncode == 0, result.stderr
    assert "ember: compiled step t8_kv64_o1 (" in result.stderr
    return out


@needs_vulkan
def test_vulkan_artifact_runs_without_glslc_as_ember_generate(vulkan, tiny, cache_home, tmp_path):
    manifest = read_manifest(vulkan)
    spirv = sorted(f for f in manifest["files"] if f.startswith("spirv/"))
    assert spirv and all((vulkan / f).read_bytes().startswith(b"\x03\x02\x23\x07") for f in spirv)
    assert {f for s in manifest["steps"] for f in s["shaders"]} == set(spirv)
    empty = tmp_path / "bin"          # a PATH with no glslc (nor anything else)
    empty.mkdir()
    out = ember("run", vulkan, *GENERATE, cache_home=cache_home, path=str(empty), before=NO_SHADER_COMPILER)
    assert out.returncode == 0, out.stderr
    assert "backend vulkan" in out.stderr and "compile 0.0 s (0 graphs)" in out.stderr
    reference = ember("generate", tiny, "--backend", "vulkan", "-c", N_CTX, *GENERATE, cache_home=cache_home)
    assert reference.returncode == 0, reference.stderr
    assert out.stdout == reference.stdout and len(out.stdout.strip()) > 0


@needs_vulkan
def test_corrupt_spirv_is_refused_naming_it(vulkan, tmp_path, cache_home):
    folder = Path(shutil.copytree(vulkan, tmp_path / "copy"))
    blob = sorted(folder.glob("spirv/*.spv"))[0]
    blob.write_bytes(blob.read_bytes()[:-4])
    out = ember("run", folder, "-p", "hello", "-n", 2, cache_home=cache_home)
    assert error_line(out) == f"ember: error: {blob}: checksum mismatch: the artifact is corrupt"


@needs_vulkan
def test_missing_vulkan_device_is_refused_saying_why(vulkan, monkeypatch):
    from ember.backends.vulkan import device
    why = "vulkan backend: no Vulkan device found"
    monkeypatch.setattr(device, "get_device", lambda *a: (_ for _ in ()).throw(BackendUnavailable(why)))
    with pytest.raises(ArtifactError, match=r"manifest.json: target vulkan needs a Vulkan device, but the "
                                            r"vulkan backend is unavailable: vulkan backend: no Vulkan device"):
        load_artifact(vulkan)


# ---- the command line --------------------------------------------------------------------------
def test_compile_and_run_help_name_every_target(cache_home):
    compile_help = ember("compile", "--help", cache_home=cache_home).stdout
    assert "{cpu,cpu-aarch64,opencl-generic,opencl-adreno,vulkan}" in compile_help
    for words in ("opencl-adreno", "SoA layout", "SPIR-V", "binaries", "aarch64", "--cpu-features"):
        assert words in compile_help
    run_help = " ".join(ember("run", "--help", cache_home=cache_home).stdout.split())
    assert "opencl-adreno on an Adreno GPU only" in run_help and "glslc" in run_help


def test_threads_with_a_gpu_target_is_refused(tiny, tmp_path, cache_home):
    out = ember("compile", tiny, "--target", "vulkan", "-t", 2, "-o", tmp_path / "x", cache_home=cache_home)
    assert error_line(out) == "ember: error: -t/--threads applies to --target cpu only, not vulkan"
    assert not (tmp_path / "x").exists()


def test_unknown_profile_for_a_target_is_refused(tiny, tmp_path):
    with pytest.raises(ArtifactError, match="target opencl-generic takes profile generic, not 'adreno'"):
        compile_artifact(load_model(tiny), "opencl-generic", tmp_path / "x", profile="adreno")
    assert not (tmp_path / "x").exists()


NO_VULKAN_DEVICE = """
import ember.backends.vulkan.device as device
from ember.errors import BackendUnavailable
def none(*args, **kwargs):
    raise BackendUnavailable("vulkan backend: no Vulkan device found")
device.get_device = none
"""


@pytest.mark.skipif(shutil.which("glslc") is None, reason="glslc (Debian package glslc) is not installed")
def test_portable_vulkan_artifact_compiles_without_a_device_and_runs_on_one(tiny, cache_home, tmp_path):
    out = tmp_path / "portable.ember"
    args = ("compile", tiny, "--target", "vulkan", "-o", out, "-c", N_CTX, "--prompt-tokens", PROMPT_LENGTH)
    refused = ember(*args, cache_home=cache_home, before=NO_VULKAN_DEVICE)
    assert "--portable" in error_line(refused) and not out.exists()
    made = ember(*args, "--portable", cache_home=cache_home, before=NO_VULKAN_DEVICE)
    assert made.returncode == 0, made.stderr
    manifest = read_manifest(out)
    assert manifest["build_device"]["name"] == "none (portable)"
    assert manifest["caps"]["storage8"] is False and manifest["caps"]["offset_alignment"] == 256
    if not VULKAN_OK:
        pytest.skip(f"vulkan: unavailable to run the artifact: {VULKAN_WHY}")
    ran = ember("run", out, *GENERATE, cache_home=cache_home, before=NO_SHADER_COMPILER)
    assert ran.returncode == 0, ran.stderr
    reference = ember("generate", tiny, "--backend", "vulkan", "-c", N_CTX, *GENERATE, cache_home=cache_home)
    assert ran.stdout == reference.stdout and ran.stdout.strip()


def test_portable_is_for_vulkan_only(tiny, tmp_path, cache_home):
    out = ember("compile", tiny, "--target", "cpu", "--portable", "-o", tmp_path / "x", cache_home=cache_home)
    assert error_line(out) == "ember: error: --portable applies to --target vulkan only, not cpu"
