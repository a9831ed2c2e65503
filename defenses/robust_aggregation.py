"""Robust aggregation against a malicious fedavg organization (`secure-kd defend robust_aggregation`).

Runs one federated setup through `federation.run.run_federation` for every (rule, attack) pair: rules are
`FederatedJob.aggregation` blocks (`mean`, coordinate-wise `trimmed_mean` and `median` of Yin et al.
2018, `norm_bounded` clipping of Sun et al. 2019; see `federation.server.strategies.robust`), attacks are
the federation's adversary roles (`federation.simulation.adversary`: `scale`, `sign_flip`, `backdoor`) or
none. It reports, per rule, the final test loss with no attacker (the cost of robustness when everyone is
honest, relative to `mean`) and under each attack, and the backdoor success rate of the global model.

These rules are plaintext-only heuristics: they bound the influence of a minority of clients on each
coordinate or on the update norm; they give no privacy guarantee and no formal robustness guarantee
for this non-convex model. Under `ckks` / `secagg+` only `aggregation.client_clip_norm` applies, which
honest clients follow and an attacker ignores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator

from defenses import DEFENSES
from federation.config import AggregationConfig, FederatedJob
from federation.roles import AdversaryConfig
from federation.simulation.adversary_eval import TINY_FEDERATION, run_and_measure
from secure_kd.plugins import Device, Plugin, PluginConfig, write_result


class RobustAggregationConfig(PluginConfig):
    out: str = "runs/defenses/robust_aggregation"
    device: Device = "cpu"
    federation: dict[str, Any] = Field(
        default_factory=lambda: dict(TINY_FEDERATION),
        description="a fedavg plaintext FederatedJob (without seed/out/device/adversaries/aggregation)",
    )
    rules: list[AggregationConfig] = Field(
        default_factory=lambda: [AggregationConfig(rule="mean"), AggregationConfig(rule="median")],
        min_length=1,
    )
    attacks: list[AdversaryConfig | None] = Field(
        default_factory=lambda: [None, AdversaryConfig(kind="sign_flip", boost=5.0)],
        min_length=1,
        description="null: all honest; otherwise the adversary role of `adversary_org`",
    )
    adversary_org: int = Field(-1, description="index of the malicious organization; -1: the last one")

    @property
    def adversary_index(self) -> int:
        return self.adversary_org % int(self.federation.get("n_organizations", 4))

    def job(self, rule: AggregationConfig, attack: AdversaryConfig | None, name: str) -> FederatedJob:
        fields = {
            **self.federation,
            "seed": self.seed,
            "device": self.device,
            "out": str(Path(self.out) / name),
            "aggregation": rule.model_dump(),
        }
        if attack is not None:
            fields["adversaries"] = {self.adversary_index: attack.model_dump()}
        return FederatedJob.model_validate(fields)

    @model_validator(mode="after")
    def _valid_jobs(self) -> RobustAggregationConfig:
        banned = {"seed", "out", "device", "adversaries", "aggregation"} & set(self.federation)
        if banned:
            raise ValueError(f"federation: drop {sorted(banned)}; they are set by the defense's own fields")
        for rule in self.rules:
            for attack in self.attacks:
                try:
                    self.job(rule, attack, "check")
                except ValueError as exc:
                    raise ValueError(f"federation / rules / attacks: {exc}") from exc
        return self


class Cell(BaseModel):
    rule: str
    attack: str
    test_loss: float
    perplexity: float
    honest_test_loss: float
    backdoor_asr: float | None = None
    seconds: float


class RobustAggregationResult(BaseModel):
    adversary_org: str
    cells: list[Cell]
    honest_cost: dict[str, float] = Field(description="rule -> honest test loss minus mean's (no attacker)")
    seconds: float


def _label(rule: AggregationConfig) -> str:
    return rule.rule if rule.client_clip_norm is None else f"{rule.rule}+client_clip"


def run(config: RobustAggregationConfig) -> RobustAggregationResult:
    started = time.perf_counter()
    cells: list[Cell] = []
    org = ""
    backdoors = [a for a in config.attacks if a is not None and a.kind == "backdoor"]
    for rule in config.rules:
        for attack in config.attacks:
            name = f"{_label(rule)}-{attack.kind if attack else 'none'}"
            job = config.job(rule, attack, name)
            org = job.org_name(config.adversary_index)
            # the honest run measures the backdoor baseline (how often the clean model says the target)
            probe = attack if attack is not None else (backdoors[0] if backdoors else None)
            measured = run_and_measure(job, probe, org)
            cells.append(Cell(rule=_label(rule), attack=attack.kind if attack else "none", **measured))
    honest = {c.rule: c.test_loss for c in cells if c.attack == "none"}
    reference = honest.get("mean")
    cost = {rule: loss - reference for rule, loss in honest.items()} if reference is not None else {}
    result = RobustAggregationResult(
        adversary_org=org, cells=cells, honest_cost=cost, seconds=time.perf_counter() - started
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "robust_aggregation",
    Plugin(
        name="robust_aggregation",
        Config=RobustAggregationConfig,
        Result=RobustAggregationResult,
        run=run,
        summary="trimmed mean / median / norm-bounded fedavg vs scale, sign-flip and backdoor organizations",
    ),
)
