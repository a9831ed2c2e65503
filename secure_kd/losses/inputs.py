"""Checking and flattening what every logit objective receives.

The student's logits are seen as rows `[R, V]` (R = batch * seq). Rows whose label is -100 are not
copied out: the layout keeps the indices of the kept rows and the chunked loss reads them a chunk at
a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from secure_kd.losses.targets import Rows, Target, build_target
from secure_kd.topk import TopKLogits

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
# One float32 [chunk, vocab] work buffer of the chunked losses is about this size by default; a chunk
# uses at most seven of them (see benchmarks/kd_loss.py for the measured peaks).
DEFAULT_CHUNK_BYTES = 8 * 2**20


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0 (got {temperature}); 1.0 is the usual choice")
    return float(temperature)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)} (got {reduction!r})")
    return reduction


def check_fraction(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    """A number in [0, 1], with either end excluded on request; the message names the parameter."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval} (got {value})")
    return float(value)


def resolve_chunk_size(chunk_size: int | None, vocab: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """chunk_size as given, or (None) as many tokens as fit one float32 [chunk, vocab] buffer in budget."""
    if chunk_size is None:
        return max(1, budget_bytes // (4 * max(vocab, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens (got {chunk_size!r}), or None")
    return chunk_size


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (exact checks), float32 otherwise (bf16/fp16 are upcast)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


@dataclass(frozen=True)
class TokenLayout:
    """Which rows of the flattened [batch * seq] positions are kept, and which example each is from."""

    batch_size: int
    seq_len: int
    kept_rows: Tensor | None  # int64 [n_kept]; None when every row is kept
    n_kept: int

    @classmethod
    def from_labels(cls, batch_size: int, seq_len: int, labels: Tensor | None, device) -> TokenLayout:
        if labels is None:
            return cls(batch_size, seq_len, None, batch_size * seq_len)
        keep = labels.reshape(-1) != IGNORE_INDEX
        if bool(keep.all()):
            return cls(batch_size, seq_len, None, batch_size * seq_len)
        rows = keep.nonzero().squeeze(1).to(device)
        return cls(batch_size, seq_len, rows, int(rows.numel()))

    def chunks(self, chunk_size: int) -> Iterator[tuple[slice, Rows]]:
        """(positions in the kept-token vector, rows of the flat input) for each chunk."""
        for start in range(0, self.n_kept, chunk_size):
            span = slice(start, min(start + chunk_size, self.n_kept))
            yield span, (span if self.kept_rows is None else self.kept_rows[span])

    def example_ids(self, device) -> Tensor:
        rows = self.kept_rows if self.kept_rows is not None else torch.arange(self.n_kept, device=device)
        return torch.div(rows, self.seq_len, rounding_mode="floor")

    def scatter_rows(self, per_kept: Tensor, n_rows: int) -> Tensor:
        """A [n_rows] vector with `per_kept` at the kept rows and 0 elsewhere."""
        if self.kept_rows is None:
            return per_kept
        return per_kept.new_zeros(n_rows).index_copy_(0, self.kept_rows, per_kept)


def check_topk(teacher: TopKLogits, positions: torch.Size, vocab: int, what: str) -> None:
    if teacher.shape != positions:
        raise ValueError(
            f"teacher TopKLogits has positions {tuple(teacher.shape)} (values {tuple(teacher.values.shape)}) "
            f"but {what} has positions {tuple(positions)}; they must match (same batch and sequence)"
        )
    if teacher.k > vocab:
        raise ValueError(f"teacher top-k k={teacher.k} exceeds the student vocabulary {vocab}")
    if not teacher.values.is_floating_point() or teacher.indices.dtype != torch.int64:
        raise ValueError(
            f"TopKLogits needs float values and int64 indices (got {teacher.values.dtype}, "
            f"{teacher.indices.dtype})"
        )
    if teacher.indices.numel() == 0:
        return
    if int(teacher.indices.min()) < 0 or int(teacher.indices.max()) >= vocab:
        raise ValueError(f"teacher top-k indices must be token ids in [0, {vocab}) (the student vocabulary)")
    if teacher.k > 1 and bool((teacher.indices.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("teacher top-k indices repeat a token id at some position; they must be distinct")
    mass = teacher.values.double().exp().sum(-1)
    if bool((mass > 1.0 + 1e-3).any()):
        raise ValueError(
            f"TopKLogits.values must be teacher log-probabilities (log_softmax over the full vocabulary, "
            f"as TopKLogits.from_logits gives); their probabilities sum to {float(mass.max()):.4g} > 1 "
            "somewhere, which looks like raw logits"
        )


def check_labels(labels: Tensor, positions: torch.Size, what: str) -> None:
    if labels.shape != positions:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but {what} has positions {tuple(positions)}; "
            "labels must be [batch, seq] (or [batch] for classifier logits), -100 where ignored"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token/class ids, got dtype {labels.dtype}")


def check_label_ids(flat_labels: Tensor | None, layout: TokenLayout, vocab: int) -> None:
    """Kept labels must be class/token ids the logits have (cross-entropy indexes with them)."""
    if flat_labels is None or layout.n_kept == 0:
        return
    kept = flat_labels if layout.kept_rows is None else flat_labels[layout.kept_rows]
    if int(kept.min()) < 0 or int(kept.max()) >= vocab:
        raise ValueError(
            f"labels must be -100 or ids in [0, {vocab}); "
            f"got values in [{int(kept.min())}, {int(kept.max())}]"
        )


def prepare_logits(
    student_logits: Tensor,
    teacher: Tensor | TopKLogits | None,
    labels: Tensor | None,
    *,
    temperature: float,
    tail: str | None,
    use_labels: bool = False,
) -> tuple[TokenLayout, Target]:
    """Check a logit objective's inputs and build its layout and per-chunk target."""
    temperature = check_temperature(temperature)
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point():
        raise ValueError(
            "student_logits must be a floating-point tensor [batch, seq, vocab] or [batch, classes]"
        )
    if student_logits.dim() not in (2, 3):
        raise ValueError(
            f"student_logits must be [batch, seq, vocab] or [batch, classes], got shape "
            f"{tuple(student_logits.shape)}"
        )
    positions = student_logits.shape[:-1]
    batch_size = positions[0]
    seq_len = positions[1] if student_logits.dim() == 3 else 1
    vocab = student_logits.shape[-1]
    if labels is not None:
        check_labels(labels, positions, "student_logits")
    if not use_labels:
        if teacher is None:
            raise ValueError("this objective needs teacher_logits (a tensor or a TopKLogits), got None")
        if isinstance(teacher, TopKLogits):
            check_topk(teacher, positions, vocab, "student_logits")
        elif isinstance(teacher, Tensor):
            if teacher.shape != student_logits.shape:
                raise ValueError(
                    f"teacher_logits shape {tuple(teacher.shape)} != student_logits shape "
                    f"{tuple(student_logits.shape)}; they must match (slice a padded vocabulary to the "
                    "common tokens first)"
                )
            if not teacher.is_floating_point():
                raise ValueError(f"teacher_logits must be floating point, got dtype {teacher.dtype}")
        else:
            raise ValueError(f"teacher_logits must be a Tensor or a TopKLogits, got {type(teacher).__name__}")
    layout = TokenLayout.from_labels(batch_size, seq_len, labels, student_logits.device)
    flat_labels = None if labels is None else labels.reshape(-1).to(student_logits.device)
    if use_labels:
        check_label_ids(flat_labels, layout, vocab)
    target = build_target(
        teacher,
        flat_labels,
        n_rows=batch_size * seq_len,
        vocab=vocab,
        temperature=temperature,
        tail=tail,
        use_labels=use_labels,
    )
    return layout, target
