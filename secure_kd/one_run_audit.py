"""An epsilon lower bound from one training run (Steinke, Nasr & Jagielski 2023, arXiv:2305.08846).

`m` canaries are each inserted into the training data independently with probability 1/2. After
training, an auditor guesses "in" or "out" for `r` of them (abstaining on the rest) and `v` guesses are
right. Under (epsilon, delta)-DP the number of right guesses is dominated by Binomial(r, q) with
q = e^eps / (1 + e^eps), up to a delta term (the paper's Theorem 5.2):

    P[V >= v] <= P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i

The lower bound at confidence c is the largest epsilon whose p-value is still below 1 - c: any
smaller epsilon is rejected by the observation with at least that confidence. It is a lower bound
on the epsilon of the mechanism that produced this run (it never proves privacy, only its absence).
"""

from __future__ import annotations

import math

import numpy as np

BISECTION_STEPS = 60


def _check_counts(n_canaries: int, n_guesses: int, n_correct: int, delta: float, confidence: float) -> None:
    for name, value in (("n_canaries", n_canaries), ("n_guesses", n_guesses), ("n_correct", n_correct)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= n_correct <= n_guesses <= n_canaries:
        raise ValueError(
            "need 0 <= n_correct <= n_guesses <= n_canaries, got "
            f"n_correct={n_correct}, n_guesses={n_guesses}, n_canaries={n_canaries}"
        )
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def one_run_p_value(
    n_canaries: int, n_guesses: int, n_correct: int, epsilon: float, delta: float = 0.0
) -> float:
    """P[at least `n_correct` right guesses] under (epsilon, delta)-DP: the paper's bound, capped at 1."""
    _check_counts(n_canaries, n_guesses, n_correct, delta, 0.5)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    # Imported here, not at the top: the ClientApp's start-up imports secure_kd.metrics.
    from scipy import stats

    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(n_correct - 1, n_guesses, q))  # P[Bin(r, q) >= v]
    worst = 0.0
    if delta > 0 and n_correct > 0:
        # below[i - 1] = P[v - i <= Bin(r, q) < v] for i = 1..v
        below = np.cumsum(stats.binom.pmf(np.arange(n_correct - 1, -1, -1), n_guesses, q))
        worst = float(np.max(below / np.arange(1, n_correct + 1)))
    return min(1.0, tail + 2.0 * n_canaries * delta * worst)


def one_run_epsilon_lower_bound(
    n_canaries: int,
    n_guesses: int,
    n_correct: int,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> float:
    """The largest epsilon that `n_correct` right guesses out of `n_guesses` (on `n_canaries` canaries,
    each inserted with probability 1/2) rejects at `confidence`; 0.0 when the observation rejects none."""
    _check_counts(n_canaries, n_guesses, n_correct, delta, confidence)
    threshold = 1.0 - confidence
    if n_correct == 0 or one_run_p_value(n_canaries, n_guesses, n_correct, 0.0, delta) >= threshold:
        return 0.0
    low, high = 0.0, 1.0  # p_value(low) < threshold <= p_value(high)
    while one_run_p_value(n_canaries, n_guesses, n_correct, high, delta) < threshold:
        low, high = high, 2.0 * high
        if high > 1e4:  # the p-value tends to 1 as epsilon grows; this only guards the loop
            return low
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if one_run_p_value(n_canaries, n_guesses, n_correct, middle, delta) < threshold:
            low = middle
        else:
            high = middle
    return low
