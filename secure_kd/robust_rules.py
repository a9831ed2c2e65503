"""Robust aggregation rules over stacked rows: mean, weighted mean, coordinate-wise median, trimmed mean.

One row per source along dim 0 (a teacher's next-token distributions in `secure_kd.multi_teacher`, an
organization's weights in the federation's fedavg rules, `federation.server.strategies.robust`); every
rule works coordinate by coordinate, so `stacked` may have any shape `[n, ...]`.

- `mean`: the plain mean of the n rows.
- `weighted_mean`: sum_i w_i x_i / sum_i w_i, weights positive and finite.
- `median`: the coordinate-wise median (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning");
  for an even n the mean of the two middle values, as `numpy.median`.
- `trimmed_mean`: per coordinate, drop the `floor(trim_fraction * n)` smallest and largest values and
  average the rest (Yin et al. 2018; unweighted, as `scipy.stats.trim_mean`). A fraction that would
  drop every row is refused.

With fewer than half the rows poisoned (median), or at most `floor(trim_fraction * n)` of them
(trimmed mean), each coordinate of the result lies between the smallest and the largest honest value:
a poisoned row cannot move it outside the honest range, whatever it holds. That is all these rules
promise; the mean gives no such bound (one row moves it arbitrarily far).

`combine_distributions` applies a rule to stacked probability distributions (last dim the vocabulary)
and renormalizes: a coordinate-wise median or trimmed mean of distributions need not sum to 1. Where
a position's result sums to 0 (every robust value 0, possible only with sparse inputs), it falls back
to the plain mean there.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

RuleName = Literal["mean", "weighted_mean", "median", "trimmed_mean"]
RULES: tuple[str, ...] = get_args(RuleName)


def trim_count(n: int, trim_fraction: float) -> int:
    """How many rows `trimmed_mean` cuts at each end: floor(trim_fraction * n); refused if none remain."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    cut = int(math.floor(trim_fraction * n))
    if 2 * cut >= n:
        raise ValueError(f"trim_fraction={trim_fraction} leaves none of {n} rows; lower it")
    return cut


def trimmed_mean(stacked: Tensor, trim_fraction: float) -> Tensor:
    """Coordinate-wise mean over dim 0 after cutting floor(trim_fraction * n) values at each end."""
    n = stacked.shape[0]
    cut = trim_count(n, trim_fraction)
    ordered = torch.sort(stacked, dim=0).values
    return ordered[cut : n - cut].mean(dim=0)


def median(stacked: Tensor) -> Tensor:
    """Coordinate-wise median over dim 0; the mean of the two middle values when n is even."""
    n = stacked.shape[0]
    ordered = torch.sort(stacked, dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def weighted_mean(stacked: Tensor, weights: Tensor | list[float]) -> Tensor:
    """sum_i w_i * stacked[i] / sum_i w_i over dim 0."""
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if w.shape != (stacked.shape[0],):
        n = stacked.shape[0]
        raise ValueError(f"need one weight per row: {n} rows, weights of shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError(f"weights must be positive finite numbers, got {w.tolist()}")
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return (stacked * w.view(shape)).sum(dim=0) / w.sum()


def combine(
    stacked: Tensor,
    rule: RuleName,
    *,
    weights: Tensor | list[float] | None = None,
    trim_fraction: float = 0.2,
) -> Tensor:
    """`rule` over dim 0 of `stacked` ([n, ...] -> [...]); see the module for each rule."""
    if stacked.dim() == 0 or stacked.shape[0] == 0:
        raise ValueError("nothing to combine: stacked needs at least one row along dim 0")
    if rule == "mean":
        return stacked.mean(dim=0)
    if rule == "weighted_mean":
        if weights is None:
            raise ValueError("rule weighted_mean needs weights (one per row)")
        return weighted_mean(stacked, weights)
    if rule == "median":
        return median(stacked)
    if rule == "trimmed_mean":
        return trimmed_mean(stacked, trim_fraction)
    raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")


def combine_distributions(
    probs: Tensor,
    rule: RuleName,
    *,
    weights: Tensor | list[float] | None = None,
    trim_fraction: float = 0.2,
) -> Tensor:
    """The rule over dim 0 of stacked distributions [n, ..., vocab], renormalized over the last dim."""
    combined = combine(probs, rule, weights=weights, trim_fraction=trim_fraction)
    if rule in ("mean", "weighted_mean"):
        return combined  # a convex combination of distributions is one already
    total = combined.sum(dim=-1, keepdim=True)
    empty = total <= 0
    if bool(empty.any()):
        combined = torch.where(empty, probs.mean(dim=0), combined)
        total = torch.where(empty, combined.sum(dim=-1, keepdim=True), total)
    return combined / total
