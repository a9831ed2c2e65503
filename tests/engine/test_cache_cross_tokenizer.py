"""The top-k cache for a student with another tokenizer: it stores the teacher's token ids and byte
spans next to the top-k, round-trips them exactly, and refuses what does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from secure_kd.cache import CacheCorruptionError, CacheMismatchError, LogitCache, build_cache
from secure_kd.config import TinyModelConfig
from secure_kd.cross_teacher import CachedCrossTeacher
from secure_kd.cross_tokenizer import VocabPadding
from secure_kd.data import generate_corpus, train_tiny_tokenizer
from secure_kd.data.paired import tokenize_pairs
from secure_kd.fingerprint import token_dataset_fingerprint
from secure_kd.models import build_tiny

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def setup():
    records = list(generate_corpus(12, seed=3, n_canaries=0).records)
    texts = [r["text"] for r in records]
    teacher_tok = train_tiny_tokenizer(texts, 400)
    student_tok = train_tiny_tokenizer([t[::-1] for t in texts], 300)
    paired = tokenize_pairs(records, student_tok, teacher_tok, max_length=48)
    teacher = build_tiny(TINY, len(teacher_tok), seed=1).eval()
    return paired, teacher


def _build(paired, teacher, directory, **kw):
    args = dict(
        k=8,
        teacher_id="tiny",
        tokenizer_fingerprint="tok-a",
        byte_spans=[p.teacher_spans for p in paired.pairs],
        text_fingerprint=paired.text_fingerprint,
        shard_tokens=200,  # several shards
        progress=False,
    )
    args.update(kw)
    return build_cache(teacher, [p.teacher.input_ids for p in paired.pairs], directory, **args)


def _open(paired, directory, **kw):
    return LogitCache.open(
        directory,
        expect_tokenizer="tok-a",
        expect_dataset=token_dataset_fingerprint(p.teacher.input_ids for p in paired.pairs),
        **kw,
    )


def test_teacher_ids_and_spans_round_trip_exactly(setup, tmp_path):
    paired, teacher = setup
    manifest = _build(paired, teacher, tmp_path)
    assert len(manifest.shards) > 1 and manifest.teacher_tokenization is not None
    cache = _open(paired, tmp_path, expect_text=paired.text_fingerprint)
    for index in (*range(len(paired)), *range(len(paired) - 1, -1, -1)):  # across shards, LRU both ways
        ids, spans = cache.teacher_tokens(index)
        assert ids.tolist() == paired.pairs[index].teacher.input_ids
        assert [tuple(s) for s in spans.tolist()] == list(paired.pairs[index].teacher_spans)
    # the top-k indexes the teacher's own tokenization: the ids a forward pass on it ranks in its top 8
    for index in (0, len(paired) - 1):
        ids = torch.tensor([paired.pairs[index].teacher.input_ids])
        with torch.no_grad():
            top = teacher(input_ids=ids).logits[0].topk(8).indices
        assert torch.equal(cache[index].indices.sort(-1).values, top.sort(-1).values)
    batch_ids, batch_spans, lengths = cache.teacher_tokens_batch([2, 0], pad_id=7)
    assert lengths == [len(paired.pairs[2].teacher), len(paired.pairs[0].teacher)]
    assert batch_ids[1, lengths[1] :].eq(7).all() and batch_spans[1, lengths[1] :].eq(-1).all()


def test_the_cross_targets_come_from_the_cache_alone(setup, tmp_path):
    paired, teacher = setup
    _build(paired, teacher, tmp_path)
    cache = _open(paired, tmp_path, expect_text=paired.text_fingerprint)
    targets = CachedCrossTeacher(cache, [p.student_spans for p in paired.pairs], "cpu")
    from secure_kd.data import collate

    batch = collate([paired.pairs[i].student for i in (1, 4)], pad_id=0)
    batch["example_index"] = torch.tensor([1, 4])
    out = targets(batch)
    assert out.logits.values.shape[:2] == out.teacher_labels.shape
    # teacher labels: the teacher's next token wherever it lies in the shared text, -100 elsewhere
    pair = paired.pairs[4]
    expected = [
        token if span[0] >= 0 else -100
        for token, span in zip(pair.teacher.input_ids[1:], pair.teacher_spans[1:], strict=True)
    ]
    assert out.teacher_labels[1, : len(expected)].tolist() == expected
    assert out.alignment.n_groups > 0


def test_mismatches_are_refused(setup, tmp_path):
    paired, teacher = setup
    _build(paired, teacher, tmp_path / "spans")
    with pytest.raises(CacheMismatchError, match="shared-text fingerprint"):
        _open(paired, tmp_path / "spans", expect_text="another text")
    build_cache(
        teacher,
        [p.teacher.input_ids for p in paired.pairs],
        tmp_path / "plain",
        k=8,
        teacher_id="tiny",
        tokenizer_fingerprint="tok-a",
        progress=False,
    )
    with pytest.raises(CacheMismatchError, match="no teacher tokenization"):
        _open(paired, tmp_path / "plain", expect_text=paired.text_fingerprint)
    with pytest.raises(ValueError, match="no teacher tokenization"):
        CachedCrossTeacher(_open(paired, tmp_path / "plain"), [p.student_spans for p in paired.pairs], "cpu")
    # resuming a build into a cache made without spans is refused, naming the setting
    with pytest.raises(CacheMismatchError, match="teacher_tokenization"):
        _build(paired, teacher, tmp_path / "plain", shard_tokens=32768)


def test_bad_spans_are_refused_before_the_teacher_runs(setup, tmp_path):
    paired, teacher = setup
    spans = [list(p.teacher_spans) for p in paired.pairs]
    spans[0] = spans[0][:-1]
    with pytest.raises(ValueError, match="sequence 0 has .* tokens but .* byte spans"):
        _build(paired, teacher, tmp_path / "a", byte_spans=spans)
    spans = [list(p.teacher_spans) for p in paired.pairs]
    spans[1][0] = (5, 2)
    with pytest.raises(ValueError, match="sequence 1 has a byte span"):
        _build(paired, teacher, tmp_path / "b", byte_spans=spans)
    with pytest.raises(ValueError, match="together"):
        _build(paired, teacher, tmp_path / "c", text_fingerprint=None)
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_a_tampered_span_tensor_fails_the_checksum(setup, tmp_path):
    paired, teacher = setup
    manifest = _build(paired, teacher, tmp_path)
    shard = tmp_path / manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header["byte_spans"]["data_offsets"][0]
    data[start] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptionError, match="sha256"):
        _open(paired, tmp_path).teacher_tokens(0)


def test_a_padded_teacher_is_trimmed_and_keeps_every_real_id(tmp_path):
    """A teacher 64 columns wider than its tokenizer: the cache drops the padding before the top-k, and
    the last real id, made the teacher's favourite, is kept; the padding, made huge, never appears."""
    tok = train_tiny_tokenizer(["some text to learn from, again and again"] * 8, 300)
    real = VocabPadding.detect(tok, len(tok) + 64).real_size
    assert real == len(tok) and all(i < real for i in tok.get_vocab().values())

    class Favourite(torch.nn.Module):
        """Logits: the last real id at +10, the padding columns at +50, everything else 0."""

        config = type("C", (), {"vocab_size": real + 64})()

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, real + 64)
            logits[..., real - 1] = 10.0
            logits[..., real:] = 50.0
            return logits

    sequences = [[1, 5, 9, 12], [3, 4]]
    manifest = build_cache(
        Favourite(), sequences, tmp_path, k=4, teacher_id="t", tokenizer_fingerprint="f", vocab_size=real,
        progress=False,
    )  # fmt: skip
    assert manifest.vocab_size == real and manifest.logits_width == real + 64
    cache = LogitCache.open(
        tmp_path, expect_tokenizer="f", expect_dataset=token_dataset_fingerprint(sequences)
    )
    top = cache[0]
    assert (top.indices[:, 0] == real - 1).all() and int(top.indices.max()) < real
    # exact: p(last real id) = e^10 / (e^10 + real - 1) over the real vocabulary alone
    expected = 10.0 - np.log(np.exp(10.0) + real - 1)
    assert top.values[:, 0].numpy() == pytest.approx(expected, abs=0.05)
