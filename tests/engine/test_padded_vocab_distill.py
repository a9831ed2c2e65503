"""One tokenizer, two logits widths (a teacher padded to 49,216 columns for SmolLM2's 49,152 tokens is
the real case): detected, trimmed, and distilled with the ordinary objectives; no real id is dropped."""

from __future__ import annotations

import json

import pytest
import torch

from secure_kd.config import KDConfig, TinyModelConfig, TrainConfig, load_config
from secure_kd.cross_teacher import PaddedVocabObjective, TrimmedLiveTeacher, padded_to_other_width
from secure_kd.cross_tokenizer import VocabPadding, VocabPair
from secure_kd.data import collate, generate_corpus, tokenize_records, train_tiny_tokenizer
from secure_kd.distill_job import run_distill
from secure_kd.losses import jsd
from secure_kd.models import build_tiny
from secure_kd.teacher_targets import shift_labels
from secure_kd.trainer import Distiller

TINY = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2)
PAD = 64


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer([r["text"] for r in generate_corpus(16, seed=0, n_canaries=0).records], 320)


@pytest.fixture(scope="module")
def examples(tok):
    return tokenize_records(generate_corpus(8, seed=1, n_canaries=0).records, tok, max_length=32)


def _model(width, seed, favourite=None):
    model = build_tiny(TINY, width, seed=seed)
    with torch.no_grad():
        if favourite is not None:  # padding columns would win by far if they were not trimmed
            model.lm_head.weight[favourite:] = 40 * model.lm_head.weight[favourite:].sign()
    return model


def test_every_real_id_is_below_the_trimmed_width(tok):
    padding = VocabPadding.detect(tok, len(tok) + PAD)
    ids = set(tok.get_vocab().values()) | set(tok.all_special_ids)
    assert padding.real_size == len(tok) == max(ids) + 1 and padding.padding == PAD
    assert all(i < padding.real_size for i in ids)
    with pytest.raises(ValueError, match="does not belong to this model"):
        VocabPadding.detect(tok, len(tok) - 1)  # a tokenizer id past the logits is no padding


@pytest.mark.parametrize("wider", ["teacher", "student"])
def test_the_loss_is_the_objective_on_the_trimmed_logits(wider, tok, examples, tmp_path):
    real = len(tok)
    t_width, s_width = (real + PAD, real) if wider == "teacher" else (real, real + PAD)
    teacher = _model(t_width, 1, favourite=real if wider == "teacher" else None).eval()
    student = _model(s_width, 2)
    vocab = VocabPair.from_tokenizers(tok, tok, student_width=s_width, teacher_width=t_width)
    assert padded_to_other_width(vocab)
    d = Distiller(
        student=student,
        examples=examples,
        kd=KDConfig(loss="jsd", top_k=None),
        train=TrainConfig(max_steps=2, batch_size=4),
        out=tmp_path,
        pad_id=0,
        eos_id=0,
        targets=TrimmedLiveTeacher(teacher, None, vocab.teacher.real_size),
        vocab=vocab,
        progress=False,
    )
    batch = collate(examples[:4], pad_id=0)
    batch["example_index"] = torch.arange(4)
    with torch.no_grad():
        loss, _ = d.loss_on(batch)
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = jsd(s_logits[..., :real], t_logits[..., :real], shift_labels(batch["labels"]), beta=0.5)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert d.fit().steps == 2


def test_the_trimmed_top_k_keeps_the_last_real_id(tok):
    real = len(tok)

    class Favourite(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, real + PAD)
            logits[..., real - 1] = 5.0  # the last real token
            logits[..., real:] = 60.0  # padding, far above it
            return type("Out", (), {"logits": logits})()

    top = TrimmedLiveTeacher(Favourite(), 8, real)({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                                     "attention_mask": torch.ones(2, 3)})  # fmt: skip
    assert (top.indices[..., 0] == real - 1).all() and int(top.indices.max()) < real
    objective = PaddedVocabObjective(jsd, VocabPair.identical(real, teacher_width=real + PAD))
    bad = type(top)(top.values, top.indices.clamp_min(real))
    with pytest.raises(ValueError, match="padding column"):
        objective(torch.zeros(2, 3, real), bad, None, tail="uniform")


def test_two_different_vocabularies_are_not_trimmed_into_one(tok):
    other = train_tiny_tokenizer(["another corpus entirely"] * 6, 280)
    vocab = VocabPair.from_tokenizers(other, tok, student_width=len(other), teacher_width=len(tok))
    with pytest.raises(ValueError, match="uld.*span_aligned"):
        PaddedVocabObjective(jsd, vocab)


@pytest.mark.parametrize("targets", ["cache", "live"])
def test_secure_kd_distill_with_a_padded_teacher(tmp_path, targets):
    """Before: 'teacher vocabulary (448) and student vocabulary (384) differ' and nothing trained."""
    out = tmp_path / "run"
    job = load_config(
        "configs/tiny.yaml",
        [
            f"out={out}",
            f"kd.teacher_targets={targets}",
            "teacher.tiny.vocab_size=448",  # tokenizer: tiny:384, padded by 64
            "student.tiny.vocab_size=384",
            "train.max_steps=3",
        ],
    )
    result = run_distill(job, progress=False, log=lambda *a, **k: None)
    assert result.steps == 3 and all(loss == loss for loss in result.losses)
    assert json.loads((out / "student" / "config.json").read_text())["vocab_size"] == 384
    if targets == "cache":
        manifest = json.loads((out / "teacher-cache" / "manifest.json").read_text())
        assert manifest["vocab_size"] == 384 and manifest["logits_width"] == 448


@pytest.mark.slow
def test_smollm2_padded_to_49216_distils_with_its_own_targets(tmp_path):
    """The issue's case: SmolLM2 (Q4_1) with its output layer padded from 49,152 to 49,216 columns and a
    student of width 49,152, one tokenizer. The trimmed targets are the unpadded teacher's targets."""
    from secure_kd.assets import asset_dir, asset_info
    from secure_kd.models import load_pretrained, load_tokenizer

    if asset_info(asset_dir()) is None:
        pytest.skip("the SmolLM2 asset is absent: run `secure-kd assets fetch-smollm2`")
    tok = load_tokenizer("smollm2")
    teacher = load_pretrained("smollm2").eval()
    records = [{"text": "Knowledge distillation trains a small student to match a larger teacher."}] * 4
    examples = tokenize_records(records, tok, max_length=32)
    batch = collate(examples, pad_id=tok.pad_token_id)
    batch["example_index"] = torch.arange(len(examples))
    with torch.no_grad():
        reference = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher.resize_token_embeddings(49_216)  # 64 padding rows (tied: input and output)
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab = VocabPair.from_tokenizers(tok, tok, student_width=49_152, teacher_width=49_216)
    assert (vocab.teacher.real_size, vocab.teacher.padding, vocab.student.padding) == (49_152, 64, 0)
    targets = TrimmedLiveTeacher(teacher, 16, vocab.teacher.real_size)
    top, expected = targets(batch), reference.log_softmax(-1).topk(16)
    assert torch.equal(top.indices, expected.indices)
    assert torch.allclose(top.values, expected.values, atol=1e-4)
    student = build_tiny(TINY, 49_152, seed=0)
    d = Distiller(
        student=student,
        examples=examples,
        kd=KDConfig(loss="forward_kl", top_k=16),
        train=TrainConfig(max_steps=2, batch_size=4),
        out=tmp_path,
        pad_id=tok.pad_token_id,
        eos_id=tok.eos_token_id,
        targets=targets,
        vocab=vocab,
        progress=False,
    )
    assert d.fit().steps == 2
