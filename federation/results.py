"""`<out>/results.json` of `secure-kd federate`: per-round metrics, drops with reasons, per-client epsilon."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from secure_kd.config import SCHEMA_VERSION


class Dropped(BaseModel):
    org: str
    stage: str
    reason: str


class ClientRound(BaseModel):
    """What one organization reported in one round (rounded before it left the client)."""

    org: str
    metrics: dict[str, float] = Field(default_factory=dict)


class RoundRecord(BaseModel):
    round: int
    seconds: float
    answered: list[str]
    dropped: list[Dropped] = Field(default_factory=list)
    clients: list[ClientRound] = Field(default_factory=list)
    summary: dict[str, float] = Field(default_factory=dict, description="means over answering clients")
    aggregate: dict[str, Any] = Field(
        default_factory=dict, description="what the server aggregated or released"
    )
    bytes_up: int = 0
    bytes_down: int = 0


class FederatedResult(BaseModel):
    schema_version: int = SCHEMA_VERSION
    kind: str = "federate"
    run_id: int | None = Field(None, description="Flower's run id (organizations' error logs name it)")
    config: dict[str, Any]
    organizations: list[str]
    setup: dict[str, Any] = Field(default_factory=dict)
    rounds: list[RoundRecord] = Field(default_factory=list)
    final: RoundRecord | None = None
    epsilon: dict[str, float | None] = Field(
        default_factory=dict, description="per organization, its DP ledger"
    )
    client_dp: dict[str, Any] | None = Field(
        None, description="client-level DP (fedavg): the federation's accounting, as in <out>/privacy.json"
    )
    extra: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0
    completed: bool = False
    error: str | None = None


def summarize(clients: list[ClientRound], keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Mean of each metric over the clients that reported it."""
    names = keys or tuple(sorted({k for c in clients for k in c.metrics}))
    out = {}
    for name in names:
        values = [c.metrics[name] for c in clients if name in c.metrics]
        if values:
            out[name] = sum(values) / len(values)
    return out
