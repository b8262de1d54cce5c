"""Speculative decoding is token-identical to greedy decoding (attention-only models)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ember.backends import get_backend
from ember.models import load_model
from ember.models.tokenizer import Tokenizer
from ember.runtime.generate import generate
from ember.runtime.sampling import Sampler, SamplingParams
from ember.runtime.session import Session, SessionOptions
from ember.runtime.speculative import ModelDraft, NgramDraft, speculative_generate
from tiny_gguf import Spec

OPTIONS = SessionOptions(n_ctx=96, kv_bucket=32)
PROMPT_LEN = 12
N_PREDICT = 24


@pytest.fixture(scope="module")
def setup(tiny_files, shared_cpu_cache):
    backend = get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)
    target = load_model(tiny_files[Spec("llama", "f32")])
    draft = load_model(tiny_files[Spec("llama", "q4_0")])   # same vocabulary, cheaper weights
    tokenizer = Tokenizer.from_metadata(target.tokenizer)
    return backend, Session(target, backend, OPTIONS), Session(draft, backend, OPTIONS), tokenizer


def greedy(session, tokenizer, prompt):
    return generate(session, tokenizer, prompt, N_PREDICT, Sampler(SamplingParams(temperature=0)),
                    ignore_eos=True).tokens


def repetitive_prompt(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    motif = list(rng.integers(3, 200, size=4))
    return [1] + (motif * 4)[:PROMPT_LEN - 1]


@pytest.mark.parametrize("draft_max", [1, pytest.param(2, marks=pytest.mark.slow), 3,
                                       pytest.param(5, marks=pytest.mark.slow), 8])
def test_ngram_speculation_is_token_identical(setup, draft_max):
    _, target, _, tokenizer = setup
    prompt = repetitive_prompt(0)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected
    assert stats.drafted > 0 and stats.rounds < N_PREDICT   # it did speculate


@pytest.mark.parametrize("draft_max", [4, pytest.param(1, marks=pytest.mark.slow),
                                       pytest.param(8, marks=pytest.mark.slow)])
def test_draft_model_speculation_is_token_identical(setup, draft_max):
    _, target, draft, tokenizer = setup
    prompt = repetitive_prompt(1)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, ModelDraft(draft), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected
    assert stats.drafted > 0


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), draft_max=st.integers(1, 8))
def test_speculation_identity_over_seeds(setup, seed, draft_max):
    _, target, _, tokenizer = setup
    rng = np.random.default_rng(seed)
    prompt = [1] + list(rng.integers(3, 200, size=PROMPT_LEN - 1))
    expected = greedy(target, tokenizer, prompt)
    got, _ = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT,
                                  draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected


# ---- recurrent models: per-position states, or checkpoint + re-decode on partial acceptance ----
from tiny_gguf_ssm import SsmSpec  # noqa: E402


@pytest.fixture(scope="module")
def hybrid(tiny_files, shared_cpu_cache):
    backend = get_backend("cpu", threads=2, cache_dir=shared_cpu_cache)   # test_spec_rollback's graphs
    model = load_model(tiny_files[SsmSpec("granitehybrid", "f32")])
    return Session(model, backend, OPTIONS), Tokenizer.from_metadata(model.tokenizer)


# slow: test_spec_rollback.py covers the hybrid targets at every acceptance position by default
@pytest.mark.slow
@pytest.mark.parametrize("draft_max", [2, 6])
def test_hybrid_speculation_is_token_identical(hybrid, draft_max):
    target, tokenizer = hybrid
    assert target.is_recurrent
    prompt = repetitive_prompt(2)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True, rollback="redecode")
    assert got.tokens == expected
    assert stats.drafted > 0
    # partial acceptances happened, so the restore path ran and was checked by the identity
    assert stats.accepted < stats.drafted and stats.redecode_seconds > 0
    # the default rolls back by per-position states (tests/runtime/test_spec_rollback.py)
    got, stats = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected and stats.rollback == "states" and stats.redecode_seconds == 0


# slow: test_spec_rollback.py's recurrent draft model case covers it by default
@pytest.mark.slow
@pytest.mark.parametrize("draft_max", [2, 5])
def test_recurrent_draft_model_rewinds_by_state(hybrid, tiny_files, draft_max):
    # A draft with Mamba-2 layers cannot truncate its rejected tail; ModelDraft rewinds it to
    # the state it kept after that position (this raised EmberError in Session.truncate before).
    target, tokenizer = hybrid
    # other weights, same vocabulary: it disagrees often, so rejected tails must be rewound
    draft_model = load_model(tiny_files[SsmSpec("mamba2", "f32")])
    draft = ModelDraft(Session(draft_model, target.backend, OPTIONS))
    prompt = repetitive_prompt(5)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, draft, tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected
    assert stats.accepted < stats.drafted          # some rounds rejected a tail: rewinds ran
    # the rewound draft proposes what a fresh draft would from the same context
    context = prompt + expected[:N_PREDICT // 2]
    fresh = ModelDraft(Session(draft_model, target.backend, OPTIONS))
    assert draft.propose(context, draft_max) == fresh.propose(context, draft_max)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mamba2", "granitehybrid"])
@pytest.mark.parametrize("draft_max", [1, 3, 8])
def test_recurrent_speculation_identity_matrix(tiny_files, tmp_path_factory, arch, draft_max):
    backend = get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp(f"spec-{arch}"))
    model = load_model(tiny_files[SsmSpec(arch, "f32")])
    target, tokenizer = Session(model, backend, OPTIONS), Tokenizer.from_metadata(model.tokenizer)
    for seed in (3, 4):
        prompt = repetitive_prompt(seed)
        expected = greedy(target, tokenizer, prompt)
        got, _ = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
        assert got.tokens == expected


def test_ngram_drafter_backs_off_longer_after_each_low_streak():
    draft = NgramDraft()
    context = [1, 2, 3, 1, 2, 3, 1, 2]
    pauses = []
    for _ in range(3):
        for _ in range(3):                       # three rounds with nothing accepted
            assert draft.propose(context, 4)
            draft.accepted(context, 4, 0)
        rounds = 0
        while not draft.propose(context, 4):
            rounds += 1
        pauses.append(rounds)
    assert pauses == [8, 16, 32]
    draft.accepted(context, 4, 4)                # a good round resets the pause
    assert draft.pause == 8


# ---- speculative sampling (temperature > 0) ----------------------------------------------------
def test_speculative_sampling_keeps_the_target_distribution():
    """With drafts d0, d1 against target rows p0, p1, p2 (what the target would sample after
    each prefix), the first emitted token is distributed as p0, and after an accepted d0 the
    next one as p1: exactly sampling without speculation. 40000 rounds, a total variation
    bound several standard errors wide."""
    from ember.runtime.sampling import SamplingParams, candidate_probs
    from ember.runtime.speculative import _sample_verify
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3, 6)).astype(np.float32) * 1.5
    drafts = [int(np.argsort(rows[0])[-2]), 4]           # d0: the second most likely token
    p = [candidate_probs(r, params) for r in rows]
    p = [probs[np.argsort(ids)] for ids, probs in p]     # by token id
    sampler = Sampler(params)
    first, second = np.zeros(6), np.zeros(6)
    n = 40000
    for _ in range(n):
        n_ok, token = _sample_verify(sampler, rows, drafts, context=[1, 2])
        emitted = drafts[:n_ok] + [token]
        first[emitted[0]] += 1
        if emitted[0] == drafts[0]:
            second[emitted[1]] += 1
    assert 0.5 * np.abs(first / n - p[0]).sum() < 0.015
    assert 0.5 * np.abs(second / second.sum() - p[1]).sum() < 0.03
    assert second.sum() > 0.1 * n                      # d0 was accepted often enough to test p1


def test_speculative_sampling_runs_on_a_model_and_is_seeded(setup):
    _, target, draft, tokenizer = setup
    prompt = repetitive_prompt(2)
    params = SamplingParams(temperature=0.5, seed=5)
    runs = [speculative_generate(target, ModelDraft(draft), tokenizer, prompt, N_PREDICT, draft_max=4,
                                 ignore_eos=True, sampler=Sampler(params)) for _ in range(2)]
    (a, stats), (b, _) = runs
    assert a.tokens == b.tokens and len(a.tokens) == N_PREDICT     # same seed, same text
    assert stats.drafted > 0 and stats.accepted > 0


# ---- gated-DeltaNet hybrids (qwen35moe: DeltaNet + gated attention + MoE) --------------------
from tiny_gguf_delta import DeltaSpec  # noqa: E402


# slow: each verify and re-decode shape compiles a step graph (~40 s for one case on 2 cores)
@pytest.mark.slow
@pytest.mark.parametrize("spec, draft_max, seed", [
    (DeltaSpec("qwen35moe", "q8_0"), 3, 2),
    (DeltaSpec("qwen35moe", "f32"), 6, 2),
    (DeltaSpec("qwen3next", "f32"), 3, 2),
    (DeltaSpec("qwen35", "f32"), 2, 5),      # seed 2's text never repeats: nothing to draft
], ids=str)
def test_delta_net_speculation_is_token_identical(tiny_files, tmp_path_factory, spec, draft_max, seed):
    backend = get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp(f"spec-{spec.arch}"))
    model = load_model(tiny_files[spec])
    target, tokenizer = Session(model, backend, OPTIONS), Tokenizer.from_metadata(model.tokenizer)
    assert target.is_recurrent
    prompt = repetitive_prompt(seed)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, NgramDraft(), tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected
    assert stats.drafted > 0


@pytest.mark.parametrize("draft_max", [1, pytest.param(8, marks=pytest.mark.slow)])   # suite time
def test_speculation_at_the_end_of_the_context_is_token_identical(setup, draft_max):
    """Generating past n_ctx: speculation once stopped one token short of plain decoding, which
    also emits the token the last position's logits choose (issue 16)."""
    _, target, _, tokenizer = setup
    prompt = repetitive_prompt(3)
    n = OPTIONS.n_ctx                      # more than fits
    expected = generate(target, tokenizer, prompt, n, Sampler(SamplingParams(temperature=0)), ignore_eos=True)
    got, _ = speculative_generate(target, NgramDraft(), tokenizer, prompt, n, draft_max=draft_max,
                                  ignore_eos=True)
    assert expected.stop_reason == got.stop_reason == "context"
    assert len(expected.tokens) == OPTIONS.n_ctx - PROMPT_LEN + 1
    assert got.tokens == expected.tokens


