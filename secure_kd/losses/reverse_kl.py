"""Reverse KL, KL(student || teacher): mode-seeking (MiniLLM, GKD at beta=1)."""

from __future__ import annotations

from torch import Tensor

from secure_kd.losses.base import logit_objective, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.functional import TokenKernel, clamp_logs_, row_dot
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


def _reverse_kl_kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
    clamp_logs_(c.log_student, c.log_teacher)
    log_ratio = c.log_student.sub_(c.log_teacher)  # log q - log p
    loss = row_dot(c.student, log_ratio, c.log_teacher)
    if not want_grad:
        return loss, None, None
    # d KL(q || p) / dz = q * (log q - log p - KL)
    return loss, None, log_ratio.sub_(loss[:, None]).mul_(c.student)


def reverse_kl_kernel() -> TokenKernel:
    return _reverse_kl_kernel


@register_loss("reverse_kl", kernel_factory=reverse_kl_kernel)
@with_common_args_doc
def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """KL(p_student || p_teacher) per token = sum_v p_s (log p_s - log p_t).

    Equals TRL's `generalized_jsd_loss(beta=1)` with labels. A teacher with zero probability where
    the student has mass makes it infinite (here a huge finite number); with `tail="uniform"` the
    teacher's tail is floored at the dtype's smallest normal number so it stays finite.
    """
    return logit_objective(
        _reverse_kl_kernel,
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
