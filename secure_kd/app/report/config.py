"""`AuditConfig`: which attacks to run against which model, and the thresholds of each verdict.

A suite entry names an attack from the registry and gives its settings as an optional YAML file
(`config_file`, e.g. configs/attacks/membership.yaml) plus nested overrides (`config`). The audit
puts the audited model (or teacher), the data and the budget into the attack's own fields (the ones
its registration names: `secure_kd.plugins.Plugin.target` and `.inputs`), runs it once per seed and
keeps each run's Result.

Thresholds: each metric has a `medium` and a `high` bound. A value at or above `high` is high
risk, at or above `medium` (and below `high`) is medium, below `medium` is low; for metrics where
lower is worse (`higher_is_worse: false`) the comparisons flip. The defaults are secure-kd's own
choices, stated with their reason where each attack declares its metrics (`secure_kd.plugins.Metric`
in its registration; `default_thresholds()` collects them, plus `GENERIC_THRESHOLDS` for metrics any
plugin may report); change them in the config to match a policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from secure_kd.config import SCHEMA_VERSION, Strict
from secure_kd.plugins import Plugin

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


GENERIC_THRESHOLDS: dict[str, Threshold] = {  # metrics any plugin may report, whatever its registration
    "ece": Threshold(
        risk="calibration",
        medium=0.05,
        high=0.15,
        why="expected calibration error (Guo et al. 2017), reported by plugins that measure it",
    ),
}


def plugin_thresholds(plugins: Iterable[Plugin]) -> dict[str, Threshold]:
    """`GENERIC_THRESHOLDS` and the thresholds the plugins declare with their metrics. Two plugins may
    report one metric only with the same risk and bounds (a verdict must not depend on which ran)."""
    found = dict(GENERIC_THRESHOLDS)
    for plugin in plugins:
        for m in plugin.metrics:
            threshold = Threshold(
                risk=m.risk, medium=m.medium, high=m.high, higher_is_worse=m.higher_is_worse, unit=m.unit,
                why=m.why,
            )  # fmt: skip
            known = found.setdefault(m.name, threshold)
            bounds = ("risk", "medium", "high", "higher_is_worse")
            if any(getattr(known, b) != getattr(threshold, b) for b in bounds):
                raise ValueError(
                    f"metric {m.name!r} of {plugin.name} has other thresholds than another plugin's "
                    f"({threshold.risk} {threshold.medium}/{threshold.high} vs {known.risk} "
                    f"{known.medium}/{known.high}); give it its own name"
                )
    return found


def default_thresholds() -> dict[str, Threshold]:
    """What the audit grades by unless its config says otherwise: every registered attack's metrics."""
    from attacks import available_attacks, get_attack

    return plugin_thresholds(get_attack(name) for name in available_attacks())


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
        from secure_kd.model_kind import model_kind

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
        named = [name for entry in self.suite for name in entry.metrics]
        known = set(self.thresholds) | (set(default_thresholds()) if named else set(GENERIC_THRESHOLDS))
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

    def all_thresholds(self, plugins: Iterable[Plugin] = ()) -> dict[str, Threshold]:
        """The plugins' declared thresholds (`plugin_thresholds`) with this config's over them."""
        return {**plugin_thresholds(plugins), **self.thresholds}
