"""End to end on tiny models: `secure-kd distill` with a cached teacher writes results.json and learns."""

from __future__ import annotations

import json
import stat

import pytest
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import load_config
from secure_kd.distill_job import run_distill


def test_cli_distill_from_cache(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["distill", "--config", "configs/tiny.yaml", "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 1 and data["steps"] == 12
    assert data["cache"]["k"] == 16
    assert data["agreement_after"] > data["agreement_before"]
    assert sum(data["losses"][-3:]) < sum(data["losses"][:3])
    assert (out / "student" / "model.safetensors").is_file()
    shards = list((out / "teacher-cache").glob("*.safetensors"))
    assert shards and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in shards)


def test_heldout_perplexity_falls_with_ce_and_kd(tmp_path):
    job = load_config(
        "configs/tiny.yaml",
        [f"out={tmp_path}", "kd.ce_weight=1.0", "kd.kd_weight=0.1", "train.max_steps=30", "train.lr=3e-3"],
    )
    result = run_distill(job, progress=False, log=lambda *a, **k: None)
    assert result.student_after.perplexity < 0.8 * result.student_before.perplexity


def test_resume_flag_continues_a_finished_run_without_retraining(tmp_path):
    job = load_config(
        "configs/tiny.yaml", [f"out={tmp_path}", "train.max_steps=6", "kd.teacher_targets=live"]
    )
    first = run_distill(job, progress=False, log=lambda *a, **k: None)
    again = run_distill(job, resume=True, progress=False, log=lambda *a, **k: None)
    assert again.resumed_from == 6 and again.losses == pytest.approx(first.losses)
