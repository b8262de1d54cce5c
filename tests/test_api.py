"""ember.load and its Model (ember/api.py) on tiny random-weight GGUFs, and the README's
Python API example run as it stands there."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ember
from ember.backends import get_backend
from ember.errors import EmberError
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions

from tiny_gguf import Spec

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny(tiny_files) -> Path:
    return tiny_files[Spec("llama", "q8_0")]


@pytest.fixture(scope="module")
def llm(tiny):
    return ember.load(tiny, threads=1, n_ctx=128)


def test_import_ember_stays_cheap():
    code = "import sys, ember; print(sorted(m for m in ('numpy', 'ember.api', 'jinja2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_greedy_generate_equals_the_runtime_generation(llm, tiny):
    session = Session(load_model(tiny), get_backend("cpu", threads=1), SessionOptions(n_ctx=128))
    tokenizer = Tokenizer.from_gguf(tiny)
    expected = generate(session, tokenizer, "hello world", 12, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True)
    text = llm.generate("hello world", max_tokens=12, temperature=0, ignore_eos=True)
    assert text == expected.text and llm.last.tokens == expected.tokens
    assert len(llm.last.tokens) == 12 and llm.last.stop_reason == "length"


def test_streamed_pieces_join_to_the_text(llm):
    text = llm.generate("the model", max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
    stream = llm.generate("the model", max_tokens=10, temperature=0.8, seed=3, ignore_eos=True, stream=True)
    assert not isinstance(stream, str)
    pieces = list(stream)
    assert "".join(pieces) == text and len(pieces) > 1


def test_seed_changes_a_sampled_generation(llm):
    texts = {llm.generate("the", max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                          seed=seed, ignore_eos=True) for seed in range(4)}
    assert len(texts) > 1


def test_stop_string_ends_the_text(llm):
    full = llm.generate("the model", max_tokens=16, temperature=0, ignore_eos=True)
    assert full.startswith(" f4J")      # greedy text of this random-weight model
    text = llm.generate("the model", max_tokens=16, temperature=0, ignore_eos=True, stop="4J")
    assert text == " f" and llm.last.stop_reason == "stop string"


def test_tokenize_detokenize(llm, tiny):
    ids = llm.tokenize("hello world")
    assert ids == Tokenizer.from_gguf(tiny).encode("hello world")
    assert ids[0] == llm.tokenizer.bos_id
    assert llm.tokenize(b"hello world", add_bos=False) == ids[1:]
    assert llm.detokenize(ids) == "hello world"
    assert llm.detokenize([llm.tokenizer.eos_id]) == ""
    assert llm.detokenize([llm.tokenizer.eos_id], special=True) == "</s>"


def test_logits_are_every_position_of_a_fresh_cache(llm):
    llm.generate("the model", max_tokens=4, temperature=0)     # leaves the cache in use
    logits = llm.logits("hello world")
    ids = llm.tokenize("hello world")
    assert logits.dtype == np.float32 and logits.shape == (len(ids), llm.n_vocab)
    np.testing.assert_array_equal(logits, llm.logits(ids))


def test_perplexity_is_finite_and_reports_chunks(llm):
    seen = []
    result = llm.perplexity("the small model runs on the device " * 30, n_ctx=32, chunks=2,
                            on_chunk=lambda i, n, ppl: seen.append((i, n)))
    assert np.isfinite(result.ppl) and result.ppl > 1
    assert seen == [(0, 2), (1, 2)]


def test_bad_arguments_are_one_line_errors(llm, tiny):
    with pytest.raises(EmberError, match="max_tokens"):
        llm.generate("x", max_tokens=-1)
    with pytest.raises(EmberError, match="unknown pass 'no-such-pass'"):
        ember.load(tiny, disable=["no-such-pass"])
    with pytest.raises(EmberError, match="exceeds the session's context"):
        llm.perplexity("x", n_ctx=4096)


def test_the_readme_example_runs(tiny):
    section = README.read_text().split("### Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'ember.load("model.gguf"' in code
    code = code.replace('"model.gguf"', repr(str(tiny)))
    exec(compile(code, f"{README}:Python API", "exec"), {})
