"""Adversarial distillation: MTARD's weight update by hand (stays in [0, 1], sums to 1), the MTARD
student is far more PGD-robust than a plainly trained one, the progressive chain, configs, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses import get_defense
from defenses.adversarial_distillation import balance_step
from secure_kd.app.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "defenses" / "adversarial_distillation.yaml"


def test_balance_step_by_hand() -> None:
    # relative losses: adv 0.6 / 1.0 = 0.6, nat 0.2 / 1.0 = 0.2 -> nat share 0.25
    # w_nat = 0.5 - 0.1 * (0.5 - 0.25) = 0.475, w_adv = 0.525
    w_adv, w_nat = balance_step(0.5, loss_adv=0.6, loss_nat=0.2, init_adv=1.0, init_nat=1.0, eta=0.1)
    assert w_nat == pytest.approx(0.475) and w_adv == pytest.approx(0.525)
    w_nat = 0.9
    for loss_adv, loss_nat in [(5.0, 0.0), (0.0, 7.0), (1e-9, 1e9), (0.0, 0.0)] * 20:
        w_adv, w_nat = balance_step(w_nat, loss_adv, loss_nat, 1.0, 1.0, eta=1.0)
        assert 0.0 <= w_adv <= 1.0 and 0.0 <= w_nat <= 1.0 and w_adv + w_nat == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eta"):
        balance_step(0.5, 1.0, 1.0, 1.0, 1.0, eta=1.5)


def _example(tmp_path, **overrides):
    data = yaml.safe_load(CONFIG.read_text())
    data.update(out=str(tmp_path / "run"), device="cpu", **overrides)
    return get_defense("adversarial_distillation").Config.model_validate(data)


def test_mtard_student_is_more_robust_than_a_plain_one(tmp_path) -> None:
    config = _example(
        tmp_path,
        widths=[8, 4],
        teacher_epochs=10,
        epochs=10,
        train_steps=3,
        eval_steps=10,
        n_examples=200,
        eps=0.15,
    )
    result = get_defense("adversarial_distillation").run(config)
    assert result.adv_teacher.robust_accuracy > result.nat_teacher.robust_accuracy + 0.15
    first, second = result.students
    for student in (first, second):
        assert student.mtard.robust_accuracy > student.plain.robust_accuracy + 0.15, student.width
        assert student.mtard.clean_accuracy > 0.85
        low, high = student.weight_range
        assert 0.0 <= low <= high <= 1.0
        assert sum(student.final_weights) == pytest.approx(1.0)
    assert second.adv_teacher == "mtard_student(width=8)"
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [s["width"] for s in written["students"]] == [8, 4]


def test_bad_configs_name_the_field(tmp_path) -> None:
    with pytest.raises(ValidationError, match="must not exceed teacher_width"):
        _example(tmp_path, widths=[32])
    with pytest.raises(ValidationError, match="sort widths descending"):
        _example(tmp_path, widths=[4, 8])
    with pytest.raises(ValidationError, match="weight_lr"):
        _example(tmp_path, weight_lr=2.0)


def test_cli_runs_the_example_config(tmp_path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "defend",
            "adversarial_distillation",
            "--config",
            str(CONFIG),
            "--out",
            str(out),
            "--set",
            "device=cpu",
            "--set",
            "widths=[4]",
            "--set",
            "teacher_epochs=1",
            "--set",
            "epochs=1",
            "--set",
            "train_steps=1",
            "--set",
            "eval_steps=2",
            "--set",
            "n_examples=30",
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads((out / "results.json").read_text())
    assert written["students"][0]["width"] == 4
