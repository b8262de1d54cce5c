"""jamba against llama.cpp (llama-cpp-python 0.3.36), on the tiny random-weight files of
tiny_gguf_jamba: the logits of a prompt and of 16 greedy decode steps (llama.cpp's tokens fed to
both, so every row compares the same context), the greedy tokens and their text, and the prompt
split into micro-batches on both sides; through the reference interpreter by default, on the CPU
backend with the slow tests (measured: f32 NMSE ~2e-8, q8_0 ~6e-4).

Bounds: f32 NMSE <= 1e-6 (test_conv_hybrids_peer's: the f16 KV cache rounds the same values in
both); q8_0 within test_models_peer's PEER_NMSE_QUANTIZED (both multiply by activations rounded
to 8 bits)."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.runtime.session import Session, SessionOptions

from model_steps import ReferenceSession
from test_conv_hybrids_peer import (F32_NMSE, N_DECODE, OPTIONS, PROMPT, assert_greedy_text_matches,
                                    assert_rows_match, ember_logits, llama_greedy)
from test_models_peer import PEER_NMSE_QUANTIZED
from tiny_gguf_jamba import JambaSpec

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[peer]' (builds llama.cpp, ~5-10 min)")


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)


@pytest.mark.parametrize("weight_type", ["f32", "q8_0"])
def test_graph_prompt_decode_and_greedy_text_match_llama_cpp(llama_cpp, tiny_files, weight_type):
    """Through the reference interpreter (no compile)."""
    path = tiny_files[JambaSpec(weight_type)]
    theirs, their_tokens, their_text = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    model = load_model(path)
    ref = ReferenceSession(model, 32)
    ours = np.concatenate([ref.step(PROMPT)] + [ref.step([t]) for t in their_tokens])
    assert_rows_match(ours, theirs, F32_NMSE if weight_type == "f32" else PEER_NMSE_QUANTIZED)
    if weight_type == "f32":
        assert_greedy_text_matches(model, ours, their_tokens, their_text)


# slow: the CPU step graphs take a minute or more to compile cold on 2 loaded cores
@pytest.mark.slow
def test_cpu_prompt_decode_and_greedy_text_match_llama_cpp(llama_cpp, tiny_files, cpu):
    path = tiny_files[JambaSpec("f32")]
    theirs, their_tokens, their_text = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    model = load_model(path)
    ours = ember_logits(Session(model, cpu, OPTIONS), PROMPT, their_tokens)
    assert_rows_match(ours, theirs, F32_NMSE)
    assert_greedy_text_matches(model, ours, their_tokens, their_text)


@pytest.mark.slow
def test_q8_0_cpu_prompt_and_decode_match_llama_cpp(llama_cpp, tiny_files, cpu):
    path = tiny_files[JambaSpec("q8_0")]
    theirs, tokens, _ = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    ours = ember_logits(Session(load_model(path), cpu, OPTIONS), PROMPT, tokens)
    assert_rows_match(ours, theirs, PEER_NMSE_QUANTIZED)


@pytest.mark.slow
def test_prompt_in_micro_batches_matches_llama_cpp_in_micro_batches(llama_cpp, tiny_files, cpu):
    """The prompt in micro-batches of 3 on both sides (the state carried between them)."""
    path = tiny_files[JambaSpec("f32")]
    theirs, tokens, _ = llama_greedy(llama_cpp, path, PROMPT, 2, n_batch=3)
    options = SessionOptions(n_ctx=OPTIONS.n_ctx, kv_bucket=OPTIONS.kv_bucket, ubatch=3)
    ours = ember_logits(Session(load_model(path), cpu, options), PROMPT, tokens)
    assert_rows_match(ours, theirs, F32_NMSE)
