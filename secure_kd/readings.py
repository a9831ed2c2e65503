"""A plugin's reading of one audit metric: a value with an interval, and the interval helpers plugins use.

An attack's registration (`secure_kd.plugins.Plugin.measure`) turns its own Result (a plain JSON dict)
into `Reading`s, one per metric it declares; the audit combines them over seeds and grades them against
the thresholds (`secure_kd.app.report.verdict`). Helpers:

- `proportion(value, n, confidence)`: a rate over n trials with a Wilson score interval (it treats the
  trials as independent: an approximation for token positions);
- `bootstrap_reading(rows, stat, value, ...)`: a percentile bootstrap of `stat` over the rows;
- `scores_from_roc(fpr, tpr, n_members, n_nonmembers)` and `roc_stat(key)`: (score, is_member) rows
  with exactly the ranking behind a stored empirical ROC curve, so a membership result's AUC and TPR at
  1% FPR can be bootstrapped from results.json alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
from pydantic import BaseModel

from secure_kd.metrics import bootstrap_ci, roc_metrics
from secure_kd.proportions import wilson_interval


class Reading(BaseModel):
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str = "none"
    note: str | None = None


def proportion(value: float, n: int, confidence: float) -> Reading:
    """A rate `value` over `n` trials with its Wilson interval (no interval when n is 0)."""
    if n <= 0:
        return Reading(value=value)
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    low, high = wilson_interval(min(n, max(0, round(value * n))), n, z)
    return Reading(value=value, ci_low=low, ci_high=high, ci_method=f"Wilson, n={n}")


def bootstrap_reading(
    rows: np.ndarray,
    stat: Callable[[np.ndarray], float],
    value: float,
    samples: int,
    confidence: float,
    what: str,
) -> Reading:
    """`value` with the percentile-bootstrap interval of `stat` over `rows` (a NaN resample: `value`)."""

    def finite(data: np.ndarray) -> float:
        result = stat(data)
        return value if math.isnan(result) else result

    low, high = bootstrap_ci(rows, finite, n=samples, alpha=1 - confidence, seed=0)
    return Reading(value=value, ci_low=low, ci_high=high, ci_method=f"bootstrap over {what}")


def scores_from_roc(fpr: list[float], tpr: list[float], n_members: int, n_nonmembers: int) -> np.ndarray:
    """(score, is_member) rows with exactly the ranking behind an empirical ROC curve.

    Every step of the curve is one group of tied scores; its members and non-members get the same
    score, earlier steps higher ones. Any statistic of the ranking (AUC, TPR at FPR) is unchanged.
    """
    tp = np.rint(np.asarray(tpr) * n_members).astype(int)
    fp = np.rint(np.asarray(fpr) * n_nonmembers).astype(int)
    rows: list[tuple[float, int]] = []
    for step in range(1, len(tp)):
        score = float(len(tp) - step)
        rows += [(score, 1)] * int(tp[step] - tp[step - 1]) + [(score, 0)] * int(fp[step] - fp[step - 1])
    return np.asarray(rows, dtype=float)


def roc_stat(key: str) -> Callable[[np.ndarray], float]:
    """`auc` or `tpr` (at 1% FPR) of (score, is_member) rows; NaN for a resample with one class only."""

    def stat(rows: np.ndarray) -> float:
        labels = rows[:, 1]
        if labels.min() == labels.max():
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = roc_metrics(rows[:, 0], labels.astype(int), fpr_levels=(0.01,))
        return metrics["auc"] if key == "auc" else metrics["tpr_at_fpr"][0.01]

    return stat
