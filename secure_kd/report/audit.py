"""`secure-kd audit`: run a suite of attacks against a model and give a verdict per risk.

This module is the audit layer, not the engine: it is the one place under `secure_kd/` that
reaches the attacks, and only through their registry (`attacks.get_attack(name)`, imported when
an audit runs). The engine proper never imports it.

Each suite entry runs once per seed in `<out>/attacks/<id>/seed<k>/` (the attack writes its own
results.json there); `audit_run.json` next to it records the status, the exact attack config and,
for a failure, the error. A failed run is reported as failed and the suite goes on. `resume`
skips runs whose audit_run.json says `ok` for the same config. `<out>/results.json` (the
`AuditResult`) is rewritten after every run, and `<out>/report.html` at the end.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from secure_kd.config import read_yaml
from secure_kd.paths import atomic_write_json
from secure_kd.plugins import Plugin, write_result
from secure_kd.report import provenance
from secure_kd.report.config import AuditConfig, Level, SuiteEntry
from secure_kd.report.verdict import (
    Measurement,
    RiskVerdict,
    RunValue,
    combine_seeds,
    level_at_least,
    level_of,
    risk_verdicts,
    run_values,
)

# Where the audited model, data and budget go in each attack's config (dotted paths).
BINDINGS: dict[str, dict[str, str]] = {
    "memorization": {"model": "model.source", "data": "data.source"},
    "membership": {"model": "target.source"},
    "logit_leak": {"model": "victim.source", "budget": "max_queries"},
    "clone": {"model": "victim.source", "budget": "query_budget"},
    "adversarial": {"model": "model"},
}
# These fields take a directory, not the 'smollm2' asset name.
_DIRECTORY_FIELDS = {"model.source", "target.source", "model"}
FAIL_EXIT = 3
INCOMPLETE_EXIT = 4


class SeedRun(BaseModel):
    seed: int
    status: Literal["ok", "failed"]
    dir: str
    seconds: float
    resumed: bool = False
    error: str | None = None
    result: dict[str, Any] | None = None


class EntryResult(BaseModel):
    id: str
    attack: str
    status: Literal["ok", "failed", "partial"]
    runs: list[SeedRun]


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
    config: dict[str, Any]
    provenance: dict[str, Any]
    privacy_ledger: list[provenance.PrivacyEntry]
    seconds: float


def _set_dotted(data: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def attack_config(config: AuditConfig, entry: SuiteEntry, seed: int, out: Path) -> dict[str, Any]:
    """The attack's config dict: its file, the entry's overrides, the audited model/data/budget, seed, out."""
    data = read_yaml(entry.config_file) if entry.config_file else {}
    data = _merge(data, entry.config)
    binding = BINDINGS.get(entry.attack, {})
    model = {"model": config.model, "teacher": config.teacher, "none": None}[entry.target]
    if model is not None and "model" in binding:
        field = binding["model"]
        if model == "smollm2" and field in _DIRECTORY_FIELDS:
            model = str(provenance.model_directory("smollm2") or model)
        _set_dotted(data, field, model)
    if config.data is not None and "data" in binding:
        _set_dotted(data, binding["data"], config.data)
    if entry.budget is not None and "budget" in binding:
        _set_dotted(data, binding["budget"], entry.budget)
    data["seed"], data["out"] = seed, str(out)
    return data


def _previous(run_dir: Path, config_json: dict) -> SeedRun | None:
    import json

    try:
        record = json.loads((run_dir / "audit_run.json").read_text(encoding="utf-8"))
        result = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("status") != "ok" or record.get("config") != config_json:
        return None
    result.pop("schema_version", None)
    return SeedRun(
        seed=record["seed"],
        status="ok",
        dir=str(run_dir),
        seconds=record["seconds"],
        resumed=True,
        result=result,
    )


def _run_once(plugin: Plugin, config: AuditConfig, entry: SuiteEntry, seed: int, resume: bool) -> SeedRun:
    run_dir = Path(config.out) / "attacks" / entry.name / f"seed{seed}"
    started = time.perf_counter()
    record: dict[str, Any] = {"attack": entry.attack, "seed": seed}
    try:
        raw = attack_config(config, entry, seed, run_dir)
        cfg = plugin.Config.model_validate(raw)
        record["config"] = cfg.model_dump(mode="json")
        if resume and (done := _previous(run_dir, record["config"])) is not None:
            return done
        result = plugin.run(cfg).model_dump(mode="json")
        if not (run_dir / "results.json").is_file():
            write_result(run_dir, plugin.Result.model_validate(result))
        run = SeedRun(
            seed=seed, status="ok", dir=str(run_dir), seconds=time.perf_counter() - started, result=result
        )
    except ValidationError as exc:
        error = f"invalid {entry.attack} config: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        run = SeedRun(
            seed=seed, status="failed", dir=str(run_dir), seconds=time.perf_counter() - started, error=error
        )
    except Exception as exc:  # an attack's crash must not lose the rest of the suite
        run = SeedRun(
            seed=seed, status="failed", dir=str(run_dir), seconds=time.perf_counter() - started,
            error=f"{type(exc).__name__}: {exc}",
        )  # fmt: skip
        record["traceback"] = traceback.format_exc(limit=8)
    record.update(status=run.status, seconds=run.seconds, error=run.error)
    atomic_write_json(run_dir / "audit_run.json", record)
    return run


def measure(config: AuditConfig, entries: list[EntryResult]) -> list[Measurement]:
    thresholds = config.all_thresholds()
    by_name = {e.name: e for e in config.suite}
    measurements = []
    for entry in entries:
        per_metric: dict[str, list[RunValue]] = {}
        for run in entry.runs:
            if run.status != "ok" or run.result is None:
                continue
            values = run_values(
                entry.attack, run.result, by_name[entry.id].metrics,
                samples=config.bootstrap_samples, confidence=config.confidence,
            )  # fmt: skip
            for metric, value in values.items():
                per_metric.setdefault(metric, []).append(value)
        for metric, values in per_metric.items():
            if metric not in thresholds:
                continue
            combined = combine_seeds(values, samples=config.bootstrap_samples, confidence=config.confidence)
            threshold = thresholds[metric]
            measurements.append(
                Measurement(
                    entry=entry.id, attack=entry.attack, metric=metric, risk=threshold.risk,
                    value=combined.value, ci_low=combined.ci_low, ci_high=combined.ci_high,
                    ci_method=combined.ci_method, n_seeds=len(values), note=combined.note,
                    level=level_of(combined.value, threshold),
                )
            )  # fmt: skip
    return measurements


def summarize(config: AuditConfig, entries: list[EntryResult], seconds: float, prov: dict) -> AuditResult:
    measurements = measure(config, entries)
    verdicts = risk_verdicts(measurements)
    overall = max((v.level for v in verdicts), key=("low", "medium", "high").index) if verdicts else None
    run_dirs = [
        d for d in (provenance.model_directory(config.model), provenance.model_directory(config.teacher)) if d
    ]
    ledger = provenance.privacy_ledger([*run_dirs, *config.runs], config.utility_key)
    return AuditResult(
        model=config.model, teacher=config.teacher, data=config.data, entries=entries,
        measurements=measurements, verdicts=verdicts, overall=overall,
        failed=[e.id for e in entries if e.status != "ok"], config=config.model_dump(mode="json"),
        provenance=prov, privacy_ledger=ledger, seconds=seconds,
    )  # fmt: skip


def run_audit(
    config: AuditConfig,
    *,
    resume: bool = False,
    get_plugin: Callable[[str], Plugin] | None = None,
    console: Console | None = None,
    render: bool = True,
) -> AuditResult:
    """Run every suite entry (once per seed), keep going past failures, write results.json and report.html."""
    if get_plugin is None:
        from attacks import get_attack as get_plugin
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "audit_config.json", config.model_dump(mode="json"))
    started = time.perf_counter()
    prov = {
        "versions": provenance.package_versions(),
        "git_commit": provenance.git_commit(),
        "asset_hashes": {
            role: provenance.asset_hashes(name)
            for role, name in (("model", config.model), ("teacher", config.teacher))
            if name is not None
        },
    }
    entries: list[EntryResult] = []
    total = sum(len(e.seeds or [config.seed]) for e in config.suite)
    with Progress(
        TextColumn("[bold]audit[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console or Console(stderr=True), disable=not config.progress,
    ) as bar:  # fmt: skip
        task = bar.add_task("", total=total)
        for entry in config.suite:
            runs = []
            for seed in entry.seeds or [config.seed]:
                bar.update(task, description=f"{entry.name} (seed {seed})")
                try:
                    plugin = get_plugin(entry.attack)
                except KeyError as exc:
                    runs.append(SeedRun(seed=seed, status="failed", dir="", seconds=0.0, error=str(exc)))
                else:
                    runs.append(_run_once(plugin, config, entry, seed, resume))
                bar.advance(task)
                partial = [*entries, _entry_result(entry, runs)]
                write_result(out, summarize(config, partial, time.perf_counter() - started, prov))
            entries.append(_entry_result(entry, runs))
    result = summarize(config, entries, time.perf_counter() - started, prov)
    write_result(out, result)
    if render:
        from secure_kd.report.html import write_report

        write_report(out, result)
    return result


def _entry_result(entry: SuiteEntry, runs: list[SeedRun]) -> EntryResult:
    ok = sum(r.status == "ok" for r in runs)
    status = "ok" if ok == len(runs) else "failed" if ok == 0 else "partial"
    return EntryResult(id=entry.name, attack=entry.attack, status=status, runs=runs)


def gate(result: AuditResult, fail_on: Level | None) -> tuple[int, list[str]]:
    """Exit code and the lines that explain it: 3 when a risk is at or above `fail_on`, 4 when none
    is but an attack failed (the gate cannot vouch for what did not run), else 0."""
    if fail_on is None:
        return 0, []
    hits = [v for v in result.verdicts if level_at_least(v.level, fail_on)]
    if hits:
        return FAIL_EXIT, [
            f"audit gate: risk {v.risk} is {v.level} (at or above --fail-on {fail_on})" for v in hits
        ]
    if result.failed:
        return INCOMPLETE_EXIT, [
            f"audit gate: no risk at or above {fail_on}, but these attacks failed: {', '.join(result.failed)}"
        ]
    return 0, []
