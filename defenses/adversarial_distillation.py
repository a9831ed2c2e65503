"""Adversarial robustness distillation: MTARD and a progressive (ProARD-style) chain of students.

MTARD (Zhao et al., "Enhanced Accuracy and Robustness via Multi-Teacher Adversarial Distillation",
ECCV 2022): a clean teacher (plain CE) guides the student on clean inputs and an adversarially trained
teacher (PGD-AT, Madry et al. 2018) guides it on adversarial examples of the student:

    x_adv = PGD_eps(student, x, y)                      (L-inf, maximising the student's CE)
    L     = w_adv * KL(T_adv(x_adv) || S(x_adv)) + w_nat * KL(T_nat(x) || S(x))

The weights follow MTARD's adaptive normalisation loss-balance as in the authors' public code: with
l_adv, l_nat the current losses divided by their values at the first step,
    w_nat <- w_nat - eta * (w_nat - l_nat**beta / (l_adv**beta + l_nat**beta)),  w_adv = 1 - w_nat,
a convex step towards the share of relative loss still to learn, so both stay in [0, 1] and sum to 1.

Progressive variant (secure-kd's reading of ProARD-style progressive distillation; not the paper's
weight-sharing supernet): students of decreasing `widths` are distilled one after the other with the
same MTARD loss, each using the previous (wider) robust student as its adversarial teacher and the
clean teacher unchanged. Baselines at every width: plain CE training and PGD adversarial training of
the same student for the same number of epochs. Reported: clean accuracy and PGD robust accuracy on
the digits test set. Empirical robustness against one attack, not a certificate.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from apparatus.classifiers import evaluate_classifier, train_classifier
from apparatus.digits import load_digits_data, make_digits_cnn
from apparatus.perturbations import pgd
from defenses import DEFENSES
from secure_kd.models import resolve_device
from secure_kd.plugins import Plugin, PluginConfig, write_result


def balance_step(
    w_nat: float,
    loss_adv: float,
    loss_nat: float,
    init_adv: float,
    init_nat: float,
    eta: float,
    beta: float = 1.0,
) -> tuple[float, float]:
    """One MTARD weight update: returns (w_adv, w_nat)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(
            f"weight learning rate eta must be in [0, 1] to keep the weights in [0, 1], got {eta}"
        )
    rate_adv = (loss_adv / max(init_adv, 1e-12)) ** beta
    rate_nat = (loss_nat / max(init_nat, 1e-12)) ** beta
    total = rate_adv + rate_nat
    share_nat = rate_nat / total if total > 0 else 0.5
    w_nat = w_nat - eta * (w_nat - share_nat)
    return 1.0 - w_nat, w_nat


def _kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    return F.kl_div(
        F.log_softmax(student_logits, -1),
        F.log_softmax(teacher_logits, -1),
        log_target=True,
        reduction="batchmean",
    )


def mtard_distill(
    student: nn.Module,
    nat_teacher: nn.Module,
    adv_teacher: nn.Module,
    data: tuple[Tensor, Tensor],
    *,
    eps: float,
    steps: int,
    epochs: int,
    lr: float,
    seed: int,
    eta: float = 0.025,
    beta: float = 1.0,
    batch_size: int = 64,
) -> list[tuple[float, float]]:
    """Train `student` in place; returns the (w_adv, w_nat) after every step."""
    nat_teacher.eval()
    adv_teacher.eval()
    x_all, y_all = data
    device = next(student.parameters()).device
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    w_adv, w_nat = 0.5, 0.5
    init_adv = init_nat = None
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=generator)
        for batch, start in enumerate(range(0, len(y_all), batch_size)):
            index = order[start : start + batch_size]
            x, y = x_all[index].to(device), y_all[index].to(device)
            x_adv = pgd(student, x, y, eps, steps=steps, seed=seed + 1000 * epoch + batch)
            with torch.no_grad():
                nat_target, adv_target = nat_teacher(x), adv_teacher(x_adv)
            student.train()
            loss_adv, loss_nat = _kl(student(x_adv), adv_target), _kl(student(x), nat_target)
            if init_adv is None:
                init_adv, init_nat = loss_adv.detach().item(), loss_nat.detach().item()
            w_adv, w_nat = balance_step(
                w_nat, loss_adv.detach().item(), loss_nat.detach().item(), init_adv, init_nat, eta, beta
            )
            loss = w_adv * loss_adv + w_nat * loss_nat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append((w_adv, w_nat))
    student.eval()
    return history


