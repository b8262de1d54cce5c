"""KV caches kept on the device between decode steps (OpenCL on PoCL, Vulkan on lavapipe; each
skips with its reason where missing): a session's greedy generation gives the same tokens and
logits as before (bit for bit as the per-step-copy path, within the OpenCL model test's bound of
the CPU backend), sequences forked and switched stay apart, the host copies come back on
request, and a decode step moves the small inputs and the logits but no cache byte."""
from __future__ import annotations


import numpy as np
import pytest

from devices import make_backend
from ember.backends import get_backend
from ember.models import load_model
from ember.runtime.memory import SequenceMemory
from ember.runtime.session import Session, SessionOptions
from ember.testing import nmse

from tiny_gguf import Spec, write_tiny_gguf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes

CPU_BOUND = 1e-2          # tests/backends/test_opencl_model.py: NMSE(gpu, cpu) per logits row
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=16)
PROMPT = [1, 5, 9, 13, 17]
DECODE = 14               # crosses the n_kv bucket at 16: two decode graphs share the caches


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_tiny_gguf(tmp_path_factory.mktemp("model") / "llama-f32.gguf", Spec("llama", "f32")))


@pytest.fixture(scope="module", params=["opencl", "vulkan"])
def gpu(request, backend_cache):
    return make_backend(request.param, backend_cache)


def greedy(session: Session, steps: int = DECODE) -> tuple[list[int], list[np.ndarray]]:
    rows = [session.eval(PROMPT)[-1]]
    for _ in range(steps):
        rows.append(session.eval([int(np.argmax(rows[-1]))])[-1])
    return [int(np.argmax(r)) for r in rows], rows


@pytest.fixture(scope="module")
def cpu_run(model, backend_cache):
    session = Session(model, get_backend("cpu", threads=1, cache_dir=backend_cache), OPTIONS)
    return session, greedy(session)


@pytest.fixture(scope="module")
def gpu_run(model, gpu):
    session = Session(model, gpu, OPTIONS)
    return session, greedy(session)


def test_greedy_generation_matches_the_cpu_backend(gpu_run, cpu_run):
    (_, (tokens, rows)), (_, (cpu_tokens, cpu_rows)) = gpu_run, cpu_run
    assert tokens == cpu_tokens
    for step, (got, want) in enumerate(zip(rows, cpu_rows)):
        assert nmse(got, want) <= CPU_BOUND, f"step {step}: NMSE {nmse(got, want):.3g}"


def test_resident_path_gives_the_bits_of_the_per_step_copies(model, gpu, gpu_run, monkeypatch):
    """Without bind the session runs each step through run(), which uploads and downloads every
    cache view: the same kernels on the same values, so the same bits."""
    _, (tokens, rows) = gpu_run
    session = Session(model, gpu, OPTIONS)
    executable_class = type(session._plan(8, 16, 1).executable)
    monkeypatch.delattr(executable_class, "bind")
    copied_tokens, copied_rows = greedy(session)
    assert copied_tokens == tokens
    for got, want in zip(rows, copied_rows):
        np.testing.assert_array_equal(got, want)


def test_host_caches_come_back_on_request(gpu_run, cpu_run):
    (session, _), (cpu_session, _) = gpu_run, cpu_run
    assert len(session.backend.resident) >= len(session.k_cache) + len(session.v_cache)
    session.caches_to_host()
    n = session.n_past
    for got, want in zip(session.k_cache + session.v_cache, cpu_session.k_cache + cpu_session.v_cache):
        np.testing.assert_allclose(got[:n].astype(np.float32), want[:n].astype(np.float32), rtol=2e-2, atol=2e-3)


