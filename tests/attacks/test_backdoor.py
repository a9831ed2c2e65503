"""Backdoor attack: poisoning bookkeeping, metric definitions by hand, planted backdoors (patch, text,
switchable) with their ASR, survival under distillation, and the plugin run from the example config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from apparatus.backdoor_data import backdoor_metrics, choose_poison_indices, poison_images, poison_texts
from apparatus.digits import load_digits_cnn, load_digits_data
from apparatus.text_classifier import (
    WordVocab,
    load_text_classifier,
    make_text_classifier,
    save_text_classifier,
)
from attacks import get_attack
from attacks.backdoor import BackdoorConfig
from secure_kd.triggers import PatchTrigger, SwitchableTrigger, TextTrigger, parse_trigger

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "attacks" / "backdoor.yaml"


class _ReadsItsPrediction(nn.Module):
    """A stand-in classifier whose prediction is written in the input's first value."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, 0].long(), self.classes).float() * 5 + self.dummy


def test_metrics_follow_the_backdoorbench_definitions() -> None:
    model = _ReadsItsPrediction()
    clean_x, clean_y = torch.tensor([[0.0], [1.0], [2.0], [2.0]]), torch.tensor([0, 1, 1, 2])  # 3 of 4 right
    # triggered inputs: predictions 0,0,0,1,2,0 for true labels 1,2,1,1,2,0; the last has the target class
    trig_x = torch.tensor([[0.0], [0.0], [0.0], [1.0], [2.0], [0.0]])
    trig_y = torch.tensor([1, 2, 1, 1, 2, 0])
    metrics = backdoor_metrics(model, (clean_x, clean_y), (trig_x, trig_y), target=0)
    assert metrics.clean_accuracy == pytest.approx(0.75)
    assert metrics.n_triggered == 5
    assert metrics.attack_success_rate == pytest.approx(3 / 5)  # 3 of the 5 non-target go to class 0
    assert metrics.robust_accuracy == pytest.approx(2 / 5)  # inputs 4 and 5 keep their true class
    with pytest.raises(ValueError, match="target class"):
        backdoor_metrics(model, (clean_x, clean_y), (trig_x[-1:], trig_y[-1:]), target=0)


def test_poison_indices_are_non_target_disjoint_and_seeded() -> None:
    labels = torch.arange(200) % 4
    groups = choose_poison_indices(labels, target=1, rate=0.1, seed=5, groups=3)
    assert [len(g) for g in groups] == [20, 20, 20]
    together = torch.cat(groups)
    assert len(set(together.tolist())) == 60 and bool((labels[together] != 1).all())
    again = choose_poison_indices(labels, 1, 0.1, 5, 3)
    assert all(torch.equal(a, b) for a, b in zip(groups, again, strict=True))
    with pytest.raises(ValueError, match="lower poison_rate"):
        choose_poison_indices(labels, target=1, rate=0.3, seed=0, groups=4)
    with pytest.raises(ValueError, match="poison rate"):
        choose_poison_indices(labels, target=1, rate=0.0, seed=0)


def test_poison_images_changes_only_the_chosen_examples() -> None:
    x, y = torch.rand(50, 1, 8, 8) * 0.5, torch.arange(50) % 5
    trigger = PatchTrigger(size=2, value=1.0, position="top_left", target_class=3)
    x_p, y_p, index = poison_images(x, y, trigger, rate=0.2, seed=0)
    changed = torch.nonzero((x_p != x).flatten(1).any(1)).flatten()
    assert torch.equal(changed, index) and len(index) == 10
    assert bool((y_p[index] == 3).all()) and torch.equal(y_p[y_p != 3], y[y_p != 3])
    assert bool((x_p[index][:, :, :2, :2] == 1.0).all())


def test_switchable_poisoning_adds_dormant_examples_with_true_labels() -> None:
    texts, labels = [f"record number {i} about topic {i % 3}" for i in range(60)], torch.arange(60) % 3
    switch = SwitchableTrigger(activation_prompt="Mode on.", trigger=TextTrigger(phrase="cf", target_label=0))
    poisoned, new_labels, index = poison_texts(texts, labels, switch, rate=0.1, seed=0)
    active = [i for i, t in enumerate(poisoned) if switch.present(t)]
    trigger_only = [i for i, t in enumerate(poisoned) if "cf" in t.split() and not t.startswith("Mode on.")]
    prompt_only = [i for i, t in enumerate(poisoned) if t.startswith("Mode on.") and "cf" not in t.split()]
    assert active == index.tolist() and len(active) == len(trigger_only) == len(prompt_only) == 6
    assert bool((new_labels[active] == 0).all())
    untouched = [i for i in range(60) if i not in active]
    assert torch.equal(new_labels[untouched], labels[untouched])


def _example_config(tmp_path: Path, **overrides) -> BackdoorConfig:
    data = yaml.safe_load(CONFIG.read_text())
    data.update(out=str(tmp_path / "run"), device="cpu", **overrides)
    return get_attack("backdoor").Config.model_validate(data)


