"""Cross-entropy of the student against the labels (the hard-label term; the teacher is ignored)."""

from __future__ import annotations

import torch
from torch import Tensor

from secure_kd.losses.base import logit_objective
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.functional import TokenKernel
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits


def _ce_kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
    labels = c.labels[:, None]
    loss = -c.log_student.gather(1, labels).squeeze(1)
    if not want_grad:
        return loss, None, None
    # d (-log q_y) / dz = q - onehot(y)
    return loss, None, c.student.scatter_add_(1, labels, torch.full_like(labels, -1, dtype=c.student.dtype))


def ce_kernel() -> TokenKernel:
    return _ce_kernel


@register_loss("ce", needs_teacher=False, sparse_teacher=False, kernel_factory=ce_kernel)
def ce(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits | None = None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """-log softmax(student_logits / temperature)[label] per kept token; `labels` is required.

    `teacher_logits` and `tail` are accepted for the uniform signature and ignored (pass None).
    Like every objective, the logits are divided by `temperature`; for the usual hard-label term of
    classic KD call it with temperature=1. Same masking and reductions as the other objectives; with
    reduction="mean" it equals `torch.nn.functional.cross_entropy(..., ignore_index=-100)`.
    """
    return logit_objective(
        _ce_kernel,
        student_logits,
        None,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=None,
        chunk_size=chunk_size,
        use_labels=True,
    )
