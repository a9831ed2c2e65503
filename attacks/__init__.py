"""Attacks on distillation: each module registers a `Plugin` (Config, run, Result) by name."""

from __future__ import annotations

import importlib

from secure_kd.plugins import Plugin
from secure_kd.registry import Registry

ATTACKS: Registry[Plugin] = Registry("attack")
# Modules that register themselves on import.
_MODULES = (
    "logit_leak",
    "clone",
    "memorization",
    "membership",
    "backdoor",
    "adversarial",
    "bias_cascade",
    "federated",
)


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"attacks.{module}")


def get_attack(name: str) -> Plugin:
    _load_all()
    return ATTACKS.get(name)


def available_attacks() -> list[str]:
    _load_all()
    return ATTACKS.names()
