"""`AuditConfig`: which attacks to run against which model, and the thresholds of each verdict.

A suite entry names an attack from the registry and gives its settings as an optional YAML file
(`config_file`, e.g. configs/attacks/membership.yaml) plus nested overrides (`config`). The audit
puts the audited model (or teacher), the data and the budget into the attack's own fields (see
`secure_kd.app.report.audit.BINDINGS`), runs it once per seed and keeps each run's Result.

Thresholds: each metric has a `medium` and a `high` bound. A value at or above `high` is high
risk, at or above `medium` (and below `high`) is medium, below `medium` is low; for metrics where
lower is worse (`higher_is_worse: false`) the comparisons flip. The defaults below are
secure-kd's own choices, stated with their reason in `DEFAULT_THRESHOLDS`; change them in the
config to match a policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from secure_kd.config import SCHEMA_VERSION, Strict

Level = Literal["low", "medium", "high"]
LEVELS: tuple[Level, ...] = ("low", "medium", "high")


class Threshold(Strict):
    risk: str = Field(..., description="the risk this metric speaks to, e.g. membership")
    medium: float
    high: float
    higher_is_worse: bool = True
    unit: str = ""
    why: str = Field("", description="where the numbers come from (shown in the report)")

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.higher_is_worse and self.medium > self.high:
            raise ValueError(f"medium={self.medium} must be <= high={self.high} when higher_is_worse")
        if not self.higher_is_worse and self.medium < self.high:
            raise ValueError(f"medium={self.medium} must be >= high={self.high} when higher is better")
        return self


DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    "max_exposure_bits": Threshold(
        risk="memorization",
        medium=4.0,
        high=8.0,
        unit="bits",
        why="Secret Sharer exposure of the most exposed canary; 8 bits = it ranks in the top 1/256 "
        "of its secret space, 4 bits = top 1/16",
    ),
    "mia_auc": Threshold(
        risk="membership",
        medium=0.6,
        high=0.75,
        why="best ROC AUC over the membership attacks run (0.5 = guessing)",
    ),
    "mia_tpr_at_1pct_fpr": Threshold(
        risk="membership",
        medium=0.05,
        high=0.2,
        why="best TPR at 1% FPR (LiRA's low-FPR view; guessing gives 0.01)",
    ),
    "clone_agreement": Threshold(
        risk="model_extraction",
        medium=0.5,
        high=0.8,
        why="top-1 agreement of the best clone with the victim on held-out positions",
    ),
    "logit_leak_gap_decades": Threshold(
        risk="model_extraction",
        medium=1.0,
        high=2.0,
        unit="decades",
        why="drop of the logit spectrum at the hidden size; >= 2 decades recovers the width and the "
        "output projection (Carlini et al. 2024)",
    ),
    "backdoor_asr": Threshold(
        risk="backdoor",
        medium=0.2,
        high=0.5,
        why="attack success rate of the planted trigger after distillation (the backdoored teacher's "
        "when distillation is off)",
    ),
    "adversarial_success_rate": Threshold(
        risk="evasion",
        medium=0.3,
        high=0.7,
        why="share of correctly classified inputs flipped at the smallest radius attacked",
    ),
    "bias_student_rate": Threshold(
        risk="bias_injection",
        medium=0.02,
        high=0.1,
        why="share of a distilled student's answers in the poisoned topic that carry the injected "
        "brand or URL; a clean model almost never names it, so a few percent is already an injection",
    ),
    "poisoning_loss_increase": Threshold(
        risk="poisoning",
        medium=0.1,
        high=1.0,
        unit="nats",
        why="rise of the global model's test loss per token when one organization is malicious, "
        "against the same federation all honest",
    ),
    "update_token_recall": Threshold(
        risk="update_leakage",
        medium=0.1,
        high=0.5,
        why="share of the distinct tokens of one client's records that the server reads from one "
        "plaintext update (0 under ckks / secagg+, where it sees no update)",
    ),
    "ece": Threshold(
        risk="calibration",
        medium=0.05,
        high=0.15,
        why="expected calibration error (Guo et al. 2017), reported by plugins that measure it",
    ),
}


class SuiteEntry(Strict):
    attack: str = Field(..., description="a registered attack (`secure-kd attack list`)")
    id: str | None = Field(None, description="unique name in the suite; default: the attack name")
    config_file: str | None = Field(
        None,
        description="the attack's YAML (default: its built-in defaults); a relative configs/... path that is "
        "not in the working directory is the packaged example of that name",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="nested overrides of the attack config")
    target: Literal["model", "teacher", "none"] = Field(
        "model", description="which audited model goes into the attack's model field; none = keep its own"
    )
    budget: int | None = Field(None, gt=0, description="query budget, for attacks that have one")
    seeds: list[int] | None = Field(None, description="one run per seed; default: [audit seed]")
    metrics: dict[str, str] = Field(
        default_factory=dict, description="extra metric name -> dotted path into the attack's Result"
    )

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str | None) -> str | None:
        if value is not None and (not value or not all(c.isalnum() or c in "-_" for c in value)):
            raise ValueError(f"id {value!r} may only hold letters, digits, '-' and '_' (it names a folder)")
        return value

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("seeds must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
        return value

    @property
    def name(self) -> str:
        return self.id or self.attack


class AuditConfig(Strict):
    """`secure-kd audit`: run a suite of attacks against a model and write results.json + report.html.

    Without `suite`, the default suite for a causal LM and its training records runs
    (`secure_kd.app.report.suites.DEFAULT_LM_SUITE`, also written out as configs/audit-lm.yaml); it needs
    `model`.
    """

    kind: Literal["audit"] = "audit"
    schema_version: int = SCHEMA_VERSION
    seed: int = 0
    out: str = "runs/audit"
    model: str | None = Field(None, description="a local model directory or 'smollm2'; null: attacks' own")
    teacher: str | None = Field(None, description="optional teacher (entries with target: teacher)")
    data: str | None = Field(
        None, description="the records the model was trained on (.jsonl/.json/.csv/.parquet/.txt, `text`)"
    )
    secrets: str | None = Field(
        None, description="secrets to test for exposure: a .jsonl of {prefix, secret} (docs/audit.md)"
    )
    suite: list[SuiteEntry] = Field(
        ..., min_length=1, description="default: the causal-LM suite (configs/audit-lm.yaml); needs `model`"
    )
    thresholds: dict[str, Threshold] = Field(default_factory=dict, description="merged over the defaults")
    fail_on: Level | None = None
    runs: list[str] = Field(
        default_factory=list, description="run directories (results.json, privacy.json) for the ledger"
    )
    utility_key: str = Field(
        "student_after.perplexity", description="dotted path in a run's results.json for privacy/utility"
    )
    bootstrap_samples: int = Field(1000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_suite(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("suite") is None:
            if data.get("model") is None:
                raise ValueError(
                    "no suite and no model: give the model to audit (--model DIR, a Hugging Face causal LM "
                    "directory, or 'smollm2') to run the default suite, or a suite (--config "
                    "configs/audit.yaml runs each attack on a tiny target of its own)"
                )
            from secure_kd.app.report.suites import default_lm_suite

            data = {**data, "suite": default_lm_suite()}
        return data

    @field_validator("model", "teacher")
    @classmethod
    def _model_exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from secure_kd.app.report.targets import model_kind

        model_kind(value)  # raises NotAModelError (a ValueError) naming the path and the fix
        return value

    @field_validator("data", "secrets")
    @classmethod
    def _file_exists(cls, value: str | None, info) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(
                f"{info.field_name} file {value!r} does not exist (relative paths are from the current "
                "directory)"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> AuditConfig:
        names = [entry.name for entry in self.suite]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"suite ids must be unique; give `id:` to the repeated entries {duplicates}")
        known = set(DEFAULT_THRESHOLDS) | set(self.thresholds)
        for entry in self.suite:
            missing = sorted(set(entry.metrics) - known)
            if missing:
                raise ValueError(
                    f"suite entry {entry.name!r}: metrics {missing} have no threshold; add them under "
                    "`thresholds:` with risk, medium and high"
                )
            if entry.target == "teacher" and self.teacher is None:
                raise ValueError(f"suite entry {entry.name!r} has target: teacher but no `teacher` is given")
        return self

    def all_thresholds(self) -> dict[str, Threshold]:
        return {**DEFAULT_THRESHOLDS, **self.thresholds}