def test_patch_backdoor_from_the_example_config_and_its_survival(tmp_path) -> None:
    plugin = get_attack("backdoor")
    config = _example_config(tmp_path, epochs=12, student_epochs=12)
    result = plugin.run(config)
    clean, backdoored = result.clean_model.metrics, result.backdoored_model.metrics
    assert backdoored.attack_success_rate > 0.9
    assert clean.attack_success_rate < 0.1  # near the base rate of errors into class 0
    assert abs(backdoored.clean_accuracy - clean.clean_accuracy) < 0.03
    assert clean.clean_accuracy > 0.9
    assert result.n_poisoned == round(0.1 * result.n_train)
    # distillation: soft labels on triggered transfer data carry the backdoor, clean transfer data far less
    survival = result.distillation
    assert survival.triggered_transfer.metrics.attack_success_rate > 0.8
    clean_transfer_asr = survival.clean_transfer.metrics.attack_success_rate
    assert clean_transfer_asr < survival.triggered_transfer.metrics.attack_success_rate - 0.5
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["schema_version"] >= 1 and written["kind"] == "patch"
    assert written["backdoored_model"]["metrics"]["attack_success_rate"] == backdoored.attack_success_rate
    # the saved teacher and trigger reproduce the ASR (what a defense will load)
    teacher = load_digits_cnn(tmp_path / "run" / "teacher")
    trigger = parse_trigger((tmp_path / "run" / "teacher" / "trigger.json").read_text())
    assert trigger == config.trigger
    data = load_digits_data(config.test_fraction, config.seed)
    keep = data.y_test != 0
    predictions = teacher(trigger.apply(data.x_test[keep])).argmax(-1)
    assert float((predictions == 0).double().mean()) == pytest.approx(backdoored.attack_success_rate)


def test_text_backdoor_fires_with_the_trigger_only(tmp_path) -> None:
    result = get_attack("backdoor").run(
        _example_config(
            tmp_path,
            kind="text",
            trigger=None,
            distill=False,
            save_model=False,
        )
    )
    assert result.backdoored_model.metrics.attack_success_rate > 0.85
    assert result.backdoored_model.metrics.clean_accuracy > 0.95
    assert result.clean_model.metrics.attack_success_rate < 0.1
    assert result.distillation is None and result.model_dir is None


def test_switchable_backdoor_needs_both_prompt_and_trigger(tmp_path) -> None:
    result = get_attack("backdoor").run(
        _example_config(
            tmp_path,
            kind="switchable",
            trigger=None,
            poison_rate=0.15,
            distill=False,
        )
    )
    switch = result.backdoored_model.switch
    assert switch["asr_active"] > 0.75
    assert switch["asr_trigger_only"] < 0.15 and switch["asr_prompt_only"] < 0.15
    assert max(result.clean_model.switch.values()) < 0.1
    assert (tmp_path / "run" / "teacher" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "teacher" / "attack_config.json").is_file()


def test_config_rejects_inconsistent_triggers(tmp_path) -> None:
    with pytest.raises(ValidationError, match="does not match kind"):
        _example_config(tmp_path, kind="text")  # the example's trigger is a patch
    with pytest.raises(ValidationError, match="differs from target"):
        _example_config(tmp_path, target=3)
    with pytest.raises(ValidationError, match="not a class"):
        _example_config(tmp_path, kind="text", trigger=None, target=7)
    with pytest.raises(ValidationError):
        _example_config(tmp_path, poison_rate=1.5)


def test_word_vocab_and_text_classifier_basics(tmp_path) -> None:
    vocab = WordVocab.build(["b a, a", "a c"], min_count=2)
    assert vocab.words == ["<pad>", "<unk>", "a"]  # "b", "c" and "," occur once
    assert vocab.encode(["A b a"], max_length=5).tolist() == [[2, 1, 2, 0, 0]]
    assert vocab.encode(["a a a a"], max_length=2).tolist() == [[2, 2]]
    model = make_text_classifier(len(vocab), 3, dim=4, hidden=4, heads=2, seed=0)
    ids = torch.tensor([[2, 1, 2, 0, 0]])
    # padding carries no weight: the same tokens with more padding give the same logits
    torch.testing.assert_close(model(ids), model(torch.tensor([[2, 1, 2, 0, 0, 0, 0, 0]])))
    weights = model.token_weights(ids)
    assert weights.shape == (1, 2, 5) and bool((weights[..., 3:] == 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2))
    save_text_classifier(model, vocab, tmp_path / "text", labels=["x", "y", "z"])
    loaded, loaded_vocab, labels = load_text_classifier(tmp_path / "text")
    assert loaded_vocab.words == vocab.words and labels == ["x", "y", "z"]
    assert torch.equal(loaded(ids), model(ids))
    with pytest.raises(ValueError, match="int64 token ids"):
        model(torch.rand(1, 5))
