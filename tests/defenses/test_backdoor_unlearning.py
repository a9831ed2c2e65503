"""Backdoor unlearning: DER by hand, attention maps by hand, NAD and self-KD remove a planted digits patch
backdoor (and the text / switchable ones), the trigger searches find the planted target, CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from apparatus.backdoor_data import BackdoorMetrics
from apparatus.digits import make_digits_cnn
from apparatus.text_classifier import make_text_classifier
from defenses import available_defenses, get_defense
from defenses._unlearning import add_token, anomaly_indices, attention_maps
from defenses.backdoor_unlearning import BackdoorUnlearningConfig, defense_effectiveness_rating
from secure_kd.app.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "defenses" / "backdoor_unlearning.yaml"


def _metrics(ca: float, asr: float) -> BackdoorMetrics:
    return BackdoorMetrics(clean_accuracy=ca, attack_success_rate=asr, robust_accuracy=0.0, n_triggered=1)


def test_der_matches_backdoorbench_by_hand() -> None:
    # ASR 0.98 -> 0.10 (drop 0.88), CA 0.95 -> 0.91 (drop 0.04): (0.88 - 0.04 + 1) / 2 = 0.92
    assert defense_effectiveness_rating(_metrics(0.95, 0.98), _metrics(0.91, 0.10)) == pytest.approx(0.92)
    # ASR rises and CA rises: both clipped to 0 -> 0.5
    assert defense_effectiveness_rating(_metrics(0.9, 0.2), _metrics(0.95, 0.3)) == pytest.approx(0.5)
    assert defense_effectiveness_rating(_metrics(0.9, 1.0), _metrics(0.9, 0.0)) == pytest.approx(1.0)


def test_attention_maps_by_hand() -> None:
    model = make_digits_cnn(width=2, seed=0)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first, second = model.feature_maps(x)
    maps = attention_maps(model, x, p=2.0)
    expected = (first[1] ** 2).sum(0).flatten()  # example 1, sum over channels of f^2
    assert torch.allclose(maps[0][1], expected / expected.norm(), atol=1e-6)
    assert maps[1].shape == (3, 16) and torch.allclose(maps[1].norm(dim=1), torch.ones(3))
    text = make_text_classifier(20, 3, dim=4, hidden=4, heads=2, seed=0)
    ids = torch.tensor([[2, 3, 4, 0], [5, 0, 0, 0]])
    token_map, hidden_map = attention_maps(text, ids)
    assert token_map.shape == (2, 4) and hidden_map.shape == (2, 4)
    assert float(token_map[1, 1:].detach().abs().max()) == 0.0  # padding contributes nothing


def test_anomaly_index_and_add_token_by_hand() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])  # median 3, MAD median(|.|) = 1
    assert anomaly_indices(values)[4].item() == pytest.approx(7 / 1.4826)
    ids = torch.tensor([[5, 6, 0], [7, 8, 9]])
    assert add_token(ids, 4).tolist() == [[5, 6, 4], [7, 8, 4]]


def _example(tmp_path, **overrides) -> BackdoorUnlearningConfig:
    data = yaml.safe_load(CONFIG.read_text())
    data.update(out=str(tmp_path / "run"), device="cpu", **overrides)
    return get_defense("backdoor_unlearning").Config.model_validate(data)


def test_nad_and_self_kd_remove_a_digits_patch_backdoor(tmp_path) -> None:
    result = get_defense("backdoor_unlearning").run(_example(tmp_path))
    before = result.before.metrics
    assert before.attack_success_rate > 0.9 and before.clean_accuracy > 0.9
    for method in result.methods:
        after = method.after.metrics
        assert after.attack_success_rate < 0.3, method.method
        assert after.clean_accuracy > before.clean_accuracy - 0.05, method.method
        assert after.robust_accuracy > before.robust_accuracy + 0.4, method.method
        assert method.der > 0.8
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [m["method"] for m in written["methods"]] == ["nad", "self_kd"]


def test_reverse_engineered_patch_finds_the_target_and_unlearns(tmp_path) -> None:
    config = _example(
        tmp_path, methods=["self_kd"], epochs=12, self_kd={"trigger_source": "reverse", "reverse_steps": 40}
    )
    result = get_defense("backdoor_unlearning").run(config)
    (method,) = result.methods
    assert method.details["candidate_target"] == 0 and method.details["found_true_target"]
    assert method.after.metrics.attack_success_rate < result.before.metrics.attack_success_rate - 0.5


def test_text_and_switchable_backdoors(tmp_path) -> None:
    text = get_defense("backdoor_unlearning").run(
        _example(tmp_path, kind="text", methods=["self_kd"], self_kd={"trigger_source": "reverse"})
    )
    assert text.before.metrics.attack_success_rate > 0.85
    assert text.methods[0].details["found_true_target"]
    assert text.methods[0].after.metrics.attack_success_rate < 0.4
    switch = get_defense("backdoor_unlearning").run(
        _example(tmp_path, kind="switchable", poison_rate=0.15, methods=["self_kd"])
    )
    assert switch.before.switch["asr_active"] > 0.7
    (self_kd,) = switch.methods
    assert self_kd.after.switch["asr_active"] < 0.2
    assert self_kd.after.metrics.clean_accuracy > switch.before.metrics.clean_accuracy - 0.05


def test_bad_configs_name_the_field(tmp_path) -> None:
    with pytest.raises(ValidationError, match="trigger_source: known"):
        _example(tmp_path, kind="switchable", self_kd={"trigger_source": "reverse"})
    with pytest.raises(ValidationError, match="not a class"):
        _example(tmp_path, kind="text", target=9)
    with pytest.raises(ValidationError, match="clean_fraction"):
        _example(tmp_path, clean_fraction=0)
    with pytest.raises(ValidationError):
        _example(tmp_path, methods=["fine_pruning"])


def test_cli_runs_the_example_config(tmp_path) -> None:
    assert "backdoor_unlearning" in available_defenses()
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "defend",
            "backdoor_unlearning",
            "--config",
            str(CONFIG),
            "--out",
            str(out),
            "--set",
            "device=cpu",
            "--set",
            "epochs=3",
            "--set",
            "methods=[self_kd]",
            "--set",
            "self_kd.epochs=2",
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads((out / "results.json").read_text())
    assert written["methods"][0]["method"] == "self_kd" and 0.0 <= written["methods"][0]["der"] <= 1.0


def test_defends_a_model_written_by_the_backdoor_attack(tmp_path) -> None:
    from attacks import get_attack  # the test wires attack -> defense; the packages never import each other

    attack = get_attack("backdoor")
    attack_config = attack.Config.model_validate(
        {
            "kind": "text",
            "epochs": 15,
            "distill": False,
            "seed": 3,
            "device": "cpu",
            "out": str(tmp_path / "atk"),
        }
    )
    planted = attack.run(attack_config)
    config = _example(tmp_path, model=planted.model_dir, methods=["self_kd"], kind="patch", seed=0)
    result = get_defense("backdoor_unlearning").run(config)
    # the task came from the attack's files: same kind, same split, so the same ASR before defending
    assert result.kind == "text" and result.model_source == planted.model_dir
    before = result.before.metrics
    assert before.attack_success_rate == pytest.approx(planted.backdoored_model.metrics.attack_success_rate)
    assert before.clean_accuracy == pytest.approx(planted.backdoored_model.metrics.clean_accuracy)
    assert result.methods[0].after.metrics.attack_success_rate < before.attack_success_rate - 0.5
    with pytest.raises(ValidationError, match="teacher directory"):
        _example(tmp_path, model=str(tmp_path))
