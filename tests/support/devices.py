"""Backends for tests: each skipped with its reason when it cannot run here (CI installs every
device, so nothing skips there)."""
from __future__ import annotations

import inspect

import pytest

from ember.backends import backend_class, get_backend
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
