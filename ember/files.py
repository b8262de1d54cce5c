"""The ground floor's file helpers, importable from every floor: writing files so that a
failure never leaves a half-written one behind, and ember's cache folder. Imports nothing of
ember."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    """Where ember keeps compiled binaries and the default model: $XDG_CACHE_HOME/ember, else
    ~/.cache/ember."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ember"


def umask_mode(mode: int = 0o666) -> int:
    """mode as the process's umask leaves it (what open() would give a new file): temporary
    files and folders are made owner-only, and get this mode before they take their name."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())
