from ember.ir.builder import GraphBuilder
from ember.runtime.plan_cache import UNKNOWN_UID, GraphVersion, PlanCache, next_uid


def chain(n: int, width: int = 8):
    b = GraphBuilder("g")
    x = b.input("x", "f32", (n, width))
    return b.build(b.exp(x))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def counting_build():
    calls = []

    def build(graph):
        calls.append(graph)
        return f"plan{len(calls)}"
    return build, calls


def test_uids_count_up_from_one_and_never_repeat():
    a, b = next_uid(), next_uid()
    assert a >= 1 and b == a + 1


def test_decode_steps_hit_by_uid():
    cache, (build, calls) = PlanCache(), counting_build()
    version = GraphVersion.of(chain(1))
    plans = [cache.get(version, build) for _ in range(100)]
    assert len(calls) == 1 and set(plans) == {"plan1"}
    assert cache.stats.misses == 1 and cache.stats.uid_hits == 99


def test_equal_graph_rebuilt_hits_structurally():
    cache, (build, calls) = PlanCache(), counting_build()
    cache.get(GraphVersion.of(chain(1)), build)
    assert cache.get(GraphVersion.of(chain(1)), build) == "plan1"
    assert len(calls) == 1 and cache.stats.hits == 1 and cache.stats.uid_hits == 0


def test_shape_change_misses():
    cache, (build, calls) = PlanCache(), counting_build()
    cache.get(GraphVersion.of(chain(1)), build)
    cache.get(GraphVersion.of(chain(2)), build)
    assert len(calls) == 2 and cache.stats.misses == 2


def test_uid_zero_never_matches():
    cache, (build, calls) = PlanCache(), counting_build()
    cache.get(GraphVersion(chain(1), UNKNOWN_UID), build)
    cache.get(GraphVersion(chain(3), UNKNOWN_UID), build)
    assert len(calls) == 2 and cache.stats.uid_hits == 0
    # an unknown-uid graph can still hit by structure, never by uid
    cache.get(GraphVersion(chain(1), UNKNOWN_UID), build)
    assert len(calls) == 2 and cache.stats.uid_hits == 0


def test_lru_evicts_least_recently_used():
    cache, (build, calls) = PlanCache(capacity=2), counting_build()
    v1, v2, v3 = (GraphVersion.of(chain(n)) for n in (1, 2, 3))
    cache.get(v1, build)
    cache.get(v2, build)
    cache.get(v1, build)           # v1 is now the most recent
    cache.get(v3, build)           # evicts v2
    assert cache.stats.evictions == 1 and len(cache) == 2
    cache.get(v1, build)
    assert len(calls) == 3
    cache.get(v2, build)
    assert len(calls) == 4


def test_idle_entries_are_evicted_on_sweep():
    clock = FakeClock()
    cache, (build, calls) = PlanCache(max_idle_s=10, sweep_every_s=5, clock=clock), counting_build()
    old = GraphVersion.of(chain(1))
    cache.get(old, build)
    clock.t = 6.0
    cache.get(GraphVersion.of(chain(2)), build)   # sweep at 6 s: chain(1) idle 6 s, kept
    assert len(cache) == 2
    clock.t = 12.0
    cache.get(GraphVersion.of(chain(2)), build)   # sweep at 12 s: chain(1) idle 12 s, evicted
    assert len(cache) == 1 and cache.stats.evictions == 1
    cache.get(old, build)
    assert len(calls) == 3


def test_no_growth_past_the_bound_over_many_shapes():
    cache, (build, calls) = PlanCache(capacity=16), counting_build()
    for n in range(1, 10_001):
        cache.get(GraphVersion.of(chain(n, width=1)), build, key=("chain", n))
        assert len(cache) <= 16
    assert len(cache._by_uid) <= 16
    assert cache.stats.evictions == 10_000 - 16
