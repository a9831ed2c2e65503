"""From an `AuditConfig` to what each suite entry will do: run (with which attack config, on which
model), be skipped (the attack cannot apply to the audited model, and why), or fail before anything
runs (an unknown attack name, a key typo, a missing file: the stage and the cause).

`check_suite` is what `secure-kd validate` and `secure-kd audit` run before any attack starts, so a
typo in the last entry does not surface after the first ten minutes. The attack configs are built by
`attack_config`: the entry's YAML file, then (when a real model goes in) the defaults that only fit
the attack's own target are reset (`Binding.with_model`: e.g. the tiny tokenizer of a model it would
train itself), then the entry's own overrides, then the audited model, records, secrets and budget.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from secure_kd.app.report import provenance
from secure_kd.app.report.config import AuditConfig, SuiteEntry
from secure_kd.app.report.targets import BINDINGS, DATA, model_kind, ran_on, skip_reason
from secure_kd.config import ConfigError, read_yaml
from secure_kd.plugins import Plugin
from secure_kd.resources import packaged_config

# These fields take a directory, not the 'smollm2' asset name.
_DIRECTORY_FIELDS = {"model.source", "target.source", "model"}
Stage = Literal["lookup", "config", "run"]


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


def suite_config_file(name: str) -> Path:
    """An entry's `config_file`: as given (absolute, or relative to the working directory); a relative
    `configs/...` name that is not there is the packaged example of that name (secure_kd.resources), so
    a packaged audit config validates and runs from any directory."""
    path = Path(name)
    if path.is_absolute() or path.exists():
        return path
    return packaged_config(path) or path


def audited_model(config: AuditConfig, entry: SuiteEntry) -> str | None:
    return {"model": config.model, "teacher": config.teacher, "none": None}[entry.target]


def attack_config(config: AuditConfig, entry: SuiteEntry, seed: int, out: Path) -> dict[str, Any]:
    """The attack's config dict: its file, the entry's overrides, the audited model/data/budget, seed, out."""
    data = read_yaml(suite_config_file(entry.config_file)) if entry.config_file else {}
    binding = BINDINGS.get(entry.attack)
    model = audited_model(config, entry)
    takes_model = model is not None and binding is not None and binding.model is not None
    if takes_model:
        for field, value in binding.with_model.items():
            _set_dotted(data, field, value)
    data = _merge(data, entry.config)
    if takes_model:
        if model == "smollm2" and binding.model in _DIRECTORY_FIELDS:
            model = str(provenance.model_directory("smollm2") or model)
        _set_dotted(data, binding.model, model)
    if binding is not None and entry.target != "none":
        if config.data is not None:
            for field, value in binding.data.items():
                _set_dotted(data, field, config.data if value is DATA else value)
        if config.secrets is not None and binding.secrets is not None:
            _set_dotted(data, binding.secrets, config.secrets)
    if entry.budget is not None and binding is not None and binding.budget is not None:
        _set_dotted(data, binding.budget, entry.budget)
    data["seed"], data["out"] = seed, str(out)
    return data


def validation_message(attack: str, exc: ValidationError) -> str:
    return f"invalid {attack} config: " + "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


@dataclass
class EntryPlan:
    entry: SuiteEntry
    plugin: Plugin | None = None
    skipped: str | None = None  # why it cannot apply to the audited model
    stage: Stage | None = None  # where it failed before running
    error: str | None = None
    ran_on: str | None = None
    in_verdict: bool = True  # False: it attacks something other than the audited model

    @property
    def problem(self) -> str | None:
        if self.error is None:
            return None
        return f"suite entry {self.entry.name!r} ({self.entry.attack}) failed at {self.stage}: {self.error}"


def plan_entry(config: AuditConfig, entry: SuiteEntry, get_plugin: Callable[[str], Plugin]) -> EntryPlan:
    try:
        plugin = get_plugin(entry.attack)
    except KeyError as exc:
        return EntryPlan(entry, stage="lookup", error=str(exc).strip("'\""))
    plan = EntryPlan(entry, plugin)
    audited = audited_model(config, entry)
    seed = (entry.seeds or [config.seed])[0]
    try:
        raw = attack_config(config, entry, seed, Path(config.out) / "attacks" / entry.name / f"seed{seed}")
    except ConfigError as exc:
        plan.stage, plan.error = "config", str(exc).replace("\n", " ")
        return plan
    plan.skipped = skip_reason(entry.attack, audited, model_kind(audited) if audited else None, raw)
    if plan.skipped:
        return plan
    try:
        validated = plugin.Config.model_validate(raw).model_dump(mode="json")
    except ValidationError as exc:
        plan.stage, plan.error = "config", validation_message(entry.attack, exc)
        return plan
    audited_models = {"model": config.model, "teacher": config.teacher}
    plan.ran_on, is_audited = ran_on(entry.attack, validated, audited_models)
    # With a model under audit, only runs on it (or on the teacher) make its verdict.
    plan.in_verdict = is_audited or (config.model is None and config.teacher is None)
    return plan


def check_suite(config: AuditConfig, get_plugin: Callable[[str], Plugin] | None = None) -> list[EntryPlan]:
    """Every entry's plan; the ones with a `problem` would fail before running."""
    if get_plugin is None:
        from attacks import get_attack as get_plugin
    return [plan_entry(config, entry, get_plugin) for entry in config.suite]
