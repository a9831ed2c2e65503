"""From an `AuditConfig` to what each suite entry will do: run (with which attack config, on which
model), be skipped (the attack cannot apply to the audited model, and why), or fail before anything
runs (an unknown attack name, a key typo, a missing file: the stage and the cause).

`check_suite` is what `secure-kd validate` and `secure-kd audit` run before any attack starts, so a
typo in the last entry does not surface after the first ten minutes. Everything here reads the attack's
registration (`secure_kd.plugins.Plugin`), never a table of attack names: the attack configs are built
by `attack_config`: the entry's YAML file, then (when a real model goes in) the defaults that only fit
the attack's own target are reset (`Plugin.with_model`: e.g. the tiny tokenizer of a model it would
train itself), then the entry's own overrides, then the audited model (into `Plugin.target`), records,
secrets and budget (into `Plugin.inputs`). `skip_reason` says why an entry cannot apply to the audited
model (no target field, another model kind, a `Plugin.requires` unmet); `ran_on` what a run attacked.
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
from secure_kd.config import ConfigError, read_yaml
from secure_kd.model_kind import model_kind
from secure_kd.plugins import Plugin
from secure_kd.resources import packaged_config

Stage = Literal["lookup", "config", "run"]
# Values of a target field that mean "build your own".
_OWN_VALUES = (None, "train", "tiny")


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


def attack_config(
    config: AuditConfig, entry: SuiteEntry, seed: int, out: Path, plugin: Plugin
) -> dict[str, Any]:
    """The attack's config dict: its file, the entry's overrides, the audited model/data/budget, seed, out."""
    data = read_yaml(suite_config_file(entry.config_file)) if entry.config_file else {}
    model = audited_model(config, entry)
    takes_model = model is not None and plugin.target is not None
    if takes_model:
        for field, value in plugin.with_model.items():
            _set_dotted(data, field, value)
    data = _merge(data, entry.config)
    if takes_model:
        # the converted SmolLM2 directory: what 'smollm2' loads, and a name every target field takes
        _set_dotted(data, plugin.target, str(provenance.model_directory(model) or model))
    if entry.target != "none":
        for role, value in (("data", config.data), ("secrets", config.secrets)):
            if value is not None and role in plugin.inputs:
                _set_input(data, plugin, role, value)
    if entry.budget is not None and "budget" in plugin.inputs:
        _set_input(data, plugin, "budget", entry.budget)
    data["seed"], data["out"] = seed, str(out)
    return data


def _set_input(data: dict, plugin: Plugin, role: str, value: Any) -> None:
    given = plugin.inputs[role]
    for field, fixed in given.also.items():
        _set_dotted(data, field, fixed)
    _set_dotted(data, given.field, value)


def dotted_get(data: dict, path: str, default: Any = None) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def skip_reason(plugin: Plugin, audited: str | None, kind: str | None, raw: dict[str, Any]) -> str | None:
    """Why this entry cannot run against `audited` (None: it can). `raw` is its attack config as built."""
    if audited is None:
        return None
    if plugin.target is None:
        return (
            f"{plugin.name} has no field for the audited model: it attacks {plugin.own_target}, so its "
            f"verdict would not be about {audited}. Set `target: none` on the entry to run it on its own "
            "target anyway"
        )
    if kind not in plugin.kinds:
        return f"{plugin.name} attacks a {' or '.join(plugin.kinds)}; {audited} is a {kind}"
    for requirement in plugin.requires:
        if dotted_get(raw, requirement.field) in requirement.unset:
            return requirement.reason
    return None


def ran_on(plugin: Plugin, validated: dict[str, Any], audited: dict[str, str | None]) -> tuple[str, bool]:
    """(what the run attacked, whether that is one of the audited models) from its validated config."""
    if plugin.target is None:
        return plugin.own_target, False
    value = dotted_get(validated, plugin.target)
    for role, name in audited.items():
        if name is None or value is None:
            continue
        directory = provenance.model_directory(name)
        names = [name] if directory is None else [name, str(directory)]
        if any(_same_model(str(value), candidate) for candidate in names):
            return f"{name} (the audited {role})", True
    if value in _OWN_VALUES:
        return plugin.own_target, False
    return f"{value} (set in the entry's own config)", False


def _same_model(value: str, name: str) -> bool:
    if value == name:
        return True
    try:
        return Path(value).resolve() == Path(name).resolve()
    except OSError:
        return False


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
        out = Path(config.out) / "attacks" / entry.name / f"seed{seed}"
        raw = attack_config(config, entry, seed, out, plugin)
    except ConfigError as exc:
        plan.stage, plan.error = "config", str(exc).replace("\n", " ")
        return plan
    plan.skipped = skip_reason(plugin, audited, model_kind(audited) if audited else None, raw)
    if plan.skipped:
        return plan
    try:
        validated = plugin.Config.model_validate(raw).model_dump(mode="json")
    except ValidationError as exc:
        plan.stage, plan.error = "config", validation_message(entry.attack, exc)
        return plan
    audited_models = {"model": config.model, "teacher": config.teacher}
    plan.ran_on, is_audited = ran_on(plugin, validated, audited_models)
    # With a model under audit, only runs on it (or on the teacher) make its verdict.
    plan.in_verdict = is_audited or (config.model is None and config.teacher is None)
    return plan


def check_suite(config: AuditConfig, get_plugin: Callable[[str], Plugin] | None = None) -> list[EntryPlan]:
    """Every entry's plan; the ones with a `problem` would fail before running."""
    if get_plugin is None:
        from attacks import get_attack as get_plugin
    return [plan_entry(config, entry, get_plugin) for entry in config.suite]
