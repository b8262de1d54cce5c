"""gemma4 against llama.cpp (llama-cpp-python 0.3.36), on the tiny random-weight files of
tiny_gguf_gemma4: the logits of a prompt and of 16 greedy decode steps (llama.cpp's tokens fed
to both, so every row compares the same context), the greedy tokens and their text; through the
reference interpreter and on the CPU backend.

Bounds: f32 NMSE <= 1e-6 (both keep an f16 KV cache); q8_0 and nvfp4 within test_models_peer's
bounds for their formats (llama.cpp rounds the activations of those matmuls to 8 bits)."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.runtime.session import Session, SessionOptions

from model_steps import ReferenceSession
from test_conv_hybrids_peer import (N_DECODE, PROMPT, THREADS, assert_greedy_text_matches,
                                    assert_rows_match, ember_logits, llama_greedy)
from test_models_peer import MORE_PEER_NMSE, PEER_NMSE_QUANTIZED
from tiny_gguf_gemma4 import Gemma4Spec

pytestmark = pytest.mark.peer

F32_NMSE = 1e-6
BOUNDS = {"f32": F32_NMSE, "q8_0": PEER_NMSE_QUANTIZED, "nvfp4": MORE_PEER_NMSE}
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=32)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[peer]' (builds llama.cpp, ~5-10 min)")


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=THREADS, cache_dir=shared_cpu_cache)


@pytest.mark.parametrize("weight_type", ["f32", "q8_0", "nvfp4"])
def test_graph_prompt_decode_and_greedy_text_match_llama_cpp(llama_cpp, tiny_files, weight_type):
    """Through the reference interpreter (no compile): sliding-window and global layers of two
    head sizes, the shared-KV layers, per-layer embeddings, output scales."""
    path = tiny_files[Gemma4Spec(weight_type)]
    theirs, their_tokens, their_text = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    model = load_model(path)
    ref = ReferenceSession(model, 32)
    ours = np.concatenate([ref.step(PROMPT)] + [ref.step([t]) for t in their_tokens])
    assert_rows_match(ours, theirs, BOUNDS[weight_type])
    if weight_type == "f32":
        assert_greedy_text_matches(model, ours, their_tokens, their_text)


def test_cpu_prompt_decode_and_greedy_text_match_llama_cpp(llama_cpp, tiny_files, cpu):
    """The compiled CPU session: the sliding-window layers keep a ring of rows (the prompt and
    decode pass the window of 5), the shared layers read the ring and the cache of others."""
    path = tiny_files[Gemma4Spec("f32")]
    theirs, their_tokens, their_text = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    model = load_model(path)
    ours = ember_logits(Session(model, cpu, OPTIONS), PROMPT, their_tokens)
    assert_rows_match(ours, theirs, F32_NMSE)
    assert_greedy_text_matches(model, ours, their_tokens, their_text)


@pytest.mark.slow
def test_nvfp4_cpu_prompt_and_decode_match_llama_cpp(llama_cpp, tiny_files, cpu):
    path = tiny_files[Gemma4Spec("nvfp4")]
    theirs, tokens, _ = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    ours = ember_logits(Session(load_model(path), cpu, OPTIONS), PROMPT, tokens)
    assert_rows_match(ours, theirs, MORE_PEER_NMSE)
