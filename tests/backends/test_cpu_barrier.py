"""The CPU team barrier (common.h's ember_barrier_wait), compiled on its own: nobody passes it
early, even with more threads than cores, and a thread left waiting sleeps instead of keeping
its core busy (issue 18: with another busy process on the machine, a spinning or yielding
waiter holds the core its late teammate needs)."""
from __future__ import annotations

import ctypes
import os
import sys
import threading

import pytest

from ember.backends.cpu.compiler import CompileCache
from ember.codegen.cpu import TEMPLATES

SOURCE = r"""
#include <time.h>
#include <unistd.h>

/* rounds of: each thread writes its slot, barrier, every thread reads every slot, barrier;
 * thread 0 naps nap_us before arriving in every nap_every-th round. Returns the slots read
 * with a value other than the round's (a thread let through before all had arrived). */
int barrier_rounds(int nth, int rounds, int nap_every, int nap_us, int *slots) {
    ember_barrier bar __attribute__((aligned(64))) = {0};
    int bad = 0;
    #pragma omp parallel num_threads(nth) reduction(+:bad)
    {
        const int ith = omp_get_thread_num(), n = omp_get_num_threads();
        for (int r = 1; r <= rounds; r++) {
            if (ith == 0 && nap_every > 0 && r % nap_every == 0) usleep(nap_us);
            __atomic_store_n(&slots[ith], r, __ATOMIC_RELAXED);
            ember_barrier_wait(&bar, n);
            for (int t = 0; t < n; t++) bad += __atomic_load_n(&slots[t], __ATOMIC_RELAXED) != r;
            ember_barrier_wait(&bar, n);
        }
    }
    return bad;
}

/* CPU seconds thread 1 spends in one barrier while thread 0 naps nap_us before arriving. */
double waiter_cpu_seconds(int nap_us) {
    ember_barrier bar __attribute__((aligned(64))) = {0};
    double spent = -1.0;
    #pragma omp parallel num_threads(2)
    {
        if (omp_get_num_threads() == 2) {
            if (omp_get_thread_num() == 0) {
                usleep(nap_us);
                ember_barrier_wait(&bar, 2);
            } else {
                struct timespec a, b;
                clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
                ember_barrier_wait(&bar, 2);
                clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
                spent = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
            }
        }
    }
    return spent;
}

/* The team sizes common.h's governor picks over `runs` runs asked for n threads, when a run of
 * team size s takes before[s] seconds until run change_at and after[s] from then on; at
 * change_at the barrier's spin limit goes from spins_before (0: the maximum, waits that end
 * while spinning) to spins_after (0: left as it is; EMBER_BARRIER_SPINS_MIN: waits end in
 * sleep, a teammate is held back). */
void governor_sizes(int n, int runs, int change_at, const double *before, const double *after,
                    int spins_before, int spins_after, int *sizes) {
    memset(&ember_team, 0, sizeof ember_team);
    ember_barrier_spins = spins_before > 0 ? spins_before : EMBER_BARRIER_SPINS_MAX;
    for (int i = 0; i < runs; i++) {
        if (i == change_at && spins_after > 0) ember_barrier_spins = spins_after;
        int governed;
        const int s = ember_team_begin(n, &governed);
        sizes[i] = s;
        if (governed) ember_team_end((i < change_at ? before : after)[s]);
    }
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cache = CompileCache(tmp_path_factory.mktemp("barrier-cache"))
    path = cache.build(TEMPLATES.static_file("common.h") + SOURCE, name="barrier_test")
    library = ctypes.CDLL(str(path))
    library.barrier_rounds.restype = ctypes.c_int
    library.barrier_rounds.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_int)]
    library.waiter_cpu_seconds.restype = ctypes.c_double
    library.waiter_cpu_seconds.argtypes = [ctypes.c_int]
    library.governor_sizes.restype = None
    return library


def call_with_deadline(fn, *args, seconds: float = 60.0):
    """fn(*args) in a daemon thread; a barrier that never releases fails the test, not the run."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"{fn.__name__}{args} did not return within {seconds:.0f} s (a waiter never woken?)"
    return result[0]


