"""What an audit writes to `<out>/results.json`: the result of each seed run, of each suite entry, and
of the whole audit (`AuditResult`).

Its own module so that the audit (`audit.py`, which writes it) and report.html (`html.py`, which reads
it back) both import it, and neither imports the other at load time.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from secure_kd.app.report import provenance
from secure_kd.app.report.config import Level, Threshold
from secure_kd.app.report.plan import Stage
from secure_kd.app.report.verdict import Measurement, RiskVerdict


class SeedRun(BaseModel):
    seed: int
    status: Literal["ok", "failed"]
    dir: str
    seconds: float
    resumed: bool = False
    stage: Stage | None = Field(None, description="where a failed run stopped: lookup, config or run")
    error: str | None = None
    result: dict[str, Any] | None = None


class EntryResult(BaseModel):
    id: str
    attack: str
    status: Literal["ok", "failed", "partial", "skipped"]
    runs: list[SeedRun]
    ran_on: str | None = Field(None, description="the model the attack actually attacked")
    in_verdict: bool = Field(True, description="False: it attacked something other than the audited model")
    reason: str | None = Field(None, description="why a skipped entry cannot apply to the audited model")

    def failure_line(self) -> str | None:
        """One line naming the attack, the stage and the cause of its first failed run."""
        failed = next((r for r in self.runs if r.status == "failed"), None)
        if failed is None:
            return None
        where = f"seed {failed.seed}, " if len(self.runs) > 1 else ""
        return f"{self.attack} (entry {self.id}, {where}stage {failed.stage or 'run'}): {failed.error}"


class AuditResult(BaseModel):
    kind: str = "audit"
    model: str | None
    teacher: str | None
    data: str | None
    entries: list[EntryResult]
    measurements: list[Measurement]
    verdicts: list[RiskVerdict]
    overall: Level | None
    failed: list[str]
    skipped: list[str] = []
    model_kind: str | None = None
    secrets: str | None = None
    config: dict[str, Any]
    provenance: dict[str, Any]
    privacy_ledger: list[provenance.PrivacyEntry]
    seconds: float
    thresholds: dict[str, Threshold] = Field(
        default_factory=dict, description="the bounds each measured metric was graded by"
    )
    one_run: list[dict[str, Any]] = Field(
        default_factory=list, description="one-run DP audits of runs with canaries (report/one_run.py)"
    )
    forecast: dict[str, Any] | None = Field(
        None,
        description="records the student is likely to memorize, before distillation (report/forecast.py)",
    )
    inheritance: dict[str, Any] | None = Field(
        None, description="teacher/student memorization per record (report/inheritance.py)"
    )
