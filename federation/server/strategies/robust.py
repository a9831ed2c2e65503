"""Robust aggregation for plaintext FedAvg: the rules of `FederatedJob.aggregation` (`AggregationConfig`).

Rules (`aggregation.rule`), applied array by array to the clients' full weight vectors:

- `mean`: FedAvg's weighted mean (`federation.server.aggregation.weighted_average`).
- `trimmed_mean`: coordinate-wise trimmed mean (Yin et al., ICML 2018, "Byzantine-Robust Distributed
  Learning"): per coordinate, drop the `floor(trim_fraction * n)` smallest and largest client values
  and average the rest (unweighted, as `scipy.stats.trim_mean`).
- `median`: coordinate-wise median (Yin et al. 2018), unweighted.
The median and trimmed mean are the engine's (`secure_kd.robust_rules`, which multi-teacher distillation
uses too), applied in float64 to each array stacked over the clients.
- `norm_bounded`: clip each client's update (its weights minus the current global model) to L2 norm
  `norm_bound` over all arrays together, then take the weighted mean of the clipped updates (the
  norm-bounding defense against model replacement of Sun et al. 2019, "Can You Really Backdoor
  Federated Learning?", without their added noise: not DP).

The server must see each client's plaintext vector for all of these, so they are refused under
`ckks` and `secagg+`. `client_clip_norm` is the part that survives encryption: each honest client clips
(`federation.clipping`) its own update to that norm before it encrypts. It bounds what an honest client
contributes; a malicious client simply skips it, so under HE it limits accidents, not attacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from federation.clipping import clip_update
from federation.config import AggregationConfig
from federation.server.aggregation import weighted_average
from secure_kd.robust_rules import combine


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
        stacked = torch.from_numpy(np.stack([u[name].astype(np.float64) for u in updates]))
        value = combine(stacked, config.rule, trim_fraction=config.trim_fraction).numpy()
        out[name] = value.astype(updates[0][name].dtype)
    return out
