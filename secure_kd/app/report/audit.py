"""`secure-kd audit`: run a suite of attacks against a model and give a verdict per risk.

Part of the app layer (`secure_kd/app/`), not the engine: it reaches the attacks only through
their registry (`attacks.get_attack(name)`, imported when an audit runs). The engine never imports it.

Each suite entry runs once per seed in `<out>/attacks/<id>/seed<k>/` (the attack writes its own
results.json there); `audit_run.json` next to it records the status, the exact attack config and,
for a failure, the stage (lookup, config, run) and the error. Before anything runs, every entry
is planned (`secure_kd.app.report.plan`): an entry that cannot apply to the audited model (the backdoor
on a causal LM, membership without non-members) is skipped with the reason, and is never a verdict
about another model; each entry that runs records the model it attacked (`ran_on`). A run that
crashes is reported as failed and the suite goes on. `resume`
skips runs whose audit_run.json says `ok` for the same config. `<out>/results.json` (the
`AuditResult`) is rewritten after every run, and `<out>/report.html` at the end.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from secure_kd.app.report import provenance
from secure_kd.app.report.config import AuditConfig, Level, SuiteEntry
from secure_kd.app.report.plan import EntryPlan, Stage, attack_config, check_suite, validation_message
from secure_kd.app.report.result import AuditResult, EntryResult, SeedRun
from secure_kd.app.report.verdict import (
    Measurement,
    combine_seeds,
    level_at_least,
    level_of,
    risk_verdicts,
    run_values,
)
from secure_kd.model_kind import model_kind
from secure_kd.paths import atomic_write_json
from secure_kd.plugins import Plugin, write_result
from secure_kd.readings import Reading

FAIL_EXIT = 3
INCOMPLETE_EXIT = 4


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

    def failed(stage: Stage, error: str) -> SeedRun:
        return SeedRun(
            seed=seed, status="failed", dir=str(run_dir), seconds=time.perf_counter() - started, stage=stage,
            error=error,
        )  # fmt: skip

    try:
        raw = attack_config(config, entry, seed, run_dir, plugin)
        cfg = plugin.Config.model_validate(raw)
    except ValidationError as exc:
        run = failed("config", validation_message(entry.attack, exc))
    except ValueError as exc:  # ConfigError: the entry's config_file is missing or not YAML
        run = failed("config", str(exc).replace("\n", " "))
    else:
        record["config"] = cfg.model_dump(mode="json")
        if resume and (done := _previous(run_dir, record["config"])) is not None:
            return done
        try:
            result = plugin.run(cfg).model_dump(mode="json")
            if not (run_dir / "results.json").is_file():
                write_result(run_dir, plugin.Result.model_validate(result))
            run = SeedRun(
                seed=seed, status="ok", dir=str(run_dir), seconds=time.perf_counter() - started, result=result
            )
        except Exception as exc:  # an attack's crash must not lose the rest of the suite
            run = failed("run", f"{type(exc).__name__}: {exc}")
            # The traceback names code lines only (no local variables, which may hold records).
            record["traceback"] = traceback.format_exc(limit=8)
    record.update(status=run.status, stage=run.stage, seconds=run.seconds, error=run.error)
    atomic_write_json(run_dir / "audit_run.json", record)
    return run


def measure(
    config: AuditConfig, entries: list[EntryResult], get_plugin: Callable[[str], Plugin]
) -> list[Measurement]:
    """Each entry's readings (its attack's registration says how), combined over seeds and graded."""
    measured = [e for e in entries if e.in_verdict and any(r.status == "ok" for r in e.runs)]
    plugins = {e.attack: get_plugin(e.attack) for e in measured}
    thresholds = config.all_thresholds(plugins.values())
    by_name = {e.name: e for e in config.suite}
    measurements = []
    for entry in measured:
        per_metric: dict[str, list[Reading]] = {}
        for run in entry.runs:
            if run.status != "ok" or run.result is None:
                continue
            values = run_values(
                plugins[entry.attack], run.result, by_name[entry.id].metrics,
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


def summarize(
    config: AuditConfig,
    entries: list[EntryResult],
    seconds: float,
    prov: dict,
    get_plugin: Callable[[str], Plugin],
) -> AuditResult:
    measurements = measure(config, entries, get_plugin)
    graded = config.all_thresholds(get_plugin(m.attack) for m in measurements)
    verdicts = risk_verdicts(measurements)
    overall = max((v.level for v in verdicts), key=("low", "medium", "high").index) if verdicts else None
    run_dirs = [
        d for d in (provenance.model_directory(config.model), provenance.model_directory(config.teacher)) if d
    ]
    ledger = provenance.privacy_ledger([*run_dirs, *config.runs], config.utility_key)
    return AuditResult(
        model=config.model, teacher=config.teacher, data=config.data, entries=entries,
        measurements=measurements, verdicts=verdicts, overall=overall,
        failed=[e.id for e in entries if e.status in ("failed", "partial")],
        skipped=[e.id for e in entries if e.status == "skipped"], model_kind=prov.get("model_kind"),
        secrets=config.secrets, config=config.model_dump(mode="json"), provenance=prov,
        privacy_ledger=ledger, seconds=seconds,
        thresholds={m.metric: graded[m.metric] for m in measurements},
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
    plans = check_suite(config, get_plugin)
    prov = {
        "versions": provenance.package_versions(),
        "git_commit": provenance.git_commit(),
        "asset_hashes": {
            role: provenance.asset_hashes(name)
            for role, name in (("model", config.model), ("teacher", config.teacher))
            if name is not None
        },
        "model_kind": model_kind(config.model) if config.model else None,
    }
    entries: list[EntryResult] = []
    total = sum(len(p.entry.seeds or [config.seed]) for p in plans if not p.skipped)
    with Progress(
        TextColumn("[bold]audit[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console or Console(stderr=True), disable=not config.progress,
    ) as bar:  # fmt: skip
        task = bar.add_task("", total=total)
        for plan in plans:
            entry = plan.entry
            runs = []
            if not plan.skipped:
                for seed in entry.seeds or [config.seed]:
                    bar.update(task, description=f"{entry.name} (seed {seed})")
                    if plan.plugin is None:
                        runs.append(
                            SeedRun(seed=seed, status="failed", dir="", seconds=0.0, stage=plan.stage,
                                    error=plan.error)
                        )  # fmt: skip
                    else:
                        runs.append(_run_once(plan.plugin, config, entry, seed, resume))
                    bar.advance(task)
                    partial = [*entries, _entry_result(plan, runs)]
                    elapsed = time.perf_counter() - started
                    write_result(out, summarize(config, partial, elapsed, prov, get_plugin))
            entries.append(_entry_result(plan, runs))
    result = summarize(config, entries, time.perf_counter() - started, prov, get_plugin)
    write_result(out, result)
    if render:
        from secure_kd.app.report.html import write_report

        write_report(out, result)
    return result


def _entry_result(plan: EntryPlan, runs: list[SeedRun]) -> EntryResult:
    entry = plan.entry
    if plan.skipped:
        return EntryResult(
            id=entry.name, attack=entry.attack, status="skipped", runs=[], reason=plan.skipped,
            in_verdict=False,
        )  # fmt: skip
    ok = sum(r.status == "ok" for r in runs)
    status = "ok" if ok == len(runs) else "failed" if ok == 0 else "partial"
    return EntryResult(
        id=entry.name, attack=entry.attack, status=status, runs=runs, ran_on=plan.ran_on,
        in_verdict=plan.in_verdict,
    )  # fmt: skip


def gate(result: AuditResult, fail_on: Level | None) -> tuple[int, list[str]]:
    """Exit code and the lines that explain it: 3 when a risk is at or above `fail_on`; 4 when an attack
    failed (with or without `fail_on`: the audit did not do what it was asked); else 0."""
    hits = [v for v in result.verdicts if fail_on is not None and level_at_least(v.level, fail_on)]
    if hits:
        return FAIL_EXIT, [
            f"audit gate: risk {v.risk} is {v.level} (at or above --fail-on {fail_on})" for v in hits
        ]
    failures = [line for e in result.entries if (line := e.failure_line())]
    listed = {e.id for e in result.entries}
    failures += [f"{name}: failed" for name in result.failed if name not in listed]
    if failures:
        head = f"no risk at or above --fail-on {fail_on}, but " if fail_on else ""
        return INCOMPLETE_EXIT, [
            f"audit incomplete: {head}these attacks failed: {', '.join(result.failed)}",
            *(f"  failed: {line}" for line in failures),
        ]
    return 0, []
