"""Generated control and unknown tokens (BOS, EOS, UNK, other control types of
tokenizer.ggml.token_type) show as nothing unless special, as llama.cpp's token_to_piece with
special=false: the API, the CLI (--special) and the peer's text on a tiny random-weight model."""
import subprocess
import sys

import numpy as np
import pytest

import ember
from ember.models.tokenizer import Tokenizer

from tiny_gguf import Spec

# The tiny llama model's greedy continuation of this prompt generates <s> (id 1) seventh.
PROMPT, N = "hello in", 24


@pytest.fixture(scope="module")
def tiny(tiny_files):
    return tiny_files[Spec("llama", "f32")]


@pytest.fixture(scope="module")
def llm(tiny):
    return ember.load(tiny, threads=1, n_ctx=128)


def test_a_generated_bos_shows_as_nothing_unless_special(llm):
    plain = llm.generate(PROMPT, max_tokens=N, temperature=0)
    ids = llm.last.tokens
    assert llm.tokenizer.bos_id in ids
    special = llm.generate(PROMPT, max_tokens=N, temperature=0, special=True)
    assert llm.last.tokens == ids
    assert "<s>" not in plain and special.count("<s>") == ids.count(llm.tokenizer.bos_id)
    assert special.replace("<s>", "") == plain


def test_control_and_unknown_pieces_are_empty_unless_special(tiny):
    tokenizer = Tokenizer.from_gguf(tiny)
    for token, text in ((tokenizer.unk_id, b"<unk>"), (tokenizer.bos_id, b"<s>"), (tokenizer.eos_id, b"</s>")):
        assert tokenizer.token_to_piece(token, skip_special=True) == b""
        assert tokenizer.token_to_piece(token) == text
    ordinary = tokenizer.encode("hello", add_special=False)[0]
    assert tokenizer.token_to_piece(ordinary, skip_special=True) == tokenizer.token_to_piece(ordinary)


def test_the_cli_prints_control_tokens_only_with_special(tiny):
    def run(*extra):
        out = subprocess.run([sys.executable, "-m", "ember.cli", "generate", str(tiny), "-p", PROMPT, "-n", str(N),
                              "--temp", "0", "-t", "1", "-c", "128", "-q", *extra],
                             capture_output=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout
    plain, special = run(), run("--special")
    assert b"<s>" not in plain and b"<s>" in special
    assert special.replace(b"<s>", b"") == plain


@pytest.mark.peer
def test_greedy_text_equals_llama_cpp(llm, tiny):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: "
                                    "pip install -e '.[peer]' (builds llama.cpp, ~5-10 min)")
    text = llm.generate(PROMPT, max_tokens=N, temperature=0)
    ours = llm.last.tokens
    peer = llama_cpp.Llama(model_path=str(tiny), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        prompt = peer.tokenize(PROMPT.encode(), add_bos=True, special=True)
        assert prompt == llm.tokenize(PROMPT, special=True)
        peer.eval(prompt)
        theirs = []
        while len(theirs) < N:        # llama.cpp's greedy continuation, to its end of generation
            token = int(np.argmax(peer.scores[peer.n_tokens - 1]))
            if peer.token_eos() == token:
                break
            theirs.append(token)
            peer.eval([token])
        assert ours == theirs
        assert text == peer.detokenize(theirs).decode("utf-8", errors="replace")
        special = llm.generate(PROMPT, max_tokens=N, temperature=0, special=True)
        assert special == peer.detokenize(theirs, special=True).decode("utf-8", errors="replace")
    finally:
        peer.close()
