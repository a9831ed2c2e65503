"""Adversarial perturbations of image classifiers with inputs in [0, 1]: FGSM, PGD (L-inf), Carlini-Wagner L2.

- `fgsm` (Goodfellow et al. 2015): one step of size eps along the sign of the loss gradient.
- `pgd` (Madry et al. 2018): optional uniform random start in the eps-ball, `steps` signed-gradient
  steps of `step_size`, each projected back onto the eps-ball and the [0, 1] box.
- `carlini_wagner_l2` (Carlini & Wagner 2017): minimise ||x' - x||_2^2 + c * max(Z_y - max_{i!=y} Z_i,
  -kappa) over x' = (tanh(w) + 1) / 2 with Adam; a per-example binary search over c keeps the smallest
  successful perturbation. Inputs where no c succeeds are returned unchanged.

All are untargeted on the true labels, keep the model's parameters untouched (gradients are taken with
respect to the inputs only) and return new tensors. `attack_stats` scores them: success rate among the
examples the model classified correctly, robust accuracy, and mean L2 / L-inf norms of the successful
perturbations. Shared by the `adversarial` attack and the adversarial-robustness defenses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn

from apparatus.classifiers import predict_logits
from secure_kd.config import Strict

AttackName = Literal["fgsm", "pgd", "cw"]


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"inputs must be floating point in [0, 1], got {x.dtype}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError("inputs must lie in [0, 1] (scale images before attacking them)")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [batch] to match inputs {tuple(x.shape)}, got {tuple(y.shape)}")


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
        raise ValueError(
            f"eps must be a finite number >= 0 (an L-inf radius in [0, 1] pixel units), got {eps!r}"
        )
    return float(eps)


def _loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip `x_adv` into the eps-ball around `x`, then into the [0, 1] box (both hold afterwards)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """x + eps * sign(grad_x CE(model(x), y)), kept in the eps-ball and [0, 1]."""
    _check_inputs(x, y)
    eps = _check_eps(eps)
    model.eval()
    return project_linf(x + eps * _loss_gradient(model, x, y).sign(), x, eps).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
) -> Tensor:
    """L-inf PGD; `step_size` defaults to 2.5 * eps / steps (Madry et al.)."""
    _check_inputs(x, y)
    eps = _check_eps(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    alpha = 2.5 * eps / steps if step_size is None else _check_eps(step_size)
    model.eval()
    x_adv = x.clone()
    if random_start:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        x_adv = project_linf(x + eps * noise, x, eps)
    for _ in range(steps):
        x_adv = project_linf(x_adv + alpha * _loss_gradient(model, x_adv, y).sign(), x, eps)
    return x_adv.detach()


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """Z_y - max_{i != y} Z_i per example (negative = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - others


class CWParams(Strict):
    """The settings of `carlini_wagner_l2` (its keyword arguments, with its defaults), for configs."""

    confidence: float = Field(0.0, ge=0, description="kappa: the margin below 0 that counts as adversarial")
    initial_const: float = Field(1.0, gt=0, description="the first c of the binary search")
    binary_search_steps: int = Field(6, ge=1, description="rounds of the per-example search over c")
    max_iter: int = Field(100, ge=1, description="Adam steps per round")
    learning_rate: float = Field(0.05, gt=0, description="Adam's learning rate on w (x' = (tanh(w) + 1) / 2)")


def carlini_wagner_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    confidence: float = 0.0,
    initial_const: float = 1.0,
    binary_search_steps: int = 6,
    max_iter: int = 100,
    learning_rate: float = 0.05,
) -> Tensor:
    """Untargeted CW-L2; an example counts as adversarial once Z_y - max_{i!=y} Z_i < -confidence
    (for confidence 0: once the argmax leaves y)."""
    _check_inputs(x, y)
    if confidence < 0 or initial_const <= 0 or learning_rate <= 0 or binary_search_steps < 1 or max_iter < 1:
        raise ValueError(
            "carlini_wagner_l2 needs confidence >= 0, initial_const > 0, learning_rate > 0, "
            f"binary_search_steps >= 1, max_iter >= 1 (got {confidence}, {initial_const}, "
            f"{learning_rate}, {binary_search_steps}, {max_iter})"
        )
    model.eval()
    n = x.shape[0]
    flat = lambda t: t.reshape(n, -1)  # noqa: E731
    # 1 - 1e-6 keeps atanh finite at the box edges 0 and 1
    w_start = torch.atanh((2 * x - 1) * (1 - 1e-6)).detach()
    const = torch.full((n,), float(initial_const), device=x.device)
    lower = torch.zeros(n, device=x.device)
    upper = torch.full((n,), float("inf"), device=x.device)
    best_l2 = torch.full((n,), float("inf"), device=x.device)
    best = x.clone()
    for _ in range(binary_search_steps):
        w = w_start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=learning_rate)
        succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
        for _ in range(max_iter):
            candidate = (torch.tanh(w) + 1) / 2
            l2_squared = flat(candidate - x).pow(2).sum(1)
            margin = _margin(model(candidate), y)
            loss = (l2_squared + const * (margin + confidence).clamp_min(0)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # score the iterate the loss was computed on
                hit = margin < -confidence if confidence > 0 else margin < 0
                l2 = l2_squared.sqrt()
                improved = hit & (l2 < best_l2)
                best_l2 = torch.where(improved, l2, best_l2)
                best[improved] = candidate[improved].detach()
                succeeded |= hit
        with torch.no_grad():
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
    return best.detach()


# --------------------------------------------------------------------------- scoring


class AttackStats(BaseModel):
    attack: AttackName
    eps: float | None = Field(description="L-inf radius (None for CW, whose L2 is unbounded)")
    n_examples: int
    n_correct: int = Field(description="examples the model classified correctly before the attack")
    success_rate: float = Field(description="share of the correctly classified examples misclassified after")
    robust_accuracy: float = Field(description="accuracy on the adversarial inputs, all examples")
    mean_l2: float | None = Field(description="mean L2 norm of the successful perturbations")
    mean_linf: float | None = Field(description="mean L-inf norm of the successful perturbations")


def success_mask(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """(correct before, misclassified after) per example; success = both."""
    clean = predict_logits(model, x).argmax(-1) == y.cpu()
    fooled = predict_logits(model, x_adv).argmax(-1) != y.cpu()
    return clean, fooled


def attack_stats(
    model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, attack: AttackName, eps: float | None
) -> AttackStats:
    clean, fooled = success_mask(model, x, y, x_adv)
    success = clean & fooled
    delta = (x_adv - x).detach().cpu().reshape(x.shape[0], -1).double()[success]
    n_correct = int(clean.sum())
    return AttackStats(
        attack=attack,
        eps=eps,
        n_examples=x.shape[0],
        n_correct=n_correct,
        success_rate=float(success.sum()) / n_correct if n_correct else 0.0,
        robust_accuracy=float((~fooled).double().mean()),
        mean_l2=float(delta.norm(dim=1).mean()) if len(delta) else None,
        mean_linf=float(delta.abs().amax(dim=1).mean()) if len(delta) else None,
    )
