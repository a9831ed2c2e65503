"""Per-chunk distributions: what an objective compares, built in reusable buffers.

For a chunk of student logits a *target* fills a `ChunkProbs`: the student's log-probabilities and
probabilities at the temperature, and the teacher's (or the label ids for cross-entropy), on the
support the two are compared on: the full vocabulary, or the teacher's top-k tokens for
`tail="zero"`. It also maps the kernel's gradient (with respect to the scaled support logits z/T)
back to the gradient with respect to the raw student logits of the chunk.

Everything is computed in place in a `Workspace` of a few [chunk, V] buffers allocated once per
call: fresh multi-megabyte allocations per operation cost page faults that dominated the time of
an allocate-per-op version on CPU (a 1.6x slower loss in our measurements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from secure_kd.topk import TopKLogits

TAILS = ("uniform", "zero")
Rows = slice | Tensor  # a contiguous range of rows, or the int64 indices of the kept rows


def take_rows(x: Tensor, rows: Rows) -> Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


class Workspace:
    """Reusable [rows, cols] buffers, by slot name and width; `get` returns a [n, cols] row prefix."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.dtype, self.device = rows, dtype, device
        self._buffers: dict[tuple[str, int], Tensor] = {}

    def get(self, slot: str, n: int, cols: int) -> Tensor:
        key = (slot, cols)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.rows, cols, dtype=self.dtype, device=self.device)
        return self._buffers[key][:n]


@dataclass
class ChunkProbs:
    """One chunk's distributions [n, m]; kernels may overwrite every buffer."""

    log_student: Tensor
    student: Tensor
    log_teacher: Tensor | None
    teacher: Tensor | None
    labels: Tensor | None
    workspace: Workspace

    def scratch(self, slot: str) -> Tensor:
        n, cols = self.student.shape
        return self.workspace.get(slot, n, cols)


def log_softmax_(x: Tensor, probs_out: Tensor) -> None:
    """x <- log_softmax(x, -1) in place; probs_out <- softmax(x, -1); no full-size temporaries."""
    x.sub_(x.amax(-1, keepdim=True))
    torch.exp(x, out=probs_out)
    total = probs_out.sum(-1, keepdim=True)
    probs_out.div_(total)
    x.sub_(total.log_())


def _scaled_copy(dest: Tensor, src: Tensor, temperature: float) -> Tensor:
    dest.copy_(src)
    if temperature != 1.0:
        dest.div_(temperature)
    return dest


def _student_probs(logits: Tensor, ws: Workspace, cols: int, temperature: float) -> tuple[Tensor, Tensor]:
    n = logits.shape[0]
    log_q = _scaled_copy(ws.get("log_student", n, cols), logits, temperature)
    q = ws.get("student", n, cols)
    log_softmax_(log_q, q)
    return log_q, q


@dataclass(frozen=True)
class DenseTeacher:
    logits: Tensor  # [R, V]
    temperature: float

    def fill(self, logits: Tensor, rows: Rows, ws: Workspace) -> ChunkProbs:
        n, vocab = logits.shape
        log_q, q = _student_probs(logits, ws, vocab, self.temperature)
        log_p = _scaled_copy(ws.get("log_teacher", n, vocab), take_rows(self.logits, rows), self.temperature)
        p = ws.get("teacher", n, vocab)
        log_softmax_(log_p, p)
        return ChunkProbs(log_q, q, log_p, p, None, ws)

    def logit_grad(self, grad_z: Tensor, rows: Rows, dest: Tensor) -> None:
        torch.mul(grad_z, 1.0 / self.temperature, out=dest)


