"""Token-selective distillation: forward KL only where the teacher is more certain than the student.

Inspired by the direct-distillation part of TSD-KD (Kim & Baek, 2026, "Token-Selective Dual
Knowledge Distillation"), which distils selectively by the relative confidence of teacher and
student. The exact rule below is secure-kd's own.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from secure_kd.losses.base import token_losses_and_aux, with_common_args_doc
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.forward_kl import forward_kl_kernel
from secure_kd.losses.functional import clamp_logs_, entropy
from secure_kd.losses.inputs import TokenLayout
from secure_kd.losses.params import LossParams
from secure_kd.losses.targets import ChunkProbs
from secure_kd.topk import TopKLogits

_forward_kl = forward_kl_kernel()


class TokenSelectiveParams(LossParams):
    ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of each example's kept tokens to select (those with the largest gap)",
    )


def _kl_and_entropy_gap(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    clamp_logs_(c.log_student, c.log_teacher)
    scratch = c.scratch("entropy")
    gap = entropy(c.student, c.log_student, scratch) - entropy(c.teacher, c.log_teacher, scratch)
    loss, _, grad = _forward_kl(c, want_grad)
    return loss, gap[:, None], grad


def select_tokens(gap: Tensor, examples: Tensor, batch_size: int, ratio: float) -> Tensor:
    """bool [n]: per example, its ceil(ratio * n_b) largest gaps among those > 0 (ties: earlier token)."""
    n = gap.numel()
    counts = torch.bincount(examples, minlength=batch_size)
    # the 1e-9 keeps ratio * n_b exact for products like 0.3 * 10 = 3.0000000000000004
    quota = torch.ceil(counts.double() * ratio - 1e-9).long()
    by_gap = torch.argsort(gap, descending=True, stable=True)
    order = by_gap[torch.argsort(examples[by_gap], stable=True)]
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=gap.device) - group_start[examples[order]]
    return (rank < quota[examples]) & (gap > 0)


def _reduce_selected(losses: Tensor, selected: Tensor, layout: TokenLayout, reduction: str) -> Tensor:
    weights = selected.to(losses.dtype)
    weighted = losses * weights
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        return weighted.sum() / weights.sum().clamp_min(1)
    examples = layout.example_ids(losses.device)
    totals = losses.new_zeros(layout.batch_size).index_add(0, examples, weighted)
    counts = losses.new_zeros(layout.batch_size).index_add(0, examples, weights)
    return totals / counts.clamp_min(1)


@register_loss("token_selective", params=TokenSelectiveParams)
@with_common_args_doc
def token_selective(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    tail: str | None = None,
    chunk_size: int | None = None,
    ratio: float = 0.5,
) -> Tensor:
    """Forward KL on the tokens where the student is the less certain of the two.

    For each kept token i (at the temperature, on the compared support):
        gap_i = H(p_student,i) - H(p_teacher,i)   (entropies, computed without gradient)
    Within each example b with n_b kept tokens, the ceil(ratio * n_b) tokens with the largest gap
    are selected, keeping only those with gap_i > 0 (the teacher is more certain there); ties go
    to the earlier token. With s_i = 1 for a selected token and 0 otherwise:
        "mean": sum_i s_i KL_i / max(sum_i s_i, 1)        (mean over the selected tokens)
        "sum":  sum_i s_i KL_i
        "none": per example, sum_{i in b} s_i KL_i / max(sum_{i in b} s_i, 1)
    where KL_i = KL(p_teacher,i || p_student,i). Selection is per example, never across the batch,
    so an example's loss depends on that example only (what per-example DP-SGD needs) and "mean"
    and "none" select the same tokens. An example with no selected token contributes 0.

    ratio: fraction of each example's kept tokens to select, in (0, 1].
    """
    ratio = TokenSelectiveParams.checked("token_selective", ratio=ratio).ratio
    losses, gaps, layout = token_losses_and_aux(
        _kl_and_entropy_gap,
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
    )
    examples = layout.example_ids(losses.device)
    selected = select_tokens(gaps[:, 0], examples, layout.batch_size, ratio)
    return _reduce_selected(losses, selected, layout, reduction)
