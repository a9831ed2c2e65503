"""The server's half of client-level DP (`client_dp`, federation.client_dp): the federation's privacy
ledger, the budget stop, `<out>/privacy.json`, and, with `noise: server`, the clipped and noised mean.

Accounting. Every round that releases an aggregate is one Gaussian mechanism with noise multiplier sigma
on the sum of updates clipped to C (sensitivity C for one organization), at sample rate 1 (every
organization is asked every round, so no amplification by subsampling): Opacus' `RDPAccountant` with
history `[(sigma, 1.0, rounds)]`, through the engine's `secure_kd.dp.accounting`. The ledger is the
engine's `Ledger`, keyed on the federation (`client_dp.ledger_key`: a fingerprint of the organizations'
names unless given) in `client_dp.ledger_dir`, separate from every organization's record-level ledgers;
one entry per run, advanced by one step per round and reserved under the ledger's lock *before* the
round is sent. A round that would take the ledger's epsilon above `target_epsilon` is not started: the
run stops cleanly there (the final stage still runs, on the last released model) with
`stopped_by_budget` and the reason in privacy.json and results.json; a run for which not even one round
fits is refused before its first round.

Server-side noise (`noise: server`, plaintext only) follows Flower's
`DifferentialPrivacyServerSideFixedClipping.aggregate_train`: each update is clipped around the round's
global model (`flwr.supercore.differential_privacy.compute_clip_model_update`, here
`federation.clipping.clip_update`), the clipped updates are averaged with equal weights and the noise is
added, N(0, sigma^2 C^2) on the sum, i.e. sigma C / m on the mean (Flower: `compute_stdv`).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from federation import client_dp
from federation.clipping import clip_update
from federation.config import FederatedJob
from federation.server.session import FederationFailed
from secure_kd.dp.accounting import epsilon
from secure_kd.dp.ledger import Ledger
from secure_kd.paths import atomic_write_json, private_dir

logger = logging.getLogger("secure_kd.federation")
PRIVACY_FILE = "privacy.json"


def server_noised_mean(
    payloads: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray],
    job: FederatedJob,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """`noise: server`: reference + (sum_i clip(w_i - reference, C) + N(0, sigma^2 C^2)) / m, float32."""
    cfg = client_dp.config(job)
    rng = rng if rng is not None else client_dp.noise_generator()
    std = client_dp.noise_multiplier(job) * cfg.clip_norm
    clipped = [clip_update(p, reference, cfg.clip_norm) for p in payloads]
    out = {}
    for name, ref in reference.items():
        base = ref.astype(np.float64)
        total = sum(c[name].astype(np.float64) - base for c in clipped)
        total = total + rng.normal(0.0, std, size=ref.shape)
        out[name] = (base + total / len(payloads)).astype(np.float32)
    return out


class ClientDPAccount:
    """This run's client-level accounting in the federation's ledger, and its report."""

    def __init__(self, job: FederatedJob, run_id: int | None) -> None:
        self.job, self.cfg = job, client_dp.config(job)
        self.sigma = client_dp.noise_multiplier(job)
        self.delta = client_dp.delta(job)
        self.out = Path(job.out)
        self.ledger = Ledger.open(
            client_dp.ledger_key(job),
            self.cfg.ledger_dir,
            data_fingerprint=client_dp.federation_fingerprint(job),
        )
        self.entry = f"client-dp-run-{run_id}-{uuid.uuid4().hex[:12]}"
        self.rounds = 0
        self.stop_reason: str | None = None
        history = self.ledger.history()
        if self.cfg.target_epsilon is not None and not self._fits(history, 1):
            spent = epsilon(history, self.delta, client_dp.ACCOUNTANT)
            raise FederationFailed(
                f"client_dp: the federation's privacy budget is spent: its ledger ({self.ledger.path}) holds "
                f"epsilon={spent:.4g} (client level, delta={self.delta:g}) and one more round at "
                f"noise_multiplier={self.sigma:.4g} would exceed target_epsilon={self.cfg.target_epsilon:g}; "
                "nothing was released. Raise target_epsilon knowingly, or use a larger noise_multiplier"
            )
        self.ledger.record(
            noise_multiplier=self.sigma,
            sample_rate=client_dp.SAMPLE_RATE,
            steps=0,
            kind="federated_round",
            label=f"client-level fedavg, unit client, noise {self.cfg.noise}, protection {job.protection}",
            entry_id=self.entry,
            max_grad_norm=self.cfg.clip_norm,
            n_records=job.n_organizations,
            sampling="poisson",  # rate 1: every organization, every round
        )
        self.write()

    def _fits(self, history: list[tuple[float, float, int]], steps: int) -> bool:
        composed = [*history, (self.sigma, client_dp.SAMPLE_RATE, steps)]
        return epsilon(composed, self.delta, client_dp.ACCOUNTANT) <= self.cfg.target_epsilon

    def reserve(self, r: int) -> str | None:
        """Reserve round `r` in the ledger; None when it fits, else why the run stops before it."""
        fits = self._fits if self.cfg.target_epsilon is not None else None
        if self.ledger.reserve(self.entry, self.rounds + 1, fits):
            self.rounds += 1
            self.write()
            return None
        spent = self.epsilon()
        self.stop_reason = (
            f"stopped before round {r}: the federation's client-level epsilon is {spent:.4g} (delta "
            f"{self.delta:g}) and round {r} would take it above target_epsilon={self.cfg.target_epsilon:g}"
        )
        logger.warning("client_dp: %s", self.stop_reason)
        self.write()
        return self.stop_reason

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.delta, client_dp.ACCOUNTANT)

    def _server_view(self) -> tuple[str, float | None]:
        job, cfg = self.job, self.cfg
        if job.protection == "ckks":
            return "ciphertexts only: the server never holds an aggregate, noised or not", None
        if job.protection == "secagg+":
            return "the noised sum only (SecAgg+ unmasks nothing else): the claim covers it", None
        if cfg.noise == "server":
            return "every update and the unnoised aggregate: no guarantee against the server", None
        share_sigma = self.sigma / math.sqrt(client_dp.share_count(job))
        history = [(share_sigma, client_dp.SAMPLE_RATE, self.rounds)]
        text = (
            f"each organization's clipped update with its own share only (noise multiplier "
            f"{share_sigma:.4g} per organization): server_run_epsilon is this run against the server"
        )
        return text, epsilon(history, self.delta, client_dp.ACCOUNTANT)

    def report(self) -> dict[str, Any]:
        job, cfg = self.job, self.cfg
        spent = self.epsilon()
        view, server_eps = self._server_view()
        entries = self.ledger.entries()
        clients_noise = cfg.noise == "client"
        colluders = cfg.tolerated_colluders if clients_noise else 0
        guarantee = (
            f"The global models released by the {self.rounds} round(s) of this run are "
            f"({spent:.4g}, {self.delta:g})-differentially private with respect to one organization (its "
            f"update replaced by zero), composed over every run of this federation in its ledger by Opacus' "
            f"RDP accountant at sample rate 1, for any party that knows at most {colluders} noise share(s)"
        )
        caveats = [
            "who takes part in each round and how many answered are public; the metrics organizations "
            "report (losses on their held-out records, rounded) are outside the guarantee",
            "an organization's record-level DP-SGD (train.privacy) is accounted separately, per dataset",
        ]
        if clients_noise:
            caveats += [
                "a malicious organization that does not clip or does not add its share is not prevented "
                "(under ckks and secagg+ nobody can check an update); the guarantee is for honest ones",
                f"readers who know more than {colluders} share(s) (colluding organizations) see less noise "
                "than sigma*C on the others' sum",
            ]
        if job.protection == "secagg+":
            caveats.append(
                "SecAgg+ quantizes each masked value (stochastic rounding, step 2*clipping_range/"
                "quantization_range) and clips it to clipping_range: the accounting is that of the "
                "continuous Gaussian sum before quantization"
            )
        caveats.append("noise from numpy's PCG64 seeded with OS randomness: not a cryptographic generator")
        return {
            "unit": "client",
            "mechanism": "DP-FedAvg with fixed clipping (Gaussian noise on the sum of clipped updates)",
            "noise": cfg.noise,
            "protection": job.protection,
            "noise_multiplier": self.sigma,
            "clip_norm": cfg.clip_norm,
            "sum_noise_std": self.sigma * cfg.clip_norm,
            "noise_share_std": client_dp.share_std(job) if clients_noise else None,
            "noise_shares": client_dp.share_count(job) if clients_noise else None,
            "tolerated_colluders": colluders,
            "sample_rate": client_dp.SAMPLE_RATE,
            "steps": self.rounds,
            "delta": self.delta,
            "epsilon": spent,
            "run_epsilon": epsilon(
                [(self.sigma, client_dp.SAMPLE_RATE, self.rounds)], self.delta, client_dp.ACCOUNTANT
            ),
            "accountant": client_dp.ACCOUNTANT,
            "target_epsilon": cfg.target_epsilon,
            "stopped_by_budget": self.stop_reason is not None,
            "stop_reason": self.stop_reason,
            "history": [list(h) for h in self.ledger.history()],
            "ledger": {
                "file": str(self.ledger.path),
                "key": self.ledger.key,
                "entry": self.entry,
                "entries": len(entries),
                "total_steps": sum(e.steps for e in entries),
            },
            "n_organizations": job.n_organizations,
            "min_clients": job.required_clients,
            "server_view": view,
            "server_run_epsilon": server_eps if job.protection == "plaintext" else None,
            "guarantee": guarantee,
            "caveats": caveats,
        }

    def write(self) -> None:
        private_dir(self.out)
        atomic_write_json(self.out / PRIVACY_FILE, self.report(), mode=0o600)
