"""The ground floor's file helpers, importable from every floor: writing files so that a
failure never leaves a half-written one behind, ember's cache folder and its size limit, and
the clean-up of temporaries a killed process left there. Imports only ember.errors.

A temporary's name says who owns it: `.<what>.pid<PID>.<random>[.tmp]` (hidden, the final
name or purpose, the writing process's id). A temporary is stale, and `remove_stale_temporaries`
deletes it, when it is older than STALE_AFTER_S and its owner is not a live process: a live
process's in-flight build is never touched, however long it takes, and the age bound keeps the
files of a process this one cannot see (another container sharing the folder) safe for an hour.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ember.errors import EmberError

STALE_AFTER_S = 3600.0
# what `ember` writes while working: .<what>.pid<PID>.<random>[.tmp]; before temporaries carried
# their owner's pid they were .<name>.<random>.tmp (no owner to ask: only the age counts)
TEMPORARY = re.compile(r"^\.(?P<what>.+?)\.pid(?P<pid>\d+)\.[a-z0-9_]{8}(\.tmp)?$")
OWNERLESS_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

CACHE_LIMIT_VARIABLE = "EMBER_CACHE_LIMIT"
DEFAULT_CACHE_LIMIT = 2 << 30
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def default_cache_dir() -> Path:
    """Where ember keeps compiled binaries and the default model: $XDG_CACHE_HOME/ember, else
    ~/.cache/ember."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ember"


def cache_limit(value: str | None = None) -> int | None:
    """The compiled-binary cache's bound in bytes: value, else $EMBER_CACHE_LIMIT, else
    DEFAULT_CACHE_LIMIT (2 GiB). A size is bytes or a number with K, M, G or T (binary units,
    an optional "iB" or "B"); 0 means no bound (None)."""
    if value is None:
        value = os.environ.get(CACHE_LIMIT_VARIABLE)
    if value is None or not value.strip():
        return DEFAULT_CACHE_LIMIT
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value, re.IGNORECASE)
    if m is None:
        raise EmberError(f"{CACHE_LIMIT_VARIABLE}={value!r}: not a size (e.g. 2G, 500M, 0 for no limit)")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    return size or None


def temporary_prefix(what: str) -> str:
    """The start of the name of a temporary this process writes for what (see TEMPORARY)."""
    return f".{what}.pid{os.getpid()}."


def owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's live process
        return True
    except OSError:
        return False
    return True


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether path is a temporary (by its name) older than STALE_AFTER_S whose owner is gone."""
    m = TEMPORARY.match(path.name)
    if m is None and OWNERLESS_TEMPORARY.match(path.name) is None:
        return False
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S and (m is None or not owner_alive(int(m.group("pid"))))


def remove_stale_temporaries(folder: Path | str, depth: int = 3) -> list[Path]:
    """Delete the stale temporaries (files and folders) in folder and its subfolders down to
    depth levels; the paths removed. A live temporary folder is not entered."""
    removed = []
    now = time.time()
    try:
        children = list(os.scandir(folder))
    except OSError:
        return removed
    for child in children:
        path = Path(child.path)
        if is_stale_temporary(path, now):
            if child.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        elif depth > 1 and child.is_dir(follow_symlinks=False) and not TEMPORARY.match(child.name):
            removed += remove_stale_temporaries(path, depth - 1)
    return removed


def umask_mode(mode: int = 0o666) -> int:
    """mode as the process's umask leaves it (what open() would give a new file): temporary
    files and folders are made owner-only, and get this mode before they take their name."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name), suffix=".tmp")
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
