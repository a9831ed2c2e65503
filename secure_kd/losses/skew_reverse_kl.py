"""Skew reverse KL (DistiLLM): KL(p_s || alpha * p_s + (1 - alpha) * p_t)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from secure_kd.losses.base import logit_objective, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.functional import TokenKernel, clamp_logs_, mixture_, row_dot, through_softmax_
from secure_kd.losses.params import LossParams
from secure_kd.losses.reverse_kl import reverse_kl_kernel
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


class SkewReverseKLParams(LossParams):
    alpha: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="weight of the student in the mixture alpha*student + (1-alpha)*teacher "
        "(DistiLLM's skew); 0 is the reverse KL",
    )


def skew_reverse_kl_kernel(alpha: float = 0.1) -> TokenKernel:
    alpha = SkewReverseKLParams.checked("skew_reverse_kl", alpha=alpha).alpha
    if alpha == 0.0:
        return reverse_kl_kernel()

    def kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
        mixture = mixture_(c.scratch("mixture"), c.student, c.teacher, alpha)
        log_m = torch.log(mixture, out=c.log_teacher)  # log p is not needed below
        clamp_logs_(c.log_student, log_m)
        log_ratio = c.log_student.sub_(log_m)  # log q - log m
        loss = row_dot(c.student, log_ratio, c.teacher)
        if not want_grad:
            return loss, None, None
        # d loss / dq = log(q / m) + 1 - alpha * q / m, then through the softmax (which drops the
        # constant 1: q * (g - sum q g) is unchanged by adding a constant to g)
        grad_q = torch.div(c.student, mixture.clamp_min_(torch.finfo(mixture.dtype).tiny), out=c.teacher)
        grad_q.mul_(-alpha).add_(log_ratio)
        return loss, None, through_softmax_(grad_q, c.student, c.log_teacher)

    return kernel


@register_loss("skew_reverse_kl", kernel_factory=skew_reverse_kl_kernel, params=SkewReverseKLParams)
@with_common_args_doc
def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
    alpha: float = 0.1,
) -> Tensor:
    """Skew reverse KL (Ko et al., DistiLLM, 2024): KL(p_s || alpha * p_s + (1 - alpha) * p_t) per token.

    alpha in [0, 1): alpha = 0 is the reverse KL. The gradient flows through both occurrences of
    p_s (inside the mixture too), as in DistiLLM.
    """
    return logit_objective(
        skew_reverse_kl_kernel(alpha),
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
