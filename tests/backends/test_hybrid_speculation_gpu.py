"""Greedy speculation on OpenCL (PoCL) and Vulkan (lavapipe) for the hybrids lfm2 (short
convolutions), nemotron_h (Mamba-2) and qwen35moe (gated DeltaNet, MoE): n-gram drafts, and a
draft model of another architecture (the same 320-token vocabulary, other weights: rejected
tails, and a recurrent draft that rewinds), with the default per-position-states rollback, give
exactly the tokens of plain greedy decoding on the same backend (ember.runtime.speculative); the
n-gram rounds move no byte of state or cache between host and device. Slow: PoCL compiles every
kernel of each step graph cold (minutes per model); each backend skips where missing."""
from __future__ import annotations

import numpy as np
import pytest

from devices import make_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions
from ember.runtime.speculative import ModelDraft, NgramDraft, speculative_generate
from tiny_gguf_delta import DeltaSpec
from tiny_gguf_hybrid import HybridSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes

OPTIONS = SessionOptions(n_ctx=96, kv_bucket=32)
N_PREDICT = 24
TARGETS = {"lfm2": HybridSpec("lfm2"), "nemotron_h": HybridSpec("nemotron_h"),
           "qwen35moe": DeltaSpec("qwen35moe", "f32")}
# a draft of another architecture for each (tests/runtime/test_hybrid_sessions.py picks the
# hybrids' pairs so that they disagree on its prompt)
DRAFTS = {"lfm2": HybridSpec("nemotron_h"), "nemotron_h": HybridSpec("falcon-h1"),
          "qwen35moe": DeltaSpec("qwen35", "f32")}


def repetitive_prompt(arch: str) -> list[int]:
    """A motif repeated (the prompts of tests/runtime/test_hybrid_sessions.py and, for qwen35moe,
    whose greedy text continues that one nowhere, of test_spec_rollback.py): n-grams find drafts."""
    if arch == "qwen35moe":
        motif = list(np.random.default_rng(2).integers(3, 200, size=4))
    else:
        motif = list(np.random.default_rng(7).integers(3, 300, size=4))
    return [1] + (motif * 4)[:11]


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["opencl", "vulkan"])
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_gpu_hybrid_speculation_is_token_identical(tiny_files, backend_cache, backend_name, arch, drafter):
    backend = make_backend(backend_name, backend_cache)
    model = load_model(tiny_files[TARGETS[arch]])
    tokenizer = Tokenizer.from_metadata(model.tokenizer)
    target = Session(model, backend, OPTIONS)
    prompt = repetitive_prompt(arch)
    expected = generate(target, tokenizer, prompt, N_PREDICT, Sampler(SamplingParams(temperature=0)),
                        ignore_eos=True).tokens
    if drafter == "ngram":
        draft, draft_max = NgramDraft(), 5
    else:
        draft, draft_max = ModelDraft(Session(load_model(tiny_files[DRAFTS[arch]]), backend, OPTIONS)), 3
    got, stats = speculative_generate(target, draft, tokenizer, prompt, N_PREDICT, draft_max=draft_max,
                                      ignore_eos=True)
    assert got.tokens == expected
    assert stats.drafted > 0 and stats.rollback == "states" and stats.redecode_seconds == 0
    if drafter == "ngram":
        assert stats.synced_bytes == 0
