"""One interface over a session's memory: attention KV caches and recurrent (SSM) state.

Sequences can be added, removed, forked and switched; a tail can be truncated. Attention
layers truncate by position (the rows past it are masked from then on). Recurrent layers keep
only the state after a position, so their tail can only be dropped by going back to a state kept
for that position: a checkpoint.

A checkpoint costs no copy when the session keeps two or more state planes (Session module doc):
the plane holding the state at the checkpoint is not written by the next step (a step writes
other planes), so the checkpoint is just the position, and restoring it is an index move on the
device. It stays valid while the session still holds that position (Session.holds: until
state_planes - 1 newer states were written). With one plane (plain decoding), the next step
rewrites it, so the checkpoint copies the state to the host.

A KV cache is a host array of rows (`cache_array`): a scalar type (f16, f32) as itself, a block
type (q8_0, q4_0, turbo3, turbo4) as each row's bytes, so saving, restoring and forking rows is
the same row copy for every type; `kv_footprint` says what the caches take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ember.errors import EmberError
from ember.ir.dtypes import DType

if TYPE_CHECKING:
    from ember.runtime.session import Session


def cache_array(dt: DType, rows: int, width: int) -> np.ndarray:
    """An empty KV cache of rows x width values of type dt: rows of dt.row_bytes(width) bytes for
    a block type (zero bytes are an all-zero block in each: scale or norm 0), else dt's NumPy
    type. A width that is not whole blocks is the caller's to refuse (Model.check_cache)."""
    if dt.is_quantized:
        return np.zeros((rows, dt.row_bytes(width)), np.uint8)
    return np.zeros((rows, width), dt.numpy)


@dataclass(frozen=True)
class KVFootprint:
    """What a session's KV caches take: bytes_per_token over every attention layer (K + V, as
    llama.cpp counts a cell), and the bytes held for the session's context (a sliding-window
    layer's ring stops at its rows)."""
    layers: int
    bytes_per_token: int
    bytes_per_context: int
    n_ctx: int

    def describe(self, cache) -> str:
        return (f"KV cache {cache}: {self.bytes_per_token} bytes per token ({self.layers} layers), "
                f"{self.bytes_per_context / 2**20:.2f} MiB for a context of {self.n_ctx} "
                f"({self.n_ctx * self.bytes_per_token / 2**20:.2f} MiB without sliding-window rings)")


def kv_footprint(session: "Session") -> KVFootprint:
    per_token = session.model.cache_bytes_per_token(session.cache)
    layers = len(session.attention_layers)
    held = sum(a.nbytes for a in session.k_cache + session.v_cache)
    return KVFootprint(layers, per_token, held, session.n_ctx)


@dataclass(frozen=True)
class Checkpoint:
    position: int
    recurrent: Mapping[str, np.ndarray] | None = None   # a host copy; None: held on the device

    @property
    def nbytes(self) -> int:
        """Bytes of state the checkpoint copied (0 when held in a plane)."""
        return sum(a.nbytes for a in (self.recurrent or {}).values())


@dataclass
class _Saved:
    position: int
    k_rows: list[np.ndarray]
    v_rows: list[np.ndarray]
    recurrent: Mapping[str, np.ndarray]
    swa_pos: np.ndarray            # the positions the sliding-window rings hold (Session.swa_pos)


class SequenceMemory:
    def __init__(self, session: Session):
        self.session = session
        self.active = 0
        self._saved: dict[int, _Saved] = {}

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        s = self.session
        if s.is_recurrent and s.state_planes < 2:
            return Checkpoint(s.n_past, s.recurrent_state())
        return Checkpoint(s.n_past)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Back to the checkpoint: its recurrent state and position (KV rows past it masked)."""
        s = self.session
        if checkpoint.position > s.n_past:
            raise EmberError(f"restore: checkpoint at {checkpoint.position} is past the sequence "
                             f"end {s.n_past}")
        if checkpoint.recurrent is not None:
            s.set_recurrent_state(dict(checkpoint.recurrent), checkpoint.position)
        elif not s.holds(checkpoint.position):
            raise EmberError(f"restore: the recurrent state at position {checkpoint.position} was "
                             f"overwritten ({s.state_planes} state planes); restore it sooner or "
                             "reserve more planes")
        else:
            s.truncate(checkpoint.position)

    def truncate(self, position: int, checkpoint: Checkpoint | None = None) -> None:
        """Drop the tail from position on. A recurrent model needs a checkpoint taken there."""
        if not self.session.is_recurrent:
            self.session.truncate(position)
            return
        if checkpoint is None or checkpoint.position != position:
            raise EmberError(f"truncate: {self.session.model.arch} has recurrent layers; their "
                             f"tail can only be dropped by restoring a checkpoint taken at {position}")
        self.restore(checkpoint)

    # ---- sequences -------------------------------------------------------------------------
    def _snapshot(self) -> _Saved:
        s, n = self.session, self.session.n_past
        s.caches_to_host()      # a GPU backend keeps the caches on the device between steps
        # a ring cache (sliding-window layer) has fewer rows than n: all of them are kept
        return _Saved(n, [k[:n].copy() for k in s.k_cache], [v[:n].copy() for v in s.v_cache],
                      s.recurrent_state(), s.swa_pos.copy())

    def _load(self, saved: _Saved) -> None:
        s, n = self.session, saved.position
        # the device copies are sent whole: the rows not written here must be current too
        s.caches_to_host()
        for cache, rows in zip(s.k_cache + s.v_cache, saved.k_rows + saved.v_rows):
            cache[:len(rows)] = rows
        s.caches_from_host()
        s.reset()
        s.swa_pos[:] = saved.swa_pos
        if s.is_recurrent:
            s.set_recurrent_state(dict(saved.recurrent), n)
        else:
            s.n_past = n

    def sequences(self) -> list[int]:
        return sorted({self.active, *self._saved})

    def add(self, seq: int) -> None:
        """A new empty sequence (not active until switched to)."""
        if seq == self.active or seq in self._saved:
            raise EmberError(f"sequence {seq} exists already")
        s = self.session
        empty_state = {k: np.zeros_like(v) for k, v in s.recurrent_state().items()}
        self._saved[seq] = _Saved(0, [k[:0].copy() for k in s.k_cache], [v[:0].copy() for v in s.v_cache],
                                  empty_state, np.full_like(s.swa_pos, -1))

    def fork(self, seq: int) -> None:
        """A copy of the active sequence under a new id (its caches and recurrent state)."""
        if seq == self.active or seq in self._saved:
            raise EmberError(f"sequence {seq} exists already")
        self._saved[seq] = self._snapshot()

    def switch(self, seq: int) -> None:
        if seq == self.active:
            return
        if seq not in self._saved:
            raise EmberError(f"no sequence {seq}; sequences: {self.sequences()}")
        current = self._snapshot()
        self._load(self._saved.pop(seq))
        self._saved[self.active] = current
        self.active = seq

    def remove(self, seq: int) -> None:
        if seq == self.active:
            raise EmberError("cannot remove the active sequence; switch to another first")
        if self._saved.pop(seq, None) is None:
            raise EmberError(f"no sequence {seq}; sequences: {self.sequences()}")
