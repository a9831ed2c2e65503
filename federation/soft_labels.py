"""Soft labels on the public transfer set, in one layout every client shares.

Under CKKS the server adds ciphertexts slot by slot, so every client must put the same quantity in
the same slot. For a language model the layout is fixed once from public data only:

- positions: every (example, t) of the transfer set whose next token is trained, in order;
- columns: the public index set, the `k` most frequent target tokens of the transfer set (a unigram
  reference model over public text; ties go to the smaller id), then one tail bucket holding the
  probability of every other token.

A client's soft labels are its distribution at temperature 1 restricted to those columns, a
`[positions, k + 1]` array whose rows sum to 1. The mean of several clients' arrays is again such
an array, the ensemble teacher; `EnsembleTargets` hands it to the engine's `Distiller` as
`TopKLogits` (log-probabilities of the index tokens; the tail is the missing mass, spread
uniformly by `tail="uniform"`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from secure_kd.data import IGNORE_INDEX, TokenizedExample, collate
from secure_kd.topk import TopKLogits

MIN_PROBABILITY = 1e-8  # decrypted or rounded probabilities can reach 0; their log must stay finite


@dataclass(frozen=True)
class SoftLabelLayout:
    index: tuple[int, ...]
    lengths: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]
    fingerprint: str

    @property
    def k(self) -> int:
        return len(self.index)

    @property
    def width(self) -> int:
        return self.k + 1

    @property
    def n_positions(self) -> int:
        return sum(len(p) for p in self.positions)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_positions, self.width)


def _trained_positions(example: TokenizedExample) -> tuple[int, ...]:
    """Positions t whose next token is trained: logits[t] predicts labels[t + 1]."""
    return tuple(t for t in range(len(example) - 1) if example.labels[t + 1] != IGNORE_INDEX)


def build_layout(examples: list[TokenizedExample], k: int, vocab_size: int) -> SoftLabelLayout:
    """The shared layout of `examples` (the public transfer set) with a `k`-token public index set."""
    if not examples:
        raise ValueError("the transfer set is empty: soft labels need at least one public example")
    if not 1 <= k < vocab_size:
        raise ValueError(f"transfer.index_k={k} must be in [1, vocab_size - 1 = {vocab_size - 1}]")
    positions = tuple(_trained_positions(e) for e in examples)
    targets = Counter(e.labels[t + 1] for e, pos in zip(examples, positions, strict=True) for t in pos)
    ranked = sorted(targets, key=lambda token: (-targets[token], token))[:k]
    unused = (token for token in range(vocab_size) if token not in targets)
    index = tuple(ranked + [next(unused) for _ in range(k - len(ranked))])
    if sum(len(p) for p in positions) == 0:
        raise ValueError("the transfer set has no trained position; use longer records")
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    digest.update(np.asarray(index, dtype=np.int64).tobytes())
    return SoftLabelLayout(index, tuple(len(e) for e in examples), positions, digest.hexdigest()[:32])


def _batches(examples: list[TokenizedExample], batch_size: int, pad_id: int):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield start, chunk, collate(chunk, pad_id=pad_id)


@torch.no_grad()
def _per_position(model: nn.Module, examples, layout, *, pad_id: int, batch_size: int, device, reduce):
    """Apply `reduce(log_probs[seq, vocab]) -> [seq, ...]` to each example's logits, keep the layout rows."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start, chunk, batch in _batches(examples, batch_size, pad_id):
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for offset, _ in enumerate(chunk):
                positions = list(layout.positions[start + offset])
                rows.append(reduce(log_probs[offset, positions]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows).numpy()


def soft_labels(
    model: nn.Module,
    examples: list[TokenizedExample],
    layout: SoftLabelLayout,
    *,
    pad_id: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The model's `[positions, k + 1]` distribution over the index set and the tail bucket, float64."""
    index = torch.tensor(layout.index, dtype=torch.long, device=device)

    def restrict(log_probs: Tensor) -> Tensor:
        kept = log_probs.double().exp()[:, index]
        tail = (1.0 - kept.sum(-1, keepdim=True)).clamp_min(0.0)
        return torch.cat([kept, tail], dim=-1)

    return _per_position(
        model, examples, layout, pad_id=pad_id, batch_size=batch_size, device=device, reduce=restrict
    )


def votes(
    model: nn.Module,
    examples: list[TokenizedExample],
    layout: SoftLabelLayout,
    *,
    pad_id: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The model's top-1 token over the whole vocabulary at every layout position, int64 (PATE votes)."""
    return _per_position(
        model,
        examples,
        layout,
        pad_id=pad_id,
        batch_size=batch_size,
        device=device,
        reduce=lambda log_probs: log_probs.argmax(-1),
    ).astype(np.int64)


def check_soft_labels(values: np.ndarray, layout: SoftLabelLayout, *, tolerance: float = 1e-3) -> np.ndarray:
    """Shape, finiteness, range and row sums of a soft-label array; returns it as float64."""
    array = np.asarray(values)
    if array.shape != layout.shape:
        raise ValueError(f"soft labels have shape {array.shape}, the shared layout is {layout.shape}")
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("soft labels hold NaN or infinite values")
    if array.min() < -tolerance or array.max() > 1 + tolerance:
        raise ValueError(
            f"soft labels must be probabilities in [0, 1], got [{array.min():.4g}, {array.max():.4g}]"
        )
    sums = array.sum(axis=1)
    worst = float(np.abs(sums - 1.0).max())
    if worst > tolerance * layout.width:
        raise ValueError(
            f"soft-label rows must sum to 1 (index set + tail); the worst row sums to 1 {worst:+.3g}"
        )
    return array


def relabeled(
    examples: list[TokenizedExample], layout: SoftLabelLayout, tokens: np.ndarray
) -> list[TokenizedExample]:
    """Copies of `examples` whose trained next tokens are `tokens` (one per layout position)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.shape != (layout.n_positions,):
        raise ValueError(f"expected {layout.n_positions} labels, got shape {tokens.shape}")
    out, cursor = [], 0
    for example, positions in zip(examples, layout.positions, strict=True):
        labels = [IGNORE_INDEX] * len(example)
        for t in positions:
            labels[t + 1] = int(tokens[cursor])
            cursor += 1
        out.append(TokenizedExample(list(example.input_ids), labels, example.record_index, example.truncated))
    return out


class EnsembleTargets:
    """Teacher targets for the `Distiller` from a `[positions, k + 1]` soft-label array.

    Batches must carry `example_index` (the Distiller adds it): row i of the batch is transfer example
    `example_index[i]`. Positions outside the layout get a uniform placeholder; their labels are -100.
    """

    def __init__(self, soft: np.ndarray, layout: SoftLabelLayout, device: torch.device | str = "cpu") -> None:
        probs = np.clip(check_soft_labels(soft, layout)[:, : layout.k], MIN_PROBABILITY, 1.0)
        width = max(layout.lengths)
        values = torch.full((len(layout.lengths), width, layout.k), -float(np.log(layout.width)))
        cursor = 0
        for row, positions in enumerate(layout.positions):
            if positions:
                chunk = torch.from_numpy(np.log(probs[cursor : cursor + len(positions)])).float()
                values[row, list(positions)] = chunk
                cursor += len(positions)
        self.values = values.to(device)
        self.index = torch.tensor(layout.index, dtype=torch.long, device=device)

    def __call__(self, batch: dict[str, Tensor]) -> TopKLogits:
        rows = batch["example_index"].to(self.values.device)
        seq = batch["input_ids"].shape[1]
        values = self.values[rows, :seq]
        if values.shape[1] < seq:
            pad = values.new_full(
                (values.shape[0], seq - values.shape[1], values.shape[2]), values[0, 0, 0].item()
            )
            values = torch.cat([values, pad], dim=1)
        return TopKLogits(values=values, indices=self.index.expand_as(values))
