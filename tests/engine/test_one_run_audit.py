"""The one-run epsilon lower bound (Steinke, Nasr & Jagielski 2023) against hand-computed values, a direct
Binomial computation, and randomized response at a known epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from secure_kd.metrics import one_run_epsilon_lower_bound
from secure_kd.one_run_audit import one_run_p_value


def test_all_guesses_right_matches_the_hand_computed_bound():
    # delta = 0, 10 of 10 right: P[Bin(10, q) >= 10] = q^10 = 0.05 -> q = 0.05^0.1, eps = logit(q)
    q = 0.05**0.1
    assert one_run_epsilon_lower_bound(10, 10, 10) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)
    assert math.log(q / (1 - q)) == pytest.approx(1.0519, abs=1e-4)


@pytest.mark.parametrize("m,r,v", [(1000, 100, 80), (1000, 400, 260), (200, 50, 40), (5000, 1000, 560)])
def test_delta_zero_equals_the_binomial_tail_root(m, r, v):
    bound = one_run_epsilon_lower_bound(m, r, v, confidence=0.95)

    def tail_minus_alpha(eps: float) -> float:
        return stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-eps))) - 0.05

    assert bound == pytest.approx(optimize.brentq(tail_minus_alpha, 1e-9, 50.0), abs=1e-7)


def test_delta_term_matches_a_direct_computation():
    m, r, v, eps, delta = 1000, 200, 150, 0.8, 1e-5
    q = 1 / (1 + math.exp(-eps))
    pmf = stats.binom.pmf(np.arange(r + 1), r, q)
    worst = max(pmf[v - i : v].sum() / i for i in range(1, v + 1))
    expected = pmf[v:].sum() + 2 * m * delta * worst
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)


def test_bound_is_monotone_in_delta_correct_guesses_and_confidence():
    base = one_run_epsilon_lower_bound(1000, 200, 150)
    assert one_run_epsilon_lower_bound(1000, 200, 150, delta=1e-5) < base
    assert one_run_epsilon_lower_bound(1000, 200, 160) > base
    assert one_run_epsilon_lower_bound(1000, 200, 150, confidence=0.99) < base


def test_chance_level_guesses_give_zero():
    assert one_run_epsilon_lower_bound(1000, 200, 100) == 0.0
    assert one_run_epsilon_lower_bound(1000, 200, 0) == 0.0
    assert one_run_epsilon_lower_bound(10, 0, 0) == 0.0


def test_randomized_response_at_a_known_epsilon_is_not_overclaimed():
    """An eps-DP guesser (randomized response on the inclusion bit): the 95% bound exceeds eps in at most
    about 5% of runs, and it is not vacuous."""
    eps, m, runs = 1.0, 2000, 200
    rng = np.random.default_rng(0)
    q = 1 / (1 + math.exp(-eps))
    bounds = [one_run_epsilon_lower_bound(m, m, int(rng.binomial(m, q))) for _ in range(runs)]
    assert np.mean(np.array(bounds) > eps) <= 0.10
    assert np.median(bounds) > 0.7


@pytest.mark.parametrize(
    "args,message",
    [
        ((10, 11, 1), "n_guesses <= n_canaries"),
        ((10, 5, 6), "n_correct <= n_guesses"),
        ((10, 5, 2.5), "integer"),
    ],
)
def test_bad_counts_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        one_run_epsilon_lower_bound(*args)
    with pytest.raises(ValueError, match="delta"):
        one_run_epsilon_lower_bound(10, 5, 2, delta=2.0)
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon_lower_bound(10, 5, 2, confidence=1.0)
