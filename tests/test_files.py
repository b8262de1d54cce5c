"""The ground floor's file helpers: atomic writes leave no partial file and respect the umask;
temporaries name their owner, and only stale ones (old, owner gone) are removed; the cache limit's
setting."""
import os
import stat
import subprocess
import time

import pytest

from ember.errors import EmberError
from ember.files import (STALE_AFTER_S, TEMPORARY, atomic_write_bytes, atomic_write_text, cache_limit,
                         remove_stale_temporaries)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_an_atomic_write_gets_the_umasks_mode(tmp_path, umask_022):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "hello")
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644      # as open() would make it, not 0600


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


# ---- temporaries a killed process left behind (issue 16) -------------------------------------
@pytest.fixture
def processes():
    """A live process (a sleeper) and a finished one (its pid no longer names a process)."""
    live = subprocess.Popen(["sleep", "120"])
    done = subprocess.Popen(["true"])
    done.wait()
    yield live.pid, done.pid
    live.kill()
    live.wait()


def aged(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def test_stale_means_old_and_no_live_owner(tmp_path, processes):
    live, dead = processes
    old, young = STALE_AFTER_S + 60, 5
    names = {
        f".build.pid{dead}.abcd1234": (old, True),          # a killed compile's folder: removed
        f".x.so.pid{dead}.abcd1234.tmp": (old, True),       # a killed write: removed
        f".build.pid{live}.abcd1234": (old, False),         # a live process's long build: kept
        f".x.so.pid{live}.efgh5678.tmp": (old, False),
        f".build.pid{dead}.ijkl9012": (young, False),       # young: kept (another container's?)
        ".x.so.mnop3456.tmp": (old, True),                  # no owner named: its age decides
        ".y.so.qrst7890.tmp": (young, False),
        "0123.so": (old, False),                            # not a temporary
    }
    for name, (age, _) in names.items():
        path = tmp_path / "cpu" / "ab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.startswith(".build"):
            path.mkdir()
            (path / "kernel.c").write_text("int x;")
        else:
            path.write_bytes(b"x")
        aged(path, age)
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, (_, stale) in names.items() if stale)
    left = {p.name for p in (tmp_path / "cpu" / "ab").iterdir()}
    assert left == {n for n, (_, stale) in names.items() if not stale}


def test_an_atomic_write_names_its_owner(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(os.path.basename(a)), real_replace(a, b)))
    atomic_write_text(tmp_path / "out.txt", "x")
    assert TEMPORARY.match(seen[0]) and TEMPORARY.match(seen[0])["pid"] == str(os.getpid())


@pytest.mark.parametrize("text, size", [("2G", 2 << 30), ("500M", 500 << 20), ("1.5GiB", 3 << 29),
                                        ("64k", 64 << 10), ("12345", 12345), ("0", None), ("", 2 << 30)])
def test_cache_limit_sizes(text, size):
    assert cache_limit(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "2X", "1e9"])
def test_a_cache_limit_that_is_not_a_size_is_one_line(text):
    with pytest.raises(EmberError, match=f"EMBER_CACHE_LIMIT={text!r}: not a size"):
        cache_limit(text)
