"""What every attack and defense provides: a pydantic `Config`, a `run(config) -> Result`, a name.

Attacks and defenses are siblings that never import each other; each package keeps a
`Registry[Plugin]` and the CLI/audit layer finds them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from secure_kd.config import SCHEMA_VERSION
from secure_kd.paths import atomic_write_json


@dataclass(frozen=True)
class Plugin:
    name: str
    Config: type[BaseModel]
    Result: type[BaseModel]
    run: Callable[[BaseModel], BaseModel]
    summary: str


def write_result(out: str | Path, result: BaseModel) -> Path:
    """`<out>/results.json` with the schema version, written atomically, 0600 (an attack's or a defense's
    results carry what it extracted from, or measured on, a model and its private data)."""
    path = Path(out) / "results.json"
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, **result.model_dump(mode="json")}, mode=0o600)
    return path
