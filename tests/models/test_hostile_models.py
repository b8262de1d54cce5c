"""Hostile and broken model files (issue 16), each reproducer once: every one is refused with one
line naming the file and the key or tensor at fault, never a traceback, a crash, an unbounded
allocation or a model that prints NaN logits."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
from gguf.constants import GGUFValueType as T

from ember.errors import EmberError
from ember.models import load_model
from ember.models.gguf_file import GGUFFile, ModelFileError
from ember.models.hparams import HParams, _Reader
from ember.models.tokenizer import Tokenizer

from gguf_parts import entry, nested_array, read_parts
from tiny_gguf import Spec


@pytest.fixture
def parts(tiny_files):
    return read_parts(tiny_files[Spec("llama", "q8_0")])


@pytest.fixture
def gemma_parts(tiny_files):
    return read_parts(tiny_files[Spec("gemma3", "q8_0")])


def refused(path, *fragments, loader=load_model):
    with pytest.raises(ModelFileError) as e:
        loader(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_parts_round_trip(parts, tmp_path):
    model = load_model(parts.write(tmp_path / "same.gguf"))
    assert model.hparams.n_layer == 2


# ---- structure ---------------------------------------------------------------------------
def test_nested_arrays_are_refused_not_a_recursion_error(parts, tmp_path):
    path = parts.set("x.nested", nested_array(2000)).write(tmp_path / "nested.gguf")
    refused(path, "metadata 'x.nested'", "array of arrays", loader=GGUFFile)


def test_duplicate_metadata_keys_are_refused(parts, tmp_path):
    parts.kvs.append(("llama.block_count", entry(T.UINT32, 2)))
    refused(parts.write(tmp_path / "dup.gguf"), "metadata 'llama.block_count' appears twice", loader=GGUFFile)


def test_element_count_does_not_wrap(parts, tmp_path):
    # [256, 2**56] elements: a uint64 product wrapped to 0 bytes and passed the end-of-file check
    parts.tensors[-1][1] = [256, 2**56]
    refused(parts.write(tmp_path / "wrap.gguf"), repr(parts.tensors[-1][0]), loader=GGUFFile)


def test_overlapping_tensor_data_is_refused(parts, tmp_path):
    parts.tensors[1][3] = parts.tensors[0][3]
    refused(parts.write(tmp_path / "overlap.gguf"), repr(parts.tensors[1][0]), "data offset",
            "overlapping", loader=GGUFFile)


def test_a_type_id_changed_to_a_smaller_type_is_refused(parts, tmp_path):
    # Q8_0 (id 8) to Q4_0 (id 2): the bytes still fit, but the next tensor is no longer where it
    # would start
    k = next(i for i, t in enumerate(parts.tensors[:-1]) if t[2] == 8)
    parts.tensors[k][2] = 2
    refused(parts.write(tmp_path / "retyped.gguf"), repr(parts.tensors[k + 1][0]), "data offset",
            loader=GGUFFile)


def test_alignment_of_the_wrong_type_is_refused(parts, tmp_path):
    parts.set("general.alignment", entry(T.STRING, "32"))
    refused(parts.write(tmp_path / "align.gguf"), "'general.alignment'", loader=GGUFFile)


# ---- hyper-parameters --------------------------------------------------------------------
def test_huge_block_count_is_refused_before_allocating(parts, tmp_path):
    parts.set("llama.block_count", entry(T.UINT32, 2**31 - 1))
    path = parts.write(tmp_path / "layers.gguf")
    start = time.perf_counter()
    refused(path, "'llama.block_count' = 2147483647 is outside 1..512")
    assert time.perf_counter() - start < 5


def test_block_count_beyond_the_tensors_present_is_refused(parts, tmp_path):
    parts.set("llama.block_count", entry(T.UINT32, 300))
    refused(parts.write(tmp_path / "layers.gguf"), "block_count is 300", "tensors for 2 layer(s)")


@pytest.mark.parametrize("key, encoded, fragment", [
    ("llama.attention.key_length", entry(T.UINT32, 0), "head_dim_k = 0 must be positive"),
    ("llama.attention.layer_norm_rms_epsilon", entry(T.FLOAT32, -1e-5), "rms_eps = "),
    ("llama.attention.layer_norm_rms_epsilon", entry(T.FLOAT32, math.nan), "rms_eps = nan is not finite"),
    ("llama.rope.freq_base", entry(T.FLOAT32, 0.0), "rope_freq_base = 0.0 must be above 1"),
    ("llama.rope.scaling.factor", entry(T.FLOAT32, 1e-30), "rope_freq_scale = "),
    ("llama.rope.dimension_count", entry(T.INT32, -2**31), "rope dimension count -2147483648"),
], ids=["key-length-0", "rms-eps-negative", "rms-eps-nan", "freq-base-0", "rope-scale-tiny", "n-rot-min"])
def test_hyper_parameters_out_of_range_are_refused(parts, tmp_path, key, encoded, fragment):
    refused(parts.set(key, encoded).write(tmp_path / "hp.gguf"), "bad hyper-parameters", fragment)


def test_softcap_minus_infinity_is_refused(gemma_parts, tmp_path):
    gemma_parts.set("gemma3.final_logit_softcapping", entry(T.FLOAT32, -math.inf))
    refused(gemma_parts.write(tmp_path / "cap.gguf"), "final_logit_softcap = -inf is not finite")


def test_head_count_larger_than_the_width_is_refused():
    meta = {"general.architecture": "llama", "llama.block_count": 4, "llama.embedding_length": 512,
            "llama.attention.head_count": 1024, "llama.context_length": 2048,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    with pytest.raises(ModelFileError, match="head_dim_k = 0 must be positive"):
        HParams.from_metadata(meta, "m.gguf")


@pytest.mark.parametrize("field, value", [("logit_scale", 1e-45), ("final_logit_softcap", -1.0),
                                          ("embedding_scale", math.inf)])
def test_multipliers_outside_their_meaning(tiny_files, field, value):
    hp = load_model(tiny_files[Spec("llama", "q8_0")]).hparams
    problems = _Reader.value_ranges(dataclasses.replace(hp, **{field: value}))
    assert problems and problems[0].startswith(f"{field} = ")


# ---- tokenizer metadata ------------------------------------------------------------------
@pytest.mark.parametrize("key, encoded, fragment", [
    ("tokenizer.ggml.scores", entry(T.ARRAY, ["a"] * 320, T.STRING), "must be an array of numbers"),
    ("tokenizer.ggml.tokens", entry(T.ARRAY, list(range(320)), T.INT32), "must be an array of strings"),
    ("tokenizer.ggml.token_type", entry(T.ARRAY, [1.0] * 320, T.FLOAT32), "must be an array of integers"),
    ("tokenizer.ggml.merges", entry(T.ARRAY, [1, 2], T.INT32), "must be an array of strings"),
    ("tokenizer.ggml.eos_token_id", entry(T.ARRAY, [2, 3], T.UINT32), "must be an integer token id"),
    ("tokenizer.ggml.add_bos_token", entry(T.STRING, "yes"), "must be a bool"),
], ids=["scores-str", "tokens-int", "types-float", "merges-int", "eos-array", "add-bos-str"])
def test_tokenizer_keys_of_the_wrong_type(parts, tmp_path, key, encoded, fragment):
    path = parts.set(key, encoded).write(tmp_path / "tok.gguf")
    with pytest.raises(EmberError) as e:
        Tokenizer.from_gguf(path)
    assert str(e.value).startswith(f"{path}: metadata {key!r} {fragment}"), str(e.value)


def test_token_list_shorter_than_the_vocabulary(tiny_files):
    model = load_model(tiny_files[Spec("llama", "q8_0")])
    meta = dict(model.tokenizer, **{"tokenizer.ggml.tokens": model.tokenizer["tokenizer.ggml.tokens"][:300]})
    with pytest.raises(EmberError, match="m.gguf: tokenizer.ggml.tokens has 300 tokens, the model's vocabulary 320"):
        Tokenizer.from_metadata(meta, "m.gguf", model.n_vocab)
    assert Tokenizer.from_metadata(model.tokenizer, "m.gguf", model.n_vocab).vocab_size == 320
