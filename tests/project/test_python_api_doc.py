"""docs/python-api.md is executed: every ```python block, in order, in one namespace, from a scratch
directory holding a copy of configs/ (so `runs/` of the examples lands there)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "python-api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_python_api_page_runs(tmp_path, monkeypatch, capsys):
    blocks = code_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6  # job, error, Distiller, cache, DP, audit, one attack
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECURE_KD_HOME", str(tmp_path / "home"))
    before = torch.get_num_threads()
    namespace: dict = {"__name__": "python_api_doc"}
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"docs/python-api.md block {number}", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert "backdoor skipped backdoor has no field for the audited model" in printed
    assert "memorization ok runs/api/student (the audited model)" in printed


def test_the_readme_links_only_to_files_in_the_repository():
    """Issue 19: the README linked to a design document outside the repository."""
    for page in (ROOT / "README.md", *(ROOT / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), (page.name, target)
            assert resolved.exists(), (page.name, target)
        assert "shared/DESIGN.md" not in text, page.name
