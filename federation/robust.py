"""Robust aggregation for plaintext FedAvg, and the client-side clipping that also works under HE.

Rules (`FederatedJob.aggregation.rule`), applied array by array to the clients' full weight vectors:

- `mean`: FedAvg's weighted mean (`federation.aggregation.weighted_average`).
- `trimmed_mean`: coordinate-wise trimmed mean (Yin et al., ICML 2018, "Byzantine-Robust Distributed
  Learning"): per coordinate, drop the `floor(trim_fraction * n)` smallest and largest client values
  and average the rest (unweighted, as `scipy.stats.trim_mean`).
- `median`: coordinate-wise median (Yin et al. 2018), unweighted.
- `norm_bounded`: clip each client's update (its weights minus the current global model) to L2 norm
  `norm_bound` over all arrays together, then take the weighted mean of the clipped updates (the
  norm-bounding defense against model replacement of Sun et al. 2019, "Can You Really Backdoor
  Federated Learning?", without their added noise: not DP).

The server must see each client's plaintext vector for all of these, so they are refused under
`ckks` and `secagg+`. `client_clip_norm` is the part that survives encryption: each honest client clips
its own update to that norm before it encrypts. It bounds what an honest client contributes; a
malicious client simply skips it, so under HE it limits accidents, not attacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from federation.aggregation import weighted_average
from secure_kd.config import Strict

Rule = Literal["mean", "trimmed_mean", "median", "norm_bounded"]


class AggregationConfig(Strict):
    """How the fedavg server combines the clients' weights (robust rules: plaintext only)."""

    rule: Rule = "mean"
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share of clients cut at each end, per coordinate"
    )
    norm_bound: float | None = Field(
        None, gt=0, description="norm_bounded: largest L2 norm of one client's update (weights - global)"
    )
    client_clip_norm: float | None = Field(
        None, gt=0, description="each client clips its own update to this L2 norm before sending (HE too)"
    )

    @model_validator(mode="after")
    def _bound_given(self) -> AggregationConfig:
        if self.rule == "norm_bounded" and self.norm_bound is None:
            raise ValueError("aggregation.rule=norm_bounded needs aggregation.norm_bound (e.g. 1.0)")
        return self


def update_norm(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of weights - reference over every array together."""
    return math.sqrt(
        sum(
            float(np.sum((weights[n].astype(np.float64) - reference[n].astype(np.float64)) ** 2))
            for n in weights
        )
    )


def clip_update(
    weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], bound: float
) -> dict[str, np.ndarray]:
    """reference + (weights - reference) * min(1, bound / ||weights - reference||), per array dtype kept."""
    norm = update_norm(weights, reference)
    scale = 1.0 if norm <= bound else bound / norm
    return {
        n: (reference[n].astype(np.float64) + scale * (w.astype(np.float64) - reference[n])).astype(w.dtype)
        for n, w in weights.items()
    }


def trimmed_mean(stacked: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean over axis 0 after cutting floor(trim_fraction * n) values at each end."""
    n = stacked.shape[0]
    cut = int(math.floor(trim_fraction * n))
    if 2 * cut >= n:
        raise ValueError(f"trim_fraction={trim_fraction} leaves no client of {n}; lower it")
    ordered = np.sort(stacked, axis=0)
    return ordered[cut : n - cut].mean(axis=0)


def robust_aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    global_model: Mapping[str, np.ndarray] | None,
    config: AggregationConfig,
) -> dict[str, np.ndarray]:
    """The new global model from the clients' weights under `config.rule`."""
    if config.rule == "mean":
        return weighted_average(updates, weights)
    if config.rule == "norm_bounded":
        if global_model is None:
            raise ValueError("norm_bounded needs the current global model")
        bound = float(config.norm_bound)  # type: ignore[arg-type]
        return weighted_average([clip_update(u, global_model, bound) for u in updates], weights)
    if not updates:
        raise ValueError("no updates to aggregate")
    out = {}
    for name in updates[0]:
        stacked = np.stack([u[name].astype(np.float64) for u in updates])
        value = (
            np.median(stacked, axis=0)
            if config.rule == "median"
            else trimmed_mean(stacked, config.trim_fraction)
        )
        out[name] = value.astype(updates[0][name].dtype)
    return out
