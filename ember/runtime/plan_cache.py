"""Graph versions (uids) and the bounded cache of compiled plans.

As in ggml, every graph handed to the runtime gets a uid from one global counter starting at
1; uid 0 means "unknown" and never matches anything. A plan (compiled kernels, buffer plan,
bound arguments) is found by uid in O(1) when the same graph object comes back (the decode
loop), or else by structural equality of the graph (a graph rebuilt equal: same structure,
shapes, dtypes and constants' identity). The cache is bounded twice, least recently used
first: by a number of plans and by a memory budget (the bytes each plan holds, as its owner
measures them), the bounds ggml's CUDA graph cache needed after growing without bound. Time
does not evict: a user who pauses for a minute between two prompts must not pay a recompile
(an earlier version evicted plans idle for 10 s, and counted compile time as idle).
"""
from __future__ import annotations

import itertools
import threading
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
    nbytes: int


class PlanCache(Generic[Plan]):
    """`capacity` plans at most, and at most `budget_bytes` held by them (`size_of(plan)`
    each; None: no budget), evicting the least recently used; the plan just used is always
    kept, even when it alone is over the budget."""

    def __init__(self, capacity: int = 32, budget_bytes: int | None = None,
                 size_of: Callable[[Plan], int] = lambda plan: 0):
        if capacity < 1:
            raise ValueError("plan cache capacity must be at least 1")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError("plan cache budget must not be negative")
        self.capacity = capacity
        self.budget_bytes = budget_bytes
        self.size_of = size_of
        self.stats = CacheStats()
        self._entries: "OrderedDict[Hashable, _Entry[Plan]]" = OrderedDict()
        self._by_uid: dict[int, Hashable] = {}
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, version: GraphVersion, build: Callable[[Graph], Plan], key: Hashable = None) -> Plan:
        """The plan for this graph version, built (and cached) on a miss.

        `key` defaults to the graph itself (structural equality); callers may pass a cheaper
        key that determines the graph, e.g. the build parameters of a step graph.
        """
        key = version.graph if key is None else key
        if version.uid != UNKNOWN_UID and version.uid in self._by_uid:
            found = self._by_uid[version.uid]
            self.stats.uid_hits += 1
            return self._touch(found)
        if key in self._entries:
            entry = self._entries[key]
            if version.uid != UNKNOWN_UID:
                self._by_uid.pop(entry.uid, None)
                entry.uid = version.uid
                self._by_uid[version.uid] = key
            return self._touch(key)
        self.stats.misses += 1
        plan = build(version.graph)
        entry = _Entry(plan, version.uid, int(self.size_of(plan)))
        self._entries[key] = entry
        self.held_bytes += entry.nbytes
        if version.uid != UNKNOWN_UID:
            self._by_uid[version.uid] = key
        while len(self._entries) > 1 and self._over_bounds():
            self._evict(next(iter(self._entries)))
        return plan

    def _over_bounds(self) -> bool:
        over_budget = self.budget_bytes is not None and self.held_bytes > self.budget_bytes
        return len(self._entries) > self.capacity or over_budget

    def _touch(self, key: Hashable) -> Plan:
        self.stats.hits += 1
        self._entries.move_to_end(key)
        return self._entries[key].plan

    def _evict(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self._by_uid.pop(entry.uid, None)
        self.held_bytes -= entry.nbytes
        self.stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self._by_uid.clear()
        self.held_bytes = 0
