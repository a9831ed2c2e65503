"""Collation: a list of tokenized examples -> right-padded tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from secure_kd.data.example import IGNORE_INDEX, TokenizedExample


def collate(
    examples: Sequence[TokenizedExample], *, pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Stack `examples` into a batch, padded on the right.

    Returns int64 tensors: `input_ids` [batch, seq] (padding = `pad_id`), `attention_mask`
    [batch, seq] (1 on real tokens), `labels` [batch, seq] (unshifted; -100 on padding and on
    untrained tokens) and `record_index` [batch] (which record each row came from; -1 for packed
    blocks). `seq` is the longest example, rounded up to a multiple of `pad_to_multiple_of`.
    """
    if not examples:
        raise ValueError("collate needs at least one example, got an empty list")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
    seq = max(len(example) for example in examples)
    if pad_to_multiple_of is not None:
        seq = -(-seq // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, seq), pad_id, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    record_index = torch.tensor([example.record_index for example in examples], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "record_index": record_index,
    }
