"""The `backend` fixture: every registered backend, each skipped with its reason when it cannot
run here (CI installs every device, so nothing skips there). Compiled code goes to a cache folder
of this test session."""
from __future__ import annotations

import pytest

from devices import make_backend
from ember.backends import BACKEND_NAMES


@pytest.fixture(scope="session")
def backend_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("backend-cache")


@pytest.fixture(scope="session", params=BACKEND_NAMES)
def backend(request, backend_cache):
    return make_backend(request.param, backend_cache)


@pytest.fixture(scope="session")
def scalar_cpu(backend_cache):
    """The CPU backend built for the portable ISA (no SIMD branches of the kernels)."""
    return make_backend("cpu", backend_cache, isa="scalar")