@pytest.mark.parametrize("nth, rounds, nap_every", [
    (2, 3000, 0),       # the usual case: two threads, short waits (spinning)
    (5, 400, 0),        # more threads than this machine's cores: waiters yield and sleep
    (3, 200, 10),       # a teammate that naps 2 ms now and then: the others sleep and are woken
], ids=["two-threads", "oversubscribed", "late-teammate"])
def test_nobody_passes_the_barrier_early(lib, nth, rounds, nap_every):
    slots = (ctypes.c_int * nth)()
    bad = call_with_deadline(lib.barrier_rounds, nth, rounds, nap_every, 2000, slots)
    assert bad == 0
    assert list(slots) == [rounds] * nth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the futex sleep is Linux only")
def test_a_waiter_sleeps_instead_of_holding_its_core(lib):
    nap = 0.2
    spent = call_with_deadline(lib.waiter_cpu_seconds, int(nap * 1e6))
    assert spent >= 0.0, "the team did not get two threads"
    # a spin-then-yield waiter burns most of the nap (the core stays busy); a sleeper a few ms
    assert spent < 0.25 * nap, f"the waiter used {spent * 1e3:.1f} ms of CPU during a {nap * 1e3:.0f} ms wait"


def test_default_thread_count_is_the_affinity_mask():
    from ember.backends.cpu.backend import CpuBackend
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert CpuBackend().threads == expected


def governor_sizes(lib, n: int, runs: int, before, after=None, change_at=None, spins_before=0,
                   spins_after=0) -> list[int]:
    """The team size of every run (see SOURCE's governor_sizes); before/after: seconds per run
    of each team size 1..n."""
    costs = [(ctypes.c_double * (abs(n) + 1))(0.0, *seconds) for seconds in (before, after or before)]
    sizes = (ctypes.c_int * runs)()
    lib.governor_sizes(n, runs, runs if change_at is None else change_at, costs[0], costs[1], spins_before, spins_after, sizes)
    return list(sizes)


def test_governor_never_probes_a_smaller_team_on_a_quiet_machine(lib):
    # the barrier's waits end while spinning: one thread less is never tried, whatever the times
    assert set(governor_sizes(lib, 2, 4000, before=[1.5, 1.0])) == {2}
    assert set(governor_sizes(lib, 2, 4000, before=[1.0, 1.3])) == {2}


def test_governor_keeps_the_team_when_it_is_fastest(lib):
    # waits ending in sleep, yet 2 threads still win
    sizes = governor_sizes(lib, 2, 4000, before=[1.5, 1.0], spins_before=64)
    assert set(sizes) == {1, 2}, "it never tried one thread less"
    # probes back off: in the last half, runs with one thread are a fraction of a percent
    assert sizes[2000:].count(1) / 2000 < 0.01


def test_governor_drops_a_thread_held_back_by_another_process(lib):
    sizes = governor_sizes(lib, 2, 2000, before=[1.0, 1.3], spins_before=64)   # 2 slower than 1
    assert sizes[:1] == [2]
    # settled on one thread, probing two for 6 runs in every 30 (below the count asked for the
    # probes do not back off: nothing else would tell when the other process is gone)
    assert sizes[200:].count(1) / 1800 > 0.78


def test_governor_follows_contention_that_comes_and_goes(lib):
    quiet, busy = [1.5, 1.0], [1.0, 1.4]
    sizes = governor_sizes(lib, 2, 6000, before=quiet, after=busy, change_at=3000,
                           spins_after=64)       # the barrier's waits end in sleep from then on
    # the sleeping waits shorten the wait for the next probe: one thread soon after the change
    assert sizes[3100:].count(1) / 2900 > 0.78
    # and two again soon after the other process is gone (one thread less backs off, one more
    # keeps probing often)
    back = governor_sizes(lib, 2, 6000, before=busy, after=quiet, change_at=3000, spins_before=64)
    assert back[3100:].count(2) / 2900 > 0.95


def test_governor_moves_one_thread_at_a_time_and_never_above_the_request(lib):
    # 4 threads asked for, 3 fastest (one core taken): it settles at 3, never tries 5
    sizes = governor_sizes(lib, 4, 3000, before=[2.0, 1.4, 1.0, 1.2], spins_before=64)
    assert max(sizes) == 4 and min(sizes) >= 2
    assert sizes[1000:].count(3) / 2000 > 0.78


def test_governor_is_off_for_a_negative_thread_count(lib):
    assert set(governor_sizes(lib, -2, 500, before=[1.0, 5.0])) == {2}
