"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from secure_kd.losses.base import logit_objective
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.functional import TokenKernel, clamp_logs_, kl_sum
from secure_kd.losses.inputs import check_fraction
from secure_kd.losses.params import LossParams
from secure_kd.losses.targets import ChunkProbs, log_softmax_
from secure_kd.topk import TopKLogits


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # no overflow for very negative x (a sudden jump of the loss)
    return z / (1.0 + z)


def taid_kernel(t: float) -> TokenKernel:
    """Per-token KL(r || q), r = softmax((1 - t) * sg(log q) + t * log p): the interpolated target."""
    t = check_fraction("t", t)

    def kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
        # log-probs differ from logits / T by a per-row constant, which the softmax removes; clamping
        # first keeps (1 - t) * log q finite where q = 0. The target is computed without autograd.
        clamp_logs_(c.log_student, c.log_teacher)
        log_r = torch.mul(c.log_student, 1.0 - t, out=c.scratch("target")).add_(c.log_teacher, alpha=t)
        r = c.log_teacher  # log p is not needed below
        log_softmax_(log_r, r)
        clamp_logs_(log_r)
        loss = kl_sum(r, log_r, c.log_student, log_r)
        # d KL(r || softmax(z)) / dz = q - r, with r held constant
        return loss, None, c.student.sub_(r) if want_grad else None

    return kernel


class TAIDParams(LossParams):
    """The arguments of `TAID(...)`."""

    t_start: float = Field(0.4, ge=0, lt=1, description="interpolation weight of the teacher at step 0")
    t_end: float = Field(1.0, gt=0, le=1, description="the most t reaches (at the end of the schedule)")
    alpha: float = Field(5e-4, ge=0, le=1, description="step size of the adaptive update of t")
    beta: float = Field(0.99, ge=0, le=1, description="momentum of the relative loss change")
    adaptive: bool = Field(True, description="false: t follows the linear schedule only")

    @model_validator(mode="after")
    def _start_before_end(self) -> TAIDParams:
        if self.t_start > self.t_end:
            raise ValueError(f"t_start={self.t_start} must be <= t_end={self.t_end}")
        return self


@register_loss("taid", stateful=True, params=TAIDParams)
class TAID(nn.Module):
    """TAID objective with its adaptive interpolation parameter `t` (a buffer, saved in state_dict).

    `get_loss("taid")` returns this class: instantiate it once per run, e.g. `TAID(t_start=0.4)`,
    call it like any logit objective, and call `update(loss, step, total_steps)` once per optimizer
    step (after `optimizer.step()`), with the step's distillation loss value (the mean over its
    micro-batches under gradient accumulation), the number of optimizer steps done so far and the
    planned total.

    Loss (Shing et al. 2025, Eq. 2-3; SakanaAI/TAID `distil_losses/taid.py`): the target is the
    interpolation p_t = softmax(((1 - t) * stopgrad(z_s) + t * z_t) / T) and the loss is
    KL(p_t || p_s) per token, a true KL (the reference implementation drops p_t's entropy, which has
    no gradient). At t = 1 it is exactly `forward_kl`. No gradient flows through the target.

    Update of t (the reference repository's `update_t`): on the first call only the loss is stored.
    Then rel = (prev_loss - loss) / (prev_loss + 1e-15); momentum = beta * momentum + (1 - beta) * rel;
    delta = alpha * sigmoid(momentum) * (1 - t); floor = t_start + (t_end - t_start) * step / total_steps;
    t = min(t_end, max(floor, t + delta)). So t never decreases, starts at t_start, stays <= t_end and
    reaches t_end at the end of the planned schedule at the latest.
    With `adaptive=False`, t follows the linear floor only.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        super().__init__()
        p = TAIDParams.checked(
            "taid", t_start=t_start, t_end=t_end, alpha=alpha, beta=beta, adaptive=adaptive
        )
        self.t_start, self.t_end = p.t_start, p.t_end
        self.alpha, self.beta, self.adaptive = p.alpha, p.beta, p.adaptive
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float64))
        self.register_buffer("prev_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("momentum", torch.tensor(0.0, dtype=torch.float64))

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | TopKLogits,
        labels: Tensor | None = None,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        tail: str | None = None,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Same arguments and reductions as `secure_kd.losses.forward_kl`, with the current `t`."""
        return logit_objective(
            taid_kernel(float(self.t)),
            student_logits,
            teacher_logits,
            labels,
            temperature=temperature,
            reduction=reduction,
            tail=tail,
            chunk_size=chunk_size,
        )

    @torch.no_grad()
    def update(self, loss: float | Tensor, step: int, total_steps: int) -> float:
        """Advance t after an optimizer step; returns the new t."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be the number of optimizer steps done, an int >= 0 (got {step!r})")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"total_steps must be the planned number of optimizer steps, >= 1 (got {total_steps!r})"
            )
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"TAID.update got a non-finite loss ({loss}); t is left unchanged")
        t = float(self.t)
        floor = self.t_start + (self.t_end - self.t_start) * min(step / total_steps, 1.0)
        if not self.adaptive:
            new_t = max(t, floor)
        elif math.isinf(float(self.prev_loss)):
            new_t = t
        else:
            prev = float(self.prev_loss)
            relative_change = (prev - loss) / (prev + 1e-15)
            momentum = self.beta * float(self.momentum) + (1 - self.beta) * relative_change
            self.momentum.fill_(momentum)
            delta = self.alpha * _sigmoid(momentum) * (1.0 - t)
            new_t = max(floor, t + delta)
        self.t.fill_(min(self.t_end, max(new_t, t)))
        self.prev_loss.fill_(loss)
        return float(self.t)

    def extra_repr(self) -> str:
        return (
            f"t={float(self.t):.4f}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
            f"beta={self.beta}, adaptive={self.adaptive}"
        )
