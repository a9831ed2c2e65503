"""Defensive distillation: FGSM success falls on a model distilled at T=50, CW-L2 still succeeds; logits
grow with T; configs are validated; the CLI runs the example config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses import get_defense
from secure_kd.app.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "defenses" / "defensive_distillation.yaml"


def _example(tmp_path, **overrides):
    data = yaml.safe_load(CONFIG.read_text())
    data.update(out=str(tmp_path / "run"), device="cpu", **overrides)
    return get_defense("defensive_distillation").Config.model_validate(data)


def test_fgsm_falls_but_carlini_wagner_still_breaks_it(tmp_path) -> None:
    config = _example(
        tmp_path,
        temperatures=[50],
        epochs=12,
        student_epochs=12,
        n_examples=100,
        fgsm_eps=[0.2],
        cw={"binary_search_steps": 3, "max_iter": 50},
    )
    result = get_defense("defensive_distillation").run(config)
    undefended, distilled = result.models
    assert undefended.temperature is None and distilled.temperature == 50
    assert distilled.clean_accuracy > 0.85
    # Papernot et al.: gradient-sign attacks mostly fail on the distilled model
    assert distilled.fgsm_success["0.2"] < undefended.fgsm_success["0.2"] - 0.4
    # Carlini & Wagner: the margin-based L2 attack still finds adversarial examples
    assert distilled.cw_success > 0.9 and undefended.cw_success > 0.9
    assert distilled.mean_abs_logit > 5 * undefended.mean_abs_logit  # logits grow with T
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [m["name"] for m in written["models"]] == ["undefended", "distilled_T50"]


def test_bad_configs_name_the_field(tmp_path) -> None:
    with pytest.raises(ValidationError, match="temperatures must be > 0"):
        _example(tmp_path, temperatures=[0])
    with pytest.raises(ValidationError, match="fgsm_eps"):
        _example(tmp_path, fgsm_eps=[1.5])
    with pytest.raises(ValidationError):
        _example(tmp_path, bogus=1)


def test_cli_runs_the_example_config(tmp_path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "defend",
            "defensive_distillation",
            "--config",
            str(CONFIG),
            "--out",
            str(out),
            "--set",
            "device=cpu",
            "--set",
            "temperatures=[20]",
            "--set",
            "epochs=2",
            "--set",
            "student_epochs=2",
            "--set",
            "n_examples=20",
            "--set",
            "run_cw=false",
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads((out / "results.json").read_text())
    assert len(written["models"]) == 2 and written["models"][1]["cw_success"] is None
