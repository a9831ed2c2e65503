"""Backdoor unlearning by distillation: NAD and self-distillation with clean anchors.

The defense plants a backdoor itself (same recipe as the `backdoor` attack, rebuilt from this config
through `apparatus.backdoor_data`): a BadNets patch on digits (CNN), or a text / switchable trigger
on the synthetic topic task (bag-of-words classifier); or, with `model: <dir>`, it loads the model the
`backdoor` attack saved and rebuilds that attack's task from its attack_config.json and trigger.json
(plain JSON: defenses never import attacks). The defender then holds a small clean set
(`clean_fraction` of the training set, true labels, no poisons) and runs:

- `nad`: Neural Attention Distillation (Li et al., ICLR 2021): fine-tune a teacher copy on the clean
  set, then train the backdoored model on it with CE + beta * attention-map alignment.
- `self_kd`: SKD-CAG-style self-distillation with clean anchors (secure-kd's own formulation, see
  `defenses._unlearning`): the frozen backdoored model teaches itself on clean inputs, and on triggered
  inputs the student is pulled to the teacher's output on the clean anchor. `trigger_source: known`
  uses the true trigger; `reverse` uses a candidate from Neural-Cleanse-lite (patch) or a one-word
  search (text); a switchable trigger needs `known`.

Metrics (BackdoorBench): clean accuracy, attack success rate, robust accuracy before and after, and
the defense effectiveness rating DER = (max(0, ASR_before - ASR_after) - max(0, CA_before - CA_after)
+ 1) / 2 (1 = backdoor removed at no accuracy cost, 0.5 = no change). Heuristic defenses: nothing
here certifies that a backdoor is gone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from apparatus.backdoor_data import (
    BackdoorMetrics,
    BackdoorTask,
    backdoor_metrics,
    check_trigger_for_task,
    patch_task,
    switch_rates,
    text_task,
)
from apparatus.classifiers import train_classifier
from apparatus.digits import load_digits_cnn
from apparatus.text_classifier import load_text_classifier
from defenses import DEFENSES
from defenses._unlearning import nad, reverse_patch_trigger, search_trigger_token, self_distill
from secure_kd.config import Strict
from secure_kd.data.documents import TOPICS
from secure_kd.models import resolve_device
from secure_kd.plugins import Plugin, PluginConfig, write_result
from secure_kd.triggers import PatchTrigger, SwitchableTrigger, TextTrigger, parse_trigger

Kind = Literal["patch", "text", "switchable"]
_ATTACK_FILES = ("attack_config.json", "trigger.json", "model.json", "model.safetensors")
# fields of the backdoor attack's config that fix the data, the poisoning and the architecture
_TASK_FIELDS = (
    "kind",
    "target",
    "poison_rate",
    "test_fraction",
    "n_records",
    "max_length",
    "min_word_count",
    "text_heads",
    "width",
    "seed",
)
Method = Literal["nad", "self_kd"]
AnyTrigger = PatchTrigger | TextTrigger | SwitchableTrigger


def defense_effectiveness_rating(before: BackdoorMetrics, after: BackdoorMetrics) -> float:
    """BackdoorBench's DER in [0, 1]."""
    asr_drop = max(0.0, before.attack_success_rate - after.attack_success_rate)
    accuracy_drop = max(0.0, before.clean_accuracy - after.clean_accuracy)
    return (asr_drop - accuracy_drop + 1.0) / 2.0


class NADOptions(Strict):
    beta: float = Field(0.5, ge=0, description="attention loss weight (Adam: relative to CE, not absolute)")
    p: float = Field(2.0, gt=0, description="attention map exponent: sum over channels of |f|^p")
    teacher_epochs: int = Field(20, gt=0)
    epochs: int = Field(20, gt=0)
    lr: float = Field(1e-2, gt=0, description="Adam step for the teacher fine-tune and the student")


class SelfKDOptions(Strict):
    trigger_source: Literal["known", "reverse"] = "known"
    epochs: int = Field(20, gt=0)
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(2.0, gt=0)
    anchor_weight: float = Field(1.0, ge=0, description="weight of the triggered -> clean-anchor term")
    reverse_steps: int = Field(150, gt=0, description="Neural-Cleanse-lite Adam steps per class (patch)")
    reverse_l1: float = Field(0.01, ge=0, description="Neural-Cleanse-lite L1 weight on the mask (patch)")


