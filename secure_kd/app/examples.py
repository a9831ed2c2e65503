"""`secure-kd examples`: the example configs that ship inside the package, listed or copied out.

A wheel install has no checkout: `secure-kd examples` says where the packaged configs are, and
`secure-kd examples --copy DIR` writes them to DIR/configs/ (the names the examples use for each other,
so `cd DIR && secure-kd audit --config configs/audit.yaml` works), refusing to overwrite a file.
"""

from __future__ import annotations

from pathlib import Path

from secure_kd.paths import atomic_write_bytes
from secure_kd.resources import PREFIX, configs_dir, example_configs


def listing() -> list[str]:
    """The lines `secure-kd examples` prints: where the examples are, then each one's name."""
    return [f"# {configs_dir()}", *(f"{PREFIX}/{name}" for name in example_configs())]


def copy_examples(dest: str | Path) -> list[Path]:
    """Write every packaged example to `dest`/configs/; nothing is written if any target exists."""
    root, target = configs_dir(), Path(dest) / PREFIX
    names = example_configs()
    existing = [target / name for name in names if (target / name).exists()]
    if existing:
        raise ValueError(
            f"{existing[0]} exists ({len(existing)} of the {len(names)} example files do): "
            "give --copy an empty or new directory, or move those files away first"
        )
    written = []
    for name in names:
        atomic_write_bytes(target / name, (root / name).read_bytes(), mode=0o644)
        written.append(target / name)
    return written
