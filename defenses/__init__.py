"""Defenses for distillation: each module registers a `Plugin` (Config, run, Result) by name."""

from __future__ import annotations

import importlib

from secure_kd.plugins import Plugin
from secure_kd.registry import Registry

DEFENSES: Registry[Plugin] = Registry("defense")
# Modules that register themselves on import.
_MODULES = (
    "api_hardening",
    "backdoor_unlearning",
    "defensive_distillation",
    "adversarial_distillation",
    "trustworthy_students",
    "swing",
    "forgetting",
    "robust_aggregation",
)


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"defenses.{module}")


def get_defense(name: str) -> Plugin:
    _load_all()
    return DEFENSES.get(name)


def available_defenses() -> list[str]:
    _load_all()
    return DEFENSES.names()
