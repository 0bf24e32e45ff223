"""Sampling (``k25jax.generate``): temperature, top-k with top-p, and the model card's defaults."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from k25jax.generation import generate, stream
from k25jax.sampling import INSTANT, THINKING, Sampling, sample, sampling_defaults, sampling_probs
from k25jax.session import Session

P = np.array([0.5, 0.3, 0.15, 0.05])
DRAWS = 20000  # binomial sd of a frequency <= 0.0036: the 0.015 tolerance is over 4 sd
FREQ_TOL = 0.015


def _tempered(p, temperature):
    """softmax(log p / T) = p**(1/T), renormalised."""
    q = p ** (1.0 / temperature)
    return q / q.sum()


def _logits(p, rows=1):
    return jnp.log(jnp.asarray(np.tile(p, (rows, 1)), jnp.float32))


def _kept(probs):
    return set(np.flatnonzero(np.asarray(probs)[0]).tolist())


def test_temperature_scales_the_distribution_exactly():
    for temperature in (0.6, 1.0, 2.0):
        probs = np.asarray(sampling_probs(_logits(P), temperature, 1.0, 0))[0]
        np.testing.assert_allclose(probs, _tempered(P, temperature), rtol=1e-5, atol=1e-7)
    # 0.6 sharpens: p = [0.5, 0.3, 0.15, 0.05] ** (5/3), renormalised = [0.6318, 0.2697, 0.0849, 0.0136].
    np.testing.assert_allclose(
        np.asarray(sampling_probs(_logits(P), 0.6, 1.0, 0))[0], [0.6318, 0.2697, 0.0849, 0.0136], atol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(sampling_probs(_logits(P), 0.0, 1.0, 0))[0], [1, 0, 0, 0])  # greedy


def test_draws_follow_the_tempered_distribution():
    """Seeded draws through ``sample`` itself: at 0.6 the top token comes up 63.2% of the time, at 1.0 50%."""
    for seed, temperature in ((1, 0.6), (2, 1.0)):
        draws = np.asarray(sample(_logits(P, DRAWS), jax.random.key(seed), temperature, 1.0, 0))
        freq = np.bincount(draws, minlength=4) / DRAWS
        assert np.abs(freq - _tempered(P, temperature)).max() < FREQ_TOL, (temperature, freq)
    assert abs(_tempered(P, 0.6)[0] - _tempered(P, 1.0)[0]) > 8 * FREQ_TOL  # the two are far apart


def test_top_k_then_top_p_keeps_the_exact_set():
    # Ids 0..5 in shuffled order of probability: by rank 3 (0.4), 1 (0.25), 5 (0.15), 4 (0.1), 0 (0.06), 2 (0.04).
    p = np.array([0.06, 0.25, 0.04, 0.4, 0.1, 0.15])
    logits = _logits(p)
    # top_k 4 keeps {3, 1, 5, 4} (mass 0.9), renormalised 0.444, 0.278, 0.167, 0.111; top_p 0.7 then keeps the
    # tokens with mass before them < 0.7: 3 (0) and 1 (0.444), not 5 (0.722).
    combined = np.asarray(sampling_probs(logits, 1.0, 0.7, 4))[0]
    np.testing.assert_allclose(combined, [0, 0.25 / 0.65, 0, 0.4 / 0.65, 0, 0], atol=1e-6)
    # Each filter alone, or top-p on the unfiltered distribution first, keeps more.
    assert _kept(sampling_probs(logits, 1.0, 0.7, 0)) == {3, 1, 5}  # 0.4 + 0.25 = 0.65 < 0.7
    assert _kept(sampling_probs(logits, 1.0, 1.0, 4)) == {3, 1, 5, 4}
    assert _kept(sampling_probs(logits, 1.0, 1e-6, 4)) == {3}  # always at least the top token
    draws = np.asarray(sample(_logits(p, DRAWS), jax.random.key(3), 1.0, 0.7, 4))
    freq = np.bincount(draws, minlength=6) / DRAWS
    assert set(np.flatnonzero(freq).tolist()) == {1, 3}
    assert np.abs(freq - combined).max() < FREQ_TOL, freq


def test_top_p_applies_to_the_tempered_distribution():
    # At 1.0 the nucleus 0.85 holds ranks 0..2 (mass before rank 2: 0.8); at 0.6, 0.6318 + 0.2697 = 0.9015 is
    # before rank 2, so only ranks 0 and 1 stay.
    assert _kept(sampling_probs(_logits(P), 1.0, 0.85, 0)) == {0, 1, 2}
    probs = np.asarray(sampling_probs(_logits(P), 0.6, 0.85, 0))[0]
    tempered = _tempered(P, 0.6)
    np.testing.assert_allclose(probs, [*(tempered[:2] / tempered[:2].sum()), 0, 0], rtol=1e-5, atol=1e-7)


def test_sampling_defaults_are_the_model_cards():
    """Model card: thinking mode temperature 1.0, instant mode 0.6, top_p 0.95 in both."""
    assert sampling_defaults() == sampling_defaults(thinking=True) == THINKING
    assert THINKING == Sampling(temperature=1.0, top_p=0.95, top_k=0)
    assert sampling_defaults(thinking=False) == INSTANT == Sampling(temperature=0.6, top_p=0.95, top_k=0)
    for fn in (generate, stream, Session.stream):  # the entry points default to thinking mode
        params = inspect.signature(fn).parameters
        defaults = (params["temperature"].default, params["top_p"].default, params["top_k"].default)
        assert defaults == (1.0, 0.95, 0), fn.__qualname__
