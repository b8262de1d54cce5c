"""The `backend` fixture: every registered backend, each skipped with its reason when it cannot
run here (CI installs every device, so nothing skips there). Compiled code goes to a cache folder
of this test session."""
from __future__ import annotations

import inspect

import pytest

from ember.backends import BACKEND_NAMES, backend_class, get_backend
from ember.errors import BackendUnavailable


def make_backend(name: str, cache_dir, **options):
    try:
        cls = backend_class(name)
    except BackendUnavailable as e:
        pytest.skip(f"{name}: unavailable: {e}")
    if "cache_dir" in inspect.signature(cls).parameters:
        options.setdefault("cache_dir", cache_dir)
    backend = get_backend(name, **options)
    ok, reason = backend.available()
    if not ok:
        pytest.skip(f"{name}: unavailable: {reason}")
    return backend


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
