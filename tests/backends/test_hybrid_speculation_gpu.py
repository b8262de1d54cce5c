"""Greedy speculation on OpenCL (PoCL) and Vulkan (lavapipe) for every hybrid of the seed's model
class: the short-convolution hybrids lfm2 and lfm2moe (MoE), the Mamba-2 hybrids nemotron_h and
falcon-h1 (parallel attention + SSM), jamba (Mamba-1, MoE) and the gated-DeltaNet hybrids
qwen35, qwen3next and qwen35moe (MoE). n-gram drafts, and a draft model of another architecture
(the same 320-token vocabulary, other weights: rejected tails, and a recurrent draft that
rewinds), give exactly the tokens of plain greedy decoding on the same backend
(ember.runtime.speculative), with the default per-position-states rollback and with the
checkpoint-and-re-decode one (`--spec-rollback redecode`); the n-gram rounds with the default
rollback move no byte of state or cache between host and device. Slow: PoCL compiles every
kernel of each step graph cold (minutes per model); each backend skips where missing. Run one
arch at a time (-k ARCH) on a loaded machine."""
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
from tiny_gguf_jamba import JambaSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # pyopencl's build-log notes

OPTIONS = SessionOptions(n_ctx=96, kv_bucket=32)
N_PREDICT = 24
TARGETS = {"lfm2": HybridSpec("lfm2"), "lfm2moe": HybridSpec("lfm2moe"),
           "nemotron_h": HybridSpec("nemotron_h"), "falcon-h1": HybridSpec("falcon-h1"),
           "jamba": JambaSpec(), "qwen35": DeltaSpec("qwen35", "f32"),
           "qwen3next": DeltaSpec("qwen3next", "f32"), "qwen35moe": DeltaSpec("qwen35moe", "f32")}
# a draft of another architecture for each, with the same tokenizer (tests/runtime/
# test_hybrid_sessions.py picks the hybrids' pairs so that they disagree on its prompt)
DRAFTS = {"lfm2": HybridSpec("nemotron_h"), "lfm2moe": HybridSpec("nemotron_h"),
          "nemotron_h": HybridSpec("falcon-h1"), "falcon-h1": HybridSpec("lfm2moe"),
          "jamba": HybridSpec("lfm2"), "qwen35": DeltaSpec("qwen3next", "f32"),
          "qwen3next": DeltaSpec("qwen35", "f32"), "qwen35moe": DeltaSpec("qwen35", "f32")}


# the prompt's seed per arch: a motif whose greedy continuation repeats earlier tokens, so that
# n-grams find drafts (qwen35moe's is test_spec_rollback.py's; the hybrids' default that of
# tests/runtime/test_hybrid_sessions.py; the others checked on the CPU to draft)
PROMPT_SEEDS = {"qwen35moe": 2, "qwen35": 1, "qwen3next": 1, "jamba": 3}


def repetitive_prompt(arch: str) -> list[int]:
    """A motif repeated four times (ids below 200 for the byte-level BPE vocabulary of the DeltaNet
    files, below 300 for the others), cut to 12 tokens with BOS."""
    high = 200 if isinstance(TARGETS[arch], DeltaSpec) else 300
    motif = list(np.random.default_rng(PROMPT_SEEDS.get(arch, 7)).integers(3, high, size=4))
    return [1] + (motif * 4)[:11]


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["opencl", "vulkan"])
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("drafter, rollback", [("ngram", "states"), ("model", "states"), ("model", "redecode")],
                         ids=["ngram", "model", "model-redecode"])
def test_gpu_hybrid_speculation_is_token_identical(tiny_files, backend_cache, backend_name, arch, drafter,
                                                   rollback):
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
                                      ignore_eos=True, rollback=rollback)
    assert got.tokens == expected
    assert stats.drafted > 0 and stats.rollback == rollback
    if rollback == "states":
        assert stats.redecode_seconds == 0
    if drafter == "ngram":
        assert stats.synced_bytes == 0
    if drafter == "model":      # rejected tails: a rollback happened (re-decoding where asked)
        assert stats.accepted < stats.drafted
        assert (stats.redecode_seconds > 0) == (rollback == "redecode")
