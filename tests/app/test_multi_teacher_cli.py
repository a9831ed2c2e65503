"""`secure-kd distill` with a `teachers:` list (configs/multi-teacher.yaml) from the command line, and a
bad list refused by `secure-kd validate` with the field and the fix, without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from secure_kd.app.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_cli_distills_from_three_teachers(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    done = runner.invoke(
        app, ["distill", "-c", "configs/multi-teacher.yaml", "--out", str(out), "--no-progress"]
    )
    assert done.exit_code == 0, done.output
    data = json.loads((out / "results.json").read_text())
    assert data["steps"] == 12 and data["teachers"]["rule"] == "median"
    members = data["teachers"]["members"]
    assert [m["source"] for m in members] == ["tiny"] * 3
    assert len({round(m["perplexity"], 6) for m in members}) == 3  # three different teachers
    assert data["config"]["teacher"]["tiny"]["hidden_size"] == 64  # teachers[0] is the primary
    assert sum(data["losses"][-3:]) < sum(data["losses"][:3])


def test_validate_refuses_a_robust_rule_over_two_teachers(tmp_path):
    config = yaml.safe_load((ROOT / "configs/multi-teacher.yaml").read_text())
    config["teachers"] = config["teachers"][:2]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    done = runner.invoke(app, ["validate", str(path)])
    assert done.exit_code != 0
    assert "kd.teacher_rule: median needs at least 3 teachers" in done.output
    assert "Traceback" not in done.output
