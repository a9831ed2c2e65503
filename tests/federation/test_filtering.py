"""Client-side proxy filtering (federation.client.proxy_filter): the KMeans-radius rule, its aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.cluster import KMeans

from federation.client.proxy_filter import ProxyFilter, ensemble_from_sums, filtered_contribution

CENTERS = np.array([[0.0] * 5, [10.0, 0, 0, 0, 0], [0, -10.0, 0, 0, 0]])


def _spread(n: int, scale: float, seed: int) -> np.ndarray:
    """Samples scattered around the client's centers, wider than its data: some in, some out."""
    rng = np.random.default_rng(seed)
    return CENTERS[rng.integers(len(CENTERS), size=n)] + rng.normal(scale=scale, size=(n, CENTERS.shape[1]))


def _blobs(n_per_center: int, seed: int, centers: np.ndarray = CENTERS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + rng.normal(size=(n_per_center, centers.shape[1])) for c in centers])


def test_own_distribution_is_kept_and_far_samples_are_dropped():
    proxy = ProxyFilter(n_clusters=3, density_ratio=1.5, seed=0).fit(_blobs(100, seed=0))
    assert proxy.keep_mask(_blobs(100, seed=1)).mean() > 0.97
    far = np.random.default_rng(2).normal(size=(100, 5)) + 50.0
    assert not proxy.keep_mask(far).any()
    # A topic the client never saw, as far from its clusters as they are from each other.
    unseen = _blobs(100, seed=3, centers=np.array([[0, 0, 10.0, 0, 0]]))
    assert proxy.keep_mask(unseen).mean() < 0.02


def test_quantile_radius_keeps_about_that_share_of_fresh_in_distribution_samples():
    proxy = ProxyFilter(n_clusters=3, density_ratio=1.0, radius_quantile=0.9, seed=0).fit(_blobs(400, seed=0))
    kept = proxy.keep_mask(_blobs(400, seed=5)).mean()
    assert 0.85 < kept < 0.95


def test_rule_matches_an_independent_computation():
    own = _blobs(60, seed=0)
    transfer = _spread(200, 2.0, seed=9)
    proxy = ProxyFilter(n_clusters=3, density_ratio=1.2, radius_quantile=0.75, seed=4, n_init=4).fit(own)
    reference = KMeans(n_clusters=3, random_state=4, n_init=4).fit(own)
    np.testing.assert_allclose(proxy.centroids_, reference.cluster_centers_)
    radii = []
    for c in range(3):
        members = own[reference.labels_ == c]
        distances = sorted(math.dist(m, reference.cluster_centers_[c]) for m in members)
        # numpy's default ("linear") quantile: interpolate at position q * (n - 1).
        position = 0.75 * (len(distances) - 1)
        low = int(math.floor(position))
        high = min(low + 1, len(distances) - 1)
        radii.append(distances[low] + (distances[high] - distances[low]) * (position - low))
    np.testing.assert_allclose(proxy.radii_, radii)
    expected = [
        any(math.dist(x, reference.cluster_centers_[c]) <= 1.2 * radii[c] for c in range(3)) for x in transfer
    ]
    assert proxy.keep_mask(transfer).tolist() == expected
    assert 0 < sum(expected) < len(expected)  # the case exercises both outcomes
    np.testing.assert_array_equal(proxy.counts(transfer), np.array(expected, dtype=float))


def test_a_larger_threshold_keeps_a_superset():
    own = _blobs(80, seed=0)
    transfer = _spread(500, 2.5, seed=1)
    masks = [ProxyFilter(3, ratio, seed=0).fit(own).keep_mask(transfer) for ratio in (0.5, 1.0, 2.0, 4.0)]
    for smaller, larger in zip(masks, masks[1:], strict=False):
        assert np.all(larger[smaller])
        assert larger.sum() > smaller.sum()
    by_quantile = [
        ProxyFilter(3, 1.0, radius_quantile=q, seed=0).fit(own).keep_mask(transfer) for q in (0.5, 0.9, 1.0)
    ]
    for smaller, larger in zip(by_quantile, by_quantile[1:], strict=False):
        assert np.all(larger[smaller])


