"""Compiled artifacts: what `ember compile` writes, loading it without the passes or the C
compiler, and refusing folders that are incomplete, corrupt or for another version."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ember.backends.cpu.backend import CpuBackend
from ember.errors import EmberError
from ember.models import KVCacheTypes, load_model
from ember import artifact
from ember.artifact import ArtifactError, compile_artifact, load_artifact, read_manifest
from ember.runtime.session import Session, SessionOptions

from tiny_gguf import Spec, write_tiny_gguf

N_CTX, PROMPT_TOKENS = 64, 8
TOKENS = [1, 17, 260, 300, 42, 9, 33, 100, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "gemma3-q8_0.gguf", Spec("gemma3", "q8_0"))


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "tiny.ember"
    compile_artifact(load_model(tiny_model), CpuBackend(threads=1), out, n_ctx=N_CTX,
                     prompt_tokens=PROMPT_TOKENS)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A copy of the artifact a test may damage."""
    return Path(shutil.copytree(built, tmp_path / "copy"))


def rewrite_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_names_shapes_model_and_a_checksum_for_every_file(built, tiny_model):
    manifest = read_manifest(built)
    on_disk = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk
    assert [(s["n_tokens"], s["n_kv"], s["n_outputs"]) for s in manifest["steps"]] == [(1, 64, 1), (8, 64, 1)]
    assert manifest["format_version"] == artifact.FORMAT_VERSION
    assert manifest["model"]["file"] == tiny_model.name
    assert manifest["model"]["sha256"] == artifact.file_sha256(tiny_model)
    # the fused Q+K+V and gate+up weights exist only in the artifact
    assert any("+" in name for name in manifest["constants"])
    assert not any(p.name.startswith(".") for p in built.parent.iterdir())   # no temporary left


def test_artifact_runs_the_same_bits_as_a_session_without_compiling(built, tiny_model):
    model, session = load_artifact(built, threads=1)
    ours = session.eval(TOKENS)
    ours_next = session.eval([5])
    assert session.stats.graph_builds == 0 and session.stats.compile_seconds == 0
    assert session.stats.prompt_tokens == len(TOKENS) and session.stats.decode_tokens == 1

    # a freshly compiling session fed in the same pieces: prompt steps of 8, then single tokens
    fresh = Session(load_model(tiny_model), CpuBackend(threads=1), SessionOptions(n_ctx=N_CTX))
    for begin in range(0, 16, PROMPT_TOKENS):
        fresh.eval(TOKENS[begin:begin + PROMPT_TOKENS])
    for t in TOKENS[16:]:
        theirs = fresh.eval([t])
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours_next, fresh.eval([5]))


def test_artifact_session_gives_every_row_from_decode_steps(built):
    _, session = load_artifact(built, threads=1)
    rows = session.eval(TOKENS[:5], all_logits=True)
    session.reset()
    last = session.eval(TOKENS[:5])
    assert rows.shape == (5, 320)
    assert np.array_equal(rows[-1:], last)


def test_artifact_session_refuses_past_its_context(built):
    _, session = load_artifact(built, threads=1)
    with pytest.raises(EmberError, match="context full.*compiled for 64"):
        session.eval(list(range(N_CTX + 1)))


def test_corrupt_file_is_refused_naming_it(copy):
    library = copy / "steps" / "t1_kv64_o1.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{library}: checksum mismatch"):
        load_artifact(copy)


def test_missing_file_is_refused_naming_it(copy):
    graph = copy / "steps" / "t8_kv64_o1.ir"
    graph.unlink()
    with pytest.raises(ArtifactError, match=rf"{graph}: missing: the artifact is incomplete"):
        load_artifact(copy)


def test_missing_manifest_is_refused(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing: .* not an ember artifact"):
        load_artifact(copy)


def test_truncated_manifest_is_refused(copy):
    path = copy / "manifest.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(ArtifactError, match="manifest.json: corrupt"):
        load_artifact(copy)


@pytest.mark.parametrize("key, value, message", [
    ("format_version", 999, f"artifact format version 999; this ember reads version {artifact.FORMAT_VERSION}"),
    ("ember_version", "0.0.0-old", "built by ember '0.0.0-old'"),
])
def test_version_mismatch_is_refused(copy, key, value, message):
    rewrite_manifest(copy, lambda m: m.update({key: value}))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy)


def test_other_host_is_refused_for_native_code(copy):
    rewrite_manifest(copy, lambda m: m.update(host="riscv64 Some Other CPU"))
    with pytest.raises(ArtifactError, match="-march=native for 'riscv64 Some Other CPU'"):
        load_artifact(copy)


