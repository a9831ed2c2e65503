"""Objectives by plain autograd: write a per-token function, get the chunked, memory-bounded loss.

A new objective in one file (docs/extending.md):

    class ProbSquaredErrorParams(LossParams):
        scale: float = Field(1.0, gt=0)

    @autograd_loss("prob_squared_error", params=ProbSquaredErrorParams)
    def prob_squared_error(d: TokenDists, *, scale: float = 1.0) -> Tensor:
        return scale * (d.student - d.teacher).pow(2).sum(-1)  # one loss per token, [n]

The decorator returns (and registers under `name`) an objective with the shared signature
`loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, reduction="mean", tail=None,
chunk_size=None, **params)`, its `**params` validated by the `params` model: labels masking (-100),
reductions "mean" / "sum" / "none" ([batch]), temperature, dense or `TopKLogits` teachers (tail
"uniform" / "zero", from `targets.py`), `kd.params` in configs, and `fused_linear_kd_loss(loss=name)`.

What the function receives, a chunk of n kept tokens at a time (`on=`):
- "probs" (default): a `TokenDists`, the student's and teacher's log-probabilities at the temperature
  on the compared support [n, m] (the vocabulary; the teacher's top-k for tail="zero"), floored at the
  dtype's most negative finite number so that 0 * log 0 is 0. `needs_teacher=False`: no teacher,
  `labels` [n] instead (a hard-label objective such as cross-entropy).
- "logits": a `TokenLogits`, the raw logits divided by the temperature [n, V] (not shift-invariant
  objectives such as logit MSE); dense teacher logits only, and not fusable.

How: the same chunked autograd Function as the analytic built-ins (`chunked.py`) walks the kept tokens
in chunks; for each chunk the function runs under autograd on that chunk alone and
`torch.autograd.grad` gives d loss_i / d z_i, written into the gradient buffer, then the chunk's graph is
freed. Memory: one chunk's graph (the function's own [chunk, V] intermediates) plus the gradient buffer
the size of the logits, whatever the number of tokens. The forward computes the gradient when the
logits require it, as the analytic path does. The function must give each token a loss that depends
on that token's row only (the chunked gradient is exact only then; batch-level token selection needs
the analytic path, see `token_selective.py`) and must not modify its inputs in place. Built-ins keep
their hand-derived kernels (`functional.py`), which avoid the graph's extra buffers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from secure_kd.losses.base import COMMON_ARGS_DOC, logit_objective
from secure_kd.losses.catalog import register_loss
from secure_kd.losses.chunked import chunked_token_losses, reduce_token_losses
from secure_kd.losses.functional import TokenKernel, clamp_logs_
from secure_kd.losses.inputs import check_reduction, prepare_logits, resolve_chunk_size
from secure_kd.losses.params import LossParams, NoParams
from secure_kd.losses.targets import ChunkProbs, Rows, Workspace, take_rows
from secure_kd.topk import TopKLogits


@dataclass(frozen=True)
class TokenDists:
    """A chunk of n kept tokens on the compared support [n, m] (what an `on="probs"` function gets).

    log_student: log softmax(student_logits / T), differentiable (the gradient flows from here).
    log_teacher: log softmax(teacher / T), a constant; None for `needs_teacher=False`.
    labels:      [n] label ids for `needs_teacher=False`, else None (labels only mask tokens).
    """

    log_student: Tensor
    log_teacher: Tensor | None
    labels: Tensor | None

    @property
    def student(self) -> Tensor:
        return self.log_student.exp()

    @property
    def teacher(self) -> Tensor | None:
        return None if self.log_teacher is None else self.log_teacher.exp()


@dataclass(frozen=True)
class TokenLogits:
    """A chunk of n kept tokens [n, V] (what an `on="logits"` function gets).

    student: student_logits / T, differentiable; teacher: teacher_logits / T, a constant (None for
    `needs_teacher=False`); labels: [n] label ids for `needs_teacher=False`, else None.
    """

    student: Tensor
    teacher: Tensor | None
    labels: Tensor | None


PerToken = Callable[..., Tensor]


def _losses_and_grad(fn: PerToken, name: str, z: Tensor, make_input, params: dict, want_grad: bool):
    """Run `fn` on one chunk under autograd; (losses [n], d losses_i / d z_i or None)."""
    # in the compute dtype (float32 or float64) even inside the trainer's autocast region
    with torch.enable_grad(), torch.autocast(z.device.type, enabled=False):
        leaf = z.detach().requires_grad_(want_grad)
        losses = fn(make_input(leaf), **params)
        n = z.shape[0]
        if not isinstance(losses, Tensor) or losses.shape != (n,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss {name!r}: its per-token function returned {shape} for a chunk of {n} tokens; "
                f"it must return one loss per token, a tensor of shape [{n}] (sum over the last axis)"
            )
        if not want_grad:
            return losses.detach().to(z.dtype), None
        if not losses.requires_grad:
            raise ValueError(
                f"loss {name!r}: its per-token function returned losses without a gradient; compute them "
                "with torch operations on its input (no .detach(), .item() or numpy)"
            )
        (grad,) = torch.autograd.grad(losses.sum(), leaf)
    return losses.detach().to(z.dtype), grad


def probs_kernel(fn: PerToken, name: str, params: dict) -> TokenKernel:
    """A `TokenKernel` (what the chunked and fused paths run) from an `on="probs"` function."""

    def kernel(c: ChunkProbs, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
        clamp_logs_(c.log_student, *(() if c.log_teacher is None else (c.log_teacher,)))

        # log q is a valid z: log_softmax(log q) = log q, and the gradient w.r.t. z is shift-invariant
        def make_input(z: Tensor) -> TokenDists:
            return TokenDists(torch.log_softmax(z, dim=-1), c.log_teacher, c.labels)

        loss, grad = _losses_and_grad(fn, name, c.log_student, make_input, params, want_grad)
        return loss, None, grad

    return kernel


@dataclass
class _RawChunk:
    student: Tensor
    teacher: Tensor | None
    labels: Tensor | None


@dataclass(frozen=True)
class _RawLogits:
    """A target (see `targets.py`) that hands the chunk's scaled logits over as they are."""

    teacher: Tensor | None  # [R, V]
    labels: Tensor | None  # [R], for needs_teacher=False
    temperature: float

    def fill(self, logits: Tensor, rows: Rows, ws: Workspace) -> _RawChunk:
        student = logits.to(ws.dtype) / self.temperature
        teacher = (
            None if self.teacher is None else take_rows(self.teacher, rows).to(ws.dtype) / self.temperature
        )
        labels = None if self.labels is None else take_rows(self.labels, rows)
        return _RawChunk(student, teacher, labels)

    def logit_grad(self, grad_z: Tensor, rows: Rows, dest: Tensor) -> None:
        torch.mul(grad_z, 1.0 / self.temperature, out=dest)


