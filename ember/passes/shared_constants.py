"""Constants a pass derives from the model's weights, made once per process.

fuse-qkv concatenates the Q/K/V (and gate/up) weights of every layer. Done per compiled step
graph, each graph kept its own copy: on Gemma 3 270M about 45 MiB more resident memory per
compiled graph, and several GB for a 7B model with the plan cache full. Here the same source
arrays give back the very same concatenation for as long as anything (a compiled graph's
constants) still holds it; when the last holder goes, so does the array.

Sources are matched by identity (the GGUF reader hands out one view per tensor), checked
through weak references so that a new array at a dead one's address never matches.
"""
from __future__ import annotations

import threading
import weakref
from typing import Sequence

import numpy as np

_lock = threading.Lock()
# ids of the sources -> (weak refs to the sources, weak ref to their concatenation)
_concatenations: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], weakref.ref]] = {}


def concatenated(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """np.concatenate(arrays, axis=0), read-only and shared by every caller passing the same
    arrays while it lives."""
    key = tuple(id(a) for a in arrays)
    with _lock:
        found = _concatenations.get(key)
        if found is not None:
            sources, result = found
            fused = result()
            if fused is not None and all(ref() is a for ref, a in zip(sources, arrays)):
                return fused
        fused = np.concatenate(arrays, axis=0)
        fused.flags.writeable = False     # shared between graphs: nobody may write it
        _forget_dead()
        _concatenations[key] = (tuple(weakref.ref(a) for a in arrays), weakref.ref(fused))
        return fused


def _forget_dead() -> None:
    dead = [key for key, (_, result) in _concatenations.items() if result() is None]
    for key in dead:
        del _concatenations[key]
