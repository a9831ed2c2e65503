"""The public index sets of the soft-label layout: which k token ids each transfer position carries.

Both ways are computed from public inputs only, the transfer set's text and, for the second, a public
model that every participant holds, never from an organization's records or model; so the layout, which
every participant derives alone and the server learns, says nothing about anyone's data:

- `unigram_index`: one set for every position, the k most frequent target tokens of the transfer set
  (ties go to the smaller id; unused ids fill it when the transfer set has fewer distinct targets). A
  unigram reference model over public text.
- `reference_index` (`transfer.reference`): per position, the k most likely next tokens of a public
  reference model (e.g. the SmolLM2 asset) on the transfer text, i.e. that model's top-k. The forward
  pass runs in float64, one example at a time (no padding), and ties go to the smaller id, so that
  participants in other processes, with other thread counts, get the same ids; the layout fingerprint,
  checked on every message, refuses a participant that did not (float64 makes that improbable: two
  logits would have to agree to about 1e-13 at a top-k boundary).

An organization's soft labels are then its own model's probabilities of exactly those ids at each
position, plus the tail: what it sends depends on its private model, where it sends it does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from secure_kd.data import TokenizedExample


def unigram_index(
    examples: Sequence[TokenizedExample], positions: Sequence[Sequence[int]], k: int, vocab_size: int
) -> np.ndarray:
    """The `k` most frequent next tokens over the trained positions, `[k]` int64."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for example, pos in zip(examples, positions, strict=True):
        for t in pos:
            counts[example.labels[t + 1]] += 1
    # descending count, then ascending id; ids never seen (count 0) follow in id order
    order = np.lexsort((np.arange(vocab_size), -counts))
    return order[:k].astype(np.int64)


def top_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The ids of the `k` largest values of `row`, largest first, ties to the smaller id."""
    if k >= row.shape[0]:
        return np.lexsort((np.arange(row.shape[0]), -row))[:k]
    threshold = np.partition(row, row.shape[0] - k)[row.shape[0] - k]
    candidates = np.flatnonzero(row >= threshold)  # every id tied at the boundary, in id order
    order = np.argsort(-row[candidates], kind="stable")  # stable: equal values keep the id order
    return candidates[order[:k]]


@torch.no_grad()
def reference_index(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    positions: Sequence[Sequence[int]],
    k: int,
    vocab_size: int,
) -> np.ndarray:
    """Per trained position, the reference model's top-`k` next tokens, `[n_positions, k]` int64.

    `model` is converted to float64 in place (pass one loaded for this purpose). Its output must cover
    the job's vocabulary: ids at and beyond `vocab_size` (padding of the output layer) are never chosen.
    """
    model.to(torch.float64).eval()
    rows: list[np.ndarray] = []
    for example, pos in zip(examples, positions, strict=True):
        if not pos:
            continue
        ids = torch.tensor([example.input_ids], dtype=torch.long, device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0]
        if logits.shape[-1] < vocab_size:
            raise ValueError(
                f"transfer.reference has an output of {logits.shape[-1]} tokens, the job's tokenizer "
                f"{vocab_size}: the reference must use the job's tokenizer (e.g. reference smollm2 with "
                "tokenizer: smollm2 or teacher)"
            )
        chosen = logits[list(pos), :vocab_size].double().cpu().numpy()
        rows.extend(top_ids(row, k) for row in chosen)
    return np.stack(rows).astype(np.int64)
