"""Device-resident host arrays: the KV caches a GPU backend keeps on the device between steps.

A step graph updates its caches in place (set_rows; Executable.in_place_outputs), so a GPU
backend that uploaded every cache view before each step and downloaded it after would move
n_kv x layers x 2 rows each way per token. Instead the backend keeps ONE device buffer per host
cache array, shared by every executable it compiled (graphs of different n_kv read a prefix of
it), uploaded when first bound and never downloaded per step; the host copy is stale from then
on until sync_to_host brings it back.

Identity: a view (cache[:n]) is traced through `.base` to the array that owns its memory (the
root); the root's data address keys the entry, and the view is the root's bytes from its own
address on. The entry holds the root by weak reference and is dropped when the root dies, so an
address reused by a later array never finds a stale entry (a live view keeps its root alive).

Imports NumPy and ember.errors; the backends supply the device buffers (subclasses of ResidentStore).
"""
from __future__ import annotations

import abc
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from ember.errors import EmberError


@dataclass
class TransferStats:
    """Bytes a backend moved between host and device (inputs, outputs, resident syncs); synced:
    the part of them that resident arrays (KV caches, recurrent state planes) moved through
    sync_to_host / sync_to_device, which a bound run never does on its own."""
    uploaded: int = 0
    downloaded: int = 0
    synced: int = 0

    def snapshot(self) -> tuple[int, int]:
        return self.uploaded, self.downloaded