class BackdoorUnlearningConfig(PluginConfig):
    """`secure-kd defend backdoor_unlearning`: plant a backdoor, then remove it with NAD / self-KD."""

    kind: Kind = "patch"
    trigger: AnyTrigger | None = Field(None, description="default: a 2x2 white patch / the word 'cf'")
    target: int = Field(0, ge=0)
    poison_rate: float = Field(0.1, gt=0, lt=1)
    epochs: int = Field(15, gt=0, description="epochs of backdoored training")
    lr: float | None = Field(None, gt=0, description="backdoored training; default 3e-3 patch, 1e-2 text")
    width: int = Field(16, gt=0)
    text_heads: int = Field(4, gt=0)
    n_records: int = Field(1000, ge=20)
    max_length: int = Field(128, gt=0)
    min_word_count: int = Field(10, ge=1)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    clean_fraction: float = Field(0.1, gt=0, lt=1, description="defender's clean share of the training set")
    model: str = Field(
        "train",
        description="'train': plant the backdoor from this config; or the directory the backdoor attack "
        "wrote (<attack out>/teacher): its model is loaded, and its attack_config.json and trigger.json "
        "replace this config's task fields (kind, trigger, target, poison_rate, seed, ...) so the data "
        "split matches",
    )
    methods: list[Method] = Field(default_factory=lambda: ["nad", "self_kd"], min_length=1)
    nad: NADOptions = NADOptions()
    self_kd: SelfKDOptions = SelfKDOptions()
    out: str = "runs/defenses/backdoor_unlearning"

    @model_validator(mode="after")
    def _consistent(self) -> BackdoorUnlearningConfig:
        check_trigger_for_task(self.kind, self.target, self.trigger)
        if self.model != "train":
            missing = [n for n in _ATTACK_FILES if not (Path(self.model) / n).is_file()]
            if missing:
                raise ValueError(
                    f"model {self.model!r} is neither 'train' nor a backdoor attack's teacher "
                    f"directory (missing {', '.join(missing)}); run `secure-kd attack backdoor` "
                    "with save_model: true and pass <out>/teacher"
                )
        reverse = "self_kd" in self.methods and self.self_kd.trigger_source == "reverse"
        if self.kind == "switchable" and reverse:
            raise ValueError(
                "self_kd.trigger_source=reverse cannot find a switchable trigger (it needs the "
                "prompt and the word together); use trigger_source: known"
            )
        return self

    def resolved_trigger(self) -> AnyTrigger:
        if self.trigger is not None:
            return self.trigger
        if self.kind == "patch":
            return PatchTrigger(size=2, value=1.0, position="bottom_right", target_class=self.target)
        text = TextTrigger(phrase="cf", position="random", target_label=self.target)
        return text if self.kind == "text" else SwitchableTrigger(trigger=text)


class ModelReport(BaseModel):
    metrics: BackdoorMetrics
    switch: dict[str, float] | None = Field(None, description="switchable: ASR per input kind")


class MethodResult(BaseModel):
    method: Method
    after: ModelReport
    der: float
    seconds: float
    details: dict[str, Any] = Field(default_factory=dict)


class BackdoorUnlearningResult(BaseModel):
    kind: Kind
    model_source: str
    trigger: dict[str, Any]
    n_train: int
    n_poisoned: int
    n_clean: int
    before: ModelReport
    methods: list[MethodResult]
    seconds: float


def with_attack_task(config: BackdoorUnlearningConfig) -> BackdoorUnlearningConfig:
    """`config` with the task fields of the backdoor attack that wrote `config.model`."""
    directory = Path(config.model)
    attack = json.loads((directory / "attack_config.json").read_text(encoding="utf-8"))
    trigger = parse_trigger((directory / "trigger.json").read_text(encoding="utf-8"))
    update = {name: attack[name] for name in _TASK_FIELDS if name in attack}
    return BackdoorUnlearningConfig.model_validate({**config.model_dump(), **update, "trigger": trigger})


def load_backdoored(config: BackdoorUnlearningConfig, task: BackdoorTask, device: str) -> nn.Module:
    if task.kind == "patch":
        return load_digits_cnn(config.model, device)
    model, vocab, _ = load_text_classifier(config.model)
    if len(vocab) != task.vocab_size:
        raise ValueError(
            f"{config.model} has a {len(vocab)}-word vocabulary but the rebuilt task has "
            f"{task.vocab_size}; the attack's data settings were not reproduced"
        )
    return model.to(device)


