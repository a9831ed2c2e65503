"""Packing: concatenate tokenized records into fixed-length blocks, and the check that DP needs."""

from __future__ import annotations

from collections.abc import Sequence

from secure_kd.data.example import TokenizedExample


def pack_examples(
    examples: Sequence[TokenizedExample], seq_len: int, *, eos_id: int, drop_last: bool = False
) -> list[TokenizedExample]:
    """Concatenate `examples` into blocks of `seq_len` tokens ("wrapped" packing).

    Records are joined in order; a record that does not already end with `eos_id` gets one
    appended, labelled as trained (it marks the record's end). Labels travel with their tokens,
    so they stay aligned; a record may straddle two blocks. The last block is shorter unless
    `drop_last`. Each block has `record_index=-1` and `packed_from` = the records it holds.

    Packing is refused under differential privacy: DP-SGD bounds the influence of one training
    example, so the private unit must be one record, while a block mixes several records and one
    record can span two blocks. The trainer enforces this by calling
    `assert_one_record_per_sequence` on what it is about to train with DP.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream_ids: list[int] = []
    stream_labels: list[int] = []
    stream_records: list[int] = []
    for example in examples:
        ids, labels = list(example.input_ids), list(example.labels)
        if not ids or ids[-1] != eos_id:
            ids.append(eos_id)
            labels.append(eos_id)
        stream_ids += ids
        stream_labels += labels
        stream_records += [example.record_index] * len(ids)

    blocks = []
    for start in range(0, len(stream_ids), seq_len):
        end = start + seq_len
        if end > len(stream_ids) and drop_last:
            break
        blocks.append(
            TokenizedExample(
                input_ids=stream_ids[start:end],
                labels=stream_labels[start:end],
                record_index=-1,
                packed_from=tuple(dict.fromkeys(stream_records[start:end])),
            )
        )
    return blocks


def assert_one_record_per_sequence(examples: Sequence[TokenizedExample]) -> None:
    """Raise `ValueError` unless every example is exactly one whole record, each record at most once.

    This is the precondition of example-level DP (Opacus, DP-SGD): the per-example gradient
    clipping bounds one record's influence only if no example holds parts of several records
    (packing) and no record feeds several examples.
    """
    seen: dict[int, int] = {}
    for position, example in enumerate(examples):
        if example.packed_from or example.record_index < 0:
            raise ValueError(
                f"example {position} is a packed block of records {list(example.packed_from)}; "
                "differential privacy protects one record per example, so disable packing when training "
                "with DP"
            )
        if example.record_index in seen:
            raise ValueError(
                f"record {example.record_index} appears in examples {seen[example.record_index]} and "
                f"{position}; under DP each record must be one example (deduplicate the records, or "
                "account for the repetition: a record seen k times is protected at about k*epsilon)"
            )
        seen[example.record_index] = position
