from ember.ir.builder import GraphBuilder
from ember.runtime.plan_cache import UNKNOWN_UID, GraphVersion, PlanCache, next_uid


def chain(n: int, width: int = 8):
    b = GraphBuilder("g")
    x = b.input("x", "f32", (n, width))
    return b.build(b.exp(x))


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


def test_memory_budget_evicts_least_recently_used_and_keeps_the_newest():
    sizes = {"plan1": 40, "plan2": 40, "plan3": 40, "plan4": 500}
    cache, (build, calls) = PlanCache(budget_bytes=100, size_of=sizes.__getitem__), counting_build()
    v1, v2, v3 = (GraphVersion.of(chain(n)) for n in (1, 2, 3))
    cache.get(v1, build)
    cache.get(v2, build)
    assert cache.held_bytes == 80 and cache.stats.evictions == 0
    cache.get(v1, build)           # v1 is now the most recent
    cache.get(v3, build)           # 120 bytes > 100: evicts v2, the least recently used
    assert len(cache) == 2 and cache.held_bytes == 80 and len(calls) == 3
    cache.get(v1, build)
    assert len(calls) == 3
    big = GraphVersion.of(chain(4))
    cache.get(big, build)          # over the budget alone: everything else goes, it stays
    assert len(cache) == 1 and cache.held_bytes == 500
    cache.get(big, build)
    assert len(calls) == 4


def test_time_evicts_nothing(tiny_files, tmp_path, monkeypatch):
    """A pause between two generations (30 s here, by moving the clocks) recompiles nothing."""
    import time

    import numpy as np

    from ember.backends import get_backend
    from ember.models import load_model
    from ember.runtime.session import Session, SessionOptions
    from tiny_gguf import Spec

    session = Session(load_model(tiny_files[Spec("llama", "f32")]),
                      get_backend("cpu", threads=1, cache_dir=tmp_path), SessionOptions(n_ctx=64))

    def generate():
        session.reset()
        token = int(np.argmax(session.eval([1, 2, 3, 4])[-1]))
        for _ in range(3):
            token = int(np.argmax(session.eval([token])[-1]))
        return token

    first = generate()
    compiled = session.stats.compiles
    for clock in ("monotonic", "perf_counter", "time"):
        real = getattr(time, clock)
        monkeypatch.setattr(time, clock, lambda real=real: real() + 30.0)
    assert generate() == first
    assert session.stats.compiles == compiled and session.plans.stats.evictions == 0


def test_no_growth_past_the_bound_over_many_shapes():
    cache, (build, calls) = PlanCache(capacity=16), counting_build()
    for n in range(1, 10_001):
        cache.get(GraphVersion.of(chain(n, width=1)), build, key=("chain", n))
        assert len(cache) <= 16
    assert len(cache._by_uid) <= 16
    assert cache.stats.evictions == 10_000 - 16
