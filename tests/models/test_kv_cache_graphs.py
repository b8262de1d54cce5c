"""Step graphs over each KV cache type: the cache inputs take the types, a q8_0 / q4_0 cache
stores the Walsh-Hadamard rotation of K and V (llama.cpp's attn_rot block sizes) and the logits
stay those of an unquantized cache; turbo caches add no rotation to the graph."""
import numpy as np
import pytest

import ember.ir.dtypes as dtypes
from ember.errors import EmberError
from ember.ir import turbo
from ember.ir.quant import dequantize
from ember.models import CACHE_TYPE_NAMES, KVCacheTypes, load_model
from model_steps import ReferenceSession, nmse
from tiny_gguf import Spec

TOKENS = [2, 17, 42, 99, 5, 23]


@pytest.fixture(scope="module")
def gemma(tiny_files):
    return load_model(tiny_files[Spec("gemma3", "f32")])


@pytest.mark.parametrize("head, k_block, v_block", [(256, 256, 64), (128, 128, 64), (64, 64, 64),
                                                    (192, 64, 64), (96, 0, 0), (80, 0, 0)],
                         ids=["gemma3-270m", "128", "64", "192", "96", "80"])
def test_rotation_blocks_follow_llama_cpp(head, k_block, v_block):
    """K: the largest power of two >= 64 dividing the head size; V: 64; none below 64."""
    q8 = KVCacheTypes.of("q8_0", "q4_0")
    assert (q8.k_rotation(head), q8.v_rotation(head)) == (k_block, v_block)


@pytest.mark.parametrize("k, v", [("f16", "f16"), ("f32", "f32"), ("turbo4", "turbo3"), ("q8_0", "f16")])
def test_only_ggml_block_types_rotate(k, v):
    cache = KVCacheTypes.of(k, v)
    assert cache.k_rotation(128) == (128 if k == "q8_0" else 0)
    assert cache.v_rotation(128) == 0
    off = KVCacheTypes.of("q8_0", "q8_0", rotation=False)
    assert off.k_rotation(128) == off.v_rotation(128) == 0


def test_cache_type_names_and_manifest():
    assert CACHE_TYPE_NAMES == ("f16", "f32", "q8_0", "q4_0", "turbo3", "turbo4")
    cache = KVCacheTypes.of("q8_0", "turbo4", rotation=False)
    assert KVCacheTypes.from_manifest(cache.manifest()) == cache
    with pytest.raises(EmberError, match="unknown K cache type 'q5_0'; cache types: f16, f32"):
        KVCacheTypes.of("q5_0", "f16")


def hadamard_consts(graph) -> list[int]:
    return sorted(n.type.shape[0] for n in graph.nodes if n.op == "const" and n.name.startswith("hadamard."))


@pytest.mark.parametrize("k, v, rotations", [("q8_0", "q8_0", [64, 128]), ("q8_0", "turbo4", [128]),
                                             ("turbo4", "turbo4", []), ("f16", "f16", [])])
def test_step_graph_takes_the_cache_types(gemma, k, v, rotations):
    graph = gemma.build_step(4, 8, 1, cache=KVCacheTypes.of(k, v))
    inputs = {n.name: n for n in graph.inputs}
    for il in gemma.attention_layers:
        assert inputs[f"k_cache.{il}"].dtype is dtypes.dtype(k)
        assert inputs[f"v_cache.{il}"].dtype is dtypes.dtype(v)
    assert hadamard_consts(graph) == rotations
    # each layer: Q and K by the K block; V, and the attention output back, by the V block
    per_layer = 2 * (k == "q8_0") + 2 * (v == "q8_0")
    uses = sum(1 for n in graph.nodes if n.op == "mul_mat" and n.inputs[1].name.startswith("hadamard."))
    assert uses == per_layer * len(gemma.attention_layers)


def head_rows(cache: np.ndarray, dt: str) -> np.ndarray:
    """The first len(TOKENS) rows of a cache as float32 [rows, head_dim] (gemma: one KV head)."""
    rows = cache[:len(TOKENS)]
    return dequantize(rows, dt) if dt != "f32" else rows.astype(np.float32)


@pytest.mark.parametrize("dt, bound", [("q8_0", 1e-4), ("q4_0", 2e-2)])
def test_a_rotated_cache_stores_rotated_rows_and_keeps_the_logits(gemma, dt, bound):
    plain = ReferenceSession(gemma, 8, KVCacheTypes.of("f32", "f32"))
    rotated = ReferenceSession(gemma, 8, KVCacheTypes.of(dt, dt))
    unrotated = ReferenceSession(gemma, 8, KVCacheTypes.of(dt, dt, rotation=False))
    expected = plain.step(TOKENS)
    got, got_off = rotated.step(TOKENS), unrotated.step(TOKENS)
    assert nmse(got, expected) < bound and nmse(got_off, expected) < bound
    assert not np.array_equal(got, got_off)
    for which, block in (("k", 128), ("v", 64)):
        exact = head_rows(plain.caches[f"{which}_cache.0"], "f32")
        stored = head_rows(rotated.caches[f"{which}_cache.0"], dt)
        blocks = turbo.fwht(exact.reshape(len(TOKENS), -1, block)).reshape(exact.shape)
        assert nmse(stored, blocks) < bound                          # H x, quantized
        assert nmse(head_rows(unrotated.caches[f"{which}_cache.0"], dt), exact) < bound


def test_turbo_caches_store_their_own_rotation_and_keep_the_logits(gemma):
    expected = ReferenceSession(gemma, 8, KVCacheTypes.of("f32", "f32")).step(TOKENS)
    session = ReferenceSession(gemma, 8, KVCacheTypes.of("q8_0", "turbo4"))
    assert nmse(session.step(TOKENS), expected) < 1e-2
    v = session.caches["v_cache.0"][:len(TOKENS)]
    assert v.shape == (len(TOKENS), turbo.BLOCK_BYTES[4])          # one 66-byte block per head


def test_a_head_size_that_is_not_whole_blocks_is_refused_before_building(tiny_files):
    llama = load_model(tiny_files[Spec("llama", "f32")])      # heads of 64
    llama.build_step(2, 8, 1, cache=KVCacheTypes.of("q4_0", "q8_0"))   # 64 = two blocks of 32
    with pytest.raises(EmberError, match=r"K cache type turbo4 needs a head size that is a multiple "
                                         r"of 128; this model's K head size is 64"):
        llama.build_step(2, 8, 1, cache=KVCacheTypes.of("turbo4", "f16"))
