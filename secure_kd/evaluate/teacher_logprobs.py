"""A fixed teacher's log-probabilities on fixed evaluation batches, computed once.

A distillation run evaluates the teacher (its perplexity) and the student's agreement with it before
and after training, on the same held-out batches: three teacher forward passes of the same inputs. On
a real teacher they dominate a short run's evaluation (SmolLM2-135M on 64 records of 48 tokens: 8.5 s
per pass on 2 CPU cores). `TeacherLogProbs` runs the teacher once and serves `perplexity` and
`agreement` from the stored log-probabilities; both equal `perplexity(teacher, ...)` and
`teacher_agreement(student, teacher, ...)` on the same batches.

Only for a teacher whose outputs do not change during the run (not a self-teacher made of the
student's own weights) and one vocabulary width; it keeps `[scored positions, vocabulary]` float32
values in memory, so `fits` says whether a set is small enough (`MAX_BYTES`) before it is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from secure_kd.evaluate._model_io import (
    IGNORE_INDEX,
    evaluation_mode,
    model_logits,
    prepare_batch,
    resolve_device,
)
from secure_kd.evaluate.language_model import Batch

MAX_BYTES = 2 << 30  # 2 GiB of stored log-probabilities at most; larger sets recompute


def scored_positions(batches: Sequence[Batch]) -> int:
    """Positions `perplexity` scores: those whose next label is kept (not -100, not padding)."""
    total = 0
    for batch in batches:
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        total += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total


def fits(batches: Sequence[Batch], vocab_size: int) -> bool:
    return scored_positions(batches) * vocab_size * 4 <= MAX_BYTES


class TeacherLogProbs:
    """The teacher's log-softmax at every scored position of `batches`, one forward pass per batch."""

    def __init__(self, teacher: nn.Module, batches: Sequence[Batch]) -> None:
        device = resolve_device(teacher, None)
        self.batches = list(batches)
        self._logprobs: list[Tensor] = []
        self._labels: list[Tensor] = []
        with evaluation_mode(teacher):
            for index, raw in enumerate(self.batches):
                batch = prepare_batch(raw, device, index)
                keep = batch["labels"][:, 1:] != IGNORE_INDEX
                logits = model_logits(teacher, batch)[:, :-1].float()
                self._logprobs.append(torch.log_softmax(logits[keep], dim=-1).cpu())
                self._labels.append(batch["labels"][:, 1:][keep].cpu())
        self.positions = sum(int(labels.numel()) for labels in self._labels)
        if self.positions == 0:
            raise ValueError("no label tokens to score: batches are empty or every label is -100")
        width = self._logprobs[0].shape[-1]
        kept = torch.cat(self._labels)
        if kept.min() < 0 or kept.max() >= width:
            raise ValueError(f"labels must be token ids in [0, {width - 1}] or -100 (ignored)")

    def perplexity(self) -> dict[str, float | int]:
        """As `secure_kd.evaluate.perplexity(teacher, batches)`."""
        nll = sum(
            float(-lp.gather(-1, labels.unsqueeze(-1)).double().sum())
            for lp, labels in zip(self._logprobs, self._labels, strict=True)
        )
        mean_nll = nll / self.positions
        return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": self.positions}

    def agreement(
        self, student: nn.Module, *, device: str | torch.device | None = None
    ) -> dict[str, float | int]:
        """As `secure_kd.evaluate.teacher_agreement(student, teacher, batches)`: top-1 agreement and mean
        KL(teacher || student) in nats over the scored positions."""
        student_device = resolve_device(student, device)
        matches, kl_sum = 0, 0.0
        with evaluation_mode(student):
            for index, raw in enumerate(self.batches):
                batch = prepare_batch(raw, student_device, index)
                keep = batch["labels"][:, 1:] != IGNORE_INDEX
                student_logits = model_logits(student, batch)[:, :-1].float()
                teacher_logprobs = self._logprobs[index].to(student_device)
                if student_logits.shape[-1] != teacher_logprobs.shape[-1]:
                    raise ValueError(
                        f"batch {index}: student vocabulary {student_logits.shape[-1]} != teacher "
                        f"vocabulary {teacher_logprobs.shape[-1]}; agreement needs a shared vocabulary"
                    )
                student_logprobs = torch.log_softmax(student_logits[keep], dim=-1)
                kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(dim=-1)
                kl_sum += float(kl.double().sum())
                matches += int((student_logprobs.argmax(-1) == teacher_logprobs.argmax(-1)).sum())
        return {
            "top1_agreement": matches / self.positions,
            "mean_forward_kl": kl_sum / self.positions,
            "positions": self.positions,
        }


_LAST: tuple[str, TeacherLogProbs] | None = None  # one entry: the last teacher and batches of this process


def batches_digest(batches: Sequence[Batch]) -> str:
    """A digest of the batches' tensors (ids, mask, labels, in order)."""
    import hashlib

    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            tensor = batch[name]
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def shared(teacher: nn.Module, batches: Sequence[Batch], teacher_key: str | None) -> TeacherLogProbs:
    """`TeacherLogProbs(teacher, batches)`, reused by the next run of this process when `teacher_key`
    (the caller's statement that the weights are the same: a pinned asset, a seeded tiny model, a
    directory's file sizes and times) and the batches are the same; `None` never reuses. One entry is
    kept, so a process running several jobs on one teacher and held-out set (`secure-kd demo`) makes
    one teacher pass in all."""
    global _LAST
    key = None if teacher_key is None else f"{teacher_key}/{batches_digest(batches)}"
    if key is not None and _LAST is not None and _LAST[0] == key:
        return _LAST[1]
    _LAST = None  # release the previous entry before building the next
    fixed = TeacherLogProbs(teacher, batches)
    if key is not None:
        _LAST = (key, fixed)
    return fixed
