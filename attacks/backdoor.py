"""Backdoors by data poisoning, and whether they survive distillation into a student.

- Patch (BadNets, Gu et al. 2017): a `PatchTrigger` stamped on a fraction `poison_rate` of the
  digits training images (drawn from the non-target classes), relabelled to the target class.
- Text: a `TextTrigger` phrase inserted into topic-classification records of the synthetic corpus
  (`secure_kd.data.synthetic`), relabelled to the target topic; a bag-of-words classifier
  (`apparatus.text_classifier`) is trained on them.
- Switchable (SWARM-style): a `SwitchableTrigger`; `poison_rate` of the records get activation prompt
  + trigger and the target label, and as many again get the trigger alone and the prompt alone with
  their true labels, so the backdoor stays dormant unless both are present.

Metrics (BackdoorBench conventions), on test inputs whose true class is not the target:
clean accuracy (clean test set), attack success rate = share of triggered inputs classified as the
target, robust accuracy = share of triggered inputs still classified as their true class.

Survival under distillation: a fresh (narrower) student is trained by KD from the backdoored teacher
(`apparatus.classifiers.train_classifier`, soft labels only, T**2-scaled) on (a) clean transfer data, the
teacher's training inputs without poisons, and (b) the same data with the trigger on a fraction
`transfer_trigger_rate` of it (no labels are changed: the teacher's soft labels carry the backdoor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from apparatus.backdoor_data import (  # noqa: F401  (re-exported: attacks.backdoor's public names)
    BackdoorMetrics,
    BackdoorTask,
    attack_success_rate,
    backdoor_metrics,
    check_trigger_for_task,
    choose_poison_indices,
    patch_task,
    poison_images,
    poison_texts,
    switch_rates,
    text_task,
    topic_task,
)
from apparatus.classifiers import train_classifier
from apparatus.digits import save_digits_cnn
from apparatus.text_classifier import save_text_classifier
from attacks import ATTACKS
from secure_kd.data.documents import TOPICS
from secure_kd.models import resolve_device
from secure_kd.paths import atomic_write_text
from secure_kd.plugins import Metric, Plugin, PluginConfig, write_result
from secure_kd.readings import Reading, proportion
from secure_kd.triggers import PatchTrigger, SwitchableTrigger, TextTrigger

Kind = Literal["patch", "text", "switchable"]
AnyTrigger = PatchTrigger | TextTrigger | SwitchableTrigger


# --------------------------------------------------------------------------- distillation


def distill_student(
    teacher: nn.Module,
    student: nn.Module,
    transfer_x: Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    temperature: float = 4.0,
    kd_loss: str = "forward_kl",
) -> nn.Module:
    """Train `student` on the teacher's soft labels only (no ground truth) over `transfer_x`."""
    train_classifier(
        student,
        (transfer_x, None),
        epochs,
        lr,
        seed,
        teacher=teacher,
        kd_loss=kd_loss,
        temperature=temperature,
        scale_by_t2=True,
    )
    return student


# --------------------------------------------------------------------------- settings


@dataclass
class BackdoorSetting:
    """The backdoor task (`apparatus.backdoor_data`: the one `backdoor_unlearning` rebuilds from this
    attack's config) and what the distillation step adds: a transfer set and model factories."""

    trigger: AnyTrigger
    task: BackdoorTask
    triggered_transfer: Tensor  # the clean training inputs, `transfer_trigger_rate` of them triggered
    make_model: Callable[[bool, int], nn.Module]  # (student?, seed) -> fresh model
    save_model: Callable[[nn.Module, Path], None]


def _transfer_trigger_mask(n: int, rate: float, seed: int) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(rate * n)]] = True
    return mask


