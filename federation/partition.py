"""Split a corpus between organizations: IID, or non-IID with a Dirichlet prior over labels.

`federated_split(job)` builds the whole layout of a federated job from its `data` block:

- a public test set (`data.heldout_fraction` of the records without a canary) every client
  evaluates on, and a public transfer set (`transfer.n_records`, also canary-free) for the soft
  labels of fed_distill / pate / p2p: nobody owns these two;
- the rest, private, split into `n_organizations` disjoint partitions (`partition_indices`), each
  cut into the organization's own training and held-out records.

Dirichlet split (Hsu et al., 2019): for every label c, proportions p_c ~ Dir(alpha * 1_N) and the
records of c are dealt out in those proportions; the draw is repeated (seeded) until every
organization holds at least `min_records` units. Records that must stay together (all insertions
of one canary, with `by: canary_owner`) form one unit.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_kd.data import generate_corpus, load_records
from secure_kd.data.synthetic import SyntheticCorpus

MAX_DIRICHLET_DRAWS = 1000


@dataclass(frozen=True)
class OrganizationData:
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]

    def label_histogram(self, by: str = "topic") -> dict[str, int]:
        return dict(Counter(str(r.get(by, "")) for r in self.train + self.heldout))


@dataclass(frozen=True)
class FederatedSplit:
    test: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    organizations: list[OrganizationData]
    canary_owners: dict[str, list[int]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)


def iid_partition(n_units: int, n_clients: int, *, seed: int, min_units: int = 1) -> list[list[int]]:
    """Unit indices dealt out uniformly at random, sizes differing by at most one."""
    _check_sizes(n_units, n_clients, min_units)
    order = np.random.default_rng(seed).permutation(n_units).tolist()
    return [sorted(order[i::n_clients]) for i in range(n_clients)]


def dirichlet_partition(
    labels: Sequence[Hashable], n_clients: int, *, alpha: float, seed: int, min_units: int = 1
) -> list[list[int]]:
    """Per label, Dirichlet(alpha) shares of its units per client; redrawn until each has `min_units`."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_sizes(len(labels), n_clients, min_units)
    by_label: dict[Hashable, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for label in sorted(by_label, key=str):
            units = rng.permutation(by_label[label])
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(units)).astype(int)
            for client, chunk in enumerate(np.split(units, cuts)):
                parts[client].extend(int(u) for u in chunk)
        if min(len(p) for p in parts) >= min_units:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"{MAX_DIRICHLET_DRAWS} Dirichlet(alpha={alpha}) draws all left an organization with fewer than "
        f"{min_units} records ({len(labels)} records, {n_clients} organizations): raise alpha, lower "
        "partition.min_records, or generate more records"
    )


