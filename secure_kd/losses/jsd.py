"""Generalized Jensen-Shannon divergence, exactly as TRL's `GKDTrainer.generalized_jsd_loss`."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from secure_kd.losses.base import logit_objective, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.forward_kl import forward_kl_kernel
from secure_kd.losses.functional import TokenKernel, clamp_logs_, kl_sum, mixture_, row_dot
from secure_kd.losses.params import LossParams
from secure_kd.losses.reverse_kl import reverse_kl_kernel
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


class JSDParams(LossParams):
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the teacher in the mixture m = beta*teacher + (1-beta)*student; "
        "0 is KL(teacher||student), 1 is KL(student||teacher) (TRL's convention)",
    )


def jsd_kernel(beta: float = 0.5) -> TokenKernel:
    beta = JSDParams.checked("jsd", beta=beta).beta
    # the endpoints are not limits of the mixture formula (it tends to 0 there): TRL defines them
    if beta == 0.0:
        return forward_kl_kernel()
    if beta == 1.0:
        return reverse_kl_kernel()

    def kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
        log_m = mixture_(c.scratch("mixture"), c.teacher, c.student, beta).log_()
        clamp_logs_(c.log_student, c.log_teacher, log_m)
        kl_teacher = kl_sum(c.teacher, c.log_teacher, log_m, c.log_teacher)
        log_ratio = c.log_student.sub_(log_m)  # log q - log m
        kl_student = row_dot(c.student, log_ratio, c.log_teacher)
        loss = beta * kl_teacher + (1 - beta) * kl_student
        if not want_grad:
            return loss, None, None
        # d loss / dq = (1 - beta) * log(q / m) (the other terms cancel), then through the softmax
        return loss, None, log_ratio.sub_(kl_student[:, None]).mul_(c.student).mul_(1 - beta)

    return kernel


@register_loss("jsd", kernel_factory=jsd_kernel, params=JSDParams)
@with_common_args_doc
def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
    beta: float = 0.5,
) -> Tensor:
    """Generalized JSD (Agarwal et al., GKD), TRL's convention.

    m = beta * p_teacher + (1 - beta) * p_student;
    loss = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m), per token.
    beta = 0 is exactly KL(teacher || student) and beta = 1 exactly KL(student || teacher), as in
    TRL (not the limits of the formula, which vanish). beta must be in [0, 1].

    With labels, reduction="mean" equals TRL's reduction="batchmean" (sum over kept tokens / their
    number). Without labels TRL's "batchmean" divides the token sum by the batch size; here "mean"
    is always the mean over tokens (batch * seq of them), so the two differ by a factor seq_len.
    """
    return logit_objective(
        jsd_kernel(beta),
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
