"""Every test that docs/threat-model.md and docs/privacy.md name as evidence for a promise exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/threat-model.md", "docs/privacy.md", "docs/deploy.md", "docs/federation.md")


def _defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.update(re.findall(r"^\s*def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_doc_names_exists(doc):
    named = set(
        re.findall(r"`(?:[\w/.]+::)?(test_\w+)(?:\[[^\]]*\])?`", (ROOT / doc).read_text(encoding="utf-8"))
    )
    missing = sorted(named - _defined_tests())
    assert not missing, f"{doc} names tests that do not exist: {missing}"


def test_the_threat_model_lists_its_promises_with_tests():
    text = (ROOT / "docs/threat-model.md").read_text(encoding="utf-8")
    table = text.split("## Promises at a glance", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`test_" in line]
    assert len(rows) >= 10