# slow: target and draft each compile their decode, verify and re-decode step graphs (~1-4 min each
# on 2 loaded cores)
@pytest.mark.slow
@pytest.mark.parametrize("target_spec, draft_spec, draft_max, agrees", [
    # another arch (qwen35: dense FFN, 3 layers, other weights): it never agrees, every tail is
    # rejected and rewound in both the DeltaNet target (per-position states) and the DeltaNet
    # draft (the states it kept)
    (DeltaSpec("qwen35moe", "f32"), DeltaSpec("qwen35", "f32"), 3, False),
    # the same weights in q8_0: it agrees mostly, whole drafts are accepted
    (DeltaSpec("qwen35moe", "f32"), DeltaSpec("qwen35moe", "q8_0"), 4, True),
    (DeltaSpec("qwen3next", "f32"), DeltaSpec("qwen35moe", "q8_0"), 2, False),
], ids=lambda s: f"k{s}" if type(s) is int else str(s))
def test_delta_net_draft_model_speculation_is_token_identical(tiny_files, tmp_path_factory, target_spec,
                                                              draft_spec, draft_max, agrees):
    backend = get_backend("cpu", threads=2, cache_dir=tmp_path_factory.mktemp("spec-delta-draft"))
    model = load_model(tiny_files[target_spec])
    target, tokenizer = Session(model, backend, OPTIONS), Tokenizer.from_metadata(model.tokenizer)
    draft = ModelDraft(Session(load_model(tiny_files[draft_spec]), backend, OPTIONS))
    assert target.is_recurrent and draft.session.is_recurrent
    prompt = repetitive_prompt(6)
    expected = greedy(target, tokenizer, prompt)
    got, stats = speculative_generate(target, draft, tokenizer, prompt, N_PREDICT,
                                      draft_max=draft_max, ignore_eos=True)
    assert got.tokens == expected
    assert stats.drafted > 0
    if agrees:
        assert stats.accepted > 0 and stats.rounds < N_PREDICT      # drafts were kept
    else:
        # tails were rewound, by selecting the accepted prefix's state (the default rollback)
        # rather than re-decoding
        assert stats.accepted < stats.drafted and stats.rollback == "states"
        assert stats.rollback_seconds > 0 and stats.redecode_seconds == 0