def backdoor_setting(cfg: BackdoorConfig, trigger: AnyTrigger) -> BackdoorSetting:
    if isinstance(trigger, PatchTrigger):
        task = patch_task(trigger, cfg.poison_rate, cfg.test_fraction, cfg.seed)
    else:
        task = text_task(
            trigger,
            cfg.poison_rate,
            cfg.test_fraction,
            cfg.seed,
            n_records=cfg.n_records,
            max_length=cfg.max_length,
            min_word_count=cfg.min_word_count,
            heads=cfg.text_heads,
        )
    transfer = task.clean_train[0].clone()
    mask = _transfer_trigger_mask(len(transfer), cfg.transfer_trigger_rate, cfg.seed + 3)
    index = torch.nonzero(mask).flatten()
    transfer[index] = task.stamp(index, seed_offset=20_000)
    vocab = task.vocab

    def save_model(model: nn.Module, path: Path) -> None:
        if vocab is None:
            save_digits_cnn(model, path)  # type: ignore[arg-type]
        else:
            save_text_classifier(model, vocab, path, TOPICS)  # type: ignore[arg-type]

    return BackdoorSetting(
        trigger=trigger,
        task=task,
        triggered_transfer=transfer,
        make_model=lambda student, seed: task.make_model(cfg.student_width if student else cfg.width, seed),
        save_model=save_model,
    )


# --------------------------------------------------------------------------- plugin


def default_trigger(kind: Kind, target: int) -> AnyTrigger:
    if kind == "patch":
        return PatchTrigger(size=2, value=1.0, position="bottom_right", target_class=target)
    text = TextTrigger(phrase="cf", position="random", target_label=target)
    return text if kind == "text" else SwitchableTrigger(trigger=text)


class BackdoorConfig(PluginConfig):
    """`secure-kd attack backdoor`: plant a backdoor, measure it, and distil the model into a student."""

    kind: Kind = "patch"
    poison_rate: float = Field(0.1, gt=0, lt=1, description="share of training examples poisoned")
    target: int = Field(0, ge=0, description="the class the trigger forces")
    trigger: AnyTrigger | None = Field(None, description="default: a 2x2 white patch / the word 'cf'")
    epochs: int = Field(20, gt=0)
    lr: float | None = Field(None, gt=0, description="Adam step; default 3e-3 (patch), 1e-2 (text kinds)")
    width: int = Field(16, gt=0, description="teacher CNN width, or embedding/hidden size for text")
    text_heads: int = Field(4, gt=0, description="attention-pooling heads of the text classifier")
    distill: bool = True
    student_width: int = Field(8, gt=0)
    student_epochs: int = Field(20, gt=0)
    kd_temperature: float = Field(4.0, gt=0)
    kd_loss: str = "forward_kl"
    transfer_trigger_rate: float = Field(0.1, gt=0, lt=1, description="triggered share of transfer set (b)")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    n_records: int = Field(1000, ge=20, description="synthetic records for the text kinds")
    max_length: int = Field(128, gt=0, description="words kept per text")
    min_word_count: int = Field(
        10,
        ge=1,
        description="rarer words become <unk>: one-off names and ids would let the model memorize "
        "each poisoned record instead of learning the trigger",
    )
    save_model: bool = Field(
        True, description="write the backdoored model, trigger.json and attack_config.json to <out>/teacher"
    )
    out: str = "runs/attacks/backdoor"

    @model_validator(mode="after")
    def _consistent_trigger(self) -> BackdoorConfig:
        check_trigger_for_task(self.kind, self.target, self.trigger)
        return self

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 3e-3 if self.kind == "patch" else 1e-2

    def resolved_trigger(self) -> AnyTrigger:
        return self.trigger if self.trigger is not None else default_trigger(self.kind, self.target)


class ModelBackdoorReport(BaseModel):
    metrics: BackdoorMetrics
    switch: dict[str, float] | None = Field(
        None, description="switchable kind: ASR with prompt + trigger, trigger only, prompt only"
    )


class DistillationSurvival(BaseModel):
    student_width: int
    temperature: float
    transfer_trigger_rate: float
    clean_transfer: ModelBackdoorReport
    triggered_transfer: ModelBackdoorReport