def test_other_model_is_refused(copy, tmp_path):
    other = write_tiny_gguf(tmp_path / "llama.gguf", Spec("llama", "q8_0"))
    with pytest.raises(ArtifactError, match="not the model the artifact"):
        load_artifact(copy, model_path=other)


def test_source_not_rendered_from_the_graph_is_refused(copy):
    # a consistent checksum, but a source this ember would not render from the stored graph
    source = copy / "steps" / "t1_kv64_o1.c"
    source.write_text(source.read_text() + "\n/* edited */\n")
    rewrite_manifest(copy, lambda m: m["files"].update({"steps/t1_kv64_o1.c": artifact.file_sha256(source)}))
    with pytest.raises(ArtifactError, match="renders .*t1_kv64_o1.ir differently"):
        load_artifact(copy)


def test_compile_replaces_an_artifact_but_not_a_foreign_folder(built, tiny_model, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    model = load_model(tiny_model)
    with pytest.raises(ArtifactError, match="not an ember artifact; not overwriting"):
        compile_artifact(model, CpuBackend(threads=1), foreign, n_ctx=N_CTX, prompt_tokens=PROMPT_TOKENS)
    assert (foreign / "notes.txt").read_text() == "keep me"

    target = Path(shutil.copytree(built, tmp_path / "again"))
    (target / "stale.txt").write_text("old")
    compile_artifact(model, CpuBackend(threads=1), target, n_ctx=N_CTX, prompt_tokens=PROMPT_TOKENS)
    assert not (target / "stale.txt").exists()
    read_manifest(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine"]


def test_unknown_target_is_refused_naming_the_targets(tiny_model, tmp_path):
    with pytest.raises(ArtifactError, match="target 'metal' is not supported; targets: cpu, cpu-aarch64, opencl-generic, "
                                            "opencl-adreno, vulkan"):
        compile_artifact(load_model(tiny_model), "metal", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gpu_artifact_files_need_checksums_too(copy):
    # a file the manifest names for a step must have a checksum, whatever the target's keys
    rewrite_manifest(copy, lambda m: (m["steps"][0].update(plan="steps/extra.json"),
                                      (copy / "steps" / "extra.json").write_text("{}")))
    with pytest.raises(ArtifactError, match="manifest.json: corrupt: steps/extra.json has no checksum"):
        read_manifest(copy)


# ---- tampered manifests (issue 16): checksums detect corruption, not tampering ---------------
def test_swapped_step_libraries_are_refused_before_loading(copy):
    """Two steps' library entries swapped, every checksum still valid: the decode step once ran
    the prompt step's library (heap corruption, SIGSEGV); the library's source mark refuses it."""
    def swap(m):
        a, b = m["steps"][0], m["steps"][1]
        a["library"], b["library"] = b["library"], a["library"]
    rewrite_manifest(copy, swap)
    with pytest.raises(ArtifactError, match=r"t8_kv64_o1.so: the library was not built from the program"):
        load_artifact(copy, threads=1)


@pytest.mark.parametrize("path", ["/tmp/evil.so", "../outside.so", "steps/../../outside.so"],
                         ids=["absolute", "dotdot", "nested-dotdot"])
def test_paths_leaving_the_artifact_are_refused(copy, path):
    outside = copy.parent / "outside.so"
    shutil.copyfile(copy / "steps" / "t1_kv64_o1.so", outside)
    digest = artifact.file_sha256(outside)

    def edit(m):
        m["steps"][0]["library"] = path
        m["files"][path] = digest
    rewrite_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=rf"refused: file path '{path}' does not stay inside the artifact"):
        load_artifact(copy, threads=1)


def test_a_link_leading_outside_the_artifact_is_refused(copy):
    outside = copy.parent / "outside.so"
    shutil.copyfile(copy / "steps" / "t1_kv64_o1.so", outside)
    library = copy / "steps" / "t1_kv64_o1.so"
    library.unlink()
    library.symlink_to(outside)
    with pytest.raises(ArtifactError, match="'steps/t1_kv64_o1.so' leads outside the artifact"):
        load_artifact(copy, threads=1)


def test_a_library_of_another_program_is_refused(copy, tmp_path):
    """A library that is not ember's graph library at all (no entry point, no source mark) is
    refused naming it, not an AttributeError."""
    from ember.backends.cpu.compiler import CompileCache
    stranger = CompileCache(tmp_path / "cc").build("int stranger(void) { return 1; }\n", ())
    library = copy / "steps" / "t1_kv64_o1.so"
    shutil.copyfile(stranger, library)
    rewrite_manifest(copy, lambda m: m["files"].update({"steps/t1_kv64_o1.so": artifact.file_sha256(library)}))
    with pytest.raises(ArtifactError, match="t1_kv64_o1.so: the library was not built from the program"):
        load_artifact(copy, threads=1)


def shift_first_version_need(library: Path) -> None:
    """Point the library's first version-needed entry (ELF .gnu.version_r) at another name: glibc's
    loader then fails an assertion and ends the process (status 127) instead of failing dlopen.
    One flipped byte did this in the artifact fuzzer."""
    import struct
    data = bytearray(library.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    for i in range(shnum):
        sh_type, = struct.unpack_from("<I", data, shoff + i * shentsize + 4)
        if sh_type == 0x6FFFFFFE:                                   # SHT_GNU_verneed
            offset, = struct.unpack_from("<Q", data, shoff + i * shentsize + 0x18)
            vn_file, = struct.unpack_from("<I", data, offset + 4)
            struct.pack_into("<I", data, offset + 4, vn_file + 1)  # "libc.so.6" -> "ibc.so.6"
            library.write_bytes(bytes(data))
            return
    raise AssertionError(f"{library}: no version-needed section")


def test_a_library_the_dynamic_loader_dies_on_is_refused_naming_it(copy):
    """A step library edited so that ld.so aborts the process while loading it (checksum fixed
    up): a one-line ArtifactError naming the file; this process lives on."""
    library = copy / "steps" / "t1_kv64_o1.so"
    shift_first_version_need(library)
    rewrite_manifest(copy, lambda m: m["files"].update({"steps/t1_kv64_o1.so": artifact.file_sha256(library)}))
    with pytest.raises(ArtifactError, match=r"t1_kv64_o1.so: cannot be loaded: the dynamic loader fails on it "
                                            r"\(exit status 127"):
        load_artifact(copy, threads=1)


def test_a_constant_that_is_not_an_array_file_is_refused(copy):
    """A stored constant replaced by a pickled object, its checksum fixed up (found by the fuzzer):
    one line naming the file, not NumPy's ValueError."""
    manifest = read_manifest(copy)
    name, rel = next(iter(manifest["constants"].items()))     # the fused Q/K/V weights
    np.save(copy / rel, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)
    rewrite_manifest(copy, lambda m: m["files"].update({rel: artifact.file_sha256(copy / rel)}))
    with pytest.raises(ArtifactError, match=rf"{rel}: corrupt: not a NumPy array file"):
        load_artifact(copy, threads=1)


# ---- KV cache types -----------------------------------------------------------------------------
MIXED = KVCacheTypes.of("q8_0", "turbo4")      # a rotated q8_0 K, a turbo V


@pytest.fixture(scope="module")
def built_mixed(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact-kvq") / "tiny-kvq.ember"
    compile_artifact(load_model(tiny_model), CpuBackend(threads=1), out, n_ctx=N_CTX,
                     prompt_tokens=PROMPT_TOKENS, cache=MIXED)
    return out


def test_manifest_records_the_cache_types(built, built_mixed):
    assert read_manifest(built)["kv_cache"] == {"k": "f16", "v": "f16", "rotation": True}
    assert read_manifest(built_mixed)["kv_cache"] == {"k": "q8_0", "v": "turbo4", "rotation": True}
    graph = (built_mixed / "steps" / "t1_kv64_o1.ir").read_text()
    assert "q8_0[64, 128]" in graph and "turbo4[64, 128]" in graph


def test_a_quantized_cache_artifact_runs_the_sessions_bits(built_mixed, tiny_model):
    _, session = load_artifact(built_mixed, threads=1, cache_request={"k": "q8_0", "v": None})
    assert session.cache == MIXED
    ours = session.eval(TOKENS[:9])
    fresh = Session(load_model(tiny_model), CpuBackend(threads=1), SessionOptions(n_ctx=N_CTX, cache=MIXED))
    fresh.eval(TOKENS[:PROMPT_TOKENS])
    assert np.array_equal(ours, fresh.eval(TOKENS[PROMPT_TOKENS:9]))


@pytest.mark.parametrize("request_, message", [
    ({"k": "f16"}, "compiled with K cache type q8_0, not f16"),
    ({"v": "turbo3"}, "compiled with V cache type turbo4, not turbo3"),
    ({"rotation": False}, "compiled with cache rotation on, not off")], ids=["k", "v", "rotation"])
def test_a_cache_request_other_than_the_artifacts_is_refused(built_mixed, request_, message):
    with pytest.raises(ArtifactError) as e:
        load_artifact(built_mixed, threads=1, cache_request=request_)
    assert str(e.value) == f"{built_mixed}: the artifact was {message}; compile it again with the cache " \
                           "settings you want"


def test_a_manifest_without_cache_types_means_f16(copy):
    rewrite_manifest(copy, lambda m: m.pop("kv_cache"))
    _, session = load_artifact(copy, threads=1)
    assert session.cache == KVCacheTypes()
