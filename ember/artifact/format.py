"""The artifact folder's format: the manifest, its versions, the checksum of every file, and the
folder replaced atomically. Shared by every target's writer and loader (ember/artifact/<target>.py);
what a target adds to the manifest and the folder is that module's business, reached through the
target list (ember.target: Target.artifact)."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from ember.errors import EmberError
from ember.files import umask_mode
from ember.target import TARGET_NAMES, get_target

FORMAT = "ember-artifact"
# 2: recurrent state as planes (state_src, state_slots and f32[planes, size] tables in the step
# graphs: ember.models.common.StateLayout); a version-1 recurrent artifact's steps take the old
# per-layer state inputs, so version 1 is refused with "compile the model again".
# 3: speculation: the manifest's optional `spec` block (draft_max, verify_tokens, state_planes)
# and verify steps with a logits row per token (n_outputs = n_tokens; a recurrent model's keep
# the state after every token, and all its steps take state_planes planes), which a version-2
# reader would take for plain steps over one plane.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"

# Keys of a step entry that name a file, or a list of files, of the artifact (which ones a step
# has depends on the target).
STEP_FILE_KEYS = ("graph", "source", "library", "plan", "binary")
STEP_FILE_LISTS = ("shaders", "aux")


class ArtifactError(EmberError):
    """An artifact that cannot be used: missing, incomplete, corrupt or for another version/host."""


def ember_version() -> str:
    try:
        return metadata.version("ember")
    except metadata.PackageNotFoundError:
        return "unknown"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def host_cpu() -> str:
    """The CPU this host runs on (code built with -march=native is only run on the same model)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{platform.machine()} {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.machine() or "unknown"


def target_module(target: str):
    """The module of ember.artifact that writes and loads artifacts of a target: it has
    writer(target, backend, progress, **options), load(folder, manifest, model_path, threads),
    manifest_files(manifest) and check_host(manifest, path)."""
    return importlib.import_module(get_target(target).artifact)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt: not valid JSON ({e})") from None


def new_folder(out: Path) -> Path:
    """A temporary folder beside out to write an artifact into (refusing to overwrite anything
    at out that is not an artifact)."""
    if out.exists() and not (out / MANIFEST).exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: exists and is not an ember artifact; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(folder, umask_mode(0o777))    # mkdtemp's folder is owner-only; the artifact is not
    return folder


def replace_folder(new: Path, out: Path) -> None:
    """Put new at out; an artifact already there is swapped out, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "artifact")
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder) -> dict:
    """The manifest, after checking the format, the versions, the host and every file's sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: {folder} is not an ember artifact, or an incomplete one")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an ember artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')!r}; this "
                            f"ember reads version {FORMAT_VERSION}: compile the model again")
    if manifest.get("ember_version") != ember_version():
        raise ArtifactError(f"{path}: built by ember {manifest.get('ember_version')!r}, this is ember "
                            f"{ember_version()}: compile the model again")
    try:
        if manifest["target"] not in TARGET_NAMES:
            raise ArtifactError(f"{path}: target {manifest['target']!r} is not supported here")
        module = target_module(manifest["target"])
        module.check_host(manifest, path)
        for rel, digest in manifest["files"].items():
            file = inside(folder, rel, path)
            if not file.is_file():
                raise ArtifactError(f"{file}: missing: the artifact is incomplete")
            if file_sha256(file) != digest:
                raise ArtifactError(f"{file}: checksum mismatch: the artifact is corrupt")
        listed = set(manifest["files"])
        needed = _needed_files(manifest) + module.manifest_files(manifest)
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path}: corrupt: malformed manifest ({e!r})") from None
    for rel in needed:
        inside(folder, rel, path)
    unlisted = [rel for rel in needed if rel not in listed]
    if unlisted:
        raise ArtifactError(f"{path}: corrupt: {unlisted[0]} has no checksum")
    return manifest


def inside(folder: Path, rel, manifest_path: Path) -> Path:
    """folder/rel, for a path a manifest names, which must stay inside the artifact: relative,
    without `..`, and not leaving the folder through a link (a manifest naming /tmp/evil.so
    would otherwise have it loaded, its constructor run)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts \
            or "\\" in rel:
        raise ArtifactError(f"{manifest_path}: refused: file path {rel!r} does not stay inside the artifact")
    file = folder / rel
    try:
        file.resolve().relative_to(folder.resolve())
    except ValueError:
        raise ArtifactError(f"{manifest_path}: refused: {rel!r} leads outside the artifact "
                            f"(to {file.resolve()})") from None
    return file


def _needed_files(manifest: dict) -> list[str]:
    """Every file the steps and the constants refer to (each must have a checksum)."""
    needed = [*manifest["constants"].values()]
    needed += [s[k] for s in manifest["steps"] for k in STEP_FILE_KEYS if k in s]
    needed += [f for s in manifest["steps"] for k in STEP_FILE_LISTS for f in s.get(k, [])]
    return needed
