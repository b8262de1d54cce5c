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
