"""The generation session on the CPU backend: caches, micro-batches, graph reuse, passes."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.errors import EmberError
from ember.models import load_model
from ember.runtime.session import Session, SessionOptions
from model_steps import ReferenceSession, nmse
from tiny_gguf import Spec
from tiny_gguf_ssm import SsmSpec

PROMPT = [1, 17, 42, 99, 5, 23, 64, 7, 11, 3]


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    return get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp("cpu-cache"))


def run(model, backend, options, prompt=PROMPT, decode=6):
    """Teacher-forced logits of the prompt, then greedy decode logits, and the session."""
    s = Session(model, backend, options)
    logits = [s.eval(prompt, all_logits=True)]
    token = int(np.argmax(logits[-1][-1]))
    for _ in range(decode):
        logits.append(s.eval([token]))
        token = int(np.argmax(logits[-1][-1]))
    return np.concatenate(logits), s


@pytest.mark.parametrize("spec", [Spec("llama", "q8_0"),
                                  pytest.param(Spec("gemma3", "q4_k"), marks=pytest.mark.slow)], ids=str)
def test_reuse_on_and_off_give_identical_logits(tiny_files, cpu, spec):
    model = load_model(tiny_files[spec])
    with_reuse, s1 = run(model, cpu, SessionOptions(n_ctx=64, kv_bucket=16))
    without, s2 = run(model, cpu, SessionOptions(n_ctx=64, kv_bucket=16, reuse=False))
    np.testing.assert_array_equal(with_reuse, without)
    # with reuse, decode steps hit the plan cache by uid; without, every step builds its graph
    assert s1.plans.stats.uid_hits >= 5 and s1.stats.graph_builds == 2
    assert s1.stats.run_seconds > 0 and s1.stats.host_seconds > 0
    assert s2.stats.graph_builds == 7


def test_bucket_change_misses_then_hits(tiny_files, cpu):
    model = load_model(tiny_files[Spec("llama", "f32")])
    s = Session(model, cpu, SessionOptions(n_ctx=64, kv_bucket=8))
    s.eval([1, 2, 3, 4, 5, 6])           # n_kv 8
    for t in range(5):                   # positions 6..10: buckets 8, 8, 16, 16, 16
        s.eval([t + 1])
    assert s.plans.stats.misses == 3      # prompt, decode at n_kv 8, decode at n_kv 16
    assert s.plans.stats.uid_hits == 3


def test_micro_batches_equal_one_batch(tiny_files, cpu):
    model = load_model(tiny_files[Spec("qwen2", "f32")])
    one, _ = run(model, cpu, SessionOptions(n_ctx=64, ubatch=64), decode=0)
    split, _ = run(model, cpu, SessionOptions(n_ctx=64, ubatch=3), decode=0)
    # rows are batch invariant on the CPU backend, so splitting the prompt changes no bit
    np.testing.assert_array_equal(one, split)


@pytest.mark.parametrize("spec", [Spec("qwen2", "q8_0"),
                                  pytest.param(Spec("llama", "q4_0"), marks=pytest.mark.slow),
                                  pytest.param(Spec("gemma3", "f16"), marks=pytest.mark.slow)], ids=str)
def test_fusion_passes_change_no_bit(tiny_files, cpu, spec):
    model = load_model(tiny_files[spec])
    fused, _ = run(model, cpu, SessionOptions(n_ctx=64, kv_bucket=16), decode=2)
    unfused = SessionOptions(n_ctx=64, kv_bucket=16, disabled_passes=frozenset({"fuse-qkv", "fuse-elementwise"}))
    plain, _ = run(model, cpu, unfused, decode=2)
    np.testing.assert_array_equal(fused, plain)


def test_context_overflow_is_refused(tiny_files, cpu):
    model = load_model(tiny_files[Spec("llama", "f32")])
    s = Session(model, cpu, SessionOptions(n_ctx=8, kv_bucket=8))
    s.eval([1, 2, 3, 4, 5, 6])
    with pytest.raises(Exception, match="context full"):
        s.eval([1, 2, 3])


def test_truncate_then_redecode_matches(tiny_files, cpu):
    model = load_model(tiny_files[Spec("llama", "f32")])
    s = Session(model, cpu, SessionOptions(n_ctx=32, kv_bucket=8))
    s.eval(PROMPT[:6])
    first = s.eval([9])
    s.eval([10, 11])
    s.truncate(6)
    np.testing.assert_array_equal(s.eval([9]), first)


# ---- recurrent (Mamba-2) layers ----------------------------------------------------------------
@pytest.mark.parametrize("spec", [SsmSpec("granitehybrid"), pytest.param(SsmSpec("mamba2"), marks=pytest.mark.slow)],
                         ids=str)
def test_recurrent_session_matches_reference_in_any_batching(tiny_files, cpu, spec):
    """The state is carried across micro-batches and steps; splitting the prompt or changing the
    thread count changes no bit (the SSM kernels are batch invariant and deterministic)."""
    model = load_model(tiny_files[spec])
    one, s = run(model, cpu, SessionOptions(n_ctx=64, kv_bucket=16), decode=3)
    one_thread = get_backend("cpu", threads=1, cache_dir=cpu.cache_dir)
    split, _ = run(model, one_thread, SessionOptions(n_ctx=64, kv_bucket=16, ubatch=3), decode=3)
    np.testing.assert_array_equal(one, split)
    ref = ReferenceSession(model, 16)
    tokens = PROMPT + [int(np.argmax(row)) for row in one[len(PROMPT) - 1:-1]]
    expected = np.concatenate([ref.step(PROMPT)] + [ref.step([t]) for t in tokens[len(PROMPT):]])
    assert nmse(one, expected) < 1e-10
    assert list(s.recurrent_state()) == [f"{kind}_state.{il}" for il in model.recurrent_layers
                                           for kind in ("conv", "ssm")]


def test_recurrent_state_snapshot_and_restore(tiny_files, cpu):
    model = load_model(tiny_files[SsmSpec("granitehybrid")])
    s = Session(model, cpu, SessionOptions(n_ctx=32, kv_bucket=16))
    assert s.is_recurrent and all(not a.any() for a in s.recurrent_state().values())
    first = s.eval(PROMPT[:6])
    snapshot, position = s.recurrent_state(), s.n_past
    after = s.eval([9])
    s.eval([10, 11])
    with pytest.raises(EmberError, match="recurrent layers"):
        s.truncate(position)
    s.set_recurrent_state(snapshot, n_past=position)
    np.testing.assert_array_equal(s.eval([9]), after)
    s.reset()
    assert all(not a.any() for a in s.recurrent_state().values())
    np.testing.assert_array_equal(s.eval(PROMPT[:6]), first)
    with pytest.raises(ValueError, match="expected arrays"):
        s.set_recurrent_state({})


def test_transformer_session_has_no_recurrent_state(tiny_files, cpu):
    s = Session(load_model(tiny_files[Spec("llama", "f32")]), cpu, SessionOptions(n_ctx=16, kv_bucket=8))
    assert not s.is_recurrent and s.recurrent_state() == {}


@pytest.mark.parametrize("spec", [Spec("llama", "q8_0"), Spec("gemma3", "f32")], ids=str)
def test_padded_steps_change_no_bit_and_share_graphs(tiny_files, cpu, spec):
    model = load_model(tiny_files[spec])
    def last_logits(options):
        """7 prompt tokens with one output row (padded to 8 rows), then 3 decode steps."""
        session = Session(model, cpu, options)
        rows = [session.eval(PROMPT[:7])] + [session.eval([t]) for t in (5, 9, 2)]
        return np.concatenate(rows), session
    padded, s = last_logits(SessionOptions(n_ctx=64, kv_bucket=16, ubatch=8))
    exact, _ = last_logits(SessionOptions(n_ctx=64, kv_bucket=16, ubatch=8, pad_tokens=False))
    np.testing.assert_array_equal(padded, exact)
    assert (8, 16, 1) in s._versions              # the prompt ran as 8 rows
    builds = s.stats.graph_builds
    for n in (5, 6, 8):                  # every prompt of 5 to 8 tokens runs one 8-row graph
        s.reset()
        s.eval(PROMPT[:n])
    assert s.stats.graph_builds == builds
    assert s.n_past == 8


def test_token_buckets():
    from ember.runtime.session import token_bucket
    assert [token_bucket(t, 512) for t in (1, 2, 3, 5, 9, 33, 64, 65, 130, 500, 512)] == \
        [1, 2, 4, 8, 16, 64, 64, 128, 192, 512, 512]
    assert token_bucket(100, 96) == 100 and token_bucket(70, 100) == 100


@pytest.mark.parametrize("spec", [Spec("llama", "q3_k_m"),
                                  pytest.param(Spec("llama", "q5_k_m"), marks=pytest.mark.slow),
                                  pytest.param(Spec("llama", "q2_k_m"), marks=pytest.mark.slow),
                                  pytest.param(Spec("llama", "iq4_xs"), marks=pytest.mark.slow),
                                  pytest.param(Spec("llama", "nvfp4"), marks=pytest.mark.slow),
                                  pytest.param(Spec("llama", "mxfp4"), marks=pytest.mark.slow),
                                  pytest.param(Spec("llama", "q5_1"), marks=pytest.mark.slow)], ids=str)
def test_other_weight_formats_run_on_cpu_close_to_the_reference(tiny_files, cpu, spec):
    """The CPU kernels of the other formats (and mixes of formats by tensor role) inside a whole
    model: prompt and decode logits against the NumPy reference interpreter (the difference is
    the kernels' 8-bit activations; measured ~1e-4, a wrong kernel gives ~1)."""
    model = load_model(tiny_files[spec])
    ours, _ = run(model, cpu, SessionOptions(n_ctx=64, kv_bucket=16), decode=0)
    ref = ReferenceSession(model, 16).step(PROMPT)
    assert nmse(ours, ref) < 1e-3