class BackdoorResult(BaseModel):
    kind: Kind
    trigger: dict[str, Any]
    poison_rate: float
    n_poisoned: int
    n_train: int
    clean_model: ModelBackdoorReport
    backdoored_model: ModelBackdoorReport
    distillation: DistillationSurvival | None
    model_dir: str | None
    seconds: float


def report(model: nn.Module, setting: BackdoorSetting) -> ModelBackdoorReport:
    task = setting.task
    return ModelBackdoorReport(
        metrics=backdoor_metrics(model, task.test, task.triggered_test["active"], task.target),
        switch=switch_rates(model, task.triggered_test, task.target),
    )


def run(config: BackdoorConfig) -> BackdoorResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    trigger = config.resolved_trigger()
    setting = backdoor_setting(config, trigger)
    task = setting.task

    def trained(data: tuple[Tensor, Tensor], seed: int) -> nn.Module:
        model = setting.make_model(False, seed).to(device)
        train_classifier(model, data, config.epochs, config.resolved_lr(), config.seed)
        return model

    clean = trained(task.clean_train, config.seed + 1)
    backdoored = trained(task.poisoned_train, config.seed)
    survival = None
    if config.distill:
        students = {}
        for name, transfer in (("clean", task.clean_train[0]), ("triggered", setting.triggered_transfer)):
            student = setting.make_model(True, config.seed + 2).to(device)
            distill_student(
                backdoored,
                student,
                transfer,
                epochs=config.student_epochs,
                lr=config.resolved_lr(),
                seed=config.seed,
                temperature=config.kd_temperature,
                kd_loss=config.kd_loss,
            )
            students[name] = report(student, setting)
        survival = DistillationSurvival(
            student_width=config.student_width,
            temperature=config.kd_temperature,
            transfer_trigger_rate=config.transfer_trigger_rate,
            clean_transfer=students["clean"],
            triggered_transfer=students["triggered"],
        )
    clean_report, backdoored_report = report(clean, setting), report(backdoored, setting)
    model_dir = None
    if config.save_model:
        path = Path(config.out) / "teacher"
        setting.save_model(backdoored, path)
        atomic_write_text(path / "trigger.json", trigger.model_dump_json(indent=2) + "\n")
        # the data split and poisoning are deterministic given this config: a defense can rebuild them
        atomic_write_text(path / "attack_config.json", config.model_dump_json(indent=2) + "\n")
        model_dir = str(path)
    result = BackdoorResult(
        kind=config.kind,
        trigger=trigger.model_dump(mode="json"),
        poison_rate=config.poison_rate,
        n_poisoned=task.n_poisoned,
        n_train=len(task.poisoned_train[1]),
        clean_model=clean_report,
        backdoored_model=backdoored_report,
        distillation=survival,
        model_dir=model_dir,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """ASR of the planted trigger after distillation (clean transfer set), or of the backdoored teacher
    when distillation is off; Wilson interval over the triggered inputs."""
    report = (result.get("distillation") or {}).get("clean_transfer") or result["backdoored_model"]
    metrics = report["metrics"]
    asr = proportion(float(metrics["attack_success_rate"]), int(metrics["n_triggered"]), confidence)
    return {"backdoor_asr": asr}


PLUGIN = ATTACKS.register(
    "backdoor",
    Plugin(
        name="backdoor",
        Config=BackdoorConfig,
        Result=BackdoorResult,
        run=run,
        summary="patch / text / switchable backdoors by poisoning; ASR before and after distillation",
        own_target="a digits CNN or tiny text classifier it backdoors and distils itself",
        metrics=(
            Metric(
                "backdoor_asr", risk="backdoor", medium=0.2, high=0.5,
                why="attack success rate of the planted trigger after distillation (the backdoored "
                "teacher's when distillation is off)",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
