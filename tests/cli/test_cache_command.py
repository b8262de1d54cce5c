"""`ember cache info|clear` on a cache folder of the test's own ($XDG_CACHE_HOME pointed at a
temporary folder: the real cache is never touched)."""
import os
import subprocess
import sys

import pytest

from ember.backends.cpu.compiler import CompileCache

SOURCES = ["int ember_cli_cache_a(void) { return 1; }\n", "int ember_cli_cache_b(void) { return 2; }\n"]


def ember(*args, cache_home, limit=None):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home)}
    env.pop("EMBER_CACHE_LIMIT", None)
    if limit is not None:
        env["EMBER_CACHE_LIMIT"] = limit
    return subprocess.run([sys.executable, "-m", "ember.cli", "cache", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture
def cache_home(tmp_path):
    """A cache folder holding two CPU libraries and a model file."""
    cache = CompileCache(tmp_path / "ember" / "cpu")
    for source in SOURCES:
        cache.build(source)
    (tmp_path / "ember" / "models").mkdir()
    (tmp_path / "ember" / "models" / "model.gguf").write_bytes(b"GGUF")
    return tmp_path


def info_lines(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines()
                                               if not line.startswith(" "))}


def test_cache_info_prints_folder_entries_bytes_and_limit(cache_home):
    out = ember("info", cache_home=cache_home)
    assert out.returncode == 0, out.stderr
    info = info_lines(out.stdout)
    entries = list((cache_home / "ember" / "cpu").rglob("*.so"))
    size = sum(p.stat().st_size + p.with_suffix(".sha256").stat().st_size for p in entries)
    assert info["folder"] == str(cache_home / "ember")
    assert info["entries"] == "2" and len(entries) == 2
    assert info["bytes"].split()[0] == str(size)
    assert info["limit"] == "2147483648 (2.0 GiB; the default)"
    assert "cpu/" in out.stdout and "2 entries" in out.stdout


@pytest.mark.parametrize("setting, shown", [("500M", "524288000 (500.0 MiB; EMBER_CACHE_LIMIT=500M)"),
                                            ("0", "none (EMBER_CACHE_LIMIT=0)")])
def test_cache_info_shows_the_setting(tmp_path, setting, shown):
    out = ember("info", cache_home=tmp_path, limit=setting)
    assert out.returncode == 0 and info_lines(out.stdout)["limit"] == shown
    assert info_lines(out.stdout)["entries"] == "0"


def test_a_bad_limit_is_one_line(tmp_path):
    out = ember("info", cache_home=tmp_path, limit="lots")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "ember: error: EMBER_CACHE_LIMIT='lots': not a size (e.g. 2G, 500M, 0 for no limit)\n"


def test_cache_clear_removes_the_entries_and_keeps_the_model(cache_home):
    out = ember("clear", cache_home=cache_home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("removed 2 entries (") and str(cache_home / "ember") in out.stdout
    assert list((cache_home / "ember" / "cpu").rglob("*.so")) == []
    assert (cache_home / "ember" / "models" / "model.gguf").read_bytes() == b"GGUF"
    assert info_lines(ember("info", cache_home=cache_home).stdout)["entries"] == "0"
    cache = CompileCache(cache_home / "ember" / "cpu")     # what was cleared is built again
    cache.build(SOURCES[0])
    assert (cache.builds, cache.hits) == (1, 0)
