"""Adversarial examples against image classifiers with inputs in [0, 1]: FGSM, PGD (L-inf), Carlini-Wagner L2.

The perturbations themselves (`fgsm`, `pgd`, `carlini_wagner_l2`: untargeted on the true labels,
gradients with respect to the inputs only) and their scoring (`attack_stats`: success rate among the
examples the model classified correctly, robust accuracy, mean L2 / L-inf norms of the successful
perturbations) live in `apparatus.perturbations`, shared with the defenses, and are re-exported here.
The `adversarial` plugin runs them on the digits CNN (`apparatus.digits`), freshly trained or loaded
from a directory written by `save_digits_cnn`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from torch import Tensor, nn

from apparatus.classifiers import evaluate_classifier, train_classifier
from apparatus.digits import load_digits_cnn, load_digits_data, make_digits_cnn, save_digits_cnn
from apparatus.perturbations import (  # noqa: F401  (re-exported: attacks.adversarial's public names)
    AttackName,
    AttackStats,
    CWParams,
    attack_stats,
    carlini_wagner_l2,
    fgsm,
    pgd,
    project_linf,
    success_mask,
)
from attacks import ATTACKS
from secure_kd.models import resolve_device
from secure_kd.plugins import Metric, Plugin, PluginConfig, write_result
from secure_kd.readings import Reading, proportion

# --------------------------------------------------------------------------- plugin


class CWOptions(CWParams):  # the attack's CW settings: carlini_wagner_l2's defaults
    pass


class AdversarialConfig(PluginConfig):
    """`secure-kd attack adversarial`: FGSM / PGD / CW-L2 on the digits CNN."""

    attack: AttackName = "pgd"
    eps: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2], description="L-inf radii (FGSM, PGD)")
    steps: int = Field(20, ge=1, description="PGD steps")
    step_size: float | None = Field(None, gt=0, description="PGD step; default 2.5 * eps / steps")
    random_start: bool = True
    cw: CWOptions = CWOptions()
    model: str = Field("train", description="'train' a fresh CNN, or a directory written by save_digits_cnn")
    width: int = Field(16, gt=0)
    epochs: int = Field(20, gt=0)
    lr: float = Field(3e-3, gt=0)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    n_examples: int | None = Field(None, gt=0, description="attack the first n test images (default all)")
    save_model: bool = Field(True, description="write a freshly trained model to <out>/model")
    out: str = "runs/attacks/adversarial"

    @field_validator("eps", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        return [value] if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _check(self) -> AdversarialConfig:
        if self.attack != "cw" and not self.eps:
            raise ValueError("eps is empty; give at least one L-inf radius for fgsm/pgd")
        if any(not 0 <= e <= 1 for e in self.eps):
            raise ValueError(f"eps values must be in [0, 1] (inputs are scaled to [0, 1]), got {self.eps}")
        if self.model != "train" and not Path(self.model).is_dir():
            raise ValueError(
                f"model {self.model!r} is neither 'train' nor a directory written by save_digits_cnn"
            )
        return self


class AdversarialResult(BaseModel):
    attack: AttackName
    model_source: str
    clean_accuracy: float
    results: list[AttackStats]
    model_dir: str | None
    seconds: float


def run_attack(
    model: nn.Module, x: Tensor, y: Tensor, config: AdversarialConfig, eps: float | None
) -> Tensor:
    if config.attack == "fgsm":
        return fgsm(model, x, y, eps)
    if config.attack == "pgd":
        return pgd(
            model,
            x,
            y,
            eps,
            steps=config.steps,
            step_size=config.step_size,
            random_start=config.random_start,
            seed=config.seed,
        )
    return carlini_wagner_l2(model, x, y, **config.cw.model_dump())


def run(config: AdversarialConfig) -> AdversarialResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    data = load_digits_data(config.test_fraction, config.seed)
    model_dir = None
    if config.model == "train":
        model = make_digits_cnn(config.width, config.seed).to(device)
        train_classifier(model, data.train, config.epochs, config.lr, config.seed)
        if config.save_model:
            model_dir = str(save_digits_cnn(model, Path(config.out) / "model"))
    else:
        model = load_digits_cnn(config.model, device)
        model_dir = config.model
    x, y = data.test
    if config.n_examples is not None:
        x, y = x[: config.n_examples], y[: config.n_examples]
    x, y = x.to(device), y.to(device)
    radii: list[float | None] = [None] if config.attack == "cw" else list(config.eps)
    results = [
        attack_stats(model, x, y, run_attack(model, x, y, config, eps), config.attack, eps) for eps in radii
    ]
    result = AdversarialResult(
        attack=config.attack,
        model_source=config.model,
        clean_accuracy=evaluate_classifier(model, x, y),
        results=results,
        model_dir=model_dir,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


def readings(result: dict[str, Any], samples: int, confidence: float) -> dict[str, Reading]:
    """The success rate at the smallest radius attacked, Wilson interval over the correct inputs."""
    stats = result.get("results") or []
    if not stats:
        return {}
    smallest = min(stats, key=lambda s: math.inf if s.get("eps") is None else s["eps"])
    rate = proportion(float(smallest["success_rate"]), int(smallest["n_correct"]), confidence)
    return {"adversarial_success_rate": rate}


PLUGIN = ATTACKS.register(
    "adversarial",
    Plugin(
        name="adversarial",
        Config=AdversarialConfig,
        Result=AdversarialResult,
        run=run,
        summary="FGSM, PGD (L-inf) and Carlini-Wagner L2 on the digits CNN; success rates and norms",
        target="model",
        kinds=("digits_cnn",),
        own_target="a digits CNN it trains itself",
        metrics=(
            Metric(
                "adversarial_success_rate", risk="evasion", medium=0.3, high=0.7,
                why="share of correctly classified inputs flipped at the smallest radius attacked",
            ),
        ),
        measure=readings,
    ),
)  # fmt: skip
