"""The pre-distillation memorization forecast (`secure-kd audit --predict`): its features against
independent computations, and a known answer: a teacher fine-tuned on half of the records ranks that half
as the records to drop."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from secure_kd.app.cli import app
from secure_kd.config import load_config
from secure_kd.data import collate, generate_corpus
from secure_kd.data.example import TokenizedExample
from secure_kd.distill_job import run_distill
from secure_kd.evaluate import per_example_loss
from secure_kd.memorization_forecast import combined_score, duplicate_groups, model_features, zlib_entropy
from secure_kd.metrics import roc_metrics

QUIET = dict(progress=False, log=lambda *a, **k: None)


def test_zlib_entropy_is_compressed_bytes_per_byte():
    text = "The quick brown fox jumps over the lazy dog. " * 3
    assert zlib_entropy(text) == pytest.approx(len(zlib.compress(text.encode(), 9)) / len(text.encode()))
    assert zlib_entropy("ab" * 500) < 0.05 < zlib_entropy("q8Zr!x0Lp#") and zlib_entropy("") == 0.0


def test_teacher_nll_matches_the_evaluation_loss_and_kl_the_direct_one(tiny_llama):
    teacher, student = tiny_llama(vocab=50, seed=1), tiny_llama(vocab=50, seed=2)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=n).tolist() for n in (7, 12, 9)]
    found = model_features(teacher, student, seqs, batch_size=2, pad_id=0)
    examples = [TokenizedExample(s, list(s), i) for i, s in enumerate(seqs)]
    reference = per_example_loss(teacher, [collate([ex], pad_id=0) for ex in examples])
    assert found["teacher_nll"] == pytest.approx(reference.numpy(), abs=1e-5)
    with torch.no_grad():  # KL(teacher || student) per position of the second sequence, by hand
        ids = torch.tensor([seqs[1]])
        p = torch.softmax(teacher(input_ids=ids).logits[0, :-1], -1)
        q = torch.softmax(student(input_ids=ids).logits[0, :-1], -1)
        kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert found["teacher_student_kl"][1] == pytest.approx(kl, rel=1e-4)
    assert model_features(teacher, teacher, seqs)["teacher_student_kl"] == pytest.approx([0, 0, 0], abs=1e-6)


def test_combined_score_by_hand_and_duplicates():
    # -nll ranks: [1, .5, 0]; -zlib ranks: [.5, 1, 0] (zlib .2 lowest) -> means [.75, .75, 0]
    score = combined_score(
        {"teacher_nll": np.array([1.0, 2.0, 3.0]), "zlib_entropy": np.array([0.3, 0.2, 0.9])}
    )
    assert score == pytest.approx([0.75, 0.75, 0.0])
    assert duplicate_groups(["A  b", "c", "a b ", "c", "d"]) == [[0, 2], [1, 3]]


@pytest.fixture(scope="module")
def memorizing_teacher(tmp_path_factory):
    """A tiny teacher fine-tuned for many epochs on the first half of a corpus; the data file holds both
    halves (the second never trained on), interleaved."""
    root = tmp_path_factory.mktemp("forecast")
    corpus = generate_corpus(80, seed=5, n_canaries=0)
    seen, unseen = corpus.records[:40], corpus.records[40:]
    for name, records in (("seen", seen), ("unseen", unseen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
    mixed = [r for pair in zip(seen, unseen, strict=True) for r in pair]
    (root / "all.jsonl").write_text(
        "".join(json.dumps({"text": r["text"], "record_id": f"r{i}"}) + "\n" for i, r in enumerate(mixed))
    )
    job = load_config(
        "configs/tiny.yaml",
        [f"out={root / 'teacher'}", f"data.train={root / 'seen.jsonl'}",
         f"data.heldout={root / 'unseen.jsonl'}", "kd.kd_weight=0", "kd.ce_weight=1", "train.max_steps=150",
         "train.lr=3e-3", "train.schedule=constant", "train.checkpoint_every=1000",
         "student.tiny.hidden_size=64", "student.tiny.num_layers=2", "student.tiny.num_heads=4"],
    )  # fmt: skip
    run_distill(job, **QUIET)
    return root


def test_cli_predict_ranks_the_teachers_training_records_first(memorizing_teacher, tmp_path):
    root = memorizing_teacher
    out = tmp_path / "forecast"
    result = CliRunner().invoke(
        app,
        ["audit", "--predict", "--teacher", str(root / "teacher" / "student"),
         "--data", str(root / "all.jsonl"), "--model", str(root / "teacher" / "student"), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())["forecast"]
    assert data["n_records"] == 80 and len(data["drop"]) == 4  # the top 5%
    seen = np.array([r["index"] % 2 == 0 for r in data["records"]])  # even index = trained on
    nll = np.array([r["teacher_nll"] for r in data["records"]])
    combined = np.array([r["combined"] for r in data["records"]])
    assert roc_metrics(-nll, seen)["auc"] > 0.95  # measured 1.0: the teacher fits what it was trained on
    # both halves come from one generator, so zlib entropy carries no signal here and dilutes the mean
    # rank (measured 0.81); the top of the list is still all trained-on records
    assert roc_metrics(combined, seen)["auc"] > 0.7
    assert all(d["index"] % 2 == 0 for d in data["drop"])
    assert all(d["record_id"] == f"r{d['index']}" for d in data["drop"])
    html = (out / "report.html").read_text()
    assert "Forecast" in html
    texts = [json.loads(line)["text"] for line in (root / "all.jsonl").read_text().splitlines()]
    body = (out / "results.json").read_text() + html
    assert not any(t[:40] in body for t in texts)  # never the content


def test_cli_predict_without_a_teacher_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["audit", "--predict", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--teacher" in result.output and "Traceback" not in result.output
