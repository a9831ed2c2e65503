"""Total variation distance between the teacher's and the student's token distributions."""

from __future__ import annotations

import torch
from torch import Tensor

from secure_kd.losses.base import logit_objective, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.functional import TokenKernel, through_softmax_
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


def _tvd_kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
    diff = torch.sub(c.student, c.teacher, out=c.log_teacher)  # q - p
    loss = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
    if not want_grad:
        return loss, None, None
    # d loss / dq = 0.5 * sign(q - p) (0 where equal), then through the softmax
    return loss, None, through_softmax_(diff.sign_().mul_(0.5), c.student, c.log_student)


def tvd_kernel() -> TokenKernel:
    return _tvd_kernel


@register_loss("tvd", kernel_factory=tvd_kernel)
@with_common_args_doc
def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """TVD per token = 0.5 * sum_v |p_teacher - p_student|, in [0, 1] (the subgradient of |x| at 0 is 0)."""
    return logit_objective(
        _tvd_kernel,
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
