"""Skew forward KL (DistiLLM): KL(p_t || alpha * p_t + (1 - alpha) * p_s)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from secure_kd.losses.base import logit_objective, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.forward_kl import forward_kl_kernel
from secure_kd.losses.functional import TokenKernel, clamp_logs_, kl_sum, mixture_, through_softmax_
from secure_kd.losses.params import LossParams
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


class SkewForwardKLParams(LossParams):
    alpha: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="weight of the teacher in the mixture alpha*teacher + (1-alpha)*student "
        "(DistiLLM's skew); 0 is the forward KL",
    )


def skew_forward_kl_kernel(alpha: float = 0.1) -> TokenKernel:
    alpha = SkewForwardKLParams.checked("skew_forward_kl", alpha=alpha).alpha
    if alpha == 0.0:
        return forward_kl_kernel()

    def kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
        mixture = mixture_(c.scratch("mixture"), c.teacher, c.student, alpha)
        log_m = torch.log(mixture, out=c.log_student)  # log q is not needed below
        clamp_logs_(c.log_teacher, log_m)
        loss = kl_sum(c.teacher, c.log_teacher, log_m, c.log_teacher)
        if not want_grad:
            return loss, None, None
        # d loss / dq = -(1 - alpha) * p / m, then through the softmax
        grad_q = torch.div(c.teacher, mixture.clamp_min_(torch.finfo(mixture.dtype).tiny), out=c.log_teacher)
        return loss, None, through_softmax_(grad_q.mul_(alpha - 1.0), c.student, c.log_student)

    return kernel


@register_loss("skew_forward_kl", kernel_factory=skew_forward_kl_kernel, params=SkewForwardKLParams)
@with_common_args_doc
def skew_forward_kl(
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
    """Skew forward KL (Ko et al., DistiLLM, 2024): KL(p_t || alpha * p_t + (1 - alpha) * p_s) per token.

    alpha in [0, 1): alpha = 0 is the forward KL; the mixture keeps the divergence bounded
    (by -log alpha) where the student assigns little mass.
    """
    return logit_objective(
        skew_forward_kl_kernel(alpha),
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
