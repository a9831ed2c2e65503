"""Client-side filtering of the public transfer set for non-IID federated distillation (EdgeFD style).

A client only knows its own data; under strong non-IID splits its soft labels on transfer samples far
from that data are guesses that dilute the ensemble. EdgeFD's remedy: each client decides locally which
transfer samples are "in distribution" for it, with a KMeans-based density estimate, and contributes
soft labels for those only.

The rule implemented here, exactly:

1. `fit(own_features)`: scikit-learn `KMeans(n_clusters, random_state=seed, n_init=n_init)` on the
   client's own feature embeddings (any [n, d] array: mean-pooled hidden states, pixels, ...).
   Cluster c gets centroid `mu_c` and radius `r_c` = the `radius_quantile` quantile (numpy's linear
   interpolation) of the Euclidean distances of its own members to `mu_c`. A cluster with one member
   has radius 0.
2. `keep_mask(transfer_features)`: a transfer sample x is kept iff some cluster c has
   `||x - mu_c|| <= density_ratio * r_c`.

A larger `density_ratio` (or quantile) keeps a superset of the samples. With `radius_quantile=0.9` and
`density_ratio=1` roughly 90% of samples drawn like the client's own data are kept.

Aggregation with encrypted counts: each client sends `masked_soft_labels = keep[:, None] * soft_labels`
and `counts = keep.astype(float)` (both encryptable and summable by the server); the ensemble teacher
of sample i is `sum masked_soft_labels[i] / sum counts[i]`, undefined where no client kept sample i.
`filtered_contribution` and `ensemble_from_sums` do the two ends of that.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np


def _check_features(features: Any, name: str, dim: int | None = None) -> np.ndarray:
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array [n_samples, n_features], got shape {values.shape}")
    if dim is not None and values.shape[1] != dim:
        raise ValueError(f"{name} have {values.shape[1]} features but the filter was fitted on {dim}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} hold NaN or infinite values")
    return values


class ProxyFilter:
    """KMeans-radius filter of transfer samples; see the module docstring for the exact rule."""

    def __init__(
        self,
        n_clusters: int = 8,
        density_ratio: float = 1.0,
        *,
        radius_quantile: float = 0.9,
        seed: int = 0,
        n_init: int = 4,
    ) -> None:
        if not isinstance(n_clusters, int) or isinstance(n_clusters, bool) or n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
        finite = isinstance(density_ratio, Real) and math.isfinite(density_ratio)
        if not finite or density_ratio <= 0:
            raise ValueError(
                f"density_ratio must be a positive finite number (a radius multiplier), got {density_ratio!r}"
            )
        if not (isinstance(radius_quantile, Real) and 0 < radius_quantile <= 1):
            raise ValueError(f"radius_quantile must lie in (0, 1], got {radius_quantile!r}")
        if not isinstance(n_init, int) or n_init < 1:
            raise ValueError(f"n_init must be a positive int, got {n_init!r}")
        self.n_clusters = n_clusters
        self.density_ratio = float(density_ratio)
        self.radius_quantile = float(radius_quantile)
        self.seed = seed
        self.n_init = n_init
        self.centroids_: np.ndarray | None = None
        self.radii_: np.ndarray | None = None
        self.cluster_sizes_: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.centroids_ is not None

    def fit(self, own_features: Any) -> ProxyFilter:
        """Cluster the client's own embeddings and measure each cluster's radius."""
        features = _check_features(own_features, "own_features")
        n_distinct = len(np.unique(features, axis=0))
        if n_distinct < self.n_clusters:
            raise ValueError(
                f"own_features have {n_distinct} distinct rows but n_clusters={self.n_clusters}; "
                "lower n_clusters or provide more data"
            )
        from sklearn.cluster import KMeans  # here: scikit-learn costs ~1.5 s to import per ClientApp process

        kmeans = KMeans(n_clusters=self.n_clusters, random_state=self.seed, n_init=self.n_init)
        labels = kmeans.fit_predict(features)
        centroids = kmeans.cluster_centers_.astype(np.float64)
        radii = np.zeros(self.n_clusters)
        sizes = np.bincount(labels, minlength=self.n_clusters)
        for c in range(self.n_clusters):
            members = features[labels == c]
            if len(members):
                radii[c] = np.quantile(np.linalg.norm(members - centroids[c], axis=1), self.radius_quantile)
        self.centroids_, self.radii_, self.cluster_sizes_ = centroids, radii, sizes
        return self

    def distances(self, transfer_features: Any) -> np.ndarray:
        """Euclidean distance of every transfer sample to every centroid, shape [n_transfer, n_clusters]."""
        if self.centroids_ is None:
            raise ValueError("ProxyFilter is not fitted; call fit(own_features) first")
        features = _check_features(transfer_features, "transfer_features", self.centroids_.shape[1])
        return np.linalg.norm(features[:, None, :] - self.centroids_[None, :, :], axis=2)

    def keep_mask(self, transfer_features: Any) -> np.ndarray:
        """Boolean mask: True where a sample lies within `density_ratio * radius` of some centroid."""
        within = self.distances(transfer_features) <= self.density_ratio * self.radii_[None, :]
        return within.any(axis=1)

    def counts(self, transfer_features: Any) -> np.ndarray:
        """The keep mask as float64 0/1 counts, the vector a client encrypts for count aggregation."""
        return self.keep_mask(transfer_features).astype(np.float64)


def filtered_contribution(soft_labels: Any, keep_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """A client's share of the ensemble: soft labels zeroed where not kept, and the 0/1 counts."""
    labels = np.asarray(soft_labels, dtype=np.float64)
    mask = np.asarray(keep_mask)
    if labels.ndim < 1 or mask.shape != labels.shape[:1] or mask.dtype != np.bool_:
        raise ValueError(
            f"keep_mask must be a boolean array with one entry per sample ({labels.shape[:1]}), got "
            f"{mask.dtype} {mask.shape}"
        )
    if not np.all(np.isfinite(labels)):
        raise ValueError("soft_labels hold NaN or infinite values")
    weights = mask.astype(np.float64).reshape((-1,) + (1,) * (labels.ndim - 1))
    return labels * weights, mask.astype(np.float64)


def ensemble_from_sums(label_sum: Any, count_sum: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble soft labels from summed contributions and counts (after decryption).

    Returns `(ensemble, defined)`: ensemble[i] = label_sum[i] / round(count_sum[i]) where `defined[i]`
    (some client kept sample i); rows that no client kept are zeros and must be skipped by the student.
    CKKS decryption returns approximate counts, so a count below 0.5 counts as none.
    """
    sums = np.asarray(label_sum, dtype=np.float64)
    counts = np.asarray(count_sum, dtype=np.float64)
    if sums.ndim < 1 or counts.shape != sums.shape[:1]:
        raise ValueError(f"count_sum must have one entry per sample ({sums.shape[:1]}), got {counts.shape}")
    defined = counts >= 0.5
    safe = np.where(defined, np.rint(counts), 1.0).reshape((-1,) + (1,) * (sums.ndim - 1))
    ensemble = np.where(defined.reshape(safe.shape), sums / safe, 0.0)
    return ensemble, defined
