"""The one contract of every attack and defense, and how the CLI and the audit find them.

A plugin is one module that registers a `Plugin` in its package's registry (`attacks.ATTACKS`,
`defenses.DEFENSES`): its `Config` (a subclass of `PluginConfig`: seed, device, out, plus its own
fields, strict), its `Result` (pydantic, written to `<out>/results.json` by `write_result`), `run(config)
-> Result`, a one-line summary, and what the CLI and the audit need to know about it, so that a new
plugin needs no edit anywhere else:

- `target`: the dotted field of its Config that takes the model it works on (the audited model for an
  attack, the user's model or job for a defense); None: it builds and works on its own (`own_target`
  says what), and the audit never makes its verdict about a given model.
- `kinds`: what that field takes (`TARGET_KINDS`: the model kinds of `secure_kd.model_kind`, a distill
  job's YAML, a served model); the audit skips an entry whose model is of another kind, with the reason.
- `inputs`: role -> `Input(field, also)`: where the audit's `--data` file (`data`), `--secrets` file
  (`secrets`) and an entry's `budget` go.
- `with_model`: defaults that only fit its own target, reset once a given model goes in.
- `requires`: fields that must be set once a given model goes in (the audit skips with the reason).
- `metrics`: the `Metric`s it reports (name, risk, the audit's default thresholds and why) and
  `measure(result, samples, confidence) -> {metric: Reading}`; without `measure`, each metric's `path`
  is read from the result (a number, no interval).

Discovery (`Discovery`, once, on the first lookup): every module of the package is imported (pkgutil;
modules whose name starts with `_` are helpers and skipped), so an in-tree plugin is one new file;
then every entry point of the group `secure_kd.attacks` / `secure_kd.defenses` (importlib.metadata) is
loaded: a `Plugin` object is registered, a module registers itself on import (or through its `PLUGIN`).
A third-party plugin that fails to load is reported by name with its error, and the others still load.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, Field

from secure_kd.config import SCHEMA_VERSION, Strict
from secure_kd.model_kind import MODEL_KINDS
from secure_kd.paths import atomic_write_json
from secure_kd.readings import Reading
from secure_kd.registry import Registry, UnknownNameError

Device = Literal["auto", "cpu", "cuda"]
TARGET_KINDS = (*MODEL_KINDS, "distill_job", "served")
AUDIT_ROLES = ("data", "secrets", "budget")


class PluginConfig(Strict):
    """The fields every attack and defense config has; a plugin's Config subclasses it (strict, too)."""

    seed: int = Field(0, description="seeds torch, numpy, random and the plugin's own generators")
    device: Device = "auto"
    out: str = Field("runs/plugin", description="results.json and everything else the plugin writes")


@dataclass(frozen=True)
class Input:
    """Where a role's value goes in the Config (`field`), and fixed values set with it (`also`)."""

    field: str
    also: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirement:
    """Once a given model goes in, `field` must not be one of `unset`; `reason` says what to give."""

    field: str
    unset: tuple[Any, ...]
    reason: str


@dataclass(frozen=True)
class Metric:
    """A metric the plugin reports: the risk it speaks to and the audit's default thresholds for it."""

    name: str
    risk: str
    medium: float
    high: float
    why: str
    higher_is_worse: bool = True
    unit: str = ""
    path: str | None = None  # dotted path of a number in the Result, when the plugin has no `measure`


Measure = Callable[[dict[str, Any], int, float], dict[str, Reading]]


@dataclass(frozen=True)
class Plugin:
    name: str
    Config: type[PluginConfig]
    Result: type[BaseModel]
    run: Callable[[Any], BaseModel]
    summary: str
    target: str | None = None
    kinds: tuple[str, ...] = ()
    own_target: str = "a target it builds itself"
    inputs: dict[str, Input] = field(default_factory=dict)
    with_model: dict[str, Any] = field(default_factory=dict)
    requires: tuple[Requirement, ...] = ()
    metrics: tuple[Metric, ...] = ()
    measure: Measure | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.Config, type) and issubclass(self.Config, PluginConfig)):
            problems.append("Config must subclass secure_kd.plugins.PluginConfig (seed, device, out)")
        if (self.target is None) != (not self.kinds):
            problems.append("give `kinds` exactly when a `target` field is given")
        if unknown := sorted(set(self.kinds) - set(TARGET_KINDS)):
            problems.append(f"unknown kinds {unknown}; known: {', '.join(TARGET_KINDS)}")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            problems.append(f"metric names repeat: {names}")
        if self.measure is None and (pathless := [m.name for m in self.metrics if m.path is None]):
            problems.append(f"metrics {pathless} need a `path` or the plugin a `measure`")
        if problems:
            raise ValueError(f"plugin {self.name!r}: " + "; ".join(problems))


def write_result(out: str | Path, result: BaseModel) -> Path:
    """`<out>/results.json` with the schema version, written atomically, 0600 (an attack's or a defense's
    results carry what it extracted from, or measured on, a model and its private data)."""
    path = Path(out) / "results.json"
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, **result.model_dump(mode="json")}, mode=0o600)
    return path


def discover(registry: Registry[Plugin], package: ModuleType, group: str) -> dict[str, str]:
    """Import every plugin module of `package` and load the entry points of `group` into `registry`.

    Returns {entry point: error} for the third-party plugins that failed to load (in-tree modules
    raise: a broken built-in is a bug to see, not to skip)."""
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    failures: dict[str, str] = {}
    for point in entry_points(group=group):
        try:
            loaded = point.load()
            plugin = getattr(loaded, "PLUGIN", loaded) if isinstance(loaded, ModuleType) else loaded
            if isinstance(plugin, Plugin):
                registry.register(plugin.name, plugin)
            elif not isinstance(loaded, ModuleType):
                raise TypeError(f"{point.value} is a {type(loaded).__name__}, not a Plugin or a module")
        except Exception as exc:  # a broken third-party plugin must not hide the others
            failures[point.name] = f"{point.value}: {type(exc).__name__}: {exc}"
    return failures


class Discovery:
    """A package's plugins, discovered once on the first lookup (`discover`): what `attacks` and
    `defenses` expose as get_attack/available_attacks and get_defense/available_defenses."""

    def __init__(self, registry: Registry[Plugin], package: str, group: str) -> None:
        self.registry, self.package, self.group = registry, package, group
        self._failures: dict[str, str] | None = None

    def failures(self) -> dict[str, str]:
        """{entry point: error} of the third-party plugins that could not be loaded."""
        if self._failures is None:
            self._failures = {}  # set first: a plugin module importing its package must not recurse
            try:
                self._failures = discover(self.registry, importlib.import_module(self.package), self.group)
            except BaseException:
                self._failures = None
                raise
        return self._failures

    def get(self, name: str) -> Plugin:
        failures = self.failures()
        if name in failures and name not in self.registry:
            raise UnknownNameError(f"{self.registry.kind} {name!r} failed to load: {failures[name]}")
        return self.registry.get(name)

    def names(self) -> list[str]:
        self.failures()
        return self.registry.names()
