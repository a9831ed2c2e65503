"""Forgetting by distillation: a class (digits CNN), a canary (tiny LM), and the over-forgetting flag."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from defenses._forgetting_lm import suppress_true_tokens
from defenses.forgetting import ForgettingConfig, run


def test_suppress_sets_the_true_token_to_the_mean_of_the_others():
    logits = torch.tensor([[[4.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0]]])
    next_tokens = torch.tensor([[0, 3]])
    mask = torch.tensor([[True, False]])
    out = suppress_true_tokens(logits, next_tokens, mask, None)
    assert out[0, 0].tolist() == [1.0, 1.0, 2.0, 0.0]  # mean of 1, 2, 0
    assert torch.equal(out[0, 1], logits[0, 1])  # not masked: unchanged
    top2 = suppress_true_tokens(logits, next_tokens, mask, 2)
    assert top2[0, 0, 0].item() == pytest.approx(1.5)  # mean of the two highest others, 2 and 1
    with pytest.raises(ValueError, match="alternatives_k"):
        suppress_true_tokens(logits, next_tokens, mask, 4)


def test_forgotten_class_accuracy_falls_to_zero_and_retained_accuracy_stays(tmp_path):
    result = run(ForgettingConfig(device="cpu", out=str(tmp_path), target="class"))
    assert result.original.forget_accuracy > 0.9
    assert result.unlearned.forget_accuracy <= 0.05
    assert result.retrained.forget_accuracy <= 0.05
    assert result.unlearned.retain_accuracy >= result.original.retain_accuracy - 0.03
    assert result.n_forget == 137 and (tmp_path / "results.json").is_file()


def test_forgotten_canary_exposure_falls_to_about_the_retrained_level(tmp_path):
    result = run(ForgettingConfig(device="cpu", out=str(tmp_path), target="canary"))
    original, unlearned, retrained = result.original, result.unlearned, result.retrained
    assert original.forget_exposure > 9.0  # memorized: top of 1,000 secrets (max 9.97 bits)
    assert retrained.forget_exposure < 3.0
    assert unlearned.forget_exposure < retrained.forget_exposure + 1.5  # tolerance: 1.5 bits
    assert unlearned.heldout_perplexity < 1.25 * retrained.heldout_perplexity


OVER_TRAINED = [
    "--set",
    "target=records",
    "--set",
    "classifier.epochs=10",
    "--set",
    "classifier.forget_temperature=100",
    "--set",
    "classifier.unlearn_epochs=30",
    "--set",
    "classifier.unlearn_lr=0.01",
]


def test_cli_flags_over_forgetting_on_an_over_trained_unlearning(tmp_path):
    from secure_kd.app.cli import app

    result = CliRunner().invoke(
        app,
        [
            "defend",
            "forgetting",
            "--config",
            "configs/defenses/forgetting.yaml",
            "--out",
            str(tmp_path),
            *OVER_TRAINED,
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "results.json").read_text())
    # near-uniform targets on the forget records: their loss ends far above the retrained model's
    assert data["over_forgetting"] is True and data["over_forgetting_reasons"]
    assert data["unlearned"]["forget_loss"] > 2 * data["retrained"]["forget_loss"]


def test_gentle_record_unlearning_is_not_flagged(tmp_path):
    result = run(
        ForgettingConfig(device="cpu", out=str(tmp_path), target="records", classifier={"epochs": 10})
    )
    assert result.over_forgetting is False and result.over_forgetting_reasons == []


def test_bad_canary_index_is_a_user_error():
    with pytest.raises(ValidationError, match="forget_canary"):
        ForgettingConfig(target="canary", lm={"forget_canary": 5})