def logits_kernel(fn: PerToken, name: str, params: dict) -> Callable:
    def kernel(c: _RawChunk, want_grad: bool) -> tuple[Tensor, None, Tensor | None]:
        def make_input(z: Tensor) -> TokenLogits:
            return TokenLogits(z, c.teacher, c.labels)

        loss, grad = _losses_and_grad(fn, name, c.student, make_input, params, want_grad)
        return loss, None, grad

    return kernel


def _raw_logit_objective(kernel, student_logits, teacher_logits, labels, *, temperature, reduction,
                         chunk_size, needs_teacher, name):  # fmt: skip
    if isinstance(teacher_logits, TopKLogits):
        raise ValueError(
            f"loss {name!r} compares full logits, and a TopKLogits teacher has only k of them per position; "
            "give dense teacher logits (kd.teacher_targets: live with kd.top_k: null)"
        )
    check_reduction(reduction)
    layout, target = prepare_logits(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        tail=None,
        use_labels=not needs_teacher,
    )
    rows = student_logits.shape[:-1].numel()
    teacher = None if not needs_teacher else teacher_logits.reshape(rows, -1)
    raw = _RawLogits(teacher, getattr(target, "labels", None), target.temperature)
    size = resolve_chunk_size(chunk_size, student_logits.shape[-1])
    losses, _ = chunked_token_losses(student_logits, layout, raw, kernel, size)  # type: ignore[arg-type]
    return reduce_token_losses(losses, layout, reduction)


