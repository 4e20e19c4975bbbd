"""Sampling strategies on hand-made logits: literal supports, frequencies, jit behaviour."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_app.text import sampling
from gemma_app.text.sampling import (
    MAX_TOP_K,
    Greedy,
    MinPSampling,
    RandomSampling,
    TopkSampling,
    TopkTopPSampling,
    TopPSampling,
    make_sampling,
)

# Compiling dominates on CPU (~0.2-1.5 s per method class and shape), so every test runs at one
# of two shapes through one jitted entry point. The method is a traced argument, as in the
# decode step; `_TRACES` records each compilation for the no-recompilation test.
# SMALL: below every threshold (simple paths), many rows for frequency tests. BIG: the vocab is
# above MAX_TOP_K (top-p fallback) and above, but not a multiple of, the two-level block size.
SMALL = (4096, 64)
BIG = (512, 2100)
VOCAB = BIG[1]
_TRACES: list[tuple[str, tuple[int, ...]]] = []


@jax.jit
def _sample(method, logits, rng):
    _TRACES.append((type(method).__name__, logits.shape))  # Runs only while tracing.
    return method(logits, rng)


ALL_METHODS = [
    Greedy(),
    RandomSampling(temperature=0.8),
    TopkSampling(k=5, temperature=1.3),
    TopPSampling(p=0.9, temperature=1.0),
    MinPSampling(p=0.05, temperature=1.0),
    TopkTopPSampling(k=40, p=0.9, temperature=0.7),
]
RANDOM_METHODS = ALL_METHODS[1:]


def _method_id(method) -> str:
    return type(method).__name__


def _draws(method, logits, *, shape=SMALL, calls: int = 4) -> np.ndarray:
    """shape[0] * calls independent draws from one row of logits, -inf-padded to shape[1]."""
    row = np.full(shape[1], -np.inf, np.float32)
    row[: len(logits)] = logits
    rows = np.broadcast_to(row, shape)
    draws = [_sample(method, rows, jax.random.key(seed)) for seed in range(calls)]
    assert draws[0].shape == shape[:1] and draws[0].dtype == jnp.int32
    return np.concatenate(draws)


def _frequencies(tokens: np.ndarray, vocab: int) -> np.ndarray:
    return np.bincount(tokens, minlength=vocab)[:vocab] / len(tokens)


def _log(probs) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, np.float64)).astype(np.float32)


def _reference_nucleus(logits: np.ndarray, p: float) -> np.ndarray:
    """The gemma top-p rule in float64: ids with logit >= the logit where cumsum reaches p."""
    x = np.asarray(logits, np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-x, kind="stable")
    cumulative = np.cumsum(probs[order])
    n_below = int(np.sum(cumulative < p))
    # Keep the case away from float32 rounding, or the test would not be decisive.
    assert abs(cumulative[n_below] - p) > 2e-5
    assert n_below == 0 or abs(cumulative[n_below - 1] - p) > 2e-5
    return np.flatnonzero(x >= x[order[n_below]])


def _rng(seed: int) -> np.random.Generator:
    # Test data comes from numpy: eager jax ops would each compile, which costs seconds here.
    return np.random.default_rng(seed)


def _noise(seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * _rng(seed).standard_normal(BIG)).astype(np.float32)


# --- Greedy and top-k --------------------------------------------------------------------


def test_greedy_hand_made():
    logits = np.full(SMALL, -np.inf, np.float32)
    logits[:3, :4] = [[0.0, 3.0, 1.0, -np.inf], [2.0, 2.0, 1.0, 0.0], [-np.inf, -9, -1.0, -9]]
    tokens = _sample(Greedy(), logits, jax.random.key(0))
    np.testing.assert_array_equal(tokens[:3], [1, 0, 2])  # Ties: the lowest id, like argmax.


def test_greedy_large_vocab_matches_argmax():
    logits = _noise(1)
    logits[0, VOCAB - 1] = logits[1, 7] = logits[1, 2000] = 9.0
    tokens = _sample(Greedy(), logits, jax.random.key(0))
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert tokens[0] == VOCAB - 1 and tokens[1] == 7


def test_top1_equals_greedy():
    logits = _noise(2)
    for seed in range(2):
        rng = jax.random.key(seed)
        np.testing.assert_array_equal(
            _sample(TopkSampling(k=1, temperature=0.7), logits, rng),
            _sample(Greedy(), logits, rng),
        )


def test_top_k_support_is_the_k_largest():
    logits = _rng(3).standard_normal(50)
    tokens = _draws(TopkSampling(k=5, temperature=5.0), logits)
    assert set(tokens) == set(np.argsort(-logits)[:5])


# --- Top-p ---------------------------------------------------------------------------------


def test_top_p_gemma_case():
    # google-deepmind/gemma `_sampling_test.py`: softmax([5,4,3,2,1])[0] = 0.64 >= 0.6.
    for shape in (SMALL, BIG):
        tokens = _draws(TopPSampling(p=0.6), [5.0, 4.0, 3.0, 2.0, 1.0], shape=shape, calls=1)
        assert np.all(tokens == 0)


def test_top_p_keeps_the_token_that_crosses_p():
    # cumsum = 0.4, 0.7: token 1 crosses 0.65 and is kept; renormalised to 4/7, 3/7.
    tokens = _draws(TopPSampling(p=0.65), _log([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(_frequencies(tokens, 4), [4 / 7, 3 / 7, 0, 0], atol=0.02)
    assert set(tokens) == {0, 1}


def test_top_p_keeps_ties_of_the_cut():
    # Token 1 crosses p=0.5; token 2 has the same probability, so it is kept too.
    tokens = _draws(TopPSampling(p=0.5), _log([0.4, 0.2, 0.2, 0.1, 0.1]))
    np.testing.assert_allclose(_frequencies(tokens, 5), [0.5, 0.25, 0.25, 0, 0], atol=0.02)


def test_top_p_one_keeps_everything():
    tokens = _draws(TopPSampling(p=1.0), _log([0.7, 0.2, 0.09, 0.01]))
    assert set(tokens) == {0, 1, 2, 3}


_nucleus_cut = jax.jit(sampling._nucleus_cut)


@pytest.mark.parametrize(
    "scale, p",
    [
        (-1.5, 0.9),  # 44 tokens, inside the top-MAX_TOP_K window: fast path.
        (-1e-3, 0.7),  # 1470 tokens, more than the window: bisection fallback.
        (-1e-3, 0.3),  # 630 tokens of a flat row: fast path again.
    ],
)
def test_top_p_cut_is_exact(scale, p):
    logits = (scale * np.log1p(_rng(4).permutation(VOCAB))).astype(np.float32)
    cut = np.asarray(_nucleus_cut(logits[None], p))[0, 0]
    np.testing.assert_array_equal(np.flatnonzero(logits >= cut), _reference_nucleus(logits, p))


def test_top_p_fallback_samples_exactly():
    # A flat row: the top-MAX_TOP_K candidates hold less than p of the mass.
    ranks = _rng(5).permutation(VOCAB)
    logits = (-2e-4 * ranks).astype(np.float32)
    expected = _reference_nucleus(logits, 0.8)
    assert len(expected) > MAX_TOP_K + 500

    tokens = _draws(TopPSampling(p=0.8), logits, shape=BIG, calls=8)
    assert set(tokens) <= set(expected)
    # Draws beyond the window happen at their renormalised rate (0.33).
    probs = np.exp(logits[expected].astype(np.float64))
    beyond = probs[ranks[expected] >= MAX_TOP_K].sum() / probs.sum()
    assert abs(np.mean(ranks[tokens] >= MAX_TOP_K) - beyond) < 0.03


def test_top_p_ties_across_the_window_edge():
    # All VOCAB tokens tie, so all are in the nucleus although p is small.
    tokens = _draws(TopPSampling(p=0.3), np.zeros(VOCAB, np.float32), shape=BIG, calls=8)
    assert abs(np.mean(tokens >= MAX_TOP_K) - (VOCAB - MAX_TOP_K) / VOCAB) < 0.03


def test_top_k_then_top_p_renormalises_in_between():
    # Top-3 renormalised: [0.5, 0.3, 0.2]; cumsum 0.5, 0.8 so p=0.7 keeps {0, 1}. Without the
    # renormalisation (0.4, 0.24) the cumsum would only reach 0.64 at token 1.
    tokens = _draws(TopkTopPSampling(k=3, p=0.7), _log([0.4, 0.24, 0.16, 0.2]))
    np.testing.assert_allclose(_frequencies(tokens, 4), [5 / 8, 3 / 8, 0, 0], atol=0.02)


# --- Min-p and temperature --------------------------------------------------------------------


def test_min_p_literal_set():
    # Floor 0.15 * 0.5 = 0.075: tokens 0-2 stay, renormalised by 0.9.
    tokens = _draws(MinPSampling(p=0.15), _log([0.5, 0.3, 0.1, 0.06, 0.04]))
    np.testing.assert_allclose(_frequencies(tokens, 5), [5 / 9, 3 / 9, 1 / 9, 0, 0], atol=0.02)


def test_min_p_zero_keeps_everything():
    tokens = _draws(MinPSampling(p=0.0), _log([0.9, 0.07, 0.03]))
    assert set(tokens) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize(
    "shape, ids",
    [(SMALL, [0, 2, 3, 5, 63]), (BIG, [3, 700, 1500, VOCAB - 1, 42])],  # One- and two-level.
)
def test_temperature_matches_softmax(temperature, shape, ids):
    values = np.array([1.0, 0.5, 0.0, -0.5, -1.0], np.float32)
    logits = np.full(shape[1], -np.inf, np.float32)
    logits[ids] = values
    tokens = _draws(RandomSampling(temperature=temperature), logits, shape=shape, calls=4)

    assert set(tokens) <= set(ids)
    n = len(tokens)
    expected = n * np.exp(values / temperature) / np.exp(values / temperature).sum()
    observed = np.bincount(tokens, minlength=shape[1])[ids]
    assert np.sum((observed - expected) ** 2 / expected) < 18.47  # Chi-square, 4 dof, p=0.001.


# --- Properties shared by every method ---------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS, ids=_method_id)
def test_dominant_token_is_returned(method):
    winners = _rng(6).integers(0, VOCAB, BIG[0])
    logits = _noise(6)
    logits[np.arange(BIG[0]), winners] = 100.0
    for seed in range(2):
        np.testing.assert_array_equal(_sample(method, logits, jax.random.key(seed)), winners)


@pytest.mark.parametrize("method", ALL_METHODS, ids=_method_id)
def test_forbidden_tokens_are_never_drawn(method):
    # First rows: all but one token forbidden (no NaN, always that token). Other rows: every
    # even id forbidden, so draws must be odd.
    allowed = np.array([0, 1, 511, 1023, 1024, VOCAB - 1])
    logits = _noise(7, scale=0.01)
    logits[:, ::2] = -np.inf
    logits[: len(allowed)] = -np.inf
    logits[np.arange(len(allowed)), allowed] = -5.0
    tokens = np.asarray(_sample(method, logits, jax.random.key(0)))
    np.testing.assert_array_equal(tokens[: len(allowed)], allowed)
    assert np.all(tokens[len(allowed) :] % 2 == 1)


@pytest.mark.parametrize("method", RANDOM_METHODS, ids=_method_id)
def test_seeded_reproducible_and_rows_independent(method):
    rows = np.broadcast_to(_noise(8, scale=0.1)[:1], BIG)
    first = _sample(method, rows, jax.random.key(11))
    np.testing.assert_array_equal(first, _sample(method, rows, jax.random.key(11)))
    assert not np.array_equal(first, _sample(method, rows, jax.random.key(12)))
    assert len(set(np.asarray(first))) > 1  # Identical rows still draw independently.


# --- Pytree and jit behaviour ------------------------------------------------------------------


def test_numeric_fields_are_leaves():
    method = TopkTopPSampling(k=40, p=0.9, temperature=0.7)
    assert jax.tree.leaves(method) == [40, 0.9, 0.7]
    assert jax.tree.map(lambda x: x, method) == method
    assert jax.tree.leaves(Greedy()) == []


def test_validation_skips_traced_values():
    # Unflattening inside a trace rebuilds the method from tracers; that must not validate.
    out = jax.eval_shape(lambda p: TopPSampling(p=p, temperature=2 * p), 0.5)
    assert isinstance(out, TopPSampling) and out.p.shape == ()


def test_methods_with_the_same_fields_have_different_treedefs():
    # jax 0.10.2's register_dataclass treedefs compare equal across classes with the same field
    # names: a jit cache could then run one method's executable for the other.
    structures = [jax.tree.structure(m) for m in ALL_METHODS]
    for i, a in enumerate(structures):
        for j, b in enumerate(structures):
            assert (a == b) == (i == j), (ALL_METHODS[i], ALL_METHODS[j])
    for method in ALL_METHODS:  # and each round-trips
        leaves, treedef = jax.tree.flatten(method)
        assert jax.tree.unflatten(treedef, leaves) == method


def test_changing_values_does_not_recompile():
    variants = [
        [RandomSampling(temperature=t) for t in (1, 0.3, 2.5)],
        [TopkSampling(k=k, temperature=t) for k, t in ((1, 1.0), (64, 0.5), (MAX_TOP_K, 2))],
        [TopPSampling(p=p, temperature=t) for p, t in ((1, 1), (0.5, 0.7), (0.999, 3.0))],
        [MinPSampling(p=p) for p in (0, 0.1, 0.5)],
        [TopkTopPSampling(k=k, p=p) for k, p in ((40, 0.9), (3, 1), (1000, 0.2))],
    ]
    for logits in (np.zeros(SMALL, np.float32), _noise(9)):
        for method in [m for methods in variants for m in methods]:
            _sample(method, logits, jax.random.key(0)).block_until_ready()
    # Across this whole module (other tests too), each class compiled once per shape.
    counts = collections.Counter(_TRACES)
    for shape in (SMALL, BIG):
        assert all(counts[(type(ms[0]).__name__, shape)] == 1 for ms in variants)
    assert set(counts.values()) == {1}


# --- Validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: RandomSampling(temperature=0), r"RandomSampling\.temperature .*\(0, inf\)"),
        (lambda: RandomSampling(temperature=-1.0), "temperature"),
        (lambda: RandomSampling(temperature=float("nan")), "temperature"),
        (lambda: RandomSampling(temperature=float("inf")), "temperature"),
        (lambda: TopPSampling(p=0.0), r"TopPSampling\.p .*\(0, 1\]"),
        (lambda: TopPSampling(p=1.01), r"TopPSampling\.p"),
        (lambda: TopPSampling(p=float("nan")), r"TopPSampling\.p"),
        (lambda: TopPSampling(p=0.5, temperature=0.0), "temperature"),
        (lambda: MinPSampling(p=1.0), r"MinPSampling\.p .*\[0, 1\)"),
        (lambda: MinPSampling(p=-0.1), r"MinPSampling\.p"),
        (lambda: TopkSampling(k=0), r"TopkSampling\.k must be an integer in \[1, 1024\]"),
        (lambda: TopkSampling(k=2.5), r"TopkSampling\.k"),
        (lambda: TopkSampling(k=MAX_TOP_K + 1), r"TopkSampling\.k"),
        (lambda: TopkSampling(k=5, temperature=-2), "temperature"),
        (lambda: TopkTopPSampling(k=0, p=0.9), r"TopkTopPSampling\.k"),
        (lambda: TopkTopPSampling(k=5, p=2.0), r"TopkTopPSampling\.p"),
        (lambda: TopPSampling(p=np.array([0.5, 0.9])), "scalar"),
    ],
)
def test_invalid_values_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_valid_values_are_normalised():
    assert TopkSampling(k=np.int64(3)).k == 3 and type(TopkSampling(k=3.0).k) is int
    assert type(TopPSampling(p=1).p) is float
    assert TopPSampling(p=np.float32(0.5)) == TopPSampling(p=0.5)
    assert type(RandomSampling(temperature=jnp.float32(0.5)).temperature) is float


# --- make_sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(greedy=True, temperature=0.7, top_k=40), Greedy()),
        (dict(temperature=0), Greedy()),
        (dict(temperature=0.0, top_p=0.9), Greedy()),
        (dict(temperature=0.7), RandomSampling(temperature=0.7)),
        (dict(temperature=None), RandomSampling(temperature=1.0)),
        (dict(top_k=0, top_p=1.0, min_p=0), RandomSampling()),
        (dict(top_k=None, top_p=None, min_p=None), RandomSampling()),
        (dict(temperature=0.5, top_k=40), TopkSampling(k=40, temperature=0.5)),
        (dict(top_k=40.0), TopkSampling(k=40)),
        (dict(top_p=0.95), TopPSampling(p=0.95)),
        (dict(top_k=64, top_p=0.95), TopkTopPSampling(k=64, p=0.95)),
        (dict(temperature=1.5, min_p=0.1, top_p=1.0), MinPSampling(p=0.1, temperature=1.5)),
    ],
)
def test_make_sampling(kwargs, expected):
    method = make_sampling(**{"greedy": False, **kwargs})
    assert method == expected and type(method) is type(expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_p=0.1, top_k=40), "min_p"),
        (dict(min_p=0.1, top_p=0.9), "min_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=5000), "k"),
        (dict(top_p=1.5), "p"),
    ],
)
def test_make_sampling_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampling(greedy=False, **kwargs)
