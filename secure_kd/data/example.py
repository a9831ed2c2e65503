"""The unit every data step passes along: one token sequence with its labels and its source record."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from secure_kd.fingerprint import token_dataset_fingerprint

IGNORE_INDEX = -100
"""Label of a position that is not trained (prompt tokens, padding), as in Hugging Face models."""


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence.

    input_ids:    token ids.
    labels:       same length as `input_ids`, UNshifted (Hugging Face convention): `labels[t] ==
                  input_ids[t]` where the token is trained, `IGNORE_INDEX` (-100) where it is not.
                  The model or the trainer shifts them.
    record_index: position of the source record in the records that were tokenized; -1 for a
                  packed block, which mixes several records (see `packed_from`).
    truncated:    the record was longer than `max_length` and lost its tail.
    packed_from:  for a packed block, the record indices it holds tokens of, in order; empty otherwise.
    """

    input_ids: list[int]
    labels: list[int]
    record_index: int
    truncated: bool = False
    packed_from: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) must have the same "
                f"length (record {self.record_index}); labels are unshifted, one per input token"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        """Number of positions whose label is trained (not -100)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def fingerprint_examples(examples: Iterable[TokenizedExample]) -> str:
    """sha256 of the token ids of `examples`, in order (see `token_dataset_fingerprint`).

    Only `input_ids` enter the hash: the teacher's logits and the privacy ledger depend on the
    tokens, not on which of them are trained.
    """
    return token_dataset_fingerprint(example.input_ids for example in examples)