def autograd_loss(
    name: str,
    *,
    params: type[LossParams] = NoParams,
    on: Literal["probs", "logits"] = "probs",
    needs_teacher: bool = True,
) -> Callable[[PerToken], Callable[..., Tensor]]:
    """Decorator: turn a per-token function into a registered, chunked logit objective (module docstring).

    `fn(TokenDists | TokenLogits, **params) -> Tensor [n]`; `params` is the typed parameter model
    (its fields are the objective's keyword parameters; `NoParams` when it takes none)."""
    if on not in ("probs", "logits"):
        raise ValueError(f"on must be 'probs' or 'logits' (got {on!r})")
    make_kernel = probs_kernel if on == "probs" else logits_kernel

    def decorator(fn: PerToken) -> Callable[..., Tensor]:
        def objective(
            student_logits: Tensor,
            teacher_logits: Tensor | TopKLogits | None = None,
            labels: Tensor | None = None,
            *,
            temperature: float = 1.0,
            reduction: str = "mean",
            tail: str | None = None,
            chunk_size: int | None = None,
            **kwargs,
        ) -> Tensor:
            values = params.checked(name, **kwargs).model_dump()
            kernel = make_kernel(fn, name, values)
            common = dict(temperature=temperature, reduction=reduction, chunk_size=chunk_size)
            if on == "logits":
                return _raw_logit_objective(
                    kernel,
                    student_logits,
                    teacher_logits,
                    labels,
                    needs_teacher=needs_teacher,
                    name=name,
                    **common,
                )
            teacher = teacher_logits if needs_teacher else None
            return logit_objective(
                kernel, student_logits, teacher, labels, tail=tail, use_labels=not needs_teacher, **common
            )

        def kernel_factory(**kwargs) -> TokenKernel:
            return probs_kernel(fn, name, params.checked(name, **kwargs).model_dump())

        objective.__name__ = objective.__qualname__ = fn.__name__
        objective.__module__ = fn.__module__
        objective.__doc__ = (
            fn.__doc__ or f"The {name} objective (per-token autograd)."
        ).rstrip() + COMMON_ARGS_DOC
        objective.__signature__ = _signature(params)  # type: ignore[attr-defined]
        objective.per_token = fn  # type: ignore[attr-defined]
        return register_loss(
            name,
            needs_teacher=needs_teacher,
            sparse_teacher=on == "probs" and needs_teacher,
            kernel_factory=kernel_factory if on == "probs" else None,
            params=params,
        )(objective)

    return decorator


def _signature(params: type[LossParams]) -> inspect.Signature:
    kw, pos = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    fixed = [
        inspect.Parameter("student_logits", pos),
        inspect.Parameter("teacher_logits", pos, default=None),
        inspect.Parameter("labels", pos, default=None),
        inspect.Parameter("temperature", kw, default=1.0),
        inspect.Parameter("reduction", kw, default="mean"),
        inspect.Parameter("tail", kw, default=None),
        inspect.Parameter("chunk_size", kw, default=None),
    ]
    own = [
        inspect.Parameter(n, kw, default=inspect.Parameter.empty if f.is_required() else f.default)
        for n, f in params.model_fields.items()
    ]
    return inspect.Signature(fixed + own, return_annotation=Tensor)