def test_fit_is_deterministic_for_a_seed():
    own, transfer = _blobs(50, seed=0), _spread(300, 2.0, seed=1)
    a = ProxyFilter(5, seed=3).fit(own)
    b = ProxyFilter(5, seed=3).fit(own)
    assert np.array_equal(a.centroids_, b.centroids_) and np.array_equal(a.radii_, b.radii_)
    assert np.array_equal(a.keep_mask(transfer), b.keep_mask(transfer))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="not fitted"):
        ProxyFilter(2).keep_mask(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="n_clusters"):
        ProxyFilter(4).fit(np.repeat([[0.0, 0.0], [1.0, 1.0]], 5, axis=0))  # 2 distinct rows
    proxy = ProxyFilter(2).fit(_blobs(10, seed=0))
    with pytest.raises(ValueError, match="fitted on 5"):
        proxy.keep_mask(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        proxy.keep_mask(np.full((1, 5), np.nan))
    with pytest.raises(ValueError, match="density_ratio"):
        ProxyFilter(2, density_ratio=0.0)
    with pytest.raises(ValueError, match="radius_quantile"):
        ProxyFilter(2, radius_quantile=1.5)


def test_filtered_ensemble_averages_only_the_clients_that_kept_each_sample():
    labels_a = np.array([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    labels_b = np.array([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1], [0.4, 0.6]])
    share_a, counts_a = filtered_contribution(labels_a, np.array([True, False, True, False]))
    share_b, counts_b = filtered_contribution(labels_b, np.array([True, True, False, False]))
    # What an HE sum would give back: approximately the plain sums.
    label_sum = share_a + share_b + 1e-7
    count_sum = counts_a + counts_b - 1e-7
    ensemble, defined = ensemble_from_sums(label_sum, count_sum)
    assert defined.tolist() == [True, True, True, False]
    np.testing.assert_allclose(ensemble[:3], [[0.7, 0.3], [0.2, 0.8], [0.1, 0.9]], atol=1e-6)
    np.testing.assert_array_equal(ensemble[3], [0.0, 0.0])
    with pytest.raises(ValueError, match="boolean"):
        filtered_contribution(labels_a, np.array([1, 0, 1, 0]))


def _ensemble_accuracy(dirichlet_alpha: float, filtered: bool, seed: int = 0) -> float:
    """Nearest-centroid clients on non-IID splits label a balanced transfer set; ensemble accuracy.

    Counted over every transfer sample: one that no client kept counts as wrong.
    """
    rng = np.random.default_rng(seed)
    n_classes, n_clients, dim = 6, 4, 4
    means = rng.normal(scale=5.0, size=(n_classes, dim))
    ensemble_sum = np.zeros((300, n_classes))
    count_sum = np.zeros(300)
    transfer_y = np.arange(300) % n_classes
    transfer_x = means[transfer_y] + rng.normal(size=(300, dim))
    for _ in range(n_clients):
        sizes = rng.multinomial(150, rng.dirichlet(np.full(n_classes, dirichlet_alpha)))
        y = np.repeat(np.arange(n_classes), sizes)
        x = means[y] + rng.normal(size=(len(y), dim))
        seen = [c for c in range(n_classes) if sizes[c] >= 5]
        centroids = np.stack([x[y == c].mean(0) for c in seen])
        logits = -0.5 * ((transfer_x[:, None] - centroids[None]) ** 2).sum(-1)
        soft = np.zeros((300, n_classes))
        soft[:, seen] = np.exp(logits - logits.max(1, keepdims=True))
        soft /= soft.sum(1, keepdims=True)
        keep = ProxyFilter(4, 1.5, seed=seed).fit(x).keep_mask(transfer_x) if filtered else np.ones(300, bool)
        share, counts = filtered_contribution(soft, keep)
        ensemble_sum += share
        count_sum += counts
    ensemble, defined = ensemble_from_sums(ensemble_sum, count_sum)
    return float(((ensemble.argmax(1) == transfer_y) & defined).mean())


def test_filtering_improves_the_ensemble_under_strong_non_iid_and_does_not_hurt_near_iid():
    def mean_accuracy(alpha: float, filtered: bool) -> float:
        return float(np.mean([_ensemble_accuracy(alpha, filtered, seed=s) for s in range(3)]))

    # Measured here (5 seeds): alpha 0.1: 0.43 -> 0.79; alpha 1.0: 0.92 -> 0.98.
    assert mean_accuracy(0.1, True) > mean_accuracy(0.1, False) + 0.2
    assert mean_accuracy(1.0, True) > mean_accuracy(1.0, False) - 0.02
