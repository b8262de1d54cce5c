"""Writing an artifact: a model's step graphs run through the target's pipeline under a
PassContext, handed to the target's writer (ember/artifact/<target>.py) one by one, and the
folder written under a temporary name, then renamed into place."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ember.artifact.format import (FORMAT, FORMAT_VERSION, MANIFEST, ArtifactError, ember_version,
                                   file_sha256, new_folder, replace_folder, target_module)
from ember.artifact.native import native_fields
from ember.artifact.session import shape_name, step_shapes, step_states, verify_tokens
from ember.ir.printer import print_ir
from ember.models.kv_cache import F16_CACHE, KVCacheTypes
from ember.passes import PassContext, pipeline_for
from ember.runtime.session import check_cache_support
from ember.target import TARGET_NAMES

DEFAULT_CTX = 256
DEFAULT_PROMPT_TOKENS = 32


def compile_artifact(model, backend, out_dir, n_ctx: int = DEFAULT_CTX,
                     prompt_tokens: int = DEFAULT_PROMPT_TOKENS, kv_bucket: int = 256,
                     disabled_passes=frozenset(), progress=None, cache: KVCacheTypes = F16_CACHE,
                     draft_max: int = 0, **target_options) -> dict:
    """Compile model's steps into out_dir (replacing an artifact there); returns the manifest.
    backend: a target name of ember.target.TARGETS, or a CpuBackend for target cpu (the other
    targets make their own backend; target_options go to the target's writer, see
    ember/artifact/<target>.py). progress(message), when given, hears about each step. cache:
    the KV cache's types, recorded in the manifest (a head size they cannot hold, or a target
    without kernels for them, is an error before anything is compiled). draft_max > 0: also
    the verify steps of speculation with up to draft_max drafts (spec_fields)."""
    target = backend if isinstance(backend, str) else backend.name
    if target not in TARGET_NAMES:
        raise ArtifactError(f"compile: target {target!r} is not supported; targets: {', '.join(TARGET_NAMES)}")
    if draft_max < 0:
        raise ArtifactError(f"compile: --draft-max {draft_max}: must be at least 1")
    model.check_cache(cache)
    writer = target_module(target).writer(target, None if isinstance(backend, str) else backend,
                                          progress=progress, **target_options)
    check_cache_support(writer.supports_op, f"compile: target {target}", model, cache)
    out = Path(out_dir)
    hp = model.hparams
    n_ctx = min(n_ctx, hp.n_ctx_train) if hp.n_ctx_train else n_ctx
    shapes = step_shapes(n_ctx, kv_bucket, prompt_tokens, draft_max)
    spec = spec_fields(model, draft_max)
    pipeline = pipeline_for(target, layout=writer.layout)
    tmp = new_folder(out)
    try:
        (tmp / "steps").mkdir()
        fields = writer.begin(tmp)
        constants: dict[str, str] = {}
        steps = []
        for shape in shapes:
            start = time.perf_counter()
            with PassContext(disabled=frozenset(disabled_passes)):
                states = step_states(shape, spec["state_planes"] if spec else 1)
                optimized = pipeline(model.build_step(*shape, cache=cache, states=states))
            name = f"steps/{shape_name(shape)}"
            # graph: the step as the target compiled it (the renderer may have dropped dead nodes);
            # stored_as: constants the target keeps in a form of its own (Adreno SoA weights),
            # whose plain copy this step does not need
            entry, n_kernels, graph, stored_as = writer.step(tmp, name, optimized)
            (tmp / f"{name}.ir").write_text(print_ir(graph))
            _save_derived_constants(model, graph, tmp, constants, skip=stored_as)
            steps.append({"n_tokens": shape[0], "n_kv": shape[1], "n_outputs": shape[2],
                          "graph": f"{name}.ir", **entry})
            if progress:
                progress(f"compiled step {shape_name(shape)} ({n_kernels} kernels) in "
                         f"{time.perf_counter() - start:.1f} s")
        fields.update(writer.finish(tmp))
        if writer.native:
            fields["native"] = native_fields(model)
        if spec:
            fields["spec"] = spec
        manifest = _manifest(target, fields, model, n_ctx, kv_bucket, prompt_tokens, disabled_passes,
                             cache, steps, constants, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def spec_fields(model, draft_max: int) -> dict:
    """The manifest's `spec` block of an artifact compiled for speculation ({} without):
    draft_max, the verify steps' tokens, and the recurrent state planes every step keeps (a
    verify batch's draft_max + 1 states plus the one the round starts from, as
    Session.prepare_speculation reserves; 1 for a transformer)."""
    if not draft_max:
        return {}
    planes = draft_max + 2 if model.recurrent_layers else 1
    return {"draft_max": draft_max, "verify_tokens": verify_tokens(draft_max), "state_planes": planes}


def _manifest(target, fields, model, n_ctx, kv_bucket, prompt_tokens, disabled_passes, cache,
              steps, constants, folder: Path) -> dict:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    path = Path(model.path)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ember_version": ember_version(),
        "target": target,
        **fields,
        "model": {"file": path.name, "path": str(path.resolve()), "size": path.stat().st_size,
                  "sha256": file_sha256(path), "arch": model.arch,
                  # the bytes before the tensor data: every tensor's name, type, shape and offset
                  # (what the native runtime checks at each start; the whole file on request)
                  "header_sha256": _head_sha256(path, model.file.data_offset)},
        "n_ctx": n_ctx,
        "kv_bucket": kv_bucket,
        "prompt_tokens": prompt_tokens,
        "kv_cache": cache.manifest(),
        "disabled_passes": sorted(disabled_passes),
        "steps": steps,
        "constants": constants,
        "files": {f: file_sha256(folder / f) for f in files},
    }


def _head_sha256(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def _from_file(model, name: str, data: np.ndarray) -> bool:
    if name not in model.file:
        return False
    stored = model.file.tensor(name)
    return data is stored or (data.__array_interface__["data"][0] == stored.__array_interface__["data"][0]
                              and data.shape == stored.shape and data.dtype == stored.dtype)


def _save_derived_constants(model, graph, folder: Path, saved: dict[str, str], skip=frozenset()) -> None:
    """Write each constant the passes made (not a GGUF tensor) once, as .npy; not those in skip."""
    for name, data in graph.constants.items():
        if name in skip or _from_file(model, name, data):
            continue
        if name in saved:
            if not np.array_equal(np.load(folder / saved[name], mmap_mode="r"), data):
                raise ArtifactError(f"compile: constant {name!r} differs between step graphs")
            continue
        rel = f"constants/{len(saved):03d}.npy"
        (folder / "constants").mkdir(exist_ok=True)
        np.save(folder / rel, np.ascontiguousarray(data), allow_pickle=False)
        saved[name] = rel
