"""lfm2, nemotron_h and falcon-h1 against llama.cpp (llama-cpp-python), on the tiny random-weight
files of tiny_gguf_hybrid: the logits of a prompt and of 16 greedy decode steps (llama.cpp's
tokens fed to both, so every row compares the same context), the greedy tokens and their text,
and a prompt split into micro-batches on both sides; on the CPU backend and through the reference
interpreter.

Bounds: f32 NMSE <= 1e-6 (measured ~1e-8: the f16 KV cache rounds the same values in both); q8_0
within test_models_peer's PEER_NMSE_QUANTIZED (both multiply by activations rounded to 8 bits;
measured 2e-4 to 7e-4)."""
import numpy as np
import pytest

from ember.backends import get_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.session import Session, SessionOptions

from model_steps import ReferenceSession, nmse
from test_models_peer import PEER_NMSE_QUANTIZED
from tiny_gguf_hybrid import HYBRID_ARCHS, HybridSpec

pytestmark = pytest.mark.peer

PROMPT = [1, 17, 260, 300, 42, 9, 33]
N_DECODE = 16
F32_NMSE = 1e-6
OPTIONS = SessionOptions(n_ctx=64, kv_bucket=32)
THREADS = 2


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[peer]' (builds llama.cpp, ~5-10 min)")


@pytest.fixture(scope="module")
def cpu(shared_cpu_cache):
    return get_backend("cpu", threads=THREADS, cache_dir=shared_cpu_cache)


def llama_greedy(llama_cpp, path, prompt, n_decode, n_batch=64):
    """llama.cpp's logits of the prompt (in batches of n_batch) and of n_decode greedy tokens,
    each decoded alone; the tokens; their text as streamed (each token's piece, special=False)."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=n_batch,
                          n_ubatch=n_batch, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    try:
        llm.eval(prompt)
        tokens = []
        for _ in range(n_decode):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        logits = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
        return logits, tokens, b"".join(llm.detokenize([t]) for t in tokens)
    finally:
        llm.close()


def ember_logits(session: Session, prompt, decode) -> np.ndarray:
    session.reset()
    return np.concatenate([session.eval(prompt, all_logits=True)] + [session.eval([t]) for t in decode])


def assert_rows_match(ours, theirs, bound):
    n = len(PROMPT)
    assert ours.shape == theirs.shape
    assert nmse(ours[:n], theirs[:n]) < bound, "prompt rows"
    assert nmse(ours[n:], theirs[n:]) < bound, "decode rows"


def assert_greedy_text_matches(model, ours, their_tokens, their_text):
    """ember's greedy tokens are the argmax of its rows: fed llama.cpp's tokens, each row sees the
    context ember's own greedy decoding would have seen, as long as the two agree."""
    n = len(PROMPT)
    tokens = [int(t) for t in np.argmax(ours[n - 1:n - 1 + len(their_tokens)], axis=1)]
    assert tokens == their_tokens
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    assert b"".join(tokenizer.token_to_piece(t, skip_special=True) for t in tokens) == their_text


# the CPU step graphs take seconds each to compile: one architecture by default (lfm2, whose
# short-convolution state is new), the other two with the slow tests
CPU_ARCHS = [a if a == "lfm2" else pytest.param(a, marks=pytest.mark.slow) for a in HYBRID_ARCHS]


@pytest.mark.parametrize("arch", CPU_ARCHS)
def test_cpu_prompt_decode_and_greedy_text_match_llama_cpp(llama_cpp, tiny_files, cpu, arch):
    path = tiny_files[HybridSpec(arch, "f32")]
    theirs, their_tokens, their_text = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    model = load_model(path)
    ours = ember_logits(Session(model, cpu, OPTIONS), PROMPT, their_tokens)
    assert_rows_match(ours, theirs, F32_NMSE)
    assert_greedy_text_matches(model, ours, their_tokens, their_text)


@pytest.mark.parametrize("spec", [HybridSpec(a, t) for a in HYBRID_ARCHS for t in ("f32", "q8_0")], ids=str)
def test_graph_prompt_decode_and_greedy_text_match_llama_cpp(llama_cpp, tiny_files, spec):
    """Every architecture and weight type through the reference interpreter (no compile)."""
    path = tiny_files[spec]
    theirs, their_tokens, their_text = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    model = load_model(path)
    ref = ReferenceSession(model, 32)
    ours = np.concatenate([ref.step(PROMPT)] + [ref.step([t]) for t in their_tokens])
    assert_rows_match(ours, theirs, F32_NMSE if spec.weight_type == "f32" else PEER_NMSE_QUANTIZED)
    if spec.weight_type == "f32":
        assert_greedy_text_matches(model, ours, their_tokens, their_text)


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_q8_0_cpu_prompt_and_decode_match_llama_cpp(llama_cpp, tiny_files, cpu, arch):
    path = tiny_files[HybridSpec(arch, "q8_0")]
    theirs, tokens, _ = llama_greedy(llama_cpp, path, PROMPT, N_DECODE)
    ours = ember_logits(Session(load_model(path), cpu, OPTIONS), PROMPT, tokens)
    assert_rows_match(ours, theirs, PEER_NMSE_QUANTIZED)


@pytest.mark.slow
@pytest.mark.parametrize("arch", HYBRID_ARCHS)
def test_prompt_in_micro_batches_matches_llama_cpp_in_micro_batches(llama_cpp, tiny_files, cpu, arch):
    """The prompt in micro-batches of 3 on both sides (the state carried between them)."""
    path = tiny_files[HybridSpec(arch, "f32")]
    theirs, tokens, _ = llama_greedy(llama_cpp, path, PROMPT, 2, n_batch=3)
    options = SessionOptions(n_ctx=OPTIONS.n_ctx, kv_bucket=OPTIONS.kv_bucket, ubatch=3)
    ours = ember_logits(Session(load_model(path), cpu, options), PROMPT, tokens)
    assert_rows_match(ours, theirs, F32_NMSE)
