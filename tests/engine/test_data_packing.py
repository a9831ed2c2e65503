"""Packing, the one-record-per-sequence check, collation and batch orders."""

from __future__ import annotations

import pytest
import torch

from secure_kd.data import (
    IGNORE_INDEX,
    TokenizedExample,
    assert_one_record_per_sequence,
    batches,
    collate,
    epoch_order,
    fingerprint_examples,
    locate_step,
    pack_examples,
)

EOS = 0


def example(ids, n_prompt=0, index=0):
    labels = [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])
    return TokenizedExample(list(ids), labels, record_index=index)


RECORDS = [
    example([5, 6, 7, EOS], n_prompt=2, index=0),  # already ends with eos
    example([8, 9, 10, 11, 12], index=1),
    example([13], index=2),
    example([14, 15, 16, 17, 18, 19, 20], n_prompt=3, index=3),
]


@pytest.mark.parametrize("seq_len", [1, 3, 4, 7, 100])
def test_packing_reproduces_the_stream_with_eos_separators(seq_len):
    blocks = pack_examples(RECORDS, seq_len, eos_id=EOS)
    # written out by hand: records joined, eos after every record that lacks one
    expected_ids = [5, 6, 7, 0, 8, 9, 10, 11, 12, 0, 13, 0, 14, 15, 16, 17, 18, 19, 20, 0]
    m = IGNORE_INDEX
    expected_labels = [m, m, 7, 0, 8, 9, 10, 11, 12, 0, 13, 0, m, m, m, 17, 18, 19, 20, 0]
    assert [t for b in blocks for t in b.input_ids] == expected_ids
    assert [t for b in blocks for t in b.labels] == expected_labels
    assert all(len(b) == seq_len for b in blocks[:-1]) and 0 < len(blocks[-1]) <= seq_len
    assert all(b.record_index == -1 for b in blocks)


def test_packed_blocks_know_their_records():
    blocks = pack_examples(RECORDS, 7, eos_id=EOS)
    assert [b.packed_from for b in blocks] == [(0, 1), (1, 2, 3), (3,)]


def test_drop_last_drops_the_short_block():
    blocks = pack_examples(RECORDS, 7, eos_id=EOS, drop_last=True)
    assert [len(b) for b in blocks] == [7, 7]


def test_one_record_per_sequence_check():
    assert_one_record_per_sequence(RECORDS)
    with pytest.raises(ValueError, match=r"packed block of records \[0, 1\].*disable packing"):
        assert_one_record_per_sequence(pack_examples(RECORDS, 7, eos_id=EOS))
    with pytest.raises(ValueError, match="record 1 appears in examples 1 and 2"):
        assert_one_record_per_sequence([RECORDS[0], RECORDS[1], RECORDS[1]])


def test_collate_pads_right_and_masks_padding():
    batch = collate(RECORDS, pad_id=99)
    lengths = [4, 5, 1, 7]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 7)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert batch["input_ids"][row, n:].tolist() == [99] * (7 - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (7 - n)
        assert batch["input_ids"][row, :n].tolist() == RECORDS[row].input_ids
        assert batch["labels"][row, :n].tolist() == RECORDS[row].labels
    assert batch["record_index"].tolist() == [0, 1, 2, 3]


def test_collate_pad_to_multiple_of():
    assert collate(RECORDS, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (4, 8)
    assert collate(RECORDS[:1], pad_id=0, pad_to_multiple_of=3)["input_ids"].shape == (1, 6)
    with pytest.raises(ValueError, match="at least one example"):
        collate([], pad_id=0)


def test_example_rejects_misaligned_labels():
    with pytest.raises(ValueError, match=r"input_ids \(2\) and labels \(1\) must have the same length"):
        TokenizedExample([1, 2], [1], record_index=0)


def test_fingerprint_depends_on_tokens_and_boundaries_not_masks():
    base = fingerprint_examples(RECORDS)
    assert base == fingerprint_examples([example(r.input_ids, index=r.record_index) for r in RECORDS])
    assert base != fingerprint_examples(RECORDS[::-1])
    merged = [example(RECORDS[0].input_ids + RECORDS[1].input_ids)] + RECORDS[2:]
    assert base != fingerprint_examples(merged)


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(50, epoch=0, seed=3)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, epoch=0, seed=3)
    assert order != epoch_order(50, epoch=1, seed=3)
    assert order != epoch_order(50, epoch=0, seed=4)
    assert order != list(range(50))


def test_batches_cover_each_example_once():
    got = list(batches(range(10), 4, shuffle=True, seed=1))
    assert [len(b) for b in got] == [4, 4, 2]
    assert sorted(i for b in got for i in b) == list(range(10))
    assert list(batches(10, 4, shuffle=False, seed=0)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(batches(10, 4, shuffle=False, seed=0, drop_last=True)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_resume_reproduces_the_remaining_batches():
    n, size, seed = 23, 4, 9
    stream = [b for epoch in range(3) for b in batches(n, size, shuffle=True, seed=seed, epoch=epoch)]
    for step in (0, 5, 6, 13, 17):
        epoch, start = locate_step(step, n, size)
        resumed = list(batches(n, size, shuffle=True, seed=seed, epoch=epoch, start_batch=start))
        assert resumed == stream[step : (epoch + 1) * 6]
    assert locate_step(13, n, size) == (2, 1)  # 6 batches per epoch
    assert locate_step(13, n, size, drop_last=True) == (2, 3)  # 5 batches per epoch


def test_batching_errors():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(batches(4, 0, shuffle=False, seed=0))
    with pytest.raises(ValueError, match="no batch of 8"):
        locate_step(0, 4, 8, drop_last=True)
