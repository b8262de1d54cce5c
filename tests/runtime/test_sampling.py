import numpy as np
import pytest

from ember.runtime.sampling import Sampler, SamplingParams, apply_repeat_penalty, candidate_probs


def test_greedy_takes_the_first_of_tied_maxima():
    logits = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 1


def test_same_seed_same_draws_and_state_restores():
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    a = Sampler(SamplingParams(seed=7, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    b = Sampler(SamplingParams(seed=7, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    assert [a.sample(logits) for _ in range(20)] == [b.sample(logits) for _ in range(20)]
    saved = a.state()
    first = [a.sample(logits) for _ in range(5)]
    a.restore(saved)
    assert [a.sample(logits) for _ in range(5)] == first


def test_top_k_top_p_min_p_filter_candidates():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    ids, probs = candidate_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0))
    assert list(ids) == [0, 1, 2]
    ids, _ = candidate_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0))
    assert list(ids) == [0, 1]
    ids, _ = candidate_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.35))
    assert list(ids) == [0, 1]
    np.testing.assert_allclose(probs.sum(), 1.0)


def test_temperature_sharpens_distribution():
    logits = np.array([1.0, 0.0], dtype=np.float32)
    _, hot = candidate_probs(logits, SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0))
    _, cold = candidate_probs(logits, SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0))
    assert cold[0] > hot[0] > 0.5


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    s = Sampler(SamplingParams(seed=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    counts = np.bincount([s.sample(logits) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.03)


def test_repeat_penalty_lowers_recent_tokens():
    logits = np.array([2.0, -1.0, 2.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert list(out) == [1.0, -2.0, 2.0]
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=2.0)).sample(logits, [0]) == 2


def brute_force_top_k(logits: np.ndarray, k: int) -> list[int]:
    order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))
    return order[:k]


@pytest.mark.parametrize("n, k", [(262144, 40), (262144 + 37, 40), (5000, 1), (5000, 77), (640, 10),
                                  (639, 10), (100, 99), (64 * 41, 40), (64 * 40, 40)])
def test_top_k_ids_is_exact_with_lowest_ids_winning_ties(n, k):
    from ember.runtime.sampling import top_k_ids
    rng = np.random.default_rng(n + k)
    cases = [rng.standard_normal(n).astype(np.float32),
             rng.integers(-3, 3, n).astype(np.float32),          # many ties at the k-th place
             np.full(n, 1.5, dtype=np.float32),                   # all tied
             np.arange(n, dtype=np.float32),                      # the top k in the ragged tail
             np.arange(n, dtype=np.float32)[::-1].copy()]
    for logits in cases:
        assert list(top_k_ids(logits, k)) == brute_force_top_k(logits, k)


def test_candidates_are_the_same_as_a_full_sort_gives():
    """The fast top-k changes no candidate set or probability the full sort would give."""
    rng = np.random.default_rng(5)
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02)
    for _ in range(20):
        logits = (rng.standard_normal(50000) * 4).astype(np.float32)
        ids, probs = candidate_probs(logits, params)
        top = brute_force_top_k(logits, 40)
        vals = logits[top].astype(np.float64)
        full = np.exp(vals - vals.max()) / np.exp(vals - vals.max()).sum()
        keep = int(np.searchsorted(np.cumsum(full), 0.9) + 1)
        assert list(ids) == [t for t, p in zip(top[:keep], full[:keep]) if p >= 0.02 * full[0]]
        assert np.isclose(probs.sum(), 1.0)


def test_draw_matches_numpy_choice_from_the_same_seed():
    from ember.runtime.sampling import draw
    rng = np.random.default_rng(9)
    for size in (1, 2, 7, 40, 300):
        probs = rng.random(size)
        probs /= probs.sum()
        ours, theirs = np.random.default_rng(size), np.random.default_rng(size)
        assert [draw(ours, probs) for _ in range(200)] == [int(theirs.choice(size, p=probs)) for _ in range(200)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_are_refused_naming_the_step(bad):
    from ember.errors import EmberError
    logits = np.zeros(16, np.float32)
    logits[5] = bad
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.8)):
        with pytest.raises(EmberError, match=r"logits after 3 tokens are not finite \(token 5"):
            Sampler(params).sample(logits, [1, 2, 3])


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
                                          ("min_p", 1.5), ("repeat_penalty", 0.0)])
def test_sampling_values_outside_their_meaning_are_refused(field, value):
    from ember.errors import EmberError
    with pytest.raises(EmberError, match="must be"):
        SamplingParams(**{field: value})
