"""Resident memory per compiled step graph on the default model: fused weights exist once per
process, so compiling more graphs (prompt buckets) costs each graph its arena and code, not a
copy of the model's Q/K/V and gate/up weights (~45 MiB each on Gemma 3 270M before)."""
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.runtime.session import Session, SessionOptions

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)    # prompt lengths: one step graph each


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system: resident memory unknown")


@pytest.mark.slow
def test_resident_memory_is_flat_in_the_number_of_compiled_graphs(default_model_path):
    session = Session(load_model(default_model_path), get_backend("cpu", threads=2),
                      SessionOptions(n_ctx=1024))
    session.eval([1])
    first = resident_mib()
    arenas = 0.0
    for T in BUCKETS[1:]:
        session.reset()
        session.eval(list(range(1, T + 1)))
        newest = next(reversed(session.plans._entries.values())).plan
        arenas += newest.executable.planned_peak_bytes / 2**20
    assert session.stats.compiles == len(BUCKETS)
    per_graph = (resident_mib() - first - arenas) / (len(BUCKETS) - 1)
    assert per_graph < 5.0, f"{per_graph:.1f} MiB per compiled graph beyond its arena"
