"""Graph versions (uids) and the bounded cache of compiled plans.

As in ggml, every graph handed to the runtime gets a uid from one global counter starting at
1; uid 0 means "unknown" and never matches anything. A plan (compiled kernels, buffer plan,
bound arguments) is found by uid in O(1) when the same graph object comes back (the decode
loop), or else by structural equality of the graph (a graph rebuilt equal: same structure,
shapes, dtypes and constants' identity). The cache is bounded twice: LRU with a capacity,
and entries unused for `max_idle_s` are evicted on a sweep at most every `sweep_every_s`
(the fix ggml's CUDA graph cache needed after growing without bound).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

from ember.ir.graph import Graph

UNKNOWN_UID = 0
_counter = itertools.count(1)
_lock = threading.Lock()

Plan = TypeVar("Plan")


def next_uid() -> int:
    with _lock:
        return next(_counter)


@dataclass(frozen=True)
class GraphVersion:
    """A graph as the runtime knows it: the graph and the uid it was scheduled under."""
    graph: Graph
    uid: int

    @staticmethod
    def of(graph: Graph) -> "GraphVersion":
        return GraphVersion(graph, next_uid())


@dataclass
class CacheStats:
    hits: int = 0
    uid_hits: int = 0       # hits found by uid, with no structural comparison
    misses: int = 0
    evictions: int = 0

    def __str__(self) -> str:
        return (f"plan cache: {self.hits} hits ({self.uid_hits} by uid), {self.misses} misses, "
                f"{self.evictions} evictions")


@dataclass
class _Entry(Generic[Plan]):
    plan: Plan
    uid: int
    last_used: float


class PlanCache(Generic[Plan]):
    def __init__(self, capacity: int = 32, max_idle_s: float = 10.0, sweep_every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError("plan cache capacity must be at least 1")
        self.capacity = capacity
        self.max_idle_s = max_idle_s
        self.sweep_every_s = sweep_every_s
        self.clock = clock
        self.stats = CacheStats()
        self._entries: "OrderedDict[Hashable, _Entry[Plan]]" = OrderedDict()
        self._by_uid: dict[int, Hashable] = {}
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, version: GraphVersion, build: Callable[[Graph], Plan], key: Hashable = None) -> Plan:
        """The plan for this graph version, built (and cached) on a miss.

        `key` defaults to the graph itself (structural equality); callers may pass a cheaper
        key that determines the graph, e.g. the build parameters of a step graph.
        """
        now = self.clock()
        self._maybe_sweep(now)
        key = version.graph if key is None else key
        if version.uid != UNKNOWN_UID and version.uid in self._by_uid:
            found = self._by_uid[version.uid]
            self.stats.uid_hits += 1
            return self._touch(found, now)
        if key in self._entries:
            entry = self._entries[key]
            if version.uid != UNKNOWN_UID:
                self._by_uid.pop(entry.uid, None)
                entry.uid = version.uid
                self._by_uid[version.uid] = key
            return self._touch(key, now)
        self.stats.misses += 1
        plan = build(version.graph)
        # used as of now, after the build: a build longer than max_idle_s (a compile on a busy
        # machine) must not leave the new plan looking idle to the next sweep
        self._entries[key] = _Entry(plan, version.uid, self.clock())
        if version.uid != UNKNOWN_UID:
            self._by_uid[version.uid] = key
        while len(self._entries) > self.capacity:
            self._evict(next(iter(self._entries)))
        return plan

    def _touch(self, key: Hashable, now: float) -> Plan:
        self.stats.hits += 1
        entry = self._entries[key]
        entry.last_used = now
        self._entries.move_to_end(key)
        return entry.plan

    def _evict(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self._by_uid.pop(entry.uid, None)
        self.stats.evictions += 1

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < self.sweep_every_s:
            return
        self._last_sweep = now
        for key in [k for k, e in self._entries.items() if now - e.last_used > self.max_idle_s]:
            self._evict(key)

    def clear(self) -> None:
        self._entries.clear()
        self._by_uid.clear()
