"""Perplexity over a quantized KV cache, ember against llama.cpp with the same cache types: q8_0
and q4_0 for K and V, Walsh-Hadamard rotated on both sides (llama.cpp rotates a quantized cache
unless LLAMA_ATTN_ROT_DISABLE=1; its CPU flash attention, needed for a quantized V, is on).
Default model, the fixture text in chunks of 128, as test_parity_peer.py does for f16."""
from pathlib import Path

import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import KVCacheTypes, load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.session import Session, SessionOptions
from ember.tools.perplexity import perplexity, session_chunk_evaluator

pytestmark = [pytest.mark.peer, pytest.mark.slow]

TEXT = Path(__file__).resolve().parents[1] / "data" / "ppl_text.txt"
N_CTX = 128
THREADS = 2
PPL_TOLERANCE = 0.005          # relative to llama.cpp's figure


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[peer]'")


@pytest.fixture(scope="module")
def tokens(default_model_path) -> list[int]:
    return Tokenizer.from_gguf(default_model_path).encode(TEXT.read_text(), add_special=True)


def llama_perplexity(llama_cpp, path, tokens, bos, cache_type: str):
    ggml_type = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[cache_type]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
                          n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True,
                          type_k=ggml_type, type_v=ggml_type, verbose=False)

    def eval_chunk(chunk, first):
        llm.reset()
        llm.eval(chunk)
        return np.array(llm.scores[first:len(chunk)], dtype=np.float32)
    try:
        return perplexity(eval_chunk, tokens, N_CTX, bos)
    finally:
        llm.close()


# Measured (2 threads, 9 chunks of 128, 567 tokens scored): q8_0 ember 26.773, llama.cpp 26.968
# (-0.72%); q4_0 ember 29.503, llama.cpp 29.213 (+0.99%); with f16 caches ember 26.805, llama.cpp
# 26.754 (+0.19%). llama.cpp's q8_0 moves +0.80% from its own f16, ember's -0.12%: its CPU flash
# attention quantizes Q to q8_0 for the dot with a q8_0/q4_0 K (the K type's vec_dot_type),
# ember's attention keeps Q in f32. Not within 0.5% yet: kept as an expected failure that
# reports an XPASS once it is.
GAP = "ember vs llama.cpp: -0.72% (q8_0), +0.99% (q4_0) measured; llama.cpp quantizes Q to q8_0 in its FA"


@pytest.mark.xfail(reason=GAP, strict=False)
@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
def test_quantized_cache_perplexity_matches_llama_cpp(llama_cpp, default_model_path, tokens, cache_type,
                                                      monkeypatch):
    monkeypatch.delenv("LLAMA_ATTN_ROT_DISABLE", raising=False)       # llama.cpp's rotation on
    bos = Tokenizer.from_gguf(default_model_path).bos_id
    session = Session(load_model(default_model_path), get_backend("cpu", threads=THREADS),
                      SessionOptions(n_ctx=N_CTX, cache=KVCacheTypes.of(cache_type, cache_type)))
    ours = perplexity(session_chunk_evaluator(session), tokens, N_CTX, bos)
    theirs = llama_perplexity(llama_cpp, default_model_path, tokens, bos, cache_type)
    assert ours.n_scored == theirs.n_scored
    assert abs(ours.ppl / theirs.ppl - 1) < PPL_TOLERANCE, (ours.ppl, theirs.ppl)
