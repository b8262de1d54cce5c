"""Backends and their registry. Each entry names the module and class of one backend; the
module is imported only when that backend is asked for, so a missing device library costs
nothing until then. Adding a backend is one line in `_REGISTRY`.

    backend = get_backend("cpu", threads=2)
    exe = backend.compile(graph)
    outputs = exe.run({"x": x})
"""
from __future__ import annotations

import importlib

from ember.backends.base import Backend, Executable
from ember.errors import BackendUnavailable, EmberError

_REGISTRY: dict[str, str] = {
    "cpu": "ember.backends.cpu.backend:CpuBackend",
    "opencl": "ember.backends.opencl.backend:OpenCLBackend",
    "vulkan": "ember.backends.vulkan.backend:VulkanBackend",
}

BACKEND_NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = ["Backend", "Executable", "BACKEND_NAMES", "get_backend", "available_backends"]


def backend_class(name: str) -> type[Backend]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise EmberError(f"unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailable(f"{name} backend unavailable: cannot import {module_name}: {e}") from e
    return getattr(module, class_name)


def get_backend(name: str, **options) -> Backend:
    """A backend instance by name; options go to its constructor (e.g. cpu: threads, isa)."""
    return backend_class(name)(**options)


def available_backends() -> list[str]:
    """The names of the backends that can run here, in registry order."""
    names = []
    for name in BACKEND_NAMES:
        try:
            ok, _ = get_backend(name).available()
        except BackendUnavailable:
            ok = False
        if ok:
            names.append(name)
    return names
