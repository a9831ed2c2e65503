"""The server's arithmetic: weighted averages, soft-label ensembles, encrypted sums, PATE's noisy votes.

- `weighted_average`: FedAvg, sum_i n_i w_i / sum_i n_i, computed in float64.
- `mean_soft_labels`: the FedMD / FedDF ensemble teacher, the plain mean of the clients' arrays;
  `weighted_ensemble`: the same with per-position weights (client-side filtering, EdgeFD style).
- `aggregate_encrypted`: `federation.he.aggregate` over the valid payloads; a payload the public
  context cannot add is dropped with its reason and the sum is retried without it.
- PATE with GNMax (Papernot et al., ICLR 2018, "Scalable Private Learning with PATE"): every
  teacher votes for one class per query, the server releases argmax(counts + N(0, sigma^2)).
  Changing one teacher's data moves its vote: two counts change by one, an L2 sensitivity of
  sqrt(2), so one query is (lambda, lambda / sigma^2)-RDP for every order lambda > 1 (the
  Gaussian mechanism, Mironov 2017, Prop. 7), and Q queries compose to (lambda, Q lambda / sigma^2).
  `gnmax_epsilon` converts with eps = min_lambda [rdp(lambda) + log(1/delta) / (lambda - 1)]. This is
  the data-independent bound; PATE's data-dependent analysis (smooth sensitivity) is tighter but
  releasing it needs more care, and it is not used here.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from federation.crypto.he import InvalidCiphertextError, PublicContext, aggregate

# RDP orders for the conversion: dense near 1 (large budgets) and out to 10^4 (tiny ones).
RDP_ORDERS = np.unique(np.concatenate([1.0 + np.logspace(-3, 4, 4000), np.arange(2, 257, dtype=float)]))


def weighted_average(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """sum_i weights[i] * updates[i] / sum(weights), per array, cast back to each array's dtype."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    if any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(
            f"weights must be positive finite numbers (numbers of examples), got {list(weights)}"
        )
    names = list(updates[0])
    if any(list(u) != names for u in updates):
        raise ValueError("every update must hold the same arrays in the same order")
    total = float(sum(weights))
    out = {}
    for name in names:
        acc = np.zeros(updates[0][name].shape, dtype=np.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc += float(weight) * update[name].astype(np.float64)
        out[name] = (acc / total).astype(updates[0][name].dtype)
    return out


def mean_soft_labels(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble teacher: the element-wise mean of the clients' [positions, k + 1] arrays."""
    if not arrays:
        raise ValueError("no soft labels to average")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"soft labels of different shapes cannot be averaged: {sorted(shapes)}")
    return np.mean(np.stack([a.astype(np.float64) for a in arrays]), axis=0)


def weighted_ensemble(soft_labels: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    """sum_i w_i[p] * s_i[p] / sum_i w_i[p] per position p; the plain mean where every weight is 0."""
    labels = np.stack([np.asarray(s, dtype=np.float64) for s in soft_labels])  # [clients, P, W]
    w = np.stack([np.asarray(x, dtype=np.float64) for x in weights])  # [clients, P]
    total = w.sum(axis=0)
    weighted = np.einsum("cp,cpw->pw", w, labels)
    plain = labels.mean(axis=0)
    covered = total > 0
    return np.where(covered[:, None], weighted / np.where(covered, total, 1.0)[:, None], plain)


def aggregate_encrypted(
    public: PublicContext, payloads: Mapping[Hashable, bytes]
) -> tuple[bytes | None, dict[Hashable, str]]:
    """The encrypted sum of every payload the public context can add, and the rejected ones with reasons."""
    pending = dict(payloads)
    rejected: dict[Hashable, str] = {}
    while pending:
        keys = list(pending)
        try:
            return aggregate(public, [pending[k] for k in keys]), rejected
        except InvalidCiphertextError as exc:
            bad = keys[exc.client_index]
            rejected[bad] = f"ciphertext rejected by the aggregator: {exc.reason}"
            del pending[bad]
    return None, rejected


def vote_counts(votes: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """[queries, n_classes] histogram: counts[q, c] = number of teachers whose vote for query q is c."""
    if not votes:
        raise ValueError("no votes to count")
    stacked = np.stack([np.asarray(v, dtype=np.int64) for v in votes])  # [teachers, queries]
    if stacked.min() < 0 or stacked.max() >= n_classes:
        raise ValueError(f"votes must be class ids in [0, {n_classes})")
    counts = np.zeros((stacked.shape[1], n_classes), dtype=np.int64)
    rows = np.broadcast_to(np.arange(stacked.shape[1]), stacked.shape)
    np.add.at(counts, (rows.ravel(), stacked.ravel()), 1)
    return counts


def gnmax(counts: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Released labels: argmax over classes of counts + N(0, sigma^2) noise, one per query."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    noisy = counts.astype(np.float64) + rng.normal(0.0, sigma, size=counts.shape)
    return noisy.argmax(axis=1).astype(np.int64)


def gnmax_rdp(queries: int, sigma: float, orders: np.ndarray = RDP_ORDERS) -> np.ndarray:
    """RDP of `queries` GNMax answers at each order: queries * order / sigma^2."""
    if queries < 0 or not sigma > 0:
        raise ValueError(f"queries must be >= 0 and sigma > 0, got {queries}, {sigma}")
    return queries * np.asarray(orders, dtype=np.float64) / sigma**2


def gnmax_epsilon(
    queries: int, sigma: float, delta: float, orders: np.ndarray = RDP_ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) of `queries` GNMax answers at `delta` (data-independent bound)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if queries == 0:
        return 0.0, float("nan")
    orders = np.asarray(orders, dtype=np.float64)
    eps = gnmax_rdp(queries, sigma, orders) + math.log(1 / delta) / (orders - 1)
    best = int(np.argmin(eps))
    return float(eps[best]), float(orders[best])
