"""The files that ship inside the package: the example configs, `configs/` of the checkout.

The top-level `configs/` directory is also the package `secure_kd.resources.configs` (setup.py maps it
with `package_dir`; its YAML and JSONL files are package data in pyproject.toml), in a wheel and in an
editable install alike, so code finds a config through importlib.resources, never through where a
source file lies. Examples name each other as `configs/<name>` (an audit suite's `config_file:
configs/attacks/clone.yaml`): `packaged_config` turns such a name into the shipped file.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path, PurePosixPath

CONFIGS_PACKAGE = "secure_kd.resources.configs"
PREFIX = "configs"
SUFFIXES = (".yaml", ".jsonl")


def configs_dir() -> Path:
    """The directory of the packaged example configs."""
    root = files(CONFIGS_PACKAGE)
    if not isinstance(root, Path):  # a zip import: every supported install is unpacked on disk
        raise RuntimeError(f"the example configs are not on the file system ({root!r}); reinstall secure-kd")
    return root


def example_configs() -> list[str]:
    """Every packaged example, by its name under configs/ (`tiny.yaml`, `attacks/clone.yaml`), sorted."""
    root = configs_dir()
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES
    )


def packaged_config(name: str | Path) -> Path | None:
    """The packaged file behind `configs/<name>` or `<name>` (`tiny.yaml`); None if none is shipped.

    Only relative names inside configs/ resolve: `..` and absolute paths give None."""
    parts = PurePosixPath(Path(name).as_posix()).parts
    if parts[:1] == (PREFIX,):
        parts = parts[1:]
    if not parts or Path(name).is_absolute() or ".." in parts:
        return None
    path = configs_dir().joinpath(*parts)
    return path if path.is_file() and path.suffix in SUFFIXES else None