def build_task(config: BackdoorUnlearningConfig) -> BackdoorTask:
    trigger = config.resolved_trigger()
    if isinstance(trigger, PatchTrigger):
        return patch_task(trigger, config.poison_rate, config.test_fraction, config.seed)
    return text_task(
        trigger,
        config.poison_rate,
        config.test_fraction,
        config.seed,
        n_records=config.n_records,
        max_length=config.max_length,
        min_word_count=config.min_word_count,
        heads=config.text_heads,
    )


def model_report(model: nn.Module, task: BackdoorTask) -> ModelReport:
    return ModelReport(
        metrics=backdoor_metrics(model, task.test, task.triggered_test["active"], task.target),
        switch=switch_rates(model, task.triggered_test, task.target),
    )


def clean_subset(task: BackdoorTask, fraction: float, seed: int) -> Tensor:
    """Indices of the defender's clean examples (seeded, drawn from the whole training set)."""
    n = len(task.clean_train[1])
    count = max(2, round(fraction * n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))[:count].sort().values


def _triggered_inputs(
    model: nn.Module,
    task: BackdoorTask,
    index: Tensor,
    clean: tuple[Tensor, Tensor],
    options: SelfKDOptions,
    seed: int,
) -> tuple[Tensor, dict[str, Any]]:
    if options.trigger_source == "known":
        return task.stamp(index), {"trigger_source": "known"}
    num_classes = 10 if task.kind == "patch" else len(TOPICS)
    if task.kind == "patch":
        candidate = reverse_patch_trigger(
            model, clean[0], num_classes, steps=options.reverse_steps, l1_weight=options.reverse_l1, seed=seed
        )
    else:
        candidate = search_trigger_token(model, clean[0], clean[1], num_classes, task.vocab_size or 0)
    details = {
        "trigger_source": "reverse",
        "candidate_target": candidate.target,
        "anomaly_index": candidate.anomaly_index,
        "candidate": candidate.description,
        "class_scores": candidate.scores,
        "found_true_target": candidate.target == task.target,
    }
    return candidate.apply(clean[0]), details


def run(config: BackdoorUnlearningConfig) -> BackdoorUnlearningResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if config.model != "train":
        config = with_attack_task(config)
    task = build_task(config)
    if config.model == "train":
        lr = config.lr or (3e-3 if config.kind == "patch" else 1e-2)
        backdoored = task.make_model(config.width, config.seed).to(device)
        train_classifier(backdoored, task.poisoned_train, config.epochs, lr, config.seed)
    else:
        backdoored = load_backdoored(config, task, device)
    before = model_report(backdoored, task)
    index = clean_subset(task, config.clean_fraction, config.seed)
    clean = (task.clean_train[0][index], task.clean_train[1][index])
    results = []
    for method in dict.fromkeys(config.methods):
        method_started = time.perf_counter()
        details: dict[str, Any] = {}
        if method == "nad":
            options = config.nad
            student, teacher = nad(
                backdoored,
                clean,
                beta=options.beta,
                p=options.p,
                teacher_epochs=options.teacher_epochs,
                epochs=options.epochs,
                lr=options.lr,
                seed=config.seed,
            )
            details["finetuned_teacher"] = model_report(teacher, task).model_dump(mode="json")
        else:
            options_kd = config.self_kd
            triggered, details = _triggered_inputs(backdoored, task, index, clean, options_kd, config.seed)
            student = self_distill(
                backdoored,
                clean,
                triggered,
                epochs=options_kd.epochs,
                lr=options_kd.lr,
                seed=config.seed,
                temperature=options_kd.temperature,
                anchor_weight=options_kd.anchor_weight,
            )
        after = model_report(student, task)
        results.append(
            MethodResult(
                method=method,
                after=after,
                der=defense_effectiveness_rating(before.metrics, after.metrics),
                seconds=time.perf_counter() - method_started,
                details=details,
            )
        )
    result = BackdoorUnlearningResult(
        kind=config.kind,
        model_source=config.model,
        trigger=config.resolved_trigger().model_dump(mode="json"),
        n_train=len(task.poisoned_train[1]),
        n_poisoned=task.n_poisoned,
        n_clean=len(index),
        before=before,
        methods=results,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "backdoor_unlearning",
    Plugin(
        name="backdoor_unlearning",
        Config=BackdoorUnlearningConfig,
        Result=BackdoorUnlearningResult,
        run=run,
        summary="NAD and clean-anchor self-distillation vs patch / text / switchable backdoors; CA, ASR, DER",
    ),
)
