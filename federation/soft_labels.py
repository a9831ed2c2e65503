"""Soft labels on the public transfer set, in one layout every client shares.

Under CKKS the server adds ciphertexts slot by slot, so every client must put the same quantity in
the same slot. For a language model the layout is fixed once from public data only
(`federation.soft_label_index`):

- positions: every (example, t) of the transfer set whose next token is trained, in order;
- columns: k token ids per position, then one tail bucket holding the probability of every other
  token. The ids are either one public index set shared by every position (the `k` most frequent
  target tokens of the transfer set, a unigram reference model over public text) or, with
  `transfer.reference`, each position's top-k under a public reference model (e.g. the SmolLM2 asset
  every participant holds) on the transfer text.

A client's soft labels are its distribution at temperature 1 at those ids, a `[positions, k + 1]`
array whose rows sum to 1. The mean of several clients' arrays is again such an array, the ensemble
teacher; `EnsembleTargets` hands it to the engine's `Distiller` as `TopKLogits` (log-probabilities of
each position's ids; the tail is the missing mass, spread uniformly by `tail="uniform"`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from federation.soft_label_index import reference_index, unigram_index
from secure_kd.data import IGNORE_INDEX, TokenizedExample, collate
from secure_kd.topk import TopKLogits

MIN_PROBABILITY = 1e-8  # decrypted or rounded probabilities can reach 0; their log must stay finite
UNIGRAM, REFERENCE = "unigram", "reference-top-k"


@dataclass(frozen=True, eq=False)
class SoftLabelLayout:
    """Rows: the trained positions of the transfer set; columns: `index[row]` (k ids), then the tail.

    `index` is `[n_positions, k]` int64 (read-only); a `[k]` index is one set shared by every position."""

    index: np.ndarray
    lengths: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]
    fingerprint: str
    kind: str = UNIGRAM

    def __post_init__(self) -> None:
        index = np.asarray(self.index, dtype=np.int64)
        if index.ndim == 1:
            index = np.broadcast_to(index, (self.n_positions, index.shape[0]))
        if index.ndim != 2 or index.shape[0] != self.n_positions:
            raise ValueError(f"the layout index has shape {index.shape}, expected [{self.n_positions}, k]")
        index = np.array(index)  # own, contiguous copy
        index.setflags(write=False)
        object.__setattr__(self, "index", index)

    @property
    def k(self) -> int:
        return self.index.shape[1]

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


def build_layout(
    examples: list[TokenizedExample], k: int, vocab_size: int, *, reference: nn.Module | None = None
) -> SoftLabelLayout:
    """The shared layout of `examples` (the public transfer set): `k` ids per position, then the tail.

    Without `reference`, the `k` most frequent target tokens of `examples` for every position; with it,
    each position's top-`k` under that public model (converted to float64 in place: pass one loaded
    for this). See `federation.soft_label_index`."""
    if not examples:
        raise ValueError("the transfer set is empty: soft labels need at least one public example")
    if not 1 <= k < vocab_size:
        raise ValueError(f"transfer.index_k={k} must be in [1, vocab_size - 1 = {vocab_size - 1}]")
    positions = tuple(_trained_positions(e) for e in examples)
    if sum(len(p) for p in positions) == 0:
        raise ValueError("the transfer set has no trained position; use longer records")
    if reference is None:
        kind, index = UNIGRAM, unigram_index(examples, positions, k, vocab_size)
    else:
        kind, index = REFERENCE, reference_index(reference, examples, positions, k, vocab_size)
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
    if kind == REFERENCE:  # the unigram layout keeps the fingerprint it always had
        digest.update(kind.encode())
    digest.update(np.ascontiguousarray(index, dtype=np.int64).tobytes())
    return SoftLabelLayout(
        index, tuple(len(e) for e in examples), positions, digest.hexdigest()[:32], kind=kind
    )


def _batches(examples: list[TokenizedExample], batch_size: int, pad_id: int):
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield start, chunk, collate(chunk, pad_id=pad_id)


@torch.no_grad()
def _per_position(model: nn.Module, examples, layout, *, pad_id: int, batch_size: int, device, reduce):
    """Apply `reduce(log_probs[n, vocab], rows) -> [n, ...]` to each example's logits at its layout
    positions (`rows`: their slice of the layout's rows), and stack the results in layout order."""
    was_training = model.training
    model.eval()
    rows, cursor = [], 0
    try:
        for start, chunk, batch in _batches(examples, batch_size, pad_id):
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for offset, _ in enumerate(chunk):
                positions = list(layout.positions[start + offset])
                span = slice(cursor, cursor + len(positions))
                rows.append(reduce(log_probs[offset, positions], span).cpu())
                cursor += len(positions)
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
    """The model's `[positions, k + 1]` probabilities of each position's ids and the tail, float64."""
    index = torch.from_numpy(layout.index.copy()).to(device)

    def restrict(log_probs: Tensor, rows: slice) -> Tensor:
        kept = log_probs.gather(-1, index[rows]).double().exp()
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
        reduce=lambda log_probs, rows: log_probs.argmax(-1),
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


def full_distribution(soft: np.ndarray, index: np.ndarray, vocab_size: int) -> np.ndarray:
    """The full-vocabulary distribution that soft-label rows stand for in training (`tail="uniform"`):
    each row's ids get their values, every other token an equal share of the tail. `[rows, vocab]`."""
    soft = np.asarray(soft, dtype=np.float64)
    index = np.asarray(index, dtype=np.int64)
    k = index.shape[1]
    full = np.repeat(soft[:, k:] / (vocab_size - k), vocab_size, axis=1)
    np.put_along_axis(full, index, soft[:, :k], axis=1)
    return full


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
    `example_index[i]`. Each layout position gets its own ids (`layout.index`); positions outside the
    layout get a uniform placeholder over ids 0..k-1; their labels are -100.
    """

    def __init__(self, soft: np.ndarray, layout: SoftLabelLayout, device: torch.device | str = "cpu") -> None:
        probs = np.clip(check_soft_labels(soft, layout)[:, : layout.k], MIN_PROBABILITY, 1.0)
        shape = (len(layout.lengths), max(layout.lengths), layout.k)
        self.placeholder = -float(np.log(layout.width))
        values = torch.full(shape, self.placeholder)
        indices = torch.arange(layout.k, dtype=torch.long).expand(shape).clone()
        cursor = 0
        for row, positions in enumerate(layout.positions):
            if positions:
                span = slice(cursor, cursor + len(positions))
                values[row, list(positions)] = torch.from_numpy(np.log(probs[span])).float()
                indices[row, list(positions)] = torch.from_numpy(layout.index[span].copy())
                cursor += len(positions)
        self.values = values.to(device)
        self.indices = indices.to(device)

    def __call__(self, batch: dict[str, Tensor]) -> TopKLogits:
        rows = batch["example_index"].to(self.values.device)
        seq = batch["input_ids"].shape[1]
        values, indices = self.values[rows, :seq], self.indices[rows, :seq]
        if values.shape[1] < seq:
            extra = (values.shape[0], seq - values.shape[1], values.shape[2])
            values = torch.cat([values, values.new_full(extra, self.placeholder)], dim=1)
            pad = torch.arange(values.shape[2], dtype=torch.long, device=indices.device).expand(extra)
            indices = torch.cat([indices, pad], dim=1)
        return TopKLogits(values=values, indices=indices)
