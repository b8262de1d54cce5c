"""A session over a quantized KV cache (q8_0, q4_0, turbo3, turbo4, and the mixed q8_0-K +
turbo4-V): the reference's logits through the sliding-window ring, truncate, fork/switch and
checkpoints bit-exact, and greedy speculation token-identical. Tiny gemma3 (heads of 128, one
window-3 layer). The default run covers the mixed setting (a rotated q8_0 K and a turbo V);
the other types are marked slow (`-m slow`)."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.errors import EmberError
from ember.models import KVCacheTypes, load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.memory import SequenceMemory, kv_footprint
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions, check_cache_support
from ember.runtime.speculative import NgramDraft, speculative_generate
from model_steps import ReferenceSession, nmse
from tiny_gguf import Spec

# the window-3 layer keeps a ring of 16 rows (3 + 4 rounded up to the bucket); 24 positions wrap it
OPTIONS = SessionOptions(n_ctx=32, ubatch=4, kv_bucket=16)
PROMPT = [2, 17, 42, 99, 5, 23, 64, 7, 11, 3, 8, 19]
TYPES = [pytest.param(("q8_0", "turbo4"), id="q8_0-turbo4"),
         *(pytest.param((t, t), id=t, marks=pytest.mark.slow) for t in ("q8_0", "q4_0", "turbo3", "turbo4", "f32"))]
# how far the reference's logits may be (NMSE): the CPU's K/V differ from the reference's in the
# last bits, which now and then moves a value to the next quantization step
BOUND = {"f32": 1e-9, "q8_0": 1e-6, "q4_0": 1e-4, "turbo4": 1e-4, "turbo3": 1e-4}


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    return get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp("kvq-cache"))


@pytest.fixture(scope="module")
def gemma(tiny_files):
    return load_model(tiny_files[Spec("gemma3", "f32")])


@pytest.fixture(scope="module", params=TYPES)
def session(request, gemma, cpu):
    return Session(gemma, cpu, SessionOptions(**{**OPTIONS.__dict__, "cache": KVCacheTypes.of(*request.param)}))


def teacher_forced(session, tokens):
    """Logits of every token: the prompt in micro-batches, then one token at a time."""
    rows = [session.eval(tokens[:len(PROMPT)], all_logits=True)]
    rows += [session.eval([t]) for t in tokens[len(PROMPT):]]
    return np.concatenate(rows)


def test_caches_are_rows_of_blocks(session, gemma):
    cache = session.cache
    for arrays, dt, width in ((session.k_cache, cache.k, gemma.hparams.n_embd_k_gqa),
                              (session.v_cache, cache.v, gemma.hparams.n_embd_v_gqa)):
        row = dt.row_bytes(width) if dt.is_quantized else width     # bytes, or values
        assert [a.shape for a in arrays] == [(16, row), (32, row)]
        assert all(a.dtype == dt.numpy for a in arrays)
    footprint = kv_footprint(session)
    assert footprint.bytes_per_token == 2 * (cache.k.row_bytes(128) + cache.v.row_bytes(128))
    assert footprint.bytes_per_context == sum(a.nbytes for a in session.k_cache + session.v_cache)


def test_logits_match_the_reference_through_the_ring(session, gemma):
    session.reset()
    tokens = PROMPT + [int(t) for t in np.random.default_rng(3).integers(3, 200, 12)]   # 24 > 16 rows
    got = teacher_forced(session, tokens)
    expected = ReferenceSession(gemma, 32, session.cache).step(tokens)
    assert nmse(got, expected) < BOUND[session.cache.v.name]


def test_truncate_fork_and_checkpoint_are_exact(session):
    session.reset()
    mem = SequenceMemory(session)
    session.eval(PROMPT, all_logits=True)
    mem.fork(1)
    cp = mem.checkpoint()
    a = session.eval([50, 51, 52, 53], all_logits=True)   # writes ring rows of positions 12..15
    session.truncate(len(PROMPT))
    np.testing.assert_array_equal(session.eval([50, 51, 52, 53], all_logits=True), a)
    session.eval([60, 61, 62, 63], all_logits=True)        # sequence 0 goes on past the fork
    mem.switch(1)
    np.testing.assert_array_equal(session.eval([50, 51, 52, 53], all_logits=True), a)
    mem.restore(cp)
    np.testing.assert_array_equal(session.eval([50, 51, 52, 53], all_logits=True), a)
    mem.switch(0)
    mem.remove(1)
    assert session.n_past == len(PROMPT) + 8 and mem.sequences() == [0]


def test_greedy_speculation_is_token_identical(session, gemma):
    tokenizer = Tokenizer.from_metadata(gemma.tokenizer)
    prompt = [2] + [17, 42, 99, 5] * 3 + [17, 42, 99]
    expected = generate(session, tokenizer, prompt, 14, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    got, stats = speculative_generate(session, NgramDraft(), tokenizer, prompt, 14, draft_max=3,
                                      ignore_eos=True)
    assert got.tokens == expected and stats.drafted > 0


def test_a_head_size_the_type_cannot_hold_is_one_line(tiny_files, cpu):
    llama = load_model(tiny_files[Spec("llama", "f32")])     # heads of 64: not whole turbo blocks
    with pytest.raises(EmberError, match=r"V cache type turbo3 needs a head size that is a multiple "
                                         r"of 128; this model's V head size is 64") as e:
        Session(llama, cpu, SessionOptions(n_ctx=32, cache=KVCacheTypes.of("q8_0", "turbo3")))
    assert "\n" not in str(e.value) and str(llama.path) in str(e.value)


def test_a_backend_refusing_the_cache_is_asked_before_anything_compiles(gemma):
    """check_cache_support asks supports_op about a cache write and an attention read at the
    model's head sizes; the first refusal is one line naming where and why."""
    asked = []

    def refuses_quantized_attention(node):
        asked.append((node.op, str(node.type.dtype), tuple(str(i.dtype) for i in node.inputs)))
        if node.op == "attention" and node.inputs[2].dtype.is_quantized:
            return False, "attention: turbo4 cache: no kernel yet"
        return True, ""

    with pytest.raises(EmberError) as e:
        check_cache_support(refuses_quantized_attention, "test backend", gemma, KVCacheTypes.of("q8_0", "turbo4"))
    assert str(e.value) == ("test backend: a KV cache of K q8_0, V turbo4 is not supported: "
                            "attention: turbo4 cache: no kernel yet")
    assert [a[:2] for a in asked] == [("set_rows", "q8_0"), ("set_rows", "turbo4"), ("attention", "f32")]
    asked.clear()
    check_cache_support(refuses_quantized_attention, "test backend", gemma, KVCacheTypes())   # f16: not asked
    assert asked == []