def host_root(array: np.ndarray) -> np.ndarray:
    """The array that owns array's memory (following views through .base)."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


class Resident:
    """One host array's device copy. device_newer: a run wrote the device copy since the host
    copy was last brought up to date."""

    def __init__(self, root: np.ndarray, buffer):
        self.root = weakref.ref(root)
        self.nbytes = root.nbytes
        self.buffer = buffer
        self.device_newer = False


class ResidentStore(abc.ABC):
    """Device copies of host arrays, keyed by the root's data address (see the module doc).
    Subclasses give _allocate (a device buffer with the root's bytes), _download and _free."""

    def __init__(self, transfers: TransferStats):
        self.transfers = transfers
        self.lock = threading.Lock()
        self._entries: dict[int, Resident] = {}

    def __len__(self) -> int:
        return len(self._entries)

    # ---- for subclasses --------------------------------------------------------------------------
    @abc.abstractmethod
    def _allocate(self, root: np.ndarray):
        """A device buffer holding root's bytes."""

    @abc.abstractmethod
    def _upload(self, entry: Resident, root: np.ndarray):
        """Copy root's bytes into entry's buffer."""

    @abc.abstractmethod
    def _download(self, entry: Resident, root: np.ndarray):
        """Copy entry's buffer into root."""

    def _free(self, entry: Resident):
        pass

    # ---- binding ---------------------------------------------------------------------------------
    def acquire(self, view: np.ndarray, alignment: int = 1) -> tuple[Resident, int] | None:
        """(entry, byte offset of view in it), creating and uploading the entry the first time;
        None when view cannot be resident (not contiguous, or at an offset the device cannot
        bind), and the caller copies it per run as before."""
        root = host_root(view)
        if not (view.flags.c_contiguous and root.flags.c_contiguous and view.nbytes):
            return None
        offset = view.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        if offset < 0 or offset + view.nbytes > root.nbytes or offset % alignment:
            return None
        key = root.__array_interface__["data"][0]
        with self.lock:
            entry = self._entries.get(key)
            if entry is None or entry.root() is not root:
                entry = Resident(root, self._allocate(root))
                self.transfers.uploaded += root.nbytes
                self._entries[key] = entry
                weakref.finalize(root, self._drop, key, entry)
        return entry, offset

    def find(self, array: np.ndarray) -> Resident | None:
        root = host_root(array)
        entry = self._entries.get(root.__array_interface__["data"][0])
        return entry if entry is not None and entry.root() is root else None

    def _drop(self, key: int, entry: Resident):
        with self.lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
        self._free(entry)

    # ---- host access -----------------------------------------------------------------------------
    def sync_to_host(self, arrays) -> None:
        """Bring the host copies of arrays (or of the arrays they view) up to date: a download of
        each resident root a run wrote since; others cost nothing."""
        for array in arrays:
            entry = self.find(array)
            if entry is not None and entry.device_newer:
                root = entry.root()
                with self.lock:
                    self._download(entry, root)
                    entry.device_newer = False
                self.transfers.downloaded += entry.nbytes
                self.transfers.synced += entry.nbytes

    def sync_to_device(self, arrays) -> None:
        """The host wrote arrays: upload each resident root whole (so bring it to the host with
        sync_to_host first when only part of it was written)."""
        for array in arrays:
            entry = self.find(array)
            if entry is not None:
                root = entry.root()
                with self.lock:
                    self._upload(entry, root)
                    entry.device_newer = False
                self.transfers.uploaded += entry.nbytes
                self.transfers.synced += entry.nbytes


def root_bytes(root: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a contiguous root's bytes."""
    return root.reshape(-1).view(np.uint8)


class BoundInputs:
    """Input replacement by name between runs, shared by the GPU backends' bound runs (which
    set executable, inputs, outputs and resident {input index: Resident})."""

    def _begin(self, fresh, inputs) -> None:
        """A call's set-up: replaced inputs checked (Executable._checked_replacement), `fresh`
        outputs in new arrays."""
        exe = self.executable
        for name, value in (inputs or {}).items():
            i = exe._input_index.get(name)
            if i is not None and value is self.inputs[i]:
                continue
            if i in self.resident:
                raise EmberError(f"graph {exe.graph.name!r}: input {name!r} is resident on the device; "
                                 "bind again to run on another array")
            self.inputs[exe._checked_replacement(name, value)] = value
        for k in fresh:
            shape, dtype = exe._output_specs[k]
            self.outputs[k] = np.empty(shape, dtype)


class ResidentSync:
    """The host-sync hooks of a backend whose resident store is self._resident (None until a
    run binds a cache): the session calls them where the host reads or writes cache rows."""

    def sync_to_host(self, arrays) -> None:
        """Bring back the device copies of resident arrays a run wrote since (the host reads them)."""
        if self._resident is not None:
            self._resident.sync_to_host(arrays)

    def sync_to_device(self, arrays) -> None:
        """Send resident arrays the host wrote (whole: sync_to_host first if only part was)."""
        if self._resident is not None:
            self._resident.sync_to_device(arrays)


def bind_resident(executable, inputs, outputs, acquire) -> tuple[list, list, dict]:
    """A GPU executable's bind set-up: (input arrays, output arrays, {input index: (Resident,
    byte offset)}), the arrays checked as every executable checks them and the inputs that may
    stay resident (bound_in_place_inputs) acquired through acquire(array) -> (entry, offset),
    or None where this device cannot bind that array where it lies."""
    arrays = executable._checked_inputs(inputs)
    given = outputs or {}
    results = executable._checked_outputs(given, arrays)
    resident = {}
    for i in bound_in_place_inputs(executable, arrays, given):
        found = acquire(arrays[i])
        if found is not None:
            resident[i] = found
    return arrays, results, resident


def bound_in_place_inputs(executable, arrays: list[np.ndarray], given) -> list[int]:
    """The inputs a bound run may keep resident: those whose in-place output (the cache a step
    updates with set_rows) was given as the very array of the input."""
    found = []
    for k, name in executable.in_place_outputs.items():
        i, out = executable._input_index[name], given.get(k)
        if out is not None and out.__array_interface__["data"][0] == arrays[i].__array_interface__["data"][0]:
            found.append(i)
    return found


def plain_run_inputs(executable, store: ResidentStore | None, inputs, outputs) -> tuple[list, list]:
    """(input arrays, output arrays) of a plain (unbound) run of a GPU executable, checked. Such
    a run works on host arrays, so an input that is resident (a bound run's cache) is brought to
    the host first; plain_run_done writes it back."""
    if store is not None and len(store):
        store.sync_to_host([v for v in inputs.values() if isinstance(v, np.ndarray)])
    arrays = executable._checked_inputs(inputs)
    return arrays, executable._checked_outputs(outputs or {}, arrays)


def plain_run_done(executable, store: ResidentStore | None, outputs) -> None:
    """After a plain run: the in-place outputs given (resident caches updated on the host)
    replace their device copies, so the host arrays stay the truth for this path."""
    if store is not None and len(store) and outputs:
        store.sync_to_device([outputs[k] for k in executable.program.in_place if k in outputs])
