"""Bits per byte against a hand computation, and agreement across tokenizers against the one-tokenizer
`teacher_agreement` (its special case) and against constant predictors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from secure_kd.config import TinyModelConfig
from secure_kd.cross_tokenizer import VocabPair
from secure_kd.data import collate, generate_corpus, train_tiny_tokenizer
from secure_kd.data.paired import tokenize_pairs
from secure_kd.evaluate import (
    bits_per_byte,
    cross_tokenizer_agreement,
    paired_batches,
    teacher_agreement,
    top1_predictions,
)
from secure_kd.models import build_tiny

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)


class Constant(nn.Module):
    """The same next-token distribution at every position: log p."""

    def __init__(self, log_p: torch.Tensor) -> None:
        super().__init__()
        self.log_p = nn.Parameter(log_p.clone())

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.log_p.expand(*input_ids.shape, -1)})()


@pytest.fixture(scope="module")
def byte_tok():
    """256 byte tokens + 3 specials and no merges: one token per byte."""
    tok = train_tiny_tokenizer(["abc"], vocab_size=259)
    assert len(tok) == 259
    return tok


def test_bits_per_byte_by_hand(byte_tok):
    a, b = byte_tok.convert_tokens_to_ids(["a", "b"])
    eos = byte_tok.eos_token_id
    p = torch.full((259,), 0.125 / 256)
    p[a], p[b], p[eos] = 0.5, 0.25, 0.125
    model = Constant(p.log())
    records = [{"prompt": "x", "completion": "ab"}, {"prompt": "x", "completion": "é"}]  # é: 2 bytes
    paired = tokenize_pairs(records, byte_tok, byte_tok, max_length=16)
    batches = paired_batches(paired.pairs, "student", pad_id=eos, batch_size=2)
    out = bits_per_byte(model, batches, eos_id=eos)
    # "ab": -log2 0.5 - log2 0.25 = 3 bits; "é" = 2 byte tokens at 0.125/256 each: 2 * 11 bits; 4 bytes
    assert out["bytes"] == 4 and out["tokens"] == 4
    assert out["bits_per_byte"] == pytest.approx((3 + 22) / 4, rel=1e-6)
    assert out["byte_perplexity"] == pytest.approx(2 ** ((3 + 22) / 4), rel=1e-6)
    assert out["nll"] == pytest.approx(25 * math.log(2), rel=1e-6)
    rows = bits_per_byte(model, batches, eos_id=eos, per_example=True)
    assert rows["example_bytes"] == [2, 2]
    assert rows["example_nll"] == pytest.approx([3 * math.log(2), 22 * math.log(2)], rel=1e-6)
    # the end of sequence covers no byte: with include_eos it adds 2 * 3 bits and no byte
    with_eos = bits_per_byte(model, batches, eos_id=eos, include_eos=True)
    assert with_eos["bits_per_byte"] == pytest.approx((3 + 22 + 6) / 4, rel=1e-6)


def test_two_tokenizers_are_scored_on_the_same_bytes():
    records = list(generate_corpus(8, seed=1, n_canaries=0).records)
    texts = [r["text"] for r in records]
    tok_a, tok_b = train_tiny_tokenizer(texts, 400), train_tiny_tokenizer([t[::-1] for t in texts], 300)
    paired = tokenize_pairs(records, tok_b, tok_a, max_length=30)  # truncated: the boundary matters
    s = bits_per_byte(
        build_tiny(TINY, len(tok_b), seed=0),
        paired_batches(paired.pairs, "student", pad_id=0, batch_size=4),
        eos_id=0,
    )
    t = bits_per_byte(
        build_tiny(TINY, len(tok_a), seed=1),
        paired_batches(paired.pairs, "teacher", pad_id=0, batch_size=4),
        eos_id=0,
    )
    assert s["bytes"] == t["bytes"] == sum(p.aligned_end - p.aligned_start for p in paired.pairs)
    assert s["tokens"] != t["tokens"]  # the same text, a different number of predictions


def test_one_tokenizer_agreement_is_teacher_agreement():
    records = list(generate_corpus(10, seed=2, n_canaries=0).records)
    tok = train_tiny_tokenizer([r["text"] for r in records], 350)
    student = build_tiny(TINY, len(tok), seed=3)
    teacher = copy.deepcopy(student)  # the student, its output layer perturbed: agreement in (0, 1)
    noise = torch.randn(teacher.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher.lm_head.weight.add_(0.5 * teacher.lm_head.weight.std() * noise)
    paired = tokenize_pairs(records, tok, tok, max_length=48)
    vocab = VocabPair.from_tokenizers(tok, tok, student_width=len(tok), teacher_width=len(tok))
    cross = cross_tokenizer_agreement(
        student,
        teacher,
        paired.pairs,
        student_tokenizer=tok,
        teacher_tokenizer=tok,
        vocab=vocab,
        student_pad_id=0,
        teacher_pad_id=0,
        batch_size=4,
    )
    batches = [collate(paired.students[i : i + 4], pad_id=0) for i in range(0, len(paired), 4)]
    same = teacher_agreement(student, teacher, batches)
    assert cross["coverage"] == 1.0 and cross["groups"] == same["positions"]
    assert cross["top1_agreement"] == pytest.approx(same["top1_agreement"])
    assert 0.0 < same["top1_agreement"] < 1.0


def test_agreement_compares_bytes_and_the_end_of_sequence_across_tokenizers():
    records = list(generate_corpus(6, seed=5, n_canaries=0).records)
    texts = [r["text"] for r in records]
    tok_a = train_tiny_tokenizer(texts, 400)
    tok_b = train_tiny_tokenizer([t[::-1] for t in texts], 300)
    tok_b.add_special_tokens({"eos_token": "<|stop|>"})  # another end-of-sequence token, another id
    paired = tokenize_pairs(records, tok_b, tok_a, max_length=40)
    vocab = VocabPair.from_tokenizers(tok_b, tok_a, student_width=len(tok_b), teacher_width=len(tok_a))

    def constant(tok, token):
        log_p = torch.full((len(tok),), -10.0)
        log_p[tok.convert_tokens_to_ids(token)] = 0.0
        return Constant(log_p)

    def agreement(s_token, t_token):
        return cross_tokenizer_agreement(
            constant(tok_b, s_token),
            constant(tok_a, t_token),
            paired.pairs,
            student_tokenizer=tok_b,
            teacher_tokenizer=tok_a,
            vocab=vocab,
            student_pad_id=0,
            teacher_pad_id=0,
        )

    assert agreement("e", "e")["top1_agreement"] == 1.0
    assert agreement("e", "t")["top1_agreement"] == 0.0
    assert agreement("<|stop|>", "<|endoftext|>")["top1_agreement"] == 1.0  # both: "the text ends"
    assert 0.0 < agreement("e", "e")["coverage"] < 1.0
    # the teacher's predictions computed once give the same answer as the teacher model
    teacher = constant(tok_a, "e")
    once = top1_predictions(teacher, [p.teacher for p in paired.pairs], real_size=len(tok_a), pad_id=0)
    assert all(len(t) == len(p.teacher) for t, p in zip(once, paired.pairs, strict=True))
    kwargs = dict(
        student_tokenizer=tok_b, teacher_tokenizer=tok_a, vocab=vocab, student_pad_id=0, teacher_pad_id=0
    )
    student = constant(tok_b, "e")
    assert cross_tokenizer_agreement(student, once, paired.pairs, **kwargs) == cross_tokenizer_agreement(
        student, teacher, paired.pairs, **kwargs
    )