class AdversarialDistillationConfig(PluginConfig):
    """`secure-kd defend adversarial_distillation`: MTARD / progressive students vs PGD-AT and plain."""

    teacher_width: int = Field(16, gt=0)
    widths: list[int] = Field(
        default_factory=lambda: [8, 4],
        min_length=1,
        description="student widths; more than one = the progressive chain",
    )
    progressive: bool = Field(True, description="each later student uses the previous one as adv. teacher")
    eps: float = Field(0.1, gt=0, le=1, description="L-inf radius for training and evaluation")
    train_steps: int = Field(5, ge=1, description="PGD steps when generating training examples")
    eval_steps: int = Field(20, ge=1, description="PGD steps at evaluation")
    teacher_epochs: int = Field(15, gt=0)
    epochs: int = Field(15, gt=0, description="student epochs (MTARD, PGD-AT and plain alike)")
    lr: float = Field(3e-3, gt=0)
    weight_lr: float = Field(0.025, ge=0, le=1, description="MTARD eta (weight update step)")
    weight_beta: float = Field(1.0, gt=0, description="MTARD beta (exponent on relative losses)")
    n_examples: int | None = Field(None, gt=0, description="evaluate on the first n test images (None: all)")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    out: str = "runs/defenses/adversarial_distillation"

    @model_validator(mode="after")
    def _widths(self) -> AdversarialDistillationConfig:
        if any(w > self.teacher_width for w in self.widths):
            raise ValueError(
                f"student widths {self.widths} must not exceed teacher_width={self.teacher_width}"
            )
        if self.progressive and self.widths != sorted(self.widths, reverse=True):
            raise ValueError(
                f"progressive distillation goes from wide to narrow: sort widths descending, got "
                f"{self.widths}"
            )
        return self


class Scores(BaseModel):
    clean_accuracy: float
    robust_accuracy: float


class StudentReport(BaseModel):
    width: int
    adv_teacher: str
    mtard: Scores
    pgd_at: Scores
    plain: Scores
    final_weights: tuple[float, float] = Field(description="(w_adv, w_nat) after the last step")
    weight_range: tuple[float, float] = Field(description="smallest and largest w_adv seen")


class AdversarialDistillationResult(BaseModel):
    eps: float
    nat_teacher: Scores
    adv_teacher: Scores
    students: list[StudentReport]
    seconds: float


def run(config: AdversarialDistillationConfig) -> AdversarialDistillationResult:
    started = time.perf_counter()
    device = resolve_device(config.device)
    data = load_digits_data(config.test_fraction, config.seed)
    x_test, y_test = data.test
    if config.n_examples is not None:
        x_test, y_test = x_test[: config.n_examples], y_test[: config.n_examples]
    x_test, y_test = x_test.to(device), y_test.to(device)

    def adversarial(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd(model, x, y, config.eps, steps=config.train_steps, seed=config.seed)

    def scores(model: nn.Module) -> Scores:
        x_adv = pgd(model, x_test, y_test, config.eps, steps=config.eval_steps, seed=config.seed + 1)
        return Scores(
            clean_accuracy=evaluate_classifier(model, x_test, y_test),
            robust_accuracy=evaluate_classifier(model, x_adv, y_test),
        )

    def trained(width: int, seed: int, epochs: int, robust: bool) -> nn.Module:
        model = make_digits_cnn(width, seed).to(device)
        train_classifier(
            model, data.train, epochs, config.lr, config.seed, perturb=adversarial if robust else None
        )
        return model

    nat_teacher = trained(config.teacher_width, config.seed, config.teacher_epochs, robust=False)
    adv_teacher = trained(config.teacher_width, config.seed + 1, config.teacher_epochs, robust=True)
    students, previous, previous_name = [], adv_teacher, f"pgd_at_teacher(width={config.teacher_width})"
    for width in config.widths:
        student = make_digits_cnn(width, config.seed + 2).to(device)
        history = mtard_distill(
            student,
            nat_teacher,
            previous,
            data.train,
            eps=config.eps,
            steps=config.train_steps,
            epochs=config.epochs,
            lr=config.lr,
            seed=config.seed,
            eta=config.weight_lr,
            beta=config.weight_beta,
        )
        adv_weights = [w for w, _ in history]
        students.append(
            StudentReport(
                width=width,
                adv_teacher=previous_name,
                mtard=scores(student),
                pgd_at=scores(trained(width, config.seed + 2, config.epochs, robust=True)),
                plain=scores(trained(width, config.seed + 2, config.epochs, robust=False)),
                final_weights=history[-1],
                weight_range=(min(adv_weights), max(adv_weights)),
            )
        )
        if config.progressive:
            previous, previous_name = student, f"mtard_student(width={width})"
    result = AdversarialDistillationResult(
        eps=config.eps,
        nat_teacher=scores(nat_teacher),
        adv_teacher=scores(adv_teacher),
        students=students,
        seconds=time.perf_counter() - started,
    )
    write_result(config.out, result)
    return result


PLUGIN = DEFENSES.register(
    "adversarial_distillation",
    Plugin(
        name="adversarial_distillation",
        Config=AdversarialDistillationConfig,
        Result=AdversarialDistillationResult,
        run=run,
        summary="MTARD and progressive robust distillation vs PGD adversarial training: clean / PGD accuracy",
    ),
)