@dataclass(frozen=True)
class UniformTailTeacher:
    """Top-k teacher log-probabilities (T=1) with the missing mass spread over the other V-k tokens.

    The missing mass is floored at the dtype's smallest normal number so that divergences that
    divide by the teacher (reverse KL, ...) stay finite when the top-k holds all the mass up to
    rounding.
    """

    values: Tensor  # [R, k]
    indices: Tensor  # [R, k]
    temperature: float

    def fill(self, logits: Tensor, rows: Rows, ws: Workspace) -> ChunkProbs:
        n, vocab = logits.shape
        log_q, q = _student_probs(logits, ws, vocab, self.temperature)
        values = take_rows(self.values, rows).to(ws.dtype)  # the compute dtype: bf16 logits are upcast
        log_p = ws.get("log_teacher", n, vocab)
        k = values.shape[-1]
        if k < vocab:
            missing = (1.0 - values.exp().sum(-1)).clamp_min(torch.finfo(values.dtype).tiny)
            log_p.copy_((missing.log() - math.log(vocab - k))[:, None].expand(n, vocab))
        log_p.scatter_(1, take_rows(self.indices, rows), values)
        if self.temperature != 1.0:
            log_p.div_(self.temperature)
        p = ws.get("teacher", n, vocab)
        log_softmax_(log_p, p)
        return ChunkProbs(log_q, q, log_p, p, None, ws)

    def logit_grad(self, grad_z: Tensor, rows: Rows, dest: Tensor) -> None:
        torch.mul(grad_z, 1.0 / self.temperature, out=dest)


@dataclass(frozen=True)
class ZeroTailTeacher:
    """Teacher and student both renormalized over the teacher's top-k tokens (missing mass dropped)."""

    values: Tensor  # [R, k]
    indices: Tensor  # [R, k]
    temperature: float

    def fill(self, logits: Tensor, rows: Rows, ws: Workspace) -> ChunkProbs:
        k = self.values.shape[-1]
        log_q, q = _student_probs(logits.gather(1, take_rows(self.indices, rows)), ws, k, self.temperature)
        n = logits.shape[0]
        log_p = _scaled_copy(ws.get("log_teacher", n, k), take_rows(self.values, rows), self.temperature)
        p = ws.get("teacher", n, k)
        log_softmax_(log_p, p)
        return ChunkProbs(log_q, q, log_p, p, None, ws)

    def logit_grad(self, grad_z: Tensor, rows: Rows, dest: Tensor) -> None:
        dest.zero_()
        dest.scatter_(1, take_rows(self.indices, rows), grad_z.mul_(1.0 / self.temperature))


@dataclass(frozen=True)
class HardLabels:
    labels: Tensor  # [R] int64
    temperature: float

    def fill(self, logits: Tensor, rows: Rows, ws: Workspace) -> ChunkProbs:
        log_q, q = _student_probs(logits, ws, logits.shape[1], self.temperature)
        return ChunkProbs(log_q, q, None, None, take_rows(self.labels, rows), ws)

    def logit_grad(self, grad_z: Tensor, rows: Rows, dest: Tensor) -> None:
        torch.mul(grad_z, 1.0 / self.temperature, out=dest)


Target = DenseTeacher | UniformTailTeacher | ZeroTailTeacher | HardLabels


def build_target(
    teacher: Tensor | TopKLogits | None,
    flat_labels: Tensor | None,
    *,
    n_rows: int,
    vocab: int,
    temperature: float,
    tail: str | None,
    use_labels: bool,
) -> Target:
    """The per-chunk target for a flattened [R, V] student; inputs are already shape-checked."""
    if use_labels:
        if flat_labels is None:
            raise ValueError("cross-entropy needs labels (token or class ids, -100 where ignored)")
        return HardLabels(flat_labels, temperature)
    if isinstance(teacher, TopKLogits):
        if tail not in TAILS:
            raise ValueError(
                "the teacher is a TopKLogits, so say what to do with its missing probability mass: "
                "tail='uniform' (spread it evenly over the other V-k tokens, compare on the full "
                "vocabulary) or tail='zero' (drop it: renormalize teacher and student over the top-k "
                f"tokens, as DistillKit does); got tail={tail!r}"
            )
        values = teacher.values.reshape(n_rows, teacher.k)
        indices = teacher.indices.reshape(n_rows, teacher.k)
        cls = UniformTailTeacher if tail == "uniform" else ZeroTailTeacher
        return cls(values, indices, temperature)
    assert teacher is not None
    return DenseTeacher(teacher.reshape(n_rows, vocab), temperature)