def test_a_decode_step_moves_no_cache_bytes(model, gpu):
    session = Session(model, gpu, OPTIONS)
    session.eval(PROMPT)
    session.eval([7])                      # compiles and binds the decode graph
    before = gpu.transfers.snapshot()
    session.eval([8])
    up, down = (after - b for after, b in zip(gpu.transfers.snapshot(), before))
    step = session._plan(1, 16, 1)
    inputs = step.feed.inputs
    small = sum(a.nbytes for name, a in inputs.items() if "_cache." not in name)
    caches = sum(a.nbytes for name, a in inputs.items() if "_cache." in name)
    logits = model.hparams.n_vocab * 4
    assert 0 < up <= small + 4 and logits <= down <= logits + 4, (up, down, small)
    if gpu.name == "opencl":     # and no device memory of the step graph's own for the caches
        exe = step.executable
        assert all(buf is None for node, buf in zip(exe._inputs, exe._in_bufs) if "_cache." in node.name)
    # the same graph run the old way moves every cache view both ways
    before = gpu.transfers.snapshot()
    step.executable.run(inputs)
    up, down = (after - b for after, b in zip(gpu.transfers.snapshot(), before))
    assert up >= caches + small and down >= caches + logits


def test_fork_and_switch_keep_sequences_apart(model, gpu):
    session = Session(model, gpu, SessionOptions(n_ctx=32, kv_bucket=16))
    mem = SequenceMemory(session)
    session.eval([1, 5, 9, 13])
    mem.fork(1)                                   # 1 = copy of the 4-token prefix
    a = session.eval([20])                        # sequence 0 continues with 20
    mem.switch(1)
    assert session.n_past == 4
    b = session.eval([30])                        # sequence 1 continues with 30
    mem.switch(0)
    assert session.n_past == 5
    again = session.eval([21])
    # the same continuations computed from scratch give the same bits
    session.reset()
    session.eval([1, 5, 9, 13])
    np.testing.assert_array_equal(session.eval([20]), a)
    np.testing.assert_array_equal(session.eval([21]), again)
    session.reset()
    session.eval([1, 5, 9, 13])
    np.testing.assert_array_equal(session.eval([30]), b)


def test_bound_vulkan_run_resubmits_one_command_buffer(model, backend_cache):
    session = Session(model, make_backend("vulkan", backend_cache), OPTIONS)
    session.eval(PROMPT)
    session.eval([7])
    run = session._plan(1, 16, 1).feed._run
    recorded = run._command_buffer
    session.eval([8])
    session.eval([9])
    assert run._command_buffer is recorded and session._plan(1, 16, 1).feed._run is run


def test_sliding_window_ring_matches_the_cpu_backend(gpu, backend_cache, tmp_path_factory):
    """A ring cache (tests/models/test_swa_ring.py: window 3 + ubatch 4 -> 8 rows) is a root of
    its own, bound as a prefix by graphs of every n_kv, and wraps while resident."""
    gemma = load_model(write_tiny_gguf(tmp_path_factory.mktemp("gemma") / "gemma3-f32.gguf", Spec("gemma3", "f32")))
    ring = SessionOptions(n_ctx=32, ubatch=4, kv_bucket=8)
    tokens = [2, 17, 42, 99, 5, 23, 64, 7, 11, 3, 8, 19]

    def teacher_forced(session):
        return np.concatenate([session.eval(tokens[:6], all_logits=True)] + [session.eval([t]) for t in tokens[6:]])

    cpu = Session(gemma, get_backend("cpu", threads=1, cache_dir=backend_cache), ring)
    session = Session(gemma, gpu, ring)
    assert [c.shape[0] for c in session.k_cache] == [8, 32]
    want, got = teacher_forced(cpu), teacher_forced(session)
    assert nmse(got, want) <= CPU_BOUND
    assert (np.argmax(got, axis=1) == np.argmax(want, axis=1)).all()


def test_a_bound_step_graph_holds_no_cache_memory_of_its_own(model, gpu):
    """The caches live once, in the backend's resident store: a bound step graph made no
    device buffer of its own for them (a plain run would make one on first use)."""
    session = Session(model, gpu, OPTIONS)
    session.eval(PROMPT)
    session.eval([7])
    exe = session._plan(1, 16, 1).executable
    caches = [i for i, node in enumerate(exe._inputs) if "_cache." in node.name]
    assert caches
    if gpu.name == "opencl":
        assert all(exe._in_bufs[i] is None for i in caches)
    else:
        assert all(("in", i) not in exe._regions for i in caches)
