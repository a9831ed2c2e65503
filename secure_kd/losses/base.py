"""The one code path behind every logit objective: check inputs, chunked per-token losses, reduce."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

from secure_kd.losses.chunked import chunked_token_losses, reduce_token_losses
from secure_kd.losses.functional import TokenKernel
from secure_kd.losses.inputs import TokenLayout, check_reduction, prepare_logits, resolve_chunk_size
from secure_kd.topk import TopKLogits

F = TypeVar("F", bound=Callable)

COMMON_ARGS_DOC = """
    Args:
        student_logits: [batch, seq, vocab] (or [batch, classes] for a classifier, i.e. seq=1).
        teacher_logits: dense logits of the same shape, or a `TopKLogits` with positions [batch, seq]
            (its values are teacher log-probabilities at T=1). Treated as a constant: no gradient is
            computed for it.
        labels: [batch, seq] (or [batch]); positions equal to -100 are excluded. No shifting is
            done here: logits[b, t] is compared with labels[b, t].
        temperature: both student and teacher logits are divided by it before the softmax. The
            result is never multiplied by temperature**2 (the trainer does that when configured).
        reduction: "mean" = mean over the kept tokens of the whole batch (without labels, over all
            batch*seq tokens); "sum" = sum over kept tokens; "none" = [batch], each example's mean
            over its own kept tokens (0 for an example with none).
        tail: only for a TopKLogits teacher, required then: "uniform" spreads the teacher's missing
            mass evenly over the other V-k tokens (temperature applied to that full distribution,
            compared on the full vocabulary); "zero" drops it and compares teacher and student
            renormalized over the teacher's top-k tokens. Ignored for a dense teacher.
        chunk_size: tokens per chunk (default: about 8 MiB of float32 logits per chunk). Values and
            gradients do not depend on it (up to rounding); peak memory and speed do.
"""


def with_common_args_doc(fn: F) -> F:
    """Append the argument documentation shared by every logit objective to `fn.__doc__`."""
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + COMMON_ARGS_DOC
    return fn


def logit_objective(
    kernel: TokenKernel,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits | None,
    labels: Tensor | None,
    *,
    temperature: float,
    reduction: str,
    tail: str | None,
    chunk_size: int | None,
    use_labels: bool = False,
) -> Tensor:
    """Apply a per-token kernel to the kept tokens, chunk by chunk, and reduce."""
    losses, _, layout = token_losses_and_aux(
        kernel,
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        reduction=reduction,
        tail=tail,
        chunk_size=chunk_size,
        use_labels=use_labels,
    )
    return reduce_token_losses(losses, layout, reduction)


def token_losses_and_aux(
    kernel: TokenKernel,
    student_logits: Tensor,
    teacher_logits: Tensor | TopKLogits | None,
    labels: Tensor | None,
    *,
    temperature: float,
    reduction: str,
    tail: str | None,
    chunk_size: int | None,
    use_labels: bool = False,
) -> tuple[Tensor, Tensor, TokenLayout]:
    """Per-kept-token losses, the kernel's aux statistics, and the layout (for custom reductions)."""
    check_reduction(reduction)
    layout, target = prepare_logits(
        student_logits, teacher_logits, labels, temperature=temperature, tail=tail, use_labels=use_labels
    )
    size = resolve_chunk_size(chunk_size, student_logits.shape[-1])
    losses, aux = chunked_token_losses(student_logits, layout, target, kernel, size)
    return losses, aux, layout
