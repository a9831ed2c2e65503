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
from collections.abc import Sequence

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


GUESS_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
"""Shares of the canaries guessed on (half "in" at the top of the scores, half "out" at the bottom). The
paper abstains on most canaries and reports several guess counts; here the best of these four is
reported, its confidence corrected for the choice (Bonferroni: each is tested at 1 - (1 - c) / 4)."""


def guess_counts(scores: Sequence[float], inserted: Sequence[bool], k: int) -> tuple[int, int]:
    """(n_guesses, n_correct) when the `k` highest scores are guessed inserted and the `k` lowest not.
    Ties are broken by position, never by the insertion bit."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    truth = np.asarray(inserted, dtype=bool)[order]
    if not 0 < 2 * k <= len(truth):
        raise ValueError(f"need 0 < 2k <= {len(truth)} canaries, got k={k}")
    return 2 * k, int(truth[:k].sum() + (~truth[len(truth) - k :]).sum())


def audit_from_scores(
    scores: Sequence[float],
    inserted: Sequence[bool],
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> dict:
    """The one-run bound from per-canary scores (higher = more likely inserted): one guess count per
    fraction, each bound at the Bonferroni-corrected confidence, and the largest of them, which holds at
    `confidence` whichever count gave it."""
    m = len(scores)
    if m != len(inserted) or m < 2:
        raise ValueError(f"need one insertion bit per score and >= 2 canaries, got {m} and {len(inserted)}")
    ks = sorted({max(1, int(f * m) // 2) for f in fractions})
    per_test = 1.0 - (1.0 - confidence) / len(ks)
    tried = []
    for k in ks:
        r, v = guess_counts(scores, inserted, k)
        bound = one_run_epsilon_lower_bound(m, r, v, delta=delta, confidence=per_test)
        tried.append({"n_guesses": r, "n_correct": v, "epsilon_lower_bound": bound})
    best = max(tried, key=lambda t: t["epsilon_lower_bound"])
    return {
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "n_canaries": m,
        "n_inserted": int(np.sum(inserted)),
        "n_guesses": best["n_guesses"],
        "n_correct": best["n_correct"],
        "delta": delta,
        "confidence": confidence,
        "per_test_confidence": per_test,
        "tried": tried,
        "method": f"best of {len(ks)} guess counts, Bonferroni-corrected (each at {per_test:.4g})",
    }
