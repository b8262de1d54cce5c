"""gemma4 over a quantized KV cache on the CPU backend: sliding-window and global layers of two
head sizes, each with its own rotation block (q8_0 / q4_0: the largest power of two >= 64 that
divides the head size, as llama.cpp's per-cache attn_rot_k), and the shared-KV layers reading
the quantized caches of earlier layers. q8_0 and q4_0 run on the tiny file (heads 64 and 128);
turbo3 / turbo4 hold a head as whole 128-value blocks, so they run on the file with heads of 128
and 256 (Gemma4Spec(head_swa=128)), where the tiny file's heads of 64 are refused naming the
layer. Compiling the step graphs of a session (prompt, decode and verify widths) takes a minute
per cache type on 2 cores, so the sessions are `slow`; the default run checks the graph over the
mixed setting (a rotated q8_0 K, a turbo4 V) through the reference interpreter. Parity of the rotated caches with llama.cpp is in test_gemma4_peer; the GPU backends
in tests/backends/test_gemma4_gpu.py."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.errors import EmberError
from ember.models import KVCacheTypes, load_model
from ember.runtime.session import Session, SessionOptions, check_cache_support
from model_steps import ReferenceSession, nmse
from speculation_checks import assert_ngram_speculation_is_greedy
from tiny_gguf_gemma4 import N_HEAD_KV, Gemma4Spec

# the window-5 layers keep a ring of 16 rows (5 + 4 rounded up to the bucket); 24 positions wrap it
OPTIONS = SessionOptions(n_ctx=32, ubatch=4, kv_bucket=16)
PROMPT = [1, 17, 42, 99, 5, 23, 64, 7, 11, 3, 8, 19]
HEADS_64, HEADS_128 = Gemma4Spec("f32"), Gemma4Spec("f32", head_swa=128)
CASES = [pytest.param((("q8_0", "turbo4"), HEADS_128), id="q8_0-turbo4", marks=pytest.mark.slow),
         *(pytest.param(((t, t), HEADS_64), id=t, marks=pytest.mark.slow) for t in ("q8_0", "q4_0")),
         *(pytest.param(((t, t), HEADS_128), id=t, marks=pytest.mark.slow) for t in ("turbo3", "turbo4"))]
# NMSE against the reference with the same cache types: the CPU's K/V differ from the
# reference's in the last bits, which now and then moves a value to the next quantization step
# (measured 6e-13 to 8e-13 over a 7-token prompt and 4 decode steps: no value moved)
REFERENCE_BOUND = {"q8_0": 1e-6, "q4_0": 1e-4, "turbo4": 1e-4, "turbo3": 1e-4}
# NMSE against the reference with an f16 cache, teacher-forced. This tiny random model is far
# more sensitive to its cache than a trained one (unit-variance V, moderately sharp softmaxes):
# measured on the prompt rows q8_0 1.0e-4, q4_0 2.2e-2, q8_0-K + turbo4-V 3.6e-2, turbo4 4.9e-2,
# turbo3 1.9e-1 (the V type decides); a cache read wrongly (another layer's rows) gives ~1.
F16_BOUND = {"q8_0": 1e-3, "q4_0": 0.1, "turbo4": 0.15, "turbo3": 0.3}


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)


@pytest.fixture(scope="module", params=CASES)
def session(request, tiny_files, cpu):
    types, spec = request.param
    model = load_model(tiny_files[spec])
    return Session(model, cpu, SessionOptions(**{**OPTIONS.__dict__, "cache": KVCacheTypes.of(*types)}))


def teacher_forced(session, tokens):
    """Logits of every token: the prompt in micro-batches, then one token at a time."""
    session.reset()
    rows = [session.eval(tokens[:len(PROMPT)], all_logits=True)]
    rows += [session.eval([t]) for t in tokens[len(PROMPT):]]
    return np.concatenate(rows)


def test_each_own_cache_layer_keeps_rows_of_blocks_of_its_head_size(session):
    model, cache = session.model, session.cache
    assert model.attention_layers == (0, 1, 2)            # layers 3 and 4 share the caches of 1 and 2
    for arrays, dt, which in ((session.k_cache, cache.k, "k"), (session.v_cache, cache.v, "v")):
        for il, a in zip(model.attention_layers, arrays):
            width = N_HEAD_KV * model.hparams.head_dim(il, which)
            assert a.dtype == dt.numpy and a.shape[1] == dt.row_bytes(width)
            assert a.shape[0] == (16 if model.hparams.is_swa(il) else 32)


def test_logits_match_the_reference_and_stay_near_the_f16_cache(session):
    tokens = PROMPT + [int(t) for t in np.random.default_rng(3).integers(3, 300, 12)]   # 24 > 16 rows
    got = teacher_forced(session, tokens)
    v_type = session.cache.v.name
    same_cache = ReferenceSession(session.model, 32, session.cache).step(tokens)
    assert nmse(got, same_cache) < REFERENCE_BOUND[v_type]
    f16 = ReferenceSession(session.model, 32).step(tokens)
    assert nmse(got[:len(PROMPT)], f16[:len(PROMPT)]) < F16_BOUND[v_type]


def test_the_graph_over_a_mixed_cache_stays_near_the_f16_cache(tiny_files):
    """The reference interpreter alone (nothing compiles): a rotated q8_0 K in blocks of 128 and
    256 and a turbo4 V, the shared layers reading them, against the f16 cache."""
    model = load_model(tiny_files[HEADS_128])
    tokens = PROMPT + [300, 2, 17]
    mixed = ReferenceSession(model, 16, KVCacheTypes.of("q8_0", "turbo4")).step(tokens)
    f16 = ReferenceSession(model, 16).step(tokens)
    assert 0 < nmse(mixed, f16) < F16_BOUND["turbo4"]


def test_greedy_speculation_is_token_identical(session):
    """Verify steps of several tokens, their rejected tails truncated from the quantized caches
    (the ring's and the global layers'), give greedy decoding's tokens."""
    assert_ngram_speculation_is_greedy(session)


@pytest.mark.parametrize("types, message", [
    (("turbo3", "f16"), "K cache type turbo3 needs a head size that is a multiple of 128; layer 0's K head size is 64"),
    (("q8_0", "turbo4"), "V cache type turbo4 needs a head size that is a multiple of 128; layer 0's V head size is 64"),
], ids=["k", "v"])
def test_a_head_size_the_type_cannot_hold_is_one_line_naming_the_layer(tiny_files, cpu, types, message):
    model = load_model(tiny_files[HEADS_64])          # sliding-window heads of 64, global of 128
    with pytest.raises(EmberError) as e:
        Session(model, cpu, SessionOptions(n_ctx=32, cache=KVCacheTypes.of(*types)))
    assert str(e.value) == f"{model.path}: {message}"


def test_a_backend_is_asked_about_every_head_size(tiny_files):
    """check_cache_support builds its probe at each head size of the model's layers: a backend
    that cannot attend over one of them refuses before anything compiles."""
    model = load_model(tiny_files[HEADS_128])
    widths = []

    def refuses_wide_heads(node):
        widths.append((node.op, node.inputs[0].shape[-1]))
        if node.op == "attention" and node.inputs[0].shape[-1] > 128:
            return False, "attention: heads over 128 values: no kernel yet"
        return True, ""

    with pytest.raises(EmberError, match="heads over 128 values"):
        check_cache_support(refuses_wide_heads, "test backend", model, KVCacheTypes.of("q8_0", "turbo4"))
    assert ("attention", 128) in widths and ("attention", 256) in widths
