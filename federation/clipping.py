"""An update's L2 norm and its clipping: what an honest client applies to its own update before sending
(`aggregation.client_clip_norm`, under HE too) and what the server's `norm_bounded` rule applies to
every client's (`federation.server.strategies.robust`).

The update is `weights - reference` (the global model the round started from), over every array
together; clipping scales it to at most `bound` and keeps each array's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


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