def _check_sizes(n_units: int, n_clients: int, min_units: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_units < n_clients * min_units:
        raise ValueError(
            f"{n_units} private records cannot give {n_clients} organizations {min_units} each: generate "
            "more records (data.synthetic.n_records) or lower partition.min_records"
        )


def job_corpus(job) -> SyntheticCorpus | None:
    """The job's synthetic corpus with its canaries (None when the job reads a data file)."""
    data = job.data
    if data.train != "synthetic":
        return None
    syn = data.synthetic
    return generate_corpus(
        syn.n_records,
        seed=job.seed if syn.seed is None else syn.seed,
        n_canaries=syn.n_canaries,
        canary_repeats=syn.canary_repeats,
        secret_digits=syn.secret_digits,
    )


def _records(job) -> tuple[list[dict[str, Any]], list[tuple[str, tuple[int, ...]]]]:
    """All records of the job and the canaries as (owner name, record ids)."""
    data = job.data
    corpus = job_corpus(job)
    if corpus is not None:
        canaries = [(c.prefix, c.record_ids) for c in corpus.canaries]
        return [dict(r) for r in corpus.records], canaries
    records = [dict(r) for r in load_records(data.train)]
    if data.max_records is not None:
        records = records[: data.max_records]
    for index, record in enumerate(records):
        record.setdefault("record_id", index)
    return records, []


def _units(
    records: list[dict[str, Any]], canaries, *, by: str, need_labels: bool
) -> tuple[list[list[int]], list[str]]:
    """Groups of record positions that move together, and the label of each group."""
    position = {r["record_id"]: i for i, r in enumerate(records)}
    grouped: set[int] = set()
    units: list[list[int]] = []
    labels: list[str] = []
    if by == "canary_owner":
        for _, record_ids in canaries:
            members = [position[rid] for rid in record_ids if rid in position]
            if members:
                units.append(members)
                labels.append(str(records[members[0]].get("topic", "canary")))
                grouped.update(members)
    for i, record in enumerate(records):
        if i in grouped:
            continue
        if need_labels and "topic" not in record:
            raise ValueError(
                f"record {i} has no 'topic' field: a non-IID split needs one label per record; add a 'topic' "
                "field to the data file or use partition.kind: iid"
            )
        units.append([i])
        labels.append(str(record.get("topic", "")))
    return units, labels


def federated_split(job) -> FederatedSplit:
    """Public test and transfer sets, then one private partition per organization (see module doc)."""
    records, canaries = _records(job)
    with_canary = {rid for _, ids in canaries for rid in ids}
    public_candidates = [i for i, r in enumerate(records) if r["record_id"] not in with_canary]
    n_test = max(1, round(job.data.heldout_fraction * len(public_candidates)))
    n_public = n_test + job.transfer.n_records
    if n_public >= len(public_candidates):
        raise ValueError(
            f"{len(records)} records leave nothing private after {n_test} test and {n_public - n_test} "
            "transfer records: generate more (data.synthetic.n_records) or lower transfer.n_records"
        )
    picked = random.Random(f"secure-kd-federated-public:{job.seed}").sample(public_candidates, n_public)
    test = [records[i] for i in sorted(picked[:n_test])]
    transfer = [records[i] for i in sorted(picked[n_test:])]
    public = set(picked)
    private = [r for i, r in enumerate(records) if i not in public]
    part = job.partition
    units, labels = _units(private, canaries, by=part.by, need_labels=part.kind == "dirichlet")
    if part.kind == "iid":
        assignment = iid_partition(len(units), job.n_organizations, seed=job.seed, min_units=part.min_records)
    else:
        assignment = dirichlet_partition(
            labels, job.n_organizations, alpha=part.alpha, seed=job.seed, min_units=part.min_records
        )
    organizations = []
    holder = {}
    for org, unit_ids in enumerate(assignment):
        rows = sorted(i for u in unit_ids for i in units[u])
        for i in rows:
            holder[private[i]["record_id"]] = org
        own = [private[i] for i in rows]
        organizations.append(split_own_records(own, part.heldout_fraction, seed=job.seed, org=org))
    owners = {
        f"canary-{k}": sorted({holder[rid] for rid in ids if rid in holder})
        for k, (_, ids) in enumerate(canaries)
    }
    return FederatedSplit(test, transfer, organizations, owners, sorted(set(labels)))


def split_own_records(
    records: list[dict[str, Any]], fraction: float, *, seed: int, org: int
) -> OrganizationData:
    """One organization's records cut into training and held-out (the same cut in simulation and in
    deployment, where the records come from the SuperNode's own data file)."""
    return _train_heldout(records, fraction, seed=seed * 7919 + org)


def _train_heldout(records: list[dict[str, Any]], fraction: float, *, seed: int) -> OrganizationData:
    """At least one held-out and one training record; canary records always stay in training."""
    candidates = [i for i, r in enumerate(records) if r.get("topic") != "canary"]
    n_held = min(max(1, round(fraction * len(records))), max(len(candidates) - 1, 0))
    held = set(random.Random(seed).sample(candidates, n_held)) if n_held > 0 else set()
    if not held:
        held = {len(records) - 1}
    return OrganizationData(
        train=[r for i, r in enumerate(records) if i not in held],
        heldout=[r for i, r in enumerate(records) if i in held],
    )
