"""Attacks on distillation: each module registers a `Plugin` (secure_kd.plugins) by name.

Found without a list: every module of this package (a new attack is one new file), then the entry
points of the group `secure_kd.attacks` (a third-party package's attacks; docs/extending.md).
"""

from __future__ import annotations

from secure_kd.plugins import Discovery, Plugin
from secure_kd.registry import Registry

ATTACKS: Registry[Plugin] = Registry("attack")
GROUP = "secure_kd.attacks"
_found = Discovery(ATTACKS, __name__, GROUP)


def load_failures() -> dict[str, str]:
    """{entry point: error} of the third-party attacks that could not be loaded."""
    return _found.failures()


def get_attack(name: str) -> Plugin:
    return _found.get(name)


def available_attacks() -> list[str]:
    return _found.names()
