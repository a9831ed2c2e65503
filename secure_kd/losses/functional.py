"""In-place building blocks of the per-token kernels (rows are distributions over the last axis).

A kernel receives a `ChunkProbs` (log q, q for the student; log p, p for the teacher, on the same
support, at the temperature) and returns the per-token losses and, when asked, the gradient of each
token's loss with respect to the student's scaled logits z = logits / T on that support. The
kernels overwrite their inputs to avoid full-size temporaries.

Zero probabilities: log-probabilities are clamped to the dtype's most negative finite number before
they are multiplied by probabilities, so 0 * log 0 counts as 0 and no NaN appears when a
distribution puts -inf logits on some tokens. (An infinite divergence, where p > 0 but q = 0,
then comes out as a huge finite number instead of +inf.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from secure_kd.losses.targets import ChunkProbs

# (chunk, want_grad) -> (loss [n], aux [n, a] or None, d loss_i / d z_i [n, m] or None)
TokenKernel = Callable[[ChunkProbs, bool], tuple[Tensor, Tensor | None, Tensor | None]]


def clamp_logs_(*logs: Tensor) -> None:
    for x in logs:
        x.clamp_min_(torch.finfo(x.dtype).min)


def row_dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """sum_v a * b per row [n], using `scratch` for the product."""
    return torch.mul(a, b, out=scratch).sum(-1)


def through_softmax_(grad_q: Tensor, q: Tensor, scratch: Tensor) -> Tensor:
    """d/dz from d/dq for q = softmax(z), in place on grad_q: q * (g - sum_v q g)."""
    mean = row_dot(q, grad_q, scratch)
    return grad_q.sub_(mean[:, None]).mul_(q)


def mixture_(out: Tensor, a: Tensor, b: Tensor, weight_a: float) -> Tensor:
    """out <- weight_a * a + (1 - weight_a) * b."""
    torch.mul(a, weight_a, out=out)
    return out.add_(b, alpha=1.0 - weight_a)


def kl_sum(p: Tensor, log_p: Tensor, log_q: Tensor, scratch: Tensor) -> Tensor:
    """KL(p || q) per row: sum p (log p - log q), with log p and log q already clamped."""
    torch.sub(log_p, log_q, out=scratch)
    return scratch.mul_(p).sum(-1)


def entropy(p: Tensor, log_p: Tensor, scratch: Tensor) -> Tensor:
    """-sum p log p per row, with log p already clamped."""
    return -row_dot(p, log_p, scratch)
