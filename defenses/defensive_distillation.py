"""Defensive distillation (Papernot et al., S&P 2016) and why it is not a defense (Carlini & Wagner 2017).

Recipe: a teacher is trained with cross-entropy on softmax(z / T); a student of the same architecture
is distilled from the teacher's soft labels at the same T (forward KL at T, scaled by T**2, no hard
labels); at test time the student runs at T = 1, i.e. its raw logits. Trained at high T, the logits
grow roughly T-fold, so softmax at T = 1 saturates and the cross-entropy gradient w.r.t. the input
vanishes (in float32 often to exactly zero): gradient-sign attacks such as FGSM fail. The decision
boundary barely moves, so Carlini-Wagner L2, which works on the logit margin, still finds small
adversarial examples (Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
2017). This module measures both directions on the digits CNN: the undefended model (plain CE at
T = 1) and one distilled model per T in `temperatures`. It is gradient masking, not robustness.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field, field_validator

from apparatus.classifiers import evaluate_classifier, predict_logits, train_classifier
from apparatus.digits import DigitsCNN, DigitsData, load_digits_data, make_digits_cnn
from apparatus.perturbations import CWParams, attack_stats, carlini_wagner_l2, fgsm
from defenses import DEFENSES
from secure_kd.models import resolve_device
from secure_kd.plugins import Plugin, PluginConfig, write_result


class CWSettings(CWParams):  # a shorter search than carlini_wagner_l2 runs by default
    binary_search_steps: int = Field(4, ge=1, description="rounds of the per-example search over c")
    max_iter: int = Field(60, ge=1, description="Adam steps per round")


class DefensiveDistillationConfig(PluginConfig):
    """`secure-kd defend defensive_distillation`: FGSM and CW-L2 success vs distillation temperature."""

    temperatures: list[float] = Field(default_factory=lambda: [20.0, 50.0, 100.0], min_length=1)
    width: int = Field(16, gt=0, description="teacher and student CNN width (Papernot: same architecture)")
    epochs: int = Field(20, gt=0, description="teacher epochs (and the undefended model's)")
    student_epochs: int = Field(20, gt=0)
    lr: float = Field(3e-3, gt=0)
    fgsm_eps: list[float] = Field(default_factory=lambda: [0.1, 0.2], min_length=1)
    run_cw: bool = True
    cw: CWSettings = CWSettings()
    n_examples: int | None = Field(200, gt=0, description="attack the first n test images (None: all)")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    out: str = "runs/defenses/defensive_distillation"

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, temperatures: list[float]) -> list[float]:
        if any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be > 0 (e.g. [20, 50, 100]), got {temperatures}")
        return temperatures

    @field_validator("fgsm_eps")
    @classmethod
    def _radii(cls, radii: list[float]) -> list[float]:
        if any(not 0 < e <= 1 for e in radii):
            raise ValueError(f"fgsm_eps values must be in (0, 1] (inputs are in [0, 1]), got {radii}")
        return radii


class ModelRobustness(BaseModel):
    name: str
    temperature: float | None = Field(description="distillation temperature; None for the undefended model")
    clean_accuracy: float
    fgsm_success: dict[str, float] = Field(
        description="eps -> success rate among correctly classified inputs"
    )
    cw_success: float | None
    cw_mean_l2: float | None
    mean_abs_logit: float = Field(description="mean |logit| at T=1 (grows with T: saturated softmax)")


class DefensiveDistillationResult(BaseModel):
    models: list[ModelRobustness]
    n_examples: int
    seconds: float


def distilled_model(
    data: DigitsData, temperature: float, config: DefensiveDistillationConfig, device: str
) -> DigitsCNN:
    """Teacher trained at T, student distilled from it at T (T**2-scaled soft labels only)."""
    teacher = make_digits_cnn(config.width, config.seed).to(device)
    train_classifier(teacher, data.train, config.epochs, config.lr, config.seed, ce_temperature=temperature)
    student = make_digits_cnn(config.width, config.seed + 1).to(device)
    train_classifier(
        student,
        (data.x_train, None),
        config.student_epochs,
        config.lr,
        config.seed,
        teacher=teacher,
        kd_loss="forward_kl",
        temperature=temperature,
        scale_by_t2=True,
    )
    return student


def robustness(
    model: DigitsCNN, name: str, temperature: float | None, x, y, config: DefensiveDistillationConfig
) -> ModelRobustness:
    fgsm_success = {
        str(eps): attack_stats(model, x, y, fgsm(model, x, y, eps), "fgsm", eps).success_rate
        for eps in config.fgsm_eps
    }
    cw_success = cw_l2 = None
    if config.run_cw:
        stats = attack_stats(
            model, x, y, carlini_wagner_l2(model, x, y, **config.cw.model_dump()), "cw", None
        )
        cw_success, cw_l2 = stats.success_rate, stats.mean_l2
    return ModelRobustness(
        name=name,
        temperature=temperature,
        clean_accuracy=evaluate_classifier(model, x, y),
        fgsm_success=fgsm_success,
        cw_success=cw_success,
        cw_mean_l2=cw_l2,
        mean_abs_logit=float(predict_logits(model, x).abs().mean()),
    )


def run(config: DefensiveDistillationConfig) -> DefensiveDistillationResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    data = load_digits_data(config.test_fraction, config.seed)
    x, y = data.test
    if config.n_examples is not None:
        x, y = x[: config.n_examples], y[: config.n_examples]
    x, y = x.to(device), y.to(device)
    undefended = make_digits_cnn(config.width, config.seed).to(device)
    train_classifier(undefended, data.train, config.epochs, config.lr, config.seed)
    models = [robustness(undefended, "undefended", None, x, y, config)]
    for temperature in config.temperatures:
        student = distilled_model(data, temperature, config, device)
        models.append(robustness(student, f"distilled_T{temperature:g}", temperature, x, y, config))
    result = DefensiveDistillationResult(
        models=models, n_examples=len(y), seconds=time.perf_counter() - started
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "defensive_distillation",
    Plugin(
        name="defensive_distillation",
        Config=DefensiveDistillationConfig,
        Result=DefensiveDistillationResult,
        run=run,
        summary="defensive distillation at T: FGSM success falls, Carlini-Wagner L2 still succeeds",
    ),
)
