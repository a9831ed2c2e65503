"""The `client_dp` block of a federated job and the derivations every party makes from it alone.

`ClientDPConfig` (clip norm C, noise multiplier or target epsilon, delta, where the noise is added,
tolerated colluders), and, from the block plus the job's public numbers (organizations, rounds,
min_clients), the resolved delta and noise multiplier, the share count and the problems a job with the
block must not have. The mechanism that works on a whole job (noise shares, contribution cap, ledger
key) is `federation.client_dp`; this module imports nothing from the job so that `federation.config`
can validate with it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from secure_kd.config import Strict

SAMPLE_RATE = 1.0  # every organization is asked every round: no amplification by subsampling
ACCOUNTANT = "rdp"
SECAGG_NOISE_SIGMAS = 6.0  # secagg.clipping_range must hold C + this many share deviations


class ClientDPConfig(Strict):
    """Client-level DP for fedavg: clip each organization's update, add Gaussian noise to the sum."""

    clip_norm: float = Field(gt=0, description="C: L2 bound on one organization's update per round")
    noise_multiplier: float | None = Field(
        None, gt=0, description="sigma: the sum carries N(0, sigma^2 C^2) per coordinate"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="client-level budget of the federation's ledger, across runs"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="default: the largest power of ten not above 1/(10 n_organizations)"
    )
    noise: Literal["client", "server"] = Field(
        "client",
        description="client: each organization adds its share before encryption or masking; server: "
        "plaintext only, the server clips and adds the noise (it sees the unnoised aggregate)",
    )
    tolerated_colluders: int = Field(
        1,
        ge=0,
        description="noise: client: shares that may be known to whoever reads the sum (1: a client "
        "reading the CKKS aggregate knows its own) and the rest still carries sigma*C",
    )
    ledger_dir: str | None = Field(
        None, description="the federation's ledger directory (default $SECURE_KD_HOME/privacy-ledgers)"
    )
    ledger_key: str | None = Field(
        None, description="default: 'federation-' + a fingerprint of the organizations' names"
    )

    @model_validator(mode="after")
    def _noise_given(self) -> ClientDPConfig:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "client_dp needs noise_multiplier, target_epsilon or both (e.g. noise_multiplier: 1.0)"
            )
        return self


def resolve_delta(cfg: ClientDPConfig, n_organizations: int) -> float:
    from secure_kd.dp.accounting import resolve_delta as resolve

    try:
        return resolve(cfg.delta, n_organizations)
    except ValueError:
        raise ValueError(
            f"client_dp.delta={cfg.delta:g} is not below 1/n_organizations = 1/{n_organizations}:"
            " the unit is one organization, so such a delta could release one organization's update "
            "outright; use a smaller delta or omit it"
        ) from None


def resolve_noise_multiplier(cfg: ClientDPConfig, *, n_organizations: int, rounds: int) -> float:
    """The given sigma, or the one with which `rounds` rounds at q = 1 end at target_epsilon."""
    if cfg.noise_multiplier is not None:
        return cfg.noise_multiplier
    from secure_kd.dp.accounting import noise_multiplier_for_budget

    return noise_multiplier_for_budget(
        target_epsilon=cfg.target_epsilon,
        delta=resolve_delta(cfg, n_organizations),
        sample_rate=SAMPLE_RATE,
        steps=rounds,
        accountant=ACCOUNTANT,
    )


def share_count(cfg: ClientDPConfig, required_clients: int) -> int:
    """k: the shares whose sum carries sigma^2 C^2 (min_clients minus the tolerated colluders)."""
    return required_clients - cfg.tolerated_colluders


def problems(
    cfg: ClientDPConfig,
    *,
    mode: str,
    protection: str,
    aggregation_rule: str,
    client_clip_norm: float | None,
    required_clients: int,
    n_organizations: int,
    rounds: int,
    secagg_clipping_range: float,
) -> list[str]:
    """What a job with `client_dp` must also satisfy (federation.config reports them with the others)."""
    found: list[str] = []
    if mode != "fedavg":
        found.append(f"client_dp clips and noises fedavg updates: use mode fedavg, not {mode}")
    if cfg.noise == "server" and protection != "plaintext":
        found.append(
            f"client_dp.noise: server needs the aggregate in the clear, which protection {protection} "
            "keeps from the server (ckks: it never holds it; secagg+: it would see it unnoised): use "
            "noise: client (each organization adds its share before encryption or masking)"
        )
    if aggregation_rule != "mean":
        found.append(
            f"client_dp with aggregation.rule={aggregation_rule}: the Gaussian mechanism is on the sum "
            "of clipped updates; set aggregation.rule: mean"
        )
    if client_clip_norm is not None:
        found.append("client_dp.clip_norm replaces aggregation.client_clip_norm: drop the latter")
    shares = share_count(cfg, required_clients)
    if cfg.noise == "client" and shares < 1:
        found.append(
            f"client_dp.tolerated_colluders={cfg.tolerated_colluders} leaves no share: it must be below "
            f"min_clients={required_clients}"
        )
    try:
        resolve_delta(cfg, n_organizations)
        sigma = resolve_noise_multiplier(cfg, n_organizations=n_organizations, rounds=rounds)
    except ValueError as exc:
        found.append(f"client_dp: {exc}")
        return found
    if cfg.noise == "client" and protection == "secagg+" and shares >= 1:
        needed = cfg.clip_norm + SECAGG_NOISE_SIGMAS * sigma * cfg.clip_norm / math.sqrt(shares)
        if secagg_clipping_range < needed:
            found.append(
                f"secagg.clipping_range={secagg_clipping_range:g} would cut the noised updates: under "
                f"client_dp each value is at most C plus the noise share, so set it to at least {needed:.3g}"
                f" (C + {SECAGG_NOISE_SIGMAS:g} share deviations)"
            )
    return found
