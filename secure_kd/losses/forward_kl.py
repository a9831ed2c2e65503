"""Forward KL, KL(teacher || student): mean-seeking, the classic distillation objective."""

from __future__ import annotations

from torch import Tensor

from secure_kd.losses.base import logit_objective, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.functional import TokenKernel, clamp_logs_, kl_sum
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


def _forward_kl_kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
    clamp_logs_(c.log_student, c.log_teacher)
    loss = kl_sum(c.teacher, c.log_teacher, c.log_student, c.log_teacher)
    # d KL(p || softmax(z)) / dz = q - p
    return loss, None, c.student.sub_(c.teacher) if want_grad else None


def forward_kl_kernel() -> TokenKernel:
    return _forward_kl_kernel


@register_loss("forward_kl", kernel_factory=forward_kl_kernel)
@with_common_args_doc
def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """KL(p_teacher || p_student) per token = sum_v p_t (log p_t - log p_s).

    A true KL (it includes the teacher's entropy, so it is 0 when the distributions match), not the
    cross-entropy -sum p_t log p_s; the gradients are the same. Equals TRL's
    `generalized_jsd_loss(beta=0)` with labels.
    """
    return logit_objective(
        _forward_kl_kernel,
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
