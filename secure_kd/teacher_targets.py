"""Where the teacher's targets come from during training: a live teacher or the offline cache.

Targets are aligned with the student's logits: position t holds the teacher's distribution for
the token at t+1 (the raw `logits[:, t]` of a causal LM), so the trainer shifts the labels, not
the logits.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from secure_kd.topk import TopKLogits


class TeacherTargets(Protocol):
    def __call__(self, batch: dict[str, Tensor]) -> Tensor | TopKLogits: ...


class LiveTeacher:
    """Run the teacher on every batch; keep its full logits or only its top-k."""

    def __init__(self, model: nn.Module, top_k: int | None) -> None:
        self.model = model
        self.top_k = top_k

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> Tensor | TopKLogits:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.top_k is None:
            return logits.float()
        return TopKLogits.from_logits(logits, self.top_k)


class CachedTeacher:
    """Read the teacher's top-k for the batch's examples from a `LogitCache`."""

    def __init__(self, cache, device: torch.device) -> None:
        self.cache = cache
        self.device = device

    def __call__(self, batch: dict[str, Tensor]) -> TopKLogits:
        indices = batch["example_index"].tolist()
        targets = self.cache.batch(indices, pad_to=batch["input_ids"].shape[1])
        return targets.to(self.device)


def shift_labels(labels: Tensor) -> Tensor:
    """labels[:, t+1] moved to position t, -100 at the end: compare logits[:, t] with it."""
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    return shifted
