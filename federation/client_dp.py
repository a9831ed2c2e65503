"""Client-level differential privacy for fedavg (`client_dp` in a job): the mechanism
every party derives from the job alone.

DP-FedAvg with fixed clipping (McMahan et al., ICLR 2018; Flower's
`DifferentialPrivacyClientSideFixedClipping` / `...ServerSideFixedClipping` and `fixedclipping_mod`
implement the same for its Strategy API, which the Message-API ServerApp here does not use): in every
round each organization's update `w_i - g` (g: the round's global model) is clipped to L2 norm
`clip_norm` (C), the clipped updates are summed with weight 1 each, Gaussian noise N(0, sigma^2 C^2)
per coordinate is added to the sum, and the new global model is `g + (sum + noise) / m` (m: the number
of contributors, public). The unit is one organization: the released global models are
(epsilon, delta)-indistinguishable whether an organization trained on its data or sent a zero update
(zero-out neighbours, Kairouz et al. 2021), at sensitivity C per round.

Where the noise is added (`noise`):

- `client` (every protection): each organization adds its share N(0, s^2) with
  s = sigma * C / sqrt(k), k = min_clients - tolerated_colluders, to its clipped update before it is
  encrypted (CKKS), masked (SecAgg+) or sent (plaintext). Any sum of at least min_clients contributions
  with up to `tolerated_colluders` shares known to (and so removable by) the reader still carries noise
  of variance >= sigma^2 C^2: the server under CKKS never holds the aggregate, under SecAgg+ it sees
  only the noised sum, and a client reading the CKKS aggregate knows one share, its own (the default
  tolerance, 1). More colluders than that reduce the noise left.
- `server` (plaintext only, the server sees every update anyway): the server clips every update and
  adds N(0, sigma^2 C^2) to the sum (Flower's server-side fixed clipping); the server itself sees the
  unnoised aggregate, so the guarantee covers only those who receive the global model.

The noise multiplier is `noise_multiplier`, or, with `target_epsilon` alone, calibrated from the job
alone (q = 1, `rounds` rounds; Opacus' RDP) so that every organization computes the same one without
asking the server. Accounting and the federation's ledger are the server's
(`federation.server.client_dp`); each organization also refuses to contribute more rounds in one run
than the budget allows from scratch (`contribution_cap`).

Noise comes from a generator seeded by 128 bits of OS randomness per draw (`noise_generator`), never
from the job's `seed`; like the DP-SGD path it is not a cryptographic generator and floating-point
attacks on the Gaussian sampler are not addressed.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from federation.client_dp_config import (
    ACCOUNTANT,
    SAMPLE_RATE,
    SECAGG_NOISE_SIGMAS,
    ClientDPConfig,
    resolve_delta,
    resolve_noise_multiplier,
)
from federation.client_dp_config import share_count as _share_count

if TYPE_CHECKING:
    from federation.config import FederatedJob

__all__ = ["ACCOUNTANT", "SAMPLE_RATE", "SECAGG_NOISE_SIGMAS", "ClientDPConfig"]


def config(job: FederatedJob) -> ClientDPConfig:
    assert job.client_dp is not None
    return job.client_dp


def delta(job: FederatedJob) -> float:
    return resolve_delta(config(job), job.n_organizations)


def noise_multiplier(job: FederatedJob) -> float:
    """The given sigma, or the one with which `rounds` rounds at q = 1 end at target_epsilon (job alone)."""
    return resolve_noise_multiplier(config(job), n_organizations=job.n_organizations, rounds=job.rounds)


def share_count(job: FederatedJob) -> int:
    """k: the shares whose sum carries sigma^2 C^2 (min_clients minus the tolerated colluders)."""
    return _share_count(config(job), job.required_clients)


def share_std(job: FederatedJob) -> float:
    """s = sigma * C / sqrt(k): the standard deviation of one organization's noise share."""
    cfg = config(job)
    return noise_multiplier(job) * cfg.clip_norm / math.sqrt(share_count(job))


def contribution_cap(job: FederatedJob) -> int:
    """The most rounds one organization contributes to in a run: `rounds`, fewer when target_epsilon does
    not cover them even from an empty ledger (the server's ledger stops earlier when runs before spent)."""
    cfg = config(job)
    if cfg.target_epsilon is None:
        return job.rounds
    from secure_kd.dp.accounting import steps_within_budget

    return steps_within_budget(
        target_epsilon=cfg.target_epsilon,
        delta=delta(job),
        noise_multiplier=noise_multiplier(job),
        sample_rate=SAMPLE_RATE,
        upper=job.rounds,
        accountant=ACCOUNTANT,
    )


def federation_fingerprint(job: FederatedJob) -> str:
    """sha256 of the federation's membership: the organizations' names, sorted."""
    names = sorted(job.org_name(i) for i in range(job.n_organizations))
    return hashlib.sha256(json.dumps({"organizations": names}).encode()).hexdigest()


def ledger_key(job: FederatedJob) -> str:
    return config(job).ledger_key or f"federation-{federation_fingerprint(job)[:40]}"


def noise_generator() -> np.random.Generator:
    """A fresh generator seeded by 128 bits of OS randomness (tests replace this function)."""
    return np.random.default_rng(secrets.randbits(128))


def add_noise(
    arrays: Mapping[str, np.ndarray], std: float, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """arrays + N(0, std^2) per coordinate, drawn in the arrays' order, each array's dtype kept."""
    rng = rng if rng is not None else noise_generator()
    return {
        name: (a.astype(np.float64) + rng.normal(0.0, std, size=a.shape)).astype(a.dtype)
        for name, a in arrays.items()
    }
