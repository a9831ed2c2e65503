"""Defenses for distillation: each module registers a `Plugin` (secure_kd.plugins) by name.

Found without a list: every module of this package (a new defense is one new file), then the entry
points of the group `secure_kd.defenses` (a third-party package's defenses; docs/extending.md).
"""

from __future__ import annotations

from secure_kd.plugins import Discovery, Plugin
from secure_kd.registry import Registry

DEFENSES: Registry[Plugin] = Registry("defense")
GROUP = "secure_kd.defenses"
_found = Discovery(DEFENSES, __name__, GROUP)


def load_failures() -> dict[str, str]:
    """{entry point: error} of the third-party defenses that could not be loaded."""
    return _found.failures()


def get_defense(name: str) -> Plugin:
    return _found.get(name)


def available_defenses() -> list[str]:
    return _found.names()
