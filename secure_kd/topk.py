"""Sparse teacher targets: the k most likely tokens of the teacher at each position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _at_least_float32(x: Tensor) -> Tensor:
    """float64 stays float64 (exactness in tests and audits); anything narrower becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class TopKLogits:
    """Top-k teacher targets.

    values:  log-probabilities of the teacher's full-vocabulary distribution at temperature 1
             (`log_softmax` over the whole vocabulary, then top-k), shape [..., k], float
             (float32, or float64 when built from float64 logits).
    indices: the token ids of those values, shape [..., k], int64.

    Because values are normalized log-probabilities, the probability mass outside the top-k
    is known exactly (`missing_mass`). What an objective does with it is an explicit policy
    (`tail="uniform"` or `tail="zero"`), never a silent choice.
    """

    values: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"TopKLogits values {tuple(self.values.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape"
            )

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> TopKLogits:
        if not 0 < k <= logits.shape[-1]:
            raise ValueError(f"top_k={k} must be in [1, vocab={logits.shape[-1]}]")
        logprobs = torch.log_softmax(_at_least_float32(logits), dim=-1)
        values, indices = logprobs.topk(k, dim=-1)
        return cls(values=values, indices=indices)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Shape without the k axis, e.g. [batch, seq]."""
        return self.values.shape[:-1]

    def missing_mass(self) -> Tensor:
        """Teacher probability outside the top-k, shape [...], clamped to [0, 1]."""
        return (1.0 - _at_least_float32(self.values).exp().sum(-1)).clamp(0.0, 1.0)

    def to(self, device: torch.device | str) -> TopKLogits:
        """On `device`; to CUDA from pinned host memory without blocking (the cache reader's batches)."""
        device = torch.device(device)
        if device.type == "cuda" and self.values.device.type == "cpu":
            values, indices = self.values.pin_memory(), self.indices.pin_memory()
            return TopKLogits(values.to(device, non_blocking=True), indices.to(device, non_blocking=True))
        return TopKLogits(self.values.to(device), self.indices.to(device))

    def __getitem__(self, item) -> TopKLogits:
        return TopKLogits(self.values[item], self.indices[item])
