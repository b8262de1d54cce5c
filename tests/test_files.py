"""The ground floor's file helpers: atomic writes leave no partial file and respect the umask."""
import os
import stat

import pytest

from ember.files import atomic_write_bytes, atomic_write_text


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
