"""IID and Dirichlet splits, and the public/private layout of a federated job."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from federation.config import FederatedJob
from federation.partition import dirichlet_partition, federated_split, iid_partition


def _is_partition(parts, n):
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n)) and len(flat) == len(set(flat))


def test_iid_partition_covers_everything_once_with_balanced_sizes():
    parts = iid_partition(103, 4, seed=3)
    assert _is_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == iid_partition(103, 4, seed=3)
    assert parts != iid_partition(103, 4, seed=4)


def _max_share(labels, parts):
    """Mean over labels of the largest fraction of that label held by one client."""
    shares = []
    for label in set(labels):
        counts = [sum(1 for i in p if labels[i] == label) for p in parts]
        shares.append(max(counts) / sum(counts))
    return float(np.mean(shares))


def test_dirichlet_concentration_controls_skew():
    labels = [f"topic-{i % 5}" for i in range(500)]
    skewed = dirichlet_partition(labels, 4, alpha=0.05, seed=0, min_units=5)
    balanced = dirichlet_partition(labels, 4, alpha=1000.0, seed=0, min_units=5)
    assert _is_partition(skewed, 500) and _is_partition(balanced, 500)
    # alpha -> 0: a label goes (almost) entirely to one client; alpha -> inf: a quarter each.
    assert _max_share(labels, skewed) > 0.85
    assert _max_share(labels, balanced) < 0.3
    assert dirichlet_partition(labels, 4, alpha=0.05, seed=0, min_units=5) == skewed
    assert min(len(p) for p in skewed) >= 5


def test_dirichlet_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="cannot give 4 organizations 10 each"):
        dirichlet_partition(["a"] * 30, 4, alpha=1.0, seed=0, min_units=10)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(["a"] * 30, 2, alpha=0.0, seed=0)


def _job(**changes):
    base = dict(
        n_organizations=3,
        mode="fed_distill",
        tokenizer="tiny:300",
        data={"synthetic": {"n_records": 150, "n_canaries": 3, "canary_repeats": 3}, "heldout_fraction": 0.1},
        transfer={"n_records": 10},
        partition={"kind": "dirichlet", "alpha": 0.5, "by": "canary_owner", "min_records": 5},
    )
    base.update(changes)
    return FederatedJob.model_validate(base)


def test_federated_split_keeps_public_sets_public_and_canaries_with_one_owner():
    split = federated_split(_job())
    ids = lambda records: {r["record_id"] for r in records}  # noqa: E731
    private = [ids(o.train) | ids(o.heldout) for o in split.organizations]
    everything = ids(split.test) | ids(split.transfer) | set().union(*private)
    assert len(everything) == 150 + 9  # every record somewhere ...
    sizes = len(split.test) + len(split.transfer) + sum(len(p) for p in private)
    assert sizes == len(everything)  # ... and in one place only
    assert len(split.transfer) == 10
    assert all(r["topic"] != "canary" for r in split.test + split.transfer)
    # by canary_owner, the three insertions of each canary sit with a single organization
    assert len(split.canary_owners) == 3
    assert all(len(owners) == 1 for owners in split.canary_owners.values())
    for org, data in enumerate(split.organizations):
        assert data.heldout and data.train
        assert all(r["topic"] != "canary" for r in data.heldout)
        held = Counter(r["topic"] for r in data.train)["canary"]
        assert held == 3 * sum(1 for owners in split.canary_owners.values() if owners == [org])


def test_federated_split_is_deterministic_and_seeded():
    a, b = federated_split(_job()), federated_split(_job())
    assert [r["record_id"] for r in a.transfer] == [r["record_id"] for r in b.transfer]
    c = federated_split(_job(seed=1))
    assert [r["record_id"] for r in c.organizations[0].train] != [
        r["record_id"] for r in a.organizations[0].train
    ]
