"""Per-token losses computed a chunk of tokens at a time, forward and backward.

A naive objective over [tokens, vocab] logits keeps several full-size float32 intermediates alive
until the backward (both log-softmaxes, the probabilities, the elementwise KL, their gradients).
Here a custom autograd Function walks the kept tokens in chunks: for each chunk it computes the
per-token losses and, analytically, their gradient with respect to that chunk of the student
logits, written into one gradient buffer the size of the logits. Only one chunk's working buffers
exist at a time (a handful of [chunk, V] tensors, reused from chunk to chunk), in the forward and in
the backward, which only scales the buffer.

The Function returns the per-token losses [n_kept]; everything after (the reduction, token weights,
the trainer's scaling) is ordinary autograd on that small vector. Its backward receives
d(total)/d(loss_i) and scales row i of the buffer in place, which is exact because each token's loss
depends only on its own row of logits. The buffer is consumed by that backward: a second backward
through the same graph (`retain_graph=True`) raises instead of returning a wrong gradient.

No gradient flows to the teacher (its logits or TopKLogits are treated as constants).
"""

from __future__ import annotations

import torch
from torch import Tensor

from secure_kd.losses.functional import TokenKernel
from secure_kd.losses.inputs import TokenLayout, compute_dtype
from secure_kd.losses.targets import Rows, Target, Workspace, take_rows


def chunk_loss_and_grad(
    kernel: TokenKernel, target: Target, logits: Tensor, rows: Rows, ws: Workspace, grad_dest: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """(loss [n], aux or None) of one chunk; writes d loss_i / d logits_i into grad_dest if given."""
    loss, aux, grad_z = kernel(target.fill(logits, rows, ws), grad_dest is not None)
    if grad_dest is not None:
        assert grad_z is not None
        target.logit_grad(grad_z, rows, grad_dest)
    return loss, aux


class _ChunkedTokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, layout, target, kernel, chunk_size):  # type: ignore[override]
        vocab = student_logits.shape[-1]
        flat = student_logits.reshape(-1, vocab)
        cdtype = compute_dtype(student_logits)
        with_grad = bool(ctx.needs_input_grad[0])
        grad_buffer = None
        if with_grad:
            # every row is written below when all are kept; masked rows must read 0
            grad_buffer = torch.empty_like(flat) if layout.kept_rows is None else torch.zeros_like(flat)
        ws = Workspace(min(chunk_size, max(layout.n_kept, 1)), cdtype, flat.device)
        losses = torch.zeros(layout.n_kept, dtype=cdtype, device=flat.device)
        aux_parts: list[Tensor] = []
        for span, rows in layout.chunks(chunk_size):
            # contiguous rows of a same-dtype buffer are written in place; others go through a scratch
            direct = grad_buffer is not None and isinstance(rows, slice) and grad_buffer.dtype == cdtype
            if grad_buffer is None:
                dest = None
            else:
                dest = grad_buffer[rows] if direct else ws.get("grad", span.stop - span.start, vocab)
            loss, aux = chunk_loss_and_grad(kernel, target, take_rows(flat, rows), rows, ws, dest)
            losses[span] = loss
            if aux is not None:
                aux_parts.append(aux.clone())
            if grad_buffer is not None and not direct:
                if isinstance(rows, slice):
                    grad_buffer[rows] = dest
                else:
                    grad_buffer.index_copy_(0, rows, dest.to(grad_buffer.dtype))
        aux_all = torch.cat(aux_parts) if aux_parts else losses.new_zeros(layout.n_kept, 0)
        ctx.mark_non_differentiable(aux_all)
        ctx.grad_buffer = grad_buffer
        ctx.layout = layout
        ctx.logits_shape = student_logits.shape
        return losses, aux_all

    @staticmethod
    def backward(ctx, grad_losses, _grad_aux):  # type: ignore[override]
        buffer = ctx.grad_buffer
        if buffer is None:
            raise RuntimeError(
                "the chunked loss's gradient buffer was already used by an earlier backward; "
                "backward through it twice (retain_graph=True) is not supported: recompute the loss"
            )
        ctx.grad_buffer = None
        scale = ctx.layout.scatter_rows(grad_losses.to(buffer.dtype), buffer.shape[0])
        buffer.mul_(scale[:, None])
        return buffer.view(ctx.logits_shape), None, None, None, None


def chunked_token_losses(
    student_logits: Tensor, layout: TokenLayout, target: Target, kernel: TokenKernel, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Per-kept-token losses [n_kept] (differentiable w.r.t. student_logits) and aux stats [n_kept, a]."""
    return _ChunkedTokenLosses.apply(student_logits, layout, target, kernel, chunk_size)


def reduce_token_losses(losses: Tensor, layout: TokenLayout, reduction: str) -> Tensor:
    """mean over kept tokens / sum / per-example mean [batch] (0 for an example with no kept token)."""
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / max(layout.n_kept, 1)
    examples = layout.example_ids(losses.device)
    totals = losses.new_zeros(layout.batch_size).index_add(0, examples, losses)
    counts = torch.bincount(examples, minlength=layout.batch_size).clamp_min(1)
    return totals / counts.to(losses.dtype)
