"""Output layer and objective fused: the student's full [tokens, vocab] logits never exist.

`fused_linear_kd_loss` takes the student's last hidden states and its output-layer weight and, a
chunk of tokens at a time, computes the chunk's logits (hidden @ W.T + b), the per-token losses,
their gradient with respect to those logits (analytically, by the objective's kernel) and, from it,
the chunk's gradient w.r.t. the hidden states and its contribution to the weight's gradient,
accumulated in one [V, h] buffer. This is the idea of Liger Kernel's fused linear JSD /
cross-entropy, in plain torch so it runs on CPU. Beyond its inputs it holds the gradient buffers
([N, h], [V, h]) and one chunk's work buffers (a few [chunk, V] tensors, reused between chunks).

The reduction is known in the forward ("mean" over kept tokens or "sum"), so the buffers hold the
final gradients up to the scalar the backward receives; per-example losses (reduction="none") would
need one weight gradient per example and are not offered here: use the unfused objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from secure_kd.losses.catalog import LOSSES, check_params, loss_info
from secure_kd.losses.chunked import chunk_loss_and_grad
from secure_kd.losses.functional import TokenKernel
from secure_kd.losses.inputs import (
    TokenLayout,
    check_label_ids,
    check_labels,
    check_temperature,
    check_topk,
    compute_dtype,
    resolve_chunk_size,
)
from secure_kd.losses.targets import Target, Workspace, build_target, take_rows
from secure_kd.topk import TopKLogits

# Larger default chunks than the unfused losses: every chunk streams the [V, h] weight through two
# matmuls and rewrites the [V, h] weight gradient, so few chunks matter more than small buffers here.
# 48 MiB per [chunk, V] buffer is 256 tokens at V = 49,152 (measured: 407 MiB beyond the inputs,
# 0.08 of the naive loss + output layer, at about its speed; 42 tokens: 0.03 and about 1.2x its time).
FUSED_CHUNK_BYTES = 48 * 2**20


class _FusedLinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, layout, target, kernel, chunk_size, scale):  # type: ignore[override]
        flat = hidden.reshape(-1, hidden.shape[-1])
        vocab = weight.shape[0]
        cdtype = compute_dtype(hidden, weight)
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with_grad = need_h or need_w or need_b
        # accumulate in at least float32 even for half-precision weights
        grad_h = torch.zeros_like(flat) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=cdtype, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=cdtype, device=flat.device)
        ws = Workspace(min(chunk_size, max(layout.n_kept, 1)), cdtype, flat.device)
        mm_ws = ws if mm_dtype == cdtype else Workspace(ws.rows, mm_dtype, flat.device)
        with torch.autocast(flat.device.type, enabled=False):
            for span, rows in layout.chunks(chunk_size):
                n = span.stop - span.start
                h_chunk = take_rows(flat, rows).to(mm_dtype)
                logits = mm_ws.get("logits", n, vocab)
                if b is None:
                    torch.mm(h_chunk, w.T, out=logits)
                else:
                    torch.addmm(b, h_chunk, w.T, out=logits)
                dest = ws.get("grad", n, vocab) if with_grad else None
                loss, _ = chunk_loss_and_grad(kernel, target, logits, rows, ws, dest)
                total += loss.sum()
                if dest is None:
                    continue
                grad = dest.mul_(scale).to(mm_dtype)
                if grad_h is not None:
                    part = (grad @ w).to(grad_h.dtype)
                    if isinstance(rows, slice):
                        grad_h[rows] = part
                    else:
                        grad_h.index_copy_(0, rows, part)
                if grad_w is not None:
                    grad_w.addmm_(grad.T.to(cdtype), h_chunk.to(cdtype))
                if grad_b is not None:
                    grad_b += grad.sum(0).to(cdtype)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.shapes = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss's gradient buffers were already used by an earlier backward; "
                "backward through it twice (retain_graph=True) is not supported: recompute the loss"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        hidden_shape, weight_dtype, bias_dtype = ctx.shapes
        unit = bool(grad_out == 1)
        out = []
        for grad, dtype in ((grad_h, None), (grad_w, weight_dtype), (grad_b, bias_dtype)):
            if grad is not None:
                if not unit:
                    grad.mul_(grad_out.to(grad.dtype))
                if dtype is not None:
                    grad = grad.to(dtype)
            out.append(grad)
        grad_h = None if out[0] is None else out[0].view(hidden_shape)
        return grad_h, out[1], out[2], None, None, None, None, None


def _fusable_kernel(loss: str, params: dict) -> tuple[TokenKernel, bool]:
    """(kernel, compares with labels) for a registered objective that can be fused."""
    info = loss_info(loss)
    if info.kernel_factory is None:
        fusable = [n for n in LOSSES.names() if loss_info(n).kernel_factory is not None]
        raise ValueError(
            f"loss {loss!r} cannot be fused (it has state or selects tokens across the chunk); "
            f"fusable: {', '.join(fusable)}. Use the unfused objective on the logits instead."
        )
    kernel = info.kernel_factory(**check_params(loss, params))  # LossParamsError names a bad or unknown one
    return kernel, not info.needs_teacher


def fused_linear_kd_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher: TopKLogits | Tensor | None,
    labels: Tensor | None = None,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    tail: str | None = "uniform",
    chunk_size: int | None = None,
    reduction: str = "mean",
    lm_head_bias: Tensor | None = None,
    **params,
) -> Tensor:
    """The objective `loss` applied to `student_hidden @ lm_head_weight.T (+ lm_head_bias)`, fused.

    Args:
        student_hidden: [batch, seq, h] or [N, h], the states the output layer reads.
        lm_head_weight: [V, h]; lm_head_bias: [V] or None.
        teacher: TopKLogits with the same positions, dense logits [..., V], or None for loss="ce".
        labels: positions' labels ([batch, seq] or [N]), -100 where ignored; required for "ce".
        loss: a registered objective with a per-token kernel: forward_kl, reverse_kl, jsd, tvd,
            skew_forward_kl, skew_reverse_kl, ce. `**params` are its parameters (e.g. beta=0.5).
        temperature, tail, chunk_size: as for the logit objectives, except that `tail` defaults to
            "uniform" here (it is ignored for a dense teacher and for ce) and the default chunk is
            about 48 MiB of float32 logits (256 tokens at V = 49,152).
        reduction: "mean" (over kept tokens) or "sum".

    Returns the same value, and the same gradients w.r.t. hidden, weight and bias, as
    `get_loss(loss)(hidden @ W.T + b, teacher, labels, ...)`; no gradient for the teacher.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"fused_linear_kd_loss supports reduction 'mean' or 'sum' (got {reduction!r}); for "
            "per-example losses (reduction='none') compute the logits and use the unfused objective"
        )
    temperature = check_temperature(temperature)
    kernel, use_labels = _fusable_kernel(loss, params)
    if student_hidden.dim() not in (2, 3) or not student_hidden.is_floating_point():
        raise ValueError(
            "student_hidden must be a float tensor [batch, seq, h] or [N, h], "
            f"got {tuple(student_hidden.shape)} {student_hidden.dtype}"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [vocab, h] with h = {student_hidden.shape[-1]} (the hidden width), "
            f"got {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be [vocab={vocab}], got {tuple(lm_head_bias.shape)}")
    positions = student_hidden.shape[:-1]
    if labels is not None:
        check_labels(labels, positions, "student_hidden")
    if not use_labels:
        if isinstance(teacher, TopKLogits):
            check_topk(teacher, positions, vocab, "student_hidden")
        elif isinstance(teacher, Tensor):
            if teacher.shape != (*positions, vocab):
                raise ValueError(
                    f"dense teacher logits {tuple(teacher.shape)} must be {(*positions, vocab)} "
                    "(the hidden states' positions and the output layer's vocabulary)"
                )
        else:
            raise ValueError(f"loss {loss!r} needs a teacher (TopKLogits or dense logits), got {teacher!r}")
    n_rows = positions.numel()
    layout = TokenLayout.from_labels(n_rows, 1, labels, student_hidden.device)
    flat_labels = None if labels is None else labels.reshape(-1).to(student_hidden.device)
    if use_labels:
        check_label_ids(flat_labels, layout, vocab)
    target: Target = build_target(
        teacher,
        flat_labels,
        n_rows=n_rows,
        vocab=vocab,
        temperature=temperature,
        tail=tail,
        use_labels=use_labels,
    )
    scale = 1.0 / max(layout.n_kept, 1) if reduction == "mean" else 1.0
    size = resolve_chunk_size(chunk_size, vocab, FUSED_CHUNK_BYTES)
    return _FusedLinearTokenLoss.apply(
        student_hidden, lm_head_weight, lm_head_bias, layout, target, kernel, size, scale
    )
