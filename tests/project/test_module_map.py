"""docs/modules.md lists every module of the five packages, and nothing that no longer exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("secure_kd", "federation", "attacks", "defenses", "apparatus")


def test_module_map_matches_the_tree():
    text = (ROOT / "docs" / "modules.md").read_text(encoding="utf-8")
    listed: set[str] = set()
    package = None
    for line in text.splitlines():
        heading = re.match(r"## `(\w+)/`", line)
        if heading:
            package = heading.group(1)
        row = re.match(r"\| `([\w/]+\.py)` \|", line)
        if row and package:
            listed.add(f"{package}/{row.group(1)}")
    present = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert not present - listed, f"add to docs/modules.md: {sorted(present - listed)}"
    assert not listed - present, f"remove from docs/modules.md: {sorted(listed - present)}"
