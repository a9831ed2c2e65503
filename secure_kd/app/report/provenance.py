"""What a reader needs to reproduce an audit: versions, the git commit, sha256 of the model files,
and the privacy ledger of DP runs (`privacy.json` in the model directory or in given run dirs)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

PACKAGES = (
    "secure-kd", "torch", "transformers", "numpy", "scikit-learn", "opacus", "tenseal", "flwr",
    "pydantic", "matplotlib",
)  # fmt: skip
HASHED_SUFFIXES = (".safetensors", ".json", ".gguf", ".bin", ".model", ".txt", ".pt")


class PrivacyEntry(BaseModel):
    source: str
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    steps: int | None
    sample_rate: float | None
    accountant: str | None
    utility: float | None = None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(directory: Path | None = None) -> str | None:
    where = directory or Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def model_directory(name: str | None) -> Path | None:
    """The local directory behind a model name ('smollm2' -> its converted asset), if it exists."""
    if name is None:
        return None
    if name == "smollm2":
        from secure_kd.assets import asset_dir

        path = asset_dir()
    else:
        path = Path(name)
    return path if path.is_dir() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_hashes(name: str | None) -> dict[str, str]:
    """sha256 of every weight/config/tokenizer file directly in the model's directory."""
    directory = model_directory(name)
    if directory is None:
        return {}
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name.endswith(HASHED_SUFFIXES)
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _dotted_number(data: dict[str, Any] | None, path: str) -> float | None:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def privacy_ledger(directories: list[str | Path], utility_key: str) -> list[PrivacyEntry]:
    """One entry per directory holding a privacy.json (DP run), with its utility if results.json has it."""
    entries = []
    for directory in directories:
        path = Path(directory)
        report = _read_json(path / "privacy.json")
        if report is None:
            continue
        results = _read_json(path / "results.json")

        def number(key: str, report: dict = report) -> float | None:
            value = report.get(key)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        steps = number("steps")
        entries.append(
            PrivacyEntry(
                source=str(path), epsilon=number("epsilon"), delta=number("delta"),
                noise_multiplier=number("noise_multiplier"), steps=None if steps is None else int(steps),
                sample_rate=number("sample_rate"), accountant=report.get("accountant"),
                utility=_dotted_number(results, utility_key),
            )
        )  # fmt: skip
    return entries
